"""``lorainit``: initialize a PEFT LoRA adapter from the command line.

    lorainit init --model DIR --data FILE.jsonl --method lora_da --rank 8 --alpha 16 \\
                  --target-modules q_proj,v_proj --num-samples 256 --out ADAPTER_DIR
    lorainit methods            # the registered inits, what each needs, its paper
    lorainit demo               # the digits comparison (same as `make demo`)
    lorainit bench              # says where the benchmarks live: `make bench` in a source checkout

Bad arguments and unreadable files print one line and exit with code 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional


class UsageError(Exception):
    """A problem with the user's arguments or files: one line on stderr, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``prog: error: message``, exit code 2) instead of the usage dump."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# ----------------------------------------------------------------------------- data
def read_texts(path: Path, text_field: str) -> List[str]:
    """Texts from a JSON-lines file: one object per line with ``text_field`` (or prompt + completion)."""
    if not path.is_file():
        raise UsageError(f"--data {path}: no such file")
    texts = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"--data {path}: cannot read ({err})") from err
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UsageError(f"--data {path}:{lineno}: not valid JSON ({err.msg})") from err
        if isinstance(record, dict) and isinstance(record.get(text_field), str):
            texts.append(record[text_field])
        elif isinstance(record, dict) and isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
            texts.append(record["prompt"] + record["completion"])
        else:
            raise UsageError(f"--data {path}:{lineno}: expected an object with a string field {text_field!r} "
                             f"(or 'prompt' and 'completion')")
    if not texts:
        raise UsageError(f"--data {path}: no records")
    return texts


def tokenized_batches(tokenizer, texts: List[str], *, batch_size: int, max_length: int, padding: str):
    """Causal-LM batches: ``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    if tokenizer.pad_token is None:
        raise UsageError("--model: the tokenizer has no pad, eos or unk token to pad with")
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], return_tensors="pt", truncation=True, max_length=max_length,
                        padding="max_length" if padding == "max_length" else "longest")
        labels = enc["input_ids"].clone()
        labels[enc["attention_mask"] == 0] = -100
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})
    return out


# ----------------------------------------------------------------------------- commands
def cmd_methods(args) -> int:
    from .registry import methods

    rows = [("method", "data", "gradients", "training steps", "paper")]
    for s in methods():
        rows.append((s["name"], _yes(s["needs_data"]), _yes(s["needs_grad"]), _yes(s["needs_training"]), s["paper"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def _yes(flag: bool) -> str:
    return "yes" if flag else "-"


def cmd_init(args) -> int:
    import torch

    from .init import initialize_lora
    from .registry import methods

    known = {s["name"]: s for s in methods()}
    if args.method not in known:
        raise UsageError(f"--method {args.method!r}: not registered; choose one of {sorted(known)}")
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise UsageError(f"--model {model_dir}: not a model directory (no config.json)")
    targets = [t.strip() for t in args.target_modules.split(",") if t.strip()]
    if not targets:
        raise UsageError("--target-modules: give at least one module name, e.g. q_proj,v_proj")
    for name, value in (("--rank", args.rank), ("--num-samples", args.num_samples),
                        ("--batch-size", args.batch_size), ("--max-length", args.max_length)):
        if value < 1:
            raise UsageError(f"{name} must be a positive integer, got {value}")
    spec = known[args.method]
    texts = read_texts(Path(args.data), args.text_field) if args.data else None
    if spec["needs_data"] and texts is None:
        raise UsageError(f"--data is required for --method {args.method}")

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bar shows the pass that takes time
    torch.manual_seed(args.seed)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, torch_dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise UsageError(f"--model {model_dir}: cannot load ({str(err).splitlines()[0]})") from err
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        raise UsageError(f"--target-modules: {missing} not found in the model")
    peft_model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=targets,
                                                  use_rslora=args.rslora, lora_dropout=0.0, task_type="CAUSAL_LM"))
    config = None
    if args.max_memory is not None:
        from .registry import get_method

        config = get_method(args.method).config_cls()
        if not hasattr(config, "max_memory"):
            raise UsageError(f"--max-memory: method {args.method!r} has no memory budget")
        config = config.replace(max_memory=int(args.max_memory * (1 << 20)))
    if args.dry_run:
        from .memory import estimate_memory

        print(estimate_memory(peft_model, args.method, config))
        return 0
    loader = None
    if texts is not None:
        loader = tokenized_batches(tokenizer, texts, batch_size=args.batch_size, max_length=args.max_length,
                                   padding=args.padding)
    report = initialize_lora(peft_model, loader, method=args.method, config=config, num_samples=args.num_samples,
                             progress=not args.quiet)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    changed_base = bool(report.info.get("base_modified", False))
    if changed_base:
        # The init moved part of W into the adapter (PiSSA, MiLoRA, LoRA-GA, preserve_output): the
        # adapter is only meaningful on the residual base, which is saved beside it.
        base_dir = out / "base_model"
        _save_residual_base(peft_model, base_dir)
        tokenizer.save_pretrained(base_dir)
    peft_model.save_pretrained(out, safe_serialization=True)
    report.to_json(out / "lorainit_report.json")
    if not args.quiet:
        print(report)
        where = f" on the residual base model in {out / 'base_model'}" if changed_base else ""
        print(f"wrote a PEFT adapter to {out}{where}; load it with PeftModel.from_pretrained(base, {str(out)!r})")
    return 0


def residual_base_state_dict(peft_model) -> dict:
    """The base model's state dict as the plain model names it, with the init's base-weight changes and
    without the LoRA tensors: views of the live parameters, nothing copied.

    PEFT names a wrapped layer's weight ``<layer>.base_layer.weight``; the plain model names it
    ``<layer>.weight``. Every ``lora_*`` entry (and PEFT's per-adapter containers) is dropped.
    """
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    out = {}
    for key, value in base.state_dict(keep_vars=True).items():
        parts = key.split(".")
        if any(p.startswith("lora_") for p in parts):
            continue
        out[".".join(p for p in parts if p != "base_layer")] = value.detach()
    return out


def _save_residual_base(peft_model, base_dir) -> None:
    """Save the residual base model (the init's base weights, no LoRA layers) without copying the model."""
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    base.save_pretrained(base_dir, state_dict=residual_base_state_dict(peft_model), safe_serialization=True)


def cmd_demo(args) -> int:
    from .examples import digits_demo

    return digits_demo.run(args)


def cmd_bench(args) -> int:
    print("the benchmarks are not part of the installed package: in a source checkout run `make bench` "
          "(or `python -m bench.run [--quick] [name ...]`)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .examples import digits_demo

    parser = _Parser(prog="lorainit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("init", help="initialize a LoRA adapter for a local model and save it (PEFT format)")
    p.add_argument("--model", required=True, help="a local transformers model directory (config.json, weights, tokenizer)")
    p.add_argument("--data", help="JSON-lines file with a 'text' field per line (or 'prompt' + 'completion')")
    p.add_argument("--text-field", default="text", help="field holding the text (default: %(default)s)")
    p.add_argument("--method", default="lora_da", help="init method, see `lorainit methods` (default: %(default)s)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r (default: %(default)s)")
    p.add_argument("--alpha", type=float, default=16, help="lora_alpha (default: %(default)s)")
    p.add_argument("--rslora", action="store_true", help="rsLoRA scaling alpha/sqrt(r)")
    p.add_argument("--target-modules", required=True, help="comma-separated module names, e.g. q_proj,v_proj")
    p.add_argument("--num-samples", type=int, default=256, help="statistics samples (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="batch size of the statistics pass (default: %(default)s)")
    p.add_argument("--max-length", type=int, default=512, help="truncate texts to this many tokens (default: %(default)s)")
    p.add_argument("--padding", choices=("longest", "max_length"), default="longest",
                   help="pad each batch to its longest text or to --max-length (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--out", required=True, help="output directory for the adapter (safetensors)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or report")
    p.add_argument("--max-memory", type=float, default=None,
                   help="MiB bounding the init's peak above the model and one forward/backward (LoRA-DA)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the memory plan (passes, groups, peak bytes) and exit; refuses a --max-memory "
                        "below one layer's working set, naming the smallest budget that works")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("methods", help="list the registered init methods")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("demo", help="compare the inits on the digits task (a table and a PNG)")
    digits_demo.build_parser(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="where the microbenchmarks are (`make bench` in a source checkout)")
    p.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)  # the old flags, accepted and ignored
    p.add_argument("names", nargs="*", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse already printed its one-line message
        return int(exit_.code or 0)
    if args.command is None:
        parser.print_help()
        return 2
    from .targets import LoRAInitError

    try:
        return args.func(args)
    except (UsageError, LoRAInitError) as err:  # bad arguments, files, or a model/data the init cannot take
        print(f"lorainit {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
