"""The key of a statistics request: what must match for a cache to be reused, and the words for a mismatch.

What must match (the *key*, computed on every call): the target names in order and each target's
``(kind, m, n)``; the statistics dtype and ``token_mask``; a fingerprint of the model (dtype, shape
and :data:`SAMPLES` evenly strided elements of every parameter that is not a LoRA parameter, names
normalized so that which layers PEFT wrapped does not matter; an FSDP2 ``DTensor`` is read through
its full tensor, one at a time: cheap even for a 7B model, it tells another model or checkpoint
apart, not one edited weight); the statistics samples (number of batches and examples, and a
hash of their contents, per rank); the loss (``loss_fn``'s qualified name, or the model's own,
and ``loss_reduction``). The LoRA ranks, scalings and method options are not part of the key: a
sweep over them reuses one cache. ``step_scale="auto"`` holds out some samples, so its statistics
samples differ from a numeric ``step_scale``'s and need their own cache file; a shuffling
dataloader gives other samples on every call, which the cache refuses (use ``shuffle=False`` or a
seeded sampler for the statistics).

:func:`differences` compares a cache's metadata (:mod:`lorainit.cache.store`) with a key and says
every difference in words, naming a parameter, a target or the setting to change.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .. import distributed as dist_utils
from ..passes.batches import count_examples
from ..targets import TargetLayer

__all__ = ["SAMPLES", "CacheKey", "cache_key", "model_fingerprint", "data_fingerprint", "differences",
           "name_examples"]

#: Evenly strided elements of each parameter that enter the model fingerprint.
SAMPLES = 1024


def _tensor_digest(t: Tensor, samples: int = SAMPLES) -> str:
    """dtype, shape and ``samples`` evenly strided elements of ``t`` (its full tensor if a DTensor), hashed."""
    t = dist_utils.full(t.detach())
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    if t.is_meta:
        h.update(b"meta")
        return h.hexdigest()
    flat = t.reshape(-1)
    n = flat.numel()
    k = min(n, samples)
    if k:
        idx = (torch.arange(k, dtype=torch.int64) * (n - 1)) // max(k - 1, 1)
        vals = flat[idx.to(flat.device)].cpu().contiguous()
        h.update(vals.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_fingerprint(model: nn.Module, samples: int = SAMPLES) -> Tuple[str, Dict[str, str]]:
    """``(fingerprint, {parameter: digest})`` of every parameter of ``model`` that is not a LoRA parameter.

    Names drop PEFT's ``base_layer`` segment, so the fingerprint does not depend on which layers
    carry an adapter. A DTensor parameter is gathered (a collective every rank makes in the same order).
    """
    per: Dict[str, str] = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        if any(q.startswith("lora_") for q in parts):
            continue
        per[".".join(q for q in parts if q != "base_layer")] = _tensor_digest(p, samples)
    h = hashlib.blake2b(digest_size=16)
    for name, d in per.items():
        h.update(f"{name}={d};".encode())
    return h.hexdigest(), per


def _hash_into(h, obj: Any, depth: int = 0) -> bool:
    """Feed ``obj`` (tensors, arrays, mappings, sequences, scalars) into ``h``; False if a part could not be hashed."""
    if depth > 20:
        h.update(b"<deep>")
        return False
    if isinstance(obj, Tensor):
        t = obj.detach()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        try:
            c = t.to_dense() if t.layout != torch.strided else t
            c = c.cpu().contiguous().reshape(-1)
            h.update(c.view(torch.uint8).numpy().tobytes() if c.numel() else b"")
        except (RuntimeError, TypeError):  # a tensor subclass without plain storage
            h.update(type(obj).__qualname__.encode())
            return False
        return True
    if isinstance(obj, Mapping):
        ok = True
        h.update(b"{")
        for k in sorted(obj, key=repr):
            h.update(repr(k).encode() + b":")
            ok = _hash_into(h, obj[k], depth + 1) and ok
        h.update(b"}")
        return ok
    if isinstance(obj, (list, tuple)):
        ok = True
        h.update(f"[{type(obj).__name__}".encode())
        for v in obj:
            ok = _hash_into(h, v, depth + 1) and ok
        h.update(b"]")
        return ok
    if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes)):
        h.update(f"{type(obj).__name__}:{obj!r}".encode())
        return True
    if type(obj).__module__ == "numpy" and hasattr(obj, "tobytes"):
        h.update(f"np{getattr(obj, 'dtype', '')}{getattr(obj, 'shape', '')}".encode())
        h.update(obj.tobytes())
        return True
    h.update(f"<{type(obj).__module__}.{type(obj).__qualname__}>".encode())
    return False


def data_fingerprint(batches: Sequence[Any]) -> Tuple[str, bool]:
    """``(hash, complete)`` of the batches' contents; ``complete`` is False when some object could only be
    hashed by its type (the key then relies on the batch and example counts for it)."""
    h = hashlib.blake2b(digest_size=16)
    ok = True
    for b in batches:
        ok = _hash_into(h, b) and ok
        h.update(b"|")
    return h.hexdigest(), ok


def _loss_name(loss_fn: Optional[Callable], loss_reduction: Optional[str]) -> str:
    if loss_fn is None:
        name = "the model's own loss"
    else:
        fn = getattr(loss_fn, "func", loss_fn)  # functools.partial
        name = f"{getattr(fn, '__module__', None) or type(fn).__module__}." \
               f"{getattr(fn, '__qualname__', None) or type(fn).__qualname__}"
    return f"{name} (loss_reduction={loss_reduction})"


@dataclass
class CacheKey:
    """What determines the statistics of one ``iter_stats`` request (compared with a cache's metadata)."""

    names: List[str]
    shapes: Dict[str, List[Any]]  # name -> [kind, m, n]
    stats_dtype: str
    token_mask: str
    model: str
    params: Dict[str, str]
    data: Dict[str, Any]  # batches, examples, fingerprint, complete, holdout, read_batches, read_examples, world_size
    loss: str
    backend: str = "auto"
    extras: Tuple[str, ...] = ()  # the optional statistics this request needs (a cache may hold more)
    write_extras: Tuple[str, ...] = ()  # what a cache written by this request holds (at least ``extras``)
    grads: bool = True  # whether the request needs G and s (a forward-only pass writes none)


def cache_key(model: nn.Module, targets: Dict[str, TargetLayer], names: Sequence[str], batches: Sequence[Any], *,
              all_batches: Optional[Sequence[Any]], dtype: torch.dtype, token_mask: str, loss_fn: Optional[Callable],
              loss_reduction: Optional[str], backend: str = "auto", extras: Sequence[str] = (),
              write_extras: Optional[Sequence[str]] = None, grads: bool = True) -> CacheKey:
    """The :class:`CacheKey` of a statistics request (collective with a process group: every rank calls it).

    ``all_batches`` are the samples the call read (``batches`` is a subset when a holdout was taken out).
    ``extras``: the optional statistics the request needs; ``write_extras``: those a cache it writes holds.
    """
    model_fp, params = model_fingerprint(model)
    model_fp = dist_utils.agree_fingerprint(model_fp, "the model's parameters (stats_cache fingerprint)")[0]
    digest, complete = data_fingerprint(batches)
    mine = (len(batches), count_examples(batches),
            len(all_batches) if all_batches is not None else len(batches),
            count_examples(all_batches) if all_batches is not None else count_examples(batches), digest, complete)
    per_rank = dist_utils.gather_objects(mine)
    h = hashlib.blake2b(digest_size=16)
    for r in per_rank:
        h.update(f"{r[0]},{r[1]},{r[4]};".encode())
    data = {"batches": sum(r[0] for r in per_rank), "examples": sum(r[1] for r in per_rank),
            "fingerprint": h.hexdigest() if len(per_rank) > 1 else digest,
            "complete": all(r[5] for r in per_rank),
            "holdout": any((r[0], r[1]) != (r[2], r[3]) for r in per_rank),
            "read_batches": sum(r[2] for r in per_rank), "read_examples": sum(r[3] for r in per_rank),
            "world_size": len(per_rank)}
    return CacheKey(names=list(names), shapes={n: [targets[n].kind, targets[n].m, targets[n].n] for n in names},
                    stats_dtype=str(dtype).replace("torch.", ""), token_mask=token_mask, model=model_fp,
                    params=params, data=data, loss=_loss_name(loss_fn, loss_reduction), backend=backend,
                    extras=tuple(extras), write_extras=tuple(extras if write_extras is None else write_extras),
                    grads=bool(grads))


def name_examples(items: Sequence[str], k: int = 3) -> str:
    """The first ``k`` of ``items`` quoted, and how many there are when there are more."""
    shown = ", ".join(repr(x) for x in items[:k])
    return shown + (f", ... ({len(items)} in all)" if len(items) > k else "")


def differences(meta: Dict[str, Any], key: CacheKey) -> List[str]:
    """What differs between a cache's metadata (of this format version) and this call's key, in words
    (empty: the cache matches)."""
    out: List[str] = []
    cached = list(meta["targets"])
    have, want = set(cached), set(key.names)
    if cached != key.names:
        missing = [n for n in key.names if n not in have]
        extra = [n for n in cached if n not in want]
        what = []
        if missing:
            what.append(f"{len(missing)} target(s) of this call are not in the cache (e.g. {name_examples(missing)})")
        if extra:
            what.append(f"the cache has {len(extra)} target(s) this call does not have (e.g. {name_examples(extra)})")
        if not missing and not extra:
            what.append("the same targets in another order")
        out.append("other targets: " + "; ".join(what))
    layers = meta["layers"]
    shapes = [f"{n!r} is {tuple(layers[n]['kind_m_n'])} in the cache, {tuple(key.shapes[n])} here"
              for n in key.names if n in have and list(layers[n]["kind_m_n"]) != list(key.shapes[n])]
    if shapes:
        out.append("other shapes (kind, m, n): " + "; ".join(shapes[:3]) + (" ..." if len(shapes) > 3 else ""))
    if meta["stats_dtype"] != key.stats_dtype:
        out.append(f"stats dtype {meta['stats_dtype']} in the cache, {key.stats_dtype} here (LoRADAConfig.stats_dtype)")
    if meta["token_mask"] != key.token_mask:
        out.append(f"token_mask {meta['token_mask']!r} in the cache, {key.token_mask!r} here")
    model = meta["model"]
    if model["fingerprint"] != key.model:
        params = model.get("params", {})
        gone = [p for p in params if p not in key.params]
        new = [p for p in key.params if p not in params]
        changed = [p for p in key.params if p in params and params[p] != key.params[p]]
        what = []
        if changed:
            what.append(f"{len(changed)} parameter(s) have other values, dtypes or shapes (e.g. {name_examples(changed)})")
        if new:
            what.append(f"this model has {len(new)} parameter(s) the cached one has not (e.g. {name_examples(new)})")
        if gone:
            what.append(f"the cached model had {len(gone)} parameter(s) this one has not (e.g. {name_examples(gone)})")
        out.append("another model (fingerprint of its base weights " + model["fingerprint"] + " in the cache, "
                   + key.model + " here: " + ("; ".join(what) or "parameters in another order") + ")")
    d, k = meta["data"], key.data
    if (d["batches"], d["examples"]) != (k["batches"], k["examples"]):
        hint = ""
        if d.get("holdout") != k["holdout"]:
            hint = (" (the cache's samples had held-out batches taken out, this call's have not: step_scale='auto' "
                    "and a numeric step_scale need separate caches)" if d.get("holdout") else
                    " (this call holds out some samples, the cache's did not: step_scale='auto' and a numeric "
                    "step_scale need separate caches)")
        out.append(f"other statistics samples: {d['batches']} batches / {d['examples']} examples in the cache, "
                   f"{k['batches']} / {k['examples']} here{hint}")
    elif d["fingerprint"] != k["fingerprint"]:
        ws = ""
        if d.get("world_size") != k["world_size"]:
            ws = f"; the cache was written by {d.get('world_size')} process(es), this call runs {k['world_size']}"
        out.append("other statistics samples: same counts, other contents (a shuffling dataloader gives other "
                   f"samples on each call: use shuffle=False or a seeded sampler for the statistics{ws})")
    if meta["loss"] != key.loss:
        out.append(f"another loss: {meta['loss']} in the cache, {key.loss} here")
    if key.grads and not meta.get("grads", True):
        out.append("the cache holds no gradient statistics G, s (it was written by a forward-only pass: eva, "
                   "corda or astra); this method needs them (a cache written by a gradient method, e.g. lora_da, "
                   "serves the forward-only methods too)")
    lacking = [e for e in key.extras if e not in meta.get("extras", [])]
    if lacking:
        out.append(f"the cache lacks the statistics {lacking} this method needs (it holds "
                   f"{meta.get('extras', [])}; a cache written by a method that needs them, e.g. astra for "
                   f"'output_cov', serves every method)")
    return out
