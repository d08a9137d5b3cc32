"""Fused K-FAC statistics on CPU: ``kfac_update(x, g, mask)`` under ``backends.use("native")`` against plain torch, per ISA.

Providers, all on the same random bf16 batch with ~30% padding tokens (random mask):
- ``native``: ``lorainit_kernels.kfac_update(...)`` under ``backends.use("native")`` (one pass: compaction, packing,
  Z upper triangle + G + s, fp32 accumulation), the kernel the automatic choice runs on this CPU
  unless a row says it was forced (``LORAINIT_NATIVE_ISA``).
- ``torch``: the plain composition ``xv = x[mask].float(); gv = g[mask].float();
  Z = xv.T @ xv; G = gv.T @ xv; s = (gv * gv).sum(0)`` (MKL GEMMs).
- ``scipy floor``: BLAS ``ssyrk`` + ``sgemm`` (+ numpy ``s``) on data already compacted and converted
  to fp32 (scipy.linalg.blas), i.e. what a symmetric fp32 BLAS costs without any of the data movement.
Errors are ‖out − ref‖/‖ref‖ of Z and G against a float64 reference on the same bf16 inputs.

One table per ISA (bench/results/kfac.md): this machine's; where this CPU has more than AVX2, an AVX2-only
CPU and a CPU without AVX2 emulated here (a subprocess with ``LORAINIT_NATIVE_ISA`` forcing the native level
and ``MKL_ENABLE_INSTRUCTIONS`` / ``ATEN_CPU_CAPABILITY`` holding torch to the same instructions, so both
sides run what such a CPU would); and the tables recorded on other machines (``kfac.recorded.json``),
which cannot be re-measured here. Ratios are measured in the same run (median over interleaved rounds);
the machine is shared, so only ratios are meaningful.

``python -m bench.bench_kfac --emulate avx2|portable [--quick]`` prints one emulated table as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict

import numpy as np
import torch

from bench.common import RESULTS, SETTLE_S, interleaved_times, median_ratio, timeit

COLUMNS = ["case", "ISA", "kernel", "T", "n=m", "valid", "native ms", "torch ms", "torch/native",
           "torch/native 1 thread CPU", "scipy floor ms", "scipy/native", "err native", "err torch",
           "native GFLOP/s", "% of peak"]
RECORDED = Path(RESULTS) / "kfac.recorded.json"

# Emulated CPUs: the native level forced, torch's MKL and ATen kernels held to the same instructions.
EMULATE = {
    "avx2": {"LORAINIT_NATIVE_ISA": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
    "portable": {"LORAINIT_NATIVE_ISA": "portable", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
                 "ATEN_CPU_CAPABILITY": "default"},
}
# issue 27: same-run torch/native at T=8192, n=m=1024, bf16 (AMX CPUs have AVX-512 BF16: its goal)
GOALS = {"avx2": 1.5, "avx512bf16": 2.5, "amx": 2.5}
# issue 27: the AVX-512 BF16 kernel at >= 70% of the peak of vdpbf16ps
PEAK_GOALS = {"avx512bf16": 70.0}


def _cpu_ratio(providers: Dict[str, object], rounds: int) -> float:
    """Median over interleaved rounds of torch's / native's process CPU time with one thread: what the
    other jobs on a shared machine change least (no thread waits for a descheduled sibling)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        per = interleaved_times(providers, rounds, settle_s=SETTLE_S, sample=lambda fn: _cpu_time(fn))
    finally:
        torch.set_num_threads(threads)
    return median_ratio(per["torch"], per["native"])


def _cpu_time(fn) -> float:
    fn()  # warm: one-thread pools
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


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


def _mkl_gemms(x, g, mask):
    """A callable running the composition's two GEMMs alone on pre-compacted fp32 data (torch, MKL)."""
    xv, gv = x[mask].float(), g[mask].float()
    return lambda: (xv.T @ xv, gv.T @ xv)


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


_PEAKS: Dict[str, float] = {}


def _peak(kernel: str) -> float:
    """GFLOP/s of the instruction ``kernel`` multiplies with on this machine at torch's thread count
    (``_native.peak_gflops``, a register-only probe), measured once per process; nan for portable."""
    from lorainit_kernels import _native

    level = kernel.split("/")[0]
    if level not in _PEAKS:
        _PEAKS[level] = _native.peak_gflops(level, torch.get_num_threads())
    return _PEAKS[level]


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def _measure(providers: Dict[str, object], rounds: int, repeats: int) -> Dict[str, float]:
    """Median seconds per provider over ``rounds`` interleaved rounds (each a median of ``repeats``)."""
    # min_time: many samples for small sizes, so one lost timeslice does not set the median
    # settle: _C's OpenMP runtime and torch's are two thread pools; one's spinning workers would slow the other
    per = interleaved_times(providers, rounds, settle_s=SETTLE_S,
                            sample=lambda fn: timeit(fn, repeats=repeats, warmup=1, min_time=0.2)["median"])
    out = {k: statistics.median(v) for k, v in per.items()}
    for other in providers:
        if other != "native":
            out[f"{other}/native"] = median_ratio(per[other], per["native"])
    return out


def _with_isa(isa, fn):
    """Run ``fn()`` with ``LORAINIT_NATIVE_ISA`` set to ``isa`` (None: as it is)."""
    from lorainit_kernels import _native

    if isa is None:
        return fn()
    old = os.environ.get(_native.ISA_ENV)
    os.environ[_native.ISA_ENV] = isa
    try:
        return fn()
    finally:
        if old is None:
            del os.environ[_native.ISA_ENV]
        else:
            os.environ[_native.ISA_ENV] = old


def _native_call(x, g, mask, isa):
    """The public op; ``isa`` (e.g. "avx512") forces a kernel level through the env variable."""
    from lorainit_kernels import backends, kfac_update

    def run():
        with backends.use("native"):
            return kfac_update(x, g, mask)

    return _with_isa(isa, run)


def isa_label() -> str:
    """This CPU as the dispatcher sees it, e.g. ``avx512bf16 (intel)``."""
    from lorainit_kernels import _native

    f = _native.cpu_features()
    return f"{f['best_isa']} ({f.get('vendor', 'other')})"


def _row(case: str, T: int, n: int, m: int, *, rounds: int, repeats: int, with_scipy: bool, with_err: bool,
         isa=None, label=None, with_gemms: bool = False):
    from lorainit_kernels import _native

    x, g, mask = _batch(T, n, m)
    K = int(mask.sum())
    providers = {
        "native": lambda: _native_call(x, g, mask, isa),
        "torch": lambda: _torch_composition(x, g, mask),
    }
    if with_gemms:
        providers["gemms"] = _mkl_gemms(x, g, mask)
    for _ in range(3):  # the first calls of a process start thread pools (100x slower at small sizes)
        for fn in providers.values():
            fn()
    t = _measure(providers, rounds, repeats)
    if with_scipy:
        # Timed apart and last: OpenBLAS worker threads keep spinning after a call and would steal
        # the cores from whichever provider ran next.
        floor = _scipy_floor(x, g, mask)
        t["scipy"] = timeit(floor, repeats=repeats * rounds, warmup=1)["median"]
        t["scipy/native"] = t["scipy"] / t["native"]
        time.sleep(0.5)
    if n * n * T <= 2e10:  # not the 4096 x 8192 case (seconds per call on one thread)
        t["cpu1"] = _cpu_ratio({k: providers[k] for k in ("native", "torch")}, max(3, rounds))
    kernel = _with_isa(isa, lambda: _native.kernel_name(torch.bfloat16, torch.bfloat16))
    row = {"case": case, "ISA": label or isa_label(), "kernel": kernel + (" (forced)" if isa else ""),
           "T": T, "n=m": n, "valid": K, "native ms": t["native"] * 1e3,
           "torch ms": t["torch"] * 1e3, "torch/native": t["torch/native"],
           "native GFLOP/s": (K * n * n + 2.0 * K * m * n) / t["native"] / 1e9}
    peak = _peak(kernel)
    if peak == peak:  # not nan
        row["% of peak"] = 100.0 * row["native GFLOP/s"] / peak
    if "cpu1" in t:
        row["torch/native 1 thread CPU"] = t["cpu1"]
    if with_gemms:
        # the GEMMs do Z whole (2 K n^2) and G (2 K m n); the native kernel Z's upper triangle and G
        row["mkl gemms ms"] = t["gemms"] * 1e3
        row["mkl GFLOP/s"] = (2.0 * K * n * n + 2.0 * K * m * n) / t["gemms"] / 1e9
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


def _headline_note(row: dict, goal) -> str:
    ok = row["err native"] <= 2 * row["err torch"]
    cpu1 = row.get("torch/native 1 thread CPU")
    text = (f"Headline ({row['ISA']}, `{row['kernel']}`): native is {row['torch/native']:.2f}x the torch "
            f"composition with {torch.get_num_threads()} threads, {cpu1:.2f}x in CPU time on one thread")
    if goal:
        verdict = lambda r: "met" if r >= goal else "NOT met"  # noqa: E731
        text += f" (goal >= {goal}x: {verdict(row['torch/native'])}; on one thread: {verdict(cpu1)})"
    if "% of peak" in row:
        text += (f"; {row['native GFLOP/s']:.0f} GFLOP/s, {row['% of peak']:.0f}% of the peak of the instruction it "
                 f"multiplies with ({_peak(row['kernel']):.0f} GFLOP/s on {torch.get_num_threads()} threads, "
                 "`_native.peak_gflops`)")
    return (text + f"; error {row['err native']:.2e} vs torch's {row['err torch']:.2e} "
            f"(bound: <= 2x torch's: {'ok' if ok else 'FAILED'}).")


def _roofline_note(row: dict) -> str:
    """How far the native kernel is from the bound its flop count sets, against MKL's GEMM rate."""
    rate, native = row["mkl GFLOP/s"], row["native GFLOP/s"]
    # the composition at the native kernel's flops and MKL's rate: its best possible time
    best_ms = row["native ms"] * native / rate
    return (f"Roofline: the composition's two GEMMs alone (pre-compacted fp32, MKL) take {row['mkl gemms ms']:.3g} ms "
            f"({rate:.0f} GFLOP/s); the native kernel does 3/4 of their flops (Z's upper triangle) at "
            f"{native:.0f} GFLOP/s, {100 * native / rate:.0f}% of MKL's rate, packing and compaction included. "
            f"At MKL's rate it would take {best_ms:.3g} ms, i.e. torch/native <= {row['torch ms'] / best_ms:.2f} "
            f"in this run: the 1.33x fewer flops plus the compaction copy torch pays is all a kernel can gain here.")


def emulated_table(level: str, quick: bool) -> dict:
    """This process runs as an emulated CPU (see ``EMULATE``): its table."""
    label = f"{level} (emulated)"
    if quick:
        cases = [("headline", 512, 96, True)]
        rounds, repeats = 1, 3
    elif level == "avx2":
        cases = [("headline", 8192, 1024, True), ("sweep", 512, 1024, False), ("sweep", 2048, 1024, False),
                 ("sweep", 8192, 256, False), ("sweep", 2048, 4096, False)]
        rounds, repeats = 5, 3
    else:  # the plain-C++ kernel is slow: smaller problems
        cases = [("headline (smaller)", 2048, 512, True), ("sweep", 8192, 256, False)]
        rounds, repeats = 3, 3
    rows = [_row(case, T, n, n, rounds=rounds if big else max(1, rounds - 2), repeats=repeats,
                 with_scipy=False, with_err=big, label=label, with_gemms=big) for case, T, n, big in cases]
    env = " ".join(f"{k}={v}" for k, v in EMULATE[level].items())
    what = {"avx2": "an AVX2-only CPU (AVX2, FMA, F16C; no AVX-512)",
            "portable": "a CPU without AVX2 (baseline x86-64: SSE only)"}[level]
    notes = [f"Emulates {what} on this machine: `{env}` (native level forced; torch's MKL and ATen kernels "
             f"held to the same instructions). An Intel core with MKL is not an AMD EPYC with MKL: on AMD, MKL's "
             f"AVX2 GEMM has measured slower relative to the native kernel (recorded table below).",
             _headline_note(rows[0], GOALS.get(level)), _roofline_note(rows[0])]
    if level == "portable":
        cpu1 = rows[0]["torch/native 1 thread CPU"]
        notes.append(f"On one thread (CPU time, which the machine's other jobs change least) torch/native is "
                     f"{cpu1:.2f}: the plain-C++ kernel is {'no' if cpu1 < 1.05 else 'a little'} faster than torch's "
                     "BLAS; with 2 threads on a loaded machine torch's threads stall more. "
                     "`backend=\"auto\"` follows the one-thread ratio and runs torch on such CPUs: "
                     "`lorainit_kernels.backends.auto_reasons(\"kfac_update\", x)` gives the reason, and one "
                     "warning says it (lorainit_kernels/backends/native.py).")
    return {"title": f"{what[0].upper() + what[1:]}, emulated: native vs plain torch", "columns": COLUMNS,
            "rows": rows, "notes": notes}


def _run_emulated(level: str, quick: bool) -> dict:
    env = dict(os.environ, **EMULATE[level])
    cmd = [sys.executable, "-m", "bench.bench_kfac", "--emulate", level] + (["--quick"] if quick else [])
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"bench_kfac: the emulated {level} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _recorded() -> list:
    """The tables measured on other machines (kfac.recorded.json), each with its machine in the title."""
    if not RECORDED.exists():
        return []
    out = []
    for table in json.loads(RECORDED.read_text())["tables"]:
        mach = table.get("machine", {})
        note = f"Machine: {mach.get('cpu', '?')}, {mach.get('cores', '?')} cores, torch {mach.get('torch', '?')}, " \
               f"{mach.get('date', '?')} (from `bench/results/kfac.recorded.json`)."
        out.append({"title": table["title"], "columns": table["columns"], "rows": table["rows"],
                    "notes": [note] + table.get("notes", [])})
    return out


def run(quick: bool = False) -> dict:
    from lorainit_kernels import _native, has_native

    if not has_native():
        return {"title": "kfac_update (native CPU): skipped", "columns": ["reason"],
                "rows": [{"reason": "lorainit_kernels._C is not built"}], "notes": []}
    levels = _native.isa_levels()
    best = levels[-1]
    if quick:
        main = dict(T=512, n=96, m=96)
        sweep_T, sweep_n = (64, 256), (32, 96)
        rounds, repeats = 1, 3
    else:
        main = dict(T=8192, n=1024, m=1024)
        sweep_T, sweep_n = (512, 2048, 8192), (256, 1024, 4096)
        rounds, repeats = 3, 3
    head = _row("headline", main["T"], main["n"], main["m"], rounds=rounds + 2, repeats=repeats,
                with_scipy=True, with_err=True)
    rows = [head]
    auto_kernel = _native.kernel_name(torch.bfloat16, torch.bfloat16)
    for level in reversed(levels[1:]):  # every other SIMD kernel on the same batch: what each buys here
        if _with_isa(level, lambda: _native.kernel_name(torch.bfloat16, torch.bfloat16)) == auto_kernel:
            continue
        rows.append(_row("headline, kernel forced", main["T"], main["n"], main["m"], rounds=rounds,
                         repeats=repeats, with_scipy=False, with_err=True, isa=level))
    for n in sweep_n:
        for T in sweep_T:
            big = n * n * T > 2e10  # the 4096 x 8192 case: a few seconds per call
            rows.append(_row("sweep", T, n, n, rounds=1 if big else rounds, repeats=1 if big else repeats,
                             with_scipy=False, with_err=False))
    feats = _native.cpu_features()
    notes = [
        f"This machine: {isa_label()}. bf16 inputs, ~30% padding tokens (random mask), m = n. The automatic "
        f"choice runs `{auto_kernel}` for bf16 inputs here; CPU features: {feats}; torch threads "
        f"{torch.get_num_threads()}.",
        "torch = `x[mask].float()`, `g[mask].float()`, `xv.T @ xv`, `gv.T @ xv`, `(gv*gv).sum(0)` (MKL). "
        "scipy floor = BLAS ssyrk + sgemm + s on pre-compacted fp32 data (no compaction/conversion).",
        _headline_note(head, GOALS.get(best)),
        "Ratios are medians of per-round ratios over interleaved rounds on a shared 2-core machine; "
        "absolute CPU times are indicative only.",
    ]
    for r in rows:
        level = r["kernel"].split("/")[0]
        if r["case"].startswith("headline") and level in PEAK_GOALS and "% of peak" in r:
            goal = PEAK_GOALS[level]
            notes.append(
                f"`{r['kernel']}` at T={r['T']}, n=m={r['n=m']}: {r['native GFLOP/s']:.0f} GFLOP/s, {r['% of peak']:.0f}% "
                f"of vdpbf16ps's peak here ({_peak(level):.0f} GFLOP/s; goal >= {goal:.0f}%: "
                f"{'met' if r['% of peak'] >= goal else 'NOT met'}), {r['torch/native']:.2f}x torch. The fp32 FMA "
                f"peak here is {_peak('avx512'):.0f} GFLOP/s"
                + (": vdpbf16ps issues at about half the FMA rate on this CPU, so its two products per lane buy "
                   "nothing over fp32 FMA (the automatic choice takes it on AMD only)."
                   if _peak(level) < 0.75 * _peak("avx512") else "."))
    # always the same tables in the same order (docs/kernels.md names them by position)
    tables = []
    for level in ("avx2", "portable"):
        if level in levels and level != best:
            tables.append(_run_emulated(level, quick))
        else:
            why = "this machine is such a CPU: see the first table" if level == best else \
                f"this CPU cannot run the {level} level"
            tables.append({"title": f"{level}: not emulated", "columns": ["reason"], "rows": [{"reason": why}],
                           "notes": []})
    tables += _recorded()
    return {"title": f"Fused K-FAC statistics (kfac_update) on CPU, this machine ({isa_label()}): "
                     f"native vs plain torch", "columns": COLUMNS, "rows": rows, "notes": notes, "tables": tables}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--emulate", choices=sorted(EMULATE), required=True,
                        help="print the table of this emulated CPU as JSON (run with its EMULATE environment)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    missing = {k: v for k, v in EMULATE[args.emulate].items() if os.environ.get(k) != v}
    if missing:
        parser.error(f"--emulate {args.emulate} needs the environment {missing} (bench_kfac.run sets it)")
    print(json.dumps(emulated_table(args.emulate, args.quick), default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
