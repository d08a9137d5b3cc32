"""Streaming accumulation of K-FAC statistics for one linear layer ``y = W x + b``, ``W`` (m, n).

Over the valid tokens ``t`` seen so far (``T = count``), docs/math.md:

* ``Z = (1/T) sum_t x_t x_t^T`` (n, n), the input covariance (K-FAC's A factor);
* ``G = (1/T) sum_t g_t x_t^T`` (m, n), the mean per-token gradient of ``W``;
* ``s = (1/T) sum_t g_t * g_t`` (m,), the diagonal of K-FAC's output-gradient factor;
* optional, for the methods that need them: ``mu = (1/T) sum_t x_t`` (n,), the input mean (EVA centers
  with it: ``Z - mu mu^T``), and ``Y = (1/T) sum_t y_t y_t^T`` (m, m), the second moment of the layer's
  output ``y = W x + b`` (Astra), accumulated by the same op as ``Z`` applied to ``y``.

Sums are kept (not means) so that accumulators merge and all-reduce exactly.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import backends
from .ops import check_kfac_inputs, kfac_accumulate_


def _check_buffers(buffers, shapes, device, dtype) -> Tuple[Optional[Tensor], ...]:
    """``buffers`` of :class:`KFACStats` checked against the sums it tracks (ValueError naming the buffer)."""
    if not isinstance(buffers, (tuple, list)) or len(buffers) != 3:
        raise ValueError("KFACStats: buffers must be a tuple (z_sum, g_sum, s_sum)")
    for label, buf, shape in zip(("z_sum", "g_sum", "s_sum"), buffers, shapes):
        if shape is None:
            if buf is not None:
                raise ValueError(f"KFACStats: buffers' {label} must be None: this accumulator does not track it")
            continue
        if not isinstance(buf, Tensor) or tuple(buf.shape) != shape or buf.dtype != dtype or buf.device != device \
                or not buf.is_contiguous():
            got = f"{tuple(buf.shape)} {buf.dtype} on {buf.device}" if isinstance(buf, Tensor) else type(buf).__name__
            raise ValueError(f"KFACStats: buffers' {label} must be a contiguous {shape} {dtype} tensor on {device}, "
                             f"got {got}")
        if bool(buf.any()):
            raise ValueError(f"KFACStats: buffers' {label} must be zero-filled (the sums start from zero)")
    return tuple(buffers)


class KFACStats:
    """K-FAC statistics of one layer, accumulated batch by batch.

    Example::

        st = KFACStats(in_features=n, out_features=m)
        st.update(x, grad_output=g, mask=attention_mask.bool())   # x (..., n), g (..., m), mask (...)
        Z, G, s = st.input_cov(), st.grad(), st.grad_sq()

    Args:
        in_features: ``n``, the layer's input size.
        out_features: ``m``, the layer's output size; None keeps only ``Z`` (for layers that share
            an input, which share one ``Z``).
        track_input_cov: False keeps only ``G`` and ``s`` (the ``Z`` lives in another accumulator).
        track_grad: False keeps no ``G`` and ``s`` (a forward-only pass: no ``grad_output``), while
            ``out_features`` still sizes the output statistics; with nothing else tracked the
            accumulator only counts tokens (a layer whose input's ``Z`` lives in another one).
        track_input_mean: also accumulate ``sum_t x_t`` (``input_mean()``); off by default (no cost).
        track_output_cov: also accumulate ``sum_t y_t y_t^T`` (m, m) of the ``output`` passed to
            :meth:`update` (``output_cov()``); needs ``out_features``; off by default.
        device, dtype: of the accumulators (fp32 by default; fp64 keeps the cross-batch sums in fp64,
            each batch is still reduced in fp32 unless its inputs are fp64).
        backend: ``"auto"`` (C++ on CPU, Triton on GPU, else torch; an enclosing ``backends.use`` block
            applies), ``"native"``, ``"triton"`` or ``"torch"``: the updates run inside
            ``backends.use(backend)``; a forced backend that cannot take an update's inputs raises
            ``backends.BackendNotSupported``.
        buffers: ``(z_sum, g_sum, s_sum)``, zero-filled contiguous tensors of shapes (n, n), (m, n),
            (m) on ``device`` in ``dtype`` to accumulate into instead of fresh ones (None where that
            sum is not tracked), e.g. slices ``Zs[i], Gs[i], ss[i]`` of stacks shared by several
            layers of one shape, whose statistics then feed one batched solve without a copy.

    An update whose inputs are invalid (wrong shapes, dtypes or devices, NaN/Inf in a valid token)
    raises and leaves the accumulator exactly as it was. Updates add into the accumulators in place
    (``ops.kfac_accumulate_``: with the native kernel no (n, n) or (m, n) temporary is allocated;
    other backends allocate one batch's sums and add them); only finite inputs so large that their
    squares overflow (|x| ~ 1e19 in fp32) raise after the addition, leaving the accumulator non-finite.
    """

    def __init__(
        self,
        in_features: int,
        out_features: Optional[int] = None,
        *,
        track_input_cov: bool = True,
        track_grad: bool = True,
        track_input_mean: bool = False,
        track_output_cov: bool = False,
        device=None,
        dtype: torch.dtype = torch.float32,
        backend: Optional[str] = "auto",
        buffers: Optional[Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]] = None,
    ):
        for name, val in (("in_features", in_features), ("out_features", out_features)):
            if val is not None and (not isinstance(val, int) or isinstance(val, bool) or val < 1):
                raise ValueError(f"KFACStats: {name} must be a positive int, got {val!r}")
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"KFACStats: dtype must be torch.float32 or torch.float64, got {dtype}")
        if out_features is None and not track_input_cov and not track_input_mean:
            raise ValueError("KFACStats: with out_features=None and track_input_cov=False there is nothing to accumulate")
        if track_output_cov and out_features is None:
            raise ValueError("KFACStats: track_output_cov=True needs out_features (the output's size m)")
        self.in_features = in_features
        self.out_features = out_features
        self.track_input_cov = track_input_cov
        self.backend = backend
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        n, m = in_features, out_features
        kw = dict(device=self.device, dtype=dtype)
        shapes = ((n, n) if track_input_cov else None, (m, n) if m is not None and track_grad else None,
                  (m,) if m is not None and track_grad else None)
        if buffers is None:
            self.z_sum, self.g_sum, self.s_sum = (None if sh is None else torch.zeros(sh, **kw) for sh in shapes)
        else:
            self.z_sum, self.g_sum, self.s_sum = _check_buffers(buffers, shapes, self.device, dtype)
        self.mu_sum = torch.zeros(n, **kw) if track_input_mean else None
        self.y_sum = torch.zeros(m, m, **kw) if track_output_cov else None
        self.count = 0

    def _backend(self):
        return backends.use_configured(self.backend)

    def __repr__(self) -> str:
        return (f"KFACStats(in_features={self.in_features}, out_features={self.out_features}, "
                f"count={self.count}, device={self.device}, dtype={self.dtype})")

    # ------------------------------------------------------------------ accumulation
    @torch.no_grad()
    def update(self, x: Tensor, grad_output: Optional[Tensor] = None, mask: Optional[Tensor] = None, *,
               output: Optional[Tensor] = None) -> int:
        """Add the tokens of one batch; returns the number of valid tokens added.

        ``x`` (..., n) layer inputs, ``grad_output`` (..., m) gradients of the summed loss with
        respect to the layer outputs (required when ``out_features`` is set), ``mask`` (...) bool
        (True = valid token), ``output`` (..., m) the layer outputs (required with ``track_output_cov``).
        Any leading shape, non-contiguous views and bf16/fp16/fp32 work.
        """
        op = "KFACStats.update"
        if self.g_sum is not None and grad_output is None:
            raise ValueError(f"{op}: grad_output is required for out_features={self.out_features} "
                             f"(x has shape {tuple(x.shape)}); use out_features=None for Z only")
        if self.g_sum is None and grad_output is not None:
            raise ValueError(f"{op}: got grad_output of shape {tuple(grad_output.shape)} but this accumulator "
                             f"keeps no gradient statistics (out_features=None or track_grad=False)")
        check_kfac_inputs(x, grad_output, mask, self.in_features, self.out_features if grad_output is not None else None,
                          op=op)
        if (self.y_sum is None) != (output is None):
            raise ValueError(f"{op}: output is {'required' if self.y_sum is not None else 'not accepted'} "
                             f"(track_output_cov={self.y_sum is not None})")
        if output is not None:
            check_kfac_inputs(output, None, mask, self.out_features, None, op=op + " (output)")
            if tuple(output.shape[:-1]) != tuple(x.shape[:-1]):
                raise ValueError(f"{op}: output has shape {tuple(output.shape)} whose leading dims do not match "
                                 f"x's {tuple(x.shape)}")
        if x.device != self.device:
            raise ValueError(f"{op}: x is on {x.device} but the accumulator is on {self.device}; "
                             f"create KFACStats(..., device={str(x.device)!r})")
        # NaN/Inf in a valid token is found on the inputs, before anything is added (the native kernel
        # adds into the accumulators in place): a non-finite entry makes its row's sum non-finite, so
        # one O(T (n + m)) reduction replaces an elementwise pass (and allocates no (T, n) mask).
        if _nonfinite_rows(x, mask):
            raise ValueError(_nonfinite_message(op, "x", x, mask))
        if grad_output is not None and _nonfinite_rows(grad_output, mask):
            raise ValueError(_nonfinite_message(op, "grad_output", grad_output, mask))
        if output is not None and _nonfinite_rows(output, mask):
            raise ValueError(_nonfinite_message(op, "output", output, mask))
        if self.z_sum is None and self.g_sum is None:  # nothing for the fused op: count the valid tokens
            count = x[..., 0].numel() if mask is None else int(mask.sum())
        else:
            with self._backend():
                count = kfac_accumulate_(self.z_sum, self.g_sum, self.s_sum, x, grad_output, mask)
        if count == 0:
            return 0
        if self.mu_sum is not None:
            rows = x.reshape(-1, self.in_features)
            if mask is not None:
                rows = rows[mask.reshape(-1)]
            self.mu_sum += rows.sum(0, dtype=self.dtype)
        if self.y_sum is not None:  # the same fused op as Z, on the outputs
            with self._backend():
                kfac_accumulate_(self.y_sum, None, None, output, None, mask)
        # finite inputs whose squares overflow fp32 (|x| ~ 1e19): the sums are no longer finite
        if (self.z_sum is not None and not bool(torch.isfinite(self.z_sum.diagonal()).all())) or \
                (self.s_sum is not None and not bool(torch.isfinite(self.s_sum).all())) or \
                (self.y_sum is not None and not bool(torch.isfinite(self.y_sum.diagonal()).all())):
            raise ValueError(f"{op}: the statistics overflowed to Inf in {self.dtype} (finite inputs of shape "
                             f"{tuple(x.shape)} too large to square); this accumulator is no longer usable")
        self.count += count
        return count

    @torch.no_grad()
    def merge(self, other: "KFACStats") -> "KFACStats":
        """Add another accumulator of the same shapes (e.g. from another process or data shard)."""
        if not isinstance(other, KFACStats):
            raise TypeError(f"KFACStats.merge: other must be a KFACStats, got {type(other).__name__}")
        mine = (self.in_features, self.out_features, self.track_input_cov, self.g_sum is not None,
                self.mu_sum is not None, self.y_sum is not None)
        theirs = (other.in_features, other.out_features, other.track_input_cov, other.g_sum is not None,
                  other.mu_sum is not None, other.y_sum is not None)
        if mine != theirs:
            raise ValueError(f"KFACStats.merge: (in_features, out_features, track_input_cov, track_grad, "
                             f"track_input_mean, track_output_cov) {theirs} do not match this accumulator's {mine}")
        for name in ("z_sum", "g_sum", "s_sum", "mu_sum", "y_sum"):
            a, b = getattr(self, name), getattr(other, name)
            if a is not None:
                a += b.to(device=a.device, dtype=a.dtype)
        self.count += other.count
        return self

    def reset(self) -> None:
        for t in (self.z_sum, self.g_sum, self.s_sum, self.mu_sum, self.y_sum):
            if t is not None:
                t.zero_()
        self.count = 0

    # ------------------------------------------------------------------ results
    def _mean(self, total: Optional[Tensor], what: str) -> Tensor:
        if total is None:
            raise ValueError(f"KFACStats.{what}: not tracked by this accumulator ({self!r})")
        if self.count == 0:
            raise ValueError(f"KFACStats.{what}: no valid tokens accumulated yet")
        return total / self.count

    def input_cov(self) -> Tensor:
        """``Z = (1/T) sum_t x_t x_t^T`` (n, n), symmetric."""
        return self._mean(self.z_sum, "input_cov")

    def grad(self) -> Tensor:
        """``G = (1/T) sum_t g_t x_t^T`` (m, n)."""
        return self._mean(self.g_sum, "grad")

    def grad_sq(self) -> Tensor:
        """``s = (1/T) sum_t g_t * g_t`` (m,)."""
        return self._mean(self.s_sum, "grad_sq")

    def input_mean(self) -> Tensor:
        """``mu = (1/T) sum_t x_t`` (n,) (``track_input_mean=True``)."""
        return self._mean(self.mu_sum, "input_mean")

    def output_cov(self) -> Tensor:
        """``Y = (1/T) sum_t y_t y_t^T`` (m, m), symmetric (``track_output_cov=True``)."""
        return self._mean(self.y_sum, "output_cov")

    def sums(self) -> list:
        """The raw sum tensors (for all-reduce); ``count`` travels beside them."""
        return [t for t in (self.z_sum, self.g_sum, self.s_sum, self.mu_sum, self.y_sum) if t is not None]


def _nonfinite_rows(t: Tensor, mask: Optional[Tensor]) -> bool:
    """True when a valid row of ``t`` (..., d) holds a NaN/Inf (its fp32 sum is then non-finite; an
    overflow of the sum of finite values also counts, and the elementwise message says so)."""
    bad = ~torch.isfinite(t.sum(-1, dtype=torch.float32 if t.dtype != torch.float64 else torch.float64))
    if mask is not None:
        bad &= mask
    return bool(bad.any())


def _nonfinite_message(op: str, name: str, t: Tensor, mask: Optional[Tensor]) -> str:
    bad = ~torch.isfinite(t)
    if mask is not None:
        bad &= mask[..., None]
    where = bad.nonzero()
    first = tuple(where[0].tolist()) if where.numel() else "unknown (overflow while squaring)"
    return (f"{op}: {name} (shape {tuple(t.shape)}) has {int(bad.sum())} non-finite values (NaN/Inf) in valid "
            f"tokens, first at index {first}; the accumulator was left unchanged")
