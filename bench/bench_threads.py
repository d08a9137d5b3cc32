"""CPU threads: the same ``initialize_lora`` at 1, 2, ... torch threads, wall time against process CPU time.

On a machine whose cores are busy with other jobs, torch's intra-op threads wait for each other at
every parallel region (oversubscription): wall time grows far above the CPU time the process gets,
and fewer threads can be faster. This benchmark runs LoRA-DA (fixed step, no step search) on a tiny
random-weight Llama (hidden 256, 4 layers, all 7 projections, r = 8) at each thread count,
interleaved over rounds, and records the median wall time, the median process CPU time
(``time.process_time``, all threads) and the 1-minute load average before each run. ``hint`` says
whether ``initialize_lora`` put its busy-CPU hint in the report (wall >= 2x CPU over >= 2 s).
docs/performance.md reads this table.
"""
from __future__ import annotations

import os
import statistics
import time
import warnings

import torch

from lorainit.models import LLAMA_PROJECTIONS


def _model(seed: int = 0):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=8, lora_alpha=16, target_modules=LLAMA_PROJECTIONS,
                                                           lora_dropout=0.0))


def _batches(n: int, bs: int = 4, seq: int = 128):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 512, (bs, seq), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def _one(threads: int, batches) -> dict:
    from lorainit import LoRADAConfig, initialize_lora

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = _model()
        load = os.getloadavg()[0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = initialize_lora(model, batches, method="lora_da", config=LoRADAConfig(step_scale=1.0),
                                     num_samples=None, progress=False)
    finally:
        torch.set_num_threads(before)
    return {"wall": report.timings["total"], "cpu": report.info["cpu_time_s"], "load": load,
            "hint": "hint" in report.info, "layers": len(report.layers)}


def run(quick: bool = False) -> dict:
    counts = sorted({1, 2, os.cpu_count() or 1})
    rounds = 1 if quick else 3
    batches = _batches(2 if quick else 8)
    runs = {t: [] for t in counts}
    for _ in range(rounds):
        for t in counts:  # interleaved: a change in the machine's load hits every thread count alike
            runs[t].append(_one(t, batches))
    rows = []
    base = statistics.median(r["wall"] for r in runs[1])
    for t in counts:
        wall = statistics.median(r["wall"] for r in runs[t])
        cpu = statistics.median(r["cpu"] for r in runs[t])
        rows.append({"threads": t, "wall_s": wall, "cpu_s": cpu, "wall_per_layer_s": wall / runs[t][0]["layers"],
                     "cpu_over_wall": cpu / wall, "vs_1_thread": wall / base,
                     "load_avg_1min": statistics.median(r["load"] for r in runs[t]),
                     "hint": f"{sum(r['hint'] for r in runs[t])}/{len(runs[t])}"})
    return {"title": "initialize_lora (LoRA-DA, 28 layers of a hidden-256 Llama) by torch thread count",
            "columns": ["threads", "wall_s", "cpu_s", "wall_per_layer_s", "cpu_over_wall", "vs_1_thread",
                        "load_avg_1min", "hint"],
            "rows": rows,
            "notes": [f"Median of {rounds} interleaved rounds; cpu_s is the process's CPU time over all its threads "
                      f"(time.process_time), so cpu_over_wall near the thread count means the threads ran, far "
                      f"below 1 that they waited for cores. load_avg_1min: the machine's load before each run "
                      f"({os.cpu_count()} cores). hint: runs whose report got the busy-CPU hint."]}


if __name__ == "__main__":
    from bench.common import write_results

    print(write_results("threads", run()).read_text())
