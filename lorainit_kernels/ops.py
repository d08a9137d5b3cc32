"""Each op of the numerical core, declared once as a ``torch.library`` custom op with a fake implementation.

=============================  ======================================================================
``lorainit::kfac_update``      ``(Zs, Gs, ss) = (sum_t x_t x_t^T, sum_t g_t x_t^T, sum_t g_t * g_t)``
                               over the valid rows of ``x`` (T, n), ``g`` (T, m) or None, ``mask`` (T,)
``lorainit::weighted_gram``    ``sum_t w_t v_t v_t^T`` for ``v`` (T, d), ``w`` (T,) or None (ones)
``lorainit::sym_matmul``       ``A @ W`` for symmetric ``A`` (b, n, n) and ``W`` (b, n, p)
``lorainit::rr_grams``         ``(S^T S, S^T AS)`` in fp64, ``S``/``AS`` given as column parts (b, n, c_k)
=============================  ======================================================================

The body of each declaration is the plain-torch reference (``lorainit_kernels.reference``), the
kernel of every device without a registration. Per device (``torch.library.register_kernel``, as
bitsandbytes' ``backends/<device>/ops.py``): ``"cpu"`` runs the native C++ kernel when the extension
is built, takes the dtype and is not slower on this CPU, else the reference; ``"cuda"`` runs Triton
when it is installed and has a kernel for the op, else the reference. Both call
:func:`lorainit_kernels.backends.dispatch`; the implementations live in ``lorainit_kernels.backends``
(``native``, ``triton``, ``default``). The one switch that forces a backend (benchmarks, tests) is
``with lorainit_kernels.backends.use("native" | "triton" | "torch"):``; a forced backend that cannot
take the inputs raises :class:`~lorainit_kernels.backends.BackendNotSupported` listing every backend
and why it declined, it never hands the call to another one. :func:`backend_for` says which backend
runs and :func:`lorainit_kernels.backends.auto_reasons` why, without running anything.

The public functions at the bottom check the arguments and flatten batch dimensions. Their
``backend=`` keyword is a deprecated alias of :func:`~lorainit_kernels.backends.use` (one
``DeprecationWarning`` per call; it goes in the next release).
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import backends, reference
# importing the backend modules registers their implementations
from .backends import default as _default_kernels, native as _native_kernels, triton as _triton_kernels  # noqa: F401

OPS = ("kfac_update", "weighted_gram", "sym_matmul", "rr_grams")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_DEVICES = ("cpu", "cuda")
_acc_dtype = reference.accumulation_dtype


def _reference_only(op: str, *args) -> None:
    """On a device without a registered kernel the reference runs: a forced other backend must refuse."""
    if backends.forced() not in (None, "torch"):
        backends.select(op, None, *args)


# --------------------------------------------------------------------------------------------
# The declarations (body = the plain-torch reference)
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("lorainit::kfac_update", mutates_args=())
def _kfac_update_op(
    x: Tensor, g: Optional[Tensor], mask: Optional[Tensor], with_input_cov: bool
) -> Tuple[Tensor, Tensor, Tensor]:
    """``(sum_t x_t x_t^T, sum_t g_t x_t^T, sum_t g_t * g_t)`` over the rows where ``mask`` is True.

    ``x`` (T, n), ``g`` (T, m) or None, ``mask`` (T,) bool or None, last dims contiguous. Outputs in
    the accumulation dtype of ``x`` (fp32, fp64 for fp64): (n, n) or (0, 0) without ``with_input_cov``,
    (m, n) and (m,) ((0, n) and (0,) without ``g``).
    """
    _reference_only("kfac_update", x, g, mask, with_input_cov)
    return _default_kernels.kfac_update(x, g, mask, with_input_cov)


@_kfac_update_op.register_fake
def _(x, g, mask, with_input_cov):
    n = x.shape[-1]
    m = 0 if g is None else g.shape[-1]
    dt = _acc_dtype(x)
    z = x.new_empty((n, n) if with_input_cov else (0, 0), dtype=dt)
    return z, x.new_empty((m, n), dtype=dt), x.new_empty((m,), dtype=dt)


@torch.library.custom_op("lorainit::weighted_gram", mutates_args=())
def _weighted_gram_op(v: Tensor, weights: Optional[Tensor]) -> Tensor:
    """``sum_t w_t v_t v_t^T`` (d, d), exactly symmetric, for ``v`` (T, d) and ``weights`` (T,) or None (ones)."""
    _reference_only("weighted_gram", v, weights)
    return _default_kernels.weighted_gram(v, weights)


@_weighted_gram_op.register_fake
def _(v, weights):
    d = v.shape[-1]
    return v.new_empty((d, d), dtype=_acc_dtype(v))


@torch.library.custom_op("lorainit::sym_matmul", mutates_args=())
def _sym_matmul_op(A: Tensor, W: Tensor) -> Tensor:
    """``A @ W`` (b, n, p) for symmetric ``A`` (b, n, n) and ``W`` (b, n, p), in their dtype."""
    _reference_only("sym_matmul", A, W)
    return _default_kernels.sym_matmul(A, W)


@_sym_matmul_op.register_fake
def _(A, W):
    return W.new_empty(W.shape)


@torch.library.custom_op("lorainit::rr_grams", mutates_args=())
def _rr_grams_op(S_parts: List[Tensor], AS_parts: List[Tensor]) -> Tuple[Tensor, Tensor]:
    """``(S^T S, S^T AS)`` (b, q, q) fp64, upper triangles mirrored, for ``S = cat(S_parts, -1)``, ``AS = cat(AS_parts, -1)``.

    Parts (b, n, c_k); the Gram matrices of LOBPCG's Rayleigh-Ritz step.
    """
    _reference_only("rr_grams", S_parts, AS_parts)
    return _default_kernels.rr_grams(S_parts, AS_parts)


@_rr_grams_op.register_fake
def _(S_parts, AS_parts):
    b, n = S_parts[0].shape[:2]
    q = sum(t.shape[-1] for t in S_parts)
    return (S_parts[0].new_empty((b, q, q), dtype=torch.float64),
            S_parts[0].new_empty((b, q, q), dtype=torch.float64))


# The per-device kernels: the backend the automatic choice (or backends.use) picks among those that
# run on the device; native and torch on "cpu" (the Triton interpreter when forced), Triton and torch on "cuda".
def _kfac_update_kernel(x, g, mask, with_input_cov):
    return backends.dispatch("kfac_update", x, g, mask, with_input_cov)


def _weighted_gram_kernel(v, weights):
    return backends.dispatch("weighted_gram", v, weights)


def _sym_matmul_kernel(A, W):
    return backends.dispatch("sym_matmul", A, W)


def _rr_grams_kernel(S_parts, AS_parts):
    return backends.dispatch("rr_grams", S_parts, AS_parts)


for _decl, _kernel in ((_kfac_update_op, _kfac_update_kernel), (_weighted_gram_op, _weighted_gram_kernel),
                       (_sym_matmul_op, _sym_matmul_kernel), (_rr_grams_op, _rr_grams_kernel)):
    for _device in _DEVICES:
        _decl.register_kernel(_device)(_kernel)


def _forcing(backend: Optional[str], fn: str):
    """The deprecated ``backend=`` keyword: a :func:`backends.use` block around the call (warns)."""
    if backend is None:
        return contextlib.nullcontext()
    warnings.warn(f"{fn}(backend=...) is deprecated and goes in the next release; use "
                  f"`with lorainit_kernels.backends.use({backend!r}):` around the call", DeprecationWarning,
                  stacklevel=3)
    return backends.use(backend)


# --------------------------------------------------------------------------------------------
# Public functions: argument checks, batch flattening, backend choice
# --------------------------------------------------------------------------------------------
def backend_for(op: str, *tensors: Tensor, backend: Optional[str] = None) -> str:
    """The backend ``op`` runs for inputs with the devices and dtypes of ``tensors`` (or lists of them).

    ``backend=None``: the one :func:`lorainit_kernels.backends.use` forces here, else the automatic
    choice; ``"auto"``: the automatic choice; a name: that backend. A forced backend that cannot run
    such inputs raises the same :class:`~lorainit_kernels.backends.BackendNotSupported` the op would
    (every backend and why; ``backends.auto_reasons`` gives the automatic choice's reasons). Cheap (no tensor
    is read): e.g. ``backend_for("rr_grams", X) == "native"`` for an fp32 CPU block ``X`` when the
    extension is built.
    """
    if op not in OPS:
        raise ValueError(f"backend_for: op must be one of {OPS}, got {op!r}")
    return backends.select(op, backend, *tensors, full=False)


def _shape(t: Optional[Tensor]) -> str:
    return "None" if t is None else str(tuple(t.shape))


def _check_float(name: str, t: Tensor, op: str) -> None:
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be a floating tensor (bf16, fp16, fp32 or fp64), got {t.dtype} "
                        f"with shape {tuple(t.shape)}")


def _rows(t: Tensor, features: int) -> Tensor:
    """(..., d) -> (T, d) with a contiguous last dimension (a view when the layout allows)."""
    t2 = t.reshape(-1, features)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def check_kfac_inputs(
    x: Tensor,
    grad_output: Optional[Tensor],
    mask: Optional[Tensor],
    in_features: Optional[int] = None,
    out_features: Optional[int] = None,
    op: str = "kfac_update",
) -> None:
    """Raise a clear error (naming the argument and the shapes) for inputs ``kfac_update`` cannot take."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
    _check_float("x", x, op)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have shape (..., in_features), got a 0-d tensor")
    if in_features is not None and x.shape[-1] != in_features:
        raise ValueError(f"{op}: x has {x.shape[-1]} features (shape {tuple(x.shape)}), expected in_features={in_features}")
    lead = tuple(x.shape[:-1])
    if grad_output is not None:
        if not isinstance(grad_output, Tensor):
            raise TypeError(f"{op}: grad_output must be a torch.Tensor or None, got {type(grad_output).__name__}")
        _check_float("grad_output", grad_output, op)
        if tuple(grad_output.shape[:-1]) != lead or grad_output.dim() != x.dim():
            raise ValueError(f"{op}: grad_output has shape {_shape(grad_output)} whose leading dims do not match "
                             f"x's {_shape(x)}; expected (*{lead}, out_features)")
        if out_features is not None and grad_output.shape[-1] != out_features:
            raise ValueError(f"{op}: grad_output has {grad_output.shape[-1]} features (shape {_shape(grad_output)}), "
                             f"expected out_features={out_features}")
        if grad_output.device != x.device:
            raise ValueError(f"{op}: grad_output is on {grad_output.device} but x is on {x.device}")
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise TypeError(f"{op}: mask must be a bool torch.Tensor or None, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"{op}: mask must have dtype torch.bool (True = valid token), got {mask.dtype} "
                            f"with shape {_shape(mask)}; use attention_mask.bool()")
        if tuple(mask.shape) != lead:
            raise ValueError(f"{op}: mask has shape {_shape(mask)}, expected x's leading dims {lead} (x is {_shape(x)})")
        if mask.device != x.device:
            raise ValueError(f"{op}: mask is on {mask.device} but x is on {x.device}")


def kfac_update(
    x: Tensor,
    grad_output: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    *,
    with_input_cov: bool = True,
    backend: Optional[str] = None,
) -> Tuple[Tensor, Tensor, Tensor, int]:
    """Sums of the K-FAC statistics of one batch, in one fused pass over ``x``.

    ``x`` (..., n), ``grad_output`` (..., m) or None, ``mask`` (...) bool or None (True = valid
    token; padding is compacted away, never multiplied by zero). Returns ``(Zs, Gs, ss, count)``:
    ``Zs = sum_t x_t x_t^T`` (n, n), ``Gs = sum_t g_t x_t^T`` (m, n), ``ss = sum_t g_t*g_t`` (m,)
    over the ``count`` valid tokens, accumulated in fp32 (fp64 for fp64 inputs). docs/math.md.
    ``backend``: deprecated, use :func:`lorainit_kernels.backends.use`.
    """
    check_kfac_inputs(x, grad_output, mask)
    with _forcing(backend, "kfac_update"):
        return kfac_update_checked(x, grad_output, mask, with_input_cov)


def kfac_update_checked(x: Tensor, grad_output: Optional[Tensor], mask: Optional[Tensor], with_input_cov: bool
                        ) -> Tuple[Tensor, Tensor, Tensor, int]:
    """:func:`kfac_update` for inputs already accepted by :func:`check_kfac_inputs`."""
    x2 = _rows(x, x.shape[-1])
    g2 = None if grad_output is None else _rows(grad_output, grad_output.shape[-1])
    m2 = None if mask is None else mask.reshape(-1)
    count = x2.shape[0] if m2 is None else int(m2.sum())
    if m2 is not None and count == m2.numel():
        m2 = None  # every token is valid: nothing to compact
    Zs, Gs, ss = torch.ops.lorainit.kfac_update(x2, g2, m2, with_input_cov)
    return Zs, Gs, ss, count


def kfac_accumulate_(
    Z: Optional[Tensor],
    G: Optional[Tensor],
    s: Optional[Tensor],
    x: Tensor,
    grad_output: Optional[Tensor],
    mask: Optional[Tensor],
    *,
    backend: Optional[str] = None,
) -> int:
    """``Z += sum_t x_t x_t^T``, ``G += sum_t g_t x_t^T``, ``s += sum_t g_t * g_t`` over the valid tokens.

    Inputs as :func:`kfac_update` (already accepted by :func:`check_kfac_inputs`); ``Z`` (n, n)
    symmetric or None (not tracked), ``G`` (m, n) and ``s`` (m,) or None (no ``grad_output``).
    Returns the number of valid tokens. Where the accumulators are contiguous, on the inputs' device
    and in the dtype the selected backend accumulates in (fp32; the torch backend: fp64 for fp64
    inputs), the sums are added **in place** by every backend (no (n, n) or (m, n) temporary: the
    statistics of a 7B down_proj need 485 MiB for ``Z`` alone, and a temporary doubled it; the Triton
    kernel adds in place when one token split covers the batch, i.e. for every large output);
    otherwise the batch's sums are computed by :func:`kfac_update` and added (one temporary each).
    The caller checks the inputs for NaN/Inf before (the in-place path cannot undo an addition).
    ``backend``: deprecated, use :func:`lorainit_kernels.backends.use`.
    """
    with _forcing(backend, "kfac_accumulate_"):
        return _kfac_accumulate(Z, G, s, x, grad_output, mask)


def _kfac_accumulate(Z, G, s, x, grad_output, mask) -> int:
    x2 = _rows(x, x.shape[-1])
    g2 = None if grad_output is None else _rows(grad_output, grad_output.shape[-1])
    m2 = None if mask is None else mask.reshape(-1)
    count = x2.shape[0] if m2 is None else int(m2.sum())
    if count == 0:
        return 0
    if m2 is not None and count == m2.numel():
        m2 = None
    with_cov = Z is not None
    accs = [t for t in (Z, G, s) if t is not None]
    # Every backend has an accumulating form (the native and Triton kernels add into the tiles they
    # own, torch by addmm_ with beta = 1): used where the accumulators are what that form adds into.
    name = backends.select("kfac_update", None, x2, g2, m2, with_cov)
    acc_dtype = reference.accumulation_dtype(x2) if name == "torch" else torch.float32
    if all(t.dtype == acc_dtype and t.is_contiguous() and t.device == x2.device for t in accs):
        backends.kernel("kfac_update", name, x2, g2, m2, with_cov)(x2, g2, m2, with_cov, out=(Z, G, s))
        return count
    Zs, Gs, ss = torch.ops.lorainit.kfac_update(x2, g2, m2, with_cov)
    if Z is not None:
        Z += Zs
    del Zs
    if G is not None:
        G += Gs
        s += ss
    return count


def weighted_gram(v: Tensor, weights: Optional[Tensor] = None, *, out: Optional[Tensor] = None,
                  backend: Optional[str] = None) -> Tensor:
    """``sum_t w_t v_t v_t^T`` for ``v`` (..., T, d) and ``weights`` (..., T) (ones when None).

    Returns (..., d, d), symmetric, accumulated in fp32 (fp64 for fp64 inputs; the weights are cast
    to that dtype). Batch dimensions are looped over. Used for ``Z`` and for the guidance matrix's
    ``G^T D^2 G`` (docs/math.md).

    ``out`` (..., d, d), symmetric, in the accumulation dtype: the sums are **added** to it and it is
    returned. The native kernel adds in place (no (d, d) temporary, fp32 contiguous ``out``); other
    backends compute each matrix and add it (one (d, d) temporary at a time).
    ``backend``: deprecated, use :func:`lorainit_kernels.backends.use`.
    """
    with _forcing(backend, "weighted_gram"):
        return _weighted_gram(v, weights, out)


def _weighted_gram(v: Tensor, weights: Optional[Tensor], out: Optional[Tensor]) -> Tensor:
    op = "weighted_gram"
    if not isinstance(v, Tensor) or v.dim() < 2:
        raise ValueError(f"{op}: v must be a tensor of shape (..., T, d), got {_shape(v) if isinstance(v, Tensor) else type(v).__name__}")
    _check_float("v", v, op)
    if weights is not None:
        _check_float("weights", weights, op)
        if tuple(weights.shape) != tuple(v.shape[:-1]):
            raise ValueError(f"{op}: weights has shape {_shape(weights)}, expected v's leading dims {tuple(v.shape[:-1])}")
        if weights.device != v.device:
            raise ValueError(f"{op}: weights is on {weights.device} but v is on {v.device}")
    batch = v.shape[:-2]
    T, d = v.shape[-2:]
    vb = v.reshape(-1, T, d)
    wb = None if weights is None else weights.reshape(-1, T).to(_acc_dtype(v))
    name = backends.select(op, None, vb, wb)
    acc = out is not None
    if acc:
        if tuple(out.shape) != tuple(batch) + (d, d) or out.dtype != _acc_dtype(v) or out.device != v.device \
                or not out.is_contiguous():
            raise ValueError(f"{op}: out must be a contiguous {tuple(batch) + (d, d)} {_acc_dtype(v)} tensor on "
                             f"{v.device}, got {_shape(out)} {out.dtype} on {out.device}")
        res = out
    else:
        res = torch.empty(tuple(batch) + (d, d), dtype=_acc_dtype(v), device=v.device)
    rb = res.view(-1, d, d)
    for i in range(vb.shape[0]):
        vi = vb[i] if vb[i].stride(-1) == 1 else vb[i].contiguous()
        wi = None if wb is None else wb[i].contiguous()
        target = rb[i]
        if acc and name == "native":
            backends.kernel(op, name, vi, wi)(vi, wi, target)
            continue
        one = torch.ops.lorainit.weighted_gram(vi, wi)
        if acc:
            target += one
        else:
            target.copy_(one)
        del one
    return res


def sym_matmul(A: Tensor, W: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """``A @ W`` for symmetric ``A`` (..., n, n) (or (n, n), shared) and ``W`` (..., n, p).

    The native CPU kernel (fp32) reads only the upper triangle of each ``A``: every element read
    feeds two FMAs (``Y_i += a_ij w_j`` and ``Y_j += a_ij w_i``), which halves the memory traffic of
    the thin products LOBPCG is made of (csrc/symm_driver.inc). The torch backend is ``A @ W``, so
    the two agree only for symmetric ``A``. The automatic choice takes native for fp32 CPU inputs and
    torch otherwise (on GPU the product is left to cuBLAS; there is no Triton kernel for it).
    ``backend``: deprecated, use :func:`lorainit_kernels.backends.use`.
    """
    op = "sym_matmul"
    if not isinstance(A, Tensor) or not isinstance(W, Tensor):
        raise TypeError(f"{op}: A and W must be tensors, got {type(A).__name__} and {type(W).__name__}")
    _check_float("A", A, op)
    _check_float("W", W, op)
    if A.dim() < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"{op}: A must be square (..., n, n), got shape {_shape(A)}")
    n = A.shape[-1]
    if W.dim() < 2 or W.shape[-2] != n or (A.dim() > 2 and tuple(W.shape[:-2]) != tuple(A.shape[:-2])):
        raise ValueError(f"{op}: W must have shape {tuple(A.shape[:-2])} + ({n}, p) for A of shape {_shape(A)}, "
                         f"got {_shape(W)}")
    if A.device != W.device or A.dtype != W.dtype:
        raise ValueError(f"{op}: A ({A.dtype}, {A.device}) and W ({W.dtype}, {W.device}) must share dtype and device")
    batch = tuple(W.shape[:-2])
    p = W.shape[-1]
    nb = math.prod(batch)
    Ab = A.expand(*batch, n, n).reshape(nb, n, n) if A.dim() > 2 or batch else A.reshape(1, n, n)
    Wb = W.reshape(nb, n, p)
    with _forcing(backend, op):
        return torch.ops.lorainit.sym_matmul(Ab, Wb).reshape(*batch, n, p)


def rr_grams(S_parts: Sequence[Tensor], AS_parts: Sequence[Tensor], *, backend: Optional[str] = None
             ) -> Tuple[Tensor, Tensor]:
    """``(B, H) = (S^T S, S^T AS)`` in float64 for ``S = cat(S_parts, -1)``, ``AS = cat(AS_parts, -1)``.

    LOBPCG's Rayleigh-Ritz Grams. ``S_parts``, ``AS_parts``: floating tensors (b, n, c_k) on one device, with as many columns in
    all (q) on both sides. Returns ``B`` and ``H`` (b, q, q) float64, each the mirror of its upper
    triangle. The native kernel (fp32 CPU parts, 1 to 4 per side) reads the parts in place and
    accumulates the exact fp32 products in fp64; the torch backend concatenates the parts in fp64.
    ``backend``: deprecated, use :func:`lorainit_kernels.backends.use`.
    """
    op = "rr_grams"
    S_parts, AS_parts = list(S_parts), list(AS_parts)
    if not S_parts or not AS_parts:
        raise ValueError(f"{op}: S_parts and AS_parts need at least one tensor each, "
                         f"got {len(S_parts)} and {len(AS_parts)}")
    for t in S_parts + AS_parts:
        if not isinstance(t, Tensor) or t.dim() != 3:
            raise ValueError(f"{op}: parts must be (b, n, c) tensors, got "
                             f"{_shape(t) if isinstance(t, Tensor) else type(t).__name__}")
        _check_float("part", t, op)
    b, n = S_parts[0].shape[:2]
    device = S_parts[0].device
    for t in S_parts + AS_parts:
        if tuple(t.shape[:2]) != (b, n) or t.device != device:
            raise ValueError(f"{op}: every part must be ({b}, {n}, c) on {device}, got {_shape(t)} on {t.device}")
    q, q_as = sum(t.shape[-1] for t in S_parts), sum(t.shape[-1] for t in AS_parts)
    if q != q_as:
        raise ValueError(f"{op}: S_parts have {q} columns in all but AS_parts {q_as}")
    with _forcing(backend, op):
        return torch.ops.lorainit.rr_grams(S_parts, AS_parts)
