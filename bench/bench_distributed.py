"""``initialize_lora`` on an FSDP2 tiny Llama, 1 vs 2 processes (gloo, CPU): time and peak memory per rank.

Each rank runs with 1 thread (2 ranks = the machine's 2 cores), ``fully_shard`` on every decoder
layer and the root, its own shard of the samples (the same total ``num_samples`` for 1 and 2
processes). Per rank: the median over repeats of the whole call and of its phases (statistics
pass, solves), the peak RSS growth during the calls, and the number of collectives issued by
lorainit's protocol (bucketed all-reduces, broadcasts, all-gathers of weights and of status objects).
"""
from __future__ import annotations

import os
import resource
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lorainit.models import LLAMA_PROJECTIONS



def _model(hidden: int, layers: int, vocab: int, seed: int = 0):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 8 * 8,
                      num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                      num_key_value_heads=max(1, hidden // 64), max_position_embeddings=512)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=8, lora_alpha=16, target_modules=LLAMA_PROJECTIONS))
    return model


def _shard(model):
    from torch.distributed.fsdp import fully_shard

    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def _batches(n: int, seq: int, bs: int, vocab: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, seq), generator=g)
    am = torch.ones_like(ids)
    return [{"input_ids": ids[i:i + bs], "attention_mask": am[i:i + bs]} for i in range(0, n, bs)]


def _configs():
    from lorainit.methods.baselines import PiSSAConfig
    from lorainit.methods.lora_da import LoRADAConfig

    return {"lora_da": LoRADAConfig(step_scale=0.1, n_train=1e6), "pissa": PiSSAConfig()}


def _worker(rank, world, port, out_dir, sizes, repeats):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import warnings

    warnings.filterwarnings("ignore")
    import torch.distributed as dist

    from lorainit import distributed as dist_utils
    from lorainit.init import initialize_lora

    hidden, layers, n, seq, bs, vocab = sizes
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rows = []
    try:
        mine = _batches(n, seq, bs, vocab)[rank::world]
        for method, config in _configs().items():
            times, phases, peak = [], [], 0.0
            for rep in range(repeats + 1):
                model = _shard(_model(hidden, layers, vocab))
                dist_utils.COLLECTIVES.clear()
                rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                dist.barrier()
                t0 = time.perf_counter()
                report = initialize_lora(model, mine, method=method, config=config, num_samples=n, progress=False)
                dt = time.perf_counter() - t0
                peak = max(peak, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024)
                if rep:  # the first call warms up
                    times.append(dt)
                    phases.append(report.timings)
                del model
            med = lambda key: statistics.median(p.get(key, 0.0) for p in phases)  # noqa: E731
            rows.append({"method": method, "world": world, "rank": rank, "total_s": statistics.median(times),
                         "stats_s": med("stats_pass"), "solve_s": med("solve") + med("svd"),
                         "peak_rss_growth_MB": peak, "collectives": dict(dist_utils.COLLECTIVES),
                         "num_samples": report.info.get("num_samples")})
    finally:
        torch.save(rows, os.path.join(out_dir, f"w{world}-r{rank}.pt"))
        dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(quick: bool = False) -> dict:
    import torch.multiprocessing as mp

    import lorainit.init  # noqa: F401  (imported before forking: the workers skip the imports)
    from bench.common import machine_info

    sizes = (64, 2, 32, 32, 8, 256) if quick else (256, 4, 128, 128, 8, 1024)
    repeats = 1 if quick else 3
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for world in (1, 2):
            mp.start_processes(_worker, args=(world, _port(), out, sizes, repeats), nprocs=world, join=True,
                               start_method="fork")
            for r in range(world):
                rows.extend(torch.load(Path(out) / f"w{world}-r{r}.pt", weights_only=False))
    for row in rows:
        one = next(x for x in rows if x["method"] == row["method"] and x["world"] == 1)
        row["solve_vs_1proc"] = row["solve_s"] / one["solve_s"] if one["solve_s"] else float("nan")
        row["total_vs_1proc"] = row["total_s"] / one["total_s"]
        row["collectives"] = ", ".join(f"{k} {v}" for k, v in sorted(row["collectives"].items())) or "-"
    hidden, layers, n, seq, bs, vocab = sizes
    return {
        "title": "initialize_lora under FSDP2, 1 vs 2 processes (gloo, CPU, 1 thread per rank)",
        "columns": ["method", "world", "rank", "total_s", "stats_s", "solve_s", "solve_vs_1proc", "total_vs_1proc",
                    "peak_rss_growth_MB", "collectives", "num_samples"],
        "rows": rows,
        "machine": machine_info(),
        "notes": [
            f"Llama hidden {hidden}, {layers} layers, vocab {vocab}, LoRA r=8 on {len(LLAMA_PROJECTIONS)} projections, "
            f"fully_shard per decoder layer + root; num_samples={n} in total ({n // 2} per rank with 2), "
            f"{seq} tokens, batch {bs}; median of {repeats} calls after one warm-up.",
            "solve_s: LoRA-DA's per-shape solves (timings['solve']) or PiSSA's SVDs (timings['svd']); with 2 "
            "processes each rank solves its share and the owners broadcast the factors (included).",
            "peak_rss_growth_MB: growth of the process's peak RSS during the calls (ru_maxrss), a coarse bound.",
        ],
    }
