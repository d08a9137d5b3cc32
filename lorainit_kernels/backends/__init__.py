"""The backends of the ops in ``lorainit_kernels.ops``: what exists here, what can run a call, and why not.

Backends, in the order the automatic choice tries them:

* ``"native"``: the C++ extension ``lorainit_kernels._C`` (CPU tensors), registered in ``backends.native``;
* ``"triton"``: the Triton kernels of ``lorainit_kernels.triton`` (CUDA tensors; CPU tensors under
  ``TRITON_INTERPRET=1`` when forced, the interpreter is never chosen by ``"auto"``), ``backends.triton``;
* ``"torch"``: the plain-torch reference (``lorainit_kernels.reference``), every device and float
  dtype, ``backends.default``.

A backend module registers one :class:`Kernel` per op it implements with :func:`implements`,
stating the dtypes it takes and any further condition on the inputs. :func:`not_supported_reasons`
gives, for one call, every backend's reason to decline (None when it can run); :func:`select`
turns a requested backend into the one that runs, or raises :class:`BackendNotSupported` listing
those reasons (xformers' ``not_supported_reasons``). A forced backend never falls back.

The ops' per-device kernels (``torch.library.register_kernel`` for ``"cpu"`` and ``"cuda"``, in
``lorainit_kernels.ops``) call :func:`dispatch`, which runs the backend :func:`select` picks. The one
switch that forces a backend, for benchmarks and tests, is :func:`use`::

    with lorainit_kernels.backends.use("torch"):
        Zs, Gs, ss, n = lorainit_kernels.kfac_update(x, g)
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Dict, FrozenSet, Iterator, Optional, Tuple

import torch
from torch import Tensor

BACKENDS = ("native", "triton", "torch")
AUTO = "auto"
HALF_OR_FP32 = (torch.float32, torch.bfloat16, torch.float16)

_LABELS = {"native": "native", "triton": "Triton", "torch": "torch"}


class BackendNotSupported(ValueError, TypeError):
    """A backend cannot run an op on the given inputs (the message lists every backend and why).

    A ValueError for the arguments' placement or the machine, and a TypeError where the reason is a dtype:
    it is both, so either ``except`` catches it.
    """


# ----------------------------------------------------------------------------------------------
# What this machine has
# ----------------------------------------------------------------------------------------------
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
        import lorainit_kernels._C as _C  # built by setup.py/CMake

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


def device_reason(backend: str, device: torch.device) -> Optional[str]:
    """Why ``backend`` cannot run on ``device`` on this machine (whatever the op), or None when it can."""
    if backend == "torch":
        return None
    if backend == "native":
        if device.type != "cpu":
            return f"native backend runs on CPU tensors only, got device {device}"
        return _load_native()[1]
    if backend == "triton":
        if not has_triton():
            return "triton is not installed (pip install triton)"
        if device.type == "cpu" and not triton_interpreting():
            return "Triton kernels need a GPU; on CPU tensors set TRITON_INTERPRET=1 (interpreter, slow)"
        if device.type not in ("cpu", "cuda"):
            return f"Triton backend does not support device {device}"
        return None
    return f"unknown backend {backend!r}; choose one of {BACKENDS} or {AUTO!r}"


def _auto_reason(backend: str, device: torch.device) -> Optional[str]:
    """Why ``"auto"`` skips a backend that could run (the Triton interpreter is only used when forced)."""
    if backend == "triton" and device.type == "cpu":
        return "the Triton interpreter on CPU tensors runs only when forced (backends.use('triton'))"
    return None


# ----------------------------------------------------------------------------------------------
# The registry
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Kernel:
    """One backend's implementation of one op.

    ``fn`` takes the op's arguments (without the backend name). ``dtypes``: the dtypes every floating
    tensor argument may have (None: any). ``check(*args)``: a further reason to decline, or None.
    ``symbol``: the ``_C`` attribute the native implementation calls (an extension built from older
    sources may lack it). ``slower(*tensors)``: why ``"auto"`` should not choose this kernel although it
    can run (it is slower than the next backend on this machine), or None; a forced backend ignores it.
    """

    op: str
    backend: str
    fn: Callable
    dtypes: Optional[FrozenSet[torch.dtype]] = None
    check: Optional[Callable[..., Optional[str]]] = None
    symbol: Optional[str] = None
    slower: Optional[Callable[..., Optional[str]]] = None


_KERNELS: Dict[Tuple[str, str], Kernel] = {}


def implements(op: str, backend: str, *, dtypes=None, check=None, symbol: Optional[str] = None, slower=None):
    """Decorator: register ``fn`` as ``backend``'s implementation of ``op`` (see :class:`Kernel`)."""
    if backend not in BACKENDS:
        raise ValueError(f"implements: backend {backend!r} is not one of {BACKENDS}")

    def deco(fn: Callable) -> Callable:
        key = (op, backend)
        if key in _KERNELS:
            raise ValueError(f"implements: {backend!r} already implements {op!r}")
        _KERNELS[key] = Kernel(op, backend, fn, None if dtypes is None else frozenset(dtypes), check, symbol,
                               slower)
        return fn

    return deco


def kernels(op: str) -> Dict[str, Kernel]:
    """``{backend: Kernel}`` of the implementations registered for ``op``, in ``BACKENDS`` order."""
    return {b: _KERNELS[(op, b)] for b in BACKENDS if (op, b) in _KERNELS}


def _tensors(args, out: Optional[list] = None) -> list:
    """The tensors among ``args``, looking into lists and tuples."""
    out = [] if out is None else out
    for a in args:
        if isinstance(a, Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            _tensors(a, out)
    return out


def _dtype_list(dtypes) -> str:
    names = [str(d).replace("torch.", "") for d in sorted(dtypes, key=lambda d: (-d.itemsize, str(d)))]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def _kernel_reason(op: str, backend: str, tensors: list, args: tuple, full: bool) -> Optional[str]:
    """Why ``backend`` cannot run ``op`` on ``args`` (whose tensors are ``tensors``), or None.

    ``full``: ``args`` are the op's complete arguments (so the kernel's own ``check`` applies).
    """
    kernel = _KERNELS.get((op, backend))
    if kernel is None:
        if backend not in _LABELS:
            return device_reason(backend, tensors[0].device)
        return f"there is no {_LABELS[backend]} kernel for {op}"
    reason = device_reason(backend, tensors[0].device)
    if reason is not None:
        return reason
    if kernel.symbol is not None and not hasattr(native_module(), kernel.symbol):
        return (f"lorainit_kernels._C has no {kernel.symbol} (built from older sources); "
                f"rebuild with `pip install -e .`")
    if kernel.dtypes is not None:
        for t in tensors:
            if t.dtype not in kernel.dtypes and t.is_floating_point():
                return f"the {backend} kernel takes {_dtype_list(kernel.dtypes)}, got {t.dtype}"
    if full and kernel.check is not None:
        return kernel.check(*args)
    return None


def _tensors_of(op: str, args: tuple) -> list:
    tensors = _tensors(args)
    if not tensors:
        raise ValueError(f"{op}: no tensor among the arguments")
    return tensors


def not_supported_reasons(op: str, *args, full: bool = True) -> Dict[str, Optional[str]]:
    """``{backend: why it cannot run op(*args), or None}`` for every backend, in ``BACKENDS`` order."""
    tensors = _tensors_of(op, args)
    return {b: _kernel_reason(op, b, tensors, args, full) for b in BACKENDS}


_WARNED_SLOWER = set()


def _slower_reason(op: str, backend: str, tensors: list) -> Optional[str]:
    """Why ``"auto"`` passes over ``backend``, which can run ``op``, for a faster one (warned once per op)."""
    kernel = _KERNELS.get((op, backend))
    reason = None if kernel is None or kernel.slower is None else kernel.slower(*tensors)
    if reason is not None and (op, backend) not in _WARNED_SLOWER:
        _WARNED_SLOWER.add((op, backend))
        warnings.warn(f"{op}: the automatic choice passes over the {_LABELS[backend]} kernel: {reason}", stacklevel=4)
    return reason


def auto_reasons(op: str, *args, full: bool = True) -> Dict[str, Optional[str]]:
    """``{backend: why backend="auto" does not choose it, or None}``: :func:`not_supported_reasons` plus the
    backends ``"auto"`` skips although they can run (the Triton interpreter; a kernel slower here)."""
    tensors = _tensors_of(op, args)
    device = tensors[0].device
    return {b: _kernel_reason(op, b, tensors, args, full) or _auto_reason(b, device)
            or (_KERNELS[(op, b)].slower(*tensors) if (op, b) in _KERNELS and _KERNELS[(op, b)].slower else None)
            for b in BACKENDS}


def _refuse(op: str, backend: str, reason: str, tensors: list, args: tuple, full: bool) -> BackendNotSupported:
    others = "; ".join(f"{b}: {r or 'available'}" for b, r in not_supported_reasons(op, *args, full=full).items())
    dtypes = ", ".join(sorted({str(t.dtype) for t in tensors}))
    return BackendNotSupported(f"{op}: backend={backend!r} cannot run here: {reason}. "
                               f"Backends for {op} on {tensors[0].device} with {dtypes}: {others}")


def select(op: str, backend: Optional[str], *args, full: bool = True) -> str:
    """The backend that runs ``op(*args)``: the first of ``BACKENDS`` that can for ``"auto"``, else ``backend``.

    ``backend=None``: the one :func:`use` forces, ``"auto"`` outside it. A forced backend that cannot
    run raises :class:`BackendNotSupported` naming every backend and its reason. ``full=False``:
    ``args`` are only representative tensors (device and dtype), as in
    :func:`lorainit_kernels.ops.backend_for`.
    """
    tensors = _tensors_of(op, args)
    if backend is None:
        backend = forced()
    if backend is None or backend == AUTO:
        device = tensors[0].device
        reasons = {}
        for name in BACKENDS:
            reason = _kernel_reason(op, name, tensors, args, full) or _auto_reason(name, device) \
                or _slower_reason(op, name, tensors)
            if reason is None:
                return name
            reasons[name] = reason
        listed = "; ".join(f"{b}: {r}" for b, r in reasons.items())
        raise BackendNotSupported(f"{op}: no backend can run these inputs on {device}: {listed}")
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend={backend!r} is not one of {BACKENDS + (AUTO,)}")
    reason = _kernel_reason(op, backend, tensors, args, full)
    if reason is not None:
        raise _refuse(op, backend, reason, tensors, args, full)
    return backend


def dispatch(op: str, *args):
    """Run ``op(*args)`` (the op's arguments, checked by ``lorainit_kernels.ops``) on the backend :func:`select`
    picks under the current :func:`use`: the body of the ops' ``"cpu"`` and ``"cuda"`` kernels."""
    return _KERNELS[(op, select(op, None, *args))].fn(*args)


def kernel(op: str, backend: str, *args) -> Callable:
    """The implementation ``backend`` registered for ``op``, after checking it can run ``op(*args)``."""
    tensors = _tensors_of(op, args)
    reason = _kernel_reason(op, backend, tensors, args, True)
    if reason is not None:
        raise _refuse(op, backend, reason, tensors, args, True)
    return _KERNELS[(op, backend)].fn


# ----------------------------------------------------------------------------------------------
# The switch
# ----------------------------------------------------------------------------------------------
_FORCED: contextvars.ContextVar = contextvars.ContextVar("lorainit_kernels_backend", default=None)


def forced() -> Optional[str]:
    """The backend :func:`use` forces in this context (thread, task), or None (automatic choice)."""
    return _FORCED.get()


@contextlib.contextmanager
def use(backend: Optional[str]) -> Iterator[None]:
    """Force every op called inside the block onto ``backend`` (``"native"``, ``"triton"`` or ``"torch"``).

    ``"auto"`` or None restore the automatic choice (first of native, triton, torch that can run
    the inputs and is not slower here; :func:`auto_reasons`). A forced backend that cannot run a
    call raises :class:`BackendNotSupported` (every backend and why it declined); it never falls
    back. Blocks nest; the setting is a context variable, so threads and asyncio tasks do not see
    each other's. Also a decorator (``@backends.use("torch")``).
    """
    if backend is not None and backend != AUTO and backend not in BACKENDS:
        raise ValueError(f"backends.use: backend={backend!r} is not one of {BACKENDS + (AUTO,)}")
    token = _FORCED.set(None if backend == AUTO else backend)
    try:
        yield
    finally:
        _FORCED.reset(token)


def use_configured(backend: Optional[str]):
    """:func:`use` for a backend named in a configuration (``KFACStats(backend=)``, a method's config): ``"auto"``
    and None leave the current choice (an enclosing :func:`use` block, else automatic) as it is."""
    if backend is None or backend == AUTO:
        return contextlib.nullcontext()
    return use(backend)
