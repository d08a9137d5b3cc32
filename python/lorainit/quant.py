"""Quantized base layers (bitsandbytes ``Linear4bit`` nf4/fp4 and ``Linear8bitLt``): read, re-quantize, restore.

A QLoRA model keeps its base weights quantized; PEFT wraps them in ``peft.tuners.lora.bnb``'s
``Linear4bit`` / ``Linear8bitLt`` LoRA layers. lorainit treats such a base layer as the linear map
``y = deq(Q) x + b`` it computes, where ``deq(Q)`` is the dequantized weight (m, n):

* 4-bit (Dettmers et al., 2023, "QLoRA", arXiv 2305.14314): blockwise absmax quantization of ``W``
  to nf4 or fp4 codes, ``deq(Q) = code[q] * absmax[block]`` (absmax itself 8-bit quantized when
  ``compress_statistics``/double quantization is on); read with ``bitsandbytes.functional.dequantize_4bit``.
* 8-bit (Dettmers et al., 2022, "LLM.int8()", arXiv 2208.07339): row-wise absmax,
  ``deq(Q) = CB * SCB[:, None] / 127``; read with ``bitsandbytes.functional.int8_vectorwise_dequant``.

The statistics and gradient passes run through the quantized forward unchanged (the statistics
are those of the model being fine-tuned). A method that rewrites the base weight (a ``base_delta``:
PiSSA, MiLoRA, LoRA-GA, ``preserve_output``, ...) gets, one layer at a time, ``W_res = deq(Q) + delta``
re-quantized with the layer's own settings (quant type, block size, double quantization, storage
dtype; row-wise int8 for 8-bit): :func:`requantize`. The adapter then sits on ``deq(Q(W_res))``,
not on ``W_res``, so "the output is unchanged at initialization" holds only up to that rounding
(the idea LoftQ, Li et al. 2023, arXiv 2310.08659, turns into an objective); :func:`write_residual`
measures it per layer.

Only one layer is ever dequantized at a time: no full-precision copy of the model is made here.
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional

import torch
from torch import Tensor, nn

from .errors import LoRAInitError

__all__ = ["QLORA_HINT", "require_bitsandbytes", "quant_kind", "check_quantized", "compute_dtype", "dequantize",
           "requantize", "QuantSaved", "write_residual", "no_cpu_repack", "is_quantized_model", "quantize_linears"]

QLORA_HINT = "pip install 'lorainit[qlora]' (bitsandbytes>=0.45)"


def require_bitsandbytes(what: str = "quantized (bitsandbytes) base layers"):
    """``bitsandbytes``, or an ImportError naming the ``lorainit[qlora]`` extra."""
    try:
        import bitsandbytes
    except ImportError as err:
        raise ImportError(f"lorainit: {what} need bitsandbytes: {QLORA_HINT}") from err
    return bitsandbytes


def quant_kind(base: nn.Module) -> Optional[str]:
    """``"nf4"``/``"fp4"`` (bitsandbytes ``Linear4bit``), ``"int8"`` (``Linear8bitLt``) or None (not bitsandbytes).

    bitsandbytes is not imported here: a model can only hold its layers if it was imported already.
    """
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return None
    if isinstance(base, bnb.nn.Linear4bit):
        qs = getattr(base.weight, "quant_state", None)
        kind = str(getattr(qs, "quant_type", None) or getattr(base.weight, "quant_type", "fp4"))
        if kind not in ("nf4", "fp4"):
            raise LoRAInitError(f"{type(base).__name__} has unknown 4-bit quant_type {kind!r}")
        return kind
    if isinstance(base, bnb.nn.Linear8bitLt):
        return "int8"
    return None


def _scb(base: nn.Module) -> Optional[Tensor]:
    """The row scales of an 8-bit layer: on the weight until the first forward, then on ``base.state``."""
    scb = getattr(base.weight, "SCB", None)
    if scb is None:
        scb = getattr(getattr(base, "state", None), "SCB", None)
    return scb


def check_quantized(base: nn.Module, where: str) -> str:
    """The quantization kind of ``base``, or LoRAInitError (naming ``where``) for a state lorainit cannot read."""
    kind = quant_kind(base)
    w = base.weight
    name = f"{type(base).__module__}.{type(base).__name__}"
    if kind in ("nf4", "fp4"):
        qs = getattr(w, "quant_state", None)
        if qs is None or not getattr(w, "bnb_quantized", True):
            raise LoRAInitError(f"{where}: {name} is not quantized yet (no quant_state); move the model to its "
                                f"device (model.to('cpu') / .cuda()) so bitsandbytes quantizes it, then initialize")
        if getattr(qs, "packing_format_for_cpu", False):
            raise LoRAInitError(f"{where}: {name} was repacked by bitsandbytes for CPU inference (an eval-mode forward "
                                f"without gradients on an AVX512-BF16 CPU); reload the model, or call lorainit before "
                                f"any inference (lorainit.models.load_smollm2(quantize=...) turns the repacking off)")
        if tuple(qs.shape) != (base.out_features, base.in_features):
            raise LoRAInitError(f"{where}: {name} quant_state.shape {tuple(qs.shape)} is not (out_features, "
                                f"in_features) = ({base.out_features}, {base.in_features})")
        return kind
    if kind == "int8":
        if w.dtype != torch.int8:
            raise LoRAInitError(f"{where}: {name} keeps its weight in {w.dtype} (has_fp16_weights=True, quantized "
                                f"on every forward); lorainit supports Linear8bitLt with has_fp16_weights=False")
        if _scb(base) is None:
            raise LoRAInitError(f"{where}: {name} has int8 weights but no row scales (SCB); move the model to its "
                                f"device so bitsandbytes quantizes it, then initialize")
        if tuple(w.shape) != (base.out_features, base.in_features):
            raise LoRAInitError(f"{where}: {name} int8 weight {tuple(w.shape)} is not (out_features, in_features)")
        return kind
    raise LoRAInitError(f"{where}: {name} is not a bitsandbytes Linear4bit/Linear8bitLt layer")


def compute_dtype(base: nn.Module) -> torch.dtype:
    """The float dtype the layer computes in: ``compute_dtype`` when set, else the dtype it was quantized from."""
    cd = getattr(base, "compute_dtype", None)
    if isinstance(cd, torch.dtype) and cd.is_floating_point:
        return cd
    qs = getattr(base.weight, "quant_state", None)
    if qs is not None and isinstance(getattr(qs, "dtype", None), torch.dtype):
        return qs.dtype
    bias = getattr(base, "bias", None)
    return bias.dtype if isinstance(bias, Tensor) and bias.dtype.is_floating_point else torch.float32


@torch.no_grad()
def dequantize(base: nn.Module) -> Tensor:
    """``deq(Q)``: the weight (m, n) the quantized layer multiplies by, in fp32 (a fresh tensor, one layer)."""
    require_bitsandbytes()
    import bitsandbytes.functional as F

    kind = quant_kind(base)
    w = base.weight
    if kind in ("nf4", "fp4"):
        return F.dequantize_4bit(w.data, w.quant_state).float().reshape(base.out_features, base.in_features)
    if kind == "int8":
        return F.int8_vectorwise_dequant(w.data, _scb(base)).float()
    raise LoRAInitError(f"{type(base).__name__} is not a bitsandbytes quantized layer")


@dataclass
class QuantSaved:
    """The quantized state of one layer, exactly: packed data (a CPU copy) and its quantization state
    object (4-bit; replaced, never mutated, by :func:`requantize`) or row scales (8-bit)."""

    base: nn.Module
    data: Tensor
    quant_state: Any = None
    module_quant_state: Any = None
    scb: Optional[Tensor] = None

    @classmethod
    def save(cls, base: nn.Module, copy) -> "QuantSaved":
        w = base.weight
        if quant_kind(base) == "int8":
            return cls(base, copy(w.data), scb=copy(_scb(base)))
        return cls(base, copy(w.data), quant_state=w.quant_state, module_quant_state=getattr(base, "quant_state", None))

    @torch.no_grad()
    def restore(self) -> None:
        w = self.base.weight
        w.data.copy_(self.data.to(w.device))
        if self.scb is not None:
            _scb(self.base).copy_(self.scb.to(w.device))
        else:
            w.quant_state = self.quant_state
            if hasattr(self.base, "quant_state"):
                self.base.quant_state = self.module_quant_state

    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + (0 if self.scb is None else self.scb.numel() * 4)


@torch.no_grad()
def requantize(base: nn.Module, W: Tensor) -> None:
    """Quantize ``W`` (m, n) into ``base`` in place with the layer's own settings.

    4-bit: ``quantize_4bit`` with the quant_state's quant type, block size and double quantization
    (``nested``) and the packed data's storage dtype, from ``W`` cast to the dtype the layer was
    quantized from; the packed codes are copied into the existing parameter and the new quant state
    replaces the old (on the parameter and on the module). 8-bit: ``int8_vectorwise_quant`` of the fp16
    ``W`` (as bitsandbytes quantizes ``Linear8bitLt``), codes and row scales copied in place.
    """
    require_bitsandbytes()
    import bitsandbytes.functional as F

    kind = quant_kind(base)
    w = base.weight
    if kind in ("nf4", "fp4"):
        qs = w.quant_state
        packed, new_qs = F.quantize_4bit(W.to(device=w.device, dtype=qs.dtype).contiguous(), blocksize=qs.blocksize,
                                         compress_statistics=bool(qs.nested), quant_type=qs.quant_type,
                                         quant_storage=w.data.dtype)
        if packed.shape != w.data.shape:
            raise LoRAInitError(f"{type(base).__name__}: re-quantized weight has packed shape {tuple(packed.shape)}, "
                                f"the layer's is {tuple(w.data.shape)}")
        w.data.copy_(packed)
        w.quant_state = new_qs
        if getattr(base, "quant_state", None) is not None:
            base.quant_state = new_qs
        return
    if kind == "int8":
        CB, SCB, _ = F.int8_vectorwise_quant(W.to(device=w.device, dtype=torch.float16).contiguous())
        w.data.copy_(CB)
        _scb(base).copy_(SCB.to(_scb(base).dtype))
        return
    raise LoRAInitError(f"{type(base).__name__} is not a bitsandbytes quantized layer")


@torch.no_grad()
def write_residual(base: nn.Module, delta: Tensor, adapter_update: Tensor) -> Dict[str, float]:
    """``W_res = deq(Q) + delta`` re-quantized into ``base``; returns the per-layer errors for the report.

    ``adapter_update`` is ``sigma * lora_B @ lora_A`` (m, n) as written. With ``W_q = deq(Q)`` before and
    ``W_new = deq(Q(W_res))`` after:

    * ``requant_error = ||W_new - W_res||_F / ||W_res||_F`` (the re-quantization error of the residual);
    * ``init_weight_error = ||W_new + adapter_update - W_q||_F / ||W_q||_F``: how far the effective weight
      at initialization is from the original quantized weight (0 for a float model with a
      preserve-output method; here the residual's rounding, plus ``delta + adapter_update`` for a method
      that does not preserve the output).
    """
    W_q = dequantize(base)
    W_res = W_q + delta.to(device=W_q.device, dtype=torch.float32)
    requantize(base, W_res)
    W_new = dequantize(base)
    res_norm = float(torch.linalg.vector_norm(W_res)) or 1.0
    q_norm = float(torch.linalg.vector_norm(W_q)) or 1.0
    err = float(torch.linalg.vector_norm(W_new - W_res)) / res_norm
    W_new += adapter_update.to(device=W_new.device, dtype=torch.float32)
    W_new -= W_q
    return {"requant_error": err, "init_weight_error": float(torch.linalg.vector_norm(W_new)) / q_norm}


def is_quantized_model(model: nn.Module) -> bool:
    """Whether ``model`` holds any bitsandbytes ``Linear4bit``/``Linear8bitLt`` layer."""
    return "bitsandbytes" in sys.modules and any(quant_kind(m) is not None for m in model.modules())


@contextlib.contextmanager
def no_cpu_repack(model: nn.Module) -> Iterator[None]:
    """Keep bitsandbytes from repacking 4-bit weights for CPU inference while lorainit's passes run.

    On CPUs with AVX512-BF16, ``Linear4bit.forward`` in eval mode without gradients converts the
    weight, once and in place, to a bf16-scaled packed layout (a different numerical path from the
    one training uses, and a change to the user's model). The passes run in eval mode, so each
    layer's ``support_avx512bf16_for_cpu`` is set to False for their duration and restored after.
    """
    changed: List[nn.Module] = []
    bnb = sys.modules.get("bitsandbytes")
    if bnb is not None:
        for m in model.modules():
            if isinstance(m, bnb.nn.Linear4bit) and getattr(m, "support_avx512bf16_for_cpu", False):
                m.support_avx512bf16_for_cpu = False
                changed.append(m)
    try:
        yield
    finally:
        for m in changed:
            m.support_avx512bf16_for_cpu = True


@torch.no_grad()
def quantize_linears(model: nn.Module, quantize: str = "nf4", *, skip=("lm_head",), double_quant: bool = True,
                     compute_dtype: Optional[torch.dtype] = None, cpu_repack: bool = False) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (except modules whose name ends with one of ``skip``) by a
    bitsandbytes ``Linear4bit`` (``quantize="nf4"``/``"fp4"``, block size 64, double quantization with
    ``double_quant``: QLoRA's storage) or ``Linear8bitLt`` (``"int8"``, ``has_fp16_weights=False``), in place,
    on the layer's device. ``compute_dtype`` defaults to each layer's weight dtype.

    ``cpu_repack=False`` keeps bitsandbytes from repacking 4-bit weights for CPU inference on the first
    eval-mode forward (see :func:`no_cpu_repack`), so evaluation and training use one numerical path.
    Sets ``model.is_loaded_in_4bit`` (or ``is_loaded_in_8bit``) as transformers does, so that PEFT wraps
    the layers in its ``lora.bnb`` LoRA layers. Returns ``model``. What ``transformers``'
    ``BitsAndBytesConfig`` does at load time, for a model already in memory (one layer at a time:
    never a second full-precision copy).
    """
    if quantize not in ("nf4", "fp4", "int8"):
        raise ValueError(f"quantize must be 'nf4', 'fp4' or 'int8', got {quantize!r}")
    bnb = require_bitsandbytes(f"quantize={quantize!r}")
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and not any(n.endswith(s) for s in skip)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        lin = getattr(parent, child)
        w, dev = lin.weight.data, lin.weight.device
        bias = lin.bias is not None
        if quantize == "int8":
            q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=bias, has_fp16_weights=False,
                                    threshold=0.0, device="meta")
            q.weight = bnb.nn.Int8Params(w.to(torch.float16), requires_grad=False, has_fp16_weights=False)
        else:
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=bias, device="meta",
                                  compute_dtype=compute_dtype or w.dtype, compress_statistics=double_quant,
                                  quant_type=quantize)
            q.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=double_quant,
                                         quant_type=quantize, module=q)
            q.support_avx512bf16_for_cpu = q.support_avx512bf16_for_cpu and cpu_repack
        if bias:
            q.bias = nn.Parameter(lin.bias.data, requires_grad=lin.bias.requires_grad)
        q = q.to(dev)  # bitsandbytes quantizes on the move to a device
        q.train(lin.training)
        setattr(parent, child, q)
        del lin, w
    # what transformers' quantizer sets, and what PEFT reads to wrap these layers in its bnb LoRA layers
    if quantize == "int8":
        model.is_loaded_in_8bit = True
    else:
        model.is_loaded_in_4bit = True
    return model
