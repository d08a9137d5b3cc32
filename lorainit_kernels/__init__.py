"""lorainit_kernels: the numerical core of lorainit (tensors in, tensors out).

Kernels for data-aware LoRA initialization: fused K-FAC statistics (``KFACStats``,
``kfac_update``), the weighted outer-product accumulation (``weighted_gram``), batched LOBPCG,
the LoRA-DA guidance matrix and the per-layer math of every initialization method. It knows
nothing of models or PEFT; ``lorainit`` builds on it. Conventions: docs/math.md.
"""
from .backends import BACKENDS, has_native, has_triton, triton_interpreting
from .kfac import KFACStats
from .linalg import ShiftInvert, guidance_matrix, lobpcg, lora_da_factors, shift_invert_preconditioner, svd_of_product
from .ops import kfac_update, sym_matmul, weighted_gram

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "KFACStats",
    "ShiftInvert",
    "shift_invert_preconditioner",
    "guidance_matrix",
    "has_native",
    "has_triton",
    "kfac_update",
    "lobpcg",
    "lora_da_factors",
    "svd_of_product",
    "sym_matmul",
    "triton_interpreting",
    "weighted_gram",
]
