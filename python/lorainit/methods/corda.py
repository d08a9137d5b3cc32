"""CorDA (context-oriented decomposition) behind ``initialize_lora(..., method="corda")``, with :class:`CorDAConfig`.

Yang et al. 2024, "CorDA: Context-Oriented Decomposition Adaptation of Large Language Models for
Task-Aware Parameter-Efficient Fine-tuning", arXiv 2406.05223; PEFT ``tuners/lora/corda.py``
(``preprocess_corda``) and ``layer.py`` (``corda_init``). Per layer, with ``C`` the input second
moment ``Z`` of the statistics pass: the SVD of ``W C_d`` (``C_d`` = damped ``C``); ``mode="ipm"``
puts the ``r`` largest components into the adapter, ``"kpm"`` the ``r`` smallest; the base weight keeps
the residual, so the model's output is unchanged at initialization
(:func:`lorainit_kernels.peft_inits.corda`).

Conventions against PEFT: PEFT divides each batch's inputs by their largest entry before
``X^T X`` and averages over batches (its hook also assumes batches of one sequence: a batch of
several fails in ``t()``); lorainit uses the per-token mean ``Z`` over the valid tokens. The
adapter's product ``sigma B A = [W C_d]_I C_d^{-1}`` does not depend on the scale of ``C``; the split
into ``A`` and ``B`` does (by ``sqrt`` of that scale).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import lorainit_kernels.peft_inits as lkp

from ..adapters import LoRAFactors
from ..configs import InitConfig, check_choice, check_int, check_number
from ..context import InitContext
from ..targets import check_rank
from .common import MethodSpec
from .peft_common import refuse_embeddings, solve_from_stats

__all__ = ["CorDAConfig", "corda_init", "CORDA"]

PAPER = ("Yang et al. 2024, CorDA: Context-Oriented Decomposition Adaptation of Large Language Models, "
         "arXiv 2406.05223 (PEFT init_lora_weights='corda')")


@dataclass(frozen=True)
class CorDAConfig(InitConfig):
    """Options of CorDA (PEFT ``CordaConfig``).

    Args:
        mode: ``"ipm"`` (instruction-previewed: the r largest components of ``W C`` adapt, default) or
            ``"kpm"`` (knowledge-preserved: the r smallest adapt, the principal ones stay frozen).
        damping: relative damping of ``C`` (``C + damping * mean(diag C) * I``; PEFT's 0.01, doubled
            while solves with ``C_d`` would be inaccurate, as PEFT does).
        token_mask: ``"attention"`` (default; PEFT's hook takes every input token) or ``"labels"``.
        max_memory: bytes bounding the statistics (several passes when they do not fit; None: one pass).
        backend: statistics kernel (``"auto"``, ``"native"``, ``"triton"``, ``"torch"``).
    """

    mode: str = "ipm"
    damping: float = lkp.CORDA_DAMPING
    token_mask: str = "attention"
    max_memory: Optional[int] = None
    backend: str = "auto"

    def __post_init__(self):
        c = "CorDAConfig"
        check_choice(c, "mode", self.mode, ("ipm", "kpm"))
        check_number(c, "damping", self.damping, positive=True)
        check_choice(c, "token_mask", self.token_mask, ("attention", "labels"))
        check_int(c, "max_memory", self.max_memory, minimum=1, allow_none=True)
        check_choice(c, "backend", self.backend, ("auto", "native", "triton", "torch"))


def corda_init(ctx: InitContext, config: CorDAConfig) -> Dict[str, LoRAFactors]:
    """CorDA: the ``mode`` components of the SVD of ``W C_d`` into the adapter, the residual into the base."""
    check_rank(ctx.targets, "corda")
    refuse_embeddings(ctx, "corda", "CorDA's W C needs a dense input covariance, and PEFT defines it for linear "
                                    "layers only")

    def solve(name, st, W):
        t = ctx.targets[name]
        f = lkp.corda(W, st.Z, t.r, scaling=t.scaling, mode=config.mode, damping=config.damping)
        ctx.record(name, singular_values=(t.scaling * f.lora_B.float().pow(2).sum(0)).tolist())  # of W C_d
        return f.lora_A, f.lora_B, f.base_delta

    out = solve_from_stats(ctx, "corda", config, solve, needs_weight=True, with_delta=True)
    ctx.info["corda"] = f"mode={config.mode}: SVD of W C_d, C = the per-token input second moment Z"
    return out


CORDA = MethodSpec("corda", fn=corda_init, config_cls=CorDAConfig, needs_data=True, needs_grad=False, paper=PAPER,
                   summary="SVD of W C (input covariance): r largest (ipm) or smallest (kpm) into the adapter, "
                           "residual in the base")
