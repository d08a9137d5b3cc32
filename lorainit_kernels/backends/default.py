"""The ``"torch"`` backend: every op as its plain-torch reference (``lorainit_kernels.reference``).

Runs on every device and floating dtype; statistics accumulate in ``reference.accumulation_dtype``
(fp32, fp64 for fp64 inputs). Symmetric outputs are mirrored from their upper triangle, so they
are exactly symmetric like the fused kernels' outputs.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

from torch import Tensor

from .. import reference
from . import implements


@implements("kfac_update", "torch")
def kfac_update(x: Tensor, g: Optional[Tensor], mask: Optional[Tensor], with_input_cov: bool, out=None
                ) -> Tuple[Tensor, Tensor, Tensor]:
    """``(sum x x^T, sum g x^T, sum g*g)`` over the valid tokens: ``reference.kfac_update``.

    ``out``: accumulators ``(Z, G, s)`` (None where not tracked) in ``reference.accumulation_dtype(x)``,
    added to in place by ``addmm_`` (one GEMM with beta = 1: no (n, n) or (m, n) temporary) and returned.
    """
    dtype = reference.accumulation_dtype(x)
    if out is None:
        return reference.kfac_update(x, g, mask, with_input_cov, dtype=dtype)
    Z, G, s = out
    xv = reference.compact(x, mask).to(dtype)
    if Z is not None and with_input_cov:
        Z.addmm_(xv.T, xv)
    if G is not None and g is not None:
        gv = reference.compact(g, mask).to(dtype)
        G.addmm_(gv.T, xv)
        s += (gv * gv).sum(0)
    return Z, G, s


@implements("weighted_gram", "torch")
def weighted_gram(v: Tensor, weights: Optional[Tensor]) -> Tensor:
    """``sum_t w_t v_t v_t^T``, mirrored from its upper triangle: ``reference.weighted_gram``."""
    return reference.mirror_upper(reference.weighted_gram(v, weights, dtype=reference.accumulation_dtype(v)))


@implements("sym_matmul", "torch")
def sym_matmul(A: Tensor, W: Tensor) -> Tensor:
    """``A @ W`` (batched GEMM; reads all of ``A``): ``reference.sym_matmul``."""
    return reference.sym_matmul(A, W)


@implements("rr_grams", "torch")
def rr_grams(S_parts: Sequence[Tensor], AS_parts: Sequence[Tensor]) -> Tuple[Tensor, Tensor]:
    """``(S^T S, S^T AS)`` in fp64 of the concatenated parts: ``reference.rr_grams``."""
    return reference.rr_grams(S_parts, AS_parts)
