"""Batched LOBPCG for a few extreme eigenpairs of many symmetric matrices (or operators).

Locally Optimal Block Preconditioned Conjugate Gradient: Knyazev 2001, "Toward the optimal
preconditioned eigensolver: LOBPCG", SIAM J. Sci. Comput. 23(2); in the robust form of Duersch,
Shao, Yang and Gu 2018, "A robust and efficient implementation of LOBPCG", SIAM J. Sci. Comput.
40(5). Each step minimizes the Rayleigh quotient over ``span[X, P, W]`` (current iterate, previous
direction, preconditioned residual). This implementation:

* works on a whole batch at once (``(..., n, n)`` tensors or a batched callable), with
  per-matrix convergence (converged matrices leave the active batch at each check) and per-column
  soft locking (converged columns stop contributing residual directions);
* stops a column when ``||A x - theta x|| <= tol (||A|| + |theta|) ||x||``, scale-invariant, with
  ``||A||`` estimated by the largest Rayleigh-Ritz value magnitude seen so far;
* makes ``W`` orthogonal to ``[X, P]`` by a projection, SVQB (Stathopoulos & Wu 2002; dropping
  numerically dependent directions through masks, no shape changes) and a second projection; what
  is left of non-orthonormality is absorbed by the Rayleigh-Ritz step's Cholesky of the exact Gram;
* builds ``P`` from the Ritz coefficients (Duersch et al., Alg. 4) so it is orthonormal and
  orthogonal to ``X`` without amplifying errors, and updates ``A P`` and ``A X`` implicitly (one
  operator application per step, on ``W``);
* does the Rayleigh-Ritz step (Gram matrices and their eigenproblem) in float64 (for fp32 CPU
  blocks the Grams are accumulated in fp64 by a native kernel straight from the fp32 parts);
* keeps the best iterate per matrix and restarts from it (dropping ``P``) on NaN/Inf or divergence;
* uses ``k`` plus guard vectors (faster convergence, and the k-th pair is not the block's last);
* solves densely (``torch.linalg.eigh`` in float64) when ``n < 5 k``;
* multiplies fp32 CPU matrices with the native one-triangle kernel (``lk.sym_matmul``: half the
  memory traffic of a bmm, which bounds these thin products), and checks the input (NaN/Inf,
  symmetry through ``X^T A X``) on the first product, which uses a general bmm.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .._backends import has_native, native_module

Operator = Union[Tensor, Callable[[Tensor], Tensor]]

# smallest n for which lobpcg multiplies fp32 CPU matrices with the native symmetric kernel
_SYMM_MIN_N = 256


def _batch_index(flat: int, batch: Sequence[int]):
    """Flat batch position -> index tuple, for error messages."""
    batch = tuple(batch)
    if not batch:
        return ()
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), batch))


def _native_op(name: str):
    """``lorainit_kernels._native.<name>``, or None (extension not built, or built before it existed)."""
    if not has_native() or not hasattr(native_module(), name):
        return None
    from .. import _native

    return getattr(_native, name)


def _runs(idx: Tensor) -> List[Tuple[int, int, int]]:
    """Sorted flat indices -> contiguous runs ``(start, stop, offset into idx)``."""
    ids = idx.tolist()
    runs, start = [], 0
    for j in range(1, len(ids) + 1):
        if j == len(ids) or ids[j] != ids[j - 1] + 1:
            runs.append((ids[start], ids[j - 1] + 1, start))
            start = j
    return runs


class _Op:
    """A batch of symmetric operators on (b, n, p) blocks, applied to any sorted subset of the batch.

    Subsets of a stored batch of matrices are multiplied run by run on views (no copy of the
    remaining matrices, no work for the converged ones).
    """

    def __init__(self, A: Operator, name: str, batch: Tuple[int, ...], n: int, dtype, device, sign: float = 1.0,
                 one_triangle: bool = True):
        self.name, self.batch, self.n, self.dtype, self.device, self.sign = name, batch, n, dtype, device, sign
        self.b = math.prod(batch)
        self.si = A if isinstance(A, ShiftInvert) else None
        self.callable = not isinstance(A, Tensor)
        self.mat = None
        self.matmul = torch.bmm
        if self.si is not None:
            self.L = self.si.L.to(dtype).reshape(self.b, n, n)
        elif self.callable:
            self.fn = A
        else:
            mat = A.to(dtype)
            if mat.dim() == 2:
                mat = mat.expand(*batch, n, n)
            self.mat = mat.reshape(self.b, n, n)
            # fp32 on the CPU: the native symmetric kernel reads one triangle (half the memory
            # traffic of a bmm, which is what bounds these thin products)
            if one_triangle and self.mat.dtype == torch.float32 and self.mat.device.type == "cpu" and n >= _SYMM_MIN_N:
                sym_matmul = _native_op("sym_matmul")
                if sym_matmul is not None:
                    if self.mat.stride(-1) != 1:  # e.g. A.mT: for a symmetric A the transpose is A itself
                        self.mat = self.mat.mT if self.mat.mT.stride(-1) == 1 else self.mat.contiguous()
                    self.matmul = sym_matmul
        self.active = None  # None = whole batch; else a sorted LongTensor of flat indices
        self.runs = None

    def restrict(self, idx: Tensor) -> None:
        self.active = idx
        self.runs = _runs(idx) if idx.numel() != self.b else None

    def _by_runs(self, X: Tensor, runs, apply) -> Tensor:
        if runs is None:
            return apply(0, self.b, X)
        if len(runs) == 1:
            s, e, _ = runs[0]
            return apply(s, e, X)
        return torch.cat([apply(s, e, X[o:o + e - s]) for s, e, o in runs], dim=0)

    def left_product(self, Ut: Tensor) -> Tensor:
        """``U^T A`` (b, q, n) for the whole batch of a tensor ``A`` (its transpose's action on ``U``)."""
        out = torch.bmm(Ut, self.mat)
        return out if self.sign == 1.0 else -out

    def __call__(self, X: Tensor, idx: Optional[Tensor] = None, both_triangles: bool = False) -> Tensor:
        """``A X`` for the matrices ``idx`` (flat indices, sorted; default: the active set).

        ``both_triangles``: multiply with a general bmm even where the symmetric kernel would read
        one triangle (so that an asymmetric ``A`` shows in ``X^T A X``).
        """
        runs = self.runs if idx is None else (_runs(idx) if idx.numel() != self.b else None)
        if self.si is not None:
            out = self._by_runs(X, runs, lambda s, e, Xr: _chol_apply(Xr, self.L[s:e]))
        elif not self.callable:
            matmul = torch.bmm if both_triangles else self.matmul
            out = self._by_runs(X, runs, lambda s, e, Xr: matmul(self.mat[s:e], Xr))
        else:
            sub = idx if idx is not None else self.active
            partial = sub is not None and sub.numel() != self.b
            if partial:
                full = X.new_zeros((self.b,) + tuple(X.shape[1:]))
                full.index_copy_(0, sub, X)
            else:
                full = X
            out = self.fn(full.reshape(*self.batch, self.n, X.shape[-1]))
            if not isinstance(out, Tensor) or tuple(out.shape) != tuple(self.batch) + (self.n, X.shape[-1]):
                got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise ValueError(f"lobpcg: callable {self.name} returned {got} for an input of shape "
                                 f"{tuple(self.batch) + (self.n, X.shape[-1])}; it must return the same shape")
            out = out.reshape(self.b, self.n, X.shape[-1]).to(X.dtype)
            if partial:
                out = out.index_select(0, sub)
        return out if self.sign == 1.0 else -out


def _check_operator(A, name: str, n, batch_shape, dtype, device, k: int) -> Tuple[Tuple[int, ...], int, torch.dtype, torch.device]:
    if isinstance(A, Tensor):
        if A.dim() < 2 or A.shape[-1] != A.shape[-2]:
            raise ValueError(f"lobpcg: {name} must be a square matrix (..., n, n) or a callable, got shape {tuple(A.shape)}")
        if not A.is_floating_point() or A.is_complex():
            raise TypeError(f"lobpcg: {name} must be a real floating tensor, got {A.dtype} with shape {tuple(A.shape)}")
        An = A.shape[-1]
        if n is not None and n != An:
            raise ValueError(f"lobpcg: n={n} but {name} has shape {tuple(A.shape)}")
        dt = A.dtype if A.dtype in (torch.float32, torch.float64) else torch.float32
        return tuple(A.shape[:-2]), An, dt, A.device
    if not callable(A):
        raise TypeError(f"lobpcg: {name} must be a tensor (..., n, n) or a callable X -> A @ X, got {type(A).__name__}")
    if n is None:
        raise ValueError(f"lobpcg: {name} is a callable, so n= (the matrix size) is required")
    batch = tuple(batch_shape) if batch_shape is not None else ()
    dt = dtype if dtype is not None else torch.get_default_dtype()
    if dt not in (torch.float32, torch.float64):
        raise TypeError(f"lobpcg: dtype must be torch.float32 or torch.float64, got {dt}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    return batch, int(n), dt, dev


def _check_finite(t: Tensor, name: str, batch) -> None:
    b = math.prod(batch)
    bad = ~torch.isfinite(t.reshape(b, -1)).all(dim=-1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"lobpcg: {name} {tuple(t.shape)} has NaN/Inf entries at batch index {_batch_index(i, batch)}")


def _check_input_products(AX: Tensor, shape: Optional[Tuple[int, ...]], batch, UtA: Optional[Tensor] = None) -> None:
    """NaN/Inf and symmetry checks of ``A`` from thin products instead of elementwise passes.

    ``AX`` (b, n, p) is ``A`` applied to dense random columns: a NaN/Inf entry of ``A`` reaches it
    (checked through column sums). For a tensor ``A`` (``shape`` given), the last two columns of
    ``AX`` are ``A U`` for random probes ``U`` and ``UtA`` is ``U^T A``: an asymmetric ``A`` shows in
    ``||A U - A^T U||`` with probability one. Callables (``shape`` None) are trusted to be symmetric.
    """
    bad = ~torch.isfinite(AX.sum(dim=-2)).all(dim=-1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        what = f"A {shape}" if shape is not None else f"A @ X (callable output) {tuple(batch) + tuple(AX.shape[1:])}"
        raise ValueError(f"lobpcg: {what} has NaN/Inf entries at batch index {_batch_index(i, batch)}")
    if shape is None:
        return
    Av, ATv = AX[:, :, -2:].double(), UtA.transpose(-1, -2).double()
    asym = (Av - ATv).flatten(1).norm(dim=-1) / (Av.flatten(1).norm(dim=-1) + ATv.flatten(1).norm(dim=-1)).clamp_min(1e-300)
    big = asym > 1e-4
    if bool(big.any()):
        i = int(big.nonzero()[0, 0])
        raise ValueError(f"lobpcg: A {shape} is not symmetric at batch index {_batch_index(i, batch)} "
                         f"(||(A - A^T) v|| / (||A v|| + ||A^T v||) = {float(asym[i]):.3g} for random v)")


def _check_symmetric_finite(A: Tensor, batch, n: int) -> None:
    """The input checks of ``_check_input_products`` on two random probes alone (dense path)."""
    b0 = math.prod(batch)
    Af = A.reshape(b0, n, n)
    gen = torch.Generator(device=A.device).manual_seed(0x10B)
    U = torch.randn(b0, n, 2, generator=gen, device=A.device, dtype=Af.dtype)
    _check_input_products(Af @ U, tuple(A.shape), batch, U.transpose(-1, -2) @ Af)


def _gram(U: Tensor, V: Tensor) -> Tensor:
    """``U^T V`` in float64."""
    Ud = U.double()
    return Ud.transpose(-1, -2) @ (Ud if V is U else V.double())


def _svqb(V: Tensor, mask: Tensor, drop: float, cholesky_first: bool = False) -> Tuple[Tensor, Tensor]:
    """Orthonormalize the columns of ``V`` (b, n, p) by SVQB (Stathopoulos & Wu 2002), fp64 Gram.

    ``mask`` (b, p) marks the columns to keep. Directions whose Gram eigenvalue (after unit column
    scaling) is below ``drop`` are dropped: their column becomes zero and their mask False.
    Returns ``(Q, mask)``; ``Q`` has orthonormal (or zero) columns spanning the kept directions.

    ``cholesky_first`` (a host synchronization): when every scaled Gram factors with Cholesky pivots
    ``>= 1e-3`` (no direction close to dependent), return Cholesky-QR's ``V D^-1/2 L^-T`` instead
    (a triangular solve instead of an eigendecomposition; same span, the mask kept as is).
    """
    mf = mask.to(torch.float64)
    Gm = _gram(V, V) * (mf[:, :, None] * mf[:, None, :])
    d = Gm.diagonal(dim1=-2, dim2=-1)
    good = mask & (d > 0)
    dinv = torch.where(good, d.clamp_min(1e-300).rsqrt(), torch.zeros_like(d))
    Gs = Gm * dinv[:, :, None] * dinv[:, None, :]
    if cholesky_first:
        Lc, info = torch.linalg.cholesky_ex(Gs + torch.diag_embed((~good).to(torch.float64)))  # unit rows for the dropped
        if bool((info == 0).all()) and bool((Lc.diagonal(dim1=-2, dim2=-1) >= 1e-3).all()):
            eye = torch.eye(V.shape[-1], dtype=torch.float64, device=V.device).expand_as(Lc)
            T = dinv[:, :, None] * torch.linalg.solve_triangular(Lc.transpose(-1, -2), eye, upper=True)
            return V @ T.to(V.dtype), good
    Gs = Gs + torch.diag_embed((~good).to(torch.float64) * -1.0)  # dropped columns: eigenvalue -1
    theta, U = torch.linalg.eigh(Gs)
    keep = theta > drop
    scale = torch.where(keep, theta.clamp_min(drop).rsqrt(), torch.zeros_like(theta))
    T = dinv[:, :, None] * U * scale[:, None, :]
    Q = V @ T.to(V.dtype)
    return Q, keep


def _dense(A: _Op, k: int, largest: bool) -> Tuple[Tensor, Tensor]:
    """Dense float64 solve for small n (the callable is applied to the identity)."""
    if A.mat is not None:
        M = A.mat.double()
    else:
        eye = torch.eye(A.n, dtype=A.dtype, device=A.device).expand(A.b, A.n, A.n)
        M = A(eye.contiguous()).double() * A.sign  # undo the sign: we want A itself here
    M = 0.5 * (M + M.transpose(-1, -2))
    vals, vecs = torch.linalg.eigh(M)
    if largest:
        vals, vecs = vals.flip(-1), vecs.flip(-1)
    return vals[:, :k], vecs[:, :, :k]


def lobpcg(
    A: Operator,
    k: int,
    *,
    largest: bool = False,
    X: Optional[Tensor] = None,
    M: Optional[Operator] = None,
    tol: Optional[float] = None,
    maxiter: Optional[int] = None,
    return_info: bool = False,
    n: Optional[int] = None,
    batch_shape: Optional[Sequence[int]] = None,
    dtype: Optional[torch.dtype] = None,
    device=None,
    guard: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    check_every: Optional[int] = None,
):
    """The ``k`` smallest (or largest) eigenpairs of a batch of symmetric matrices, by LOBPCG.

    Solves ``A x_j = lambda_j x_j`` (Knyazev 2001; Duersch et al. 2018; see the module docstring).

    Args:
        A: symmetric tensor (..., n, n) with any batch shape, or a callable ``X -> A @ X`` taking and
            returning (*batch_shape, n, p) tensors; then ``n`` (and ``batch_shape``, ``dtype``,
            ``device``) must be given.
        k: number of eigenpairs, ``1 <= k <= n``.
        largest: False for the smallest eigenvalues (returned ascending), True for the largest
            (returned descending).
        X: warm start (..., n, p), p >= 1; the first ``min(p, k + guard)`` columns are used, the rest
            of the block is random.
        M: optional symmetric positive definite preconditioner ``~ (A - sigma I)^-1``, a tensor
            (..., n, n) or (n, n), or a callable like ``A``. Applied to residuals.
        tol: relative residual tolerance; a column is converged when
            ``||A x - theta x|| <= tol (||A|| + |theta|) ||x||``. Default ``sqrt(eps)`` of the dtype
            (3.5e-4 in fp32, 1.5e-8 in fp64).
        maxiter: iteration cap (default 1000). Non-convergence warns and shows in the info.
        return_info: also return a dict: ``iterations`` (...,) int, ``residual_norms`` (..., k)
            relative residuals ``||r|| / (||A|| + |theta|)`` of the returned pairs (from the
            explicit product of the final Rayleigh-Ritz step), ``converged`` (..., k) bool,
            ``fallback`` (dense solve used), ``restarts`` (...,) int.
        guard: extra block vectors beyond ``k`` (default ``min(k, 8)`` capped so that ``3 (k + guard) <= n``).
        generator: random generator for the initial block (default: a fixed seed, so results are
            reproducible).
        check_every: iterations between convergence checks (each one a host synchronization);
            default 1 on CPU, 10 on CUDA.

    Returns:
        ``vals`` (..., k) and ``vecs`` (..., n, k) with orthonormal columns, in A's dtype (fp32 or
        fp64; half inputs are solved in fp32), or ``(vals, vecs, info)``.
    """
    batch, n, dt, dev = _check_operator(A, "A", n, batch_shape, dtype, device, k)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"lobpcg: k must be an int with 1 <= k <= n = {n}, got {k!r}")
    if M is not None:
        if isinstance(M, Tensor):
            if M.dim() < 2 or M.shape[-2:] != (n, n) or (M.dim() > 2 and tuple(M.shape[:-2]) != batch):
                raise ValueError(f"lobpcg: M must have shape (n, n) or (*batch, n, n) = {batch + (n, n)}, got {tuple(M.shape)}")
            _check_finite(M.expand(*batch, n, n) if M.dim() == 2 else M, "M", batch)
        elif isinstance(M, ShiftInvert):
            if tuple(M.L.shape) != batch + (n, n):
                raise ValueError(f"lobpcg: the ShiftInvert preconditioner M was built for shape {tuple(M.L.shape)}, "
                                 f"expected {batch + (n, n)}")
        elif not callable(M):
            raise TypeError(f"lobpcg: M must be a tensor, a callable or None, got {type(M).__name__}")
    if X is not None:
        if not isinstance(X, Tensor) or X.dim() < 2 or X.shape[-2] != n or tuple(X.shape[:-2]) != batch or X.shape[-1] < 1:
            raise ValueError(f"lobpcg: X (warm start) must have shape (*{batch}, {n}, p) with p >= 1, got "
                             f"{tuple(X.shape) if isinstance(X, Tensor) else type(X).__name__}")
        _check_finite(X, "X", batch)
    if tol is None:
        tol = float(torch.finfo(dt).eps) ** 0.5
    if not (isinstance(tol, (int, float)) and tol > 0 and math.isfinite(tol)):
        raise ValueError(f"lobpcg: tol must be a finite number > 0, got {tol!r}")
    if maxiter is None:
        maxiter = 1000
    if isinstance(maxiter, bool) or not isinstance(maxiter, int) or maxiter < 0:
        raise ValueError(f"lobpcg: maxiter must be an int >= 0, got {maxiter!r}")

    b = math.prod(batch)
    sign = -1.0 if largest else 1.0
    op = _Op(A, "A", batch, n, dt, dev, sign)
    info: Dict[str, object] = {}

    if n < 5 * k or b == 0:
        if isinstance(A, Tensor) and b:
            _check_symmetric_finite(A, batch, n)
        vals, vecs = _dense(op, k, largest)
        if op.callable:
            nonfinite = ~torch.isfinite(vals).all(-1)
            if bool(nonfinite.any()):
                i = int(nonfinite.nonzero()[0, 0])
                raise ValueError(f"lobpcg: callable A returned NaN/Inf at batch index {_batch_index(i, batch)}")
        vals, vecs = vals.to(dt).reshape(*batch, k), vecs.to(dt).reshape(*batch, n, k)
        if not return_info:
            return vals, vecs
        info = {"iterations": torch.zeros(batch, dtype=torch.long), "residual_norms": torch.zeros(batch + (k,), dtype=torch.float64),
                "converged": torch.ones(batch + (k,), dtype=torch.bool), "fallback": True,
                "restarts": torch.zeros(batch, dtype=torch.long)}
        return vals, vecs, info

    # a tensor M is multiplied as given (no one-triangle kernel: its symmetry is not checked)
    prec = None if M is None else _Op(M, "M", batch, n, dt, dev, 1.0, one_triangle=False)
    if guard is None:
        guard = min(k, 8)
    nb = max(k, min(k + guard, n // 3))
    if check_every is None:
        check_every = 1 if dev.type == "cpu" else 10
    # On the CPU a host synchronization costs nothing, so blocks are only copied (torch.where)
    # when a mask is mixed; on accelerators the selects stay on the device.
    sync = dev.type == "cpu"
    drop = (100 * torch.finfo(dt).eps) ** 2
    tiny = torch.finfo(torch.float64).tiny

    def select(mask: Tensor, a: Tensor, b_: Tensor) -> Tensor:
        """``torch.where`` with a per-matrix mask (ba,), broadcast over the trailing dims."""
        if sync:
            if bool(mask.all()):
                return a
            if not bool(mask.any()):
                return b_
        return torch.where(mask.reshape(mask.shape + (1,) * (a.dim() - 1)), a, b_)

    # ---- initial block -------------------------------------------------------------------------
    if generator is None:
        generator = torch.Generator(device="cpu")
        generator.manual_seed(0x10BCC)
    X0 = torch.randn((b, n, nb), generator=generator, dtype=torch.float64).to(device=dev, dtype=dt)
    if X is not None:
        p = min(X.shape[-1], nb)
        X0[:, :, :p] = X.reshape(b, n, X.shape[-1])[:, :, :p].to(device=dev, dtype=dt)
    Xc = torch.linalg.qr(X0.double())[0].to(dt)
    # The first product doubles as the input check: NaN/Inf in A reaches A X, and for a tensor A two
    # random probe columns U appended to X give A U, compared with (U^T A)^T.
    if op.callable:
        AX = op(Xc)
        _check_input_products(AX, None, batch)
    else:
        U = torch.randn((b, n, 2), generator=generator, dtype=torch.float64).to(device=dev, dtype=dt)
        AXU = op(torch.cat([Xc, U], dim=-1), both_triangles=True)
        # U^T A streams A once more, row-major (a thin product: ~1% of a solve)
        UtA = op.left_product(U.transpose(-1, -2))
        _check_input_products(AXU, tuple(A.shape), batch, UtA)
        AX = AXU[:, :, :nb]
    H = _gram(Xc, AX)
    theta, Y = torch.linalg.eigh(0.5 * (H + H.transpose(-1, -2)))
    Yd = Y.to(dt)
    Xc, AX = Xc @ Yd, AX @ Yd
    normA = theta.abs().amax(-1)

    # ---- per-matrix state, in the layout of the active subset -----------------------------------
    out_vals = torch.zeros((b, k), dtype=torch.float64, device=dev)
    out_vecs = torch.zeros((b, n, k), dtype=dt, device=dev)
    normA_out = torch.zeros(b, dtype=torch.float64, device=dev)
    out_res = torch.zeros((b, k), dtype=torch.float64, device=dev)
    iters = torch.zeros(b, dtype=torch.long, device=dev)
    restarts = torch.zeros(b, dtype=torch.long, device=dev)
    active = torch.arange(b, device=dev)

    # [X, P] and [A X, A P] are kept side by side (one GEMM each per update); P is zero where
    # pmask is False (first step, restarts)
    XP = torch.cat([Xc, torch.zeros_like(Xc)], dim=-1)
    AXP = torch.cat([AX, torch.zeros_like(AX)], dim=-1)
    pmask = torch.zeros((b, nb), dtype=torch.bool, device=dev)
    best_err = torch.full((b,), float("inf"), dtype=torch.float64, device=dev)
    bestX, bestAX, best_theta = Xc, AX, theta

    def residual(Xc, AX, theta, normA):
        R = AX - Xc * theta.to(dt)[:, None, :]
        rn = torch.linalg.vector_norm(R, dim=-2, dtype=torch.float64)
        return R, rn / (normA[:, None] + theta.abs()).clamp_min(tiny)

    def explicit_rr(Xs: Tensor, idx: Tensor):
        """Rayleigh-Ritz of the blocks ``Xs`` with an explicit product (the implicit ``A X`` drifts)."""
        AXs = op(Xs, idx)
        Hs = _gram(Xs, AXs)
        th, Ys = torch.linalg.eigh(0.5 * (Hs + Hs.transpose(-1, -2)))
        return (Xs.double() @ Ys).to(dt), (AXs.double() @ Ys).to(dt), th

    def finalize(sel: Tensor, Xs: Tensor, AXs: Tensor, th: Tensor, nA: Tensor) -> None:
        """Store the returned pairs of the matrices ``sel`` (indices into the active set), with the
        residual norms from their explicit product."""
        g = active.index_select(0, sel)
        normA_out.index_copy_(0, g, nA)
        out_vals.index_copy_(0, g, th[:, :k])
        out_vecs.index_copy_(0, g, Xs[:, :, :k])
        r = AXs[:, :, :k] - Xs[:, :, :k] * th[:, None, :k].to(dt)
        out_res.index_copy_(0, g, torch.linalg.vector_norm(r, dim=-2, dtype=torch.float64))

    q = 3 * nb
    rr_grams = _native_op("rr_grams") if dt == torch.float32 and dev.type == "cpu" else None
    eye_q = torch.eye(q, dtype=torch.float64, device=dev)
    not_x = (torch.arange(q, device=dev) >= nb).to(torch.float64)
    xblock = (1 - not_x)[:, None] * (1 - not_x)[None, :]

    it = 0
    while True:
        Xc, AX = XP[:, :, :nb], AXP[:, :, :nb]
        R, rel = residual(Xc, AX, theta, normA)
        conv = rel <= tol                                     # (ba, nb)
        err = rel[:, :k].amax(-1)
        finite = torch.isfinite(err) & torch.isfinite(theta).all(-1)
        # best iterate / divergence guard (no copies while every matrix improves)
        better = finite & (err < best_err)
        diverged = (~finite) | (err > 1e3 * best_err)
        bestX, bestAX = select(better, Xc, bestX), select(better, AX, bestAX)
        best_theta = select(better, theta, best_theta)
        best_err = torch.where(better, err, best_err)

        stop = it >= maxiter
        if stop or it % check_every == 0:
            cand = torch.ones_like(finite) if stop else conv[:, :k].all(-1) & finite
            if bool(cand.any()):
                # candidates are verified with an explicit product; the refreshed block replaces
                # the implicit one (also for those that turn out not converged)
                ci = cand.nonzero().squeeze(-1)
                Xs, AXs, ths = explicit_rr(Xc.index_select(0, ci), active.index_select(0, ci))
                nAs = normA.index_select(0, ci)
                _, rels = residual(Xs, AXs, ths, nAs)
                errs = rels[:, :k].amax(-1)
                ok = (rels[:, :k] <= tol).all(-1) & torch.isfinite(errs)
                if stop:
                    # unconverged matrices return their best iterate when it beats the current one
                    use_best = ~ok & (best_err.index_select(0, ci) < errs)
                    if bool(use_best.any()):
                        ub = use_best.nonzero().squeeze(-1)
                        Xb, AXb, thb = explicit_rr(bestX.index_select(0, ci).index_select(0, ub),
                                                   active.index_select(0, ci).index_select(0, ub))
                        Xs, AXs, ths = Xs.index_copy(0, ub, Xb), AXs.index_copy(0, ub, AXb), ths.index_copy(0, ub, thb)
                    ok = torch.ones_like(ok)
                if bool(ok.any()):
                    sel = ok.nonzero().squeeze(-1)
                    finalize(ci.index_select(0, sel), Xs.index_select(0, sel), AXs.index_select(0, sel),
                             ths.index_select(0, sel), nAs.index_select(0, sel))
                fin = torch.zeros_like(cand).index_copy(0, ci, ok)
                keep = (~fin).nonzero().squeeze(-1)
                if keep.numel() == 0:
                    break
                # refresh the candidates that go on
                XP = XP.index_copy(0, ci, torch.cat([Xs, XP.index_select(0, ci)[:, :, nb:]], dim=-1))
                AXP = AXP.index_copy(0, ci, torch.cat([AXs, AXP.index_select(0, ci)[:, :, nb:]], dim=-1))
                theta = theta.index_copy(0, ci, ths[:, :nb])
                if keep.numel() < fin.numel():
                    active = active.index_select(0, keep)
                    op.restrict(active)
                    if prec is not None:
                        prec.restrict(active)
                    XP, AXP, theta, pmask, normA, diverged, best_err, bestX, bestAX, best_theta = (
                        t.index_select(0, keep) for t in
                        (XP, AXP, theta, pmask, normA, diverged, best_err, bestX, bestAX, best_theta))
                Xc, AX = XP[:, :, :nb], AXP[:, :, :nb]
                R, rel = residual(Xc, AX, theta, normA)
                conv = rel <= tol
        it += 1

        # restart matrices that diverged: back to the best iterate, drop P
        if it > 1 and (not sync or bool(diverged.any())):
            ok_ = ~diverged
            XP = torch.cat([select(ok_, Xc, bestX), XP[:, :, nb:] * ok_.to(dt)[:, None, None]], dim=-1)
            AXP = torch.cat([select(ok_, AX, bestAX), AXP[:, :, nb:] * ok_.to(dt)[:, None, None]], dim=-1)
            theta = select(ok_, theta, best_theta)
            pmask = pmask & ok_[:, None]
            restarts.index_add_(0, active, diverged.long())
            Xc, AX = XP[:, :, :nb], AXP[:, :, :nb]
            R = AX - Xc * theta.to(dt)[:, None, :]
            conv = conv & ok_[:, None]

        # ---- search directions W = M R, soft-locked, orthogonal to [X, P] --------------------------
        # projection, SVQB (Cholesky-QR when W is well conditioned, on the CPU), projection: W ends
        # up orthogonal to [X, P] to working precision; what is left of non-orthonormality inside W
        # is absorbed by the fp64 Rayleigh-Ritz (Cholesky of the explicit Gram) below.
        W = R if prec is None else torch.nan_to_num(prec(R), nan=0.0, posinf=0.0, neginf=0.0)
        W = torch.baddbmm(W, XP, XP.transpose(-1, -2) @ W, alpha=-1.0)   # W - XP (XP^T W), one GEMM
        W, wmask = _svqb(W, ~conv, drop, cholesky_first=sync)
        W = torch.baddbmm(W, XP, XP.transpose(-1, -2) @ W, alpha=-1.0)
        AW = op(W)

        # ---- Rayleigh-Ritz in fp64 on span[X, P, W] ----------------------------------------------
        # S = [X, P, W], A S = [A X, A P, A W]: Bs = S^T S and Hs = S^T A S
        if rr_grams is not None:
            # native: fp64 accumulation straight from the fp32 parts, one triangle each
            Bs, Hs = rr_grams((XP, W), (AXP, AW))
        else:
            # one conversion and one fp64 GEMM give both Grams
            SASd = torch.cat([XP, W, AXP, AW], dim=-1).double()
            G = SASd[:, :, :q].transpose(-1, -2) @ SASd
            Bs, Hs = G[:, :, :q], G[:, :, q:]
        # NaN guard: only the new product can be non-finite (X, P, AX, AP are combinations of finite
        # blocks), and a NaN/Inf anywhere in column c of a matrix's A W reaches Hs[0, 2 nb + c] (x_1,
        # the first column of S, is dense): a q x q check instead of a pass over A W. Such a matrix
        # keeps its X (and P) for this step.
        nonfin = ~torch.isfinite(Hs[:, :, 2 * nb:]).flatten(1).all(-1)
        if not sync or bool(nonfin.any()):
            AW = torch.nan_to_num(AW, nan=0.0, posinf=0.0, neginf=0.0)
            Hs = torch.nan_to_num(Hs, nan=0.0, posinf=0.0, neginf=0.0)
            restarts.index_add_(0, active, nonfin.long())
        valid = torch.cat([torch.ones_like(pmask), pmask, wmask & ~nonfin[:, None]], dim=-1)
        vf = valid.to(torch.float64)
        outer = vf[:, :, None] * vf[:, None, :]
        Hs = 0.5 * (Hs + Hs.transpose(-1, -2)) * outer
        Bs = Bs * outer
        penalty = 1e4 * (Hs.flatten(1).norm(dim=-1) + normA + 1e-300)
        inv = (~valid).to(torch.float64)
        Hs = Hs + torch.diag_embed(inv * penalty[:, None])
        Bs = Bs + torch.diag_embed(inv)
        Lb, binfo = torch.linalg.cholesky_ex(Bs)
        badB = binfo > 0
        if not sync or bool(badB.any()):
            # a basis that lost definiteness: that matrix restarts from X alone
            Lb = torch.where(badB[:, None, None], eye_q, Lb)
            Hs = torch.where(badB[:, None, None], Hs * xblock + torch.diag_embed(not_x * penalty[:, None]), Hs)
        Linv_H = torch.linalg.solve_triangular(Lb, Hs, upper=False)
        Hh = torch.linalg.solve_triangular(Lb, Linv_H.transpose(-1, -2), upper=False)
        th_all, Yh = torch.linalg.eigh(0.5 * (Hh + Hh.transpose(-1, -2)))
        C = torch.linalg.solve_triangular(Lb.transpose(-1, -2), Yh, upper=True)
        real = th_all < 0.5 * penalty[:, None]
        normA = torch.maximum(normA, torch.where(real, th_all.abs(), torch.zeros_like(th_all)).amax(-1))
        Cx = C[:, :, :nb]
        theta = th_all[:, :nb]
        # P from the Ritz coefficients: B-orthogonal complement of Cx in span{Cx, Cx with X-rows zeroed}
        Cp_raw = Cx.clone()
        Cp_raw[:, :nb, :] = 0
        Yq = Lb.transpose(-1, -2) @ torch.cat([Cx, Cp_raw], dim=-1)
        Qy, _ = torch.linalg.qr(Yq)
        Cp = torch.linalg.solve_triangular(Lb.transpose(-1, -2), Qy[:, :, nb:], upper=True)
        pmask = ~badB[:, None].expand(-1, nb)
        if not sync or bool(badB.any()):
            Cp = Cp * (~badB).to(torch.float64)[:, None, None]
        Cxp = torch.cat([Cx, Cp], dim=-1).to(dt)
        XP, AXP = torch.cat([XP, W], dim=-1) @ Cxp, torch.cat([AXP, AW], dim=-1) @ Cxp
        iters.index_add_(0, active, torch.ones_like(active))

    # ---- outputs -------------------------------------------------------------------------------
    vals = out_vals * sign
    vecs = out_vecs
    # residuals of what is returned, from the explicit products of the final Rayleigh-Ritz
    rn = out_res
    # ||A|| estimate: the largest magnitude seen, floored by the returned values
    rel = rn / (torch.maximum(normA_out, vals.abs().amax(-1))[:, None] + vals.abs()).clamp_min(1e-300)
    converged = rel <= tol * 1.0001
    n_bad = int((~converged.all(-1)).sum())
    if n_bad:
        warnings.warn(f"lobpcg: {n_bad} of {b} matrices did not converge to tol={tol:.3g} within maxiter={maxiter} "
                      f"iterations (worst relative residual {float(rel.max()):.3g}); see return_info=True",
                      RuntimeWarning, stacklevel=2)
    vals_o = vals.to(dt).reshape(*batch, k)
    vecs_o = vecs.reshape(*batch, n, k)
    if not return_info:
        return vals_o, vecs_o
    info = {"iterations": iters.reshape(batch), "residual_norms": rel.reshape(*batch, k),
            "converged": converged.reshape(*batch, k), "fallback": False, "restarts": restarts.reshape(batch)}
    return vals_o, vecs_o, info


def _factor_shifted(A: Tensor, sigma: Tensor) -> Tuple[Tensor, Tensor]:
    """Cholesky of ``A - sigma I`` (A (b, n, n), sigma (b,) fp64): returns (L, ok)."""
    n = A.shape[-1]
    S = A - torch.diag_embed(sigma.to(A.dtype)[:, None].expand(-1, n))
    L, info = torch.linalg.cholesky_ex(S)
    return L, info == 0


def shift_invert_preconditioner(
    A: Tensor,
    sigma=None,
    *,
    lower_bound=None,
    margin: float = 0.1,
    estimate_iters: int = 6,
    max_tries: int = 12,
):
    """Spectral-transformation preconditioner ``R -> (A - sigma I)^-1 R`` for the smallest eigenpairs.

    ``sigma`` is a shift below ``lambda_min(A)``, so ``A - sigma I = L L^T`` is SPD: one batched
    Cholesky factorization (``n^3 / 3`` BLAS-3 flops, far cheaper than the tridiagonalization of
    ``eigh``), then two triangular solves (``cholesky_solve``) per application. Passed to
    ``lobpcg(A, k, M=...)`` it turns each step into a locally optimal block inverse iteration: the
    convergence factor of the j-th pair goes from depending on ``(lambda_j - lambda_1) / (lambda_max -
    lambda_1)`` to depending on ``(lambda_j - sigma) / (lambda_{p+1} - sigma)`` (p = block size).
    How much that buys depends on the spectrum: it is largest when ``sigma`` is close to the wanted
    eigenvalues relative to the spread of the rest.

    Args:
        A: symmetric tensor (..., n, n), fp32 or fp64 (the factor is in A's dtype).
        sigma: the shift, a number or a tensor of shape ``A.shape[:-2]``; default (None): estimated
            per matrix as ``theta_1 - delta`` with ``theta_1 >= lambda_min`` the smallest Ritz value
            after ``estimate_iters`` LOBPCG steps (``k = 1``) and ``delta = margin (|theta_1| + ||r_1||)
            + 2 ||r_1||`` (floored at ``1e3 eps ||A||_inf``).
        lower_bound: optional known lower bound of ``lambda_min`` (number or tensor of ``A.shape[:-2]``),
            e.g. ``-alpha ||dW||_2^2`` for LoRA-DA's Omega; the shift never goes below it (minus the
            rounding floor) while retrying.
        margin: relative distance of the estimated shift below ``theta_1`` (see ``sigma``).
        estimate_iters: LOBPCG steps for the estimate of ``lambda_min``.
        max_tries: factorizations tried per matrix. Where Cholesky fails (``sigma`` was not below the
            spectrum, as its ``info`` reports), ``delta`` is multiplied by 8 and that matrix is
            refactored; the last try uses the Gershgorin lower bound ``min_i (a_ii - sum_{j != i} |a_ij|)``
            (or ``lower_bound``) minus the rounding floor.

    Returns:
        A ``ShiftInvert``: a callable ``R (..., n, p) -> (A - sigma I)^-1 R`` for ``lobpcg(..., M=...)``,
        with the shifts used (``.sigma``, fp64, ``A.shape[:-2]``) and the factorizations per matrix
        (``.tries``). Raises ValueError (with the batch index) if a
        matrix cannot be factored even at its Gershgorin bound (NaN entries, or not symmetric).
    """
    if not isinstance(A, Tensor) or A.dim() < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"shift_invert_preconditioner: A must be a square tensor (..., n, n), got "
                         f"{tuple(A.shape) if isinstance(A, Tensor) else type(A).__name__}")
    if A.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"shift_invert_preconditioner: A must be float32 or float64, got {A.dtype}")
    batch = tuple(A.shape[:-2])
    n = A.shape[-1]
    b = math.prod(batch)
    _check_finite(A, "A", batch)
    Af = A.reshape(b, n, n)
    dev = A.device

    def as_batch(v, name):
        t = torch.as_tensor(v, dtype=torch.float64, device=dev)
        if t.dim() == 0:
            t = t.expand(batch)
        if tuple(t.shape) != batch:
            raise ValueError(f"shift_invert_preconditioner: {name} must be a number or have shape {batch}, got {tuple(t.shape)}")
        return t.reshape(b).clone()

    rowsum = Af.abs().sum(-1)
    norm_inf = rowsum.amax(-1).double()                                    # >= ||A||_2
    gersh = (2 * Af.diagonal(dim1=-2, dim2=-1) - rowsum).amin(-1).double()  # Gershgorin: <= lambda_min
    floor = 1e3 * float(torch.finfo(A.dtype).eps) * norm_inf + torch.finfo(torch.float64).tiny
    lb = gersh if lower_bound is None else torch.maximum(as_batch(lower_bound, "lower_bound"), gersh)
    lb = lb - floor
    if sigma is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            th, _, inf = lobpcg(lambda X: Af @ X, 1, n=n, batch_shape=(b,), dtype=A.dtype, device=dev,
                                maxiter=estimate_iters, tol=1e-2, return_info=True)
        th = th[:, 0].double()
        rabs = inf["residual_norms"][:, 0].double() * (norm_inf + th.abs())
        delta = margin * (th.abs() + rabs) + 2 * rabs
        delta = torch.maximum(delta, floor)
        sig = torch.maximum(th - delta, lb)
    else:
        sig = as_batch(sigma, "sigma")
        delta = torch.maximum((margin * sig.abs()), floor)
    L = torch.empty_like(Af)
    tries = torch.zeros(b, dtype=torch.long, device=dev)
    todo = torch.arange(b, device=dev)
    for attempt in range(max_tries):
        Ls, ok = _factor_shifted(Af.index_select(0, todo), sig.index_select(0, todo))
        tries.index_add_(0, todo, torch.ones_like(todo))
        L.index_copy_(0, todo, Ls)
        todo = todo[~ok]
        if todo.numel() == 0:
            break
        if attempt == max_tries - 2:
            sig.index_copy_(0, todo, lb.index_select(0, todo))               # last try: the safe bound
        else:
            delta.index_copy_(0, todo, 8 * delta.index_select(0, todo))
            base = sig.index_select(0, todo) + delta.index_select(0, todo) / 8
            sig.index_copy_(0, todo, torch.maximum(base - delta.index_select(0, todo), lb.index_select(0, todo)))
    if todo.numel():
        i = int(todo[0])
        raise ValueError(f"shift_invert_preconditioner: A - sigma I {tuple(A.shape)} is not positive definite even "
                         f"at the Gershgorin bound sigma = {float(sig[i]):.6g} at batch index {_batch_index(i, batch)} "
                         f"(is A symmetric?)")
    return ShiftInvert(L.reshape(*batch, n, n), sig.reshape(batch), tries.reshape(batch))


class ShiftInvert:
    """``R -> (A - sigma I)^-1 R`` from the lower Cholesky factor ``L`` (..., n, n) of ``A - sigma I``.

    Made by ``shift_invert_preconditioner``; ``sigma`` (fp64, batch shape) and ``tries`` (Cholesky
    factorizations per matrix) say what was done. ``lobpcg`` restricts it to the matrices still
    iterating, so converged matrices cost nothing.
    """

    def __init__(self, L: Tensor, sigma: Tensor, tries: Tensor):
        self.L, self.sigma, self.tries = L, sigma, tries

    def __call__(self, R: Tensor) -> Tensor:
        return _chol_apply(R.to(self.L.dtype), self.L).to(R.dtype)


def _chol_apply(R: Tensor, L: Tensor) -> Tensor:
    """``(L L^T)^-1 R`` by two triangular solves (faster than ``cholesky_solve`` on CPU for thin R)."""
    Y = torch.linalg.solve_triangular(L, R, upper=False)
    return torch.linalg.solve_triangular(L.transpose(-1, -2), Y, upper=True)
