"""The model's state during a data pass, and the pass's progress bar.

Every pass freezes all parameters (except the base weights whose gradient it wants), disables the
LoRA branches (the statistics are those of the base model) and every source of randomness or state
update, and puts all of that back afterwards, also on error. Forward-only passes run in eval mode.
Passes with a backward (statistics, weight gradients) run with ``train_mode=True``: the model stays
in train mode, so transformers' gradient checkpointing (``if self.gradient_checkpointing and
self.training``) keeps working, and only the stochastic or stateful modules are switched to eval:
dropout modules (their ``p`` set to 0.0 too, since a parent may read it: GPT-2's attention passes
``attn_dropout.p if self.training`` to SDPA) and batch/instance norms that track running statistics; a module's float dropout
probability read through ``self.training`` (``attention_dropout`` of transformers' attention
modules, ``dropout`` of BART-style layers) is set to 0.0 for the pass instead, so such a module (it
may be a checkpointed decoder layer) stays in train mode.
The statistics are those of eval mode (no dropout), with the activation memory of training.
On exit FSDP2 modules are resharded (a no-grad forward leaves the root's parameters unsharded),
so reads and writes between passes see the sharded DTensors.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from .. import distributed as dist_utils
from ..adapters import ModuleState
from ..quant import no_cpu_repack
from ..targets import TargetLayer

__all__ = ["pass_state", "progress_bar", "deterministic_train_mode", "uses_gradient_checkpointing"]

_DROPOUT_ATTRS = ("attention_dropout", "attn_dropout", "dropout", "dropout_p", "attn_pdrop", "resid_pdrop",
                  "hidden_dropout", "dropout_rate")


def _stochastic(m: nn.Module) -> bool:
    """Whether ``m`` is a dropout module or a norm that updates running statistics in train mode."""
    return isinstance(m, nn.modules.dropout._DropoutNd) or (isinstance(m, _NormBase) and m.track_running_stats)


def deterministic_train_mode(model: nn.Module) -> list:
    """``model.train()``, eval mode on dropout / running-stat norm modules, float dropout probabilities set
    to 0.0; returns ``[(module, attr, old value)]`` for :func:`restore_dropout_attrs`."""
    model.train()
    changed = []
    for m in model.modules():
        if _stochastic(m):
            m.training = False
            if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
                changed.append((m, "p", m.p))  # parents read it too (GPT-2: attn_dropout.p if self.training)
                m.__dict__["p"] = 0.0
            continue
        for attr in _DROPOUT_ATTRS:
            v = m.__dict__.get(attr)
            if isinstance(v, float) and v > 0:
                changed.append((m, attr, v))
                m.__dict__[attr] = 0.0
    return changed


def _inputs_require_grad(model: nn.Module):
    """A forward hook making the input embeddings' output require grad (what transformers'
    ``enable_input_require_grads`` does): with every parameter frozen, a reentrant checkpointed layer
    would otherwise return outputs that do not require grad. Returns the handle, or None."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        emb = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        emb = None
    if not isinstance(emb, nn.Module):
        return None

    def hook(module, inputs, output):
        if isinstance(output, torch.Tensor) and torch.is_grad_enabled() and not output.requires_grad:
            output.requires_grad_(True)
    return emb.register_forward_hook(hook)


def restore_dropout_attrs(changed: list) -> None:
    for m, attr, v in changed:
        m.__dict__[attr] = v


def uses_gradient_checkpointing(model: nn.Module) -> bool:
    """Whether a module of ``model`` has transformers' ``gradient_checkpointing`` turned on."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


@contextlib.contextmanager
def pass_state(model: nn.Module, targets: Dict[str, TargetLayer], *, lora_enabled: bool = False,
               grad_weights: Sequence[str] = (), train_mode: bool = False):
    """Freeze every parameter (except the base weights of the targets ``grad_weights``), LoRA off, and
    eval mode (``train_mode``: train mode with the stochastic modules in eval, see the module docstring)."""
    saved = ModuleState(model)
    changed, hook = [], None
    repack = no_cpu_repack(model)  # eval-mode passes must not repack bitsandbytes 4-bit weights (lorainit.quant)
    repack.__enter__()
    try:
        for p, _, _ in saved.params:
            p.requires_grad_(False)
        for name in grad_weights:
            w = targets[name].weight
            w.grad = None
            w.requires_grad_(True)
        if train_mode:
            changed = deterministic_train_mode(model)
            if uses_gradient_checkpointing(model):
                hook = _inputs_require_grad(model)
        else:
            model.eval()
        for m, _ in saved.disable_flags:
            m._disable_adapters = not lora_enabled
        yield
    finally:
        if hook is not None:
            hook.remove()
        restore_dropout_attrs(changed)
        dist_utils.reshard(model)
        saved.restore()
        repack.__exit__(None, None, None)


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "batch"):
    """A tqdm bar over ``total`` items (a no-op bar when not ``enabled``)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, unit=unit)
