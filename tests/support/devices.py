"""The device fixture of the kernel and solver tests (Liger-Kernel's style); tests/lorainit_kernels/conftest.py loads it.

A test that takes ``device`` runs on the CPU always and on CUDA when one is present (``DEVICES``);
one that also takes ``dtype`` (parametrized by the test) gets ``atol`` and ``rtol`` for that dtype
(``TOLERANCES``), so ``def test_x(device, dtype, atol, rtol)`` with
``@pytest.mark.parametrize("dtype", [...])`` runs every ``(device, dtype, atol, rtol)``.

It lives in tests/support (on sys.path through pytest's ``pythonpath``) rather than in tests/conftest.py: a
conftest in tests/ would put tests/ on sys.path, where the directory tests/lorainit would then shadow the
installed ``lorainit`` package as a namespace package.
"""
from __future__ import annotations

import pytest
import torch

DEVICES = ("cpu",) + (("cuda",) if torch.cuda.is_available() else ())

# (atol, rtol) of a result computed from inputs in ``dtype`` (fp32 accumulation for half inputs) against
# the float64 computation on the same, already rounded, inputs: a few units of fp32 rounding over the
# reductions of these tests (T up to a few hundred), one unit of the dtype's rounding for a result
# returned in that dtype, fp64 to its own rounding
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 1e-2),
}


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames and not _parametrized(metafunc, "device"):
        metafunc.parametrize("device", DEVICES)


def _parametrized(metafunc, name: str) -> bool:
    return any(name in m.args[0].replace(" ", "").split(",") if isinstance(m.args[0], str) else name in m.args[0]
               for m in metafunc.definition.iter_markers("parametrize"))


@pytest.fixture
def atol(dtype) -> float:
    return TOLERANCES[dtype][0]


@pytest.fixture
def rtol(dtype) -> float:
    return TOLERANCES[dtype][1]
