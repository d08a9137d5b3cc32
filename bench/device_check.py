"""The GPU half of lorainit, measured in one invocation (issue 27 item 1): ``make device-check``.

GPU time is short and rare, so everything is prepared here and runs in one call of at most
``--budget-s`` seconds (default 480 s = 8 min wall, Triton's compilation included):

a. **correctness**: every Triton kernel (``lorainit_kernels.triton.kfac.kfac_update`` /
   ``weighted_gram``) and every op (``lk.kfac_update``, ``lk.weighted_gram``, ``lk.sym_matmul``,
   ``lk.ops.rr_grams``), plus ``lk.lobpcg`` and ``lk.guidance_matrix`` on the device, against the
   plain-torch float64 reference (``lorainit_kernels.reference``) on fresh random awkward shapes
   (not multiples of any block size, strided rows, 30% padding masks, negative weights) in
   fp32/bf16/fp16: one pass/fail row per case with the error and its tolerance (the tolerance
   classes of ``tests/lorainit_kernels/triton/test_triton_kfac.py``);
b. **kfac_update speed**: the Triton kernel against plain torch on cuBLAS at T=8192 tokens, n=m in
   {1024, 4096}, bf16: ``cublas_bf16`` (``x^T x`` and ``g^T x`` as bf16 tensor-core GEMMs with
   fp32 accumulation and bf16 outputs, added into fp32 sums: the fastest plain composition, one
   rounding to bf16 more than the kernel) and ``torch backend`` (the op's plain-torch reference:
   fp32 GEMMs of the upcast rows). TFLOP/s count the useful flops of the statistics
   (``T n^2`` for the symmetric ``Z`` + ``2 T m n`` for ``G``) for every provider, and the fraction
   of the device's dense bf16 tensor-core peak (``PEAK_BF16_TFLOPS``, by device name);
c. **LOBPCG**: ``lk.lobpcg`` (k=8 smallest, batch 8, realistic Omega from
   ``bench.spectra.fast_guidance``) against batched ``torch.linalg.eigh`` (cuSOLVER) and, when cupy
   is importable, ``cupyx.scipy.sparse.linalg.lobpcg`` per matrix, for n in {256, 512, 1024, 2048,
   4096}; the crossover (the smallest n from which LOBPCG is faster than eigh at every larger n) is
   the value for ``lorainit_kernels.defaults.EIGH_CROSSOVER_N["cuda"]``;
d. **init overhead**: ``initialize_lora(method="lora_da", step_scale=1)`` on SmolLM2-135M (210
   targets, 256 samples x 64 tokens) against a plain forward+backward over the same samples
   (``bench.common.plain_forward_backward``), both on the GPU; the first init (Triton compiles),
   a second one and one with ``solve_batch=1`` (the same-shape layers solved one by one instead of
   in batched LOBPCG calls: its ``solve_s`` against the second run's is what the batching buys) are timed.

Results: ``bench/results/device_check.json`` and ``.md`` with the device's name, rewritten after
every section and every size of b and c (a run cut short keeps every row it measured). A global
time guard skips what would not fit (each skipped case says so); an alarm shortly before the budget
stops a case that overruns (it fires between Python bytecodes, and again every 5 s), and where a
call never returns to Python (a hung kernel or synchronize), faulthandler prints every thread's
stack and ends the process 60 s after the budget. GPU times are CUDA-event times of back-to-back
calls (the device's time per call, host dispatch overlapped), not wall time around each call.

Without a CUDA device the script prints this plan and exits 0 (``tests/bench/test_device_check.py``).
``--cpu-smoke`` runs the whole script on the CPU at tiny shapes instead, with the Triton kernels in
Triton's interpreter (``TRITON_INTERPRET=1``) and a tiny random Llama in place of SmolLM2, so the
code of every section is executed where no GPU is: its numbers mean nothing, its pass/fail rows do.

Sections run in the order a, b, d, c (c's largest sizes are what the time guard cuts first).

``python -m bench.device_check [--budget-s 480] [--sections a,b,d,c] [--out DIR] [--peak-tflops X]
[--cpu-smoke]``
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import math
import os
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional

RESULTS = Path(__file__).resolve().parent / "results"

# Dense (no sparsity) bf16 tensor-core peak, TFLOP/s, at the boost clock, from NVIDIA's datasheets:
# H100 SXM5 / H100 PCIe / H100 NVL ("NVIDIA H100 Tensor Core GPU" datasheet: 1979 / 1513 / 1671 with
# sparsity, halved), H200 SXM / H200 NVL ("NVIDIA H200 Tensor Core GPU" datasheet: 1979 / 1671 with
# sparsity), GH200 (Grace Hopper superchip datasheet: 990), A100 SXM and PCIe ("NVIDIA A100 Tensor Core
# GPU" datasheet: 312), A10 (A10 datasheet: 125), L4 (L4 datasheet: 242 with sparsity), L40S (L40S
# datasheet: 733 with sparsity), B200 (HGX B200: 4.5 PFLOP/s with sparsity per GPU). Matched in this
# order against torch.cuda.get_device_name(); the first key contained in the name wins.
PEAK_BF16_TFLOPS = (
    ("GH200", 989.5),
    ("H200 NVL", 835.5),
    ("H200", 989.5),
    ("H100 NVL", 835.5),
    ("H100 PCIe", 756.5),
    ("H100", 989.5),      # "NVIDIA H100 80GB HBM3" (SXM5)
    ("A100", 312.0),
    ("L40S", 366.0),
    ("L40", 181.0),       # L40 datasheet: 362 with sparsity; before "L4", which "L40" contains
    ("L4", 121.0),
    ("A10", 125.0),       # after "A100": "A10G" (AWS) is a different part and matches here only approximately
    ("B200", 2250.0),
)

DTYPE_NAMES = ("float32", "bfloat16", "float16")

PLAN = """device_check plan (one invocation, <= {budget:.0f} s wall incl. Triton compilation; results in {out}):
  a. correctness: Triton kfac_update / weighted_gram and the ops kfac_update, weighted_gram, sym_matmul,
     rr_grams, lobpcg, guidance_matrix vs the float64 plain-torch reference, awkward shapes, fp32/bf16/fp16
  b. kfac_update bf16, T=8192, n=m in {{1024, 4096}}: Triton vs cuBLAS bf16 GEMMs vs the torch backend,
     TFLOP/s and fraction of the dense bf16 tensor-core peak
  c. LOBPCG k=8, batch 8, n in {{256..4096}}: lk.lobpcg vs batched torch.linalg.eigh vs cupy lobpcg per
     matrix; crossover for EIGH_CROSSOVER_N['cuda']
  d. initialize_lora(lora_da, step_scale=1) on SmolLM2-135M (210 targets, 256 x 64 tokens) vs a plain
     forward+backward on the GPU"""


class TimeGuard(BaseException):
    """The global budget ran out (raised by the alarm inside a running case). A BaseException, so
    that a library's ``except Exception`` (a per-layer error wrapper, a fallback) cannot swallow it."""


class Run:
    """The state of one invocation: the deadline, the results so far and where they are written."""

    def __init__(self, budget_s: float, out: Path, device: str, smoke: bool, peak: Optional[float]):
        self.t0 = time.perf_counter()
        self.budget_s = budget_s
        self.out = out
        self.device = device
        self.smoke = smoke
        self.results: Dict[str, object] = {"sections": {}, "skipped": []}
        self.peak_override = peak

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def has_time(self, need_s: float, what: str) -> bool:
        """Whether ``need_s`` more seconds fit; if not, ``what`` is recorded as skipped (and printed)."""
        if self.left() >= need_s:
            return True
        msg = f"{what}: skipped by the time guard ({self.left():.0f} s left, about {need_s:.0f} s needed)"
        self.results["skipped"].append(msg)
        print("  " + msg, flush=True)
        return False

    def section(self, key: str) -> Dict[str, object]:
        """The results dict of section ``key``, registered now: rows appended to its ``rows`` as they
        are measured survive a section that fails or is stopped later."""
        sec = self.results["sections"].setdefault(key, {})
        sec.setdefault("rows", [])
        return sec

    def sync(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()

    def time_call(self, fn: Callable[[], object], repeats: int, warmup: int = 1, wall: bool = False
                  ) -> Dict[str, float]:
        """Median and quartiles (seconds per call) of ``repeats`` samples after ``warmup`` calls.

        ``wall`` (and on the CPU): one synchronized wall-clock call per sample (whole jobs whose host
        work counts, e.g. an initialization). Otherwise on CUDA: CUDA events around ``inner``
        back-to-back calls per sample (``inner`` such that a sample lasts ~20 ms, at most 50; one
        extra untimed call sizes it), so the host's dispatch overlaps the device's work and a sample
        is the device's time per call.
        """
        from bench.common import summarize

        for _ in range(warmup):
            fn()
        self.sync()
        if wall or self.device != "cuda":
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                fn()
                self.sync()
                times.append(time.perf_counter() - t)
            return summarize(times)
        import torch

        t = time.perf_counter()
        fn()
        self.sync()
        inner = max(1, min(50, int(0.02 / max(time.perf_counter() - t, 1e-6))))
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.sync()
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / inner)    # elapsed_time: milliseconds
        return summarize(times)

    def write(self) -> None:
        self.results["elapsed_s"] = round(self.elapsed(), 2)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "device_check.json").write_text(json.dumps(self.results, indent=2, default=str))
        (self.out / "device_check.md").write_text(to_markdown(self.results))


def peak_bf16_tflops(name: str) -> Optional[float]:
    """The dense bf16 tensor-core peak of a device named ``name`` (``PEAK_BF16_TFLOPS``), or None."""
    for key, val in PEAK_BF16_TFLOPS:
        if key in name:
            return val
    return None


def _rel(out, ref) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if not bool(out.isfinite().all()):
        return math.inf
    den = float(ref.norm())
    return float((out - ref).norm()) / (den if den > 0 else 1.0)


def _tol32(T: int) -> float:
    """Unweighted sums accumulated in fp32 (every product exact or rounded once): tests/lorainit_kernels/triton/test_triton_kfac.py."""
    return max(1e-5 * math.sqrt(T / 1e3), 1e-6)


# ----------------------------------------------------------------------------------------------
# a. correctness
# ----------------------------------------------------------------------------------------------
def _cases(smoke: bool):
    """(T, n, m, mask kind, row padding) per case: not multiples of any block, strided rows, padding."""
    if smoke:
        return [(37, 21, 13, "pad30", 3), (1, 9, 5, "all", 0)]
    return [(1037, 257, 129, "pad30", 3), (4099, 515, 771, "none", 0), (1, 37, 129, "all", 0),
            (2053, 1031, 67, "pad30", 16)]


def section_correctness(run: Run) -> Dict[str, object]:
    import torch

    import lorainit_kernels as lk
    from lorainit_kernels import backends, ops, reference
    from lorainit_kernels.triton import kfac as tk

    dev = run.device
    sec = run.section("correctness")
    rows: List[Dict[str, object]] = sec["rows"]

    def counts() -> Dict[str, object]:
        fails = [r for r in rows if r["result"] != "pass"]
        return {"rows": rows, "passed": len(rows) - len(fails), "failed": len(fails)}

    def record(name: str, dtype: str, shape: str, err: float, tol: float, note: str = "") -> None:
        ok = err <= tol
        rows.append({"case": name, "dtype": dtype, "shape": shape, "rel_err": err, "tol": tol,
                     "result": "pass" if ok else "FAIL", "note": note})
        print(f"  {'pass' if ok else 'FAIL'}  {name} {dtype} {shape}: {err:.3g} (tol {tol:.3g}) {note}", flush=True)

    def guarded(name: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except TimeGuard:
            raise
        except Exception as e:  # one broken case is a FAIL row, the others still run
            rows.append({"case": name, "dtype": "", "shape": "", "rel_err": math.inf, "tol": 0.0, "result": "FAIL",
                         "note": f"{type(e).__name__}: {e}"[:300]})
            print(f"  FAIL  {name}: {type(e).__name__}: {e}", flush=True)

    gen = torch.Generator().manual_seed(2712)

    def randrows(T, d, dtype, pad=0):
        full = torch.randn(T, d + pad, generator=gen) * 1.5 + 0.25
        return full.to(dtype=dtype, device=dev)[:, :d]

    def mask_of(T, kind):
        if kind == "none":
            return None
        if kind == "all":
            return torch.ones(T, dtype=torch.bool, device=dev)
        m = torch.rand(T, generator=gen) >= 0.3
        m[0] = True
        return m.to(dev)

    # Triton on the CPU runs only when forced (the interpreter); on CUDA "auto" must pick it by itself
    kernel_backend = "triton"
    for dname in DTYPE_NAMES:
        dtype = getattr(torch, dname)
        for T, n, m, kind, pad in _cases(run.smoke):
            if not run.has_time(15, f"a. kfac_update {dname} T={T} n={n} m={m}"):
                return counts()
            shape = f"T={T} n={n} m={m} mask={kind} pad={pad}"

            def kfac_case():
                x, g, mask = randrows(T, n, dtype, pad), randrows(T, m, dtype, pad), mask_of(T, kind)
                valid = T if mask is None else int(mask.sum())
                Zr, Gr, sr = reference.kfac_update(x.cpu(), g.cpu(), None if mask is None else mask.cpu(), True,
                                                   dtype=torch.float64)
                Zs, Gs, ss = tk.kfac_update(x, g, mask, True)
                tol = _tol32(valid)
                record("triton.kfac_update Z", dname, shape, _rel(Zs, Zr), tol,
                       "" if torch.equal(Zs, Zs.T) else "Z NOT exactly symmetric")
                if not torch.equal(Zs, Zs.T):
                    rows[-1]["result"] = "FAIL"
                record("triton.kfac_update G", dname, shape, _rel(Gs, Gr), tol)
                record("triton.kfac_update s", dname, shape, _rel(ss, sr), tol)
                with backends.use(kernel_backend):
                    Z2, G2, s2, cnt = lk.kfac_update(x, g, mask)
                record("op kfac_update (Z, G, s)", dname, shape,
                       max(_rel(Z2, Zr), _rel(G2, Gr), _rel(s2, sr)), tol,
                       f"count {cnt} of {valid}" + ("" if cnt == valid else " WRONG"))
                if dev == "cuda":
                    picked = ops.backend_for("kfac_update", x, g)
                    rows.append({"case": "op kfac_update auto dispatch", "dtype": dname, "shape": shape,
                                 "rel_err": 0.0, "tol": 0.0, "result": "pass" if picked == "triton" else "FAIL",
                                 "note": f"backend_for -> {picked}"})
                # the accumulating form (statistics pass): added into non-zero fp32 sums
                base = [torch.randn(*a.shape, generator=gen).to(dev) for a in (Zr, Gr, sr)]
                base[0] = base[0] + base[0].T
                acc = [b.clone() for b in base]
                tk.kfac_update(x, g, mask, True, out=tuple(acc))
                record("triton.kfac_update out= (accumulating)", dname, shape,
                       max(_rel(a - b, r) for a, b, r in zip(acc, base, (Zr, Gr, sr))), tol,
                       "" if torch.equal(acc[0], acc[0].T) else "Z NOT exactly symmetric")
                if not torch.equal(acc[0], acc[0].T):
                    rows[-1]["result"] = "FAIL"
                # optional outputs: no Z, no g
                _, Gn, _ = tk.kfac_update(x, g, mask, False)
                record("triton.kfac_update without Z", dname, shape, _rel(Gn, Gr), tol)
                Zo, _, _ = tk.kfac_update(x, None, mask, True)
                record("triton.kfac_update without g", dname, shape, _rel(Zo, Zr), tol)

            guarded(f"kfac_update {dname} {shape}", kfac_case)

            def gram_case():
                v = randrows(T, n, dtype, pad)
                w = (torch.randn(T, generator=gen) * torch.logspace(-2, 3, T)[torch.randperm(T, generator=gen)]).to(dev)
                ref_w = reference.weighted_gram(v.cpu(), w.cpu(), dtype=torch.float64)
                ref_1 = reference.weighted_gram(v.cpu(), None, dtype=torch.float64)
                wtol = 1e-2 if dtype == torch.bfloat16 else _tol32(T)   # bf16: w * v rounded to bf16
                out = tk.weighted_gram(v, w)
                record("triton.weighted_gram (negative weights)", dname, shape, _rel(out, ref_w), wtol,
                       "" if torch.equal(out, out.T) else "NOT exactly symmetric")
                if not torch.equal(out, out.T):
                    rows[-1]["result"] = "FAIL"
                record("triton.weighted_gram (no weights)", dname, shape, _rel(tk.weighted_gram(v, None), ref_1),
                       _tol32(T))
                with backends.use(kernel_backend):
                    out_op = lk.weighted_gram(v, w)
                record("op weighted_gram", dname, shape, _rel(out_op, ref_w), wtol)

            guarded(f"weighted_gram {dname} {shape}", gram_case)

        # sym_matmul and rr_grams: whatever backend "auto" picks on the device, within 2x plain torch's
        # own error in the same dtype (+ a few ulps) against float64
        b, n, p = (2, 19, 5) if run.smoke else (3, 517, 19)
        shape = f"b={b} n={n} p={p}"

        def sym_case():
            A = torch.randn(b, n, n, generator=gen, dtype=torch.float64)
            A = (A + A.mT).to(dtype)
            W = torch.randn(b, n, p, generator=gen, dtype=torch.float64).to(dtype)
            ref = A.double() @ W.double()
            Ad, Wd = A.to(dev), W.to(dev)
            torch_err = _rel(Ad @ Wd, ref)
            eps = float(torch.finfo(dtype).eps)
            record("op sym_matmul", dname, shape, _rel(lk.sym_matmul(Ad, Wd), ref), 2 * torch_err + 4 * eps,
                   f"backend {ops.backend_for('sym_matmul', Ad, Wd)}")

        guarded(f"sym_matmul {dname}", sym_case)

        def rr_case():
            S = [torch.randn(b, n, c, generator=gen).to(dtype) for c in (4, 3)]
            AS = [torch.randn(b, n, c, generator=gen).to(dtype) for c in (4, 3)]
            Br, Hr = reference.rr_grams([t.double() for t in S], [t.double() for t in AS])
            Bo, Ho = ops.rr_grams([t.to(dev) for t in S], [t.to(dev) for t in AS])
            # the parts are exact in fp64: the Grams are accurate to fp64 rounding
            record("op rr_grams", dname, shape, max(_rel(Bo, Br), _rel(Ho, Hr)), 1e-12,
                   f"backend {ops.backend_for('rr_grams', [S[0].to(dev)], [AS[0].to(dev)])}")

        guarded(f"rr_grams {dname}", rr_case)

    # the solvers on the device: fp32 LOBPCG (k=8 smallest) against float64 eigh, guidance_matrix
    # (fp32, default backend) against the float64 torch-backend computation on the CPU
    def lobpcg_case():
        from bench.spectra import fast_guidance

        b, n, k = (2, 64, 3) if run.smoke else (4, 1031, 8)
        Om = fast_guidance((b,), n, seed=5)
        vals, vecs = lk.lobpcg(Om.to(dev), k)
        ev, V = torch.linalg.eigh(Om.double())
        Vk = V[..., :k]
        # subspace distance: || (I - V_k V_k^T) vecs ||_2, vs the eigengap; objective error
        Q = vecs.double().cpu()
        resid = Q - Vk @ (Vk.mT @ Q)
        sin = float(torch.linalg.matrix_norm(resid, ord=2).max())
        obj = float(((vals.double().cpu().sum(-1) - ev[..., :k].sum(-1)).abs() / ev[..., :k].sum(-1).abs()).max())
        record("lobpcg k smallest: objective", "float32", f"b={b} n={n} k={k}", obj, 1e-5)
        rows[-1]["note"] = f"max sin(angle) to the float64 eigenspace {sin:.2e}"

    guarded("lobpcg", lobpcg_case)

    def guidance_case():
        from bench.spectra import kfac_stats

        m, n = (13, 21) if run.smoke else (771, 515)
        Z, G, s = kfac_stats((2,), m, n, seed=7)
        ref, dW_ref = lk.guidance_matrix(Z.double(), G.double(), s.double(), n_train=1e4, backend="torch")
        Om, dW = lk.guidance_matrix(Z.float().to(dev), G.float().to(dev), s.float().to(dev), n_train=1e4,
                                    backend=kernel_backend)
        record("guidance_matrix Omega", "float32", f"b=2 m={m} n={n}", _rel(Om, ref), 1e-3,
               "fp32 solves with Z_d (cond ~1e3-1e4)")
        record("guidance_matrix dW", "float32", f"b=2 m={m} n={n}", _rel(dW, dW_ref), 1e-3)

    guarded("guidance_matrix", guidance_case)
    return counts()


# ----------------------------------------------------------------------------------------------
# b. kfac_update speed
# ----------------------------------------------------------------------------------------------
def section_kfac(run: Run) -> Dict[str, object]:
    import torch

    import lorainit_kernels as lk
    from lorainit_kernels import ops

    dev = run.device
    name = _device_name(run)
    peak = run.peak_override or peak_bf16_tflops(name)
    shapes = [(64, 32, 32)] if run.smoke else [(8192, 1024, 1024), (8192, 4096, 4096)]
    repeats = 1 if run.smoke else 20
    sec = run.section("kfac_update")
    sec.update(peak_bf16_tflops=peak, device_name=name)
    rows = sec["rows"]
    gen = torch.Generator().manual_seed(27)
    for T, n, m in shapes:
        if not run.has_time(5 if run.smoke else 25, f"b. kfac_update T={T} n={n} m={m}"):
            break
        x = (torch.randn(T, n, generator=gen) * 0.5).to(device=dev, dtype=torch.bfloat16)
        g = (torch.randn(T, m, generator=gen) * 0.5).to(device=dev, dtype=torch.bfloat16)
        Z = torch.zeros(n, n, device=dev)
        G = torch.zeros(m, n, device=dev)
        s = torch.zeros(m, device=dev)

        def cublas_bf16():
            # bf16 tensor-core GEMMs (fp32 accumulation, bf16 outputs) added into the fp32 sums
            Z.add_(x.mT @ x)
            G.add_(g.mT @ x)
            s.add_(g.float().square().sum(0))

        def forced(backend):
            def call():
                with lk.backends.use(backend):
                    return lk.kfac_update(x, g, None)
            return call

        Za, Ga, sa = (torch.zeros_like(a) for a in (Z, G, s))

        def triton_in_place():
            # the statistics pass's form: added into the fp32 sums by the kernel (no temporary)
            with lk.backends.use("triton"):
                return ops.kfac_accumulate_(Za, Ga, sa, x, g, None)

        providers = {
            "triton": forced("triton"),
            "triton, in place (kfac_accumulate_)": triton_in_place,
            "cublas_bf16": cublas_bf16,
            "torch backend (fp32 GEMMs)": forced("torch"),
        }
        useful = T * n * n + 2 * T * m * n
        times = {}
        for pname, fn in providers.items():
            try:  # one provider's failure is its row's note; the others are still timed
                times[pname] = run.time_call(fn, repeats, warmup=1 if run.smoke else 3)
            except Exception as e:
                times[pname] = {"median": math.nan, "q25": math.nan, "q75": math.nan,
                                "error": f"{type(e).__name__}: {e}"[:200]}
        for pname, st in times.items():
            tflops = useful / st["median"] / 1e12
            rows.append({"provider": pname, "T": T, "n": n, "m": m, "median_ms": 1e3 * st["median"],
                         "q25_ms": 1e3 * st["q25"], "q75_ms": 1e3 * st["q75"], "useful_TFLOPs": tflops,
                         "fraction_of_peak": None if peak is None else tflops / peak,
                         "speedup_of_triton": st["median"] / times["triton"]["median"], "note": st.get("error", "")})
            print(f"  kfac_update T={T} n={n} m={m} {pname}: {1e3 * st['median']:.3f} ms, {tflops:.1f} TFLOP/s",
                  flush=True)
        run.write()
    return {"rows": rows, "peak_bf16_tflops": peak, "device_name": name,
            "peak_source": "--peak-tflops" if run.peak_override else "PEAK_BF16_TFLOPS (NVIDIA datasheets, dense)"}


# ----------------------------------------------------------------------------------------------
# c. LOBPCG vs eigh vs cupy
# ----------------------------------------------------------------------------------------------
def _cupy(device: str):
    """``(cupy, cupyx.scipy.sparse.linalg, None)``, or ``(None, None, why not)``."""
    if device != "cuda":
        return None, None, "the CPU smoke run has no GPU for cupy"
    try:
        import cupy
        import cupyx.scipy.sparse.linalg as cssl

        return cupy, cssl, None
    except Exception as e:  # not installed, or no CUDA runtime for it
        return None, None, f"{type(e).__name__}: {e}"[:200]


def section_lobpcg(run: Run) -> Dict[str, object]:
    import torch

    import lorainit_kernels as lk
    from bench.spectra import fast_guidance

    dev = run.device
    k, b = (3, 2) if run.smoke else (8, 8)
    ns = (48, 96) if run.smoke else (256, 512, 1024, 2048, 4096)
    repeats = 1 if run.smoke else 3
    cupy, cssl, cupy_reason = _cupy(dev)
    sec = run.section("lobpcg")
    sec["cupy"] = "used" if cupy is not None else f"not importable ({cupy_reason}): its column is missing"
    rows, speed = sec["rows"], {}
    if cupy is not None:
        # cupy compiles its kernels on first use (seconds): once here, not inside the first timed call
        cssl.lobpcg(cupy.eye(64, dtype=cupy.float32) * cupy.arange(1, 65, dtype=cupy.float32),
                    cupy.ones((64, 2), dtype=cupy.float32) + cupy.eye(64, 2, dtype=cupy.float32),
                    largest=False, maxiter=3)
    last_s = 0.0
    cut = False
    for n in ns:
        # generation (CPU, fp64) + fp64 eigvalsh + eigh + LOBPCG + cupy; at least ~8x the previous
        # size's time (eigh is cubic), and ~100 s at n=4096 by the formula
        need = 8 if run.smoke else max(15 + n / 50, 8 * last_s)
        if not run.has_time(need, f"c. LOBPCG n={n}"):
            cut = True
            break
        t_n = time.perf_counter()
        t_gen = time.perf_counter()
        Om = fast_guidance((b,), n, seed=1).to(dev)
        t_gen = time.perf_counter() - t_gen
        ev = torch.linalg.eigvalsh(Om.double())
        opt = ev[..., :k].sum(-1)
        norms = ev.abs().amax(-1)   # ||Omega_i||_2: cupy's tol is absolute (residual norms below it)

        def objective_err(V):
            V = V.double()
            obj = (V * (Om.double() @ V)).sum((-2, -1))
            return float(((obj - opt).abs() / opt.abs()).max())

        providers: Dict[str, Callable[[], object]] = {
            "lorainit.lobpcg": lambda: lk.lobpcg(Om, k)[1],
            "torch.linalg.eigh (batched)": lambda: torch.linalg.eigh(Om)[1][..., :k],
        }
        if cupy is not None:
            X0 = [cupy.asarray(torch.randn(n, k, generator=torch.Generator().manual_seed(i)).numpy()) for i in range(b)]
            mats = [cupy.from_dlpack(Om[i].contiguous()) for i in range(b)]

            def cupy_lobpcg():
                out = []
                for i, (M, X) in enumerate(zip(mats, X0)):
                    # the same relative residual as lk.lobpcg's target, made absolute for cupy
                    _, v = cssl.lobpcg(M, X.copy(), largest=False, tol=1e-5 * float(norms[i]), maxiter=200)
                    out.append(torch.from_dlpack(v))
                return torch.stack(out)

            providers["cupyx lobpcg (per matrix)"] = cupy_lobpcg
        errs, times, iters = {}, {}, None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for pname, fn in providers.items():
                per_matrix = pname.startswith("cupyx")
                if per_matrix and not run.has_time(10 + n / 50, f"c. cupy lobpcg n={n}"):
                    continue
                try:
                    if per_matrix:
                        # cupy's lobpcg iterates with host synchronizations: one timed call, its result judged
                        run.sync()
                        t = time.perf_counter()
                        V = fn()
                        run.sync()
                        t = time.perf_counter() - t
                        errs[pname] = objective_err(V)
                        times[pname] = {"median": t, "q25": t, "q75": t, "note": "one call"}
                    else:
                        errs[pname] = objective_err(fn())       # also the warmup (handles, workspaces)
                        times[pname] = run.time_call(fn, repeats, warmup=0)
                except TimeGuard:
                    raise
                except Exception as e:
                    errs[pname] = math.nan
                    times[pname] = {"median": math.nan, "q25": math.nan, "q75": math.nan, "note": f"{e}"[:200]}
            try:
                iters = lk.lobpcg(Om, k, return_info=True)[2]["iterations"].reshape(-1)
            except Exception:
                iters = None
        base = times["torch.linalg.eigh (batched)"]["median"]
        for pname, st in times.items():
            row = {"provider": pname, "batch": b, "n": n, "k": k, "median_s": st["median"], "q25_s": st["q25"],
                   "q75_s": st["q75"], "speedup_vs_eigh": base / st["median"] if st["median"] else math.nan,
                   "objective_rel_err": errs[pname], "reaches_1e-5": "yes" if errs[pname] <= 1e-5 else "NO",
                   "note": st.get("note", "")}
            if pname == "lorainit.lobpcg" and iters is not None:
                row["note"] = f"iterations {int(iters.min())}-{int(iters.max())}; Omega generated in {t_gen:.1f} s (CPU)"
            if pname == "lorainit.lobpcg" and math.isfinite(row["speedup_vs_eigh"]):
                speed[n] = row["speedup_vs_eigh"]
            rows.append(row)
            print(f"  n={n} {pname}: {st['median']:.4f} s, {row['speedup_vs_eigh']:.2f}x eigh, "
                  f"objective err {errs[pname]:.2e}", flush=True)
        last_s = time.perf_counter() - t_n
        sec["swept_n"] = sorted(speed)
        run.write()
    crossover = _crossover(speed)
    out = {"rows": rows, "crossover_n": crossover, "swept_n": sorted(speed), "suggested_EIGH_CROSSOVER_N_cuda": crossover}
    if cut:
        out["crossover_caveat"] = (f"the sweep stopped at n={max(speed) if speed else None} (time guard): the crossover "
                                   "holds for the swept sizes only")
    return out


def _crossover(speed: Dict[int, float]) -> Optional[int]:
    """The smallest swept n from which LOBPCG is at least as fast as eigh at every larger swept n."""
    ns = sorted(speed)
    for n in ns:
        if all(speed[m] >= 1 for m in ns if m >= n):
            return n
    return None


# ----------------------------------------------------------------------------------------------
# d. initialize_lora on SmolLM2-135M vs a plain forward+backward
# ----------------------------------------------------------------------------------------------
def _tiny_llama(device: str):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorainit.models import LLAMA_PROJECTIONS

    import torch

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    model = get_peft_model(LlamaForCausalLM(cfg).to(device),
                           LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_PROJECTIONS, lora_dropout=0.0))
    ids = torch.randint(3, 97, (8, 16), generator=torch.Generator().manual_seed(1))
    batches = [{"input_ids": ids[i:i + 4], "attention_mask": torch.ones_like(ids[i:i + 4]),
                "labels": ids[i:i + 4].clone()} for i in range(0, 8, 4)]
    return model, batches, 8


def _smollm2(device: str):
    import torch
    from peft import LoraConfig, get_peft_model

    from bench.bench_init_overhead_smollm2 import _batches
    from lorainit.models import LLAMA_PROJECTIONS, load_smollm2

    base, tok = load_smollm2(torch.float32, device=device)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=LLAMA_PROJECTIONS, lora_dropout=0.0))
    return model, _batches(tok, 256, 64, 8), 256


def section_init(run: Run) -> Dict[str, object]:
    import torch

    from bench.common import plain_forward_backward
    from lorainit import LoRADAConfig, initialize_lora

    dev = run.device
    sec = run.section("init_overhead")
    if not run.has_time(20 if run.smoke else 90, "d. initialize_lora on SmolLM2-135M"):
        return {"rows": sec["rows"]}
    model, batches, samples = _tiny_llama(dev) if run.smoke else _smollm2(dev)
    batches = [{k: v.to(dev) for k, v in b.items()} for b in batches]
    weights = [m.base_layer.weight for m in model.modules() if hasattr(m, "base_layer") and hasattr(m, "lora_A")]
    plain_forward_backward(model, batches[:2], weights)          # CUDA context, cuBLAS handles
    base = run.time_call(lambda: plain_forward_backward(model, batches, weights), repeats=3, warmup=1,
                         wall=True)["median"]
    cfg = LoRADAConfig(step_scale=1.0)
    warnings.simplefilter("ignore")       # as bench_init_overhead_smollm2: n_train falls back, PEFT notices
    rows, reports = sec["rows"], []
    runs = (("first initialize_lora (Triton compiles)", cfg), ("second initialize_lora", cfg),
            ("initialize_lora, solve_batch=1 (one layer per solve)", LoRADAConfig(step_scale=1.0, solve_batch=1)))
    for label, config in runs:
        if not label.startswith("first") and not run.has_time(30 if not run.smoke else 5, f"d. {label}"):
            break
        st = run.time_call(lambda: reports.append(initialize_lora(model, batches, config=config, num_samples=samples,
                                                                  progress=False)), repeats=1, warmup=0,
                           wall=True)
        tm = reports[-1].timings
        solvers = {}
        for row in reports[-1].layers:
            solvers[row.get("solver", "?")] = solvers.get(row.get("solver", "?"), 0) + 1
        rows.append({"run": label, "targets": len(weights), "init_s": st["median"], "fwd_bwd_s": base,
                     "ratio": st["median"] / base, "stats_pass_s": tm.get("stats_pass", 0.0),
                     "solve_s": tm.get("solve", 0.0), "write_s": tm.get("write", 0.0),
                     "solvers": ", ".join(f"{k} {v}" for k, v in sorted(solvers.items()))})
        print(f"  {label}: {st['median']:.2f} s vs forward+backward {base:.3f} s ({st['median'] / base:.2f}x)",
              flush=True)
        run.write()
    if dev == "cuda":
        torch.cuda.empty_cache()
    return {"rows": rows, "model": "tiny random Llama (--cpu-smoke)" if run.smoke else "SmolLM2-135M, LoRA r=8",
            "samples": samples}


# ----------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------
SECTIONS = {"a": ("correctness", section_correctness), "b": ("kfac_update", section_kfac),
            "c": ("lobpcg", section_lobpcg), "d": ("init_overhead", section_init)}


def _device_name(run: Run) -> str:
    import torch

    if run.device == "cuda":
        return torch.cuda.get_device_name()
    return "CPU (--cpu-smoke: Triton interpreter, numbers are not GPU measurements)"


def _environment(run: Run) -> Dict[str, object]:
    import torch

    env = {"device": run.device, "device_name": _device_name(run), "torch": torch.__version__,
           "cuda": torch.version.cuda, "smoke": run.smoke, "budget_s": run.budget_s,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if run.device == "cuda":
        p = torch.cuda.get_device_properties(0)
        env.update(capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2 ** 30, 1),
                   multiprocessors=p.multi_processor_count)
    return env


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if v == 0 or 1e-3 <= abs(v) < 1e4:
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.1f}"
        return f"{v:.2e}"
    return str(v)


def _table(rows: List[dict]) -> List[str]:
    if not rows:
        return ["(no rows)"]
    cols = list(dict.fromkeys(c for r in rows for c in r))
    return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)] + \
        ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]


def to_markdown(res: Dict[str, object]) -> str:
    env = res.get("environment", {})
    lines = ["# Device check (bench/device_check.py)", "",
             f"Device: **{env.get('device_name', '?')}**, torch {env.get('torch')}, CUDA {env.get('cuda')}, "
             f"Triton {env.get('triton')}, {env.get('date')}; wall {res.get('elapsed_s')} s of a "
             f"{env.get('budget_s')} s budget.", ""]
    if env.get("smoke"):
        lines += ["**CPU smoke run**: tiny shapes, Triton interpreter; the times are not GPU measurements.", ""]
    secs = res.get("sections", {})
    titles = {"correctness": "a. Correctness against the float64 reference",
              "kfac_update": "b. kfac_update, bf16: Triton vs cuBLAS",
              "lobpcg": "c. LOBPCG vs batched eigh vs cupy", "init_overhead": "d. initialize_lora vs forward+backward"}
    for key, title in titles.items():
        if key not in secs:
            continue
        sec = secs[key]
        lines += [f"## {title}", ""]
        if "error" in sec:
            lines += [f"Section failed: `{sec['error']}`", ""]
        lines += _table(sec.get("rows", [])) + [""]
        for extra in ("passed", "failed", "peak_bf16_tflops", "peak_source", "crossover_n",
                      "suggested_EIGH_CROSSOVER_N_cuda", "crossover_caveat", "cupy", "model"):
            if extra in sec:
                lines.append(f"- {extra}: {sec[extra]}")
        lines.append("")
    if res.get("skipped"):
        lines += ["## Skipped by the time guard", ""] + [f"- {s}" for s in res["skipped"]] + [""]
    return "\n".join(lines)


def _nvidia_device_present() -> bool:
    """Whether the NVIDIA driver exposes a device node here (whatever torch build is installed)."""
    return Path("/dev/nvidia0").exists() or Path("/dev/nvidiactl").exists()


def _alarm(signum, frame):
    raise TimeGuard("the global time budget ran out inside a case")


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget of the whole run (s)")
    # c last: its largest sizes are what the time guard cuts first
    ap.add_argument("--sections", default="a,b,d,c", help="comma-separated subset of a,b,c,d, run in this order")
    ap.add_argument("--out", type=Path, default=None, help=f"results folder (default {RESULTS})")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of this device (TFLOP/s)")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="run every section on the CPU at tiny shapes (Triton interpreter): checks the script")
    args = ap.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        ap.error(f"--sections: unknown {bad}; choose from {sorted(SECTIONS)}")
    if args.cpu_smoke:
        # before lorainit_kernels.triton is imported: @triton.jit reads it at decoration time
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import torch

    out = args.out or RESULTS
    if not args.cpu_smoke and not torch.cuda.is_available():
        print(PLAN.format(budget=args.budget_s, out=out))
        if _nvidia_device_present():
            # an NVIDIA GPU is here but this torch cannot use it (a CPU build, or no driver access):
            # exiting 0 would pass off a run that measured nothing as a GPU run
            print(f"An NVIDIA device is present but torch {torch.__version__} cannot use it "
                  f"(torch.version.cuda={torch.version.cuda}): install a CUDA build of torch in this "
                  f"interpreter ({sys.executable}) or run with one (make device-check DEVICE_PY=...).")
            return 2
        print("No CUDA device here: nothing was run (use --cpu-smoke to execute the script on the CPU at tiny shapes).")
        return 0
    import lorainit_kernels as lk

    if not lk.has_triton():
        print("triton is not installed: the Triton kernels cannot be checked (pip install triton)")
        return 1
    run = Run(args.budget_s, out, "cpu" if args.cpu_smoke else "cuda", args.cpu_smoke, args.peak_tflops)
    run.results["environment"] = _environment(run)
    print(PLAN.format(budget=args.budget_s, out=out), flush=True)
    print(f"device: {run.results['environment']['device_name']}", flush=True)
    use_alarm = hasattr(signal, "SIGALRM")
    if use_alarm:
        try:
            previous = signal.signal(signal.SIGALRM, _alarm)
        except ValueError:                    # not the main thread: the per-case guard alone
            use_alarm = False
    if use_alarm:
        # a margin before the budget for the last write; re-fires every 5 s should a handler swallow one
        signal.setitimer(signal.ITIMER_REAL, max(1.0, args.budget_s - min(15.0, 0.05 * args.budget_s)), 5.0)
    # a call that never returns to Python (a hung kernel or synchronize) is out of the alarm's reach
    faulthandler.dump_traceback_later(args.budget_s + 60.0, exit=True)
    try:
        for s in sections:
            key, fn = SECTIONS[s]
            print(f"[{run.elapsed():6.1f} s] section {s}: {key}", flush=True)
            try:
                with warnings.catch_warnings():   # a section's warning filters end with it
                    run.results["sections"].setdefault(key, {}).update(fn(run))
            except TimeGuard as e:
                if use_alarm:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                # the rows the section measured stay (Run.section registered them)
                run.results["sections"].setdefault(key, {})["error"] = str(e)
                run.results["skipped"].append(f"{s}. {key}: stopped by the alarm at the budget")
                break
            except Exception as e:  # a broken section is recorded with its rows so far; the next ones still run
                traceback.print_exc()
                run.results["sections"].setdefault(key, {})["error"] = f"{type(e).__name__}: {e}"[:500]
            finally:
                run.write()
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        faulthandler.cancel_dump_traceback_later()
        run.write()
    corr = run.results["sections"].get("correctness", {})
    failed = corr.get("failed", 0) if isinstance(corr, dict) else 0
    errors = [k for k, v in run.results["sections"].items() if isinstance(v, dict) and "error" in v]
    print(f"[{run.elapsed():6.1f} s] done: {out / 'device_check.md'}; correctness failures {failed}; "
          f"sections with errors {errors or 'none'}; skipped {len(run.results['skipped'])}", flush=True)
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())
