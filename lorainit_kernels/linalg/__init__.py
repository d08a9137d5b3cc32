"""Dense and iterative linear algebra of the numerical core (docs/math.md).

* ``lobpcg``: batched LOBPCG for a few extreme eigenpairs (Knyazev 2001; Duersch et al. 2018);
  ``shift_invert_preconditioner``: ``(A - sigma I)^-1`` by one batched Cholesky, for its ``M``.
* ``guidance_matrix``, ``lora_da_factors``: LoRA-DA's guidance matrix and factors (Zhang et al. 2025);
  ``factor_input_cov`` / ``InputFactor``: a damped ``Z`` factored once for the layers that share it.
* ``svd_of_product``: top-k SVD of ``B @ A`` from the factors (HRP, Chen et al. 2025).
* ``SymmetricOperator`` and its kinds (``operators``): what ``lobpcg`` takes; dense, LoRA-DA's implicit
  Omega, diagonal-minus-low-rank, Cholesky inverse.
"""
from .guidance import InputFactor, choose_solver, factor_input_cov, guidance_matrix, lora_da_factors
from .lobpcg import ShiftInvert, lobpcg, shift_invert_preconditioner
from .operators import (CallableOperator, CholeskyInverse, DenseOperator, DiagonalMinusLowRank, GuidanceOperator,
                        SymmetricOperator)
from .products import svd_of_product

__all__ = ["CallableOperator", "CholeskyInverse", "DenseOperator", "DiagonalMinusLowRank", "GuidanceOperator",
           "InputFactor", "ShiftInvert", "SymmetricOperator", "choose_solver", "factor_input_cov", "guidance_matrix", "lobpcg", "lora_da_factors", "shift_invert_preconditioner", "svd_of_product"]
