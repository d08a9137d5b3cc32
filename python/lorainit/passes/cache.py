"""The statistics cache: ``initialize_lora(..., stats_cache=PATH)`` saves the K-FAC statistics and reuses them.

A sweep over ranks, step sizes or ablations on a large model pays the statistics pass once:
:meth:`lorainit.context.InitContext.iter_stats` (so every method that uses K-FAC statistics)
goes through :func:`cached_stats`:

* ``PATH`` does not exist: the passes run as usual and their statistics (the **means** ``Z, G, s``
  that ``iter_stats`` yields, written before they are yielded, since consumers free them) are saved.
* ``PATH`` exists and matches this call: the statistics are read from it, no statistics pass runs
  (``report.info["stats_cache"] = {"path", "hit": True, ...}``, ``info["passes"] = 0``).
* ``PATH`` exists and does not match: :class:`~lorainit.errors.LoRAInitError` naming every
  difference; a cache is never overwritten and never silently recomputed (delete it or pass another path).

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
seeded sampler for the statistics). The held-out batches of ``step_scale="auto"`` are not cached:
its step search still runs its forward passes on them.

File format (``safetensors``): tensors ``"<target>/G"`` (m, n), ``"<target>/s"`` (m,) and
``"<owner>/Z"`` once per input (``z_owner``: targets sharing an input share one ``Z``; (n,) token
frequencies for an embedding target), in the statistics dtype (``G`` and ``s`` only when the pass
computed gradients: metadata ``grads``; a forward-only pass for EVA/CorDA/Astra writes none, and a
gradient method refuses such a cache naming why), and the optional statistics the
metadata's ``extras`` lists: ``"<owner>/mu"`` (n,) the input mean (every cache written holds it,
:data:`CACHED_EXTRAS`; an embedding's is its ``Z``) and ``"<target>/Y"`` (m, m) the output second moment
(written when the method that built the cache asked for it, Astra); a request needing an extra the
cache lacks is a mismatch naming it. The safetensors metadata key
:data:`META_KEY` holds a JSON object: format and :data:`VERSION`, ``cache_id``, the targets in
order, per target ``kind, m, n, z_owner, tokens, token_mask`` (the mask its statistics used) and
its file, ``stats_examples``, ``stats_dtype``, ``token_mask``, the samples (``batches``,
``examples``, their hash, ``holdout``: whether the call had held some of the samples out,
``world_size``), ``loss``, ``backend``, ``passes`` and the model fingerprint (with one digest per
parameter, so a mismatch names a parameter). Statistics computed in one pass go into ``PATH``
itself. Under a memory budget (``k > 1`` passes) pass ``i`` is written to
``<stem>.pass-<i>-of-<k><suffix>`` beside ``PATH`` as soon as it is computed, and ``PATH`` holds
the metadata only; a hit reads the groups of the *current* budget (re-planned from the cached
``z_owner``) one at a time with ``safetensors.safe_open``, so a cache never needs all statistics in
memory when a budget asks for groups. Files are written tensor by tensor (one tensor's host copy
at a time) to a temporary name and renamed; the main file is renamed last, before the last group
is yielded, so a consumer failing later keeps a complete cache, and a call failing before that
removes every file it wrote (no partial cache is left behind).

Distributed: every rank computes the key (the sample hashes are gathered, so the key covers the
union of the ranks' samples and their split); rank 0 decides hit or miss, writes the files after
the statistics' all-reduce, and every rank reads a hit (``PATH`` must be on a shared filesystem);
an error on one rank raises on every rank.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .. import distributed as dist_utils
from ..errors import LoRAInitError
from ..targets import TargetLayer
from .batches import count_examples
from .stats import LayerStats, StatsPass

__all__ = ["FORMAT", "VERSION", "CACHED_EXTRAS", "META_KEY", "SAMPLES", "CacheKey", "check_path", "cache_key", "model_fingerprint",
           "data_fingerprint", "cached_stats", "cache_files"]

FORMAT = "lorainit.stats_cache"
#: Version of the file layout; a cache of another version is refused (naming both).
VERSION = 1
#: The optional statistics every cache written holds beside ``Z, G, s`` (the input mean costs O(T n), so a
#: cache written for LoRA-DA also serves EVA); ``"output_cov"`` (m^2 per layer) only when the method asks.
CACHED_EXTRAS = ("mean",)
#: The safetensors metadata key holding the cache's JSON metadata.
META_KEY = "lorainit_stats_cache"
#: Evenly strided elements of each parameter that enter the model fingerprint.
SAMPLES = 1024

_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32"}
_HINT = "delete {files} or pass another stats_cache path (a cache is never overwritten)"

PathLike = Union[str, "os.PathLike[str]"]


def check_path(path: Any) -> Path:
    """``path`` as a :class:`~pathlib.Path` (``LoRAInitError`` for a non-path, a directory or a missing parent)."""
    if isinstance(path, bool) or not isinstance(path, (str, os.PathLike)) or not str(os.fspath(path)).strip():
        raise LoRAInitError(f"stats_cache must be a file path (str or os.PathLike), got {path!r}")
    p = Path(os.fspath(path)).expanduser()
    if p.is_dir():
        raise LoRAInitError(f"stats_cache {str(p)!r} is a directory; pass a file path such as {str(p / 'stats.safetensors')!r}")
    if not p.parent.is_dir():
        raise LoRAInitError(f"stats_cache {str(p)!r}: its directory {str(p.parent)!r} does not exist")
    return p


# ------------------------------------------------------------------------------------------ the key
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


def _examples(items: Sequence[str], k: int = 3) -> str:
    shown = ", ".join(repr(x) for x in items[:k])
    return shown + (f", ... ({len(items)} in all)" if len(items) > k else "")


def _differences(meta: Dict[str, Any], key: CacheKey) -> List[str]:
    """What differs between a cache's metadata and this call's key, in words (empty: the cache matches)."""
    if meta.get("version") != VERSION:
        return [f"format version {meta.get('version')!r} (this lorainit reads version {VERSION})"]
    out: List[str] = []
    cached = list(meta["targets"])
    have, want = set(cached), set(key.names)
    if cached != key.names:
        missing = [n for n in key.names if n not in have]
        extra = [n for n in cached if n not in want]
        what = []
        if missing:
            what.append(f"{len(missing)} target(s) of this call are not in the cache (e.g. {_examples(missing)})")
        if extra:
            what.append(f"the cache has {len(extra)} target(s) this call does not have (e.g. {_examples(extra)})")
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
            what.append(f"{len(changed)} parameter(s) have other values, dtypes or shapes (e.g. {_examples(changed)})")
        if new:
            what.append(f"this model has {len(new)} parameter(s) the cached one has not (e.g. {_examples(new)})")
        if gone:
            what.append(f"the cached model had {len(gone)} parameter(s) this one has not (e.g. {_examples(gone)})")
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


# ------------------------------------------------------------------------------------------ files
def _part_name(path: Path, i: int, k: int) -> str:
    return f"{path.stem}.pass-{i}-of-{k}{path.suffix or '.safetensors'}"


def _write_safetensors(path: Path, tensors: Sequence[Tuple[str, Tensor]], metadata: Dict[str, str]) -> None:
    """Write a safetensors file tensor by tensor (one host copy of one tensor at a time; ``safetensors``'
    ``save_file`` would first serialize every tensor into one buffer), to a temporary name, then rename."""
    if sys.byteorder != "little":  # pragma: no cover - safetensors stores little-endian data
        raise LoRAInitError("stats_cache: writing a cache needs a little-endian machine")
    header: Dict[str, Any] = {"__metadata__": metadata}
    off = 0
    for key, t in tensors:
        if t.dtype not in _ST_DTYPES:
            raise LoRAInitError(f"stats_cache: cannot store {key!r} of dtype {t.dtype}")
        nbytes = t.numel() * t.element_size()
        header[key] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for _, t in tensors:
                c = t.detach().to("cpu").contiguous().reshape(-1)
                if c.numel():
                    f.write(c.view(torch.uint8).numpy().data)
                del c
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _open(path: Path):
    from safetensors import safe_open

    return safe_open(str(path), framework="pt", device="cpu")


def _read_meta(path: Path) -> Dict[str, Any]:
    """The JSON metadata of a lorainit cache file (LoRAInitError naming the file if it is not one)."""
    try:
        with _open(path) as f:
            md = f.metadata() or {}
    except Exception as err:  # safetensors raises its own SafetensorError (and OSError for unreadable files)
        raise LoRAInitError(f"stats_cache {str(path)!r} cannot be read as a safetensors file ({type(err).__name__}: "
                            f"{err}); it is corrupt or not a lorainit statistics cache: "
                            + _HINT.format(files=repr(str(path)))) from err
    try:
        meta = json.loads(md[META_KEY])
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format') if isinstance(meta, dict) else None!r}")
    except (KeyError, ValueError, TypeError) as err:
        raise LoRAInitError(f"stats_cache {str(path)!r} is a safetensors file but not a lorainit statistics cache "
                            f"(no valid {META_KEY!r} metadata: {err}): " + _HINT.format(files=repr(str(path)))) from err
    return meta


def cache_files(path: PathLike) -> List[Path]:
    """The files of the cache at ``path``: ``path`` and its per-pass files (what to delete to drop it)."""
    p = Path(os.fspath(path))
    try:
        meta = _read_meta(p)
    except LoRAInitError:
        return [p]
    return [p] + [p.parent / f for f in meta.get("parts", [])]


class _Reader:
    """A cache's metadata, checked against a key; loads the statistics of a group of targets on demand."""

    REQUIRED = ("targets", "layers", "stats_dtype", "token_mask", "model", "data", "loss", "stats_examples",
                "cache_id", "parts")

    def __init__(self, path: Path):
        self.path = path
        self.meta = _read_meta(path)
        self.files_text = ", ".join(repr(str(f)) for f in cache_files(path))
        missing = [k for k in self.REQUIRED if k not in self.meta] if self.meta.get("version") == VERSION else []
        if missing:
            raise LoRAInitError(f"stats_cache {str(path)!r}: its metadata lacks {missing} (corrupt): "
                                + _HINT.format(files=self.files_text))

    def check(self, key: CacheKey) -> None:
        try:
            diffs = _differences(self.meta, key)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise LoRAInitError(f"stats_cache {str(self.path)!r}: its metadata is incomplete or corrupt "
                                f"({type(err).__name__}: {err}): " + _HINT.format(files=self.files_text)) from err
        if diffs:
            raise LoRAInitError(f"stats_cache {str(self.path)!r} does not match this call: " + "; ".join(diffs)
                                + ". lorainit does not reuse statistics that do not match: "
                                + _HINT.format(files=self.files_text))
        for part in self.meta["parts"]:
            p = self.path.parent / part
            if not p.is_file():
                raise LoRAInitError(f"stats_cache {str(self.path)!r}: its per-pass file {str(p)!r} is missing: "
                                    + _HINT.format(files=self.files_text))
            pm = _read_meta(p)
            if pm.get("cache_id") != self.meta["cache_id"]:
                raise LoRAInitError(f"stats_cache {str(self.path)!r}: {str(p)!r} belongs to another cache: "
                                    + _HINT.format(files=self.files_text))

    @property
    def z_owner(self) -> Dict[str, str]:
        return {n: self.meta["layers"][n]["z_owner"] for n in self.meta["targets"]}

    def load(self, group: Sequence[str], targets: Dict[str, TargetLayer], dtype: torch.dtype) -> StatsPass:
        """The statistics of ``group`` (moved to each target's device), read lazily from the cache's files."""
        layers = self.meta["layers"]
        handles: Dict[str, Any] = {}

        def get(file: str, key: str, shape: Tuple[int, ...], device) -> Tensor:
            if file not in handles:
                handles[file] = _open(self.path.parent / file if file else self.path).__enter__()
            try:
                t = handles[file].get_tensor(key)
            except Exception as err:
                raise LoRAInitError(f"stats_cache {str(self.path)!r}: cannot read {key!r} from "
                                    f"{file or self.path.name!r} ({type(err).__name__}: {err}); the cache is corrupt: "
                                    + _HINT.format(files=self.files_text)) from err
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise LoRAInitError(f"stats_cache {str(self.path)!r}: {key!r} is {tuple(t.shape)} {t.dtype}, expected "
                                    f"{shape} {dtype}; the cache is corrupt: " + _HINT.format(files=self.files_text))
            return t.to(device, copy=True)  # storage of its own: the solve writes into it in place

        extras = self.meta.get("extras", [])
        try:
            zs: Dict[str, Tensor] = {}
            mus: Dict[str, Tensor] = {}
            out: Dict[str, LayerStats] = {}
            for name in group:
                L, t = layers[name], targets[name]
                owner = L["z_owner"]
                if owner not in zs:
                    o = targets[owner]
                    zshape = (o.n,) if o.kind == "embedding" else (o.n, o.n)
                    zs[owner] = get(layers[owner]["file"], f"{owner}/Z", zshape, o.device)
                    if "mean" in extras:
                        mus[owner] = zs[owner] if o.kind == "embedding" else \
                            get(layers[owner]["file"], f"{owner}/mu", (o.n,), o.device)
                grads = self.meta.get("grads", True)
                out[name] = LayerStats(name=name, Z=zs[owner],
                                       G=get(L["file"], f"{name}/G", (t.m, t.n), t.device) if grads else None,
                                       s=get(L["file"], f"{name}/s", (t.m,), t.device) if grads else None,
                                       count=int(L["tokens"]),
                                       z_owner=owner, diag=t.kind == "embedding", mu=mus.get(owner),
                                       Y=get(L["file"], f"{name}/Y", (t.m, t.m), t.device)
                                       if "output_cov" in extras else None)
            del zs, mus
        except LoRAInitError:
            raise
        except (KeyError, TypeError, ValueError) as err:
            raise LoRAInitError(f"stats_cache {str(self.path)!r}: its metadata is incomplete or corrupt "
                                f"({type(err).__name__}: {err}): " + _HINT.format(files=self.files_text)) from err
        finally:
            for h in handles.values():
                h.__exit__(None, None, None)
        return StatsPass(out, int(self.meta["stats_examples"]), 0.0, {n: layers[n]["token_mask"] for n in group})


def _lorainit_version() -> str:
    try:
        from importlib.metadata import version

        return version("lorainit")
    except Exception:  # not installed (a source tree on sys.path)
        return "unknown"


class _Writer:
    """Writes the statistics of each pass as it comes (rank 0), the main file last; removes what it wrote
    unless the cache was completed (:meth:`abort`)."""

    def __init__(self, path: Path, key: CacheKey):
        self.path, self.key = path, key
        self.cache_id = uuid.uuid4().hex
        self.layers: Dict[str, Dict[str, Any]] = {}
        self.parts: List[str] = []
        self.written: List[Path] = []
        self.done = 0
        self.committed = False
        self.examples = 0
        # fail now, before the statistics pass, when the directory is not writable
        try:
            fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=str(path.parent))
            os.close(fd)
            os.unlink(probe)
        except OSError as err:
            raise LoRAInitError(f"stats_cache {str(path)!r}: cannot write in {str(path.parent)!r} ({err})") from err

    def add(self, k: int, done: StatsPass) -> None:
        """Write pass ``done`` (one of ``k``); the last one also writes the main file (the cache is then complete)."""
        self.done += 1
        i = self.done
        file = "" if k == 1 else _part_name(self.path, i, k)
        tensors: List[Tuple[str, Tensor]] = []
        for name, st in done.stats.items():
            if st.z_owner not in done.stats:
                raise LoRAInitError(f"stats_cache: {name!r} shares Z with {st.z_owner!r}, which is not in the same pass")
            if st.z_owner == name:
                tensors.append((f"{name}/Z", st.Z))
                if "mean" in self.key.write_extras and not st.diag:  # an embedding's mean is its Z
                    tensors.append((f"{name}/mu", st.mu))
            if self.key.grads:
                tensors.append((f"{name}/G", st.G))
                tensors.append((f"{name}/s", st.s))
            if "output_cov" in self.key.write_extras:
                tensors.append((f"{name}/Y", st.Y))
            self.layers[name] = {"kind_m_n": self.key.shapes[name], "z_owner": st.z_owner, "tokens": int(st.count),
                                 "token_mask": (done.masks or {}).get(name), "file": file}
        self.examples = int(done.examples)
        target = self.path
        try:
            if k > 1:
                part = {"format": FORMAT, "version": VERSION, "cache_id": self.cache_id, "part": i, "of": k}
                target = self.path.parent / file
                _write_safetensors(target, tensors, {META_KEY: json.dumps(part)})
                self.written.append(target)
                self.parts.append(file)
                tensors = []
            if i == k:
                missing = [n for n in self.key.names if n not in self.layers]
                if missing:
                    raise LoRAInitError(f"stats_cache: the passes produced no statistics for {_examples(missing)}")
                target = self.path
                _write_safetensors(self.path, tensors, {META_KEY: json.dumps(self._meta(k))})
                self.committed = True
        except OSError as err:
            raise LoRAInitError(f"stats_cache {str(self.path)!r}: writing {str(target)!r} failed ({err}); nothing "
                                f"was kept and the model is unchanged") from err
        finally:
            del tensors

    def _meta(self, k: int) -> Dict[str, Any]:
        key = self.key
        return {"format": FORMAT, "version": VERSION, "lorainit": _lorainit_version(), "cache_id": self.cache_id,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "targets": key.names,
                "layers": {n: self.layers[n] for n in key.names}, "stats_dtype": key.stats_dtype,
                "token_mask": key.token_mask, "stats_examples": self.examples, "passes": k, "parts": self.parts,
                "extras": list(key.write_extras), "grads": key.grads,
                "data": key.data, "loss": key.loss, "backend": key.backend,
                "model": {"fingerprint": key.model, "params": key.params}}

    def abort(self) -> None:
        if self.committed:
            return
        for p in self.written:
            try:
                p.unlink()
            except OSError:
                pass
        self.written = []


# ------------------------------------------------------------------------------------------ the protocol
def cached_stats(path: Path, key: CacheKey, targets: Dict[str, TargetLayer], *,
                 compute: Callable[[], Iterator[Tuple[int, StatsPass]]],
                 plan: Callable[[Dict[str, str]], List[List[str]]], dtype: torch.dtype,
                 info: Dict[str, Any], timings: Dict[str, float]) -> Iterator[Tuple[int, StatsPass]]:
    """``(number of groups, StatsPass)`` per group: read from the cache at ``path`` when it matches ``key``,
    else from ``compute()`` (the statistics passes) and saved (module docstring).

    ``plan(z_owner)`` gives the groups of a hit (the current memory budget, from the cached input sharing).
    Collective with a process group: every rank iterates it.
    """
    rank, _ = dist_utils.rank_and_world()
    exists = dist_utils.gather_objects(path.exists() if rank == 0 else None)[0]
    entry: Dict[str, Any] = {"path": str(path), "hit": bool(exists)}
    info["stats_cache"] = entry
    if exists:
        t0 = time.perf_counter()
        err, reader = None, None
        try:
            reader = _Reader(path)
            reader.check(key)
        except Exception as e:
            err = e
        dist_utils.agree(err, f"reading the stats_cache {str(path)!r}")
        groups = plan(reader.z_owner)
        info["passes"] = 0
        entry["groups"] = len(groups)
        entry["files"] = [str(f) for f in cache_files(path)]
        timings["stats_cache_load"] = timings.get("stats_cache_load", 0.0) + time.perf_counter() - t0
        for group in groups:
            t0 = time.perf_counter()
            err, done = None, None
            try:
                done = reader.load(group, targets, dtype)
            except Exception as e:
                err = e
            dist_utils.agree(err, f"reading the stats_cache {str(path)!r}")
            timings["stats_cache_load"] += time.perf_counter() - t0
            yield len(groups), done
            done = None
        return
    writer, err = None, None
    if rank == 0:
        try:
            writer = _Writer(path, key)
        except Exception as e:
            err = e
    dist_utils.agree(err, f"opening the stats_cache {str(path)!r} for writing")
    try:
        for i, (k, done) in enumerate(compute(), 1):
            t0 = time.perf_counter()
            err = None
            if writer is not None:
                try:
                    writer.add(k, done)
                except Exception as e:
                    err = e
            dist_utils.agree(err, f"writing the stats_cache {str(path)!r}")
            timings["stats_cache_save"] = timings.get("stats_cache_save", 0.0) + time.perf_counter() - t0
            if i == k:  # complete (written by rank 0)
                entry["saved"] = True
                entry["files"] = [str(path)] + [str(path.parent / _part_name(path, j, k)) for j in range(1, k + 1)
                                                if k > 1]
            yield k, done
            done = None
    finally:
        if writer is not None:
            writer.abort()
