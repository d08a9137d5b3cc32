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

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
from torch import Tensor, nn

from lorainit_kernels.methods import LoRAFactors

from . import distributed as dist_utils
from . import quant as _quant
from .distributed import local, shard_of
from .targets import LoRAInitError, TargetLayer

__all__ = ["LoRAFactors", "ModuleState", "ModelSnapshot", "write_factors", "cpu_copy", "save_adapter",
           "save_for_original_base", "residual_base_state_dict"]

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
        self.quant: Dict[str, _quant.QuantSaved] = {}  # quantized bases: packed codes + quantization state

    def save_base(self, t: TargetLayer) -> None:
        """Keep the base weight of ``t`` (on the CPU) before its first modification (a quantized one as
        its packed codes and quantization state, restored exactly)."""
        if t.quant:
            if t.name not in self.quant:
                self.quant[t.name] = _quant.QuantSaved.save(t.base, cpu_copy)
        elif t.name not in self.base:
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
            for saved in self.quant.values():
                saved.restore()

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
def write_factors(targets: Dict[str, TargetLayer], factors: Dict[str, LoRAFactors],
                  snapshot: ModelSnapshot) -> Dict[str, Dict[str, float]]:
    """Check all factors, then write them (the caller restores ``snapshot`` if this raises).

    A ``base_delta`` on a quantized base (:mod:`lorainit.quant`) is added to the dequantized weight and
    the residual re-quantized, one layer at a time; returns ``{layer: {"requant_error", "init_weight_error"}}``
    for those layers (:func:`lorainit.quant.write_residual`), empty for a float model.
    """
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
    requant: Dict[str, Dict[str, float]] = {}
    for name, (lora_A, lora_B, base_delta) in checked.items():
        t = targets[name]
        local(t.lora_A).copy_(shard_of(t.lora_A, lora_A.to(t.lora_A.device)))
        local(t.lora_B).copy_(shard_of(t.lora_B, lora_B.to(t.lora_B.device)))
        if base_delta is not None:
            snapshot.save_base(t)
            if t.quant:
                update = t.scaling * (lora_B.to(torch.float32) @ lora_A.to(torch.float32))
                requant[name] = _quant.write_residual(t.base, base_delta, update)
                continue
            W = local(t.weight)  # stored orientation (W^T for Conv1D), this rank's shard
            delta = shard_of(t.weight, (base_delta.t() if t.transposed else base_delta).to(W.device))
            W.copy_((W.to(delta.dtype) + delta).to(W.dtype))
    return requant


# ----------------------------------------------------------------------------- saving
def residual_base_state_dict(peft_model) -> dict:
    """The base model's state dict as the plain model names it, with the init's base-weight changes and
    without the LoRA tensors: views of the live parameters, nothing copied.

    PEFT names a wrapped layer's weight ``<layer>.base_layer.weight``; the plain model names it
    ``<layer>.weight``. Every ``lora_*`` entry (and PEFT's per-adapter containers) is dropped.
    """
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    out = {}
    for key, value in base.state_dict(keep_vars=True).items():
        parts = key.split(".")
        if any(p.startswith("lora_") for p in parts):
            continue
        out[".".join(p for p in parts if p != "base_layer")] = value.detach()
    return out


def save_adapter(peft_model, out_dir: Union[str, "os.PathLike[str]"], report: Any, *, tokenizer=None,
                 base_model_name_or_path: Optional[str] = None) -> Path:
    """Save an initialized PEFT adapter so that it names the base model it belongs to.

    An init that rewrote base weights (``report.info["base_modified"]``: PiSSA, MiLoRA, LoRA-GA, any
    ``preserve_output``, ...) moved part of each ``W`` into the adapter, so the adapter reproduces the
    initialized model only on the *residual* base. Then the residual base model (no LoRA layers) is
    saved to ``out_dir/base_model`` (with ``tokenizer`` when given) and ``adapter_config.json`` names
    its absolute path as ``base_model_name_or_path``: ``AutoPeftModelForCausalLM.from_pretrained(out_dir)``
    loads the initialized model. Otherwise the adapter names ``base_model_name_or_path`` (an absolute
    path when it is a local directory) or PEFT's own record of the base. The report goes to
    ``out_dir/lorainit_report.json``. To use the trained adapter on the *original* base, convert it
    with :func:`save_for_original_base` (PEFT's ``path_initial_model_for_weight_conversion``; docs/saving.md).

    Returns ``out_dir`` as a Path. ``peft_model``'s own config is left as it was.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = getattr(report, "info", None)
    if not isinstance(info, dict) or "base_modified" not in info:
        raise LoRAInitError(f"save_adapter: report must be the InitReport that initialize_lora returned, got "
                            f"{type(report).__name__}")
    configs = getattr(peft_model, "peft_config", None)
    if not isinstance(configs, dict) or not hasattr(peft_model, "save_pretrained"):
        raise LoRAInitError(f"save_adapter: peft_model must be a PEFT model (get_peft_model(...)), got "
                            f"{type(peft_model).__name__}")
    if info["base_modified"]:
        base_dir = (out / "base_model").resolve()
        base = peft_model.get_base_model()
        base.save_pretrained(base_dir, state_dict=residual_base_state_dict(peft_model), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(base_dir)
        name = str(base_dir)
    elif base_model_name_or_path is not None:
        name = str(Path(base_model_name_or_path).resolve()) if Path(base_model_name_or_path).is_dir() \
            else str(base_model_name_or_path)
    else:
        name = None
    saved = {key: cfg.base_model_name_or_path for key, cfg in configs.items()}
    try:
        if name is not None:
            for cfg in configs.values():
                cfg.base_model_name_or_path = name
        peft_model.save_pretrained(out, safe_serialization=True)
    finally:
        for key, cfg in configs.items():
            cfg.base_model_name_or_path = saved[key]
    if hasattr(report, "to_json"):
        report.to_json(out / "lorainit_report.json")
    return out


def save_for_original_base(peft_model, out_dir: Union[str, "os.PathLike[str]"],
                           initial_dir: Union[str, "os.PathLike[str]"]) -> Path:
    """Save the trained adapter of an init that rewrote base weights as a plain LoRA adapter for the
    *original* base model, with PEFT's conversion (``save_pretrained(out_dir,
    path_initial_model_for_weight_conversion=...)``).

    ``initial_dir`` is the adapter saved right after the init (:func:`save_adapter`). The converted
    adapter has rank ``2r``: ``[lora_A; A_0]`` and ``[lora_B, -B_0]`` (scaling kept), so on the original
    ``W = W_res + sigma B_0 A_0`` it gives ``W_res + sigma B A``, the trained model. PEFT rewrites the
    config of the initial adapter it reads (naming the original base); the conversion reads a copy, so
    ``initial_dir`` keeps naming its residual base.
    """
    initial = Path(initial_dir)
    if not (initial / "adapter_config.json").is_file():
        raise LoRAInitError(f"save_for_original_base: initial_dir={str(initial)!r} has no adapter_config.json; pass "
                            f"the directory save_adapter wrote right after initialize_lora")
    out = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="lorainit-initial-") as tmp:
        copy = Path(tmp) / "initial"
        copy.mkdir()
        for f in initial.iterdir():
            if f.is_file() and f.name.startswith("adapter_"):
                shutil.copy2(f, copy / f.name)
        peft_model.save_pretrained(out, safe_serialization=True,
                                   path_initial_model_for_weight_conversion=str(copy))
    return out
