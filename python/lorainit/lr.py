"""The learning rate to use after an init, relative to plain LoRA's (``report.lr_scale``).

Every init changes what one optimizer step does to the adapted weights, so the rate that suits
plain LoRA does not suit the others (PiSSA's factors are large: the same Adam step moves ``W``
several times further). :func:`lr_scale_info` gives the factor by which to multiply the rate tuned
for plain LoRA: the ratio of the weight-space size of one Adam step under plain LoRA's init to the
one under this init, over all targets (:mod:`lorainit_kernels.lr_scale` has the formula). It costs
two norms per layer. How well it predicts each init's tuned rate is measured in
docs/learning-rate.md.
"""
from __future__ import annotations

import math
from typing import Dict

from lorainit_kernels.lr_scale import adam_step_norm_sq, lr_scale_from_norms, plain_lora_step_norm_sq

from .errors import LoRAInitError

__all__ = ["lr_scale_info", "REFERENCE_METHOD", "check_lora_lr"]

REFERENCE_METHOD = "lora"  # PEFT's default init: lr_scale is 1 by definition
RULE = "adam-step-norm"


def lr_scale_info(method: str, targets: Dict, factors: Dict, config) -> Dict[str, object]:
    """``{"value", "rule", "layer_min", "layer_max"}``: the learning-rate scale of the factors just written.

    ``value`` is 1.0 for plain LoRA (the reference), else ``min(1, sqrt(sum rho_ref^2 / sum rho^2))``
    over the targets with the factors' trained parts (``freeze_A`` / ``freeze_B`` of the config); None
    with a ``reason`` when no finite scale exists (the init's first step moves no weight).
    """
    train_A = not getattr(config, "freeze_A", False)
    train_B = not getattr(config, "freeze_B", False)
    pairs, per_layer = [], []
    for name, t in targets.items():
        f = factors[name]
        ref = plain_lora_step_norm_sq(t.m, t.n, t.r, t.scaling, embedding=t.kind == "embedding")
        got = float(adam_step_norm_sq(f.lora_A, f.lora_B, t.scaling, train_A=train_A, train_B=train_B))
        pairs.append((ref, got))
        if got > 0:
            per_layer.append(lr_scale_from_norms([(ref, got)]))
    out: Dict[str, object] = {"rule": RULE}
    if method == REFERENCE_METHOD:
        out["value"] = 1.0
    else:
        try:
            out["value"] = lr_scale_from_norms(pairs)
        except ValueError as e:
            out.update(value=None, reason=str(e))
    if per_layer:
        out.update(layer_min=min(per_layer), layer_max=max(per_layer))
    return out


def check_lora_lr(lora_lr) -> float:
    """``lora_lr`` as a float, or ``LoRAInitError`` naming it (a finite number > 0)."""
    if isinstance(lora_lr, bool) or not isinstance(lora_lr, (int, float)):
        raise LoRAInitError(f"suggest_lr: lora_lr must be a number (the learning rate you would use with plain "
                            f"LoRA), got {type(lora_lr).__name__} {lora_lr!r}")
    lr = float(lora_lr)
    if not math.isfinite(lr) or lr <= 0:
        raise LoRAInitError(f"suggest_lr: lora_lr must be a finite number > 0, got {lora_lr!r}")
    return lr
