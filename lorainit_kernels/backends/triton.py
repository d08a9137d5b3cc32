"""The ``"triton"`` backend: ``kfac_update`` and ``weighted_gram`` by the Triton kernels of ``lorainit_kernels.triton``.

CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``; bf16, fp16 or fp32 operands, fp32
accumulation. ``triton`` is imported on the first call, so this module imports without it.
There is no Triton kernel for ``sym_matmul`` or ``rr_grams`` (on GPU, cuBLAS runs them through
the ``"torch"`` backend).
"""
from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor

from . import HALF_OR_FP32, implements



def _kernels():
    from ..triton import kfac  # imports triton

    return kfac


@implements("kfac_update", "triton", dtypes=HALF_OR_FP32)
def kfac_update(x: Tensor, g: Optional[Tensor], mask: Optional[Tensor], with_input_cov: bool, out=None
                ) -> Tuple[Tensor, Tensor, Tensor]:
    """``(sum x x^T, sum g x^T, sum g*g)`` over the valid tokens, fp32: ``triton.kfac.kfac_update``
    (``out``: fp32 accumulators ``(Z, G, s)`` added to in place by the kernel)."""
    return _kernels().kfac_update(x, g, mask, with_input_cov, out=out)


@implements("weighted_gram", "triton", dtypes=HALF_OR_FP32)
def weighted_gram(v: Tensor, weights: Optional[Tensor]) -> Tensor:
    """``sum_t w_t v_t v_t^T``, fp32, exactly symmetric: ``triton.kfac.weighted_gram``."""
    return _kernels().weighted_gram(v, weights)
