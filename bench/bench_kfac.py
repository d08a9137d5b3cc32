"""Fused K-FAC statistics on CPU: ``kfac_update(x, g, mask, backend="native")`` against plain torch.

Providers, all on the same random bf16 batch with ~30% padding tokens (random mask):
- ``native``: ``lorainit_kernels.kfac_update(..., backend="native")`` (one pass: compaction, packing,
  Z upper triangle + G + s, fp32 accumulation).
- ``torch``: the plain composition ``xv = x[mask].float(); gv = g[mask].float();
  Z = xv.T @ xv; G = gv.T @ xv; s = (gv * gv).sum(0)``.
- ``scipy floor``: BLAS ``ssyrk`` + ``sgemm`` (+ numpy ``s``) on data already compacted and converted
  to fp32 (scipy.linalg.blas), i.e. what a symmetric fp32 BLAS costs without any of the data movement.
Errors are ‖out − ref‖/‖ref‖ of Z and G against a float64 reference on the same bf16 inputs.
Ratios are measured in the same run (median over interleaved rounds); the machine is shared, so only
ratios are meaningful.
"""
from __future__ import annotations

import statistics
import time
from typing import Dict

import numpy as np
import torch

from bench.common import interleaved_times, median_ratio, timeit

COLUMNS = ["case", "T", "n=m", "valid", "native ms", "torch ms", "torch/native", "scipy floor ms",
           "scipy/native", "err native", "err torch", "native GFLOP/s"]


def _batch(T: int, n: int, m: int, seed: int = 0, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(T, n, generator=gen) + 0.1).to(dtype)
    g = (torch.randn(T, m, generator=gen) * 1e-2).to(dtype)
    mask = torch.rand(T, generator=gen) >= 0.3
    return x, g, mask


def _torch_composition(x, g, mask):
    xv = x[mask].float()
    gv = g[mask].float()
    return xv.T @ xv, gv.T @ xv, (gv * gv).sum(0)


def _scipy_floor(x, g, mask):
    """A callable running ssyrk + sgemm on pre-compacted fp32 data (Fortran order: no copies in BLAS)."""
    from scipy.linalg import blas

    xT = np.asfortranarray(x[mask].float().numpy().T)  # (n, K)
    gT = np.asfortranarray(g[mask].float().numpy().T)  # (m, K)

    def run():
        Z = blas.ssyrk(1.0, xT, trans=0, lower=0)  # xT @ xT.T, upper triangle
        G = blas.sgemm(1.0, gT, xT, trans_b=1)  # gT @ xT.T
        s = np.einsum("ij,ij->i", gT, gT)
        return Z, G, s

    return run


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def _measure(providers: Dict[str, object], rounds: int, repeats: int) -> Dict[str, float]:
    """Median seconds per provider over ``rounds`` interleaved rounds (each a median of ``repeats``)."""
    # min_time: many samples for small sizes, so one lost timeslice does not set the median
    per = interleaved_times(providers, rounds,
                            sample=lambda fn: timeit(fn, repeats=repeats, warmup=1, min_time=0.2)["median"])
    out = {k: statistics.median(v) for k, v in per.items()}
    for other in providers:
        if other != "native":
            out[f"{other}/native"] = median_ratio(per[other], per["native"])
    return out


def _native_call(x, g, mask, isa):
    """The public op; ``isa`` (e.g. "avx512") forces a lower kernel level through the env variable."""
    import os

    from lorainit_kernels import _native, kfac_update

    if isa is None:
        return kfac_update(x, g, mask, backend="native")
    old = os.environ.get(_native.ISA_ENV)
    os.environ[_native.ISA_ENV] = isa
    try:
        return kfac_update(x, g, mask, backend="native")
    finally:
        if old is None:
            del os.environ[_native.ISA_ENV]
        else:
            os.environ[_native.ISA_ENV] = old


def _row(case: str, T: int, n: int, m: int, *, rounds: int, repeats: int, with_scipy: bool, with_err: bool,
         isa=None):
    x, g, mask = _batch(T, n, m)
    K = int(mask.sum())
    providers = {
        "native": lambda: _native_call(x, g, mask, isa),
        "torch": lambda: _torch_composition(x, g, mask),
    }
    t = _measure(providers, rounds, repeats)
    if with_scipy:
        # Timed apart and last: OpenBLAS worker threads keep spinning after a call and would steal
        # the cores from whichever provider ran next.
        floor = _scipy_floor(x, g, mask)
        t["scipy"] = timeit(floor, repeats=repeats * rounds, warmup=1)["median"]
        t["scipy/native"] = t["scipy"] / t["native"]
        time.sleep(0.5)
    row = {"case": case, "T": T, "n=m": n, "valid": K, "native ms": t["native"] * 1e3,
           "torch ms": t["torch"] * 1e3, "torch/native": t["torch/native"],
           "native GFLOP/s": (K * n * n + 2.0 * K * m * n) / t["native"] / 1e9}
    if with_scipy:
        row["scipy floor ms"] = t["scipy"] * 1e3
        row["scipy/native"] = t["scipy/native"]
    if with_err:
        Zs, Gs, _, _ = _native_call(x, g, mask, isa)
        Zt, Gt, _ = _torch_composition(x, g, mask)
        xv, gv = x[mask].double(), g[mask].double()
        Zr, Gr = xv.T @ xv, gv.T @ xv
        row["err native"] = max(_rel(Zs, Zr), _rel(Gs, Gr))
        row["err torch"] = max(_rel(Zt, Zr), _rel(Gt, Gr))
    return row


def run(quick: bool = False) -> dict:
    from lorainit_kernels import _native, has_native

    if not has_native():
        return {"title": "kfac_update (native CPU): skipped", "columns": ["reason"],
                "rows": [{"reason": "lorainit_kernels._C is not built"}], "notes": []}
    if quick:
        main = dict(T=512, n=96, m=96)
        sweep_T, sweep_n = (64, 256), (32, 96)
        rounds, repeats = 1, 3
    else:
        main = dict(T=8192, n=1024, m=1024)
        sweep_T, sweep_n = (512, 2048, 8192), (256, 1024, 4096)
        rounds, repeats = 3, 3
    rows = [_row("headline", main["T"], main["n"], main["m"], rounds=rounds + 2, repeats=repeats,
                 with_scipy=True, with_err=True)]
    if "avx512" in _native.isa_levels() and _native.cpu_features().get("avx512bf16"):
        # the same bf16 batch through the fp32-FMA kernel: what vdpbf16ps buys
        rows.append(_row("headline, fp32-FMA kernel", main["T"], main["n"], main["m"], rounds=rounds,
                         repeats=repeats, with_scipy=False, with_err=True, isa="avx512"))
    for n in sweep_n:
        for T in sweep_T:
            big = n * n * T > 2e10  # the 4096 x 8192 case: a few seconds per call
            rows.append(_row("sweep", T, n, n, rounds=1 if big else rounds, repeats=1 if big else repeats,
                             with_scipy=False, with_err=False))
    head = rows[0]
    notes = [
        f"bf16 inputs, ~30% padding tokens (random mask), m = n. Native kernel: "
        f"`{_native.kernel_name(torch.bfloat16, torch.bfloat16)}`; CPU features: {_native.cpu_features()}; "
        f"torch threads {torch.get_num_threads()}.",
        "torch = `x[mask].float()`, `g[mask].float()`, `xv.T @ xv`, `gv.T @ xv`, `(gv*gv).sum(0)` (MKL). "
        "scipy floor = BLAS ssyrk + sgemm + s on pre-compacted fp32 data (no compaction/conversion).",
        f"Headline: native is {head['torch/native']:.2f}x the torch composition (goal >= 1.5x, target 2.5x); "
        f"error {head['err native']:.2e} vs torch's {head['err torch']:.2e} "
        f"(bound: <= 2x torch's: {'ok' if head['err native'] <= 2 * head['err torch'] else 'FAILED'}).",
        "Ratios are medians of per-round ratios over interleaved rounds on a shared 2-core machine; "
        "absolute CPU times are indicative only.",
    ]
    return {"title": "Fused K-FAC statistics (kfac_update) on CPU: native vs plain torch",
            "columns": COLUMNS, "rows": rows, "notes": notes}
