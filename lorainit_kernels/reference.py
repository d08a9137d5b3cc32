"""Plain-torch ground truth for every kernel of ``lorainit_kernels``.

Each function here is the specification its fast backends (C++ in ``csrc/``, Triton in
``lorainit_kernels/triton``) are tested against. Tests never change this file to match a kernel.
Computation runs in ``dtype`` (float32 for the ``"torch"`` backend, float64 in tests).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


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
    (empty (0, n) and (0,) when ``g`` is None). DESIGN.md section 2.
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
    (``G^T D^2 G``, w_i = -alpha / s_i^2), DESIGN.md section 2 "useful identity".
    """
    vv = v.to(dtype)
    if weights is None:
        return vv.T @ vv
    return (vv * weights.to(dtype)[:, None]).T @ vv
