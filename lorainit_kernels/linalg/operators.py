"""Symmetric operators for the eigensolvers: one small class per kind of matrix (linear_operator's idea).

``lobpcg`` takes a :class:`SymmetricOperator` (or a tensor / callable, wrapped by :func:`as_operator`)
and only ever calls :meth:`SymmetricOperator.apply` on a contiguous run of its flattened batch; it
never asks which kind it got. Each class states its matrix and has a test against its dense form
(``tests/lorainit_kernels/linalg/test_operators.py``):

* :class:`DenseOperator` ``A`` (..., n, n): fp32 CPU matrices are multiplied by the native one-triangle
  kernel (``lk.sym_matmul``), which reads half of ``A``;
* :class:`GuidanceOperator` ``Omega = c Z_d^-1 - alpha dW^T dW`` (LoRA-DA, Zhang et al. 2025) from the
  Cholesky factor of ``Z_d`` and ``dW``, never formed: two triangular solves and two thin products;
* :class:`DiagonalMinusLowRank` ``diag(d) - alpha U^T U`` (LoRA-DA of an embedding: ``Z = diag(z)``);
* :class:`CholeskyInverse` ``(L L^T)^-1`` from a lower factor (the shift-invert preconditioner);
* :class:`CallableOperator` a user's ``X -> A X`` on the whole batch.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import ops
from ._common import chol_solve

# smallest n for which fp32 CPU matrices are multiplied with the native symmetric kernel
SYMM_MIN_N = 256


class SymmetricOperator:
    """A batch (``batch`` shape, ``b`` matrices in all) of symmetric n x n operators.

    Subclasses implement :meth:`apply` for a contiguous run ``[start, stop)`` of the flattened batch.
    ``cheap_products``: a product costs little beside one LOBPCG iteration's Rayleigh-Ritz step, so a
    polynomial preconditioner (more products, fewer iterations) pays (``lobpcg``'s default ``chebyshev``).
    """

    cheap_products = False

    def __init__(self, batch: Sequence[int], n: int, dtype: torch.dtype, device):
        self.batch = tuple(int(i) for i in batch)
        self.n = int(n)
        self.dtype = dtype
        self.device = torch.device(device)
        self.b = math.prod(self.batch)

    @property
    def shape(self) -> Tuple[int, ...]:
        return self.batch + (self.n, self.n)

    def apply(self, X: Tensor, start: int, stop: int) -> Tensor:
        """``A_i X_i`` for the matrices ``start <= i < stop`` of the flattened batch; ``X`` (stop - start, n, p)."""
        raise NotImplementedError

    def matmul(self, X: Tensor) -> Tensor:
        """``A X`` for ``X`` (*batch, n, p)."""
        if tuple(X.shape[:-1]) != self.batch + (self.n,):
            raise ValueError(f"{type(self).__name__}: X must have shape (*{self.batch}, {self.n}, p), got {tuple(X.shape)}")
        p = X.shape[-1]
        return self.apply(X.reshape(self.b, self.n, p), 0, self.b).reshape(*self.batch, self.n, p)

    __matmul__ = matmul

    def to_dense(self) -> Tensor:
        """The matrices (*batch, n, n), by applying the operator to the identity."""
        eye = torch.eye(self.n, dtype=self.dtype, device=self.device).expand(self.b, self.n, self.n).contiguous()
        return self.apply(eye, 0, self.b).reshape(self.shape)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(batch={self.batch}, n={self.n}, dtype={self.dtype}, device={self.device})"


def _flat(t: Tensor, b: int, tail: Tuple[int, ...]) -> Tensor:
    """(*batch, *tail) or a broadcast (1 or no batch, *tail) -> (b or 1, *tail)."""
    return t.reshape(-1, *tail) if t.numel() != math.prod(tail) else t.reshape(1, *tail)


def _rows(t: Tensor, start: int, stop: int) -> Tensor:
    """Rows ``[start, stop)`` of a per-matrix tensor, or the one shared row."""
    return t if t.shape[0] == 1 else t[start:stop]


class DenseOperator(SymmetricOperator):
    """A stored symmetric matrix ``A`` (..., n, n) (or (n, n) shared by a ``batch``), in ``dtype``.

    fp32 on the CPU with ``n >= min_n`` (default ``SYMM_MIN_N``; and ``one_triangle``): products by the native kernel that
    reads ``A``'s upper triangle only (half the memory traffic of a bmm, which bounds these thin products).
    :meth:`left_product` gives ``U^T A`` from both triangles, for a symmetry check.
    """

    cheap_products = True

    def __init__(self, A: Tensor, batch: Optional[Sequence[int]] = None, dtype: Optional[torch.dtype] = None,
                 one_triangle: bool = True, min_n: int = SYMM_MIN_N):
        if not isinstance(A, Tensor) or A.dim() < 2 or A.shape[-1] != A.shape[-2]:
            raise ValueError(f"DenseOperator: A must be a square tensor (..., n, n), got "
                             f"{tuple(A.shape) if isinstance(A, Tensor) else type(A).__name__}")
        n = A.shape[-1]
        batch = tuple(A.shape[:-2]) if batch is None else tuple(batch)
        dt = dtype or (A.dtype if A.dtype in (torch.float32, torch.float64) else torch.float32)
        super().__init__(batch, n, dt, A.device)
        mat = A.to(dt)
        if mat.dim() == 2:
            mat = mat.expand(*batch, n, n)
        self.mat = mat.reshape(self.b, n, n)
        self.matmul_fn = torch.bmm
        if one_triangle and dt == torch.float32 and self.device.type == "cpu" and n >= min_n:
            if ops.backend_for("sym_matmul", self.mat) == "native":
                if self.mat.stride(-1) != 1:  # e.g. A.mT: for a symmetric A the transpose is A itself
                    self.mat = self.mat.mT if self.mat.mT.stride(-1) == 1 else self.mat.contiguous()
                self.matmul_fn = torch.ops.lorainit.sym_matmul.default

    def apply(self, X: Tensor, start: int, stop: int) -> Tensor:
        return self.matmul_fn(self.mat[start:stop], X)

    def left_product(self, Ut: Tensor) -> Tensor:
        """``U^T A`` (b, q, n) for the whole batch (``A^T``'s action on ``U``: both triangles read)."""
        return torch.bmm(Ut, self.mat)

    def to_dense(self) -> Tensor:
        return self.mat.reshape(self.shape)


class CholeskyInverse(SymmetricOperator):
    """``(L L^T)^-1`` for a lower Cholesky factor ``L`` (..., n, n): two triangular solves per product."""

    def __init__(self, L: Tensor, dtype: Optional[torch.dtype] = None):
        if not isinstance(L, Tensor) or L.dim() < 2 or L.shape[-1] != L.shape[-2]:
            raise ValueError(f"CholeskyInverse: L must be a square tensor (..., n, n), got "
                             f"{tuple(L.shape) if isinstance(L, Tensor) else type(L).__name__}")
        super().__init__(L.shape[:-2], L.shape[-1], dtype or L.dtype, L.device)
        self.L = L
        self._Lf = L.reshape(self.b, self.n, self.n)

    def apply(self, X: Tensor, start: int, stop: int) -> Tensor:
        return chol_solve(X, self._Lf[start:stop])    # solved in L's dtype, returned in X's


class GuidanceOperator(SymmetricOperator):
    """LoRA-DA's guidance matrix ``Omega = c Z_d^-1 - alpha dW^T dW`` without forming it (Zhang et al. 2025).

    ``L`` (..., n, n) the lower Cholesky factor of ``Z_d`` (or one shared (n, n) / (1, n, n)), or None
    when ``c = 0`` (no variance term); ``c`` (batch shape) the variance weight; ``dW`` (..., m, n);
    ``alpha`` >= 0. A product: two triangular solves and two thin products with ``dW`` (row-major,
    streamed once each), O(m n) memory.
    """

    def __init__(self, dW: Tensor, alpha: float, c: Optional[Tensor] = None, L: Optional[Tensor] = None):
        if not isinstance(dW, Tensor) or dW.dim() < 2:
            raise ValueError(f"GuidanceOperator: dW must be a tensor (..., m, n), got "
                             f"{tuple(dW.shape) if isinstance(dW, Tensor) else type(dW).__name__}")
        batch, (m, n) = tuple(dW.shape[:-2]), dW.shape[-2:]
        super().__init__(batch, n, dW.dtype, dW.device)
        if (L is None) != (c is None):
            raise ValueError("GuidanceOperator: c and L go together (both None without the variance term)")
        self._lmap = None
        if L is not None:
            try:
                ok = L.shape[-2:] == (n, n) and (L.numel() == n * n or (
                    L.dim() - 2 <= len(batch) and torch.broadcast_shapes(tuple(L.shape[:-2]), batch) == batch))
            except RuntimeError:
                ok = False
            if not ok:
                raise ValueError(f"GuidanceOperator: L must be (..., n, n) with a batch shape broadcastable to "
                                 f"{batch}, got {tuple(L.shape)} (n = {n})")
            if L.numel() not in (n * n, self.b * n * n):
                # a partly shared factor (one per input of a 2-d batch): matrix i reads factor lmap[i]
                ids = torch.arange(L.numel() // (n * n), device=L.device).reshape(L.shape[:-2])
                self._lmap = ids.expand(batch).reshape(-1)
        self.m, self.alpha = m, float(alpha)
        self._dW = dW.reshape(self.b, m, n)
        self._L = None if L is None else _flat(L, self.b, (n, n))
        self._c = None if c is None else c.to(self.dtype).reshape(-1)
        if self._c is not None and self._c.numel() not in (1, self.b):
            raise ValueError(f"GuidanceOperator: c must have the batch shape {batch}, got {tuple(c.shape)}")

    def apply(self, X: Tensor, start: int, stop: int) -> Tensor:
        dW = self._dW[start:stop]
        # dW^T (dW X) as ((dW X)^T dW)^T: a row-major dW streamed once (MKL's transposed thin GEMM was 16x slower)
        out = -self.alpha * (torch.bmm(dW, X).transpose(-1, -2) @ dW).transpose(-1, -2)
        if self._L is not None:
            c = _rows(self._c, start, stop)[:, None, None]
            L = _rows(self._L, start, stop) if self._lmap is None else self._L.index_select(0, self._lmap[start:stop])
            out = out + c * chol_solve(X, L.expand(stop - start, self.n, self.n))
        return out


class DiagonalMinusLowRank(SymmetricOperator):
    """``diag(d) - alpha U^T U`` for ``d`` (..., n) and ``U`` (..., m, n): LoRA-DA's Omega of an embedding
    (``Z = diag(token frequencies)``, so ``c Z_d^-1`` is a diagonal). One elementwise scaling and two
    thin products per product; O(m n) memory."""

    def __init__(self, d: Tensor, U: Tensor, alpha: float):
        if not isinstance(U, Tensor) or U.dim() < 2 or not isinstance(d, Tensor) or tuple(d.shape) != tuple(U.shape[:-2]) + (U.shape[-1],):
            raise ValueError(f"DiagonalMinusLowRank: d must be (..., n) and U (..., m, n) with the same batch, got "
                             f"{tuple(getattr(d, 'shape', ()))} and {tuple(getattr(U, 'shape', ()))}")
        batch, (m, n) = tuple(U.shape[:-2]), U.shape[-2:]
        super().__init__(batch, n, U.dtype, U.device)
        self.m, self.alpha = m, float(alpha)
        self._U = U.reshape(self.b, m, n)
        self._d = d.to(U.dtype).reshape(self.b, n, 1)

    def apply(self, X: Tensor, start: int, stop: int) -> Tensor:
        U = self._U[start:stop]
        return self._d[start:stop] * X - self.alpha * (torch.bmm(U, X).transpose(-1, -2) @ U).transpose(-1, -2)


class CallableOperator(SymmetricOperator):
    """A user's ``fn: X (*batch, n, p) -> A X`` (trusted to be symmetric), applied to the whole batch;
    a run of the batch is padded with zeros to the whole batch (the callable sees the full shape)."""

    def __init__(self, fn: Callable[[Tensor], Tensor], batch: Sequence[int], n: int, dtype: torch.dtype, device,
                 name: str = "A"):
        super().__init__(batch, n, dtype, device)
        self.fn, self.name = fn, name

    def apply(self, X: Tensor, start: int, stop: int) -> Tensor:
        if stop - start != self.b:
            full = X.new_zeros((self.b,) + tuple(X.shape[1:]))
            full[start:stop] = X
        else:
            full = X
        out = self._call(full)
        return out if stop - start == self.b else out[start:stop]

    def apply_rows(self, X: Tensor, idx: Tensor) -> Tensor:
        """``A_i X`` for the sorted flat indices ``idx``, in one call of ``fn`` (zeros elsewhere)."""
        full = X.new_zeros((self.b,) + tuple(X.shape[1:]))
        full.index_copy_(0, idx, X)
        return self._call(full).index_select(0, idx)

    def _call(self, full: Tensor) -> Tensor:
        p = full.shape[-1]
        out = self.fn(full.reshape(*self.batch, self.n, p))
        if not isinstance(out, Tensor) or tuple(out.shape) != self.batch + (self.n, p):
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"lobpcg: callable {self.name} returned {got} for an input of shape "
                             f"{self.batch + (self.n, p)}; it must return the same shape")
        return out.reshape(self.b, self.n, p).to(full.dtype)
