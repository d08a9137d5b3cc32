"""The statistics cache's files: safetensors files with the K-FAC means and a JSON key, read and written.

Tensors ``"<target>/G"`` (m, n), ``"<target>/s"`` (m,) and ``"<owner>/Z"`` once per input (``z_owner``:
targets sharing an input share one ``Z``; (n,) token frequencies for an embedding target), in the
statistics dtype (``G`` and ``s`` only when the pass computed gradients: metadata ``grads``; a
forward-only pass for EVA/CorDA/Astra writes none, and a gradient method refuses such a cache naming
why), and the optional statistics the metadata's ``extras`` lists: ``"<owner>/mu"`` (n,) the input
mean (every cache written holds it, :data:`CACHED_EXTRAS`; an embedding's is its ``Z``) and
``"<target>/Y"`` (m, m) the output second moment (written when the method that built the cache asked
for it, Astra); a request needing an extra the cache lacks is a mismatch naming it.

The safetensors metadata key :data:`META_KEY` holds a JSON object: format and :data:`VERSION`,
``cache_id``, the targets in order, per target ``kind, m, n, z_owner, tokens, token_mask`` (the mask
its statistics used) and its file, ``stats_examples``, ``stats_dtype``, ``token_mask``, the samples
(``batches``, ``examples``, their hash, ``holdout``: whether the call had held some of the samples
out, ``world_size``), ``loss``, ``backend``, ``passes`` and the model fingerprint (with one digest
per parameter, so a mismatch names a parameter): the :class:`~lorainit.cache.key.CacheKey` it was
written for.

Statistics computed in one pass go into ``PATH`` itself. Under a memory budget (``k > 1`` passes)
pass ``i`` is written to ``<stem>.pass-<i>-of-<k><suffix>`` beside ``PATH`` as soon as it is
computed, and ``PATH`` holds the metadata only; :class:`_Reader` loads the statistics of any group
of targets with ``safetensors.safe_open``, so a reader never needs all statistics in memory when a
budget asks for groups. Files are written tensor by tensor (:func:`_write_safetensors`: one tensor's
host copy at a time) to a temporary name and renamed; :class:`_Writer` renames the main file last,
and :meth:`_Writer.abort` removes every file it wrote unless the cache was completed.
"""
from __future__ import annotations

import json
import os
import struct
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..errors import LoRAInitError
from ..passes.stats import LayerStats, StatsPass
from ..targets import TargetLayer
from .key import CacheKey, differences, name_examples

__all__ = ["FORMAT", "VERSION", "CACHED_EXTRAS", "META_KEY", "check_path", "cache_files", "part_name"]

FORMAT = "lorainit.stats_cache"
#: Version of the file layout; a cache of another version is refused (naming both).
VERSION = 1
#: The optional statistics every cache written holds beside ``Z, G, s`` (the input mean costs O(T n), so a
#: cache written for LoRA-DA also serves EVA); ``"output_cov"`` (m^2 per layer) only when the method asks.
CACHED_EXTRAS = ("mean",)
#: The safetensors metadata key holding the cache's JSON metadata.
META_KEY = "lorainit_stats_cache"

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


def part_name(path: Path, i: int, k: int) -> str:
    """The file name of pass ``i`` of ``k`` of the cache at ``path``: ``<stem>.pass-<i>-of-<k><suffix>``."""
    return f"{path.stem}.pass-{i}-of-{k}{path.suffix or '.safetensors'}"


def _write_safetensors(path: Path, tensors: Sequence[Tuple[str, Tensor]], metadata: Dict[str, str]) -> None:
    """Write a safetensors file tensor by tensor, to a temporary name, then rename it to ``path``.

    One host copy of one tensor at a time: the header (``{name: dtype, shape, data_offsets}`` and
    ``__metadata__``) is known from the shapes alone, so each tensor is copied to the host, written and
    dropped before the next. ``safetensors.torch.save_file`` cannot bound memory this way: it takes
    every tensor at once, copies each CUDA tensor to the host and keeps all the copies until the file is
    written (and before safetensors 0.8 it also serialized every tensor into bytes, a second host copy);
    for statistics on a GPU that is a host copy of a whole pass's ``Z, G, s``. The files are read
    with ``safetensors.safe_open`` (the tests read them with ``safetensors.torch.load_file`` too)."""
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
            version = self.meta.get("version")
            diffs = [f"format version {version!r} (this lorainit reads version {VERSION})"] if version != VERSION \
                else differences(self.meta, key)
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
        file = "" if k == 1 else part_name(self.path, i, k)
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
                    raise LoRAInitError(f"stats_cache: the passes produced no statistics for {name_examples(missing)}")
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
