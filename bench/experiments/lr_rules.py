"""Which cheap statistic of an init predicts its tuned learning rate? Candidate ``lr_scale`` rules
against the rates the learning-rate-fair SmolLM2 protocol chose.

``python -m bench.experiments.lr_rules [--methods a,b]``

For every init of ``smollm2_gsm``'s protocol (same model, layers, rank, 64 initialization problems,
seed 0) this initializes the adapters once, reads the K-FAC statistics of the same problems (the
``stats_cache`` file of a LoRA-DA init: ``Z``, ``G``, ``s`` per target, docs/math.md) and evaluates,
pooled over the 70 targets, the ratio "plain LoRA's value / this init's value" of five statistics
of one sign-like Adam step ``dA, dB`` with entries ``+-1`` (Adam's first step, any learning rate):

* ``weight``: ``E ||dW||_F^2`` with ``dW = s (B dA + dB A)``: ``s^2 (n ||B||^2 + m ||A||^2)`` (the rule
  ``report.lr_scale`` ships, :mod:`lorainit_kernels.lr_scale`);
* ``weight, A step``: its ``dA`` term only, ``s^2 n ||B||^2`` (the size of ``A``, which Adam overwrites
  within a few steps, left out);
* ``Fisher``: the K-FAC curvature of the step, ``E tr(diag(s) dW Z dW^T)`` =
  ``s^2 (sum(s) tr(A Z A^T) + tr(B^T diag(s) B) tr(Z))``;
* ``Fisher, A step``: its ``dA`` term, ``s^2 tr(B^T diag(s) B) tr(Z)``;
* ``gain``: the first-order loss decrease of the step, ``s (||G A^T||_1 + ||B^T G||_1)`` (``G`` the mean
  gradient; a sign step gains the l1 norm of the gradient it sees).

Each rule's scale is ``min(1, sqrt(ratio))`` for the quadratic statistics and ``min(1, ratio)`` for
the gain; plain LoRA's reference is its expectation under PEFT's init (``A ~ U(+-1/sqrt(n))``, ``B = 0``)
for the first four and one draw of that init for the gain. Writes ``results/lr_rules.{json,md}``:
each rule's suggested scale next to the chosen rate's ratio to plain LoRA's (from
``results/smollm2_gsm.json``), and per rule how many inits it puts within 3x of their chosen rate.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import torch

from . import smollm2_gsm as gsm

RESULTS = gsm.RESULTS
RULES = ("weight", "weight, A step", "Fisher", "Fisher, A step", "gain")


def layer_terms(A: torch.Tensor, B: torch.Tensor, scaling: float, Z: torch.Tensor, G: torch.Tensor,
                s: torch.Tensor, A_ref: torch.Tensor) -> Dict[str, float]:
    """One target's statistics in float64: this init's and plain LoRA's (``*_ref``) per rule's term."""
    A, B, Z, G, s, A_ref = (t.detach().double() for t in (A, B, Z, G, s, A_ref))
    r, n = A.shape
    m = B.shape[0]
    trZ, ss = float(Z.diagonal().sum()), float(s.sum())
    sc2 = scaling ** 2
    return {
        "w_A": sc2 * n * float(B.square().sum()), "w_B": sc2 * m * float(A.square().sum()), "w_ref": sc2 * m * r / 3,
        "f_A": sc2 * float((s[:, None] * B.square()).sum()) * trZ,
        "f_B": sc2 * ss * float(torch.einsum("in,nk,ik->", A, Z, A)), "f_ref": sc2 * ss * r * trZ / (3 * n),
        "g": scaling * (float((G @ A.T).abs().sum()) + float((B.T @ G).abs().sum())),
        "g_ref": scaling * float((G @ A_ref.T).abs().sum()),
    }


def scales(t: Dict[str, float]) -> Dict[str, float]:
    """Each rule's ``lr_scale`` from the pooled terms (``inf`` ratios, a zero statistic, cap to 1)."""
    def quad(ref, got):
        return 1.0 if got <= 0 else min(1.0, math.sqrt(ref / got))

    return {"weight": quad(t["w_ref"], t["w_A"] + t["w_B"]), "weight, A step": quad(t["w_ref"], t["w_A"]),
            "Fisher": quad(t["f_ref"], t["f_A"] + t["f_B"]), "Fisher, A step": quad(t["f_ref"], t["f_A"]),
            "gain": 1.0 if t["g"] <= 0 else min(1.0, t["g_ref"] / t["g"])}


def chosen_ratios(path: Path, args) -> Dict[str, float]:
    """Each method's chosen rate over plain LoRA's, from the protocol's JSON (methods whose grid is final)."""
    if not path.exists():
        return {}
    runs = json.loads(path.read_text())["runs"]

    def final(m):
        return gsm.rate_is_final(runs, m, args.rank, args.lr_grid, args.max_extend)

    lora = gsm.chosen_lr(runs, "lora", args.rank) if final("lora") else None
    out = {}
    for m in sorted({r["method"] for r in runs if r["rank"] == args.rank}):
        c = gsm.chosen_lr(runs, m, args.rank) if final(m) else None
        if lora and c and ":" not in m:
            out[m] = c / lora
    return out


def _stats(path: Path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["lorainit_stats_cache"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, {name: layer["z_owner"] for name, layer in meta["layers"].items()}


def measure(methods: List[str], args) -> Dict[str, Dict[str, float]]:
    from peft import LoraConfig, get_peft_model

    from lorainit import initialize_lora
    from lorainit.examples import arithmetic as ar
    from lorainit.models import LLAMA_PROJECTIONS, load_smollm2

    base, tok = load_smollm2(torch.float32)
    train, _ = ar.split_problems(args.train, args.val + args.test, seed=2026, max_ops=args.max_ops,
                                 max_value=args.max_value)
    gen = torch.Generator().manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="lorainit_lr_rules_"))
    stats_path = tmp / "stats.safetensors"
    out: Dict[str, Dict[str, float]] = {}
    stats = owner = None
    for method in ["lora_da"] + [m for m in methods if m != "lora_da"]:
        torch.manual_seed(0)
        model = get_peft_model(copy.deepcopy(base), LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                                                 target_modules=LLAMA_PROJECTIONS, lora_dropout=0.0,
                                                                 layers_to_transform=args.layer_list))
        loader = ar.make_loader(train[:args.init_samples], tok, batch_size=8, shuffle=True, seed=0)
        extra = {"stats_cache": stats_path} if stats is None else {}
        t0 = time.perf_counter()
        report = initialize_lora(model, loader, method=method, config=gsm.method_config(method, args),
                                 num_samples=args.init_samples, progress=False, **extra)
        if stats is None:
            stats, owner = _stats(stats_path)
        total: Dict[str, float] = {}
        for name, mod in model.named_modules():
            if not (hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {})):
                continue
            A, B = mod.lora_A["default"].weight, mod.lora_B["default"].weight
            r, n = A.shape
            A_ref = (torch.rand(r, n, generator=gen, dtype=torch.float64) * 2 - 1) / math.sqrt(n)
            terms = layer_terms(A, B, mod.scaling["default"], stats[f"{owner[name]}/Z"], stats[f"{name}/G"],
                                stats[f"{name}/s"], A_ref)
            for k, v in terms.items():
                total[k] = total.get(k, 0.0) + v
        out[method] = {"scales": scales(total), "report_lr_scale": report.lr_scale, "init_s": time.perf_counter() - t0}
        if method in methods:
            print(f"{method}: {out[method]['scales']}", flush=True)
    return {m: out[m] for m in methods}


def markdown(payload: Dict) -> str:
    res, chosen = payload["results"], payload["chosen_ratio"]
    lines = ["# Which statistic of an init predicts its tuned learning rate?", "",
             f"Machine: {payload['env']['machine']}, torch {payload['env']['torch']}; written {payload['env']['date']} "
             f"by `python -m bench.experiments.lr_rules`. The setting of `smollm2_gsm` (SmolLM2-135M, LoRA r={payload['rank']} "
             "on the 7 projections of layers 20-29, 64 initialization problems, seed 0).", "",
             "Each cell: the rule's suggested `lr_scale` (plain LoRA's rate x this), and in brackets its ratio to the "
             "rate the protocol chose for the init on the validation split (1 = exact; within 3x is 0.33-3). "
             "`weight` is what `report.lr_scale` ships.", "",
             "| method | chosen / lora's | " + " | ".join(RULES) + " |",
             "|---|---|" + "---|" * len(RULES)]
    hits = {rule: 0 for rule in RULES}
    known = 0
    for m, row in res.items():
        c = chosen.get(m)
        cells = []
        for rule in RULES:
            v = row["scales"][rule]
            if c:
                q = v / c
                hits[rule] += 1 / 3 - 1e-9 <= q <= 3 + 1e-9
                cells.append(f"{v:.3g} ({q:.2g})")
            else:
                cells.append(f"{v:.3g}")
        known += bool(c)
        lines.append(f"| {m} | {'' if c is None else f'{c:.3g}'} | " + " | ".join(cells) + " |")
    lines.append(f"| **within 3x** | {known} inits | " + " | ".join(f"**{hits[r]}/{known}**" for r in RULES) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default=",".join(gsm.MAIN_METHODS))
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--tables-only", action="store_true",
                   help="keep the measured scales of the JSON, refresh the chosen rates from smollm2_gsm.json")
    a = p.parse_args(argv)
    args = gsm.parse_args([])  # the protocol's settings
    methods = [m for m in a.methods.split(",") if m]
    unknown = [m for m in methods if m not in gsm.MAIN_METHODS]
    if unknown:
        raise SystemExit(f"--methods: not in the protocol: {unknown}")
    out = Path(a.out)
    if a.tables_only:
        payload = json.loads((out / "lr_rules.json").read_text())
    else:
        payload = {"rank": args.rank, "results": measure(methods, args),
                   "env": {"machine": gsm.platform.processor() or gsm.platform.machine(), "torch": torch.__version__,
                           "date": time.strftime("%Y-%m-%d %H:%M")}}
    payload["chosen_ratio"] = chosen_ratios(out / "smollm2_gsm.json", args)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lr_rules.json").write_text(json.dumps(payload, indent=1))
    (out / "lr_rules.md").write_text(markdown(payload))
    print((out / "lr_rules.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
