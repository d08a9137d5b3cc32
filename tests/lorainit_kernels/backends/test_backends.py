"""Backend choice: what runs where, and what a forced backend that cannot run says."""
import subprocess
import sys
import textwrap

import pytest
import torch

import lorainit_kernels as lk
from lorainit_kernels import backends


def test_auto_on_cpu_prefers_native_when_built():
    expected = "native" if lk.has_native() else "torch"
    x = torch.randn(3, 4)
    assert backends.select("kfac_update", "auto", x) == expected
    assert backends.select("kfac_update", None, x) == expected


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match=r"backend='cuda-magic'"):
        with backends.use("cuda-magic"):
            lk.kfac_update(torch.randn(3, 4))


def test_forced_backend_lists_every_backend_and_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError) as err:
        backends.select("kfac_update", "triton", torch.randn(3, 4))
    msg = str(err.value)
    assert "kfac_update" in msg and "TRITON_INTERPRET=1" in msg
    for name in backends.BACKENDS:
        assert f"{name}:" in msg


def test_native_declines_non_cpu_devices():
    reason = backends.device_reason("native", torch.device("meta"))
    assert reason is not None and "CPU" in reason
    reasons = backends.not_supported_reasons("kfac_update", torch.randn(3, 4, device="meta"))
    assert "CPU" in reasons["native"] and reasons["torch"] is None


def test_package_imports_and_computes_without_the_extension():
    # Simulates a build with LORAINIT_SKIP_NATIVE=1: importing _C fails, the torch path runs and a
    # single warning says why.
    code = textwrap.dedent("""
        import sys, warnings
        sys.modules["lorainit_kernels._C"] = None
        import torch
        import lorainit_kernels as lk
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            st = lk.KFACStats(5, 3)
            x, g = torch.randn(2, 7, 5), torch.randn(2, 7, 3)
            st.update(x, g)
            st.update(x, g)
        assert not lk.has_native()
        msgs = [str(w.message) for w in caught if "_C" in str(w.message)]
        assert len(msgs) == 1 and "plain-torch" in msgs[0], msgs
        ref = torch.einsum("bti,btj->ij", x.double(), x.double()) / 14
        assert torch.allclose(st.input_cov().double(), ref, rtol=1e-5, atol=1e-6)
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")
