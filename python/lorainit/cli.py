"""lorainit: initialize a PEFT LoRA adapter from the command line.

    lorainit init --model DIR --data FILE.jsonl --method lora_da --rank 8 --alpha 16 \\
                  --target-modules q_proj,v_proj --num-samples 256 --out ADAPTER_DIR
    lorainit init ... --stats-cache stats.safetensors   # a sweep pays the statistics pass once
    lorainit methods            # the registered inits, what each needs, its paper
    lorainit demo               # the digits comparison (same as make demo)
    lorainit --version

init is a thin layer over lorainit.initialize_lora: the JSONL file becomes a torch DataLoader over
all its records (so N, the number of training tokens, is computed from the whole file, as the API
does for a dataloader with a dataset), method options come from --config FILE.json and --set
KEY=VALUE. Bad arguments and unreadable files print one line and exit with code 2. An init that
rewrote base weights (PiSSA, MiLoRA, LoRA-GA, preserve_output, ...) also saves the residual base model
to OUT/base_model, and the adapter's config names that directory (docs/saving.md).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional


class UsageError(Exception):
    """A problem with the user's arguments or files: one line on stderr, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``prog: error: message``, exit code 2) instead of the usage dump."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# ----------------------------------------------------------------------------- data
def read_records(path: Path, text_field: str) -> List[Any]:
    """Records of a JSON-lines file: texts (``text_field``, or prompt + completion) or pre-tokenized
    ``{"input_ids": [...], "labels": [...] (optional), "attention_mask": [...] (optional)}`` dicts."""
    if not path.is_file():
        raise UsageError(f"--data {path}: no such file")
    try:
        first = next((ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()), "")
        tokenized = isinstance(json.loads(first), dict) and "input_ids" in json.loads(first)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        tokenized = False
    if not tokenized:
        return read_texts(path, text_field)
    records = []
    for lineno, record in _json_lines(path):
        ids = record.get("input_ids") if isinstance(record, dict) else None
        if not (isinstance(ids, list) and ids and all(isinstance(i, int) and not isinstance(i, bool) for i in ids)):
            raise UsageError(f"--data {path}:{lineno}: expected 'input_ids' as a non-empty list of ints (the file's "
                             f"first record is pre-tokenized)")
        for key in ("labels", "attention_mask"):
            v = record.get(key)
            if v is not None and not (isinstance(v, list) and len(v) == len(ids) and all(isinstance(i, int) for i in v)):
                raise UsageError(f"--data {path}:{lineno}: {key!r} must be a list of {len(ids)} ints like input_ids")
        records.append({k: record[k] for k in ("input_ids", "labels", "attention_mask") if record.get(k) is not None})
    return records


def _json_lines(path: Path):
    """``(line number, record)`` of every non-empty line of a JSON-lines file (one-line UsageErrors)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"--data {path}: cannot read ({err})") from err
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as err:
            raise UsageError(f"--data {path}:{lineno}: not valid JSON ({err.msg})") from err


def read_texts(path: Path, text_field: str) -> List[str]:
    """Texts from a JSON-lines file: one object per line with ``text_field`` (or prompt + completion)."""
    if not path.is_file():
        raise UsageError(f"--data {path}: no such file")
    texts = []
    for lineno, record in _json_lines(path):
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


class Collate:
    """Pads a list of records into one causal-LM batch: ``input_ids``, ``attention_mask``, ``labels``.

    Text records are tokenized (truncated to ``max_length``); pre-tokenized ones are truncated too.
    Padding goes on the right with ``pad_id``; padded labels are -100, and a record without
    ``labels`` gets ``labels = input_ids``. ``padding="max_length"`` pads to ``max_length``.
    """

    def __init__(self, tokenizer, *, max_length: int, padding: str = "longest", pad_id: int = 0):
        self.tokenizer, self.max_length, self.padding, self.pad_id = tokenizer, max_length, padding, pad_id

    def __call__(self, records):
        import torch

        rows = []
        for rec in records:
            if isinstance(rec, str):
                ids = self.tokenizer(rec, truncation=True, max_length=self.max_length)["input_ids"]
                rec = {"input_ids": ids}
            ids = list(rec["input_ids"])[: self.max_length]
            labels = list(rec.get("labels", ids))[: self.max_length]
            am = list(rec.get("attention_mask", [1] * len(ids)))[: self.max_length]
            rows.append((ids, labels, am))
        width = self.max_length if self.padding == "max_length" else max(len(r[0]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        am = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (a, b, c) in enumerate(rows):
            ids[i, :len(a)] = torch.tensor(a)
            am[i, :len(a)] = torch.tensor(c)
            labels[i, :len(a)] = torch.tensor(b).masked_fill(torch.tensor(c) == 0, -100)
        return {"input_ids": ids, "attention_mask": am, "labels": labels}


def jsonl_dataloader(records: List[Any], tokenizer=None, *, batch_size: int = 8, max_length: int = 512,
                     padding: str = "longest", pad_id: int = 0):
    """A torch DataLoader over every record (in file order), batched by :class:`Collate`: what
    ``lorainit init`` passes to ``initialize_lora``; ``len(loader.dataset)`` is the number of records."""
    from torch.utils.data import DataLoader

    return DataLoader(records, batch_size=batch_size, shuffle=False,
                      collate_fn=Collate(tokenizer, max_length=max_length, padding=padding, pad_id=pad_id))


def parse_layers(text: Optional[str]) -> Optional[List[int]]:
    """``--layers 0,1,5-7`` as sorted layer indices (PEFT's ``layers_to_transform``); None without the flag."""
    if text is None:
        return None
    out = set()
    for part in (p.strip() for p in text.split(",")):
        lo, dash, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi) if dash else int(lo)
        except ValueError:
            raise UsageError(f"--layers {text!r}: expected layer indices like 0,1,4-7") from None
        if first < 0 or last < first:
            raise UsageError(f"--layers {text!r}: {part!r} is not a range of layer indices >= 0")
        out.update(range(first, last + 1))
    return sorted(out)


def parse_options(config_file: Optional[str], sets: List[str]) -> Dict[str, Any]:
    """Method options from ``--config FILE.json`` (an object) then ``--set KEY=VALUE`` (JSON values, else strings)."""
    opts: Dict[str, Any] = {}
    if config_file:
        try:
            data = json.loads(Path(config_file).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as err:
            raise UsageError(f"--config {config_file}: cannot read ({err})") from err
        except json.JSONDecodeError as err:
            raise UsageError(f"--config {config_file}: not valid JSON ({err.msg})") from err
        if not isinstance(data, dict):
            raise UsageError(f"--config {config_file}: expected a JSON object of method options")
        opts.update(data)
    for item in sets or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set {item!r}: expected KEY=VALUE, e.g. --set step_scale=0.01")
        try:
            opts[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            opts[key.strip()] = value
    return opts


def build_config(method: str, opts: Dict[str, Any]):
    """The method's config from ``opts`` (None without options); one-line UsageError for unknown or bad fields."""
    import dataclasses

    import torch

    from .registry import get_method

    if not opts:
        return None
    cls = get_method(method).config_cls
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(opts) - set(fields))
    if unknown:
        raise UsageError(f"--set/--config: {cls.__name__} has no option {', '.join(unknown)}; options: "
                         f"{', '.join(sorted(fields))}")
    for key, value in list(opts.items()):
        if isinstance(value, str) and value.startswith("torch.") and isinstance(getattr(torch, value[6:], None),
                                                                                torch.dtype):
            opts[key] = getattr(torch, value[6:])
        elif isinstance(value, list):
            opts[key] = tuple(value)
    try:
        return cls(**opts)
    except (TypeError, ValueError) as err:
        raise UsageError(f"--set/--config: {err}") from err


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


_DTYPES = ("float32", "bfloat16", "float16")


def cmd_init(args) -> int:
    import torch

    from .errors import LoRAInitError
    from .init import initialize_lora
    from .registry import methods

    known = {s["name"]: s for s in methods()}
    if args.method not in known:
        from .registry import get_method

        try:
            get_method(args.method)
        except LoRAInitError as err:  # names the closest registered method
            raise UsageError(f"--method: {err}") from None
    model_dir = Path(args.model)
    gguf = args.gguf_file
    if not (model_dir / "config.json").is_file() and not (gguf and (model_dir / gguf).is_file()):
        raise UsageError(f"--model {model_dir}: not a model directory (no config.json"
                         f"{'' if not gguf else f' and no {gguf}'})")
    if args.target_modules.strip() == "all-linear":
        targets: Any = "all-linear"
    else:
        targets = [t.strip() for t in args.target_modules.split(",") if t.strip()]
        if not targets:
            raise UsageError("--target-modules: give at least one module name, e.g. q_proj,v_proj, or all-linear")
    for name, value in (("--rank", args.rank), ("--num-samples", args.num_samples),
                        ("--batch-size", args.batch_size), ("--max-length", args.max_length)):
        if value < 1:
            raise UsageError(f"{name} must be a positive integer, got {value}")
    if not 0.0 <= args.lora_dropout < 1.0:
        raise UsageError(f"--lora-dropout must be in [0, 1), got {args.lora_dropout}")
    if args.lora_lr is not None and not (math.isfinite(args.lora_lr) and args.lora_lr > 0):
        raise UsageError(f"--lora-lr must be a finite number > 0, got {args.lora_lr}")
    layers = parse_layers(args.layers)
    if args.num_threads is not None:
        if args.num_threads < 1:
            raise UsageError(f"--num-threads must be a positive integer, got {args.num_threads}")
        torch.set_num_threads(args.num_threads)
    spec = known[args.method]
    config = build_config(args.method, parse_options(args.config, args.set))
    records = read_records(Path(args.data), args.text_field) if args.data else None
    if spec["needs_data"] and records is None:
        raise UsageError(f"--data is required for --method {args.method}")
    try:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("CUDA is not available")
    except RuntimeError as err:
        raise UsageError(f"--device {args.device}: {str(err).splitlines()[0]}") from err

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bar shows the pass that takes time
    torch.manual_seed(args.seed)
    extra = {"gguf_file": gguf} if gguf else {}
    needs_tokenizer = records is not None and any(isinstance(r, str) for r in records[:1])
    tokenizer = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True, **extra)
    except Exception as err:  # noqa: BLE001 - tokenizers fail in many ways; one line is what the user needs
        if needs_tokenizer:
            raise UsageError(f"--model {model_dir}: no usable tokenizer ({type(err).__name__}: "
                             f"{(str(err).splitlines() or [''])[0][:160]}); add the tokenizer files or pass "
                             f"pre-tokenized JSONL with 'input_ids'") from err
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True,
                                                     dtype=getattr(torch, args.dtype), **extra)
    except (OSError, ValueError, ImportError) as err:
        raise UsageError(f"--model {model_dir}: cannot load ({(str(err).splitlines() or [''])[0]})") from err
    model.to(device)
    if layers is not None:
        n_layers = getattr(model.config, "num_hidden_layers", None)
        bad = [i for i in layers if n_layers is not None and i >= n_layers]
        if bad:
            raise UsageError(f"--layers {args.layers}: the model has {n_layers} layers (0..{n_layers - 1}), "
                             f"no layer {bad}")
    if targets != "all-linear":
        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        missing = [t for t in targets if t not in names]
        if missing:
            raise UsageError(f"--target-modules: {missing} not found in the model")
    try:
        peft_model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=targets,
                                                      use_rslora=args.rslora, lora_dropout=args.lora_dropout,
                                                      layers_to_transform=layers, task_type="CAUSAL_LM"))
    except ValueError as err:  # e.g. no target module in the chosen --layers
        raise UsageError(f"--target-modules/--layers: PEFT: {(str(err).splitlines() or [''])[0][:200]}") from err
    if args.max_memory is not None:
        if config is None:
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
    if records is not None:
        pad_id = 0
        if tokenizer is not None:
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
            if tokenizer.pad_token is None and needs_tokenizer:
                raise UsageError("--model: the tokenizer has no pad, eos or unk token to pad with")
            pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        loader = jsonl_dataloader(records, tokenizer, batch_size=args.batch_size, max_length=args.max_length,
                                  padding=args.padding, pad_id=pad_id)
    report = initialize_lora(peft_model, loader, method=args.method, config=config, num_samples=args.num_samples,
                             progress=not args.quiet, stats_cache=args.stats_cache)
    from .adapters import save_adapter

    out = save_adapter(peft_model, Path(args.out), report, tokenizer=tokenizer, base_model_name_or_path=str(model_dir))
    if not args.quiet:
        print(report)
        print(closing_message(out, report, args.method))
        print(lr_message(report, args.lora_lr))
    return 0


def lr_message(report, lora_lr) -> str:
    """The learning rate to train this init with (``report.lr_scale``; docs/learning-rate.md)."""
    scale = report.lr_scale
    if scale is None:
        return f"no learning-rate scale for this init: {report.info.get('lr_scale', {}).get('reason', '')}"
    if lora_lr is None:
        return (f"learning rate: {scale:.3g} x the rate you would use with plain LoRA (lr_scale; pass --lora-lr "
                f"to get the number)")
    return f"learning rate: {report.suggest_lr(lora_lr):.3g} (lr_scale {scale:.3g} x plain LoRA's {lora_lr:g})"


def closing_message(out: Path, report, method: str) -> str:
    """What ``lorainit init`` says after saving: where the adapter is and on which base it loads."""
    load = (f"load it with AutoPeftModelForCausalLM.from_pretrained({str(out)!r}), which reads the base from its "
            f"adapter_config.json")
    if not report.info.get("base_modified"):
        return f"wrote a PEFT adapter to {out}; {load}, or PeftModel.from_pretrained(base, {str(out)!r})"
    base_dir = out.resolve() / "base_model"
    return (f"wrote a PEFT adapter to {out} and the residual base model it belongs to to {base_dir} ({method} "
            f"rewrote base weights); {load}, or PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("
            f"{str(base_dir)!r}), {str(out)!r}). On the original model it gives a different model: after training, "
            f"lorainit.save_for_original_base(model, 'final', {str(out)!r}) converts it to a plain LoRA adapter for "
            f"the original model (PEFT's path_initial_model_for_weight_conversion; docs/saving.md)")


def cmd_demo(args) -> int:
    from .examples import digits_demo

    return digits_demo.run(args)


def build_parser() -> argparse.ArgumentParser:
    from .examples import digits_demo

    from . import __version__

    parser = _Parser(prog="lorainit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"lorainit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("init", help="initialize a LoRA adapter for a local model and save it (PEFT format)")
    p.add_argument("--model", required=True, help="a local transformers model directory (config.json, weights, tokenizer)")
    p.add_argument("--gguf-file", help="load the model (and tokenizer) from this GGUF file inside --model")
    p.add_argument("--data", help="JSON-lines file: a 'text' field per line (or 'prompt' + 'completion'), or "
                                  "pre-tokenized 'input_ids' (optional 'labels', -100 = no loss)")
    p.add_argument("--text-field", default="text", help="field holding the text (default: %(default)s)")
    p.add_argument("--method", default="lora_da", help="init method, see: lorainit methods (default: %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a method option (repeatable), e.g. --set step_scale=0.01; values are JSON, else strings")
    p.add_argument("--config", metavar="FILE.json", help="method options as a JSON object (--set overrides them)")
    p.add_argument("--device", default="cpu", help="device for the model and the init (default: %(default)s)")
    p.add_argument("--dtype", choices=_DTYPES, default="float32", help="model dtype (default: %(default)s)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r (default: %(default)s)")
    p.add_argument("--alpha", type=float, default=16, help="lora_alpha (default: %(default)s)")
    p.add_argument("--rslora", action="store_true", help="rsLoRA scaling alpha/sqrt(r)")
    p.add_argument("--lora-lr", type=float, default=None,
                   help="the learning rate you would use with plain LoRA: the closing message gives this init's")
    p.add_argument("--lora-dropout", type=float, default=0.0,
                   help="lora_dropout written to the adapter config, used in training (default: %(default)s)")
    p.add_argument("--layers", metavar="I,J,K-L", default=None,
                   help="only these decoder layers (PEFT's layers_to_transform), e.g. 0,1 or 0-3 (default: all)")
    p.add_argument("--num-threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (torch.set_num_threads); on a machine shared with other jobs, 1 can be "
                        "several times faster than the default (docs/performance.md)")
    p.add_argument("--target-modules", required=True,
                   help="comma-separated module names, e.g. q_proj,v_proj, or all-linear")
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
    p.add_argument("--stats-cache", metavar="PATH", default=None,
                   help="save the K-FAC statistics to PATH (a .safetensors file) and reuse them on the next call "
                        "with the same model, targets and data, without a statistics pass (LoRA-DA); a cache that "
                        "does not match is refused: delete it or pass another path")
    p.add_argument("--dry-run", action="store_true",
                   help="print the memory plan (passes, groups, peak bytes) and exit; refuses a --max-memory "
                        "below one layer's working set, naming the smallest budget that works")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("methods", help="list the registered init methods")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("demo", help="compare the inits on the digits task, or on SmolLM2-135M with --model smollm2 "
                                    "(a table and a PNG)")
    p.add_argument("--model", choices=("digits", "smollm2"), default="digits",
                   help="digits: fine-tune an MLP from each init (default); smollm2: every init on the bundled "
                        "SmolLM2-135M, its time and held-out loss right after init (needs lorainit[real]; "
                        "'lorainit demo --model smollm2 --help' lists its options)")
    digits_demo.build_parser(p)
    p.set_defaults(func=cmd_demo)

    return parser


def _smollm2_demo_argv(argv: List[str]) -> Optional[List[str]]:
    """The SmolLM2 demo's own arguments when ``argv`` is ``demo --model smollm2 ...`` (it has other options)."""
    if not argv or argv[0] != "demo":
        return None
    rest = list(argv[1:])
    for i, a in enumerate(rest):
        if a == "--model" and i + 1 < len(rest) and rest[i + 1] == "smollm2":
            return rest[:i] + rest[i + 2:]
        if a == "--model=smollm2":
            return rest[:i] + rest[i + 1:]
    return None


def main(argv: Optional[List[str]] = None) -> int:
    llm_args = _smollm2_demo_argv(list(sys.argv[1:] if argv is None else argv))
    if llm_args is not None:
        from .examples import smollm2_demo

        try:
            return smollm2_demo.main(llm_args)
        except ImportError as err:  # the [real] extra is missing: its message names it
            print(f"lorainit demo: error: {err}", file=sys.stderr)
            return 2
        except SystemExit as exit_:  # --help, or argparse's one-line error
            return int(exit_.code or 0)
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
