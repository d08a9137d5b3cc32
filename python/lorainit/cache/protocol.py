"""The statistics cache's protocol: read a matching cache, or compute the statistics and save them.

:func:`cached_stats` is what :meth:`lorainit.context.InitContext.iter_stats` iterates when the call
has a ``stats_cache``:

* ``PATH`` does not exist: the passes run as usual and their statistics (the **means** ``Z, G, s``
  that ``iter_stats`` yields) are saved before each group is yielded, since consumers free them; the
  main file is renamed into place before the last group is yielded, so a consumer failing later keeps
  a complete cache, and a call failing before that removes every file it wrote (no partial cache).
* ``PATH`` exists and matches the key: the statistics are read from it group by group (the groups
  of the *current* budget, re-planned from the cached ``z_owner``), no statistics pass runs
  (``report.info["stats_cache"] = {"path", "hit": True, ...}``, ``info["passes"] = 0``).
* ``PATH`` exists and does not match: :class:`~lorainit.errors.LoRAInitError` naming every
  difference; a cache is never overwritten and never silently recomputed.

Distributed: every rank computes the key (:func:`lorainit.cache.key.cache_key` gathers the sample
hashes, so the key covers the union of the ranks' samples and their split); rank 0 decides hit or
miss, writes the files after the statistics' all-reduce, and every rank reads a hit (``PATH`` must
be on a shared filesystem); an error on one rank raises on every rank (``distributed.agree`` after
each step).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Tuple

import torch

from .. import distributed as dist_utils
from ..passes.stats import StatsPass
from ..targets import TargetLayer
from .key import CacheKey
from .store import _Reader, _Writer, cache_files, part_name

__all__ = ["cached_stats"]


def cached_stats(path: Path, key: CacheKey, targets: Dict[str, TargetLayer], *,
                 compute: Callable[[], Iterator[Tuple[int, StatsPass]]],
                 plan: Callable[[Dict[str, str]], List[List[str]]], dtype: torch.dtype,
                 info: Dict[str, Any], timings: Dict[str, float]) -> Iterator[Tuple[int, StatsPass]]:
    """``(number of groups, StatsPass)`` per group: read from the cache at ``path`` when it matches ``key``,
    else from ``compute()`` (the statistics passes) and saved (the module docstring says how).

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
                entry["files"] = [str(path)] + [str(path.parent / part_name(path, j, k)) for j in range(1, k + 1)
                                                if k > 1]
            yield k, done
            done = None
    finally:
        if writer is not None:
            writer.abort()
