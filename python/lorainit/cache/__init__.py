"""The statistics cache: ``initialize_lora(..., stats_cache=PATH)`` saves the K-FAC statistics and reuses them.

A sweep over ranks, step sizes or ablations on a large model pays the statistics pass once:
:meth:`lorainit.context.InitContext.iter_stats` (so every method that uses K-FAC statistics) goes
through :func:`cached_stats`. A matching cache replaces the statistics pass; a missing one is written
from the pass; one that does not match is refused, naming every difference (a cache is never
overwritten: delete it or pass another path). The held-out batches of ``step_scale="auto"`` are not
cached: its step search still runs its forward passes on them.

* :mod:`~lorainit.cache.key`: what must match (:class:`CacheKey`: targets and shapes, a model
  fingerprint, the statistics samples, dtype, ``token_mask``, loss) and the words for a mismatch.
* :mod:`~lorainit.cache.store`: the file format (safetensors, the key as JSON metadata, one file per
  pass under a memory budget), written tensor by tensor and read group by group.
* :mod:`~lorainit.cache.protocol`: hit, miss or mismatch; rank 0 writes, every rank reads.
"""
from .key import SAMPLES, CacheKey, cache_key, data_fingerprint, model_fingerprint
from .protocol import cached_stats
from .store import CACHED_EXTRAS, FORMAT, META_KEY, VERSION, cache_files, check_path

__all__ = ["FORMAT", "VERSION", "CACHED_EXTRAS", "META_KEY", "SAMPLES", "CacheKey", "check_path", "cache_key",
           "model_fingerprint", "data_fingerprint", "cached_stats", "cache_files"]
