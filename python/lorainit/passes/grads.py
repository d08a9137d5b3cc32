"""The weight-gradient pass: full weight gradients of the target layers (LoRA-GA, LoRA-One).

A plain forward/backward of the summed loss per batch with every parameter frozen (LoRA branches
off, eval mode); hooks on the targets' base layers accumulate ``sum_t g_t x_t^T`` (m, n) in fp32
from each layer's input ``x`` and output gradient ``g`` (over all positions, exactly what autograd
would put in ``W.grad``; for an embedding the one-hot ``x`` makes it a column scatter of ``g``), in
torch orientation, on the layer's device. ``G = that / T_l`` with ``T_l`` the number of valid tokens
of each layer: the mask that matches its input (:mod:`~lorainit.passes.masks`; docs/math.md).
Positions outside a layer's mask carry no loss, so their gradient is zero and only ``T_l`` depends
on the mask.

No parameter gets a ``.grad``: under FSDP2 nothing is reduce-scattered (the gradients are summed
over ranks by one bucketed all-reduce of the accumulators instead), and no base weight has to
require grad. With a process group every rank runs the same number of batches (a rank that ran
out repeats its first batch with the hooks off) and each forward and backward ends in an agreed
status (:mod:`lorainit.distributed`).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .. import distributed as dist_utils
from ..targets import LoRAInitError, TargetLayer
from .batches import count_positions
from .loss import LossRunner
from .masks import LayerMasks, count_rows
from .state import pass_state, progress_bar

__all__ = ["weight_grads"]


class _GradHooks:
    """Forward hooks on the base layers of ``names`` accumulating ``g^T x`` (m, n) fp32 per layer."""

    def __init__(self, targets: Dict[str, TargetLayer], names: Sequence[str]):
        self.acc = {n: torch.zeros(targets[n].m, targets[n].n, dtype=torch.float32, device=targets[n].device)
                    for n in names}
        self.ran = {n: False for n in names}
        self.kinds = {n: targets[n].kind for n in names}
        self.seen: List[Tuple[str, Tensor]] = []  # (layer, input) of this forward, for the per-layer token counts
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
            self.seen.append((name, x))
            if not output.requires_grad:
                output.requires_grad_(True)  # all parameters are frozen: start the graph here

            def grad_hook(g: Tensor):
                if self.active and self.error is None:
                    g2 = g.detach().reshape(-1, g.shape[-1]).float()
                    if not bool(torch.isfinite(g2).all()):
                        self.error = LoRAInitError(f"module {name!r}, batch {self.batch}: NaN/Inf in the weight "
                                                   f"gradient")
                    else:
                        self._accumulate(name, module, x, g2)
                        self.ran[name] = True
                return None

            output.register_hook(grad_hook)
            return None
        return hook

    def _accumulate(self, name: str, module: nn.Module, x: Tensor, g2: Tensor) -> None:
        """``acc += g^T x`` (m, n); for an embedding (one-hot ``x``) the columns of the tokens seen."""
        acc = self.acc[name]
        if self.kinds[name] == "embedding":
            ids = x.reshape(-1).to(acc.device)
            g2 = g2.to(acc.device)
            pad = getattr(module, "padding_idx", None)
            if pad is not None:  # autograd gives the padding row no gradient
                keep = ids != pad
                ids, g2 = ids[keep], g2[keep]
            acc.index_add_(1, ids, g2.t())
            return
        x2 = x.reshape(-1, x.shape[-1]).to(device=g2.device, dtype=torch.float32)
        if acc.device == g2.device:
            acc.addmm_(g2.t(), x2)  # one GEMM with beta = 1: no (m, n) temporary to add
        else:
            acc += (g2.t() @ x2).to(acc.device)

    def close(self):
        for h in self.handles:
            h.remove()
        self.handles.clear()


def weight_grads(model: nn.Module, targets: Dict[str, TargetLayer], names: Sequence[str], batches: Sequence[Any],
                 runner: LossRunner, *, progress: bool = False
                 ) -> Tuple[Dict[str, Tensor], int, Dict[str, int], Dict[str, Optional[str]]]:
    """``({name: (1/T_l) sum_t g_t x_t^T}, T, {name: T_l}, {name: mask used})`` over ``batches``, all-reduced.

    ``T_l`` is layer ``l``'s token count, ``T`` that of the batches' main mask. The model's ``.grad``
    fields and ``requires_grad`` flags are untouched.
    """
    tokens = 0
    layer_tokens = {n: 0 for n in names}
    lm = LayerMasks(model, targets, list(names))
    steps = dist_utils.all_reduce_max(len(batches))
    with pass_state(model, targets, train_mode=True):
        hooks = _GradHooks(targets, names)
        handles = lm.attach()
        bar = progress_bar(len(batches), "lorainit gradients", progress)
        try:
            for i in range(steps):
                real = i < len(batches)
                batch = batches[i] if real else batches[0]
                hooks.active, hooks.batch = real, i
                hooks.seen.clear()
                lm.begin_batch()
                err = loss = None
                with torch.enable_grad():
                    try:
                        loss, _, masks = runner.forward_masks(batch, i)
                        if hooks.error is not None:
                            raise hooks.error
                        if real:
                            for n, x in hooks.seen:
                                try:
                                    sel, _ = lm.select(n, x, masks)
                                except LoRAInitError as e:
                                    raise LoRAInitError(f"module {n!r}, batch {i}: {e}") from None
                                layer_tokens[n] += count_rows(sel, x, targets[n].kind)
                        hooks.seen.clear()
                        if not loss.requires_grad:
                            raise LoRAInitError(f"batch {i}: the loss does not depend on any LoRA target weight")
                    except Exception as e:
                        err = e
                    dist_utils.agree(err, f"gradient pass, batch {i}")
                    loss.backward()
                err = hooks.error
                if err is None and i == 0:
                    try:
                        runner.finish_check()  # the loss_fn reduction check, outside the batch's hooks
                    except Exception as e:
                        err = e
                dist_utils.agree(err, f"gradient pass, batch {i} (backward)")
                if real:
                    mask = masks.primary
                    tokens += int(mask.sum()) if mask is not None else count_positions(batch)
                    bar.update(1)
        finally:
            bar.close()
            hooks.close()
            for h in handles:
                h.remove()
    ran = torch.tensor([float(hooks.ran[n]) for n in names], dtype=torch.float64)
    counts = torch.tensor([float(tokens)] + [float(layer_tokens[n]) for n in names], dtype=torch.float64)
    dist_utils.all_reduce_sum(list(hooks.acc.values()) + [ran, counts])
    tokens = int(counts[0])
    layer_tokens = {n: int(c) for n, c in zip(names, counts[1:].tolist())}
    missing = [n for n, r in zip(names, ran.tolist()) if r == 0]
    if missing:
        raise LoRAInitError(f"module {missing[0]!r}: no gradient reached its weight in any batch"
                            f"{' on any rank' if dist_utils.is_distributed() else ''}")
    if tokens <= 0:
        raise LoRAInitError("no valid tokens in the samples")
    for n in names:
        if layer_tokens[n] <= 0:
            raise LoRAInitError(f"module {n!r} received no valid tokens in the gradient pass (it never ran, or every "
                                f"token was masked)")
    return ({n: a / layer_tokens[n] for n, a in hooks.acc.items()}, tokens, layer_tokens,
            {n: lm.label(n) for n in names})
