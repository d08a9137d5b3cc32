"""LoRA-DA's batched solve: layers of one shape that read their input alone solved in one batched call
(``LoRADAConfig.solve_batch``) against one call per layer, CPU, fp32.

Each case is a model's stack of same-shape layers (SmolLM2-135M's 30 down_proj, 1536 -> 576, r = 8; a
1B-class model's 16 o_proj, 2048 -> 2048, r = 16) with SmolLM2-like synthetic statistics
(``bench.spectra.kfac_stats``). Both variants call ``lorainit_kernels.methods.lora_da`` with the trainer's
settings (``solver="lobpcg"``, step normalization, per-layer seeds) in place on fresh copies of the
statistics (the copies are untimed); the batched one in calls of ``solve_batch`` layers. Interleaved
rounds; the speedup is the median of the per-round ratios. ``identical``: the factors of every layer are
bitwise equal between the two (a layer's solve does not depend on its batch).

``python -m bench.run batched_solve`` writes ``bench/results/batched_solve.{json,md}``.
"""
from __future__ import annotations

import time
from typing import Dict, List

import torch

import lorainit_kernels.methods as lkm
from bench.common import SETTLE_S, median_ratio, summarize
from bench.spectra import kfac_stats

CASES = [  # (label, layers, m, n, r)
    ("SmolLM2-135M down_proj", 30, 576, 1536, 8),
    ("1B-class o_proj", 16, 2048, 2048, 16),
]
QUICK_CASES = [("small", 6, 64, 200, 4)]


def _solve(stats, r: int, batch: int) -> List:
    """Solve every layer of ``stats`` (Z, G, s stacks) in calls of ``batch`` layers; returns the factors
    and the seconds spent in the calls (the copies of the statistics are not timed)."""
    Z, G, s = stats
    out, spent = [], 0.0
    for i in range(0, Z.shape[0], batch):
        j = min(i + batch, Z.shape[0])
        args = (Z[i:j].clone(), G[i:j].clone(), s[i:j].clone())
        t0 = time.perf_counter()
        f, _ = lkm.lora_da(*args, r, n_train=1e4, scaling=2.0, step_scale=1.0, solver="lobpcg",
                           seeds=list(range(i, j)), overwrite=True)
        spent += time.perf_counter() - t0
        out += [(f.lora_A[k], f.lora_B[k]) for k in range(j - i)]
    return out, spent


def run(quick: bool = False, solve_batch: int = 8) -> Dict[str, object]:
    rounds = 2 if quick else 3
    rows = []
    for label, layers, m, n, r in (QUICK_CASES if quick else CASES):
        stats = tuple(t.float().contiguous() for t in kfac_stats((layers,), m, n, seed=7))
        per_layer, batched = [], []
        _solve(tuple(t[:2] for t in stats), r, 2)  # warm-up: the first call loads kernels and spins up threads
        for _ in range(rounds):
            time.sleep(SETTLE_S)
            fa, ta = _solve(stats, r, 1)
            time.sleep(SETTLE_S)
            fb, tb = _solve(stats, r, solve_batch)
            per_layer.append(ta)
            batched.append(tb)
        same = all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(fa, fb))
        one, many = summarize(per_layer), summarize(batched)
        rows.append({"case": label, "layers": layers, "m x n": f"{m}x{n}", "r": r, "solve_batch": solve_batch,
                     "one per call s": one["median"], "batched s": many["median"],
                     "speedup": median_ratio(per_layer, batched), "identical": "yes" if same else "NO"})
    return {
        "title": "LoRA-DA's batched solve: same-shape layers in one call vs one call per layer (CPU, fp32)",
        "columns": ["case", "layers", "m x n", "r", "solve_batch", "one per call s", "batched s", "speedup",
                    "identical"],
        "rows": rows,
        "notes": [f"torch threads: {torch.get_num_threads()}; {rounds} interleaved rounds, medians; speedup = median "
                  f"of per-round ratios. The solves run in place on untimed copies of SmolLM2-like synthetic "
                  f"statistics (bench.spectra.kfac_stats), LOBPCG with its default tolerance and the step "
                  f"normalization, as initialize_lora runs them.",
                  "On a CPU, LAPACK and the LOBPCG products loop over the batch; what batching saves is the "
                  "per-call and per-iteration overhead of the small operations (Rayleigh-Ritz, "
                  "orthonormalization), which on a GPU is kernel launches. The GPU measurement is in "
                  "bench/device_check.py (section d)."],
    }
