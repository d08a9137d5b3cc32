"""The weight-gradient pass: full weight gradients of the target layers (LoRA-GA, LoRA-One).

A plain forward/backward of the summed loss per batch with only the targets' base weights
requiring grad (LoRA branches off, eval mode): ``G = (1/T) sum_t g_t x_t^T`` (m, n) in torch
orientation, fp32, with ``T`` the number of valid tokens of each layer: the mask that matches its
input (:mod:`~lorainit.passes.masks`), counted by a forward hook (DESIGN.md section 2). Positions
outside a layer's mask carry no loss, so their gradient is zero and only ``T`` depends on the mask.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .. import distributed as dist_utils
from ..targets import LoRAInitError, TargetLayer
from .batches import count_positions
from .loss import LossRunner
from .masks import LayerMasks, count_rows
from .state import pass_state, progress_bar

__all__ = ["weight_grads"]


def weight_grads(model: nn.Module, targets: Dict[str, TargetLayer], names: Sequence[str], batches: Sequence[Any],
                 runner: LossRunner, *, progress: bool = False
                 ) -> Tuple[Dict[str, Tensor], int, Dict[str, int], Dict[str, Optional[str]]]:
    """``({name: (1/T_l) sum_t g_t x_t^T}, T, {name: T_l}, {name: mask used})`` over ``batches``, all-reduced.

    ``T_l`` is layer ``l``'s token count, ``T`` that of the batches' main mask. The model's ``.grad``
    fields and ``requires_grad`` flags are restored afterwards.
    """
    acc = {n: torch.zeros(targets[n].m, targets[n].n, dtype=torch.float32, device=targets[n].device) for n in names}
    tokens = 0
    layer_tokens = {n: 0 for n in names}
    lm = LayerMasks(model, targets, list(names))
    seen: Dict[str, list] = {}

    def make_hook(name):
        def hook(module, args, output):
            if args and isinstance(args[0], Tensor):
                seen.setdefault(name, []).append(args[0])
        return hook

    handles = [targets[n].base.register_forward_hook(make_hook(n)) for n in names] + lm.attach()
    with pass_state(model, targets, grad_weights=names):
        bar = progress_bar(len(batches), "lorainit gradients", progress)
        try:
            for i, batch in enumerate(batches):
                seen.clear()
                lm.begin_batch()
                with torch.enable_grad():
                    loss, _, masks = runner.forward_masks(batch, i)
                    mask = masks.primary
                    for n, xs in seen.items():
                        for x in xs:
                            try:
                                sel, _ = lm.select(n, x, masks)
                            except LoRAInitError as err:
                                raise LoRAInitError(f"module {n!r}, batch {i}: {err}") from None
                            layer_tokens[n] += count_rows(sel, x, targets[n].kind)
                    seen.clear()
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
                if i == 0:
                    runner.finish_check()  # the loss_fn reduction check, outside the batch's hooks
                bar.update(1)
        finally:
            bar.close()
            for h in handles:
                h.remove()
    counts = dist_utils.all_reduce_scalars([tokens] + [layer_tokens[n] for n in names])
    tokens = int(counts[0])
    layer_tokens = {n: int(c) for n, c in zip(names, counts[1:])}
    dist_utils.all_reduce_sum(list(acc.values()))
    if tokens <= 0:
        raise LoRAInitError("no valid tokens in the samples")
    for n in names:
        if layer_tokens[n] <= 0:
            raise LoRAInitError(f"module {n!r} received no valid tokens in the gradient pass (it never ran, or every "
                                f"token was masked)")
    return ({n: a / layer_tokens[n] for n, a in acc.items()}, tokens, layer_tokens,
            {n: lm.label(n) for n in names})
