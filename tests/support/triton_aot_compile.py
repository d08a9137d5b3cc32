"""Ahead-of-time compile every shipped variant of the Triton kernels for sm_80 and sm_90 (no GPU needed).

Run as a script (``python tests/support/triton_aot_compile.py [--workers N]``) with ``TRITON_INTERPRET`` unset: under
the interpreter ``@triton.jit`` returns an interpreted function that cannot be compiled. Prints one
JSON list with a record per (variant, compute capability): whether it compiled, the tensor-core
instructions in its PTX (``mma.sync`` on sm_80, ``wgmma.mma_async`` on sm_90), and what the bundled
``ptxas -v`` reports (registers, spill stores/loads, stack) plus Triton's shared-memory size.
``tests/lorainit_kernels/triton/test_triton_aot.py`` asserts on these records.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

CAPS = (80, 90)
_TT = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}
_SCALARS = ("T", "M", "N", "stride_a", "stride_b", "stride_out", "tokens_per_split")


def variants():
    """(name, a_dtype, b_dtype, weighted, gather, symmetric, row_sq, precision, config, accumulate) of every shipped launch.

    Z = sum x x^T over masked tokens (gather, upper-triangle tiles); G = sum g x^T with the fused
    row sums of g^2 (gather); WG = weighted Gram (weights, symmetric). bf16/fp16 use the tensor-core
    configurations; weighted fp16 and mixed dtypes are widened to fp32 and use the fp32 configuration,
    like the launcher. fp32 is compiled with the default tf32x3 and, once, with "ieee" (no tensor cores
    by design: the exact-fp32 option). "+acc": the accumulating form (``kfac_update(..., out=...)``: the
    statistics added into the caller's accumulators by the kernel).
    """
    out = []
    for dt in ("bf16", "fp16"):
        for cfg in ("tc16_128", "tc16_64"):
            out.append((f"Z/{dt}/{cfg}", dt, dt, False, True, True, False, "tf32x3", cfg))
            out.append((f"G/{dt}/{cfg}", dt, dt, False, True, False, True, "tf32x3", cfg))
        if dt == "bf16":
            for cfg in ("tc16_128", "tc16_64"):
                out.append((f"WG/{dt}/{cfg}", dt, dt, True, False, True, False, "tf32x3", cfg))
    out.append(("WG/fp16->fp32/fp32_64", "fp16", "fp16", True, False, True, False, "tf32x3", "fp32_64"))
    for kind, weighted, gather, sym, sq in (("Z", False, True, True, False), ("G", False, True, False, True),
                                            ("WG", True, False, True, False)):
        out.append((f"{kind}/fp32/fp32_64", "fp32", "fp32", weighted, gather, sym, sq, "tf32x3", "fp32_64"))
    out.append(("Z/fp32-ieee/fp32_64", "fp32", "fp32", False, True, True, False, "ieee", "fp32_64"))
    out.append(("G/bf16xfp32/fp32_64", "bf16", "fp32", False, True, False, True, "tf32x3", "fp32_64"))
    out = [v + (False,) for v in out]
    for dt, cfg in (("bf16", "tc16_64"), ("fp16", "tc16_64"), ("fp32", "fp32_64_w8")):
        out.append((f"Z+acc/{dt}/{cfg}", dt, dt, False, True, True, False, "tf32x3", cfg, True))
        out.append((f"G+acc/{dt}/{cfg}", dt, dt, False, True, False, True, "tf32x3", cfg, True))
    return out


def _ptxas(cap: int) -> str:
    """The ptxas Triton itself uses for ``cap`` (it bundles an older one for sm_8x, a newer one for sm_90+)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(cap).path


def _ptxas_report(ptx: str, cap: int) -> dict:
    """Registers, spills and stack from ``ptxas -v`` on the PTX, for the arch the PTX targets."""
    arch = re.search(r"^\.target\s+(sm_\w+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        res = subprocess.run([_ptxas(cap), "-v", f"--gpu-name={arch}", str(src), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True)
    log = res.stdout + res.stderr
    if res.returncode != 0:
        return {"ptxas_ok": False, "ptxas_log": log[-2000:]}

    def num(pattern):
        m = re.search(pattern, log)
        return int(m.group(1)) if m else None

    return {
        "ptxas_ok": True, "arch": arch,
        "registers": num(r"Used (\d+) registers"),
        "spill_stores": num(r"(\d+) bytes spill stores"),
        "spill_loads": num(r"(\d+) bytes spill loads"),
        "stack": num(r"(\d+) bytes stack frame"),
    }


def compile_one(args) -> dict:
    (name, a_dt, b_dt, weighted, gather, symmetric, row_sq, precision, cfg_name, accumulate), cap = args
    import torch
    import triton
    from triton.backends.compiler import GPUTarget

    from lorainit_kernels.triton import kfac as K

    torch_dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    cfg = K.CONFIGS[cfg_name]
    meta = K._kernel_constexprs(torch_dt[a_dt], torch_dt[b_dt], weighted=weighted, gather=gather,
                                symmetric=symmetric, row_sq=row_sq, precision=precision, config=cfg,
                                interpreting=False, accumulate=accumulate)
    fn = K._weighted_gram_kernel
    sig = {"a_ptr": f"*{a_dt}", "b_ptr": f"*{b_dt}",
           "w_ptr": "*fp32" if weighted else "constexpr",
           "idx_ptr": "*i32" if gather else "constexpr",
           "out_ptr": "*fp32",
           "sq_ptr": "*fp32" if row_sq else "constexpr"}
    sig.update({k: "i32" for k in _SCALARS})
    constexprs = dict(meta)
    for ptr in ("w_ptr", "idx_ptr", "sq_ptr"):  # absent operands are None, as the launcher passes them
        if sig[ptr] == "constexpr":
            constexprs[ptr] = None
    sig.update({k: "constexpr" for k in meta})
    # The common case the JIT specializes on: 16-byte aligned pointers and row strides (hidden sizes
    # are multiples of 16). Unaligned strides compile to narrower loads of the same structure.
    aligned = ["a_ptr", "b_ptr", "out_ptr", "stride_a", "stride_b", "stride_out"]
    aligned += [p for p in ("w_ptr", "idx_ptr", "sq_ptr") if sig[p] != "constexpr"]
    attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in aligned}
    rec = {"name": name, "cap": cap, "config": cfg_name, "a_dtype": a_dt, "b_dtype": b_dt, "precision": meta["PRECISION"],
           "upcast": meta["UPCAST"], "dot_fp32": meta["UPCAST"] or a_dt == "fp32", "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    t0 = time.time()
    try:
        k = triton.compile(triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                           target=GPUTarget("cuda", cap, 32),
                           options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    except Exception as err:  # reported, and the test fails on it
        rec.update(ok=False, error=f"{type(err).__name__}: {err}"[-3000:])
        return rec
    ptx = k.asm["ptx"]
    rec.update(
        ok=True, seconds=round(time.time() - t0, 2), cubin_bytes=len(k.asm.get("cubin", b"")),
        shared=k.metadata.shared,
        uses_dot="tt.dot" in k.asm["ttir"],
        mma=len(re.findall(r"\bmma\.sync\.", ptx)),
        wgmma=len(re.findall(r"\bwgmma\.mma_async\.", ptx)),
        local_ops=len(re.findall(r"\b(?:ld|st)\.local\b", ptx)),
    )
    rec.update(_ptxas_report(ptx, cap))
    return rec


def run(workers: int = 2) -> list:
    jobs = [(v, cap) for v in variants() for cap in CAPS]
    if workers <= 1:
        return [compile_one(j) for j in jobs]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(compile_one, jobs))


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET to compile ahead of time", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--table", action="store_true", help="print a Markdown table instead of JSON")
    args = parser.parse_args(argv)
    recs = run(args.workers)
    if args.table:
        print("| kernel/dtype/config | sm | compiled | mma | wgmma | regs | spill st/ld (B) | shared (B) |")
        print("|---|---|---|---|---|---|---|---|")
        for r in recs:
            if not r["ok"]:
                print(f"| {r['name']} | {r['cap']} | NO: {r['error'][:60]} | | | | | |")
                continue
            print(f"| {r['name']} | {r.get('arch', r['cap'])} | yes | {r['mma']} | {r['wgmma']} | {r.get('registers')} | "
                  f"{r.get('spill_stores')}/{r.get('spill_loads')} | {r['shared']} |")
    else:
        json.dump(recs, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
