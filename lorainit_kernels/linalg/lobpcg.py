"""Batched LOBPCG for a few extreme eigenpairs of many symmetric matrices (or operators).

Locally Optimal Block Preconditioned Conjugate Gradient: Knyazev 2001, "Toward the optimal
preconditioned eigensolver: LOBPCG", SIAM J. Sci. Comput. 23(2); in the robust form of Duersch,
Shao, Yang and Gu 2018, "A robust and efficient implementation of LOBPCG", SIAM J. Sci. Comput.
40(5). Each step minimizes the Rayleigh quotient over ``span[X, P, W]`` (current iterate, previous
direction, preconditioned residual). The iteration lives in ``_Solver`` as named steps
(``initial_block``, ``residuals``, ``check`` with locking and verification, ``restart``,
``search_directions``, ``rayleigh_ritz`` with the basis update). This implementation:

* works on a whole batch at once (a batched symmetric operator: ``linalg.operators``; tensors and
  callables are wrapped), never asking which kind of operator it got, with
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
* keeps the best iterate per matrix (NaN-safe) and restarts from it (dropping ``P``) on NaN/Inf
  or divergence;
* replaces degenerate directions (dependent warm-start columns, a ``W`` that vanishes in the
  projection because ``[X, P]`` spans an invariant subspace, a collapsing ``P`` column, a block that
  lost rank) by fresh random directions orthogonal to the basis, drawn from each matrix's own seed;
* verifies what it returns (explicit product, exact Gram: orthonormal columns and residuals) and
  never reports ``converged`` for a pair that fails; such pairs come back flagged, with one warning;
* uses ``k`` plus guard vectors (faster convergence, and the k-th pair is not the block's last);
* solves densely (``torch.linalg.eigh`` in float64) when ``n < 5 k``;
* multiplies fp32 CPU matrices with the native one-triangle kernel (``lk.sym_matmul``: half the
  memory traffic of a bmm, which bounds these thin products), and checks the input (NaN/Inf,
  symmetry) on the first product with two random probe columns and one thin ``U^T A``;
* preconditions the residuals of a tensor ``A`` (without ``M``) by a Chebyshev polynomial
  ``q(A)`` of degree 2 (``chebyshev=3``): ``q(x) (x - s) ~ 1`` on the unwanted part of the spectrum
  (estimated from the Ritz values), ``q > 0`` everywhere, so it is an SPD preconditioner; 3 products
  per iteration, about 2.5x fewer iterations (Rayleigh-Ritz steps) for about as many products.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .. import ops
from ._common import batch_index, chol_solve, per_matrix_matmul
from .operators import CallableOperator, CholeskyInverse, DenseOperator, SymmetricOperator

Operator = Union[Tensor, SymmetricOperator, Callable[[Tensor], Tensor]]

# smallest n for which lobpcg multiplies fp32 CPU matrices with the native symmetric kernel
_SYMM_MIN_N = 256
# the seed of every matrix's random directions when neither seeds nor a generator is given
DEFAULT_SEED = 0x10BCC
# degree + 1 of the default Chebyshev polynomial preconditioner for tensor A (odd; 1 = none)
CHEBYSHEV_DEFAULT = 3
# lobpcg solves densely when n < DENSE_BLOCKS * k: the basis [X, P, W] (3 (k + guard) columns) would not fit
DENSE_BLOCKS = 5


def _native_op(op: str, *sample: Tensor):
    """The op ``torch.ops.lorainit.<op>`` where it runs the native kernel for inputs like ``sample`` (under the
    current ``backends.use``), else None: the solver's own torch code is then as fast and skips the dispatch.
    Resolved once per solve: the products and Grams run every iteration."""
    if ops.backend_for(op, *sample) != "native":
        return None
    return getattr(torch.ops.lorainit, op).default


def _runs(idx: Tensor) -> List[Tuple[int, int, int]]:
    """Sorted flat indices -> contiguous runs ``(start, stop, offset into idx)``."""
    ids = idx.tolist()
    runs, start = [], 0
    for j in range(1, len(ids) + 1):
        if j == len(ids) or ids[j] != ids[j - 1] + 1:
            runs.append((ids[start], ids[j - 1] + 1, start))
            start = j
    return runs


def as_operator(A, name: str, batch: Tuple[int, ...], n: int, dtype, device, one_triangle: bool = True) -> SymmetricOperator:
    """``A`` as a :class:`~lorainit_kernels.linalg.operators.SymmetricOperator`: a tensor becomes a
    ``DenseOperator``, a callable a ``CallableOperator``; an operator is taken as it is."""
    if isinstance(A, SymmetricOperator):
        return A
    if isinstance(A, Tensor):
        return DenseOperator(A, batch, dtype, one_triangle=one_triangle, min_n=_SYMM_MIN_N)
    return CallableOperator(A, batch, n, dtype, device, name)


class _Op:
    """A symmetric operator (times ``sign``) applied to any sorted subset of its flattened batch.

    The subset is applied run by run (contiguous runs of the batch: views, no copy of the remaining
    matrices, no work for the converged ones); a callable sees the whole batch once.
    """

    def __init__(self, A, name: str, batch: Tuple[int, ...], n: int, dtype, device, sign: float = 1.0,
                 one_triangle: bool = True):
        self.A = as_operator(A, name, batch, n, dtype, device, one_triangle)
        self.name, self.batch, self.n, self.dtype, self.device, self.sign = name, batch, n, dtype, device, sign
        self.b = math.prod(batch)
        self.active = None  # None = whole batch; else a sorted LongTensor of flat indices
        self.runs = None

    @property
    def probes_symmetry(self) -> bool:
        """Whether the input can be checked for symmetry (``U^T A`` of a stored matrix)."""
        return hasattr(self.A, "left_product")

    def restrict(self, idx: Tensor) -> None:
        self.active = idx
        self.runs = _runs(idx) if idx.numel() != self.b else None

    def left_product(self, Ut: Tensor) -> Tensor:
        """``U^T A`` (b, q, n) for the whole batch of a stored ``A`` (its transpose's action on ``U``)."""
        out = self.A.left_product(Ut)
        return out if self.sign == 1.0 else -out

    def __call__(self, X: Tensor, idx: Optional[Tensor] = None) -> Tensor:
        """``A X`` for the matrices ``idx`` (flat indices, sorted; default: the active set)."""
        runs = self.runs if idx is None else (_runs(idx) if idx.numel() != self.b else None)
        if runs is None:
            out = self.A.apply(X, 0, self.b)
        elif isinstance(self.A, CallableOperator):
            out = self.A.apply_rows(X, idx if idx is not None else self.active)
        elif len(runs) == 1:
            s, e, _ = runs[0]
            out = self.A.apply(X, s, e)
        else:
            out = torch.cat([self.A.apply(X[o:o + e - s], s, e) for s, e, o in runs], dim=0)
        return out if self.sign == 1.0 else -out


def _check_operator(A, name: str, n, batch_shape, dtype, device, k: int) -> Tuple[Tuple[int, ...], int, torch.dtype, torch.device]:
    if isinstance(A, SymmetricOperator):
        if n is not None and int(n) != A.n:
            raise ValueError(f"lobpcg: n={n} but {name} is {A!r}")
        if batch_shape is not None and tuple(batch_shape) != A.batch:
            raise ValueError(f"lobpcg: batch_shape={tuple(batch_shape)} but {name} is {A!r}")
        if A.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"lobpcg: {name} must be a float32 or float64 operator, got {A!r}")
        return A.batch, A.n, A.dtype, A.device
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
        raise TypeError(f"lobpcg: {name} must be a tensor (..., n, n), a SymmetricOperator or a callable X -> A @ X, "
                        f"got {type(A).__name__}")
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
        raise ValueError(f"lobpcg: {name} {tuple(t.shape)} has NaN/Inf entries at batch index {batch_index(i, batch)}")


def _check_input_products(AX: Tensor, shape: Optional[Tuple[int, ...]], batch, UtA: Optional[Tensor] = None) -> None:
    """NaN/Inf and symmetry checks of ``A`` from thin products instead of elementwise passes.

    ``AX`` (b, n, p) is ``A`` applied to dense random columns: a NaN/Inf entry of ``A`` reaches it
    (checked through column sums). For a tensor ``A`` (``shape`` given), the last two columns of
    ``AX`` are ``A U`` for random probes ``U`` and ``UtA`` is ``U^T A``: an asymmetric ``A`` shows in
    ``||A U - A^T U||`` with probability one, also where ``A U`` comes from the one-triangle kernel
    (it multiplies ``triu(A) + triu(A, 1)^T``, which differs from ``A^T`` exactly when ``A`` is not
    symmetric), and a NaN/Inf entry in either triangle reaches ``A U`` or ``U^T A`` (both checked).
    Callables (``shape`` None) are trusted to be symmetric.
    """
    bad = ~torch.isfinite(AX.sum(dim=-2)).all(dim=-1)
    if UtA is not None:
        bad = bad | ~torch.isfinite(UtA.sum(dim=-1)).all(dim=-1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        what = f"A {shape}" if shape is not None else f"A @ X (operator output) {tuple(batch) + tuple(AX.shape[1:])}"
        raise ValueError(f"lobpcg: {what} has NaN/Inf entries at batch index {batch_index(i, batch)}")
    if shape is None:
        return
    Av, ATv = AX[:, :, -2:].double(), UtA.transpose(-1, -2).double()
    asym = (Av - ATv).flatten(1).norm(dim=-1) / (Av.flatten(1).norm(dim=-1) + ATv.flatten(1).norm(dim=-1)).clamp_min(1e-300)
    big = asym > 1e-4
    if bool(big.any()):
        i = int(big.nonzero()[0, 0])
        raise ValueError(f"lobpcg: A {shape} is not symmetric at batch index {batch_index(i, batch)} "
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
    return per_matrix_matmul(Ud, Ud if V is U else V.double(), transpose_u=True)


def _svqb(V: Tensor, mask: Tensor, drop: float, cholesky_first: bool = False) -> Tuple[Tensor, Tensor]:
    """Orthonormalize the columns of ``V`` (b, n, p) by SVQB (Stathopoulos & Wu 2002), fp64 Gram.

    ``mask`` (b, p) marks the columns to keep. Directions whose Gram eigenvalue (after unit column
    scaling) is below ``drop`` are dropped: their column becomes zero and their mask False.
    Returns ``(Q, mask)``; ``Q`` has orthonormal (or zero) columns spanning the kept directions.

    ``cholesky_first``: a matrix whose scaled Gram factors with Cholesky pivots ``>= 1e-3`` (no
    direction close to dependent) takes Cholesky-QR's ``V D^-1/2 L^-T`` instead (a triangular solve
    instead of an eigendecomposition; same span, its mask kept as is). The choice is per matrix.
    """
    mf = mask.to(torch.float64)
    Gm = _gram(V, V) * (mf[:, :, None] * mf[:, None, :])
    d = Gm.diagonal(dim1=-2, dim2=-1)
    good = mask & (d > 0)
    dinv = torch.where(good, d.clamp_min(1e-300).rsqrt(), torch.zeros_like(d))
    Gs = Gm * dinv[:, :, None] * dinv[:, None, :]
    if not cholesky_first:
        return _svqb_eigh(V, Gs, good, dinv, drop)
    Lc, info = torch.linalg.cholesky_ex(Gs + torch.diag_embed((~good).to(torch.float64)))  # unit rows for the dropped
    chol = (info == 0) & (Lc.diagonal(dim1=-2, dim2=-1) >= 1e-3).all(-1)
    if bool(chol.all()):
        return V @ _cholqr_transform(Lc, dinv).to(V.dtype), good
    if not bool(chol.any()):
        return _svqb_eigh(V, Gs, good, dinv, drop)
    ci, ei = chol.nonzero().squeeze(-1), (~chol).nonzero().squeeze(-1)
    Qe, ke = _svqb_eigh(V.index_select(0, ei), Gs.index_select(0, ei), good.index_select(0, ei),
                        dinv.index_select(0, ei), drop)
    Qc = V.index_select(0, ci) @ _cholqr_transform(Lc.index_select(0, ci), dinv.index_select(0, ci)).to(V.dtype)
    return V.new_empty(V.shape).index_copy(0, ci, Qc).index_copy(0, ei, Qe), good.index_copy(0, ei, ke)


def _cholqr_transform(Lc: Tensor, dinv: Tensor) -> Tensor:
    eye = torch.eye(Lc.shape[-1], dtype=torch.float64, device=Lc.device).expand_as(Lc)
    return dinv[:, :, None] * torch.linalg.solve_triangular(Lc.transpose(-1, -2), eye, upper=True)


def _svqb_eigh(V: Tensor, Gs: Tensor, good: Tensor, dinv: Tensor, drop: float) -> Tuple[Tensor, Tensor]:
    Gs = Gs + torch.diag_embed((~good).to(torch.float64) * -1.0)  # dropped columns: eigenvalue -1
    theta, U = torch.linalg.eigh(Gs)
    keep = theta > drop
    scale = torch.where(keep, theta.clamp_min(drop).rsqrt(), torch.zeros_like(theta))
    T = dinv[:, :, None] * U * scale[:, None, :]
    return V @ T.to(V.dtype), keep


def _dense(A: _Op, k: int, largest: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """Dense float64 solve for small n (an operator is applied to the identity): (vals, vecs, A in fp64)."""
    M = A.A.to_dense().reshape(A.b, A.n, A.n).double()   # A itself, without the sign
    M = 0.5 * (M + M.transpose(-1, -2))
    vals, vecs = torch.linalg.eigh(M)
    if largest:
        vals, vecs = vals.flip(-1), vecs.flip(-1)
    return vals[:, :k], vecs[:, :, :k], M


def _default_chebyshev(op: "_Op", prec) -> int:
    return CHEBYSHEV_DEFAULT if prec is None and op.A.cheap_products else 1


def _default_seeds(b: int, seeds, batch) -> List[int]:
    if seeds is None:
        return [DEFAULT_SEED] * b
    flat = seeds.reshape(-1).tolist() if isinstance(seeds, Tensor) else list(seeds)
    if len(flat) != b or not all(isinstance(s, int) and not isinstance(s, bool) for s in flat):
        raise ValueError(f"lobpcg: seeds must hold one int per matrix of the batch {tuple(batch)} ({b} in all), "
                         f"got {seeds!r}"[:200])
    return [int(s) for s in flat]


class _Solver:
    """The state of one batched LOBPCG run, advanced in named steps.

    Per matrix of the active set (the matrices still iterating, in the layout of ``active``): the
    block ``[X, P]`` and its product ``[A X, A P]`` side by side (``P`` is zero where ``pmask`` is
    False), the Ritz values ``theta``, the norm estimate ``normA``, and the best iterate so far.
    One iteration is ``residuals -> check (locking, verification, output) -> restart ->
    search_directions -> rayleigh_ritz`` (``run``). Every step is per matrix: a matrix's result
    depends on its own data and seed only, never on the other matrices of the batch.
    """

    def __init__(self, op: _Op, prec: Optional[_Op], k: int, nb: int, tol: float, maxiter: int, check_every: int,
                 draw: Callable[[Tensor, int], Tensor], chebyshev: int = 1):
        self.op, self.prec, self.k, self.nb, self.tol, self.maxiter = op, prec, k, nb, tol, maxiter
        self.chebyshev = chebyshev
        self.check_every, self.draw = check_every, draw
        self.n, self.b, self.dt, self.dev = op.n, op.b, op.dtype, op.device
        # on the CPU a host synchronization costs nothing: masks are tested before blocks are copied
        self.sync = self.dev.type == "cpu"
        # SVQB drops directions whose scaled Gram eigenvalue (squared singular value) is below this:
        # in fp64 a Gram eigenvalue is only known to ~1e-15, so an exactly dependent column shows as ~1e-16
        self.drop = max((100 * torch.finfo(self.dt).eps) ** 2, 1e-12)
        self.ortho_tol = 10 * math.sqrt(self.n) * float(torch.finfo(self.dt).eps)
        self.rr_grams = _native_op("rr_grams", torch.empty(0, dtype=self.dt, device=self.dev))
        b, dev = self.b, self.dev
        self.out_vals = torch.zeros((b, k), dtype=torch.float64, device=dev)
        self.out_vecs = torch.zeros((b, self.n, k), dtype=self.dt, device=dev)
        self.out_res = torch.full((b, k), float("inf"), dtype=torch.float64, device=dev)
        self.out_ortho = torch.full((b,), float("inf"), dtype=torch.float64, device=dev)
        self.iters = torch.zeros(b, dtype=torch.long, device=dev)
        self.restarts = torch.zeros(b, dtype=torch.long, device=dev)
        self.replaced = torch.zeros(b, dtype=torch.long, device=dev)
        self.active = torch.arange(b, device=dev)

    # ---- helpers ---------------------------------------------------------------------------------
    def _select(self, mask: Tensor, a: Tensor, b_: Tensor) -> Tensor:
        """``torch.where`` with a per-matrix mask (ba,), broadcast over the trailing dims."""
        if self.sync:
            if bool(mask.all()):
                return a
            if not bool(mask.any()):
                return b_
        return torch.where(mask.reshape(mask.shape + (1,) * (a.dim() - 1)), a, b_)

    def _any(self, mask: Tensor) -> bool:
        """Whether a fix-up is needed (always True off the CPU, where the fix-ups are masked no-ops)."""
        return (not self.sync) or bool(mask.any())

    def residuals(self, X: Tensor, AX: Tensor, theta: Tensor, normA: Tensor) -> Tuple[Tensor, Tensor]:
        """``R = A X - X theta`` and the relative column norms ``||r|| / (||A|| + |theta|)`` (fp64)."""
        R = AX - X * theta.to(self.dt)[:, None, :]
        rn = torch.linalg.vector_norm(R, dim=-2, dtype=torch.float64)
        return R, rn / (normA[:, None] + theta.abs()).clamp_min(torch.finfo(torch.float64).tiny)

    def fill_degenerate(self, V: Tensor, bad: Tensor, basis: Optional[Tensor], rows: Tensor) -> Tuple[Tensor, Tensor]:
        """Replace the columns ``bad`` (a, p) of ``V`` (a, n, p) by fresh random directions.

        ``rows`` are the flat batch indices of the ``a`` matrices (their seeds draw the directions).
        The new columns are made orthogonal to ``basis`` (a, n, r) (orthonormal or zero columns) and
        the whole block is re-orthonormalized by SVQB. Returns ``(V, keep)``.
        """
        fresh = self.draw(rows, V.shape[-1])
        V = torch.where(bad[:, None, :], fresh, V)
        for _ in range(2):
            if basis is not None:
                V = torch.baddbmm(V, basis, per_matrix_matmul(basis, V, transpose_u=True), alpha=-1.0)
            V, keep = _svqb(V, torch.ones_like(bad), self.drop)
        return V, keep

    # ---- initial block ---------------------------------------------------------------------------
    def initial_block(self, X: Optional[Tensor]) -> None:
        """Random block (per-matrix seeds) with the warm start in its first columns, orthonormalized;
        warm-start columns that are dependent (duplicated, rank deficient) become random directions."""
        b, n, nb, dt = self.b, self.n, self.nb, self.dt
        X0 = self.draw(self.active, nb)
        if X is not None:
            p = min(X.shape[-1], nb)
            X0[:, :, :p] = X.reshape(b, n, X.shape[-1])[:, :, :p].to(device=self.dev, dtype=dt)
        Xc, keep = _svqb(X0, torch.ones((b, nb), dtype=torch.bool, device=self.dev), self.drop)
        if not bool(keep.all()):
            rows = (~keep).any(-1).nonzero().squeeze(-1)
            Xr, _ = self.fill_degenerate(Xc.index_select(0, rows), ~keep.index_select(0, rows), None, rows)
            Xc = Xc.index_copy(0, rows, Xr)
            self.replaced.index_add_(0, rows, torch.ones_like(rows))
        self.Xinit = Xc

    def start(self, AX: Tensor) -> None:
        """Rayleigh-Ritz of the initial block ``Xinit`` with its product ``AX``."""
        Xc = self.Xinit
        H = _gram(Xc, AX)
        theta, Y = torch.linalg.eigh(0.5 * (H + H.transpose(-1, -2)))
        Yd = Y.to(self.dt)
        Xc, AX = Xc @ Yd, AX @ Yd
        self.theta = theta
        self.normA = theta.abs().amax(-1)
        self.lmax = theta.amax(-1)
        self.XP = torch.cat([Xc, torch.zeros_like(Xc)], dim=-1)
        self.AXP = torch.cat([AX, torch.zeros_like(AX)], dim=-1)
        self.pmask = torch.zeros((self.b, self.nb), dtype=torch.bool, device=self.dev)
        self.best_err = torch.full((self.b,), float("inf"), dtype=torch.float64, device=self.dev)
        self.best_obj = torch.full((self.b,), float("inf"), dtype=torch.float64, device=self.dev)
        self.bestX, self.bestAX, self.best_theta = Xc, AX, theta
        del self.Xinit

    # ---- verification and output -----------------------------------------------------------------
    def explicit_rr(self, Xs: Tensor, idx: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """Rayleigh-Ritz of the blocks ``Xs`` with an explicit product (the implicit ``A X`` drifts)
        and the exact Gram (``Xs`` need not be orthonormal): returns ``(X, AX, theta, full_rank)``,
        ``X`` orthonormal where ``full_rank`` (Gram Cholesky pivots >= 1e-4 of the column norms)."""
        AXs = self.op(Xs, idx)
        Bs = _gram(Xs, Xs)
        d = Bs.diagonal(dim1=-2, dim2=-1).clamp_min(torch.finfo(torch.float64).tiny).rsqrt()
        Lb, info = torch.linalg.cholesky_ex(Bs * d[:, :, None] * d[:, None, :])
        full = (info == 0) & (Lb.diagonal(dim1=-2, dim2=-1) >= 1e-4).all(-1) & torch.isfinite(d).all(-1)
        eye = torch.eye(Xs.shape[-1], dtype=torch.float64, device=Xs.device)
        Lb = torch.where(full[:, None, None], Lb, eye)
        Hs = _gram(Xs, AXs) * d[:, :, None] * d[:, None, :]
        Hh = torch.linalg.solve_triangular(Lb, torch.linalg.solve_triangular(Lb, Hs, upper=False).transpose(-1, -2),
                                           upper=False)
        finite = torch.isfinite(Hh).flatten(1).all(-1)
        full = full & finite
        th, Ys = torch.linalg.eigh(0.5 * torch.nan_to_num(Hh + Hh.transpose(-1, -2), nan=0.0, posinf=0.0, neginf=0.0))
        th = torch.where(finite[:, None], th, torch.full_like(th, float("nan")))
        C = d[:, :, None] * torch.linalg.solve_triangular(Lb.transpose(-1, -2), Ys, upper=True)
        return (Xs.double() @ C).to(self.dt), (AXs.double() @ C).to(self.dt), th, full

    def store(self, sel: Tensor, Xs: Tensor, AXs: Tensor, th: Tensor, nA: Tensor) -> None:
        """The returned pairs of the matrices ``sel`` (indices into the active set), with their
        explicit residuals and orthonormality error."""
        k = self.k
        g = self.active.index_select(0, sel)
        V = Xs[:, :, :k]
        vals = th[:, :k]
        nA = torch.maximum(nA, vals.abs().amax(-1))
        r = AXs[:, :, :k] - V * vals[:, None, :].to(self.dt)
        rn = torch.linalg.vector_norm(r, dim=-2, dtype=torch.float64)
        Vd = V.double()
        eye = torch.eye(k, dtype=torch.float64, device=V.device)
        ortho = (Vd.transpose(-1, -2) @ Vd - eye).abs().flatten(1).amax(-1)
        self.out_vals.index_copy_(0, g, vals)
        self.out_vecs.index_copy_(0, g, V)
        self.out_res.index_copy_(0, g, rn / (nA[:, None] + vals.abs()).clamp_min(torch.finfo(torch.float64).tiny))
        self.out_ortho.index_copy_(0, g, torch.nan_to_num(ortho, nan=float("inf")))

    def _keep(self, keep: Tensor) -> None:
        """Restrict the active set to ``keep`` (indices into it)."""
        self.active = self.active.index_select(0, keep)
        self.op.restrict(self.active)
        if self.prec is not None:
            self.prec.restrict(self.active)
        for name in ("XP", "AXP", "theta", "pmask", "normA", "lmax", "best_err", "best_obj", "bestX", "bestAX", "best_theta", "diverged"):
            setattr(self, name, getattr(self, name).index_select(0, keep))

    def check(self, conv: Tensor, finite: Tensor, stop: bool) -> bool:
        """Residual check with locking: matrices whose ``k`` pairs pass (all of them at ``stop``) are
        verified with an explicit product; the verified ones are stored and leave the active set,
        the others go on from the refreshed block (rank-deficient blocks get fresh directions).
        At ``stop`` a matrix returns its best iterate where that is better or the current one is not
        finite. Returns True when no matrix is left."""
        k, nb, tol = self.k, self.nb, self.tol
        cand = torch.ones_like(finite) if stop else conv[:, :k].all(-1) & finite
        if not bool(cand.any()):
            return False
        ci = cand.nonzero().squeeze(-1)
        Xs, AXs, ths, full = self.explicit_rr(self.XP[:, :, :nb].index_select(0, ci), self.active.index_select(0, ci))
        nAs = self.normA.index_select(0, ci)
        _, rels = self.residuals(Xs, AXs, ths, nAs)
        errs = rels[:, :k].amax(-1)
        ok = (rels[:, :k] <= tol).all(-1) & torch.isfinite(errs) & full
        if stop:
            best = self.best_err.index_select(0, ci)
            use_best = ~ok & ((best < errs) | ~torch.isfinite(errs) | ~full) & torch.isfinite(best)
            if bool(use_best.any()):
                ub = use_best.nonzero().squeeze(-1)
                Xb, AXb, thb, fb = self.explicit_rr(self.bestX.index_select(0, ci).index_select(0, ub),
                                                    self.active.index_select(0, ci).index_select(0, ub))
                Xs, AXs, ths = Xs.index_copy(0, ub, Xb), AXs.index_copy(0, ub, AXb), ths.index_copy(0, ub, thb)
                full = full.index_copy(0, ub, fb)
            ok = torch.ones_like(ok)
        if bool(ok.any()):
            sel = ok.nonzero().squeeze(-1)
            self.store(ci.index_select(0, sel), Xs.index_select(0, sel), AXs.index_select(0, sel),
                       ths.index_select(0, sel), nAs.index_select(0, sel))
        done = torch.zeros_like(cand).index_copy(0, ci, ok)
        keep = (~done).nonzero().squeeze(-1)
        if keep.numel() == 0:
            return True
        if not bool(full.all()):
            # a block that lost rank (the implicit update let columns collapse): fresh directions
            # for the dependent columns, P dropped
            bad = (~full).nonzero().squeeze(-1)
            Xb, _ = self.fill_degenerate_block(Xs.index_select(0, bad), self.active.index_select(0, ci).index_select(0, bad))
            Xb, AXb, thb, _ = self.explicit_rr(Xb, self.active.index_select(0, ci).index_select(0, bad))
            Xs, AXs, ths = Xs.index_copy(0, bad, Xb), AXs.index_copy(0, bad, AXb), ths.index_copy(0, bad, thb)
            drop_p = torch.zeros_like(cand).index_copy(0, ci.index_select(0, bad), torch.ones_like(bad, dtype=torch.bool))
            self.pmask = self.pmask & ~drop_p[:, None]
            self.replaced.index_add_(0, self.active.index_select(0, ci).index_select(0, bad), torch.ones_like(bad))
            pm = torch.cat([torch.ones_like(self.pmask), self.pmask], -1).to(self.dt)[:, None, :]
            self.XP, self.AXP = self.XP * pm, self.AXP * pm
        self.XP = self.XP.index_copy(0, ci, torch.cat([Xs, self.XP.index_select(0, ci)[:, :, nb:]], dim=-1))
        self.AXP = self.AXP.index_copy(0, ci, torch.cat([AXs, self.AXP.index_select(0, ci)[:, :, nb:]], dim=-1))
        self.theta = self.theta.index_copy(0, ci, ths[:, :nb])
        if keep.numel() < done.numel():
            self._keep(keep)
        return False

    def fill_degenerate_block(self, Xs: Tensor, rows: Tensor) -> Tuple[Tensor, Tensor]:
        """Orthonormalize the blocks ``Xs`` by SVQB; dropped (dependent) columns become fresh random
        directions orthogonal to the kept ones."""
        Q, keep = _svqb(Xs, torch.ones(Xs.shape[0], Xs.shape[-1], dtype=torch.bool, device=Xs.device), self.drop)
        return self.fill_degenerate(Q, ~keep, None, rows) if not bool(keep.all()) else (Q, keep)

    # ---- restart ---------------------------------------------------------------------------------
    def restart(self) -> None:
        """Matrices that diverged (non-finite or 1e3 x worse than their best) go back to their best
        iterate, without ``P``."""
        ok = ~self.diverged
        nb = self.nb
        okf = ok.to(self.dt)[:, None, None]
        self.XP = torch.cat([self._select(ok, self.XP[:, :, :nb], self.bestX), self.XP[:, :, nb:] * okf], dim=-1)
        self.AXP = torch.cat([self._select(ok, self.AXP[:, :, :nb], self.bestAX), self.AXP[:, :, nb:] * okf], dim=-1)
        self.theta = self._select(ok, self.theta, self.best_theta)
        self.pmask = self.pmask & ok[:, None]
        self.restarts.index_add_(0, self.active, self.diverged.long())

    # ---- search directions -----------------------------------------------------------------------
    def chebyshev_filter(self, R: Tensor) -> Tensor:
        """``q(A) R``, the polynomial preconditioner (``chebyshev - 1`` products with ``A``).

        ``m = chebyshev`` steps of the Chebyshev iteration for ``(A - s I) z = R`` from ``z = 0`` (Saad,
        "Iterative methods for sparse linear systems", 2nd ed., Alg. 12.1) for the interval
        ``[alpha, beta]`` give ``z = q(A) R`` with ``q(x) (x - s) = 1 - T_m(y(x)) / T_m(y(s))``,
        ``y(x) = (beta + alpha - 2 x) / (beta - alpha)``: ``q(x) (x - s)`` is within ``1 / T_m(y(s))`` of 1
        on ``[alpha, beta]``, so residual components in the unwanted part of the spectrum are scaled
        alike (a preconditioner ``~ (A - s I)^-1`` there), and those below ``alpha`` are amplified.

        For odd ``m``, ``q(x) > 0`` for every real ``x`` (below ``s`` both ``1 - T_m(y) / T_m(y(s))`` and
        ``x - s`` are negative, above ``beta`` ``T_m(y) < 0``), so ``q(A)`` is symmetric positive definite
        whatever the estimates: ``s`` the k-th Ritz value, ``alpha`` the block's last Ritz value (an
        upper bound of ``lambda_nb``), ``beta`` 1.1 x the largest Ritz value seen (``lambda_max`` is
        estimated from below; components above ``beta`` are amplified, not lost). Per matrix; a matrix
        whose estimates are not finite gets ``R`` back (no preconditioning).
        """
        th = self.theta
        s = th[:, self.k - 1]
        beta = self.lmax + 0.1 * self.lmax.abs()
        width = (beta - s).clamp_min(torch.finfo(torch.float64).tiny)
        alpha = torch.maximum(th[:, self.nb - 1], s + 1e-3 * width)
        beta = torch.maximum(beta, alpha + 1e-3 * width)
        c = 0.5 * (beta - alpha)
        d = 0.5 * (beta + alpha) - s
        sigma1 = d / c
        ok = torch.isfinite(sigma1) & torch.isfinite(s) & (d > 0) & (c > 0)
        if not self._any(~ok):
            ok = None
        else:
            one = torch.ones_like(s)
            s, c, d, sigma1 = (torch.where(ok, t, one) for t in (s, c, d, 2 * one))
        col = lambda t: t.to(self.dt).reshape(-1, 1, 1)  # noqa: E731  (per-matrix scalar)
        rho = 1.0 / sigma1
        r = R
        dz = R * col(1.0 / d)
        z = dz
        for _ in range(self.chebyshev - 1):
            r = torch.addcmul(r - self.op(dz), dz, col(s))                # r - (A - s I) dz
            rho_new = 1.0 / (2.0 * sigma1 - rho)
            dz = torch.addcmul(dz * col(rho_new * rho), r, col(2.0 * rho_new / c))
            rho = rho_new
            z = z + dz
        return z if ok is None else torch.where(ok[:, None, None], z, R)

    def search_directions(self, R: Tensor, conv: Tensor) -> Tuple[Tensor, Tensor]:
        """``W = M R`` of the unconverged columns (soft locking), orthonormal and orthogonal to
        ``[X, P]``: projection, SVQB (Cholesky-QR where a matrix's W is well conditioned, on the
        CPU), projection. Directions that vanish in the projection (a residual inside span[X, P]:
        the block and ``P`` span an invariant subspace, or the residual is pure rounding) are
        replaced by fresh random directions orthogonal to ``[X, P]``. Returns ``(W, wmask)``."""
        XP = self.XP
        if self.prec is not None:
            W = torch.nan_to_num(self.prec(R), nan=0.0, posinf=0.0, neginf=0.0)
        elif self.chebyshev > 1:
            W = torch.nan_to_num(self.chebyshev_filter(R), nan=0.0, posinf=0.0, neginf=0.0)
        else:
            W = R
        W = torch.baddbmm(W, XP, per_matrix_matmul(XP, W, transpose_u=True), alpha=-1.0)
        want = ~conv
        W, wmask = _svqb(W, want, self.drop, cholesky_first=self.sync)
        lost = want & ~wmask
        if self._any(lost):
            rows = lost.any(-1).nonzero().squeeze(-1)
            if rows.numel():
                Wr, kr = self.fill_degenerate(W.index_select(0, rows), lost.index_select(0, rows),
                                              XP.index_select(0, rows), self.active.index_select(0, rows))
                W = W.index_copy(0, rows, Wr)
                wmask = wmask.index_copy(0, rows, kr & want.index_select(0, rows))
                self.replaced.index_add_(0, self.active.index_select(0, rows), torch.ones_like(rows))
        W = torch.baddbmm(W, XP, per_matrix_matmul(XP, W, transpose_u=True), alpha=-1.0)
        return W, wmask

    # ---- Rayleigh-Ritz and basis update ----------------------------------------------------------
    def rayleigh_ritz(self, W: Tensor, AW: Tensor, wmask: Tensor) -> None:
        """Rayleigh-Ritz in fp64 on ``S = [X, P, W]`` and the basis update.

        Masked columns (absent ``P``, locked or dropped ``W``) enter as zero columns with a unit Gram
        diagonal and a large penalty on ``S^T A S``'s diagonal, so shapes never change. ``P`` is
        built from the Ritz coefficients (Duersch et al., Alg. 4): the B-orthogonal complement of
        ``Cx`` in span{Cx, Cx with the X rows zeroed}; a ``P`` column that lies mostly on masked
        columns (a collapse: nothing left to span) is dropped. A matrix whose Gram is not positive
        definite keeps its ``X`` alone.
        """
        nb, dt, dev = self.nb, self.dt, self.dev
        q = 3 * nb
        XP, AXP, pmask = self.XP, self.AXP, self.pmask
        if self.rr_grams is not None:
            # native: fp64 accumulation straight from the fp32 parts, one triangle each
            Bs, Hs = self.rr_grams([XP, W], [AXP, AW])
        else:
            SASd = torch.cat([XP, W, AXP, AW], dim=-1).double()
            G = per_matrix_matmul(SASd[:, :, :q], SASd, transpose_u=True)
            Bs, Hs = G[:, :, :q], G[:, :, q:]
        # NaN guard: only A W can be non-finite (X, P, AX, AP are combinations of finite blocks), and
        # a NaN/Inf anywhere in column c of a matrix's A W reaches Hs[0, 2 nb + c] (x_1 is dense).
        nonfin = ~torch.isfinite(Hs[:, :, 2 * nb:]).flatten(1).all(-1)
        if self._any(nonfin):
            AW = torch.nan_to_num(AW, nan=0.0, posinf=0.0, neginf=0.0)
            Hs = torch.nan_to_num(Hs, nan=0.0, posinf=0.0, neginf=0.0)
            self.restarts.index_add_(0, self.active, nonfin.long())
        valid = torch.cat([torch.ones_like(pmask), pmask, wmask & ~nonfin[:, None]], dim=-1)
        vf = valid.to(torch.float64)
        outer = vf[:, :, None] * vf[:, None, :]
        Hs = 0.5 * (Hs + Hs.transpose(-1, -2)) * outer
        Bs = Bs * outer
        penalty = 1e4 * (Hs.flatten(1).norm(dim=-1) + self.normA + 1e-300)
        inv = (~valid).to(torch.float64)
        Hs = Hs + torch.diag_embed(inv * penalty[:, None])
        Bs = Bs + torch.diag_embed(inv)
        Lb, binfo = torch.linalg.cholesky_ex(Bs)
        badB = binfo > 0
        if self._any(badB):
            not_x = (torch.arange(q, device=dev) >= nb).to(torch.float64)
            xblock = (1 - not_x)[:, None] * (1 - not_x)[None, :]
            eye_q = torch.eye(q, dtype=torch.float64, device=dev)
            Lb = torch.where(badB[:, None, None], eye_q, Lb)
            Hs = torch.where(badB[:, None, None], Hs * xblock + torch.diag_embed(not_x * penalty[:, None]), Hs)
            inv = torch.where(badB[:, None], not_x.expand_as(inv), inv)
        Hh = torch.linalg.solve_triangular(Lb, torch.linalg.solve_triangular(Lb, Hs, upper=False).transpose(-1, -2),
                                           upper=False)
        th_all, Yh = torch.linalg.eigh(0.5 * (Hh + Hh.transpose(-1, -2)))
        C = torch.linalg.solve_triangular(Lb.transpose(-1, -2), Yh, upper=True)
        real = th_all < 0.5 * penalty[:, None]
        self.normA = torch.maximum(self.normA, torch.where(real, th_all.abs(), torch.zeros_like(th_all)).amax(-1))
        self.lmax = torch.fmax(self.lmax, torch.where(real, th_all, torch.full_like(th_all, -math.inf)).amax(-1))
        Cx = C[:, :, :nb] * (1 - inv)[:, :, None]
        self.theta = th_all[:, :nb]
        Cp_raw = Cx.clone()
        Cp_raw[:, :nb, :] = 0
        Yq = Lb.transpose(-1, -2) @ torch.cat([Cx, Cp_raw], dim=-1)
        Qy, _ = torch.linalg.qr(Yq)
        Cp = torch.linalg.solve_triangular(Lb.transpose(-1, -2), Qy[:, :, nb:], upper=True)
        # ||S c||^2 = c^T Bs c - ||c on masked columns||^2 (their Gram diagonal is the unit added)
        p_norm2 = 1.0 - (Cp * Cp * inv[:, :, None]).sum(-2)
        Cp = Cp * (1 - inv)[:, :, None]
        self.pmask = (p_norm2 > 0.5) & ~badB[:, None]
        Cp = Cp * self.pmask.to(torch.float64)[:, None, :]
        Cxp = torch.cat([Cx, Cp], dim=-1).to(dt)
        # [X, P, W] @ Cxp without concatenating the blocks: [X, P] @ top rows + W @ bottom rows
        top, bottom = Cxp[:, :2 * nb], Cxp[:, 2 * nb:]
        self.XP = torch.bmm(XP, top).baddbmm_(W, bottom)     # in place: no copy of a block
        self.AXP = torch.bmm(AXP, top).baddbmm_(AW, bottom)
        self.iters.index_add_(0, self.active, torch.ones_like(self.active))

    # ---- the iteration ---------------------------------------------------------------------------
    def run(self) -> None:
        nb, k = self.nb, self.k
        it = 0
        while True:
            X, AX = self.XP[:, :, :nb], self.AXP[:, :, :nb]
            R, rel = self.residuals(X, AX, self.theta, self.normA)
            conv = rel <= self.tol
            err = rel[:, :k].amax(-1)
            finite = torch.isfinite(err) & torch.isfinite(self.theta).all(-1)
            # best iterate / divergence guard, NaN-safe (a non-finite iterate is never the best). The
            # objective (sum of the k Ritz values, minimized) ranks iterates, the residual breaks ties:
            # leaving a wrong invariant subspace raises the residual while it lowers the objective.
            obj = self.theta[:, :k].sum(-1)
            slack = 10 * float(torch.finfo(self.dt).eps) * k * self.normA
            lower = obj < self.best_obj - slack
            better = finite & (lower | ((obj <= self.best_obj + slack) & (err < self.best_err)))
            self.diverged = (~finite) | ((err > 1e3 * self.best_err) & (obj > self.best_obj + slack))
            self.best_obj = torch.where(better, obj, self.best_obj)
            self.bestX, self.bestAX = self._select(better, X, self.bestX), self._select(better, AX, self.bestAX)
            self.best_theta = self._select(better, self.theta, self.best_theta)
            self.best_err = torch.where(better, err, self.best_err)
            stop = it >= self.maxiter
            # no check before the first step: a warm start spanning an invariant subspace that is not
            # the wanted one has zero residuals; the first step explores it (below) first
            if stop or (it > 0 and it % self.check_every == 0):
                if self.check(conv, finite, stop):
                    return
                X, AX = self.XP[:, :, :nb], self.AXP[:, :, :nb]
                R, rel = self.residuals(X, AX, self.theta, self.normA)
                conv = rel <= self.tol
            it += 1
            if it > 1 and self._any(self.diverged):
                self.restart()
                X, AX = self.XP[:, :, :nb], self.AXP[:, :, :nb]
                R = AX - X * self.theta.to(self.dt)[:, None, :]
                conv = conv & ~self.diverged[:, None]
            # first step: no column is locked, so vanished residuals become random directions
            W, wmask = self.search_directions(R, conv if it > 1 else torch.zeros_like(conv))
            self.rayleigh_ritz(W, self.op(W), wmask)


def _dense_result(op: _Op, k: int, largest: bool, batch) -> Tuple[Tensor, Tensor, Tensor]:
    """Dense fp64 solve with the explicit relative residuals of the returned pairs."""
    vals, vecs, M = _dense(op, k, largest)
    if not op.probes_symmetry:
        nonfinite = ~torch.isfinite(vals).all(-1)
        if bool(nonfinite.any()):
            i = int(nonfinite.nonzero()[0, 0])
            raise ValueError(f"lobpcg: callable A returned NaN/Inf at batch index {batch_index(i, batch)}")
    vecs_o = vecs.to(op.dtype)
    V = vecs_o.double()
    res = torch.linalg.vector_norm(M @ V - V * vals[:, None, :], dim=-2)
    normA = torch.linalg.matrix_norm(M, ord=2) if M.shape[-1] else torch.zeros(M.shape[0], dtype=M.dtype)
    rel = res / (normA[:, None] + vals.abs()).clamp_min(torch.finfo(torch.float64).tiny)
    return vals, vecs_o, rel


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
    seeds: Optional[Union[Sequence[int], Tensor]] = None,
    check_every: Optional[int] = None,
    chebyshev: Optional[int] = None,
):
    """The ``k`` smallest (or largest) eigenpairs of a batch of symmetric matrices, by LOBPCG.

    Solves ``A x_j = lambda_j x_j`` (Knyazev 2001; Duersch et al. 2018; see the module docstring).

    Args:
        A: a :class:`~lorainit_kernels.linalg.operators.SymmetricOperator` (``DenseOperator``,
            ``GuidanceOperator``, ``DiagonalMinusLowRank``, ``CholeskyInverse``: it carries its batch
            shape, n, dtype and device), a symmetric tensor (..., n, n) with any batch shape (a
            ``DenseOperator``), or a callable ``X -> A @ X`` taking and returning (*batch_shape, n, p)
            tensors; for a callable, ``n``, ``batch_shape``, ``dtype`` and ``device`` default to those
            of ``X`` (as in scipy), else ``n`` is required.
        k: number of eigenpairs, ``1 <= k <= n``.
        largest: False for the smallest eigenvalues (returned ascending), True for the largest
            (returned descending, as scipy does).
        X: warm start (..., n, p), p >= 1; the first ``min(p, k + guard)`` columns are used, the rest
            of the block is random. Dependent columns (duplicated, rank deficient) are replaced by
            random directions.
        M: optional symmetric positive definite preconditioner ``~ (A - sigma I)^-1``, a tensor
            (..., n, n) or (n, n), or a callable like ``A``. Applied to residuals.
        tol: relative residual tolerance; a column is converged when
            ``||A x - theta x|| <= tol (||A|| + |theta|) ||x||``. Default ``sqrt(eps)`` of the dtype
            (3.5e-4 in fp32, 1.5e-8 in fp64).
        maxiter: iteration cap (default 1000). Non-convergence warns and shows in the info.
        return_info: also return a dict: ``iterations`` (...,) int; ``residual`` (..., k), the relative
            residuals ``||A x - theta x|| / (||A|| + |theta|)`` of the returned pairs from an explicit
            product (``||A||``: the largest Ritz value magnitude seen, a lower estimate of the 2-norm;
            the exact 2-norm on the dense path);
            ``converged`` (..., k) bool: residual <= tol AND the returned columns orthonormal to
            ``10 sqrt(n) eps``; ``ortho_error`` (...,) ``max |V^T V - I|``; ``fallback`` (dense
            solve used); ``restarts`` (...,) int; ``replaced`` (...,) int, how often degenerate
            directions were replaced by random ones.
        guard: extra block vectors beyond ``k`` (default ``min(k, 8)`` capped so that ``3 (k + guard) <= n``).
        generator: random generator for the initial block and for replacement directions, shared by
            the batch (drawn on its device, moved to A's).
        seeds: one int per matrix of the batch (a sequence in row-major batch order, or a tensor of
            the batch shape): each matrix draws its random directions from its own generator on A's
            device. Default (neither ``generator`` nor ``seeds``): the same fixed seed for every
            matrix, so a matrix's result does not depend on the other matrices of its batch.
        check_every: iterations between convergence checks (each one a host synchronization);
            default 1 on CPU, 10 on CUDA.
        chebyshev: odd int ``m >= 1``: without ``M``, the residuals are preconditioned by the
            Chebyshev polynomial ``q(A)`` of degree ``m - 1`` (``m - 1`` extra products per iteration;
            ``q(x) (x - s) ~ 1`` on the unwanted part of the spectrum, estimated from the Ritz values,
            and ``q > 0`` everywhere; see ``_Solver.chebyshev_filter``). ``1``: plain LOBPCG. Default
            (None): ``3`` for a tensor ``A`` without ``M`` (the same products in about 2.5x fewer
            iterations on realistic LoRA-DA spectra, bench/results/lobpcg.md), ``1`` for any other
            operator (``cheap_products`` False: its products may cost more than an iteration's
            Rayleigh-Ritz) or with ``M``.

    Returns:
        ``vals`` (..., k) and ``vecs`` (..., n, k) with orthonormal columns, in A's dtype (fp32 or
        fp64; half inputs are solved in fp32), or ``(vals, vecs, info)``. Pairs that miss ``tol`` or
        orthonormality are returned with ``converged`` False and one RuntimeWarning naming the
        batch indices of their matrices.
    """
    if not isinstance(A, Tensor) and callable(A) and isinstance(X, Tensor) and X.dim() >= 2:
        n = X.shape[-2] if n is None else n
        batch_shape = tuple(X.shape[:-2]) if batch_shape is None else batch_shape
        dtype = (X.dtype if X.dtype in (torch.float32, torch.float64) else None) if dtype is None else dtype
        device = X.device if device is None else device
    batch, n, dt, dev = _check_operator(A, "A", n, batch_shape, dtype, device, k)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"lobpcg: k must be an int with 1 <= k <= n = {n}, got {k!r}")
    if M is not None:
        if isinstance(M, Tensor):
            if M.dim() < 2 or M.shape[-2:] != (n, n) or (M.dim() > 2 and tuple(M.shape[:-2]) != batch):
                raise ValueError(f"lobpcg: M must have shape (n, n) or (*batch, n, n) = {batch + (n, n)}, got {tuple(M.shape)}")
            _check_finite(M.expand(*batch, n, n) if M.dim() == 2 else M, "M", batch)
        elif isinstance(M, SymmetricOperator):
            if M.shape != batch + (n, n):
                raise ValueError(f"lobpcg: the preconditioner M {M!r} was built for shape {M.shape}, "
                                 f"expected {batch + (n, n)}")
        elif not callable(M):
            raise TypeError(f"lobpcg: M must be a tensor, a SymmetricOperator, a callable or None, got {type(M).__name__}")
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
    if chebyshev is not None:
        if isinstance(chebyshev, bool) or not isinstance(chebyshev, int) or chebyshev < 1 or chebyshev % 2 == 0:
            raise ValueError(f"lobpcg: chebyshev must be an odd int >= 1 (an even degree makes the polynomial "
                             f"preconditioner indefinite), got {chebyshev!r}")
        if chebyshev > 1 and M is not None:
            raise ValueError("lobpcg: chebyshev > 1 and M are exclusive (the Chebyshev polynomial is the "
                             "preconditioner)")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"lobpcg: generator must be a torch.Generator or None, got {type(generator).__name__}")
    b = math.prod(batch)
    seed_list = _default_seeds(b, seeds, batch) if generator is None else None

    sign = -1.0 if largest else 1.0
    op = _Op(A, "A", batch, n, dt, dev, sign)

    if n < DENSE_BLOCKS * k or b == 0:
        if op.probes_symmetry and b:
            _check_symmetric_finite(op.A.to_dense(), batch, n)
        vals, vecs, rel = _dense_result(op, k, largest, batch)
        return _finish(vals, vecs, rel, torch.zeros(b, dtype=torch.float64, device=dev), tol, maxiter, batch,
                       n, k, return_info, fallback=True)

    # a tensor M is multiplied as given (no one-triangle kernel: its symmetry is not checked)
    prec = None if M is None else _Op(M, "M", batch, n, dt, dev, 1.0, one_triangle=False)
    if guard is None:
        guard = min(k, 8)
    nb = max(k, min(k + guard, n // 3))
    if check_every is None:
        check_every = 1 if dev.type == "cpu" else 10

    if generator is not None:
        def draw(rows: Tensor, p: int) -> Tensor:
            out = torch.randn((rows.numel(), n, p), generator=generator, dtype=torch.float64, device=generator.device)
            return out.to(device=dev, dtype=dt)
    else:
        gens: Dict[int, torch.Generator] = {}

        def draw(rows: Tensor, p: int) -> Tensor:
            blocks = []
            for i in rows.tolist():
                if i not in gens:
                    gens[i] = torch.Generator(device=dev).manual_seed(seed_list[i])
                blocks.append(torch.randn((n, p), generator=gens[i], dtype=torch.float64, device=dev))
            return torch.stack(blocks).to(dt) if blocks else torch.empty((0, n, p), dtype=dt, device=dev)

    if chebyshev is None:
        chebyshev = _default_chebyshev(op, prec)
    solver = _Solver(op, prec, k, nb, tol, maxiter, check_every, draw, chebyshev)
    solver.initial_block(X)
    # The first product doubles as the input check: for a tensor A two random probe columns U appended
    # to X give A U (from the triangle the product kernel reads), compared with (U^T A)^T (both
    # triangles): an asymmetric A shows in their difference, NaN/Inf anywhere in A in one of them.
    Xc = solver.Xinit
    if not op.probes_symmetry:
        AX = op(Xc)
        _check_input_products(AX, None, batch)
    else:
        probe = torch.Generator(device=dev).manual_seed(0x10B)
        U = torch.randn((b, n, 2), generator=probe, dtype=torch.float64, device=dev).to(dt)
        AXU = op(torch.cat([Xc, U], dim=-1))
        # U^T A streams A once more, row-major (a thin product: a few % of a solve)
        UtA = op.left_product(U.transpose(-1, -2))
        _check_input_products(AXU, tuple(A.shape) if isinstance(A, Tensor) else op.A.shape, batch, UtA)
        AX = AXU[:, :, :nb]
    solver.start(AX)
    solver.run()
    info_extra = {"restarts": solver.restarts.reshape(batch), "replaced": solver.replaced.reshape(batch)}
    return _finish(solver.out_vals * sign, solver.out_vecs, solver.out_res, solver.out_ortho, tol, maxiter, batch,
                   n, k, return_info, iters=solver.iters, extra=info_extra)


def _finish(vals: Tensor, vecs: Tensor, rel: Tensor, ortho: Tensor, tol: float, maxiter: int, batch, n: int, k: int,
            return_info: bool, *, fallback: bool = False, iters: Optional[Tensor] = None, extra=None):
    """Flag what fails verification (one warning naming the matrices), shape the outputs and info."""
    dt = vecs.dtype
    ortho_ok = ortho <= 10 * math.sqrt(n) * float(torch.finfo(dt).eps)
    converged = (rel <= tol * 1.0001) & ortho_ok[:, None]
    bad = (~converged.all(-1)).nonzero().squeeze(-1).tolist()
    if bad:
        where = ", ".join(str(batch_index(i, batch)) for i in bad[:8]) + (", ..." if len(bad) > 8 else "")
        not_ortho = int((~ortho_ok).sum())
        warnings.warn(f"lobpcg: {len(bad)} of {math.prod(batch)} matrices did not converge to tol={tol:.3g} within "
                      f"maxiter={maxiter} iterations (batch index {where}; worst relative residual "
                      f"{float(rel.max()):.3g}" + (f"; {not_ortho} with non-orthonormal columns" if not_ortho else "")
                      + "); see return_info=True", RuntimeWarning, stacklevel=3)
    vals_o = vals.to(dt).reshape(*batch, k)
    vecs_o = vecs.reshape(*batch, n, k)
    if not return_info:
        return vals_o, vecs_o
    b = math.prod(batch)
    dev = vecs.device
    zeros = torch.zeros(b, dtype=torch.long, device=dev)
    info = {"iterations": (iters if iters is not None else zeros).reshape(batch), "residual": rel.reshape(*batch, k),
            "converged": converged.reshape(*batch, k), "ortho_error": ortho.reshape(batch), "fallback": fallback,
            "restarts": zeros.reshape(batch), "replaced": zeros.reshape(batch)}
    if extra:
        info.update(extra)
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
        rabs = inf["residual"][:, 0].double() * (norm_inf + th.abs())
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
                         f"at the Gershgorin bound sigma = {float(sig[i]):.6g} at batch index {batch_index(i, batch)} "
                         f"(is A symmetric?)")
    return ShiftInvert(L.reshape(*batch, n, n), sig.reshape(batch), tries.reshape(batch))


class ShiftInvert(CholeskyInverse):
    """``R -> (A - sigma I)^-1 R`` from the lower Cholesky factor ``L`` (..., n, n) of ``A - sigma I``.

    Made by ``shift_invert_preconditioner``; ``sigma`` (fp64, batch shape) and ``tries`` (Cholesky
    factorizations per matrix) say what was done. A :class:`CholeskyInverse`: ``lobpcg`` applies it
    to the matrices still iterating only, so converged matrices cost nothing.
    """

    def __init__(self, L: Tensor, sigma: Tensor, tries: Tensor):
        super().__init__(L)
        self.sigma, self.tries = sigma, tries

    def __call__(self, R: Tensor) -> Tensor:
        return chol_solve(R, self.L)
