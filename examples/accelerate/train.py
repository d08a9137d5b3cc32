"""A short transformers Trainer run with LoRAInitCallback, for ``accelerate launch`` (docs/qlora-trl-accelerate.md).

    accelerate launch --config_file examples/accelerate/ddp.yaml   examples/accelerate/train.py --model PATH --data FILE
    accelerate launch --config_file examples/accelerate/fsdp2.yaml examples/accelerate/train.py --model PATH --data FILE
    python examples/accelerate/train.py --model PATH --data FILE          # one process

``--model``: a causal LM folder (with its tokenizer); ``--data``: a JSON-lines file of ``{"text": ...}``
records. Every process initializes the adapters from its own shard of the Trainer's dataloader;
``--num-samples`` is the total over the processes, so the adapters equal those of one process on
the union of the data. ``--save FILE`` writes the adapters as initialized (before the first
optimizer step, gathered from the FSDP2 shards) and the report's summary (rank 0).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="causal LM folder with its tokenizer")
    p.add_argument("--data", required=True, help='JSON-lines file of {"text": ...} records')
    p.add_argument("--method", default="lora_da", help="a lorainit method (lorainit.methods())")
    p.add_argument("--num-samples", type=int, default=256, help="statistics samples, total over all processes")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank")
    p.add_argument("--batch-size", type=int, default=4, help="per-device train batch size")
    p.add_argument("--max-steps", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--output-dir", default="lorainit-accelerate-out")
    p.add_argument("--save", default=None, help="write the initialized adapters here (safetensors, rank 0)")
    return p.parse_args(argv)


def method_config(method: str):
    """Settings that make the init independent of how the samples are split into batches and processes."""
    from lorainit import LoRADAConfig

    if method == "lora_da":  # a fixed step and the dense solver: the statistics are sums over the samples
        return LoRADAConfig(step_scale=0.5, solver="eigh", n_train=10_000)
    return None


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # FSDP2 parameters are DTensors


def main(argv=None):
    args = parse_args(argv)
    try:
        import accelerate
        from datasets import load_dataset
    except ImportError as err:
        raise ImportError(f"this recipe needs accelerate and datasets: pip install 'lorainit[trl]' ({err})") from err
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, Trainer,
                              TrainerCallback, TrainingArguments)

    from lorainit import LoRAInitCallback
    from lorainit.models import LLAMA_PROJECTIONS

    targs = TrainingArguments(output_dir=args.output_dir, per_device_train_batch_size=args.batch_size,
                              max_steps=args.max_steps, learning_rate=args.lr, report_to=[], save_strategy="no",
                              logging_steps=1, seed=0, use_cpu=not torch.cuda.is_available())
    state = targs.distributed_state
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and "FSDP" not in str(state.distributed_type):
        # say it instead of training with plain DDP
        raise SystemExit(f"the accelerate config asks for FSDP, but accelerate {accelerate.__version__} set up "
                         f"{state.distributed_type} (it enables FSDP only on GPUs/accelerators, not for CPU "
                         f"processes); use ddp.yaml on CPUs")
    tok = AutoTokenizer.from_pretrained(args.model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    data = load_dataset("json", data_files=args.data, split="train")
    data = data.map(lambda r: tok(r["text"], truncation=True, max_length=args.max_length),
                    remove_columns=data.column_names)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                             target_modules=LLAMA_PROJECTIONS, task_type="CAUSAL_LM"))

    class _Save(TrainerCallback):
        def on_train_begin(self, targs, state, control, model=None, **kw):
            # every rank gathers (a collective), rank 0 writes
            lora = {k: v.detach() for k, v in model.state_dict().items() if "lora_" in k}
            sharded = any(hasattr(v, "full_tensor") for v in lora.values())
            factors = {k: _full(v).cpu().contiguous() for k, v in lora.items()}
            if args.save and state.is_world_process_zero:
                save_file(factors, args.save)
                run = {"distributed_type": str(trainer.accelerator.distributed_type), "sharded": sharded,
                       "report": init.report.info}
                Path(args.save).with_suffix(".json").write_text(json.dumps(run, default=str))

    init = LoRAInitCallback(args.method, method_config(args.method), num_samples=args.num_samples, progress=False,
                            print_report=False)
    trainer = Trainer(model=model, args=targs, train_dataset=data,
                      data_collator=DataCollatorForLanguageModeling(tok, mlm=False), callbacks=[init, _Save()])
    trainer.train()


if __name__ == "__main__":
    main()
