"""Dense and iterative linear algebra of the numerical core (DESIGN.md sections 2-3).

* ``lobpcg``: batched LOBPCG for a few extreme eigenpairs (Knyazev 2001; Duersch et al. 2018).
* ``guidance_matrix``, ``lora_da_factors``: LoRA-DA's guidance matrix and factors (Zhang et al. 2025).
* ``svd_of_product``: top-k SVD of ``B @ A`` from the factors (HRP, Chen et al. 2025).
"""
from .guidance import guidance_matrix, lora_da_factors
from .lobpcg import lobpcg
from .products import svd_of_product

__all__ = ["guidance_matrix", "lobpcg", "lora_da_factors", "svd_of_product"]
