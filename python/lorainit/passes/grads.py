"""The weight-gradient pass: full weight gradients of the target layers (LoRA-GA, LoRA-One).

A plain forward/backward of the summed loss per batch with only the targets' base weights
requiring grad (LoRA branches off, eval mode): ``G = (1/T) sum_t g_t x_t^T`` (m, n) in torch
orientation, fp32, with ``T`` the number of valid tokens (DESIGN.md section 2).
"""
from __future__ import annotations

from typing import Any, Dict, Sequence, Tuple

import torch
from torch import Tensor, nn

from .. import distributed as dist_utils
from ..targets import LoRAInitError, TargetLayer
from .batches import count_positions
from .loss import LossRunner
from .state import pass_state, progress_bar

__all__ = ["weight_grads"]


def weight_grads(model: nn.Module, targets: Dict[str, TargetLayer], names: Sequence[str], batches: Sequence[Any],
                 runner: LossRunner, *, progress: bool = False) -> Tuple[Dict[str, Tensor], int]:
    """``({name: (1/T) sum_t g_t x_t^T}, T)`` over ``batches``, all-reduced across processes.

    The model's ``.grad`` fields and ``requires_grad`` flags are restored afterwards.
    """
    acc = {n: torch.zeros(targets[n].m, targets[n].n, dtype=torch.float32, device=targets[n].device) for n in names}
    tokens = 0
    with pass_state(model, targets, grad_weights=names, train_mode=True):
        bar = progress_bar(len(batches), "lorainit gradients", progress)
        try:
            for i, batch in enumerate(batches):
                with torch.enable_grad():
                    loss, _, mask = runner.forward(batch, i)
                    if not loss.requires_grad:
                        raise LoRAInitError(f"batch {i}: the loss does not depend on any LoRA target weight")
                    loss.backward()
                for n in names:
                    t = targets[n]
                    g = t.weight.grad
                    if g is None:
                        raise LoRAInitError(f"module {n!r}: no gradient reached its weight in batch {i}")
                    g = g.t() if t.transposed else g
                    if not bool(torch.isfinite(g).all()):
                        raise LoRAInitError(f"module {n!r}, batch {i}: NaN/Inf in the weight gradient")
                    acc[n] += g.float()
                    t.weight.grad = None
                tokens += int(mask.sum()) if mask is not None else count_positions(batch)
                bar.update(1)
        finally:
            bar.close()
    tokens = int(dist_utils.all_reduce_scalars([tokens])[0])
    dist_utils.all_reduce_sum(list(acc.values()))
    if tokens <= 0:
        raise LoRAInitError("no valid tokens in the samples")
    return {n: a / tokens for n, a in acc.items()}, tokens
