"""EVA (Explained Variance Adaptation) behind ``initialize_lora(..., method="eva")``, with :class:`EVAConfig`.

Paischer et al. 2024, "One Initialization to Rule them All: Fine-tuning via Explained Variance
Adaptation", arXiv 2410.07170; PEFT ``tuners/lora/eva.py`` (``get_eva_state_dict``,
``initialize_lora_eva_weights``). Per layer: ``lora_A`` = the top-r principal directions of the
layer's **centered** inputs (eigenvectors of ``Z - mu mu^T``, :func:`lorainit_kernels.peft_inits.eva`),
``lora_B = 0``; the model is unchanged at initialization.

Where PEFT runs an incremental PCA that cycles the dataloader until every layer's components
converge (cosine similarity ``tau``), lorainit takes the exact covariance of the statistics samples
from one pass (``Z`` and the token mean ``mu`` accumulated together) and one symmetric eigensolve
per input (layers that share an input, q/k/v and gate/up, share it, as in PEFT).

Rank redistribution (``rho > 1``, PEFT's default 2): every layer offers ``round(r * rho)``
explained-variance ratios, the largest ``sum(r)`` win (:func:`lorainit_kernels.peft_inits.eva_rank_distribution`).
lorainit writes into the adapters the model already has and does not resize them: when the
redistribution gives a layer another rank, the call raises (the model unchanged) with the
``rank_pattern`` and ``alpha_pattern`` PEFT would write (``alpha`` scaled by ``new_r / r`` as PEFT's
``adjust_scaling_factors``): create the PEFT model with them and call again. The report's
``info["eva_rank_pattern"]`` holds them in any case.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch

import lorainit_kernels.peft_inits as lkp

from ..adapters import LoRAFactors
from ..configs import InitConfig, check_bool, check_choice, check_int, check_number
from ..context import InitContext
from ..targets import LoRAInitError, check_rank
from .common import MethodSpec
from .peft_common import refuse_embeddings, solve_from_stats

__all__ = ["EVAConfig", "eva_init", "EVA"]

PAPER = ("Paischer et al. 2024, One Initialization to Rule them All: Fine-tuning via Explained Variance Adaptation, "
         "arXiv 2410.07170 (PEFT init_lora_weights='eva')")


@dataclass(frozen=True)
class EVAConfig(InitConfig):
    """Options of EVA (PEFT ``EvaConfig``).

    Args:
        rho: >= 1; each layer may take up to ``round(r * rho)`` components in the rank redistribution
            (1, the default here: no redistribution, every layer keeps its ``r``; PEFT's default is 2).
        whiten: divide each direction by the square root of its singular value (PEFT ``whiten``).
        adjust_scaling_factors: with a redistribution, scale ``lora_alpha`` by ``new_r / r`` in the
            suggested ``alpha_pattern`` (PEFT's default True).
        token_mask: ``"labels"`` (default, PEFT's ``use_label_mask=True``: tokens whose label is -100
            are left out) or ``"attention"``.
        max_memory: bytes bounding the statistics (several passes when they do not fit; None: one pass).
        backend: statistics kernel (``"auto"``, ``"native"``, ``"triton"``, ``"torch"``).
        solver: ``"auto"`` (dense eigh below the measured crossover, LOBPCG above), ``"eigh"`` or ``"lobpcg"``.
    """

    rho: float = 1.0
    whiten: bool = False
    adjust_scaling_factors: bool = True
    token_mask: str = "labels"
    max_memory: Optional[int] = None
    backend: str = "auto"
    solver: str = "auto"

    def __post_init__(self):
        c = "EVAConfig"
        check_number(c, "rho", self.rho, minimum=1.0)
        check_bool(c, "whiten", self.whiten)
        check_bool(c, "adjust_scaling_factors", self.adjust_scaling_factors)
        check_choice(c, "token_mask", self.token_mask, ("labels", "attention"))
        check_int(c, "max_memory", self.max_memory, minimum=1, allow_none=True)
        check_choice(c, "backend", self.backend, ("auto", "native", "triton", "torch"))
        check_choice(c, "solver", self.solver, ("auto", "eigh", "lobpcg"))


def eva_init(ctx: InitContext, config: EVAConfig) -> Dict[str, LoRAFactors]:
    """EVA: ``lora_A`` from the top principal directions of each layer's centered inputs, ``lora_B = 0``."""
    check_rank(ctx.targets, "eva")
    refuse_embeddings(ctx, "eva", "EVA takes the principal directions of a layer's inputs, which for an embedding are "
                                  "one-hot token vectors (PEFT's EVA does not support embeddings either)")
    k_of = {n: min(int(round(t.r * config.rho)), t.n) for n, t in ctx.targets.items()}
    comps: Dict[str, lkp.EVAComponents] = {}  # per input owner: the directions, shared by its layers
    owner_of: Dict[str, str] = {}

    def solve(name, st, W):
        t = ctx.targets[name]
        owner_of[name] = st.z_owner
        k = k_of[name]  # layers sharing an input share its directions (recomputed only for a larger k)
        c = comps.get(st.z_owner)
        if c is None or c.components.shape[-2] < k:
            c = comps[st.z_owner] = lkp.eva_components(st.Z, st.mu, k, solver=config.solver)
        A = c.components[:t.r]
        if config.whiten:
            sv = (st.count * c.explained_variance[:t.r]).sqrt()
            if bool((sv <= 0).any()):
                raise LoRAInitError(f"eva: module {name!r}: whiten=True but one of its top {t.r} components has zero "
                                    f"variance")
            A = A / sv.sqrt().unsqueeze(-1)
        ctx.record(name, explained_variance_ratio=c.explained_variance_ratio[:t.r].tolist())
        return A, torch.zeros(t.m, t.r, dtype=A.dtype, device=A.device), None

    out = solve_from_stats(ctx, "eva", config, solve)
    ctx.info["eva"] = "top principal directions of the centered inputs, Z - mu mu^T, from one statistics pass"
    if config.rho > 1:
        _redistribute(ctx, config, comps, owner_of)
    return out


def _redistribute(ctx: InitContext, config: EVAConfig, comps, owner_of) -> None:
    """PEFT's rank redistribution; raises with the rank/alpha patterns when a layer's rank would change."""
    if ctx.world > 1:
        raise LoRAInitError("eva: rho > 1 (rank redistribution) is not supported with a process group in lorainit; "
                            "use rho=1")
    ratios = {n: comps[owner_of[n]].explained_variance_ratio for n in ctx.names}
    shared = {n: owner_of[n] for n in ctx.names if owner_of[n] != n}
    budget = sum(t.r for t in ctx.targets.values())
    k_of = {n: min(int(round(t.r * config.rho)), t.n) for n, t in ctx.targets.items()}
    ranks = lkp.eva_rank_distribution({n: ratios[n] for n in ctx.names}, budget, k_of, shared)
    rank_pattern, alpha_pattern = {}, {}
    for n, t in ctx.targets.items():
        key = n.replace("base_model.model.", "")  # PEFT's pattern keys: names in the base model
        if ranks[n] != t.r:
            rank_pattern[key] = ranks[n]
            if config.adjust_scaling_factors:
                alpha_pattern[key] = t.lora_alpha * ranks[n] / t.r
    ctx.info["eva_rank_pattern"] = {"rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}
    if rank_pattern:
        shown = dict(list(rank_pattern.items())[:6])
        raise LoRAInitError(f"eva: the rank redistribution (rho={config.rho}) gives {len(rank_pattern)} layer(s) another "
                            f"rank (e.g. {shown}; rank 0 = no adapter); lorainit does not resize adapters: create the "
                            f"PEFT model with LoraConfig(rank_pattern=..., alpha_pattern=...) as given here and call "
                            f"again with rho=1. "
                            f"rank_pattern={rank_pattern}, alpha_pattern={alpha_pattern}")


EVA = MethodSpec("eva", fn=eva_init, config_cls=EVAConfig, needs_data=True, needs_grad=False, paper=PAPER,
                 summary="top principal directions of the centered layer inputs in A, B = 0 (one statistics pass)")
