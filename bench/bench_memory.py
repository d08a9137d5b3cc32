"""Peak memory of ``initialize_lora`` (LoRA-DA) on one Llama-2-7B-shaped decoder layer, vs the memory model.

One decoder layer (hidden 4096, intermediate 11008, 32 heads; random weights, fp32, CPU), LoRA r=16
on its 7 projections, a few samples of 64 tokens, ``step_scale`` fixed. For ``max_memory`` = none, 1/2
and 1/4 of what all statistics need, each in a fresh process: the extra peak RSS of the call
(VmHWM reset through ``/proc/self/clear_refs`` just before it, minus the RSS at the call) next to
``lorainit.estimate_memory``'s prediction, and whether the adapters equal those of the unbudgeted run.
Then the planning table for Llama-2-7B, Llama-3-8B and Llama-3-70B (all 7 projections, r=16) from
the same memory model.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

MiB = 1 << 20
SHAPES = {  # hidden, intermediate, layers, heads, kv heads
    "Llama-2-7B": (4096, 11008, 32, 32, 32),
    "Llama-3-8B": (4096, 14336, 32, 32, 8),
    "Llama-3-70B": (8192, 28672, 80, 64, 8),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _model(hidden, inter, layers, heads, kv, r=16, vocab=256, meta=False):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=128)
    if meta:
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg)
    else:
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=32, target_modules=TARGETS, lora_dropout=0.0))


def _rss(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def child(budget_frac: str, out: str, samples: int) -> None:
    """One measured call (run in its own process)."""
    from lorainit import LoRADAConfig, estimate_memory, initialize_lora
    from lorainit.targets import find_targets

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    model = _model(4096, 11008, 1, 32, 32)
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(3, 256, (1, 64), generator=g)} for _ in range(samples)]
    full = estimate_memory(model, "lora_da", LoRADAConfig(step_scale=0.1))
    budget = None if budget_frac == "none" else int(full.stats_bytes * float(budget_frac))
    cfg = LoRADAConfig(step_scale=0.1, max_memory=budget)
    plan = estimate_memory(model, "lora_da", cfg, strict=False)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _rss("VmRSS")
    rep = initialize_lora(model, batches, config=cfg, num_samples=None, progress=False)
    peak = _rss("VmHWM") - base
    torch.save({n: (t.lora_A.detach().clone(), t.lora_B.detach().clone()) for n, t in find_targets(model).items()},
               out + ".pt")
    json.dump({"budget": budget, "stats_bytes": full.stats_bytes, "predicted": plan.peak_bytes,
               "smallest": plan.smallest_budget, "measured": peak, "passes": rep.info.get("passes"),
               "solve_s": rep.timings.get("solve"), "total_s": rep.timings.get("total")}, open(out, "w"))


def _layer_targets(h, i, heads, kv, r=16):
    """Shape-only stand-ins of one decoder layer's 7 targets (what the memory model reads) and their sharing."""
    from types import SimpleNamespace

    hd = h // heads
    shapes = {"q_proj": (h, h), "k_proj": (kv * hd, h), "v_proj": (kv * hd, h), "o_proj": (h, h),
              "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
    targets = {k: SimpleNamespace(name=k, m=m, n=n, r=r, device=torch.device("cuda")) for k, (m, n) in shapes.items()}
    shared = {k: k for k in targets}
    shared.update(k_proj="q_proj", v_proj="q_proj", up_proj="gate_proj")
    return targets, shared


def planning_rows():
    """Predicted passes and peak on one 80 GB GPU (bf16 weights, fp32 statistics) from the memory model."""
    from lorainit.memory import plan_lora_da

    rows = []
    for name, (h, i, L, heads, kv) in SHAPES.items():
        targets, shared = _layer_targets(h, i, heads, kv)
        p = plan_lora_da(targets, list(targets), shared, None, solver="lobpcg")
        layer_stats, work = p.stats_bytes, p.smallest_budget - 0
        weights = {"Llama-2-7B": 6.74e9, "Llama-3-8B": 8.03e9, "Llama-3-70B": 70.6e9}[name]
        act = 4e9  # one forward/backward of a batch (8 x 512 tokens, checkpointed), an assumption
        free = 80e9 - 2 * weights - act
        extra = work - layer_stats  # the largest solve beside its statistics
        all_stats = layer_stats * L
        per_pass = int((free - extra) // layer_stats) if free > work else 0
        passes = -(-L // per_pass) if per_pass else "does not fit"
        peak = min(all_stats, per_pass * layer_stats) + extra if per_pass else None
        rows.append({"model": name, "weights GB (bf16)": round(2 * weights / 1e9, 1),
                     "statistics, all layers GB": round(all_stats / 1e9, 1),
                     "statistics per layer MiB": round(layer_stats / MiB),
                     "smallest budget (one layer) MiB": round(work / MiB),
                     "budget left on 80 GB GB": round(free / 1e9, 1),
                     "passes": passes, "predicted peak above model GB": "-" if peak is None else round(peak / 1e9, 1)})
    return rows


def run(quick: bool = False) -> dict:
    samples = 2 if quick else 4
    rows, ref = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for frac in ("none", "0.5", "0.25"):
            out = str(Path(tmp) / f"r{frac}.json")
            env = dict(os.environ)
            subprocess.run([sys.executable, "-P", __file__, "--child", frac, out, str(samples)], check=True, env=env)
            res = json.load(open(out))
            ad = torch.load(out + ".pt")
            if ref is None:
                ref = ad
            same = all(torch.equal(ad[n][0], ref[n][0]) and torch.equal(ad[n][1], ref[n][1]) for n in ref)
            budget = res["budget"]
            rows.append({"max_memory": "none" if budget is None else f"{frac} x stats = {budget / MiB:.0f} MiB",
                         "passes": res["passes"], "predicted peak MiB": round(res["predicted"] / MiB),
                         "measured extra peak MiB": round(res["measured"] / MiB),
                         "measured / predicted": round(res["measured"] / res["predicted"], 2),
                         "measured / budget": "" if budget is None else round(res["measured"] / budget, 2),
                         "smallest budget MiB": round(res["smallest"] / MiB),
                         "adapters identical": same, "init s": round(res["total_s"], 1)})
            stats = res["stats_bytes"]
    return {"title": "initialize_lora (LoRA-DA) peak memory, one Llama-2-7B-shaped decoder layer, fp32 CPU",
            "columns": list(rows[0]), "rows": rows, "planning": planning_rows(),
            "notes": [f"all statistics: {stats / MiB:.0f} MiB; {samples} samples x 64 tokens; r=16 on 7 projections",
                      "extra peak = VmHWM (reset before the call) - RSS at the call, one fresh process per budget"]}


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from bench.common import write_results

        res = run("--quick" in sys.argv)
        print(json.dumps(res, indent=1))
        write_results("memory", res)
