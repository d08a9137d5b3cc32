"""Plain-torch ground truth for every kernel of ``lorainit_kernels``.

Each function here is the specification its fast backends (C++ in ``csrc/``, Triton in
``lorainit_kernels/triton``) are tested against. Tests never change this file to match a kernel.
Computation runs in ``dtype`` (the op's accumulation dtype for the ``"torch"`` backend, see
:func:`accumulation_dtype`; float64 in tests). The ``"torch"`` backend (``backends.default``) is
these functions.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor


def accumulation_dtype(t: Tensor) -> torch.dtype:
    """The dtype the statistics of ``t`` accumulate in: fp64 for fp64 inputs, fp32 for bf16/fp16/fp32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def mirror_upper(a: Tensor) -> Tensor:
    """``triu(a) + triu(a, 1)^T`` over the last two dims: the exactly symmetric matrix of ``a``'s upper triangle."""
    return torch.triu(a) + torch.triu(a, 1).mT


def compact(t: Tensor, mask: Optional[Tensor]) -> Tensor:
    """Rows of ``t`` (T, d) whose ``mask`` (T,) is True; all rows when ``mask`` is None."""
    return t if mask is None else t[mask]


def kfac_update(
    x: Tensor,
    g: Optional[Tensor],
    mask: Optional[Tensor],
    with_input_cov: bool = True,
    dtype: torch.dtype = torch.float32,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Sums of the K-FAC statistics over the valid tokens ``t`` of one batch.

    ``x`` (T, n) layer inputs, ``g`` (T, m) output gradients or None, ``mask`` (T,) bool or None.
    Returns ``(Zs, Gs, ss)`` with ``Zs = sum_t x_t x_t^T`` (n, n) (an empty (0, 0) tensor when
    ``with_input_cov`` is False), ``Gs = sum_t g_t x_t^T`` (m, n) and ``ss = sum_t g_t * g_t`` (m,)
    (empty (0, n) and (0,) when ``g`` is None). docs/math.md.
    """
    n = x.shape[-1]
    xv = compact(x, mask).to(dtype)
    Zs = xv.T @ xv if with_input_cov else x.new_zeros((0, 0), dtype=dtype)
    if g is None:
        return Zs, x.new_zeros((0, n), dtype=dtype), x.new_zeros((0,), dtype=dtype)
    gv = compact(g, mask).to(dtype)
    return Zs, gv.T @ xv, (gv * gv).sum(0)


def weighted_gram(v: Tensor, weights: Optional[Tensor], dtype: torch.dtype = torch.float32) -> Tensor:
    """``sum_t w_t v_t v_t^T`` (d, d) for ``v`` (T, d) and ``weights`` (T,) (all ones when None).

    The building block shared by the statistics (``Z``, w = 1) and the guidance matrix
    (``G^T D^2 G``, w_i = -alpha / s_i^2), docs/math.md, the assembly of Omega.
    """
    vv = v.to(dtype)
    if weights is None:
        return vv.T @ vv
    return (vv * weights.to(dtype)[:, None]).T @ vv


def sym_matmul(A: Tensor, W: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """``A @ W`` for symmetric ``A`` (b, n, n) and ``W`` (b, n, p), in ``dtype`` (None: the inputs' dtype).

    The fast kernels read only ``A``'s upper triangle; for symmetric ``A`` the two agree.
    """
    if dtype is None:
        return A @ W
    return A.to(dtype) @ W.to(dtype)


def rr_grams(S_parts: Sequence[Tensor], AS_parts: Sequence[Tensor]) -> Tuple[Tensor, Tensor]:
    """``(B, H) = (S^T S, S^T AS)`` in float64 for ``S = cat(S_parts, -1)``, ``AS = cat(AS_parts, -1)``.

    Parts are (b, n, c_k) tensors; ``S`` and ``AS`` are (b, n, q). Returns ``B`` and ``H`` (b, q, q)
    float64, each the mirror of its upper triangle (LOBPCG's Rayleigh-Ritz Grams; ``H`` is
    symmetric when ``AS = A S`` for a symmetric ``A``).
    """
    S = torch.cat([t.to(torch.float64) for t in S_parts], -1)
    AS = torch.cat([t.to(torch.float64) for t in AS_parts], -1)
    return mirror_upper(S.mT @ S), mirror_upper(S.mT @ AS)
