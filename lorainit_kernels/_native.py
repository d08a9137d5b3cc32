"""Python side of the C++ extension ``lorainit_kernels._C``: the kernels of the ``"native"`` backend.

Torch allocates every tensor here; ``_C`` receives raw addresses, sizes, row strides and dtype
codes (it links neither libtorch nor a BLAS), compacts the valid tokens, packs each block of them
once and accumulates all outputs in fp32 with the GIL released (csrc/gram_driver.inc).

The vector path is chosen at run time from the CPU's features: ``portable`` < ``avx2`` <
``avx512`` < ``avx512bf16`` (bf16 inputs then use ``vdpbf16ps``) < ``amx`` (bf16 inputs then use
AMX tiles, ``tdpbf16ps``; Linux grants the tile state on first use). ``LORAINIT_NATIVE_ISA`` set to
one of these names forces that level (it must be one this CPU runs, see ``isa_levels()``); unset,
empty or ``auto`` picks the best level, and on ``avx512bf16`` the faster kernel for bf16 inputs: bf16
pairs (``vdpbf16ps``) on AMD, where they double the product rate, fp32 FMA on Intel, where
``vdpbf16ps`` multiplies no faster and measured slower (``cpu_features()["auto_bf16_pairs"]``;
docs/kernels.md).
OpenMP threads follow ``torch.get_num_threads()``.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from .backends import native_module

ISA_ENV = "LORAINIT_NATIVE_ISA"
ISA_LEVELS = ("portable", "avx2", "avx512", "avx512bf16", "amx")
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _C():
    mod = native_module()
    if mod is None:
        raise RuntimeError("lorainit_kernels._C is not built; use backend='torch' or rebuild with `pip install -e .`")
    return mod


def isa_levels() -> list:
    """The ISA levels this CPU runs, lowest first (e.g. ``['portable', 'avx2', 'avx512', 'avx512bf16', 'amx']``)."""
    return list(_C().isa_levels())


def cpu_features() -> dict:
    """The CPU features the dispatcher reads, OpenMP availability and the best level."""
    return dict(_C().cpu_features())


def requested_isa() -> int:
    """The level forced by ``LORAINIT_NATIVE_ISA`` as an index into ``ISA_LEVELS``, or -1 for the best."""
    raw = os.environ.get(ISA_ENV, "").strip().lower()
    if raw in ("", "auto"):
        return -1
    if raw not in ISA_LEVELS:
        raise ValueError(f"{ISA_ENV}={raw!r} is not one of {ISA_LEVELS} or 'auto'")
    if raw not in isa_levels():
        raise ValueError(f"{ISA_ENV}={raw!r} but this CPU runs only {isa_levels()}")
    return ISA_LEVELS.index(raw)


def kernel_name(x_dtype: torch.dtype, g_dtype: Optional[torch.dtype] = None, weighted: bool = False) -> str:
    """The micro-kernel a call with these input dtypes runs under the current ``LORAINIT_NATIVE_ISA``."""
    g_code = -1 if g_dtype is None else _dtype_code("kernel_name", "g", g_dtype)
    return _C().kernel_name(_dtype_code("kernel_name", "x", x_dtype), g_code, weighted, requested_isa())


def peak_gflops(kernel: str, num_threads: Optional[int] = None) -> float:
    """The peak GFLOP/s of the instruction a Gram kernel multiplies with, measured on this machine.

    ``kernel``: a name :func:`kernel_name` returns (its level is the text before ``/``: ``avx2`` and
    ``avx512`` fp32 FMA, ``avx512bf16`` vdpbf16ps, ``amx`` tdpbf16ps) or a level name. A register-only
    loop on ``num_threads`` threads at once (default: torch's), the best of three timed runs; ``nan``
    for the portable level. A kernel's GFLOP/s over this is its fraction of the core's peak.
    """
    level = kernel.split("/")[0].strip().lower()
    if level not in ISA_LEVELS:
        raise ValueError(f"peak_gflops: kernel {kernel!r} names no ISA level (one of {ISA_LEVELS})")
    if level not in isa_levels():
        raise ValueError(f"peak_gflops: this CPU cannot run the {level} level (it runs {isa_levels()})")
    threads = torch.get_num_threads() if num_threads is None else num_threads
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"peak_gflops: num_threads must be an int >= 1, got {num_threads!r}")
    return float(_C().peak_gflops(ISA_LEVELS.index(level), threads))


def _dtype_code(op: str, name: str, dtype: torch.dtype) -> int:
    try:
        return _DTYPE_CODES[dtype]
    except KeyError:
        raise TypeError(f"{op}: native backend takes {name} in bf16, fp16 or fp32, got {dtype}") from None


def _check_rows(op: str, name: str, t: Tensor) -> int:
    """Check a (T, d) CPU input with unit column stride; returns its dtype code."""
    if t.device.type != "cpu":
        raise ValueError(f"{op}: native backend runs on CPU tensors, {name} is on {t.device}")
    if t.dim() != 2:
        raise ValueError(f"{op}: {name} must be 2-D (T, features), got shape {tuple(t.shape)}")
    if t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"{op}: {name} must have a contiguous last dimension, got strides {t.stride()} "
                         f"for shape {tuple(t.shape)}")
    return _dtype_code(op, name, t.dtype)


def kfac_update(
    x: Tensor, g: Optional[Tensor], mask: Optional[Tensor], with_input_cov: bool,
    out: Optional[Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """``(sum x x^T, sum g x^T, sum g*g)`` over the valid tokens, fp32; see ``reference.kfac_update``.

    ``x`` (T, n), ``g`` (T, m) or None, ``mask`` (T,) bool or None. Zs is computed on one
    triangle and mirrored; empty (0, 0) when ``with_input_cov`` is False. Gs, ss are empty
    (0, n), (0,) when ``g`` is None.

    ``out = (Z, G, s)``: contiguous fp32 CPU accumulators (``Z`` symmetric; None where not
    tracked) to which the sums are **added** in place, without a temporary; returned as given.
    """
    op = "native kfac_update"
    x_code = _check_rows(op, "x", x)
    T, n = x.shape
    if g is not None:
        g_code = _check_rows(op, "g", g)
        if g.shape[0] != T:
            raise ValueError(f"{op}: g has {g.shape[0]} rows (shape {tuple(g.shape)}), x has {T} (shape {tuple(x.shape)})")
        m = g.shape[1]
    else:
        g_code, m = -1, 0
    if mask is not None:
        if mask.dtype != torch.bool or tuple(mask.shape) != (T,) or mask.device.type != "cpu":
            raise ValueError(f"{op}: mask must be a CPU bool tensor of shape ({T},), got {mask.dtype} "
                             f"{tuple(mask.shape)} on {mask.device}")
        mask = mask.contiguous()
    if out is None:
        Zs = torch.empty((n, n) if with_input_cov else (0, 0), dtype=torch.float32, device="cpu")
        Gs = torch.empty((m, n), dtype=torch.float32, device="cpu")
        ss = torch.empty((m,), dtype=torch.float32, device="cpu")
    else:
        Zs, Gs, ss = out
        Zs = _accumulator(op, "Z", Zs, (n, n)) if with_input_cov else torch.empty((0, 0))
        Gs = _accumulator(op, "G", Gs, (m, n)) if g is not None else torch.empty((0, n))
        ss = _accumulator(op, "s", ss, (m,)) if g is not None else torch.empty((0,))
    _C().kfac_update(
        x.data_ptr(), x.stride(0), x_code, T, n,
        0 if g is None else g.data_ptr(), 0 if g is None else g.stride(0), g_code, m,
        0 if mask is None else mask.data_ptr(), with_input_cov,
        Zs.data_ptr(), Gs.data_ptr(), ss.data_ptr(), requested_isa(), torch.get_num_threads(), out is not None,
    )
    return Zs, Gs, ss


def _accumulator(op: str, name: str, t: Optional[Tensor], shape) -> Tensor:
    """An output the kernel adds to: a contiguous fp32 CPU tensor of ``shape``."""
    if t is None or t.dtype != torch.float32 or t.device.type != "cpu" or tuple(t.shape) != tuple(shape) \
            or not t.is_contiguous():
        got = "None" if t is None else f"{t.dtype} {tuple(t.shape)} on {t.device}, contiguous={t.is_contiguous()}"
        raise ValueError(f"{op}: accumulator {name} must be a contiguous fp32 CPU tensor of shape {tuple(shape)}, "
                         f"got {got}")
    return t


def weighted_gram(v: Tensor, weights: Optional[Tensor], out: Optional[Tensor] = None) -> Tensor:
    """``sum_t w_t v_t v_t^T`` (d, d), fp32, symmetric; ``weights`` (T,) fp32 (any sign) or None (ones).

    ``out``: a contiguous symmetric fp32 CPU (d, d) tensor the sum is **added** to, in place."""
    op = "native weighted_gram"
    v_code = _check_rows(op, "v", v)
    T, d = v.shape
    if weights is not None:
        if tuple(weights.shape) != (T,) or weights.device.type != "cpu":
            raise ValueError(f"{op}: weights must be a CPU tensor of shape ({T},), got {tuple(weights.shape)} "
                             f"on {weights.device}")
        weights = weights.to(torch.float32).contiguous()
    accumulate = out is not None
    out = _accumulator(op, "out", out, (d, d)) if accumulate else torch.empty((d, d), dtype=torch.float32, device="cpu")
    _C().weighted_gram(
        v.data_ptr(), v.stride(0), v_code, T, d, 0 if weights is None else weights.data_ptr(),
        out.data_ptr(), requested_isa(), torch.get_num_threads(), accumulate,
    )
    return out


def sym_matmul(A: Tensor, W: Tensor) -> Tensor:
    """``A @ W`` for symmetric fp32 ``A`` (b, n, n) and ``W`` (b, n, p), reading A's upper triangle only.

    ``A`` needs a unit column stride (any row and batch strides, e.g. a slice of a larger batch);
    ``W`` is copied into a zero-padded (b, n, pw) block, pw = 8 for p <= 8 (LOBPCG's blocks at rank <= 8,
    run at their own width) and 16 * ceil(p / 16) above, when p is not already that width.
    """
    op = "native sym_matmul"
    if A.device.type != "cpu" or W.device.type != "cpu":
        raise ValueError(f"{op}: runs on CPU tensors, got A on {A.device} and W on {W.device}")
    if A.dtype != torch.float32 or W.dtype != torch.float32:
        raise TypeError(f"{op}: takes float32 A and W, got {A.dtype} and {W.dtype}")
    if A.dim() != 3 or A.shape[-1] != A.shape[-2] or W.dim() != 3 or W.shape[:2] != A.shape[:2]:
        raise ValueError(f"{op}: A must be (b, n, n) and W (b, n, p), got {tuple(A.shape)} and {tuple(W.shape)}")
    b, n, p = W.shape
    if n > 1 and (A.stride(-1) != 1 or A.stride(-2) < n):
        A = A.contiguous()
    pw = 8 if p <= 8 else -(-p // 16) * 16
    if pw != p or not W.is_contiguous():
        Wp = W.new_zeros((b, n, pw))
        Wp[:, :, :p] = W
    else:
        Wp = W
    Y = torch.empty((b, n, pw), dtype=torch.float32, device="cpu")
    if b and n and p:
        _C().sym_matmul(A.data_ptr(), b, n, A.stride(-2) if n > 1 else 1, A.stride(0) if b > 1 else 0, Wp.data_ptr(),
                        pw, Y.data_ptr(), requested_isa(), torch.get_num_threads())
    else:
        Y.zero_()
    return Y if pw == p else Y[:, :, :p]


def rr_grams(S_parts, AS_parts) -> Tuple[Tensor, Tensor]:
    """``(S^T S, S^T AS)`` in float64 for fp32 blocks given as column parts (LOBPCG's Rayleigh-Ritz).

    ``S_parts``, ``AS_parts``: 1 to 4 fp32 CPU tensors (b, n, c_k) each with unit column stride;
    ``S = cat(S_parts, -1)``, ``AS = cat(AS_parts, -1)`` (both (b, n, q)) are never formed. Returns
    ``B`` and ``H`` (b, q, q) fp64, symmetric (upper triangles mirrored).
    """
    op = "native rr_grams"

    alive = []  # contiguous copies made here must outlive the call

    def parts(ts, name):
        out = []
        for t in ts:
            if t.device.type != "cpu" or t.dtype != torch.float32 or t.dim() != 3:
                raise ValueError(f"{op}: {name} parts must be fp32 CPU tensors (b, n, c), got {t.dtype} "
                                 f"{tuple(t.shape)} on {t.device}")
            if t.shape[-1] > 1 and t.stride(-1) != 1 or (t.shape[-2] > 1 and t.stride(-2) < t.shape[-1]):
                t = t.contiguous()
            alive.append(t)
            out.append((t.data_ptr(), t.shape[-1], t.stride(-2) if t.shape[-2] > 1 else t.shape[-1],
                        t.stride(0) if t.shape[0] > 1 else 0))
        return out

    if not S_parts or not AS_parts:
        raise ValueError(f"{op}: S_parts and AS_parts need 1 to 4 tensors each, got {len(S_parts)} and {len(AS_parts)}")
    for t in list(S_parts) + list(AS_parts):
        if not isinstance(t, Tensor) or t.dim() != 3:
            raise ValueError(f"{op}: parts must be (b, n, c) tensors, got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    b, n = S_parts[0].shape[:2]
    q = sum(t.shape[-1] for t in S_parts)
    for t in list(S_parts) + list(AS_parts):
        if tuple(t.shape[:2]) != (b, n):
            raise ValueError(f"{op}: every part must be ({b}, {n}, c), got {tuple(t.shape)}")
    B = torch.empty((b, q, q), dtype=torch.float64, device="cpu")
    H = torch.empty((b, q, q), dtype=torch.float64, device="cpu")
    s_parts, a_parts = parts(S_parts, "S"), parts(AS_parts, "AS")
    _C().rr_grams(s_parts, a_parts, b, n, q, B.data_ptr(), H.data_ptr(), requested_isa(), torch.get_num_threads())
    return B, H
