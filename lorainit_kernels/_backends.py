"""Which compute backends exist on this machine, and why one cannot run a given call.

Backends: ``"native"`` (the C++ extension ``lorainit_kernels._C``, CPU), ``"triton"`` (GPU, or CPU
under ``TRITON_INTERPRET=1``) and ``"torch"`` (the plain-torch reference, everywhere).
"""
from __future__ import annotations

import importlib.util
import os
import warnings
from functools import lru_cache
from typing import Optional

import torch

BACKENDS = ("native", "triton", "torch")


@lru_cache(maxsize=None)
def has_triton() -> bool:
    """True when the ``triton`` package can be imported."""
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    """True when Triton kernels run through the interpreter (``TRITON_INTERPRET=1``), i.e. on CPU."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@lru_cache(maxsize=None)
def _load_native():
    try:
        from lorainit_kernels import _C  # noqa: F401  (built by setup.py/CMake)

        return _C, None
    except ImportError as err:
        reason = f"lorainit_kernels._C is not built ({err}); set up with `pip install -e .` without LORAINIT_SKIP_NATIVE"
        warnings.warn(f"lorainit_kernels: {reason}. Falling back to the plain-torch path on CPU.", stacklevel=3)
        return None, reason


def native_module():
    """The compiled extension module, or None (a one-time warning says why)."""
    return _load_native()[0]


def has_native() -> bool:
    return native_module() is not None


def unavailable_reason(backend: str, device: torch.device) -> Optional[str]:
    """Why ``backend`` cannot run on ``device``, or None when it can."""
    if backend == "torch":
        return None
    if backend == "native":
        if device.type != "cpu":
            return f"native backend runs on CPU tensors only, got device {device}"
        _, reason = _load_native()
        return reason
    if backend == "triton":
        if not has_triton():
            return "triton is not installed (pip install triton)"
        if device.type == "cpu" and not triton_interpreting():
            return "Triton kernels need a GPU; on CPU tensors set TRITON_INTERPRET=1 (interpreter, slow)"
        if device.type not in ("cpu", "cuda"):
            return f"Triton backend does not support device {device}"
        return None
    return f"unknown backend {backend!r}; choose one of {BACKENDS} or 'auto'"


def resolve_backend(backend: Optional[str], device: torch.device, op: str) -> str:
    """Pick the backend for one call: ``"auto"``/None prefers native on CPU, Triton on CUDA, else torch.

    A forced backend that cannot run raises a ValueError that lists every backend and why it declined.
    """
    if backend in (None, "auto"):
        preferred = ("native", "torch") if device.type == "cpu" else ("triton", "torch")
        for name in preferred:
            if unavailable_reason(name, device) is None:
                return name
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend={backend!r} is not one of {BACKENDS + ('auto',)}")
    reason = unavailable_reason(backend, device)
    if reason is not None:
        others = "; ".join(f"{b}: {unavailable_reason(b, device) or 'available'}" for b in BACKENDS)
        raise ValueError(f"{op}: backend={backend!r} cannot run here: {reason}. Backends on {device}: {others}")
    return backend
