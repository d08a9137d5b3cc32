"""Every registered init on the bundled SmolLM2-135M: init time and held-out loss right after init.

``python -m lorainit.examples.smollm2_demo [--samples 64] [--out demo-output]`` (``make demo-llm``,
``lorainit demo --model smollm2``). LoRA r=8 / alpha=16 on all 7 projections of all 30 layers;
the data-aware inits see ``--samples`` generated arithmetic word problems
(``lorainit.examples.arithmetic``), the loss is scored on ``--heldout`` other problems (answer
tokens). Prints a Markdown table and writes ``smollm2_init.png`` (a bar chart) and
``smollm2_init.md`` under ``--out``. About 2 minutes on 2 cores with the defaults.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch

from lorainit.models import LLAMA_PROJECTIONS



def _config(name: str, hrp_steps: int):
    from lorainit import HRPConfig

    if name == "hrp":  # a short preheat: the demo is about init cost, not HRP's default 200 steps
        return HRPConfig(rank=32, steps=hrp_steps, lr=5e-4, seed=0)
    return None


def run(methods: Optional[List[str]] = None, *, samples: int = 64, heldout: int = 32, rank: int = 8,
        batch_size: int = 8, hrp_steps: int = 8, layers: Optional[List[int]] = None, progress: bool = True):
    """Rows ``{method, init s, held-out loss, vs base}`` plus the base model's loss."""
    from peft import LoraConfig, get_peft_model

    import lorainit
    from lorainit import initialize_lora
    from lorainit.examples import arithmetic as ar
    from lorainit.models import load_smollm2

    base, tok = load_smollm2(torch.float32)
    train, test = ar.split_problems(samples, heldout, seed=11)
    loader = ar.make_loader(train, tok, batch_size=batch_size)
    held = list(ar.make_loader(test, tok, batch_size=16))
    names = methods or [m["name"] for m in lorainit.methods()]
    cfg = dict(r=rank, lora_alpha=2 * rank, target_modules=LLAMA_PROJECTIONS, lora_dropout=0.0)
    if layers:
        cfg.update(layers_to_transform=list(layers), layers_pattern="layers")
    base_loss = ar.answer_loss(get_peft_model(copy.deepcopy(base), LoraConfig(**cfg)), held)
    rows = []
    for name in names:
        torch.manual_seed(0)
        model = get_peft_model(copy.deepcopy(base), LoraConfig(**cfg))
        t0 = time.perf_counter()
        report = initialize_lora(model, loader, method=name, config=_config(name, hrp_steps), num_samples=samples,
                                 progress=False)
        dt = time.perf_counter() - t0
        loss = ar.answer_loss(model, held)
        row = {"method": name, "init s": dt, "held-out loss": loss, "vs base": loss - base_loss}
        eta = report.info.get("step_scale")
        row["note"] = f"eta={eta:.3g}" if isinstance(eta, float) else ""
        rows.append(row)
        if progress:
            print(f"{name}: init {dt:.1f} s, held-out loss {loss:.4g}", flush=True)
        del model
    return rows, base_loss


def markdown(rows, base_loss) -> str:
    out = [f"Base model (no adapter update): held-out loss {base_loss:.4g}", "",
           "| method | init s | held-out loss | vs base | note |", "|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['method']} | {r['init s']:.2f} | {r['held-out loss']:.4g} | {r['vs base']:+.3g} | {r['note']} |")
    return "\n".join(out)


def plot(rows, base_loss, path, title: str = "SmolLM2-135M, LoRA r=8 on 7 projections x 30 layers") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    names = [r["method"] for r in rows]
    a1.bar(names, [r["held-out loss"] for r in rows], color="tab:blue")
    a1.axhline(base_loss, color="k", ls="--", lw=1, label="base model")
    a1.set_ylabel("held-out loss right after init")
    a1.legend(fontsize=8)
    a2.bar(names, [r["init s"] for r in rows], color="tab:orange")
    a2.set_ylabel("init time (s)")
    for ax in (a1, a2):
        ax.tick_params(axis="x", rotation=45, labelsize=8)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    """The options of ``lorainit demo --model smollm2``."""
    p = argparse.ArgumentParser(prog="lorainit demo --model smollm2", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=None, help="comma-separated (default: every registered method)")
    p.add_argument("--samples", type=int, default=64,
                   help="arithmetic problems the data-aware inits see (default: %(default)s)")
    p.add_argument("--heldout", type=int, default=32,
                   help="other problems on which the loss after init is scored (default: %(default)s)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r, lora_alpha = 2r (default: %(default)s)")
    p.add_argument("--hrp-steps", type=int, default=8,
                   help="HRP preheat steps (a short preheat: the demo compares init cost; default: %(default)s)")
    p.add_argument("--layers", default=None, help="comma-separated layer indices (default: all 30)")
    p.add_argument("--out", default="demo-output",
                   help="folder for smollm2_init.md and smollm2_init.png (default: %(default)s)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    rows, base_loss = run(args.methods.split(",") if args.methods else None, samples=args.samples,
                          heldout=args.heldout, rank=args.rank, hrp_steps=args.hrp_steps, layers=layers)
    table = markdown(rows, base_loss)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "smollm2_init.md").write_text(table + "\n")
    try:
        where = f"layers {args.layers}" if layers else "30 layers"
        plot(rows, base_loss, out / "smollm2_init.png",
             title=f"SmolLM2-135M, LoRA r={args.rank} on {len(LLAMA_PROJECTIONS)} projections x {where}")
        print(f"wrote {out / 'smollm2_init.png'} ({time.perf_counter() - start:.0f} s)")
    except ImportError:
        print("matplotlib is not installed: no chart (pip install 'lorainit[plots]')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
