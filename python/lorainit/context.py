"""``InitContext``: what an initialization method gets to work with.

A method ``fn(ctx, config) -> {layer name: LoRAFactors}`` reads ``ctx.targets`` (the LoRA layers,
:class:`~lorainit.targets.TargetLayer`), ``ctx.batches`` (the first ``num_samples`` examples of the
dataloader, materialized once) and calls the data passes:

* :meth:`InitContext.iter_stats` / :meth:`collect_stats`: K-FAC statistics ``Z, G, s`` per layer
  (DESIGN.md section 2), under an optional memory budget, all-reduced across processes;
* :meth:`collect_weight_grads`: the full weight gradient of the target layers (LoRA-GA, LoRA-One);
* :meth:`eval_loss`: the mean loss of some batches with the adapters as currently written
  (forward only), e.g. for a step-size search.

Every pass freezes all parameters, disables the LoRA branches (the statistics are those of the
base model), switches to eval mode and restores all of that afterwards, also on error.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from . import distributed as dist_utils
from .collect import LayerStats, LossRunner, StatsCollector, plan_groups, stats_bytes, take_samples
from .targets import LoRAInitError, TargetLayer

__all__ = ["InitContext"]


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, unit="batch")


class InitContext:
    """Model, targets, data and the data passes of one ``initialize_lora`` call."""

    def __init__(self, model: nn.Module, targets: Dict[str, TargetLayer], dataloader: Optional[Iterable], *,
                 loss_fn: Optional[Callable] = None, num_samples: Optional[int] = 256, progress: bool = True):
        self.model = model
        self.targets = targets
        self.names = list(targets)  # model order
        self.dataloader = dataloader
        self.loss_fn = loss_fn
        self.num_samples = num_samples
        self.progress = progress
        self.rank, self.world = dist_utils.rank_and_world()
        self._batches: Optional[List[Any]] = None
        self.n_examples = 0
        self.timings: Dict[str, float] = {}
        self.layer_info: Dict[str, Dict[str, Any]] = {name: {} for name in self.names}
        self.info: Dict[str, Any] = {}
        self.shared_inputs: Dict[str, str] = {}
        self._runners: Dict[str, LossRunner] = {}

    # ---------------------------------------------------------------- bookkeeping
    def record(self, layer: str, **info) -> None:
        """Add per-layer entries to the report (tokens, eigenvalues, solver info, ...)."""
        self.layer_info.setdefault(layer, {}).update(info)

    @contextlib.contextmanager
    def timed(self, key: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - t0

    @property
    def batches(self) -> List[Any]:
        if self._batches is None:
            if self.dataloader is None:
                raise LoRAInitError("this method needs data: pass a dataloader")
            self._batches, self.n_examples = take_samples(self.dataloader, self.num_samples)
        return self._batches

    def dataset_length(self) -> Optional[int]:
        ds = getattr(self.dataloader, "dataset", None)
        try:
            return len(ds) if ds is not None else None
        except TypeError:
            return None

    def runner(self, token_mask: str = "attention") -> LossRunner:
        if token_mask not in self._runners:
            self._runners[token_mask] = LossRunner(self.model, self.loss_fn, token_mask)
        return self._runners[token_mask]

    @staticmethod
    def examples(batches: Sequence[Any]) -> int:
        from .collect import _leading_size

        return sum((_leading_size(b) or 1) for b in batches)

    def split_holdout(self, fraction: float) -> Tuple[List[Any], List[Any]]:
        """(statistics batches, held-out batches): the last ``max(1, round(fraction * #batches))`` batches."""
        b = self.batches
        if len(b) < 2:
            raise LoRAInitError(f"holding out samples to score the step size needs at least 2 batches, got {len(b)}; "
                                f"raise num_samples, lower the batch size, or set a numeric step_scale")
        k = min(len(b) - 1, max(1, int(round(fraction * len(b)))))
        return b[:-k], b[-k:]

    # ---------------------------------------------------------------- pass state
    @contextlib.contextmanager
    def pass_state(self, *, lora_enabled: bool = False, grad_weights: Sequence[str] = ()):
        """Freeze every parameter (except the base weights of ``grad_weights``), eval mode, LoRA off."""
        params = [(p, p.requires_grad, p.grad) for p in self.model.parameters()]
        modes = [(m, m.training) for m in self.model.modules()]
        flags = [(m, m._disable_adapters) for m in self.model.modules() if hasattr(m, "_disable_adapters")]
        try:
            for p, _, _ in params:
                p.requires_grad_(False)
            for name in grad_weights:
                w = self.targets[name].weight
                w.grad = None
                w.requires_grad_(True)
            self.model.eval()
            for m, _ in flags:
                m._disable_adapters = not lora_enabled
            yield
        finally:
            for p, rg, g in params:
                p.requires_grad_(rg)
                p.grad = g
            for m, training in modes:
                m.training = training
            for m, flag in flags:
                m._disable_adapters = flag

    # ---------------------------------------------------------------- forward / backward of one batch
    def _loss(self, runner: LossRunner, batch, index: int, collector: Optional[StatsCollector] = None,
              check_finite: bool = True):
        prepared = runner.prepare(batch)
        if collector is not None:
            collector.begin_batch(index)
        loss, count = runner.summed_loss(prepared, index)
        mask = runner.mask(prepared)
        if check_finite and not bool(torch.isfinite(loss.detach())):
            bad = collector.first_nonfinite_input() if collector is not None else None
            if bad is not None:
                raise LoRAInitError(f"module {bad!r}, batch {index}: its input has NaN/Inf activations")
            raise LoRAInitError(f"batch {index}: the loss is {float(loss)} (NaN/Inf activations or logits)")
        return loss, count, mask

    # ---------------------------------------------------------------- statistics
    def probe_shared_inputs(self, names: Sequence[str], token_mask: str = "attention") -> Dict[str, str]:
        """Which targets receive the same input tensor (layer -> owner), from one forward of batch 0."""
        runner = self.runner(token_mask)
        with self.pass_state(), torch.no_grad(), StatsCollector(self.targets, names, probe_only=True) as col:
            col.begin_batch(0)
            runner.summed_loss(runner.prepare(self.batches[0]), 0)
            col.end_forward(None)
        return dict(col.owner)

    def iter_stats(self, names: Optional[Sequence[str]] = None, *, batches: Optional[Sequence[Any]] = None,
                   max_memory: Optional[int] = None, dtype: torch.dtype = torch.float32, backend: str = "auto",
                   token_mask: str = "attention") -> Iterator[Dict[str, LayerStats]]:
        """K-FAC statistics of the targets ``names`` (all by default) over ``batches``.

        Yields one dict ``{name: LayerStats}`` per pass. With ``max_memory`` (bytes) below what the
        statistics of all layers need, the layers are split into groups (layers sharing an input
        stay together) and each group gets its own pass over the same batches.
        """
        names = list(self.names if names is None else names)
        batches = list(self.batches if batches is None else batches)
        if not batches:
            raise LoRAInitError("no batches for the statistics pass")
        groups = [names]
        if max_memory is not None:
            total = sum(stats_bytes(self.targets[n], dtype) for n in names)
            if total > max_memory:
                with self.timed("probe"):
                    shared = self.probe_shared_inputs(names, token_mask)
                groups = plan_groups(names, self.targets, shared, max_memory, dtype)
        self.info["passes"] = len(groups)
        for gi, group in enumerate(groups):
            desc = "lorainit statistics" + (f" (pass {gi + 1}/{len(groups)})" if len(groups) > 1 else "")
            yield self._stats_pass(group, batches, dtype=dtype, backend=backend, token_mask=token_mask, desc=desc)

    def collect_stats(self, names: Optional[Sequence[str]] = None, **kwargs) -> Dict[str, LayerStats]:
        """All layers' statistics as one dict (the groups of a memory budget are merged)."""
        out: Dict[str, LayerStats] = {}
        for part in self.iter_stats(names, **kwargs):
            out.update(part)
        return out

    def _stats_pass(self, names, batches, *, dtype, backend, token_mask, desc) -> Dict[str, LayerStats]:
        runner = self.runner(token_mask)
        t_pass = time.perf_counter()
        examples = 0
        with self.pass_state(), StatsCollector(self.targets, names, dtype=dtype, backend=backend) as col:
            bar = _progress(len(batches), desc, self.progress and self.rank == 0)
            try:
                for i, batch in enumerate(batches):
                    with torch.enable_grad():
                        loss, _, mask = self._loss(runner, batch, i, col)
                        col.end_forward(mask)
                        if not loss.requires_grad:
                            raise LoRAInitError(f"batch {i}: the loss does not depend on any LoRA target layer's output")
                        loss.backward()
                    col.end_batch()
                    examples += self.examples([batch])
                    bar.update(1)
            finally:
                bar.close()
            dist_utils.all_reduce_stats(col.stats)
            results = col.results()
            self.shared_inputs.update({n: col.owner[n] for n in names})
        if self.world > 1:
            examples = int(dist_utils.all_reduce_scalars([examples])[0])
        self.info["stats_examples"] = examples
        self.timings["stats_pass"] = self.timings.get("stats_pass", 0.0) + time.perf_counter() - t_pass
        self.timings["stats_kernels"] = self.timings.get("stats_kernels", 0.0) + col.kernel_time
        for name, st in results.items():
            self.record(name, tokens=st.count, shares_input_with=None if st.z_owner == name else st.z_owner)
        return results

    # ---------------------------------------------------------------- gradients and losses
    def collect_weight_grads(self, names: Optional[Sequence[str]] = None, *, batches: Optional[Sequence[Any]] = None,
                             token_mask: str = "attention") -> Tuple[Dict[str, Tensor], int]:
        """Full weight gradients ``(1/T) sum_t g_t x_t^T`` (m, n) of the targets (torch orientation, fp32).

        A plain forward/backward of the summed loss with only the target base weights requiring
        grad (LoRA branches off, eval mode); ``T`` is the number of valid tokens (attention mask).
        Returns ``({name: grad}, T)``; all-reduced across processes. The model's ``.grad`` fields
        are restored afterwards.
        """
        names = list(self.names if names is None else names)
        batches = list(self.batches if batches is None else batches)
        runner = self.runner(token_mask)
        acc = {n: torch.zeros(self.targets[n].m, self.targets[n].n, dtype=torch.float32,
                              device=self.targets[n].device) for n in names}
        tokens = 0
        with self.timed("weight_grads"), self.pass_state(grad_weights=names):
            bar = _progress(len(batches), "lorainit gradients", self.progress and self.rank == 0)
            try:
                for i, batch in enumerate(batches):
                    with torch.enable_grad():
                        loss, _, mask = self._loss(runner, batch, i)
                        if not loss.requires_grad:
                            raise LoRAInitError(f"batch {i}: the loss does not depend on any LoRA target weight")
                        loss.backward()
                    for n in names:
                        t = self.targets[n]
                        g = t.weight.grad
                        if g is None:
                            raise LoRAInitError(f"module {n!r}: no gradient reached its weight in batch {i}")
                        g = g.t() if t.transposed else g
                        if not bool(torch.isfinite(g).all()):
                            raise LoRAInitError(f"module {n!r}, batch {i}: NaN/Inf in the weight gradient")
                        acc[n] += g.float()
                        t.weight.grad = None
                    tokens += int(mask.sum()) if mask is not None else self._positions(batch)
                    bar.update(1)
            finally:
                bar.close()
        vals = dist_utils.all_reduce_scalars([tokens])
        dist_utils.all_reduce_sum(list(acc.values()))
        tokens = int(vals[0])
        if tokens <= 0:
            raise LoRAInitError("no valid tokens in the samples")
        return {n: a / tokens for n, a in acc.items()}, tokens

    def _positions(self, batch) -> int:
        from .collect import _leading_size

        if isinstance(batch, dict) and isinstance(batch.get("input_ids"), Tensor):
            return int(batch["input_ids"].numel())
        return _leading_size(batch) or 1

    @torch.no_grad()
    def eval_loss(self, batches: Sequence[Any], token_mask: str = "attention") -> float:
        """Mean loss over ``batches`` with the adapters as written (forward only, eval mode, LoRA on).

        The summed loss divided by its number of loss terms (loss tokens, or examples with a user
        ``loss_fn``), summed over processes.
        """
        runner = self.runner(token_mask)
        total, count = 0.0, 0
        with self.pass_state(lora_enabled=True):
            for i, batch in enumerate(batches):
                loss, c, _ = self._loss(runner, batch, i, check_finite=False)
                total += float(loss)
                count += c
        total, count = dist_utils.all_reduce_scalars([total, count])
        value = total / max(count, 1)
        return value if math.isfinite(value) else math.inf
