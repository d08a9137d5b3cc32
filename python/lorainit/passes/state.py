"""The model's state during a data pass, and the pass's progress bar.

Every pass freezes all parameters (except the base weights whose gradient it wants), switches to
eval mode and disables the LoRA branches (the statistics are those of the base model), and puts
all of that back afterwards, also on error. On exit FSDP2 modules are resharded (a no-grad forward
leaves the root's parameters unsharded), so reads and writes between passes see the sharded DTensors.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Sequence

from torch import nn

from .. import distributed as dist_utils
from ..adapters import ModuleState
from ..targets import TargetLayer

__all__ = ["pass_state", "progress_bar"]


@contextlib.contextmanager
def pass_state(model: nn.Module, targets: Dict[str, TargetLayer], *, lora_enabled: bool = False,
               grad_weights: Sequence[str] = ()):
    """Freeze every parameter (except the base weights of the targets ``grad_weights``), eval mode, LoRA off."""
    saved = ModuleState(model)
    try:
        for p, _, _ in saved.params:
            p.requires_grad_(False)
        for name in grad_weights:
            w = targets[name].weight
            w.grad = None
            w.requires_grad_(True)
        model.eval()
        for m, _ in saved.disable_flags:
            m._disable_adapters = not lora_enabled
        yield
    finally:
        dist_utils.reshard(model)
        saved.restore()


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "batch"):
    """A tqdm bar over ``total`` items (a no-op bar when not ``enabled``)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, unit=unit)
