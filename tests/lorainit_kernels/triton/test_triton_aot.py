"""Ahead-of-time compilation of every shipped Triton kernel variant for sm_80 and sm_90 (no GPU needed).

For each (kernel, dtype, block configuration) the launcher can use, ``tests/support/triton_aot_compile.py`` compiles
``_weighted_gram_kernel`` with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))`` in a
subprocess with ``TRITON_INTERPRET`` unset (under the interpreter ``@triton.jit`` cannot compile), and
runs the PTX through the ptxas Triton uses. Here we assert: it compiles; ``tl.dot`` became tensor-core
instructions (``mma.sync`` on sm_80, ``wgmma.mma_async`` on sm_90) except for the exact-fp32 "ieee"
option, which must not; no spills to local memory; registers and shared memory within the hardware
limits. The compile runs once per session (Triton's cache makes later runs fast).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import triton_aot_compile as _aot  # noqa: E402  (imports nothing heavy; the compiling happens in the subprocess)

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed: nothing to compile", allow_module_level=True)
if importlib.util.find_spec("triton.backends.nvidia") is None:
    pytest.skip("this triton has no NVIDIA backend: cannot compile for sm_80/sm_90", allow_module_level=True)

# Opt-in shared memory per block: sm_80 (A100) 163 KB, sm_90 (H100) 227 KB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
MAX_REGISTERS = 255


@pytest.fixture(scope="session")
def aot_records():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run([sys.executable, str(Path(_aot.__file__)), "--workers", "2"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"AOT helper failed:\n{res.stderr[-4000:]}"
    recs = json.loads(res.stdout)
    return {(r["name"], r["cap"]): r for r in recs}


CASES = [(v[0], cap) for v in _aot.variants() for cap in _aot.CAPS]


def test_every_shipped_config_and_dtype_is_covered():
    from lorainit_kernels.triton.kfac import CONFIGS  # plain import: no compile, no interpreter needed

    names = [v[0] for v in _aot.variants()]
    for cfg in CONFIGS:
        assert any(n.endswith("/" + cfg) for n in names), f"config {cfg} is not compiled ahead of time"
    for dt in ("bf16", "fp16", "fp32"):
        assert any(f"/{dt}/" in n for n in names), f"dtype {dt} is not compiled ahead of time"


@pytest.mark.parametrize("name,cap", CASES, ids=[f"{n}-sm{c}" for n, c in CASES])
def test_aot_compile(aot_records, name, cap):
    r = aot_records[(name, cap)]
    assert r["ok"], f"{name} does not compile for sm_{cap}: {r.get('error')}"
    assert r["ptxas_ok"], f"ptxas rejected {name} for sm_{cap}:\n{r.get('ptxas_log')}"
    assert r["uses_dot"], "every variant multiplies its tiles with tl.dot"
    tensor_core = r["mma"] if cap < 90 else r["wgmma"]
    if r["dot_fp32"] and r["precision"] == "ieee":
        # The exact-fp32 option: FMAs, no TF32 tensor-core products.
        assert r["mma"] == 0 and r["wgmma"] == 0, f"{name}: 'ieee' must not use tensor cores"
    else:
        instr = "mma.sync" if cap < 90 else "wgmma.mma_async"
        assert tensor_core > 0, f"{name}: tl.dot did not become {instr} on sm_{cap}"
    assert r["spill_stores"] == 0 and r["spill_loads"] == 0, (
        f"{name} on sm_{cap}: {r['spill_stores']} B spill stores, {r['spill_loads']} B spill loads "
        f"({r['registers']} registers)")
    assert r["local_ops"] == 0, f"{name} on sm_{cap}: PTX uses local memory"
    assert r["stack"] == 0
    assert 0 < r["registers"] <= MAX_REGISTERS
    assert 0 < r["shared"] <= SHARED_LIMIT[cap], f"{name}: {r['shared']} B shared memory on sm_{cap}"
