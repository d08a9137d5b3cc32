"""Small helpers shared by the linear algebra of the core (and by ``lorainit_kernels.methods``)."""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch import Tensor


def batch_index(flat: int, batch: Sequence[int]) -> Tuple[int, ...]:
    """Flat (row-major) batch position -> index tuple, for error messages."""
    batch = tuple(batch)
    if not batch:
        return ()
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), batch))


def canonical_signs(U: Tensor, V: Tensor) -> Tuple[Tensor, Tensor]:
    """Flip singular-vector pairs so that the largest-magnitude entry of each ``U`` column is positive.

    ``U diag(S) V^T`` is unchanged; the output no longer depends on the SVD routine's sign choice.
    """
    idx = U.abs().argmax(dim=-2, keepdim=True)
    sign = torch.gather(U, -2, idx).sign()
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return U * sign, V * sign


def chol_solve(R: Tensor, L: Tensor) -> Tensor:
    """``(L L^T)^-1 R`` by two triangular solves in ``L``'s dtype, returned in ``R``'s dtype (faster
    than ``cholesky_solve`` on the CPU for thin ``R``)."""
    Y = torch.linalg.solve_triangular(L, R.to(L.dtype), upper=False)
    return torch.linalg.solve_triangular(L.transpose(-1, -2), Y, upper=True).to(R.dtype)


def per_matrix_matmul(U: Tensor, V: Tensor, *, transpose_u: bool = False) -> Tensor:
    """``U @ V`` (``U^T @ V`` with ``transpose_u``) for stacks ``(b, ., .)`` whose products contract a
    long dimension (n). On the CPU it runs one GEMM per matrix: MKL splits a lone matrix's long
    contraction across threads but not a batch's, so a batched GEMM would make a matrix's bits depend
    on its batch, and LoRA-DA promises a batched solve of same-shape layers equal to the per-layer one
    bit for bit. On other devices it is one batched product (cuBLAS picks algorithms by batch size
    anyway: there the batched solve equals the per-layer one to rounding)."""
    Ut = U.transpose(-1, -2) if transpose_u else U
    if U.device.type != "cpu" or U.dim() != 3 or V.dim() != 3:
        return Ut @ V
    out = torch.empty(U.shape[0], Ut.shape[-2], V.shape[-1], dtype=torch.promote_types(U.dtype, V.dtype),
                      device=U.device)
    for i in range(U.shape[0]):
        torch.mm(Ut[i], V[i], out=out[i])
    return out
