"""The data passes a method runs over the model, one small unit each.

* :mod:`~lorainit.passes.batches`: the statistics samples (first ``num_samples`` examples,
  materialized once), example and token counts, moving batches to the model's device.
* :mod:`~lorainit.passes.state`: the model's state during a pass (parameters frozen, eval mode,
  LoRA branches off unless asked) and its restoration; the progress bar.
* :mod:`~lorainit.passes.loss`: :class:`~lorainit.passes.loss.LossRunner` (the summed loss and
  token mask of a batch, with the model's loss normalization detected once) and the eval pass
  :func:`~lorainit.passes.loss.eval_loss`.
* :mod:`~lorainit.passes.stats`: the statistics pass (hooks -> ``KFACStats``), shared-input
  detection and the grouping of layers under a memory budget.
* :mod:`~lorainit.passes.grads`: the weight-gradient pass.

Methods reach them through :class:`lorainit.context.InitContext`, which binds them to one model,
its targets and its data (and reads or saves the statistics through :mod:`lorainit.cache` when the
call has a ``stats_cache``).
"""
