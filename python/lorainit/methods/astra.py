"""Astra behind ``initialize_lora(..., method="astra")``, with :class:`AstraConfig`.

Liu et al. 2026, "Astra: Activation-Space Tail-Eigenvector Low-Rank Adaptation of Large Language
Models", arXiv 2602.19111 (ACL 2026 Findings); reference code LyoAI/Astra (``astra.py``; not in PEFT
0.21). Per layer, with ``Y = (1/T) sum_t y_t y_t^T`` the second moment of the layer's output ``y = W x + b``
(an extra statistic of the same pass, ``extras=("output_cov",)``) and ``V_r`` (m, r) its eigenvectors:
``lora_B = V_r``, ``lora_A = V_r^T W``, the base keeps ``W - sigma V_r V_r^T W`` (the output is
unchanged at initialization; :func:`lorainit_kernels.peft_inits.astra`).

Which eigenvectors: the reference code's ``astra_method="IPM"`` (its default, and the only one its
``init_astra.py`` supports) takes the last ``r`` columns of ``torch.linalg.eigh`` (ascending), i.e.
the **largest** eigenvalues; ``"KPM"`` the first ``r`` (smallest). lorainit follows the code
(``mode="ipm"`` default). Convention: the reference divides each batch's outputs by their largest
entry and averages ``Y^T Y`` over batches of one sequence; lorainit uses the per-token mean over
the valid tokens (the eigenvectors, hence the adapter, differ only through that weighting).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import lorainit_kernels.peft_inits as lkp

from ..adapters import LoRAFactors
from ..configs import InitConfig, check_choice, check_int
from ..context import InitContext
from ..targets import LoRAInitError
from .common import MethodSpec
from .peft_common import refuse_embeddings, solve_from_stats

__all__ = ["AstraConfig", "astra_init", "ASTRA"]

PAPER = ("Liu et al. 2026, Astra: Activation-Space Tail-Eigenvector Low-Rank Adaptation of Large Language Models, "
         "arXiv 2602.19111 (code LyoAI/Astra)")


@dataclass(frozen=True)
class AstraConfig(InitConfig):
    """Options of Astra (reference ``AstraConfig``).

    Args:
        mode: ``"ipm"`` (default, the reference's: eigenvectors of the r largest eigenvalues of ``Y``)
            or ``"kpm"`` (the r smallest).
        token_mask: ``"attention"`` (default) or ``"labels"``.
        max_memory: bytes bounding the statistics (``Y`` adds m^2 per layer; several passes when they do not fit).
        backend: statistics kernel (``"auto"``, ``"native"``, ``"triton"``, ``"torch"``).
        solver: ``"auto"`` (dense eigh below the measured crossover, LOBPCG above), ``"eigh"`` or ``"lobpcg"``.
    """

    mode: str = "ipm"
    token_mask: str = "attention"
    max_memory: Optional[int] = None
    backend: str = "auto"
    solver: str = "auto"

    def __post_init__(self):
        c = "AstraConfig"
        check_choice(c, "mode", self.mode, ("ipm", "kpm"))
        check_choice(c, "token_mask", self.token_mask, ("attention", "labels"))
        check_int(c, "max_memory", self.max_memory, minimum=1, allow_none=True)
        check_choice(c, "backend", self.backend, ("auto", "native", "triton", "torch"))
        check_choice(c, "solver", self.solver, ("auto", "eigh", "lobpcg"))


def astra_init(ctx: InitContext, config: AstraConfig) -> Dict[str, LoRAFactors]:
    """Astra: ``lora_B`` = eigenvectors of the output second moment, ``lora_A = B^T W``, residual in the base."""
    for t in ctx.targets.values():
        if t.r > t.m:
            raise LoRAInitError(f"astra: module {t.name!r} has r={t.r} > out_features m={t.m} (Astra takes r "
                                f"eigenvectors of the m x m output covariance)")
    refuse_embeddings(ctx, "astra", "the reference defines Astra for nn.Linear layers only")

    def solve(name, st, W):
        t = ctx.targets[name]
        f = lkp.astra(W, st.Y, t.r, scaling=t.scaling, mode=config.mode, solver=config.solver)
        return f.lora_A, f.lora_B, f.base_delta

    out = solve_from_stats(ctx, "astra", config, solve, needs_weight=True, with_delta=True)
    ctx.info["astra"] = f"mode={config.mode}: eigenvectors of the output second moment (1/T) sum_t y_t y_t^T"
    return out


ASTRA = MethodSpec("astra", fn=astra_init, config_cls=AstraConfig, needs_data=True, needs_grad=False, paper=PAPER,
                   summary="eigenvectors of the output-activation covariance in B, A = B^T W, residual in the base")
