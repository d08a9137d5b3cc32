"""Find the PEFT LoRA layers of a model and describe each in torch orientation (docs/math.md).

A target is a PEFT ``LoraLayer`` whose base layer is an ``nn.Linear`` (weight ``(m, n)``), a
transformers ``Conv1D`` (GPT-2; weight stored transposed, ``(n, m)``) or an ``nn.Embedding``.
An embedding of ``vocab`` rows of size ``d`` is the linear layer ``y = W x`` with ``W = weight^T``
of shape ``(m, n) = (d, vocab)`` acting on one-hot inputs ``x``; PEFT's ``lora_embedding_A``
``(r, vocab)`` and ``lora_embedding_B`` ``(d, r)`` are then ``lora_A`` / ``lora_B`` of that view
(PEFT adds ``scaling * (B @ A)^T`` to ``weight``), so it is stored transposed, as Conv1D.
Nothing here depends on module names: the targets are exactly the layers PEFT wrapped according
to its config.

One adapter per call: with several *active* adapters ``find_targets`` asks for ``adapter=NAME``
(call ``initialize_lora`` once per adapter) instead of picking one silently.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from . import quant as _quant
from .distributed import full, is_dtensor
from .errors import LoRAInitError, LoRAInitWarning

__all__ = ["TargetLayer", "find_targets", "target_fingerprint", "LoRAInitError", "LoRAInitWarning"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D

        return Conv1D
    except Exception:  # transformers missing or broken: no Conv1D layers can exist then
        return None


def _lora_layer_class():
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError as err:  # pragma: no cover - peft is a declared optional dependency
        raise LoRAInitError(f"lorainit needs peft for LoRA models (pip install 'lorainit[peft]'): {err}") from err
    return LoraLayer


@dataclass
class TargetLayer:
    """One LoRA target: ``y = W x + b`` with ``W`` (m, n) in torch orientation and a rank-r adapter.

    ``scaling`` is PEFT's ``sigma`` (``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA), so
    the adapter adds ``sigma * lora_B @ lora_A`` to ``W``. ``transposed`` is True for ``Conv1D``,
    whose stored weight is ``W^T``. ``quant`` is ``"nf4"``/``"fp4"``/``"int8"`` for a bitsandbytes base
    layer (:mod:`lorainit.quant`: ``W`` is then its dequantized weight), else None.
    """

    name: str
    module: nn.Module  # the PEFT LoraLayer
    base: nn.Module  # its base layer (nn.Linear or Conv1D)
    adapter: str
    kind: str  # "linear", "conv1d" or "embedding"
    m: int
    n: int
    r: int
    lora_alpha: float
    scaling: float
    use_rslora: bool
    transposed: bool
    quant: Optional[str] = None

    @property
    def weight(self) -> nn.Parameter:
        return self.base.weight

    @property
    def lora_A(self) -> nn.Parameter:
        if self.kind == "embedding":
            return self.module.lora_embedding_A[self.adapter]
        return self.module.lora_A[self.adapter].weight

    @property
    def lora_B(self) -> nn.Parameter:
        if self.kind == "embedding":
            return self.module.lora_embedding_B[self.adapter]
        return self.module.lora_B[self.adapter].weight

    @property
    def dtype(self) -> torch.dtype:
        """The base weight's dtype; for a quantized base the float dtype it computes in."""
        return _quant.compute_dtype(self.base) if self.quant else self.base.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.base.weight.device

    @property
    def sharded(self) -> bool:
        """Whether the base weight is an FSDP2 ``DTensor`` (each rank holds a shard)."""
        return is_dtensor(self.base.weight)

    def weight_torch(self) -> Tensor:
        """The base weight ``W`` as an (m, n) view (transposed view for Conv1D); a DTensor when sharded."""
        w = self.base.weight
        return w.t() if self.transposed else w

    def read_weight(self) -> Tensor:
        """The full base weight ``W`` (m, n), detached. For an FSDP2 (DTensor) weight this gathers it:
        a collective that every rank makes for the same layers in the same order. A quantized base is
        dequantized (fp32, a fresh tensor)."""
        if self.quant:
            return _quant.dequantize(self.base)
        w = full(self.base.weight.detach())
        return w.t() if self.transposed else w

    def describe(self) -> dict:
        out = {"name": self.name, "kind": self.kind, "m": self.m, "n": self.n, "r": self.r,
               "lora_alpha": self.lora_alpha, "scaling": self.scaling, "use_rslora": self.use_rslora,
               "dtype": str(self.dtype).replace("torch.", "")}
        if self.quant:
            out["quant"] = self.quant
        return out


def _holds(layer: nn.Module, adapter: str) -> bool:
    return adapter in getattr(layer, "lora_A", {}) or adapter in getattr(layer, "lora_embedding_A", {})


def _active_adapter(model: nn.Module, layers: List[nn.Module], adapter: Optional[str]) -> str:
    if adapter is not None:
        return adapter
    names = set()
    for layer in layers:
        active = layer.active_adapters
        names.update(a for a in ([active] if isinstance(active, str) else active) if _holds(layer, a))
    if len(names) > 1:
        raise LoRAInitError(f"the model has several active LoRA adapters {sorted(names)}; lorainit initializes one "
                            f"adapter per call: pass adapter=NAME (once per adapter)")
    if len(names) == 1:
        return names.pop()
    active = getattr(model, "active_adapter", None)  # PeftModel / LoraModel
    if isinstance(active, str):
        return active
    raise LoRAInitError("the model has no active LoRA adapter; pass adapter=NAME")


def find_targets(model: nn.Module, adapter: Optional[str] = None) -> Dict[str, TargetLayer]:
    """The LoRA target layers of ``model`` (a PeftModel or any module with PEFT LoRA layers), by name.

    Raises LoRAInitError for a model without LoRA layers, a merged adapter, LoRA variants (DoRA, ...)
    and base layers lorainit cannot write (convolutions, quantized weights other than bitsandbytes
    ``Linear4bit``/``Linear8bitLt``, :mod:`lorainit.quant`).
    """
    LoraLayer = _lora_layer_class()
    Conv1D = _conv1d_class()
    lora_layers = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, LoraLayer)]
    if not lora_layers:
        raise LoRAInitError(f"{type(model).__name__} has no PEFT LoRA layers; wrap it first, e.g. "
                            f"peft.get_peft_model(model, LoraConfig(target_modules=[...]))")
    adapter = _active_adapter(model, [m for _, m in lora_layers], adapter)
    targets: Dict[str, TargetLayer] = {}
    for name, mod in lora_layers:
        if not _holds(mod, adapter):
            continue
        where = f"module {name!r} (adapter {adapter!r})"
        if getattr(mod, "merged", False):
            raise LoRAInitError(f"{where}: the adapter is merged into the base weight; call model.unmerge_adapter() first")
        if adapter in getattr(mod, "lora_variant", {}):
            variant = type(mod.lora_variant[adapter]).__name__
            raise LoRAInitError(f"{where}: LoRA variant {variant} (e.g. DoRA) is not supported; use plain LoRA")
        base = mod.get_base_layer()
        w = getattr(base, "weight", None)
        if Conv1D is not None and isinstance(base, Conv1D):
            kind, transposed = "conv1d", True
        elif isinstance(base, nn.Linear) and adapter in getattr(mod, "lora_A", {}):
            kind, transposed = "linear", False
        elif isinstance(base, nn.Embedding) and adapter in getattr(mod, "lora_embedding_A", {}):
            kind, transposed = "embedding", True
            scale = mod._get_embed_scale() if hasattr(mod, "_get_embed_scale") else None
            if scale is not None:
                raise LoRAInitError(f"{where}: scaled embedding {type(base).__name__} (embed_scale) is not supported; "
                                    f"its update is not a plain linear map of the one-hot input")
        else:
            raise LoRAInitError(f"{where}: base layer {type(base).__name__} is not supported; lorainit initializes "
                                f"LoRA on nn.Linear, transformers Conv1D and nn.Embedding layers")
        quant = _quant.quant_kind(base) if kind == "linear" else None
        if quant is not None:
            quant = _quant.check_quantized(base, where)
            if is_dtensor(w):
                raise LoRAInitError(f"{where}: sharded (FSDP2) bitsandbytes weights are not supported; initialize "
                                    f"the quantized model before sharding it")
        elif not isinstance(w, torch.Tensor) or w.dtype not in _FLOATS or w.dim() != 2 or \
                (type(w) not in (torch.Tensor, nn.Parameter) and not is_dtensor(w)):
            wt = type(w).__name__ if w is not None else "None"
            dt = getattr(w, "dtype", None)
            raise LoRAInitError(f"{where}: base layer {type(base).__module__}.{type(base).__name__} has a {wt} weight of "
                                f"dtype {dt}: quantized or packed base weights cannot be handled; use a float model")
        if w.is_meta:
            raise LoRAInitError(f"{where}: base weight is on the meta device (offloaded); load the model's weights first")
        if kind == "linear":
            m, n = base.out_features, base.in_features
        else:  # Conv1D: weight (n, m); Embedding: weight (vocab, d) = (n, m)
            n, m = w.shape
        if quant is None and tuple((w.t() if transposed else w).shape) != (m, n):
            raise LoRAInitError(f"{where}: base weight shape {tuple(w.shape)} does not match {kind} ({m}, {n})")
        if kind == "embedding":
            A, B = mod.lora_embedding_A[adapter], mod.lora_embedding_B[adapter]
        else:
            A, B = mod.lora_A[adapter].weight, mod.lora_B[adapter].weight
        r = int(mod.r[adapter])
        if tuple(A.shape) != (r, n) or tuple(B.shape) != (m, r):
            raise LoRAInitError(f"{where}: lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} are not ({r}, {n}) / ({m}, {r})")
        alpha = float(mod.lora_alpha[adapter])
        rs = bool(getattr(mod, "use_rslora", {}).get(adapter, False))
        scaling = float(mod.scaling[adapter])
        # sigma is read from the layer (lora_alpha / r, or / sqrt(r) with rsLoRA, times any set_scale).
        if scaling == 0:
            raise LoRAInitError(f"{where}: PEFT scaling is 0 (lora_alpha={alpha}); the adapter cannot represent any update")
        targets[name] = TargetLayer(name=name, module=mod, base=base, adapter=adapter, kind=kind, m=m, n=n, r=r,
                                    lora_alpha=alpha, scaling=scaling, use_rslora=rs, transposed=transposed,
                                    quant=quant)
    if not targets:
        raise LoRAInitError(f"no LoRA layer of {type(model).__name__} holds adapter {adapter!r}")
    return targets


def check_rank(targets: Dict[str, TargetLayer], method: str) -> None:
    """Every method here needs ``r <= min(m, n)``."""
    for t in targets.values():
        if t.r > min(t.m, t.n):
            raise LoRAInitError(f"{method}: module {t.name!r} has LoRA rank r={t.r} larger than min(m, n) = "
                                f"min({t.m}, {t.n}); lower r in the LoraConfig (rank_pattern) for this module")


def target_fingerprint(targets: Dict[str, TargetLayer]) -> List[tuple]:
    """What the ranks must agree on before any collective: each target's name, kind, shape, rank, scaling,
    dtypes, device type and whether it is sharded (``lorainit.distributed.agree_fingerprint``)."""
    return [(n, t.kind, t.m, t.n, t.r, t.scaling, str(t.dtype), str(t.lora_A.dtype), t.device.type, t.sharded,
             t.quant)
            for n, t in targets.items()]
