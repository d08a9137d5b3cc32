"""Drop-in for transformers' ``Trainer``: initialize the LoRA adapters before the first optimizer step.

    trainer = Trainer(model=peft_model, args=args, train_dataset=ds,
                      callbacks=[LoRAInitCallback(method="lora_da", num_samples=256)])
    trainer.train()

The callback runs ``initialize_lora`` once, at ``on_train_begin``, on the trainer's own train
dataloader (so batches come collated and on the trainer's device). The optimizer was already built
by then, but holds no state yet, and the adapters are written in place, so it trains the
initialized values. Resuming from a checkpoint (``global_step > 0``) skips the initialization.

TRL's ``SFTTrainer`` (docs/qlora-trl-accelerate.md): the same callback, also when TRL builds the
PEFT model itself (``peft_config=``); its batches carry the completion-only / assistant-only masks
as ``labels == -100`` (the loss is over the other tokens), and packed (padding-free) batches keep
their sequences apart (``position_ids``; ``num_samples`` counts sequences). A 4-bit/8-bit
(bitsandbytes) base works as well (:mod:`lorainit.quant`). With ``bf16=True`` (TRL's default)
accelerate runs the model's forward under bf16 autocast, so the statistics are computed in it too.

Multi-process runs: every rank initializes from its own train dataloader (``num_samples`` is the
total over ranks); ``accelerate launch`` with DDP is tested (examples/accelerate, equal to one
process on the union of the data). With the Trainer's FSDP2 (accelerate, GPUs only) the callback
sees the sharded model and goes through lorainit's DTensor path, but that combination was not run
here (accelerate enables no FSDP on CPU processes); the tested recipe is to call ``initialize_lora``
on the unsharded PEFT model on every rank first and shard afterwards (docs/distributed.md).
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Callable, Optional, Union

try:
    from transformers import TrainerCallback
except ImportError as err:  # pragma: no cover - exercised only without transformers
    raise ImportError("lorainit.LoRAInitCallback needs transformers (pip install 'lorainit[peft]')") from err

from ..errors import LoRAInitWarning


class LoRAInitCallback(TrainerCallback):
    """Run ``lorainit.initialize_lora(model, train_dataloader, method, config, ...)`` at train begin.

    Args:
        method: a registered method name (``lorainit.methods()``), e.g. ``"lora_da"`` or ``"hrp"``.
        config: the method's config dataclass (``LoRADAConfig``, ``HRPConfig``, ...), or None for defaults.
        num_samples: statistics samples drawn from the train dataloader.
        loss_fn: optional ``loss_fn(model, batch) -> summed loss``; by default the model's own loss
            (``labels`` in the batch), rescaled to the summed-loss convention.
        progress: show a progress bar (only on the main process).
        adapter, loss_reduction, stats_cache: passed to ``initialize_lora`` (which adapter, what
            ``loss_fn`` returns, a K-FAC statistics cache file).
        print_report: print the report's table on the main process when the init is done.
        report_path: also save the report as JSON there (main process), e.g.
            ``f"{args.output_dir}/lorainit_report.json"``; ``InitReport.from_json`` reads it back.
        scale_lr: multiply the optimizer's learning rate (and its scheduler's base rates) by the
            report's ``lr_scale`` after the init, i.e. treat ``args.learning_rate`` as the rate you
            would use with plain LoRA (docs/learning-rate.md). Off by default: the suggested rate is
            printed and kept in ``report.info["lr_scale"]``.
    The report of the run is kept in ``callback.report``.
    """

    def __init__(self, method: str = "lora_da", config: Any = None, *, num_samples: int = 256,
                 loss_fn: Optional[Callable] = None, progress: bool = True, adapter: Optional[str] = None,
                 loss_reduction: Optional[str] = None, stats_cache: Optional[Union[str, "os.PathLike[str]"]] = None,
                 print_report: bool = True, report_path: Optional[Union[str, "os.PathLike[str]"]] = None,
                 scale_lr: bool = False):
        from ..errors import LoRAInitError
        from ..registry import get_method

        try:
            get_method(method)
        except LoRAInitError as err:  # names the closest registered method
            raise LoRAInitError(f"LoRAInitCallback: {err}") from None
        self.method = method
        self.config = config
        self.num_samples = num_samples
        self.loss_fn = loss_fn
        self.progress = progress
        self.adapter = adapter
        self.loss_reduction = loss_reduction
        self.stats_cache = stats_cache
        self.print_report = print_report
        self.report_path = report_path
        self.scale_lr = bool(scale_lr)
        self.report = None

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, optimizer=None,
                       lr_scheduler=None, **kwargs):
        if state.global_step > 0:
            return control  # resumed run: the adapters come from the checkpoint
        if model is None or train_dataloader is None:
            raise RuntimeError("LoRAInitCallback: the Trainer passed no model or train dataloader to on_train_begin")
        from ..init import initialize_lora

        was_training = model.training
        self.report = initialize_lora(model, train_dataloader, method=self.method, config=self.config,
                                      num_samples=self.num_samples, loss_fn=self.loss_fn,
                                      progress=self.progress and state.is_world_process_zero, adapter=self.adapter,
                                      loss_reduction=self.loss_reduction, stats_cache=self.stats_cache)
        model.train(was_training)
        lr_note = self._apply_lr_scale(args, optimizer, lr_scheduler)
        if state.is_world_process_zero:
            if self.print_report:
                print(self.report)
                print(lr_note)
            if self.report_path is not None:
                self.report.to_json(self.report_path)
        return control

    def _apply_lr_scale(self, args, optimizer, lr_scheduler) -> str:
        """With ``scale_lr``, the optimizer's rates times ``lr_scale``; a line saying what was done or suggested."""
        info = self.report.info.setdefault("lr_scale", {})
        scale = self.report.lr_scale
        if scale is None:
            msg = (f"lorainit: no learning-rate scale for {self.method!r} ({info.get('reason', 'none computed')}); "
                   f"the optimizer's rate is unchanged")
            if self.scale_lr:
                info["applied"] = False
                warnings.warn(msg, LoRAInitWarning, stacklevel=2)
            return msg
        if not self.scale_lr:
            return (f"lorainit: lr_scale {scale:.3g}: for this init use learning_rate {args.learning_rate * scale:.3g} "
                    f"if {args.learning_rate:g} suits plain LoRA (LoRAInitCallback(scale_lr=True) applies it)")
        if optimizer is None:
            raise RuntimeError("LoRAInitCallback(scale_lr=True): the Trainer passed no optimizer to on_train_begin")
        for group in optimizer.param_groups:
            group["lr"] *= scale
            if "initial_lr" in group:
                group["initial_lr"] *= scale
        sched = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate wraps the scheduler
        if sched is not None and hasattr(sched, "base_lrs"):
            sched.base_lrs = [lr * scale for lr in sched.base_lrs]
        info["applied"] = {"from": args.learning_rate, "to": args.learning_rate * scale}
        return f"lorainit: learning rate {args.learning_rate:g} -> {args.learning_rate * scale:.3g} (lr_scale {scale:.3g})"
