"""The data-free weight inits PEFT offers beside PiSSA: OLoRA and MiCA (``OLoRAConfig``, ``MiCAConfig``).

* ``"olora"``: Büyükakyüz 2024, "OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models",
  arXiv 2406.01775; PEFT ``init_lora_weights="olora"``: ``Q R = qr(W)``, ``lora_B = Q[:, :r]``,
  ``lora_A = R[:r]``, the base keeps ``W - sigma B A`` (:func:`lorainit_kernels.peft_inits.olora`).
  Linear layers only (PEFT defines no OLoRA for embeddings).
* ``"mica"``: Minor Component Adaptation, arXiv 2604.01694; PEFT ``init_lora_weights="mica"``:
  ``lora_B`` = the left singular vectors of the r smallest singular values of ``W``, ``lora_A = 0``,
  base unchanged; ``lora_B`` is **frozen** (``requires_grad=False``, as PEFT's ``MiCALinearVariant``),
  only ``lora_A`` trains (:func:`lorainit_kernels.peft_inits.mica`). Embeddings too, on
  ``W = weight^T`` (PEFT's ``MiCAEmbeddingVariant``).

The full weights are read one layer at a time (an all-gather each under FSDP2) and each shape
group's solve is spread over the ranks (:func:`lorainit.methods.common.solve_spread`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch

import lorainit_kernels.peft_inits as lkp

from ..adapters import LoRAFactors
from ..configs import InitConfig, check_bool, check_int
from ..context import InitContext
from ..targets import check_rank
from .common import MethodSpec, finalize, kernel_call, layer_groups, solve_spread
from .peft_common import refuse_embeddings

__all__ = ["OLoRAConfig", "MiCAConfig", "olora_init", "mica_init", "OLORA", "MICA"]

PAPERS = {
    "olora": "Büyükakyüz 2024, OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models, arXiv 2406.01775 "
             "(PEFT init_lora_weights='olora')",
    "mica": "Minor Component Adaptation (MiCA), arXiv 2604.01694 (PEFT init_lora_weights='mica')",
}


@dataclass(frozen=True)
class OLoRAConfig(InitConfig):
    """OLoRA options. ``max_batch``: at most this many same-shape layers per QR call (None: all)."""

    max_batch: Optional[int] = None

    def __post_init__(self):
        check_int("OLoRAConfig", "max_batch", self.max_batch, minimum=1, allow_none=True)


@dataclass(frozen=True)
class MiCAConfig(InitConfig):
    """MiCA options.

    Args:
        freeze_B: ``lora_B.requires_grad = False`` after the init (default True, as PEFT's MiCA variant,
            which registers ``lora_B`` as frozen); False leaves both factors trainable.
        max_batch: at most this many same-shape layers per SVD call (None: all).
    """

    freeze_B: bool = True
    max_batch: Optional[int] = None

    def __post_init__(self):
        check_bool("MiCAConfig", "freeze_B", self.freeze_B)
        check_int("MiCAConfig", "max_batch", self.max_batch, minimum=1, allow_none=True)


def _weight_method(ctx: InitContext, method: str, fn: Callable, max_batch: Optional[int],
                   with_delta: bool) -> Dict[str, LoRAFactors]:
    check_rank(ctx.targets, method)

    def solve(key, names, inputs):
        t0 = time.perf_counter()
        f = kernel_call(method, names, fn, torch.stack([inputs[k] for k in names]), key[2], key[3])
        dt = (time.perf_counter() - t0) / len(names)
        for name in names:
            ctx.record(name, time_s=dt)
        return {name: (f.lora_A[i], f.lora_B[i], None if f.base_delta is None else f.base_delta[i])
                for i, name in enumerate(names)}

    out: Dict[str, LoRAFactors] = {}
    with ctx.timed("solve"):
        groups = layer_groups(ctx.targets, max_batch=max_batch)
        solved = solve_spread(ctx, method, groups, solve, read=lambda k: ctx.targets[k].read_weight(),
                              with_delta=with_delta)
        for _, names in groups:
            for name in names:
                out[name] = finalize(ctx.targets[name], *solved[name])
    return out


def olora_init(ctx: InitContext, config: OLoRAConfig) -> Dict[str, LoRAFactors]:
    """OLoRA: the reduced QR of each weight (``lkp.olora``), residual in the base."""
    refuse_embeddings(ctx, "olora", "PEFT defines OLoRA for linear layers only")
    return _weight_method(ctx, "olora", lambda W, r, s: lkp.olora(W, r, scaling=s), config.max_batch, True)


def mica_init(ctx: InitContext, config: MiCAConfig) -> Dict[str, LoRAFactors]:
    """MiCA: minor left singular vectors of each weight in ``lora_B``, ``lora_A = 0`` (``lkp.mica``); B frozen."""
    out = _weight_method(ctx, "mica", lambda W, r, s: lkp.mica(W, r), config.max_batch, False)
    ctx.info["frozen"] = "lora_B" if config.freeze_B else None
    return out


OLORA = MethodSpec("olora", fn=olora_init, config_cls=OLoRAConfig, needs_data=False, paper=PAPERS["olora"],
                   summary="QR of W: B = Q[:, :r], A = R[:r], residual in the base")
MICA = MethodSpec("mica", fn=mica_init, config_cls=MiCAConfig, needs_data=False, paper=PAPERS["mica"],
                  summary="minor left singular vectors of W in B (frozen), A = 0")
