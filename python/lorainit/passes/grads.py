"""The weight-gradient pass: full weight gradients of the target layers (LoRA-GA, LoRA-One).

A plain forward/backward of the summed loss per batch with every parameter frozen (LoRA branches
off, eval mode); hooks on the targets' base layers accumulate ``sum_t g_t x_t^T`` (m, n) in fp32
from each layer's input ``x`` and output gradient ``g`` (over all positions, exactly what autograd
would put in ``W.grad``), in torch orientation, on the layer's device. ``G = that / T`` with ``T``
the number of valid tokens (DESIGN.md section 2).

No parameter gets a ``.grad``: under FSDP2 nothing is reduce-scattered (the gradients are summed
over ranks by one bucketed all-reduce of the accumulators instead), and no base weight has to
require grad. With a process group every rank runs the same number of batches (a rank that ran
out repeats its first batch with the hooks off) and each forward and backward ends in an agreed
status (:mod:`lorainit.distributed`).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .. import distributed as dist_utils
from ..targets import LoRAInitError, TargetLayer
from .batches import count_positions
from .loss import LossRunner
from .state import pass_state, progress_bar

__all__ = ["weight_grads"]


class _GradHooks:
    """Forward hooks on the base layers of ``names`` accumulating ``g^T x`` (m, n) fp32 per layer."""

    def __init__(self, targets: Dict[str, TargetLayer], names: Sequence[str]):
        self.acc = {n: torch.zeros(targets[n].m, targets[n].n, dtype=torch.float32, device=targets[n].device)
                    for n in names}
        self.ran = {n: False for n in names}
        self.active = True
        self.error: Optional[BaseException] = None
        self.batch = -1
        self.handles = [targets[n].base.register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):
        def hook(module, inputs, output):
            if not inputs or not isinstance(inputs[0], Tensor) or not isinstance(output, Tensor):
                self.error = LoRAInitError(f"module {name!r}: expected a tensor input and output in batch {self.batch}")
                return None
            x = inputs[0].detach()
            if not output.requires_grad:
                output.requires_grad_(True)  # all parameters are frozen: start the graph here

            def grad_hook(g: Tensor):
                if self.active and self.error is None:
                    g2 = g.detach().reshape(-1, g.shape[-1]).float()
                    x2 = x.reshape(-1, x.shape[-1]).to(device=g2.device, dtype=torch.float32)
                    if not bool(torch.isfinite(g2).all()):
                        self.error = LoRAInitError(f"module {name!r}, batch {self.batch}: NaN/Inf in the weight "
                                                   f"gradient")
                    else:
                        self.acc[name] += (g2.t() @ x2).to(self.acc[name].device)
                        self.ran[name] = True
                return None

            output.register_hook(grad_hook)
            return None
        return hook

    def close(self):
        for h in self.handles:
            h.remove()
        self.handles.clear()


def weight_grads(model: nn.Module, targets: Dict[str, TargetLayer], names: Sequence[str], batches: Sequence[Any],
                 runner: LossRunner, *, progress: bool = False) -> Tuple[Dict[str, Tensor], int]:
    """``({name: (1/T) sum_t g_t x_t^T}, T)`` over ``batches``, all-reduced across processes.

    The model's ``.grad`` fields and ``requires_grad`` flags are untouched.
    """
    tokens = 0
    steps = dist_utils.all_reduce_max(len(batches))
    with pass_state(model, targets, train_mode=True):
        hooks = _GradHooks(targets, names)
        bar = progress_bar(len(batches), "lorainit gradients", progress)
        try:
            for i in range(steps):
                real = i < len(batches)
                batch = batches[i] if real else batches[0]
                hooks.active, hooks.batch = real, i
                err = loss = None
                with torch.enable_grad():
                    try:
                        loss, _, mask = runner.forward(batch, i)
                        if hooks.error is not None:
                            raise hooks.error
                        if not loss.requires_grad:
                            raise LoRAInitError(f"batch {i}: the loss does not depend on any LoRA target weight")
                    except Exception as e:
                        err = e
                    dist_utils.agree(err, f"gradient pass, batch {i}")
                    loss.backward()
                dist_utils.agree(hooks.error, f"gradient pass, batch {i} (backward)")
                if real:
                    tokens += int(mask.sum()) if mask is not None else count_positions(batch)
                    bar.update(1)
        finally:
            bar.close()
            hooks.close()
    ran = torch.tensor([float(hooks.ran[n]) for n in names], dtype=torch.float64)
    tokens_t = torch.tensor([float(tokens)], dtype=torch.float64)
    dist_utils.all_reduce_sum(list(hooks.acc.values()) + [ran, tokens_t])
    tokens = int(tokens_t)
    missing = [n for n, r in zip(names, ran.tolist()) if r == 0]
    if missing:
        raise LoRAInitError(f"module {missing[0]!r}: no gradient reached its weight in any batch"
                            f"{' on any rank' if dist_utils.is_distributed() else ''}")
    if tokens <= 0:
        raise LoRAInitError("no valid tokens in the samples")
    return {n: a / tokens for n, a in hooks.acc.items()}, tokens
