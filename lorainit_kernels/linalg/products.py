"""Factored matrix products: the SVD of ``B @ A`` from its factors, never forming the product.

Used by HRP (Chen et al., 2025, "HRP: High-Rank Preheating for Superior LoRA Initialization"):
after preheating, the rank-``R`` product ``B A`` (``m x n``) is decomposed from ``B`` (m, R) and
``A`` (R, n) at cost ``O((m + n) R^2 + R^3)`` instead of ``O(m n min(m, n))``. docs/math.md.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from ._common import batch_index, canonical_signs

_DTYPES = (torch.float32, torch.float64)


def svd_of_product(B: Tensor, A: Tensor, k: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Top-``k`` singular triplets of ``B @ A`` without forming the ``m x n`` product.

    ``B`` (..., m, R), ``A`` (..., R, n), batched over matching leading dimensions. With the reduced
    QR factorizations ``B = Q_B R_B`` and ``A^T = Q_A R_A``,

        ``B A = Q_B (R_B R_A^T) Q_A^T``,  ``R_B R_A^T = U_c S V_c^T`` (small core, SVD in fp64),

    so ``U = Q_B U_c[:, :k]``, ``V = Q_A V_c[:, :k]`` and ``S`` = the ``k`` largest singular values.
    Cost ``O((m + n) R^2 + R^3)``. Signs are canonical (largest-magnitude entry of each ``U``
    column positive). HRP (Chen et al., 2025) initializes LoRA from ``U`` or ``V``.

    Returns ``U`` (..., m, k) and ``V`` (..., n, k) with orthonormal columns and ``S`` (..., k)
    descending, such that ``B @ A ~= U diag(S) V^T`` (exactly, when ``k = min(m, n, R)``).
    fp32 and fp64 (fp16/bf16 inputs are computed in fp32 and returned in fp32).
    """
    op = "svd_of_product"
    for name, t in (("B", B), ("A", A)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 2:
            raise ValueError(f"{op}: {name} must have at least 2 dims, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating tensor, got {t.dtype} with shape {tuple(t.shape)}")
    if B.shape[-1] != A.shape[-2]:
        raise ValueError(f"{op}: inner dimensions differ: B is {tuple(B.shape)} (..., m, R) and A is "
                         f"{tuple(A.shape)} (..., R, n); expected B.shape[-1] == A.shape[-2]")
    if B.shape[:-2] != A.shape[:-2]:
        raise ValueError(f"{op}: batch shapes differ: B is {tuple(B.shape)}, A is {tuple(A.shape)}")
    if B.device != A.device:
        raise ValueError(f"{op}: B is on {B.device} but A is on {A.device}")
    m, R = B.shape[-2:]
    n = A.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k > min(m, n, R):
        raise ValueError(f"{op}: k must be an int with 1 <= k <= min(m, n, R) = min({m}, {n}, {R}) = "
                         f"{min(m, n, R)}, got {k!r} (B {tuple(B.shape)}, A {tuple(A.shape)})")
    batch = tuple(B.shape[:-2])
    for name, t in (("B", B), ("A", A)):
        bad = ~torch.isfinite(t.reshape(-1, t.shape[-2] * t.shape[-1])).all(dim=-1)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"{op}: {name} {tuple(t.shape)} has NaN/Inf entries at batch index {batch_index(i, batch)}")

    dtype = torch.promote_types(B.dtype, A.dtype)
    if dtype not in _DTYPES:
        dtype = torch.float32
    Bw, Aw = B.to(dtype), A.to(dtype)
    Qb, Rb = torch.linalg.qr(Bw)                       # (..., m, p), (..., p, R), p = min(m, R)
    Qa, Ra = torch.linalg.qr(Aw.transpose(-1, -2))     # (..., n, q), (..., q, R), q = min(n, R)
    core = Rb.double() @ Ra.double().transpose(-1, -2)  # (..., p, q), fp64
    Uc, S, Vch = torch.linalg.svd(core, full_matrices=False)
    U = Qb @ Uc[..., :, :k].to(dtype)
    V = Qa @ Vch[..., :k, :].transpose(-1, -2).to(dtype)
    U, V = canonical_signs(U, V)
    return U, S[..., :k].to(dtype), V
