"""The C++ CPU backend (lorainit_kernels._C through lorainit_kernels._native), on every ISA path this
CPU runs, against the float64 reference and against plain torch's error in the same dtype."""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

import lorainit_kernels
from lorainit_kernels import backends, reference
from lorainit_kernels.backends import has_native

if not has_native():
    pytest.skip(f"lorainit_kernels._C is not built ({backends._load_native()[1]})", allow_module_level=True)

from lorainit_kernels import _native  # noqa: E402

_C = backends.native_module()
ISAS = _native.isa_levels()
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    monkeypatch.setenv(_native.ISA_ENV, request.param)
    return request.param


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(out).any(), "NaN in output"
    num = (out.double() - ref).norm().item()
    den = ref.norm().item()
    return num / den if den > 0 else num


def tol(dtype: torch.dtype, T: int) -> float:
    # docs/math.md, tolerances: fp32 accumulation 1e-5*sqrt(T/1e3) class; bf16/fp16 operands 1e-2.
    return 1e-5 * math.sqrt(max(T, 1000) / 1e3) if dtype == torch.float32 else 1e-2


def check_against_torch(outs, refs, torch_outs, dtype, T):
    """Each output within the tolerance of docs/math.md and within 2x plain torch's error (+1 fp32 ulp)."""
    for name, out, ref, tout in zip(("Z", "G", "s"), outs, refs, torch_outs):
        assert out.shape == ref.shape and out.dtype == torch.float32, name
        e, et = rel_err(out, ref), rel_err(tout, ref)
        assert e <= tol(dtype, T), f"{name}: rel err {e:.3g} > {tol(dtype, T):.3g}"
        assert e <= 2 * et + 2.0 ** -24, f"{name}: rel err {e:.3g} > 2 x torch's {et:.3g}"


CASES = {  # name: (T, n, m, fraction of padding or None, seed)
    "T1": (1, 37, 129, None, 1),
    "none_valid": (17, 37, 129, 1.0, 2),
    "all_valid_odd": (301, 37, 129, None, 3),
    "pad30": (300, 37, 129, 0.3, 4),
    "multi_block_threads": (777, 150, 91, 0.3, 5),  # several token blocks, threaded, odd K
    # avx2 packs a few token blocks at a time (8 MB): here 4 blocks per superblock, 5 blocks, so the
    # second superblock adds to the first's sums; odd n, m leave partial A and B panels
    "superblocks": (1500, 701, 301, 0.3, 6),
}


def make_case(case, dtype, g_dtype=None):
    T, n, m, pad, seed = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(T, n, generator=gen) * 2 + 0.5).to(dtype)
    g = (torch.randn(T, m, generator=gen) * 0.01).to(g_dtype or dtype)
    mask = None if pad is None else torch.rand(T, generator=gen) >= pad
    return x, g, mask


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_kfac_update_vs_float64(isa, dtype, case):
    x, g, mask = make_case(case, dtype)
    T = x.shape[0]
    outs = _native.kfac_update(x, g, mask, True)
    refs = reference.kfac_update(x, g, mask, True, dtype=torch.float64)
    torch_outs = reference.kfac_update(x, g, mask, True, dtype=torch.float32)
    if mask is not None and not mask.any():
        for out, ref in zip(outs, refs):
            assert out.shape == ref.shape and torch.equal(out, torch.zeros_like(out))
        return
    check_against_torch(outs, refs, torch_outs, dtype, T)
    assert torch.equal(outs[0], outs[0].T), "Z must be exactly symmetric (mirrored triangle)"


@pytest.mark.parametrize("with_input_cov,use_g", [(True, False), (False, True)])
def test_kfac_update_partial_outputs(isa, with_input_cov, use_g):
    x, g, mask = make_case("pad30", torch.bfloat16)
    g = g if use_g else None
    Z, G, s = _native.kfac_update(x, g, mask, with_input_cov)
    Zr, Gr, sr = reference.kfac_update(x, g, mask, with_input_cov, dtype=torch.float64)
    assert Z.shape == Zr.shape and G.shape == Gr.shape and s.shape == sr.shape
    for out, ref in ((Z, Zr), (G, Gr), (s, sr)):
        if ref.numel():
            assert rel_err(out, ref) < 1e-6


def test_mixed_dtypes(isa):
    x, g, mask = make_case("pad30", torch.bfloat16, g_dtype=torch.float16)
    outs = _native.kfac_update(x, g, mask, True)
    refs = reference.kfac_update(x, g, mask, True, dtype=torch.float64)
    check_against_torch(outs, refs, reference.kfac_update(x, g, mask, True), torch.float16, x.shape[0])
    expected = _C.kernel_name(1, 2, False, _native.requested_isa())
    assert _native.kernel_name(torch.bfloat16, torch.float16) == expected
    assert "dpbf16" not in expected  # bf16 pairs need every operand in bf16


def test_strided_rows_and_broadcast_rows(isa):
    gen = torch.Generator().manual_seed(11)
    big = torch.randn(203, 80, generator=gen)
    x = big[:, 5:42]  # row stride 80, unit column stride
    g = torch.randn(203, 3, 50, generator=gen)[:, 1, :]  # row stride 150
    mask = torch.rand(203, generator=gen) > 0.5
    outs = _native.kfac_update(x, g, mask, True)
    refs = reference.kfac_update(x, g, mask, True, dtype=torch.float64)
    check_against_torch(outs, refs, reference.kfac_update(x, g, mask, True), torch.float32, 203)
    row = torch.randn(1, 37, generator=gen)
    xb = row.expand(9, 37)  # row stride 0
    Z, _, _ = _native.kfac_update(xb, None, None, True)
    assert rel_err(Z, 9 * row.double().T @ row.double()) < 1e-6


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,d", [(1, 37), (333, 45), (600, 130)])
def test_weighted_gram_negative_weights(isa, dtype, T, d):
    gen = torch.Generator().manual_seed(T + d)
    v = torch.randn(T, d, generator=gen).to(dtype)
    w = torch.randn(T, generator=gen) * 3  # both signs
    for weights in (w, None):
        out = _native.weighted_gram(v, weights)
        ref = reference.weighted_gram(v, weights, dtype=torch.float64)
        e, et = rel_err(out, ref), rel_err(reference.weighted_gram(v, weights), ref)
        assert e <= tol(dtype, T) and e <= 2 * et + 2.0 ** -24, (e, et)
        assert torch.equal(out, out.T)


def test_nan_and_inf_propagate_to_diagonals(isa):
    x, g, mask = make_case("pad30", torch.bfloat16)
    valid = int(mask.nonzero()[3])
    x[valid, 7] = float("nan")
    g[valid, 11] = float("inf")
    Z, G, s = _native.kfac_update(x, g, mask, True)
    assert torch.isnan(Z[7, 7]) and torch.isinf(s[11])
    assert torch.isfinite(Z[:7, :7]).all()


def test_padding_is_never_read_into_sums(isa):
    """NaN in padding tokens must not reach the outputs: padding is compacted away, not zeroed."""
    x, g, mask = make_case("multi_block_threads", torch.bfloat16)
    x[~mask] = float("nan")
    g[~mask] = float("nan")
    outs = _native.kfac_update(x, g, mask, True)
    refs = reference.kfac_update(x, g, mask, True, dtype=torch.float64)
    for out, ref in zip(outs, refs):
        assert torch.isfinite(out).all() and rel_err(out, ref) < 1e-6


def test_kernel_names_follow_isa(isa):
    name = _native.kernel_name(torch.bfloat16, torch.bfloat16)
    assert name.startswith(isa if isa != "avx512bf16" else "avx512bf16/dpbf16")
    x, g, mask = make_case("pad30", torch.bfloat16)
    Zs, Gs, ss = (torch.empty(37, 37), torch.empty(129, 37), torch.empty(129))
    ran = _C.kfac_update(x.data_ptr(), x.stride(0), 1, x.shape[0], 37, g.data_ptr(), g.stride(0), 1, 129,
                         mask.data_ptr(), True, Zs.data_ptr(), Gs.data_ptr(), ss.data_ptr(),
                         _native.requested_isa(), 2)
    assert ran == name
    assert _native.kernel_name(torch.float32).startswith(isa if isa not in ("avx512bf16", "amx") else "avx512/")


def test_auto_bf16_kernel_follows_vendor(monkeypatch):
    """Unforced, bf16 inputs run on AMX tiles where usable, else as bf16 pairs only on AMD CPUs with
    AVX512-BF16 (faster there, slower on Intel); naming the avx512bf16 level forces the pairs; fp16 or
    weighted inputs never take them."""
    monkeypatch.delenv(_native.ISA_ENV, raising=False)
    feats = _native.cpu_features()
    pairs = feats.get("vendor") == "amd" and bool(feats.get("avx512bf16"))
    assert feats["auto_bf16_pairs"] == pairs
    assert feats.get("amx", False) == ("amx" in ISAS)
    name = _native.kernel_name(torch.bfloat16, torch.bfloat16)
    if "amx" in ISAS:  # AMX tiles run bf16 inputs wherever the OS grants them
        assert name.startswith("amx/")
    else:
        assert ("dpbf16" in name) == pairs
        assert name.startswith(ISAS[-1] if pairs or ISAS[-1] != "avx512bf16" else "avx512/")
    assert "dpbf16" not in _native.kernel_name(torch.bfloat16, torch.bfloat16, weighted=True)
    if "avx512bf16" in ISAS:
        monkeypatch.setenv(_native.ISA_ENV, "avx512bf16")
        assert "dpbf16" in _native.kernel_name(torch.bfloat16, torch.bfloat16)


def test_isa_env_var_errors(monkeypatch):
    monkeypatch.setenv(_native.ISA_ENV, "sse9")
    with pytest.raises(ValueError, match="LORAINIT_NATIVE_ISA"):
        _native.kfac_update(torch.randn(3, 4), None, None, True)
    monkeypatch.setenv(_native.ISA_ENV, "auto")
    assert _native.requested_isa() == -1
    assert _C.cpu_features()["best_isa"] == ISAS[-1]


def _call(**over):
    x = torch.randn(5, 4)
    g = torch.randn(5, 3)
    Z, G, s = torch.empty(4, 4), torch.empty(3, 4), torch.empty(3)
    args = dict(x_ptr=x.data_ptr(), x_row_stride=4, x_dtype=0, T=5, n=4, g_ptr=g.data_ptr(), g_row_stride=3,
                g_dtype=0, m=3, mask_ptr=0, with_input_cov=True, z_ptr=Z.data_ptr(), gs_ptr=G.data_ptr(),
                ss_ptr=s.data_ptr(), isa=-1, num_threads=1)
    args.update(over)
    return _C.kfac_update(**args), (x, g, Z, G, s)


@pytest.mark.parametrize("over,match", [
    (dict(x_ptr=0), "x of shape .* null data pointer"),
    (dict(T=-1), "negative shape"),
    (dict(x_dtype=7), "x_dtype must be"),
    (dict(g_dtype=-1), "g_dtype=-1 means no g"),
    (dict(x_row_stride=-4), "row stride"),
    (dict(z_ptr=0), "output Zs"),
    (dict(gs_ptr=0), "output Gs"),
    (dict(isa=9), "isa must be"),
    (dict(num_threads=-2), "num_threads"),
])
def test_C_argument_checks_raise(over, match):
    with pytest.raises(ValueError, match=match):
        _call(**over)


def test_C_misaligned_pointer_raises():
    x = torch.randn(5, 4)
    with pytest.raises(ValueError, match="not aligned"):
        _call(x_ptr=x.data_ptr() + 1)
    name, (x, g, Z, G, s) = _call()  # the same call with valid arguments runs
    assert rel_err(G, reference.kfac_update(x, g, None, True, dtype=torch.float64)[1]) < 1e-6


def test_gil_released_during_kernel():
    """Another Python thread must run while the C++ kernel computes."""
    T, d = 6000, 768  # ~10 GFLOP on one thread: a window of ~0.1 s even on a fast core
    x = torch.randn(T, d).bfloat16()
    g = torch.randn(T, d).bfloat16()
    Z, G, s = torch.empty(d, d), torch.empty(d, d), torch.empty(d)
    window = {}

    def work():
        window["start"] = time.perf_counter()
        _C.kfac_update(x.data_ptr(), d, 1, T, d, g.data_ptr(), d, 1, d, 0, True, Z.data_ptr(),
                       G.data_ptr(), s.data_ptr(), -1, 1)
        window["end"] = time.perf_counter()

    ticks = []
    th = threading.Thread(target=work)
    th.start()
    while th.is_alive():
        ticks.append(time.perf_counter())
    th.join()
    inside = [t for t in ticks if window["start"] < t < window["end"]]
    assert window["end"] - window["start"] > 0.005
    assert len(inside) > 10, "the main thread never ran while the kernel was computing"


def test_concurrent_calls_from_python_threads():
    """The GIL is released, so calls overlap: each must still get its own exact result."""
    cases = [make_case("multi_block_threads", dt) for dt in (torch.bfloat16, torch.float32, torch.float16, torch.bfloat16)]
    results = [None] * len(cases)

    def work(i):
        x, g, mask = cases[i]
        results[i] = [_native.kfac_update(x, g, mask, True) for _ in range(3)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(cases))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for (x, g, mask), outs in zip(cases, results):
        refs = reference.kfac_update(x, g, mask, True, dtype=torch.float64)
        for out in outs:
            for o, r, first in zip(out, refs, outs[0]):
                assert torch.equal(o, first) and rel_err(o, r) < 1e-6


def test_opcheck_native():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(23, 13, generator=gen).bfloat16()
    g = torch.randn(23, 9, generator=gen).bfloat16()
    mask = torch.rand(23, generator=gen) > 0.3
    with backends.use("native"):
        torch.library.opcheck(torch.ops.lorainit.kfac_update, (x, g, mask, True))
    with backends.use("native"):
        torch.library.opcheck(torch.ops.lorainit.kfac_update, (x.float(), None, None, False))
    v = torch.randn(31, 11, generator=gen)
    with backends.use("native"):
        torch.library.opcheck(torch.ops.lorainit.weighted_gram, (v, -torch.rand(31, generator=gen)))
    with backends.use("native"):
        torch.library.opcheck(torch.ops.lorainit.weighted_gram, (v.half(), None))


def test_auto_falls_back_with_one_warning_when_C_missing(monkeypatch):
    with monkeypatch.context() as mp:
        mp.setitem(sys.modules, "lorainit_kernels._C", None)  # `import` now raises ImportError
        mp.delattr(lorainit_kernels, "_C")
        backends._load_native.cache_clear()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                x = torch.randn(6, 5)
                Zs, _, _, count = lorainit_kernels.kfac_update(x)
                lorainit_kernels.kfac_update(x)
                assert not backends.has_native()
            msgs = [str(w.message) for w in caught if "lorainit_kernels._C" in str(w.message)]
            assert len(msgs) == 1 and "plain-torch" in msgs[0], msgs
            assert count == 6 and rel_err(Zs, x.double().T @ x.double()) < 1e-6
            with pytest.raises(ValueError, match="backend='native' cannot run here.*not built"), \
                    backends.use("native"):
                lorainit_kernels.kfac_update(x)
        finally:
            backends._load_native.cache_clear()
    assert backends.has_native()


def test_package_imports_without_native_build(tmp_path):
    """A LORAINIT_SKIP_NATIVE install has no _C*.so: the package imports and 'auto' runs on torch."""
    pkg = tmp_path / "lorainit_kernels"
    shutil.copytree(REPO / "lorainit_kernels", pkg, ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    script = textwrap.dedent("""
        import sys, warnings, torch
        # The editable install's finder would resolve lorainit_kernels._C in the source tree: drop it.
        sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as caught:
            import lorainit_kernels as lk
            x = torch.randn(7, 3)
            out = lk.kfac_update(x)
            lk.KFACStats(3).update(x)
        assert not lk.has_native()
        assert torch.allclose(out[0], x.T @ x, rtol=1e-5, atol=1e-5)
        print(sum("lorainit_kernels._C" in str(w.message) for w in caught))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "1"


def test_auto_passes_over_native_kfac_without_simd(monkeypatch):
    """Where the native kfac_update is slower than torch (the portable level only), "auto" runs torch,
    says why (auto_reasons, one warning) and a forced backends.use("native") still runs native."""
    from lorainit_kernels import ops
    from lorainit_kernels.backends import native as native_backend

    x = torch.randn(5, 3, dtype=torch.bfloat16)
    monkeypatch.setattr(backends, "_WARNED_SLOWER", set())
    native_backend._kfac_slower_here.cache_clear()
    if "avx2" in ISAS:  # the SIMD kernels beat torch: auto keeps native
        assert ops.backend_for("kfac_update", x) == "native"
        assert backends.auto_reasons("kfac_update", x, full=False)["native"] is None
    monkeypatch.setattr(_native, "isa_levels", lambda: ["portable"])
    native_backend._kfac_slower_here.cache_clear()
    try:
        with pytest.warns(UserWarning, match="passes over the native kernel.*no AVX2") as rec:
            assert ops.backend_for("kfac_update", x) == "torch"
            assert ops.backend_for("kfac_update", x) == "torch"
        assert len([w for w in rec if "passes over" in str(w.message)]) == 1
        assert "no AVX2" in backends.auto_reasons("kfac_update", x, full=False)["native"]
        assert ops.backend_for("kfac_update", x, backend="native") == "native"
        with backends.use("native"):
            assert ops.backend_for("kfac_update", x) == "native"
        assert ops.backend_for("rr_grams", torch.randn(2, 4, 3)) == "native"  # other ops unaffected
    finally:
        monkeypatch.undo()
        native_backend._kfac_slower_here.cache_clear()


def test_peak_gflops_probe():
    """The register-only probe of the instruction each level multiplies with: positive and finite on
    every SIMD level this CPU runs, nan for portable, and a level's two-thread peak at least its
    one-thread one (the probe measures the core, so a slow shared machine lowers it, never zero)."""
    levels = _native.isa_levels()
    assert math.isnan(_native.peak_gflops("portable", 1))
    for level in levels[1:]:
        one = _native.peak_gflops(level, 1)
        assert math.isfinite(one) and one > 1.0, (level, one)
        # the kernel's name works as well as the level's
        kernel = f"{level}/some kernel 8x8"
        assert _native.peak_gflops(kernel, 1) > 1.0
    for bad, match in [("sse9", "names no ISA level"), ("", "names no ISA level")]:
        with pytest.raises(ValueError, match=match):
            _native.peak_gflops(bad)
    with pytest.raises(ValueError, match="num_threads must be an int >= 1"):
        _native.peak_gflops(levels[-1], 0)
    with pytest.raises(ValueError, match="num_threads must be an int >= 1"):
        _native.peak_gflops(levels[-1], True)
    missing = [lv for lv in _native.ISA_LEVELS if lv not in levels]
    for level in missing:
        with pytest.raises(ValueError, match="cannot run"):
            _native.peak_gflops(level, 1)
    with pytest.raises(ValueError, match="isa must name a level"):
        _native._C().peak_gflops(99, 1)
