"""``initialize_lora``: initialize the LoRA adapters of a PEFT model with a registered method.

One transaction: find the targets, snapshot the model, run the method (data passes through
:class:`~lorainit.context.InitContext`), write every factor, apply ``freeze_A``; on any error the
snapshot restores weights, ``requires_grad``, ``.grad``, train/eval modes and hooks, so the model
is exactly as before. With ``stats_cache`` the K-FAC statistics are read from, or saved to, a file
(:mod:`lorainit.cache`); a cache write fails before the model changes, and a call that fails
before its cache is complete leaves no cache file behind.
"""
from __future__ import annotations

import os
import time
import warnings
from typing import Callable, Iterable, Optional, Union

import torch
from torch import nn

from . import distributed as dist_utils
from .adapters import ModelSnapshot
from .cache import check_path
from .configs import InitConfig
from .context import InitContext
from .lr import lr_scale_info
from .registry import get_method
from .report import InitReport, thread_hint
from .targets import LoRAInitError, LoRAInitWarning, find_targets, target_fingerprint

__all__ = ["initialize_lora"]

_THREADS_WARNED = False


def _warn_threads_once(hint: str) -> None:
    """One warning per process about busy CPUs (the report of every affected call keeps the hint)."""
    global _THREADS_WARNED
    if not _THREADS_WARNED:
        _THREADS_WARNED = True
        warnings.warn(f"lorainit: {hint}", LoRAInitWarning, stacklevel=3)


def initialize_lora(
    model: nn.Module,
    dataloader: Optional[Iterable] = None,
    method: str = "lora_da",
    config: Optional[InitConfig] = None,
    *,
    num_samples: Optional[int] = 256,
    loss_fn: Optional[Callable] = None,
    progress: bool = True,
    adapter: Optional[str] = None,
    loss_reduction: Optional[str] = None,
    stats_cache: Optional[Union[str, "os.PathLike[str]"]] = None,
) -> InitReport:
    """Initialize every LoRA adapter of ``model`` in place with ``method``; returns an :class:`InitReport`.

    Args:
        model: a PEFT model (``get_peft_model(...)``) or any module containing PEFT LoRA layers on
            ``nn.Linear``, transformers ``Conv1D`` or ``nn.Embedding`` base layers; the targets are the
            layers PEFT wrapped. An embedding is the linear map ``weight^T`` of one-hot token inputs;
            a method whose math is not defined for it (``orthogonal``) refuses it with an error.
        dataloader: an iterable of batches (dicts of model inputs, or anything ``loss_fn`` takes);
            the first ``num_samples`` examples are used (``None`` = all). Methods without data take None.
        method: a registered name (``lorainit.methods()`` lists them), e.g. ``"lora_da"``.
        config: the method's config (e.g. :class:`LoRADAConfig`); None uses its defaults.
        loss_fn: ``loss_fn(model, batch) -> summed loss`` over the batch; default: the model's own
            loss (from ``labels``) times its number of loss tokens (docs/math.md).
        progress: tqdm progress bars for every long phase (data passes, solves, step search, preheat).
        adapter: which adapter to initialize (default: the active one). With several active adapters
            this is required (one adapter per call: call once per adapter).
        loss_reduction: what ``loss_fn`` returns: ``"sum"`` (the summed loss) or ``"mean"`` (a mean over
            the batch's loss terms; lorainit multiplies it by their number: the model's own loss
            tokens for batches with ``labels``, else the examples). None (default) treats it as a sum
            and warns once (``LossReductionWarning``) when the first batch's value looks like a mean.
        stats_cache: a file path (e.g. ``"stats.safetensors"``) for the K-FAC statistics, so that a sweep
            over ranks, step sizes or ablations pays the statistics pass once
            (:mod:`lorainit.cache`). A missing file is written after the statistics pass (under
            a memory budget with several passes, one ``<stem>.pass-<i>-of-<k>.safetensors`` file per
            pass beside it); an existing file is reused without a statistics pass when it matches this
            call (targets and their shapes, a fingerprint of the model's weights, the statistics
            samples, dtype, ``token_mask`` and loss), else ``LoRAInitError`` names what differs: a
            cache is never overwritten (delete it or pass another path). ``report.info["stats_cache"]``
            says ``hit`` and the files. The held-out batches of ``step_scale="auto"`` are not cached
            (its step search still runs forward passes), and ``"auto"`` holds out samples that a
            numeric ``step_scale`` uses, so the two need separate cache files. A method that computes
            no K-FAC statistics (``lora``, ``pissa``, ``lora_ga``, ``hrp``, ...) ignores the path and
            warns once (``LoRAInitWarning``); with a process group, rank 0 writes and every rank reads
            (a shared filesystem).

    Token validity is per layer (:mod:`lorainit.passes.masks`): encoder layers use ``attention_mask``,
    decoder layers of an encoder-decoder ``decoder_attention_mask`` (else the label mask), per-example
    layers (poolers, classifier heads) count every example as one token; the report's
    ``token_mask`` column says which mask each layer used. Batches without loss tokens are skipped
    with a warning (an error when none is left).

    Raises ``LoRAInitError`` (a ValueError) with a message naming the module/batch/argument for
    inputs that cannot be handled; the model is then exactly as before.

    With ``torch.distributed`` initialized (DDP-style replicas, or an FSDP2 model: ``fully_shard``
    per decoder layer and on the root) every rank calls this with its own dataloader; ``num_samples``
    is the total over ranks, the result equals one process on the union of the ranks' samples, and
    an error on any rank raises on every rank (docs/distributed.md).
    """
    t_start, cpu_start = time.perf_counter(), time.process_time()
    spec = get_method(method)
    if config is None:
        config = spec.config_cls()
    if not isinstance(config, spec.config_cls):
        raise LoRAInitError(f"method {method!r} takes a {spec.config_cls.__name__}, got {type(config).__name__}")
    if loss_fn is not None and not callable(loss_fn):
        raise LoRAInitError(f"loss_fn must be callable as loss_fn(model, batch) -> summed loss, got {type(loss_fn).__name__}")
    if loss_reduction not in (None, "sum", "mean"):
        raise LoRAInitError(f"loss_reduction must be 'sum', 'mean' or None, got {loss_reduction!r}")
    if loss_reduction is not None and loss_fn is None:
        raise LoRAInitError(f"loss_reduction={loss_reduction!r} describes a loss_fn, but none was given (the model's own "
                            f"loss is always turned into the summed loss)")
    if spec.needs_data and dataloader is None:
        raise LoRAInitError(f"method {method!r} needs data: pass a dataloader")
    if not isinstance(model, nn.Module):
        raise LoRAInitError(f"model must be a torch.nn.Module (a PEFT model), got {type(model).__name__}")
    err = cache_path = None
    try:
        targets = find_targets(model, adapter)
        cache_path = None if stats_cache is None else check_path(stats_cache)  # agreed with the targets
    except Exception as e:
        err = e
    dist_utils.agree(err, "finding the LoRA targets")
    dist_utils.agree_fingerprint((method, target_fingerprint(targets)), "the method and the LoRA targets")
    snapshot = ModelSnapshot(model, targets)
    ctx = InitContext(model, targets, dataloader, loss_fn=loss_fn, num_samples=num_samples, progress=progress,
                      snapshot=snapshot, loss_reduction=loss_reduction, stats_cache=cache_path)
    try:
        factors = spec.fn(ctx, config)
        if not isinstance(factors, dict):
            raise LoRAInitError(f"method {method!r} returned {type(factors).__name__}, expected a dict of LoRAFactors")
        missing = [n for n in targets if n not in factors]
        if missing:
            raise LoRAInitError(f"method {method!r} returned no factors for {missing[:5]}")
        if cache_path is not None and not ctx.stats_cache_used:
            ctx.info["stats_cache"] = {"path": str(cache_path), "used": False}
            warnings.warn(f"lorainit: stats_cache={str(cache_path)!r} is unused: method {method!r} computes no K-FAC "
                          f"statistics (the cache serves methods that do, such as lora_da)", LoRAInitWarning,
                          stacklevel=2)
        lr_info = lr_scale_info(method, targets, factors, config)  # before the write: an error leaves the model as it was
        with ctx.timed("write"):
            ctx.write(factors)
        snapshot.restore_state()  # passes may have touched modes/flags/grad: back to the user's state
        if getattr(config, "freeze_A", False):
            for t in targets.values():
                t.lora_A.requires_grad_(False)
        if getattr(config, "freeze_B", False):  # MiCA: only lora_A trains (PEFT's MiCA variant)
            for t in targets.values():
                t.lora_B.requires_grad_(False)
    except BaseException:
        try:
            ctx.close()  # an incomplete stats_cache is removed
        finally:
            snapshot.restore()
        raise
    ctx.close()
    ctx.timings["total"] = time.perf_counter() - t_start
    rows = []
    for name, t in targets.items():
        row = t.describe()
        row.update(ctx.layer_info.get(name, {}))
        rows.append(row)
    info = dict(ctx.info)
    if ctx.n_examples:
        info.setdefault("num_samples", ctx.n_examples)
    info["base_modified"] = any(f.base_delta is not None for f in factors.values())
    info["lr_scale"] = lr_info
    if ctx.world > 1:
        info["world_size"] = ctx.world
    info["cpu_time_s"] = time.process_time() - cpu_start  # all of the process's threads, beside timings["total"]
    if all(t.device.type == "cpu" for t in targets.values()):  # on an accelerator the CPU waits, by design
        hint = thread_hint(ctx.timings["total"], info["cpu_time_s"], torch.get_num_threads())
        if hint is not None:
            info["hint"] = hint
            _warn_threads_once(hint)
    return InitReport(method=method, config=config.to_dict(), layers=rows, info=info, timings=dict(ctx.timings))
