"""``InitContext``: what an initialization method sees.

A method ``fn(ctx, config) -> {layer name: LoRAFactors}`` uses these names, all defined here:

* the model: ``ctx.model``, ``ctx.targets`` (``{name: TargetLayer}``, model order), ``ctx.names``,
  ``ctx.rank`` / ``ctx.world`` (``torch.distributed``; 0 / 1 without a process group);
* the data: ``ctx.dataloader``, ``ctx.loss_fn`` (the user's, or None), ``ctx.batches`` (the first
  ``num_samples`` examples, materialized once), :meth:`~InitContext.split_holdout`,
  :meth:`~InitContext.dataset_length`;
* the passes (:mod:`lorainit.passes`), bound to this model and data:
  :meth:`~InitContext.iter_stats` / :meth:`~InitContext.collect_stats` (K-FAC statistics
  ``Z, G, s`` per layer, docs/math.md, under an optional memory budget; read from / saved
  to ``stats_cache`` when the call has one, :mod:`lorainit.cache`),
  :meth:`~InitContext.collect_weight_grads` (full weight gradients, for LoRA-GA / LoRA-One),
  :meth:`~InitContext.eval_loss` (mean loss with the adapters as written, forward only); for a
  method that trains (HRP) :meth:`~InitContext.runner`, :meth:`~InitContext.pass_state` and
  :meth:`~InitContext.progress_bar`;
* :meth:`~InitContext.write`: write factors into the adapters now (transactional: the model is
  restored if the initialization fails later);
* the report: :meth:`~InitContext.record` (per layer), ``ctx.info`` (global facts) and
  :meth:`~InitContext.timed` (seconds per phase).

Every pass freezes all parameters, disables the LoRA branches (the statistics are those of the
base model), switches to eval mode and restores all of that afterwards, also on error.
"""
from __future__ import annotations

import contextlib
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from . import distributed as dist_utils
from .adapters import LoRAFactors, ModelSnapshot, write_factors
from .passes.batches import has_loss_tokens, leading_size, slice_examples, take_samples
from .passes.grads import weight_grads
from .passes.loss import LossRunner, eval_loss
from .passes.state import pass_state, progress_bar
from . import cache as _cache
from .passes.stats import LayerStats, StatsPass, check_extras, plan_groups, probe_shared_inputs, stats_bytes, stats_pass
from .targets import LoRAInitError, LoRAInitWarning, TargetLayer

__all__ = ["InitContext"]


class InitContext:
    """Model, targets, data and the data passes of one ``initialize_lora`` call.

    ``snapshot`` is the transaction's :class:`~lorainit.adapters.ModelSnapshot` (``initialize_lora``
    passes its own; a context built without one takes a snapshot on the first :meth:`write`).
    """

    def __init__(self, model: nn.Module, targets: Dict[str, TargetLayer], dataloader: Optional[Iterable], *,
                 loss_fn: Optional[Callable] = None, num_samples: Optional[int] = 256, progress: bool = True,
                 snapshot: Optional[ModelSnapshot] = None, loss_reduction: Optional[str] = None,
                 stats_cache: Optional[Union[str, "os.PathLike[str]"]] = None):
        self.model = model
        # the statistics cache (lorainit.cache): its path, and whether a statistics request used it
        self.stats_cache: Optional[Path] = None if stats_cache is None else _cache.check_path(stats_cache)
        self.stats_cache_used = False
        self._sources: List[Iterator] = []  # statistics generators, closed by close()
        self.loss_reduction = loss_reduction
        self._checks: Dict[str, Any] = {}  # once-per-call checks shared by the loss runners
        self.targets = targets
        self.names = list(targets)  # model order
        self.dataloader = dataloader
        self.loss_fn = loss_fn
        self.num_samples = num_samples
        self.progress = progress
        self.rank, self.world = dist_utils.rank_and_world()
        self.n_examples = 0
        self.timings: Dict[str, float] = {}
        self.layer_info: Dict[str, Dict[str, Any]] = {name: {} for name in self.names}
        self.info: Dict[str, Any] = {}
        self._snapshot = snapshot
        self._batches: Optional[List[Any]] = None
        self._runners: Dict[str, LossRunner] = {}
        self.shared_inputs: Optional[Dict[str, str]] = None  # layer -> owner of its Z, once probed

    # ---------------------------------------------------------------- report
    def record(self, layer: str, **info) -> None:
        """Add per-layer entries to the report (tokens, eigenvalues, solver info, ...)."""
        self.layer_info.setdefault(layer, {}).update(info)

    @contextlib.contextmanager
    def timed(self, key: str):
        """Add the seconds spent inside the block to ``timings[key]``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - t0

    # ---------------------------------------------------------------- writes
    def write(self, factors: Dict[str, LoRAFactors]) -> None:
        """Check, then write ``factors`` into the adapters (and base weights, for a ``base_delta``).

        A ``base_delta`` on a quantized base is re-quantized (:mod:`lorainit.quant`): the report gets
        ``requant_error`` and ``init_weight_error`` per layer, ``info["quantized_residual"]`` their maxima,
        and one warning says that the output at initialization is preserved only up to that rounding.
        """
        if self._snapshot is None:
            self._snapshot = ModelSnapshot(self.model, self.targets)
        requant = write_factors(self.targets, factors, self._snapshot)
        if requant:
            for name, errors in requant.items():
                self.record(name, **errors)
            kinds = sorted({self.targets[n].quant for n in requant})
            worst = {k: max(e[k] for e in requant.values()) for k in ("requant_error", "init_weight_error")}
            self.info["quantized_residual"] = dict(layers=len(requant), quant=kinds, **{f"max_{k}": v
                                                                                         for k, v in worst.items()})
            if not getattr(self, "_requant_warned", False):  # one warning per call
                self._requant_warned = True
                warnings.warn(f"lorainit: {len(requant)} quantized ({', '.join(kinds)}) base weights were rewritten and "
                              f"their residual re-quantized: the model at initialization differs from the quantized "
                              f"base by the re-quantization (relative weight error up to "
                              f"{worst['init_weight_error']:.3g}; per layer in the report's requant_error / "
                              f"init_weight_error), so preserving the output holds only approximately",
                              LoRAInitWarning, stacklevel=3)

    # ---------------------------------------------------------------- data
    def needs_loss_tokens(self) -> bool:
        """Whether a batch without loss tokens is unusable (the model's mean loss, or a mean ``loss_fn``)."""
        return self.loss_fn is None or self.loss_reduction == "mean"

    @property
    def batches(self) -> List[Any]:
        """The first examples of the dataloader, as batches (read once).

        ``num_samples`` is the total over all ranks: rank ``k`` of ``w`` takes the first
        ``num_samples // w`` examples of its own dataloader, plus one on the first ``num_samples % w``
        ranks (:func:`lorainit.distributed.samples_for_rank`); ``n_examples`` is the total over ranks.
        Batches without loss tokens (every label -100) are skipped with a warning when the loss is
        the model's own or a mean ``loss_fn`` (their mean loss is undefined); an error when none is left.
        """
        if self._batches is None:
            if self.dataloader is None:
                raise LoRAInitError("this method needs data: pass a dataloader")
            err = None
            try:
                share = dist_utils.samples_for_rank(self.num_samples, self.rank, self.world)
                batches, n = take_samples(self.dataloader, share)
                batches, n = self._drop_batches_without_loss_tokens(batches, n)
            except Exception as e:
                err = e
            dist_utils.agree(err, "reading the statistics samples")
            if self.world > 1:
                n = int(dist_utils.all_reduce_scalars([n])[0])
            self._batches, self.n_examples = batches, n
        return self._batches

    def _drop_batches_without_loss_tokens(self, batches: List[Any], n: int) -> Tuple[List[Any], int]:
        """``(batches, examples)`` without the batches whose every label is -100 (one warning)."""
        if not self.needs_loss_tokens():
            return batches, n
        kept = [b for b in batches if has_loss_tokens(b)]
        if not kept:
            raise LoRAInitError(f"the statistics samples have no loss tokens: every label of their "
                                f"{len(batches)} batches is -100; check the labels / attention_mask")
        if len(kept) < len(batches):
            skipped = len(batches) - len(kept)
            warnings.warn(f"lorainit: skipped {skipped} of {len(batches)} batches without loss tokens "
                          f"(every label -100)", LoRAInitWarning, stacklevel=4)
            n -= sum((leading_size(b) or 1) for b in batches if not has_loss_tokens(b))
            self.info["skipped_batches"] = skipped
        return kept, n

    def dataset_length(self) -> Optional[int]:
        """``len(dataloader.dataset)`` when the dataloader has a sized dataset, else None."""
        ds = getattr(self.dataloader, "dataset", None)
        try:
            return len(ds) if ds is not None else None
        except TypeError:
            return None

    def split_holdout(self, fraction: float) -> Tuple[List[Any], List[Any]]:
        """(statistics batches, held-out batches): the last ``max(1, round(fraction * #batches))`` batches.

        With a single batch, its last ``max(1, round(fraction * size))`` examples are held out instead.
        """
        b = self.batches
        if len(b) == 1:
            size = leading_size(b[0])
            if size is not None and size >= 2:
                k = min(size - 1, max(1, int(round(fraction * size))))
                stats, held = slice_examples(b[0], 0, size - k), slice_examples(b[0], size - k, size)
                if not self.needs_loss_tokens() or (has_loss_tokens(stats) and has_loss_tokens(held)):
                    self.info["held_out_examples"] = k
                    return [stats], [held]
        if len(b) < 2:
            raise LoRAInitError(f"holding out samples to score the step size needs at least 2 examples, got "
                                f"{len(b)} batch of {leading_size(b[0]) or 1}; raise num_samples or set a numeric "
                                f"step_scale")
        k = min(len(b) - 1, max(1, int(round(fraction * len(b)))))
        return b[:-k], b[-k:]

    # ---------------------------------------------------------------- building blocks of a pass
    def runner(self, token_mask: str = "attention") -> LossRunner:
        """The :class:`~lorainit.passes.loss.LossRunner` (summed loss, token mask) of this model and loss_fn."""
        if token_mask not in self._runners:
            self._runners[token_mask] = LossRunner(self.model, self.loss_fn, token_mask,
                                                   loss_reduction=self.loss_reduction, checks=self._checks)
        return self._runners[token_mask]

    def pass_state(self, *, lora_enabled: bool = False, grad_weights: Sequence[str] = ()):
        """Context manager: every parameter frozen (except the base weights of ``grad_weights``), eval mode,
        LoRA branches off (on with ``lora_enabled``); restored on exit."""
        return pass_state(self.model, self.targets, lora_enabled=lora_enabled, grad_weights=grad_weights)

    def progress_bar(self, total: int, desc: str, unit: str = "batch"):
        """A progress bar shown on rank 0 when the user asked for progress."""
        return progress_bar(total, desc, self.progress and self.rank == 0, unit=unit)

    # ---------------------------------------------------------------- passes
    def iter_stats(self, names: Optional[Sequence[str]] = None, *, batches: Optional[Sequence[Any]] = None,
                   max_memory: Optional[int] = None, dtype: torch.dtype = torch.float32, backend: str = "auto",
                   token_mask: str = "attention", working_set: Optional[Callable[[str], int]] = None,
                   extras: Sequence[str] = (), grads: bool = True,
                   stack_size: int = 1) -> Iterator[Dict[str, LayerStats]]:
        """K-FAC statistics of the targets ``names`` (all by default) over ``batches`` (default: all).

        Yields one dict ``{name: LayerStats}`` per pass. With ``max_memory`` (bytes) below what the
        statistics of all layers need plus the largest ``working_set(name)`` (what the caller uses
        per layer on top of the statistics, e.g. a solve), the layers are split into groups (layers
        sharing an input stay together) and each group gets its own pass over the same batches.
        The caller should drop each dict (and each layer's tensors) as soon as it is done with them.

        ``extras`` (:data:`lorainit.passes.stats.EXTRAS`): statistics beside ``Z, G, s`` from the same
        pass, ``"mean"`` (``LayerStats.mu``) and ``"output_cov"`` (``LayerStats.Y``); none by default.
        ``grads=False``: a forward-only pass (no backward, ``G`` and ``s`` None), for methods that need no
        gradient statistics; a cache it writes holds none either (a gradient method then needs its own).
        ``stack_size`` > 1: same-shape layers that read their input alone get their ``Z, G, s`` as slices
        of shared stacks of up to that many layers (a batched solve reads them without a copy; a cache
        hit gives separate tensors).

        With ``stats_cache`` (:mod:`lorainit.cache`) a matching cache file replaces the passes
        (the groups of the current budget are read one at a time), a missing one is written from the
        passes' means before each group is yielded, and a cache that does not match raises.
        """
        names = list(self.names if names is None else names)
        batches = list(self.batches if batches is None else batches)
        if not batches:
            raise LoRAInitError("no batches for the statistics pass")
        wanted = check_extras(extras)
        # a cache that is written always carries the input mean (O(T n)), so it serves EVA too; a cache hit
        # needs only what this method asks for
        extras = wanted if self.stats_cache is None else check_extras(wanted + _cache.CACHED_EXTRAS)
        runner = self.runner(token_mask)
        work = max((working_set(n) for n in names), default=0) if working_set is not None else 0
        grouped = max_memory is not None and \
            sum(stats_bytes(self.targets[n], dtype, extras=extras, grads=grads) for n in names) + work > max_memory

        def plan(shared: Optional[Dict[str, str]]) -> List[List[str]]:
            if not grouped:
                return [names]
            if shared is None:
                with self.timed("probe"):
                    shared = probe_shared_inputs(self.model, self.targets, names, runner, batches[0])
            self.shared_inputs = dict(shared)
            return plan_groups(names, self.targets, shared, max_memory, dtype, working_set, extras=extras, grads=grads)

        def passes() -> Iterator[Tuple[int, StatsPass]]:
            groups = plan(None)
            self.info["passes"] = len(groups)
            for gi, group in enumerate(groups):
                desc = "lorainit statistics" + (f" (pass {gi + 1}/{len(groups)})" if len(groups) > 1 else "")
                with self.timed("stats_pass"):
                    done = stats_pass(self.model, self.targets, group, batches, runner, dtype=dtype, backend=backend,
                                      progress=self.progress and self.rank == 0, desc=desc, extras=extras,
                                      with_grad=grads, stack_size=stack_size)
                self.timings["stats_kernels"] = self.timings.get("stats_kernels", 0.0) + done.kernel_s
                yield len(groups), done
                done = None

        if self.stats_cache is None:
            source = passes()
        else:
            self.stats_cache_used = True
            with self.timed("stats_cache_check"):
                key = _cache.cache_key(self.model, self.targets, names, batches, all_batches=self._batches,
                                            dtype=dtype, token_mask=token_mask, loss_fn=self.loss_fn,
                                            loss_reduction=self.loss_reduction, backend=backend, extras=wanted,
                                            write_extras=extras, grads=grads)
            source = _cache.cached_stats(self.stats_cache, key, self.targets, compute=passes, plan=plan,
                                              dtype=dtype, info=self.info, timings=self.timings)
        self._sources.append(source)
        try:
            for _, done in source:
                self._record_pass(done)
                stats = done.stats
                done = None
                yield stats
                stats = None
        finally:
            source.close()

    def _record_pass(self, done: StatsPass) -> None:
        """Report what one pass (or one group read from the cache) produced: examples, tokens, masks, sharing."""
        self.info["stats_examples"] = done.examples
        for name, st in done.stats.items():
            self.record(name, tokens=st.count, token_mask=(done.masks or {}).get(name),
                        shares_input_with=None if st.z_owner == name else st.z_owner)

    def close(self) -> None:
        """Close the statistics generators left open (``initialize_lora`` calls it, also on error): a cache
        that was being written and is not complete has its files removed."""
        sources, self._sources = self._sources, []
        for source in sources:
            source.close()

    def collect_stats(self, names: Optional[Sequence[str]] = None, **kwargs) -> Dict[str, LayerStats]:
        """All layers' statistics as one dict (the groups of a memory budget are merged)."""
        out: Dict[str, LayerStats] = {}
        for part in self.iter_stats(names, **kwargs):
            out.update(part)
        return out

    def collect_weight_grads(self, names: Optional[Sequence[str]] = None, *, batches: Optional[Sequence[Any]] = None,
                             token_mask: str = "attention") -> Tuple[Dict[str, Tensor], int]:
        """Full weight gradients ``(1/T) sum_t g_t x_t^T`` (m, n) of the targets (torch orientation, fp32).

        Returns ``({name: grad}, T)``: each layer's gradient is divided by its own number of valid tokens
        (the mask matching its input, :mod:`lorainit.passes.masks`; the report gets ``tokens`` and
        ``token_mask`` per layer); ``T`` is the number of valid tokens of the batches' main mask
        (``attention_mask``). All-reduced across processes (:func:`lorainit.passes.grads.weight_grads`).
        """
        names = list(self.names if names is None else names)
        batches = list(self.batches if batches is None else batches)
        with self.timed("weight_grads"):
            grads, total, tokens, used = weight_grads(self.model, self.targets, names, batches,
                                                      self.runner(token_mask), progress=self.progress and self.rank == 0)
        for name in names:
            self.record(name, tokens=tokens[name], token_mask=used.get(name))
        return grads, total

    def eval_loss(self, batches: Sequence[Any], token_mask: str = "attention") -> float:
        """Mean loss over ``batches`` with the adapters as written (:func:`lorainit.passes.loss.eval_loss`)."""
        return eval_loss(self.model, self.targets, self.runner(token_mask), batches)
