"""LoRA-DA's Initialization Guidance Matrix and the per-layer LoRA-DA factors.

LoRA-DA (Zhang et al., 2025, "LoRA-DA: Data-Aware Initialization for Low-Rank Adaptation via
Asymptotic Analysis", arXiv 2510.24561), in torch orientation (docs/math.md). For one layer
``W`` (m, n) with K-FAC statistics ``Z`` (n, n), ``G`` (m, n), ``s`` (m,):

* relative damping: ``Z_d = Z + delta * mean(diag Z) * I``, ``s_d = s + delta * mean(s)``;
* Fisher-gradient step: ``dW = -diag(s_d)^-1 G Z_d^-1`` (``dW = -G`` with ``fisher=False``);
* guidance matrix: ``Omega = beta * (sum_i 1/s_d,i) / N * Z_d^-1 - alpha * dW^T dW``;
* ``A`` = orthonormal eigenvectors of ``Omega`` for its ``r`` smallest eigenvalues, ``P = dW A``.

No explicit inverse is formed for the computation: ``Z_d`` is factored once (``cholesky_ex``, info
checked, retried in fp64) and ``Z_d^-1`` is applied with ``cholesky_solve``. ``Omega`` is assembled
from the identity ``Omega = Z_d^-1 (c Z_d - alpha G^T D^2 G) Z_d^-1 = c Z_d^-1 - alpha H^T D^2 H``
(``D = diag(s_d)^-1``, ``c = beta sum_i 1/s_d,i / N``, ``H = G Z_d^-1``) as the fused weighted Gram
``ops.weighted_gram(H, -alpha / s_d^2)`` plus ``c Z_d^-1`` (Omega's own term, by ``cholesky_inverse``).
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import backends, defaults, ops
from ._common import batch_index, chol_solve, per_matrix_matmul
from .lobpcg import DENSE_BLOCKS, lobpcg, shift_invert_preconditioner
from .operators import GuidanceOperator

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_scalar(op: str, name: str, val, *, positive: bool = False) -> float:
    if isinstance(val, bool) or not isinstance(val, (int, float)):
        raise TypeError(f"{op}: {name} must be a real number, got {type(val).__name__} {val!r}")
    val = float(val)
    if not math.isfinite(val) or val < 0 or (positive and val == 0):
        need = "> 0" if positive else ">= 0"
        raise ValueError(f"{op}: {name} must be finite and {need}, got {val!r}")
    return val


def _nonfinite_batches(t: Tensor, tail: int) -> Tensor:
    """(b,) bool: which of the ``b`` matrices of ``t`` hold a NaN/Inf, without an elementwise temporary.

    A non-finite entry makes its matrix's sum non-finite; only a matrix whose sum is non-finite (or
    overflowed) is then checked elementwise, a few rows at a time."""
    flat = t.reshape(-1, tail)
    bad = ~torch.isfinite(flat.sum(-1))
    for i in bad.nonzero().flatten().tolist():
        rows = flat[i].reshape(-1, t.shape[-1]) if t.dim() >= 2 else flat[i].reshape(1, -1)
        step = max(1, (1 << 20) // max(rows.shape[-1], 1))
        bad[i] = any(not bool(torch.isfinite(rows[j:j + step]).all()) for j in range(0, rows.shape[0], step))
    return bad


def _check_inputs(op, Z, G, s, n_train, damping, bias_weight, variance_weight):
    """Validate the statistics and the scalar knobs; returns (batch, m, n, dtype, scalars).

    ``Z`` is a tensor (..., n, n) whose batch shape broadcasts to ``G``'s (one ``Z`` shared by the
    layers of a batch: (n, n) or (1, n, n)), or an :class:`InputFactor`."""
    factor = Z if isinstance(Z, InputFactor) else None
    for name, t, nd in (("Z", Z, 2), ("G", G, 2), ("s", s, 1)):
        if factor is not None and name == "Z":
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor{' or an InputFactor' if name == 'Z' else ''}, "
                            f"got {type(t).__name__}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{op}: {name} must be a floating tensor, got {t.dtype} with shape {tuple(t.shape)}")
        if t.dim() < nd:
            raise ValueError(f"{op}: {name} must have at least {nd} dims, got shape {tuple(t.shape)}")
    if factor is not None and factor.spent:
        raise ValueError(f"{op}: the InputFactor {factor!r} was spent by its last use (its uses reached 0)")
    zshape = factor.shape if factor is not None else tuple(Z.shape)
    zdev = factor.device if factor is not None else Z.device
    if zshape[-1] != zshape[-2]:
        raise ValueError(f"{op}: Z must be square (..., n, n), got shape {zshape}")
    n = zshape[-1]
    batch = tuple(G.shape[:-2])
    zbatch = zshape[:-2]
    # Z's batch broadcasts to G's (numpy rules: aligned from the right, size 1 or equal)
    ok = len(zbatch) <= len(batch) and all(z in (1, b) for z, b in zip(zbatch[::-1], batch[::-1]))
    if G.shape[-1] != n or not ok:
        raise ValueError(f"{op}: G has shape {tuple(G.shape)}, expected (*batch, m, {n}) with Z {zshape} "
                         f"broadcastable to its batch")
    m = G.shape[-2]
    if tuple(s.shape) != batch + (m,):
        raise ValueError(f"{op}: s has shape {tuple(s.shape)}, expected {batch + (m,)} to match G {tuple(G.shape)}")
    if G.device != zdev or s.device != zdev:
        raise ValueError(f"{op}: Z, G, s must be on one device, got {zdev}, {G.device}, {s.device}")
    if n == 0 or m == 0:
        raise ValueError(f"{op}: empty statistics: Z {zshape}, G {tuple(G.shape)}")
    checks = (("G", G, m * n, batch), ("s", s, m, batch))
    if factor is None:
        checks = (("Z", Z, n * n, zbatch),) + checks
    for name, t, tail, b in checks:
        bad = _nonfinite_batches(t, tail)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"{op}: {name} {tuple(t.shape)} has NaN/Inf entries at batch index {batch_index(i, b)}")
    neg = (s.reshape(-1, m) < 0).any(dim=-1)
    if bool(neg.any()):
        i = int(neg.nonzero()[0, 0])
        raise ValueError(f"{op}: s {tuple(s.shape)} (mean squared gradients) has negative entries at batch index "
                         f"{batch_index(i, batch)}")
    if isinstance(n_train, bool) or not isinstance(n_train, (int, float)) or not n_train > 0 or not math.isfinite(n_train):
        raise ValueError(f"{op}: n_train (number of training tokens N) must be a finite number > 0, got {n_train!r}")
    damping = _check_scalar(op, "damping", damping)
    alpha = _check_scalar(op, "bias_weight", bias_weight)
    beta = _check_scalar(op, "variance_weight", variance_weight)
    zdtype = factor.dtype if factor is not None else Z.dtype
    dtype = torch.promote_types(torch.promote_types(zdtype, G.dtype), s.dtype)
    if dtype not in (torch.float32, torch.float64):
        dtype = torch.float32
    return batch, m, n, dtype, float(n_train), damping, alpha, beta


def _symmetrize_(Z: Tensor, block: int = 1024) -> Tensor:
    """``Z := (Z + Z^T) / 2`` in place, block by block (no (n, n) temporary); bitwise the same as the
    out-of-place ``0.5 * (Z + Z^T)``."""
    n = Z.shape[-1]
    for i0 in range(0, n, block):
        i1 = min(n, i0 + block)
        for j0 in range(0, i0 + 1, block):
            j1 = min(n, j0 + block)
            a, b = Z[..., i0:i1, j0:j1], Z[..., j0:j1, i0:i1]
            t = 0.5 * (a + b.transpose(-1, -2))
            a.copy_(t)
            b.copy_(t.transpose(-1, -2))
    return Z


class InputFactor:
    """``Z_d = Z + damping mean(diag Z) I`` of one input (or a batch of inputs), Cholesky-factored once.

    Layers that read the same input (q/k/v, gate/up) share one ``Z``; build its factor once with
    :func:`factor_input_cov` and pass it as ``Z`` to :func:`lora_da_factors` / :func:`guidance_matrix`
    (or ``lorainit_kernels.methods.lora_da``) for each of them: no copy of ``Z``, one factorization,
    and ``Z_d^-1`` (Omega's variance term) formed once. ``L`` (..., n, n) is the lower factor (a
    column-major view when it was factored in place); it broadcasts over a batch of layers.

    ``uses``: how many layer matrices will still be solved with it (None: unknown, the factor is
    never consumed). With ``owns`` (its storage was given away: ``overwrite=True``, or a private
    copy) the solve of the last use computes ``Z_d^-1`` in place of ``L`` and that layer's Omega in
    place of ``Z_d^-1``: the factor is spent after it (``L`` is None).
    """

    def __init__(self, L: Tensor, damping: float, *, owns: bool, uses: Optional[int] = None):
        self.L = L
        self.damping = float(damping)
        self.owns = owns
        self.uses = uses
        self._inv: Optional[Tensor] = None
        self.dtype = L.dtype
        self.shape = tuple(L.shape)
        self.device = L.device
        self.n = L.shape[-1]
        self.batch = tuple(L.shape[:-2])

    @property
    def spent(self) -> bool:
        return self.L is None and self._inv is None

    def __repr__(self) -> str:
        state = "spent" if self.L is None and self._inv is None else f"uses left {self.uses}"
        return f"InputFactor(n={self.n}, batch={self.batch}, damping={self.damping}, {state})"

    def _use(self, count: int) -> bool:
        """Record ``count`` more solved matrices; True when this was the last use."""
        if self.spent:
            raise ValueError("InputFactor: this factor was spent by its last use (uses reached 0)")
        if self.uses is None:
            return False
        if count > self.uses:
            raise ValueError(f"InputFactor: {count} layer matrices solved with a factor that had {self.uses} uses left")
        self.uses -= count
        return self.uses == 0

    def inverse(self, last: bool) -> Tuple[Tensor, bool]:
        """``Z_d^-1`` (..., n, n) and whether the caller may overwrite it (nobody else will read it).

        Computed once (``cholesky_inverse``) and cached while uses remain; at the last use of an
        owned factor, in place of ``L``."""
        if self._inv is not None:
            inv = self._inv
            if last:            # the cached inverse becomes this layer's; the factor is not needed any more
                self._inv = None
                self.L = None
            return inv, last
        if last and self.owns:
            inv = torch.cholesky_inverse(self.L, out=self.L)  # potri in place: no (n, n) temporary
            self.L = None
            return inv, True
        inv = torch.cholesky_inverse(self.L)
        if not last:
            self._inv = inv
        return inv, last

    def release(self) -> None:
        """Drop the factor (and a cached inverse) now."""
        self.L = None
        self._inv = None


def _factor_in_place(op: str, Zd: Tensor, batch) -> Tuple[Optional[Tensor], Tensor]:
    """Lower Cholesky factor of ``Zd`` (..., n, n), written into ``Zd``'s storage, and LAPACK's info
    (batch shape); the factor is None when some matrix failed (``Zd`` is then destroyed). Factoring
    the column-major view of a symmetric row-major ``Zd`` (the same matrix) lets LAPACK work in
    place: no (n, n) temporary."""
    view = Zd.transpose(-1, -2)
    info = torch.empty(batch, dtype=torch.int32, device=Zd.device)
    L, info = torch.linalg.cholesky_ex(view, out=(view, info))
    return (None if bool((info > 0).any()) else L), info


def _not_pd(op, Zd_shape, i, batch, extra=""):
    return ValueError(f"{op}: the damped input covariance Z_d = Z + damping*mean(diag Z)*I {tuple(Zd_shape)} is not "
                      f"positive definite{extra} at batch index {batch_index(i, batch)}; increase damping")


def _damp_factor(op: str, Z: Tensor, damping: float, dtype: torch.dtype, *, overwrite: bool,
                 uses: Optional[int]) -> InputFactor:
    """``Z_d`` symmetrized, damped and factored: in ``Z``'s storage with ``overwrite`` (contiguous, of
    ``dtype``), else in one private copy. A failed fp32 factorization is retried in fp64 from ``Z``
    when ``Z`` is intact (not with ``overwrite``: the failed attempt consumed it)."""
    zbatch = tuple(Z.shape[:-2])
    in_place = overwrite and Z.dtype == dtype and Z.is_contiguous()
    if in_place:
        Zd = _symmetrize_(Z)
    else:
        Zw = Z.to(dtype)
        Zd = Zw + Zw.transpose(-1, -2)          # one (n, n) copy: 0.5 (Z + Z^T), bitwise as before
        del Zw
        Zd.mul_(0.5)
    zd = Zd.diagonal(dim1=-2, dim2=-1)
    zd.add_(damping * zd.mean(-1, keepdim=True))
    shape = tuple(Zd.shape)
    L, _ = _factor_in_place(op, Zd, zbatch)
    if L is None:
        del Zd
        if in_place:
            raise ValueError(f"{op}: the damped input covariance Z_d = Z + damping*mean(diag Z)*I {shape} is not "
                             f"positive definite in {dtype} (it was factored in place, so there is no fp64 retry); "
                             f"increase damping or accumulate the statistics in float64")
        Z64 = Z.double()
        Zd64 = Z64 + Z64.transpose(-1, -2)
        del Z64
        Zd64.mul_(0.5)
        d64 = Zd64.diagonal(dim1=-2, dim2=-1)
        d64.add_(damping * d64.mean(-1, keepdim=True))
        L, info = _factor_in_place(op, Zd64, zbatch)
        if L is None:
            bad = (info.reshape(-1) > 0).nonzero()
            raise _not_pd(op, shape, int(bad[0, 0]), zbatch, " (also in float64)")
    return InputFactor(L, damping, owns=True, uses=uses)


def factor_input_cov(Z: Tensor, *, damping: float = defaults.DAMPING, overwrite: bool = False,
                     uses: Optional[int] = None) -> InputFactor:
    """The :class:`InputFactor` of ``Z`` (..., n, n): ``Z_d = (Z + Z^T)/2 + damping mean(diag Z) I``, factored.

    ``overwrite=True`` damps and factors ``Z`` **in place** (its content is then the factor: give it
    only a ``Z`` nobody reads afterwards, such as the trainer's own means); otherwise one private
    copy is made and ``Z`` is left as it was. ``uses``: the number of layer matrices that will be
    solved with it (see :class:`InputFactor`); None never consumes it.
    """
    op = "factor_input_cov"
    if not isinstance(Z, Tensor) or Z.dim() < 2 or Z.shape[-1] != Z.shape[-2] or Z.dtype not in _DTYPES:
        raise ValueError(f"{op}: Z must be a floating tensor (..., n, n), got "
                         f"{tuple(Z.shape) if isinstance(Z, Tensor) else type(Z).__name__}")
    bad = _nonfinite_batches(Z, Z.shape[-1] ** 2)
    if bool(bad.any()):
        raise ValueError(f"{op}: Z {tuple(Z.shape)} has NaN/Inf entries at batch index "
                         f"{batch_index(int(bad.nonzero()[0, 0]), tuple(Z.shape[:-2]))}")
    damping = _check_scalar(op, "damping", damping)
    if uses is not None and (isinstance(uses, bool) or not isinstance(uses, int) or uses < 1):
        raise ValueError(f"{op}: uses must be None or an int >= 1, got {uses!r}")
    dtype = Z.dtype if Z.dtype in (torch.float32, torch.float64) else torch.float32
    return _damp_factor(op, Z, damping, dtype, overwrite=overwrite, uses=uses)


# fp64 products with dW in row blocks of at most this many bytes (sigma_max(dW) without an fp64 copy of dW)
_FP64_BLOCK_BYTES = 32 << 20
# sigma_max(dW): the subspace iteration stops when sigma changes by at most this much (relative) in one
# iteration; an fp32 Ritz value is known to ~1e-7, the step normalization needs ~1e-2
STEP_NORM_RTOL = {torch.float32: 1e-6, torch.float64: 1e-12}
STEP_NORM_MAXITER = 100


class _Prepared:
    """Everything both the guidance matrix and the factors need: damped stats, factor, H / dW, c.

    Memory (``b`` layers in the batch): with ``overwrite`` ``Z`` becomes ``L``, then (at the factor's
    last use) ``Z_d^-1`` and, for one layer, its Omega; ``G`` becomes ``H = G Z_d^-1``, then ``dW``:
    nothing of size n^2 or m n is allocated for a layer that reads its ``Z`` alone. Without it, one
    private ``Z_d`` (n^2, becoming ``L``, ``Z_d^-1``, Omega) and one ``H``/``dW`` (m n) per layer.
    Omega is a fresh (b, n, n) tensor for a batch of b > 1 layers, or while an ``InputFactor`` has
    uses left (its ``Z_d^-1`` is then cached for them: one more n^2).
    """

    def __init__(self, op, Z, G, s, n_train, damping, bias_weight, variance_weight, fisher, overwrite=False):
        batch, m, n, dtype, N, delta, alpha, beta = _check_inputs(
            op, Z, G, s, n_train, damping, bias_weight, variance_weight)
        self.op = op
        self.batch, self.m, self.n, self.dtype = batch, m, n, dtype
        self.alpha, self.beta, self.fisher = alpha, beta, fisher
        self.count = math.prod(batch)
        sw = s.to(dtype)
        sd = sw + delta * sw.mean(-1, keepdim=True)
        del sw
        bad = ~(sd.reshape(-1, m) > 0).all(dim=-1)
        if (fisher or beta > 0) and bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"{op}: the damped output second moment s_d = s + damping*mean(s) {tuple(s.shape)} has "
                             f"non-positive entries at batch index {batch_index(i, batch)} (zero gradients with "
                             f"damping={delta}); increase damping")
        self.sd = sd
        need_z = fisher or beta > 0
        if isinstance(Z, InputFactor):
            if abs(Z.damping - delta) > 0:
                raise ValueError(f"{op}: the InputFactor was built with damping={Z.damping}, but damping={delta} "
                                 f"was passed")
            self.factor = Z
        elif need_z:
            self.factor = _damp_factor(op, Z, delta, dtype, overwrite=overwrite, uses=None)
            self.factor.uses = self.count  # a factor made for this call is spent by it
        else:
            self.factor = None
        self.last = self.factor._use(self.count) if self.factor is not None else False
        # c = beta * sum_i 1/s_d,i / N: the weight of Z_d^-1 in Omega (the variance term)
        self.c = (beta * (1.0 / sd).sum(-1) / N) if beta > 0 else torch.zeros(batch, dtype=dtype, device=G.device)
        self.G = G
        self.overwrite = overwrite
        self.H = None
        self._dW = None
        if fisher:
            self.H = self._solve_rows(G, overwrite)
        self.L = None if self.factor is None else self.factor.L

    def _solve_rows(self, G: Tensor, overwrite: bool) -> Tensor:
        """``H = G Z_d^-1`` (..., m, n) by two triangular solves; in ``G``'s storage with ``overwrite``."""
        L = self.factor.L
        if L is None:
            raise ValueError(f"{self.op}: the InputFactor was spent (its uses reached 0 before this solve)")
        if L.dtype != self.dtype:
            return chol_solve(G.to(self.dtype).transpose(-1, -2), L).transpose(-1, -2)
        Lt = L.transpose(-1, -2)
        if overwrite and G.dtype == self.dtype and G.is_contiguous():
            Ht = G.transpose(-1, -2)                                   # (n, m) column-major: LAPACK's layout
            torch.linalg.solve_triangular(L, Ht, upper=False, out=Ht)
        else:
            Ht = torch.linalg.solve_triangular(L, G.to(self.dtype).transpose(-1, -2), upper=False)
        torch.linalg.solve_triangular(Lt, Ht, upper=True, out=Ht)
        return Ht.transpose(-1, -2)

    @property
    def dW(self) -> Tensor:
        """``dW = -diag(s_d)^-1 H`` (fisher; in place of ``H``) or ``-G``; formed after Omega (which reads ``H``)."""
        if self._dW is None:
            if self.fisher:
                self._dW = self.H.div_(self.sd[..., :, None]).neg_()
                self.H = None
            elif self.overwrite and self.G.dtype == self.dtype and self.G.is_contiguous():
                self._dW = self.G.neg_()
            else:
                self._dW = -self.G.to(self.dtype)
        return self._dW

    def omega(self, backend) -> Tensor:
        """Assemble ``Omega`` (..., n, n) with the fused weighted Gram, symmetrized.

        ``Omega = c Z_d^-1 - alpha dW^T dW = c Z_d^-1 + sum_i (-alpha / s_d,i^2) h_i h_i^T`` with
        ``h_i`` the rows of ``H = G Z_d^-1`` (fisher) or of ``G`` (``fisher=False``, weights ``-alpha``).
        This is the identity of docs/math.md ``Z_d^-1 (c Z_d - alpha G^T D^2 G) Z_d^-1`` with the solves
        applied to ``G`` before the Gram instead of after it: the same weighted-Gram kernel, but the
        cancellation inside ``c Z_d - alpha G^T D^2 G`` is not amplified by ``kappa(Z_d)^2`` (in fp32
        the solve-after form loses two more digits on realistic statistics, where ``G ~ W Z``).
        ``c Z_d^-1`` is Omega's own variance term, from the (shared) factor's inverse. Allocation:
        the Gram is added into the buffer that holds ``c Z_d^-1`` (in place of the factor at its
        last use, for one layer), so Omega costs at most one (b, n, n) tensor.
        """
        if self.H is None and self.fisher:
            raise ValueError(f"{self.op}: Omega must be assembled before dW (it reads H)")
        V = self.H if self.fisher else self.G
        if self.fisher:
            w = (-self.alpha) / (self.sd * self.sd)
        else:
            w = torch.full(self.sd.shape, -self.alpha, dtype=self.dtype, device=self.G.device)
        full = self.batch + (self.n, self.n)
        if self.beta > 0:
            inv, private = self.factor.inverse(self.last)
            inv = inv.to(self.dtype)
            if private and inv.numel() == math.prod(full):
                # this layer's Omega in Z_d^-1's storage (symmetric: the transpose is the same matrix)
                Om = inv if inv.is_contiguous() else inv.transpose(-1, -2)
                if not Om.is_contiguous():
                    Om = Om.contiguous()
                Om = Om.view(full)
                Om.mul_(self.c[..., None, None])
            else:
                Om = torch.empty(full, dtype=self.dtype, device=self.G.device)
                torch.mul(inv, self.c[..., None, None], out=Om)
            del inv
            self.L = self.factor.L
            with backends.use_configured(backend):
                ops.weighted_gram(V, w, out=Om) if Om.dtype == _acc(V) else \
                    Om.add_(ops.weighted_gram(V, w).to(self.dtype))
        else:
            with backends.use_configured(backend):
                Om = ops.weighted_gram(V, w).to(self.dtype)
        return _symmetrize_(Om)

    def operator(self) -> GuidanceOperator:
        """``Omega = c Z_d^-1 - alpha dW^T dW`` as an operator, without forming it."""
        if self.beta > 0 and self.L is None:
            raise ValueError(f"{self.op}: the operator form needs the factor, which was spent")
        if self.beta > 0:
            return GuidanceOperator(self.dW, self.alpha, self.c, self.L)
        return GuidanceOperator(self.dW, self.alpha)

    def step_norm(self, start: Optional[Tensor] = None, maxiter: int = STEP_NORM_MAXITER) -> Tensor:
        """``sigma_max(dW)`` per matrix (fp64, batch shape), for the step normalization ``dW A A^T / sigma_max``.

        Block subspace iteration on ``dW^T dW`` (Rutishauser; Saad, "Numerical Methods for Large
        Eigenvalue Problems", 2011, ch. 5) with a Rayleigh-Ritz step per iteration: ``Y = dW X``, the
        largest Ritz value ``sigma^2 = lambda_max(Y^T Y)`` (fp64, p x p; a lower bound that increases
        to ``sigma_max^2``), ``X <- orth(dW^T Y)``. Two thin products per iteration, no SVD, no copy
        of ``dW``. ``start`` (..., n, r): a block whose span is close to the top right singular
        vectors of ``dW``, such as LoRA-DA's ``A`` (the smallest eigenvectors of Omega
        ``= c Z_d^-1 - alpha dW^T dW`` are dominated by ``dW``'s top ones when ``alpha > 0``); two
        seeded random columns are appended either way. It stops when ``sigma`` changes by at most
        ``STEP_NORM_RTOL[dtype]`` in one iteration: 1-3 iterations from ``A`` on realistic statistics,
        where a full-tolerance LOBPCG took ~5 iterations of a costlier step (bench/results/step_norm.md:
        several times faster, the step within 1e-6 of the exact one).
        Each matrix iterates on its own (with the same seeded random columns), so its value does not
        depend on its batch. A matrix that reaches ``maxiter`` first warns (RuntimeWarning, naming the
        batch indices and the last relative change, an estimate of the error). For fp32 ``dW`` the
        returned value is ``||dW v||`` of the top Ritz vector ``v`` evaluated in fp64 from ``dW``
        read in row blocks (at most ``_FP64_BLOCK_BYTES`` of fp64 at a time): quadratic in the
        vector's error.
        """
        dW = self.dW
        m, n = self.m, self.n
        dt = torch.float64 if dW.dtype == torch.float64 else torch.float32
        b = self.count
        if b == 0:
            return torch.zeros(self.batch, dtype=torch.float64, device=dW.device)
        W3 = dW.reshape(b, m, n)
        starts = None if start is None else start.reshape(b, n, -1)
        rtol = STEP_NORM_RTOL[dt]
        sigmas, changes = [], []
        for i in range(b):  # each matrix on its own: its sigma does not depend on its batch
            sig, change = _sigma_max(W3[i], None if starts is None else starts[i], dt, rtol, maxiter)
            sigmas.append(sig)
            changes.append(change)
        bad = [i for i, c in enumerate(changes) if c > rtol]
        if bad:
            where = ", ".join(str(batch_index(i, self.batch)) for i in bad[:8]) + (", ..." if len(bad) > 8 else "")
            warnings.warn(f"{self.op}: sigma_max(dW) for the step normalization did not settle to {rtol:.0e} "
                          f"within {maxiter} subspace iterations (batch index {where}; last relative change "
                          f"{max(changes):.2e})", RuntimeWarning, stacklevel=3)
        return torch.stack(sigmas).reshape(self.batch)


def _sigma_max(W: Tensor, start: Optional[Tensor], dt: torch.dtype, rtol: float, maxiter: int) -> Tuple[Tensor, float]:
    """``(sigma_max(W) as an fp64 scalar, last relative change)`` of one (m, n) matrix: the subspace
    iteration of :meth:`_Prepared.step_norm`."""
    m, n = W.shape
    # W^T Y as (Y^T W)^T: a row-major W streamed once (MKL's transposed thin GEMM was 16x slower)
    tmul = lambda Y: (Y.transpose(-1, -2) @ W).transpose(-1, -2)             # noqa: E731
    gen = torch.Generator(device=W.device).manual_seed(0x5167)
    extra = torch.randn((n, 2), generator=gen, dtype=torch.float64, device=W.device).to(dt)
    X = extra if start is None else torch.cat([start.to(dt), extra], dim=-1)
    X = X[:, :n]
    prev, change, it = None, float("inf"), 0
    while True:
        X = torch.linalg.qr(X)[0]
        Y = W @ X
        Yd = Y.double()
        theta, U = torch.linalg.eigh(Yd.transpose(-1, -2) @ Yd)
        sig = theta[-1].clamp_min(0).sqrt()
        it += 1
        if prev is not None:
            change = float((sig - prev).abs() / sig.clamp_min(1e-300))
            if change <= rtol or it >= maxiter:
                break
        prev = sig
        X = tmul(Y)
    if dt == torch.float64:
        return sig, change
    # fp32: ||W v|| of the top Ritz vector v in fp64, W read in row blocks (quadratic in v's error)
    v = (X @ U[:, -1:].to(dt)).double()
    v = v / v.norm().clamp_min(1e-300)
    rows = max(1, _FP64_BLOCK_BYTES // (8 * n))
    nu = torch.cat([W[i0:min(m, i0 + rows)].double() @ v for i0 in range(0, m, rows)])
    return nu.norm(), change


def _acc(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def guidance_matrix(
    Z: Tensor,
    G: Tensor,
    s: Tensor,
    *,
    n_train: float,
    damping: float = defaults.DAMPING,
    bias_weight: float = defaults.BIAS_WEIGHT,
    variance_weight: float = defaults.VARIANCE_WEIGHT,
    fisher: bool = defaults.FISHER,
    backend: Optional[str] = "auto",
    overwrite: bool = False,
) -> Tuple[Tensor, Tensor]:
    """LoRA-DA's Initialization Guidance Matrix ``Omega`` and the Fisher-gradient step ``dW``.

    Zhang et al. 2025 (arXiv 2510.24561), torch orientation (docs/math.md), batched over
    leading dims: ``Z`` (..., n, n) input covariance, ``G`` (..., m, n) mean gradient, ``s`` (..., m)
    mean squared output gradient, ``n_train`` = N training tokens, ``bias_weight`` = alpha,
    ``variance_weight`` = beta, ``damping`` = delta (relative)::

        Z_d = Z + delta mean(diag Z) I,   s_d = s + delta mean(s)
        dW = -diag(s_d)^-1 G Z_d^-1                    (fisher=False: dW = -G)
        Omega = beta (sum_i 1/s_d,i) / N  Z_d^-1  -  alpha dW^T dW

    assembled as ``c Z_d^-1 + weighted_gram(H, -alpha / s_d^2)`` with ``H = G Z_d^-1`` (one
    Cholesky factorization, ``cholesky_solve`` for ``H``, ``cholesky_inverse`` for Omega's own
    ``c Z_d^-1`` term; the identity of docs/math.md with the solves before the Gram, which keeps fp32
    accurate), and with ``fisher=False`` as ``c Z_d^-1 + weighted_gram(G, -alpha)``.

    ``Z`` may be shared by the batch: its batch shape broadcasts to ``G``'s ((n, n) or (1, n, n) for
    layers that read one input), or it is an :class:`InputFactor` (:func:`factor_input_cov`), factored
    once for several calls. ``overwrite=True`` lets the call use ``Z`` and ``G`` as workspace (their
    contents are then unspecified; scipy's ``overwrite_a``): no (n, n) or (m, n) temporary. By
    default neither is modified.

    Returns ``(Omega, dW)``: (..., n, n) symmetric and (..., m, n), in the inputs' promoted dtype
    (fp32 for half inputs). ``backend``: the ``weighted_gram`` backend (``backends.use`` around the
    product; ``"auto"`` keeps an enclosing ``backends.use``).
    Raises ValueError naming the argument, shapes and batch index for invalid input or a ``Z_d``
    that is not positive definite even in fp64.
    """
    prep = _Prepared("guidance_matrix", Z, G, s, n_train, damping, bias_weight, variance_weight, fisher,
                     overwrite=overwrite)
    Om = prep.omega(backend)
    return Om, prep.dW


def lora_da_factors(
    Z: Tensor,
    G: Tensor,
    s: Tensor,
    rank: int,
    *,
    n_train: float,
    damping: float = defaults.DAMPING,
    bias_weight: float = defaults.BIAS_WEIGHT,
    variance_weight: float = defaults.VARIANCE_WEIGHT,
    fisher: bool = defaults.FISHER,
    solver: str = defaults.SOLVER,
    X: Optional[Tensor] = None,
    tol: Optional[float] = None,
    maxiter: Optional[int] = None,
    backend: Optional[str] = "auto",
    preconditioner: Optional[str] = None,
    form_omega: bool = True,
    guard: Optional[int] = None,
    return_info: bool = False,
    step_norm: Optional[bool] = None,
    seeds=None,
    overwrite: bool = False,
):
    """LoRA-DA factors of one (batch of) layer(s): ``A`` = the ``rank`` smallest eigenvectors of ``Omega``.

    Zhang et al. 2025 (arXiv 2510.24561), docs/math.md; arguments as in ``guidance_matrix``
    (defaults from ``lorainit_kernels.defaults``). Returns ``(A, P, evals)``: ``A`` (..., n, rank)
    orthonormal eigenvectors of ``Omega`` for its ``rank`` smallest eigenvalues ``evals`` (..., rank)
    (ascending) and ``P = dW A`` (..., m, rank), so that ``P A^T`` is the projection of the
    Fisher-gradient step onto span(A).

    ``solver``: ``"auto"`` (default, ``defaults.SOLVER``) is what :func:`choose_solver` picks
    (``"eigh"`` for ``n < defaults.EIGH_CROSSOVER_N[device type]`` or ``n < 5 rank``, ``"lobpcg"`` above);
    ``"eigh"`` assembles ``Omega`` and calls the dense ``torch.linalg.eigh``; ``"lobpcg"`` runs
    ``lobpcg`` (Knyazev 2001; Duersch et al. 2018). With ``form_omega=True`` (default) it assembles
    ``Omega`` (as ``guidance_matrix``) and iterates with three ``(n, n) @ (n, p)`` products per step
    (one for the step, two for the default Chebyshev preconditioner of ``lobpcg``);
    ``preconditioner="shift_invert"`` uses the preconditioner ``(Omega - sigma I)^-1`` (one batched
    Cholesky, ``shift_invert_preconditioner``), the shift estimated below ``lambda_min(Omega)`` and
    bounded by ``lambda_min >= -alpha ||dW||_2^2`` (``c Z_d^-1`` is PSD), instead of it (one product per
    step and the two solves). The default (None) keeps the Chebyshev one (about 2.5x fewer steps for about as many
    products as plain LOBPCG): on realistic Omega (bench/spectra.py) the shift-invert preconditioner cuts the
    iterations by only ~30%, which does not pay for the factorization and the two triangular solves
    per step (bench/results/lobpcg.md). With ``form_omega=False`` (``preconditioner`` must be None)
    ``Omega`` is never formed and LOBPCG runs on the operator ``X -> c Z_d^-1 X - alpha dW^T (dW X)``
    (two triangular solves and two thin products per step; O(m n) memory instead of O(n^2)).
    ``guard`` is passed to ``lobpcg``. ``X`` (..., n, >= 1) warm-starts it; ``tol`` and ``maxiter``
    are passed through. ``seeds`` (one int per layer) seed each layer's LOBPCG start (default: the
    same fixed seed for every layer, so a layer's result does not depend on its batch).

    ``Z``: a tensor whose batch shape broadcasts to ``G``'s (one ``Z`` for a batch of layers that
    read the same input: damped and factored once), or an :class:`InputFactor` shared by several
    calls (layers of one input with different ``m``: q and k/v under GQA). ``overwrite=True``: ``Z``
    and ``G`` are workspace (contents unspecified afterwards): ``Z`` becomes ``L``, ``Z_d^-1`` and,
    for one layer, Omega; ``G`` becomes ``H`` and ``dW``; the call then allocates no (n, n) or
    (m, n) tensor beyond a batch's Omega (b > 1 layers) and the eigensolver's blocks. By default
    ``Z`` and ``G`` are left as they were (one private ``Z_d`` and one ``H`` per layer are allocated).

    ``return_info=True`` returns a 4th value, a dict with the same keys for both solvers:

    * ``solver``: the solver used (``"eigh"`` or ``"lobpcg"``; ``"auto"`` resolved);
    * ``iterations`` (batch shape) int: LOBPCG iterations (0 for ``eigh``);
    * ``converged`` (..., rank) bool;
    * ``residual`` (..., rank) fp64: ``||Omega a - lambda a|| / (||Omega||_2 + |lambda|)`` of the
      returned pairs, from an explicit product (``||Omega||_2``: exact for ``eigh``, the largest Ritz
      value magnitude seen for ``lobpcg``, which estimates it from below);
    * ``step_norm`` (batch shape, fp64) = ``sigma_max(dW)`` (computed when ``step_norm`` is True, or
      None and ``return_info`` is True, else None);
    * for ``lobpcg`` also ``fallback``, ``restarts``, ``replaced``, ``ortho_error``, ``preconditioner``,
      and ``shift`` (the shifts ``sigma``, fp64) and ``factorizations`` (Cholesky tries per matrix)
      for the shift-invert path.
    """
    op = "lora_da_factors"
    if solver not in ("auto", "lobpcg", "eigh"):
        raise ValueError(f"{op}: solver must be 'auto', 'lobpcg' or 'eigh', got {solver!r}")
    if preconditioner not in ("shift_invert", None):
        raise ValueError(f"{op}: preconditioner must be 'shift_invert' or None, got {preconditioner!r}")
    if preconditioner is not None and not form_omega:
        raise ValueError(f"{op}: preconditioner={preconditioner!r} needs form_omega=True")
    # the rank is checked before anything is written (with overwrite the inputs are workspace)
    bad_rank = isinstance(rank, bool) or not isinstance(rank, int) or rank < 1
    if isinstance(G, Tensor) and G.dim() >= 2 and (bad_rank or rank > min(G.shape[-2], G.shape[-1])):
        raise ValueError(f"{op}: rank must be an int with 1 <= rank <= min(m, n) = min({G.shape[-2]}, {G.shape[-1]}), "
                         f"got {rank!r} (G {tuple(G.shape)})")
    prep = _Prepared(op, Z, G, s, n_train, damping, bias_weight, variance_weight, fisher, overwrite=overwrite)
    m, n = prep.m, prep.n
    if bad_rank:
        raise ValueError(f"{op}: rank must be an int with 1 <= rank <= min(m, n) = min({m}, {n}), got {rank!r} "
                         f"(G {tuple(G.shape)})")
    if solver == "auto":
        solver = choose_solver(n, rank, prep.G.device)
    info = {"solver": solver}
    need_norm = return_info if step_norm is None else step_norm
    # the shift-invert preconditioner needs sigma_max(dW) before the solve (its bound on lambda_min)
    early_norm = solver == "lobpcg" and preconditioner == "shift_invert" and prep.alpha > 0
    # Omega is assembled first: it reads H, which then becomes dW in place (step norm, P)
    Om = prep.omega(backend) if (solver == "eigh" or form_omega) else None
    nu = prep.step_norm() if early_norm else None
    if solver == "eigh":
        evals_all, vecs = torch.linalg.eigh(Om)
        A = vecs[..., :rank].contiguous()
        del vecs
        evals = evals_all[..., :rank].contiguous()
        if return_info:
            info.update(_eigh_info(Om, A, evals, evals_all, tol))
    else:
        kw = dict(largest=False, X=X, tol=tol, maxiter=maxiter, guard=guard, seeds=seeds, return_info=True)
        if form_omega:
            M = None
            if preconditioner == "shift_invert":
                lower = -prep.alpha * nu * nu if prep.alpha > 0 else 0.0     # c Z_d^-1 is PSD
                M = shift_invert_preconditioner(Om, lower_bound=lower)
                info.update(shift=M.sigma, factorizations=M.tries)
            evals, A, linfo = lobpcg(Om, rank, M=M, **kw)
        else:
            evals, A, linfo = lobpcg(prep.operator(), rank, **kw)
        info.update(linfo)
        info["preconditioner"] = preconditioner
    del Om
    if need_norm and nu is None:
        # A spans (nearly) dW's top right singular vectors when alpha > 0: a start 1-3 iterations away
        nu = prep.step_norm(start=A if prep.alpha > 0 else None)
    P = per_matrix_matmul(prep.dW, A)
    if not return_info:
        return A, P, evals
    info["step_norm"] = nu
    return A, P, evals, info


def choose_solver(n: int, k: int, device) -> str:
    """The one rule behind ``solver="auto"``: ``"eigh"`` or ``"lobpcg"`` for ``k`` eigenpairs of an n x n matrix.

    ``"eigh"`` (dense ``torch.linalg.eigh``) when ``n < defaults.EIGH_CROSSOVER_N[device type]`` (the
    size from which LOBPCG was measured faster; device types without an entry use the ``"cuda"``
    value), or where ``lobpcg`` itself would solve densely (``n < DENSE_BLOCKS k``, its block does not
    fit three times); ``"lobpcg"`` otherwise. ``device``: a ``torch.device``, a string such as
    ``"cuda:0"``, or a tensor (its device). Used by the guidance-matrix solve, the embedding variant
    and the memory plan, so all three pick the same solver.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"choose_solver: n must be an int >= 1, got {n!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"choose_solver: k must be an int >= 1, got {k!r}")
    kind = (device.device if isinstance(device, Tensor) else torch.device(device)).type
    cross = defaults.EIGH_CROSSOVER_N.get(kind, defaults.EIGH_CROSSOVER_N["cuda"])
    return "eigh" if n < max(cross, DENSE_BLOCKS * k) else "lobpcg"


def _eigh_info(Om: Tensor, A: Tensor, evals: Tensor, evals_all: Tensor, tol: Optional[float]) -> dict:
    """The solver info of the dense path, with the residual definition of ``lobpcg``'s."""
    batch = tuple(Om.shape[:-2])
    Ad = A.double()
    ev = evals.double()
    res = torch.linalg.vector_norm(Om.double() @ Ad - Ad * ev[..., None, :], dim=-2)
    norm = evals_all.double().abs().amax(-1, keepdim=True)
    rel = res / (norm + ev.abs()).clamp_min(torch.finfo(torch.float64).tiny)
    t = float(torch.finfo(Om.dtype).eps) ** 0.5 if tol is None else tol
    return {"iterations": torch.zeros(batch, dtype=torch.long, device=Om.device), "converged": rel <= t,
            "residual": rel}
