"""Transactional writes of LoRA factors into PEFT layers, with a snapshot that restores the model.

``ModelSnapshot`` records everything an initialization may touch: every parameter's
``requires_grad`` and ``.grad``, every module's train/eval mode and hook dictionaries, the LoRA
layers' adapter-disable flags, and the values of every target's ``lora_A``/``lora_B`` (base weights
are saved just before they are modified, **on the CPU** (pinned memory when CUDA is available), so
the rollback never doubles device memory: :func:`snapshot_bytes` is what it costs). ``restore()``
puts all of it back, so any error leaves the model exactly as before.

``write_factors`` checks every factor first (shapes, finiteness) and only then writes:
``lora_A.weight = lora_A``, ``lora_B.weight = lora_B`` (cast to the adapter's dtype) and, when a
method returns ``base_delta`` (m, n), ``W <- W + base_delta`` computed in fp32 (transposed for Conv1D).

FSDP2 models: every parameter may be a ``DTensor``. The snapshot keeps each rank's *local shard*
(restoring needs no communication), and a write cuts each full factor (identical on every rank,
broadcast by the owner of its solve) into this rank's shard of ``lora_A`` / ``lora_B`` / ``W``.
With a process group the checks end in an agreed status, so a failed check stops every rank
before any of them writes.
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import Tensor, nn

from lorainit_kernels.methods import LoRAFactors

from . import distributed as dist_utils
from .distributed import local, shard_of
from .targets import LoRAInitError, TargetLayer

__all__ = ["LoRAFactors", "ModuleState", "ModelSnapshot", "write_factors", "cpu_copy"]

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
               "_state_dict_hooks", "_load_state_dict_pre_hooks")


class ModuleState:
    """A model's ``requires_grad`` and ``.grad`` of every parameter, train/eval modes and LoRA disable flags."""

    def __init__(self, model: nn.Module):
        self.params = [(p, p.requires_grad, p.grad) for p in model.parameters()]
        self.modes = [(m, m.training) for m in model.modules()]
        self.disable_flags = [(m, m._disable_adapters) for m in model.modules() if hasattr(m, "_disable_adapters")]

    def restore(self) -> None:
        for p, rg, g in self.params:
            p.requires_grad_(rg)
            p.grad = g
        for m, training in self.modes:
            m.training = training
        for m, flag in self.disable_flags:
            m._disable_adapters = flag


def cpu_copy(t: Tensor) -> Tensor:
    """A CPU copy of ``t`` (a local shard for DTensors; pinned when CUDA is available and ``t`` lives on
    a GPU, for fast copies back)."""
    t = t.detach()
    if t.device.type == "cpu":
        return t.clone()
    pin = torch.cuda.is_available()
    out = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)
    out.copy_(t, non_blocking=False)
    return out


class ModelSnapshot:
    """Everything an initialization may change, recorded so that :meth:`restore` undoes it."""

    def __init__(self, model: nn.Module, targets: Dict[str, TargetLayer]):
        self.model = model
        self.targets = targets
        self.state = ModuleState(model)
        self.hooks = []
        for m in model.modules():
            for attr in _HOOK_DICTS:
                d = getattr(m, attr, None)
                if isinstance(d, dict):
                    self.hooks.append((d, dict(d)))
        self.lora = {}
        for name, t in targets.items():
            self.lora[name] = (cpu_copy(local(t.lora_A)), cpu_copy(local(t.lora_B)))
        self.base: Dict[str, Tensor] = {}

    def save_base(self, t: TargetLayer) -> None:
        """Keep the base weight of ``t`` (on the CPU) before its first modification."""
        if t.name not in self.base:
            self.base[t.name] = cpu_copy(local(t.weight))

    @torch.no_grad()
    def restore(self, *, values: bool = True) -> None:
        """Put back modes, hooks, requires_grad, grads, disable flags and (``values``) the weights."""
        self.state.restore()
        for d, saved in self.hooks:
            for k in [k for k in d if k not in saved]:
                del d[k]
            for k, v in saved.items():
                if k not in d:
                    d[k] = v
        if values:
            for name, (A, B) in self.lora.items():
                t = self.targets[name]
                local(t.lora_A).copy_(A)
                local(t.lora_B).copy_(B)
            for name, W in self.base.items():
                local(self.targets[name].weight).copy_(W)

    def restore_state(self) -> None:
        """Modes, hooks, requires_grad, grads and flags only (keep the written values)."""
        self.restore(values=False)


def _check(name: str, what: str, t, shape, dtype: torch.dtype) -> Tensor:
    """``t`` cast to ``dtype`` (the parameter's), with its shape checked and no NaN/Inf after the cast."""
    if not isinstance(t, Tensor):
        raise LoRAInitError(f"module {name!r}: {what} must be a tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise LoRAInitError(f"module {name!r}: {what} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    t = t.to(dtype)
    if not bool(torch.isfinite(t).all()):
        raise LoRAInitError(f"module {name!r}: {what} has NaN/Inf entries in {dtype} (overflow in the cast?)")
    return t


@torch.no_grad()
def write_factors(targets: Dict[str, TargetLayer], factors: Dict[str, LoRAFactors], snapshot: ModelSnapshot) -> None:
    """Check all factors, then write them (the caller restores ``snapshot`` if this raises)."""
    unknown = sorted(set(factors) - set(targets))
    if unknown:
        raise LoRAInitError(f"factors for modules that are not LoRA targets: {unknown[:5]}")
    checked = {}
    err = None
    try:
        for name, f in factors.items():
            t = targets[name]
            work = torch.promote_types(t.dtype, torch.float32)  # base update in >= fp32
            checked[name] = (_check(name, "lora_A", f.lora_A, (t.r, t.n), t.lora_A.dtype),
                             _check(name, "lora_B", f.lora_B, (t.m, t.r), t.lora_B.dtype),
                             None if f.base_delta is None else _check(name, "base_delta", f.base_delta, (t.m, t.n),
                                                                      work))
    except Exception as e:  # every rank stops here if any rank's check failed
        err = e
    dist_utils.agree(err, "checking the factors before writing them")
    for name, (lora_A, lora_B, base_delta) in checked.items():
        t = targets[name]
        local(t.lora_A).copy_(shard_of(t.lora_A, lora_A.to(t.lora_A.device)))
        local(t.lora_B).copy_(shard_of(t.lora_B, lora_B.to(t.lora_B.device)))
        if base_delta is not None:
            snapshot.save_base(t)
            W = local(t.weight)  # stored orientation (W^T for Conv1D), this rank's shard
            delta = shard_of(t.weight, (base_delta.t() if t.transposed else base_delta).to(W.device))
            W.copy_((W.to(delta.dtype) + delta).to(W.dtype))
