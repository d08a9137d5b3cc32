"""bench/device_check.py: the plan without a GPU (exit 0 in seconds, nothing written), and every section
executed on the CPU at tiny shapes (``--cpu-smoke``: Triton kernels in the interpreter)."""
import json
import time

import pytest
import torch

from bench import device_check


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the script measures instead of printing its plan")
def test_without_gpu_prints_the_plan_and_exits_0(tmp_path, capsys):
    t0 = time.perf_counter()
    assert device_check.main(["--out", str(tmp_path)]) == 0
    assert time.perf_counter() - t0 < 10
    out = capsys.readouterr().out
    assert "device_check plan" in out and "No CUDA device" in out
    for part in ("a. correctness", "b. kfac_update", "c. LOBPCG", "d. initialize_lora"):
        assert part in out
    assert not list(tmp_path.iterdir())


def _smoke(tmp_path, monkeypatch, sections):
    import lorainit_kernels as lk

    if not lk.has_triton():
        pytest.skip("triton is not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    rc = device_check.main(["--cpu-smoke", "--sections", sections, "--out", str(tmp_path)])
    res = json.loads((tmp_path / "device_check.json").read_text())
    md = (tmp_path / "device_check.md").read_text()
    assert res["environment"]["smoke"] and "CPU smoke run" in md
    return rc, res, md


def test_cpu_smoke_kernels_kfac_and_lobpcg_sections(tmp_path, monkeypatch):
    rc, res, md = _smoke(tmp_path, monkeypatch, "a,b,c")
    assert rc == 0, res
    corr = res["sections"]["correctness"]
    assert corr["failed"] == 0 and corr["passed"] >= 60
    cases = {r["case"] for r in corr["rows"]}
    for name in ("triton.kfac_update Z", "triton.weighted_gram (negative weights)", "op kfac_update (Z, G, s)",
                 "op weighted_gram", "op sym_matmul", "op rr_grams", "lobpcg k smallest: objective",
                 "guidance_matrix Omega", "triton.kfac_update out= (accumulating)"):
        assert name in cases
    assert {r["dtype"] for r in corr["rows"]} >= {"float32", "bfloat16", "float16"}
    kfac = res["sections"]["kfac_update"]
    assert {r["provider"] for r in kfac["rows"]} == {"triton", "triton, in place (kfac_accumulate_)", "cublas_bf16",
                                                   "torch backend (fp32 GEMMs)"}
    lob = res["sections"]["lobpcg"]
    assert lob["swept_n"] == [48, 96] and "not importable" in lob["cupy"]
    assert all(r["reaches_1e-5"] == "yes" for r in lob["rows"])
    assert "## a. Correctness" in md and "## c. LOBPCG" in md and not res["skipped"]


def test_cpu_smoke_init_section(tmp_path, monkeypatch):
    rc, res, _ = _smoke(tmp_path, monkeypatch, "d")
    assert rc == 0, res
    rows = res["sections"]["init_overhead"]["rows"]
    assert len(rows) == 3 and all(r["init_s"] > 0 and r["fwd_bwd_s"] > 0 and r["targets"] == 14 for r in rows)
    assert "solve_batch=1" in rows[2]["run"]


def test_time_guard_skips_and_still_writes(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    device_check.main(["--cpu-smoke", "--sections", "b,c", "--budget-s", "3", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "device_check.json").read_text())
    assert res["skipped"] and all("time guard" in s or "alarm" in s for s in res["skipped"])


def test_peak_table_matches_device_names():
    assert device_check.peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.5
    assert device_check.peak_bf16_tflops("NVIDIA H100 PCIe") == 756.5
    assert device_check.peak_bf16_tflops("NVIDIA H200") == 989.5
    assert device_check.peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert device_check.peak_bf16_tflops("NVIDIA L4") == 121.0
    assert device_check.peak_bf16_tflops("NVIDIA L40") == 181.0 and device_check.peak_bf16_tflops("NVIDIA L40S") == 366.0
    assert device_check.peak_bf16_tflops("Some Future GPU") is None
    assert device_check._crossover({256: 0.5, 512: 1.2, 1024: 0.9, 2048: 3.0}) == 2048
    assert device_check._crossover({256: 1.5, 512: 2.0}) == 256 and device_check._crossover({256: 0.5}) is None


def test_cpu_smoke_cupy_column_with_numpy_and_scipy_standing_in(tmp_path, monkeypatch):
    """The cupy provider's code (DLPack both ways, one timed call, its result judged), run with numpy and
    scipy's lobpcg in cupy's place: the same calls, documented for both (``from_dlpack``, ``asarray``,
    ``lobpcg(A, X, largest=, tol=, maxiter=)``)."""
    import numpy as np
    import scipy.sparse.linalg as ssl

    monkeypatch.setattr(device_check, "_cupy", lambda device: (np, ssl, None))
    rc, res, _ = _smoke(tmp_path, monkeypatch, "c")
    rows = [r for r in res["sections"]["lobpcg"]["rows"] if r["provider"].startswith("cupyx")]
    assert rc == 0 and len(rows) == 2 and res["sections"]["lobpcg"]["cupy"] == "used"
    assert all(r["median_s"] > 0 and r["objective_rel_err"] < 1e-2 for r in rows), rows


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the script measures")
def test_gpu_present_but_torch_cannot_use_it_is_an_error(tmp_path, monkeypatch, capsys):
    """A GPU host running the CPU build of torch must not pass off 'nothing measured' as success."""
    monkeypatch.setattr(device_check, "_nvidia_device_present", lambda: True)
    assert device_check.main(["--out", str(tmp_path)]) == 2
    assert "cannot use it" in capsys.readouterr().out


def test_a_section_that_fails_midway_keeps_its_rows(tmp_path, monkeypatch):
    """Rows are registered as they are measured: a section that raises at its second size keeps the
    first size's rows, records the error, and the sections after it still run."""
    import bench.spectra as spectra

    real = spectra.fast_guidance

    def fail_at_96(batch, n, **kw):
        if n == 96:
            raise RuntimeError("synthetic failure at n=96")
        return real(batch, n, **kw)

    monkeypatch.setattr(spectra, "fast_guidance", fail_at_96)
    rc, res, md = _smoke(tmp_path, monkeypatch, "c,b")
    lob = res["sections"]["lobpcg"]
    assert rc == 1 and "synthetic failure at n=96" in lob["error"]
    assert lob["rows"] and {r["n"] for r in lob["rows"]} == {48}
    assert res["sections"]["kfac_update"]["rows"]          # b still ran
    assert "Section failed" in md


def test_time_guard_is_not_an_exception():
    """Library code that catches Exception (per-layer error wrappers) must not swallow the alarm."""
    assert issubclass(device_check.TimeGuard, BaseException) and not issubclass(device_check.TimeGuard, Exception)
