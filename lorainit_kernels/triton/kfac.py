"""Triton backend of ``kfac_update`` and ``weighted_gram``: one weighted outer-product kernel.

Every statistic of docs/math.md is the same tiled product with the token axis as the
reduction (K) dimension::

    out[i, j] = sum_t w[t] * a[t, i] * b[t, j]            (fp32 accumulate)

* ``Zs = sum_t x_t x_t^T``: a = b = x, w = 1, only the upper-triangle tiles are computed and each
  is mirrored into the lower triangle in the same program, so ``Zs`` is exactly symmetric and
  costs ``T * n^2`` instead of ``2 * T * n^2`` flops;
* ``Gs = sum_t g_t x_t^T``: a = g, b = x, w = 1; the programs of the first column of tiles also
  reduce ``ss[i] = sum_t g[t, i]^2`` from the ``g`` tile they already hold (no second pass over g);
* ``weighted_gram(v, w) = sum_t w_t v_t v_t^T``: a = b = v with the weights, symmetric like ``Zs``.

Padding is compacted, not multiplied by zero: with a mask, the kernel loads rows by index
(``mask.nonzero()``), so the work is proportional to the number of valid tokens.

Precision (an explicit choice, see ``FP32_DOT_PRECISION``):

* bf16/fp16 operands go to ``tl.dot`` as they are (tensor cores), accumulated in fp32;
* fp32 operands use ``input_precision="tf32x3"`` by default: three TF32 tensor-core products
  (hi*hi + hi*lo + lo*hi) give close to fp32 accuracy (relative error ~1e-6 per product) at tensor-core
  speed; pass ``fp32_precision="ieee"`` for exact fp32 FMAs (no tensor cores), ``"tf32"`` for speed
  at ~1e-3 relative error. The interpreter (``TRITON_INTERPRET=1``) always multiplies fp32 exactly;
* weights: the ``a`` tile is scaled by ``w`` in fp32, then cast back to the operand dtype for bf16
  and fp32 (bf16 keeps fp32's exponent range, so ``w * v`` cannot overflow; the rounding adds one
  bf16 ulp, 2^-8 relative, per term — the same as rounding the input itself). fp16 tiles are
  upcast to fp32 (and multiplied with the fp32 precision) when weighted, because ``w * v`` can
  exceed fp16's range (65504) for the guidance weights ``-alpha / s_i^2``;
* operands of different dtypes (e.g. x bf16, g fp32) are both upcast to fp32 in registers.

Block sizes come from a small fixed set (``CONFIGS``); ``LORAINIT_TRITON_AUTOTUNE=1`` picks the
fastest of them per shape class on a GPU (never under the interpreter, never in tests).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

import torch
from torch import Tensor

import triton
import triton.language as tl

from ..backends import triton_interpreting

__all__ = ["BlockConfig", "CONFIGS", "FP32_DOT_PRECISION", "default_config", "kfac_update", "weighted_gram"]

# fp32 operands: 3xTF32 on tensor cores (~fp32 accuracy). See the module docstring.
FP32_DOT_PRECISION = "tf32x3"
_PRECISIONS = ("tf32x3", "ieee", "tf32")
_SUPPORTED = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class BlockConfig:
    """Tile sizes of ``_weighted_gram_kernel``: output tile ``block_m x block_n``, ``block_k`` tokens per step."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# The shipped configurations. Symmetric outputs (Z, weighted Gram) need block_m == block_n.
# Shared memory per stage = (block_m + block_n) * block_k * itemsize; all stay under 100 KB, so
# they fit sm_80 (164 KB) and sm_90 (228 KB) with room for the layout conversions.
CONFIGS: Dict[str, BlockConfig] = {
    # bf16/fp16, large outputs: 128x128 tiles, 8 warps (each warp a 64x32 piece of the tile).
    "tc16_128": BlockConfig(128, 128, 32, num_warps=8, num_stages=3),
    # bf16/fp16, outputs with few tiles (small n, or many token splits): more programs per output.
    "tc16_64": BlockConfig(64, 64, 64, num_warps=4, num_stages=3),
    # fp32 (tf32x3 holds hi and lo parts of both tiles) and widened paths. block_k = 16: with 32,
    # sm_80 needs 255 registers and spills in the G kernel and in the "ieee" variant.
    "fp32_64": BlockConfig(64, 64, 16, num_warps=4, num_stages=3),
    # The accumulating form's fp32 tiles (the old values' loads in the epilogue): 8 warps, no spills.
    # Its bf16/fp16 tiles are "tc16_64" (tc16_128 spills there).
    "fp32_64_w8": BlockConfig(64, 64, 16, num_warps=8, num_stages=3),
}


def default_config(dtype: torch.dtype, rows: int, cols: int, upcast: bool = False, accumulate: bool = False
                   ) -> BlockConfig:
    """The shipped configuration for operands of ``dtype`` and an output of ``rows x cols`` (``accumulate``:
    for adding into the caller's accumulators, whose loads in the epilogue need smaller tiles per warp)."""
    if accumulate:
        return CONFIGS["fp32_64_w8"] if (dtype == torch.float32 or upcast) else CONFIGS["tc16_64"]
    if dtype == torch.float32 or upcast:
        return CONFIGS["fp32_64"]
    return CONFIGS["tc16_128"] if min(rows, cols) >= 512 else CONFIGS["tc16_64"]


@triton.jit
def _upper_tile(p):
    """(i, j) with p = j * (j + 1) / 2 + i and 0 <= i <= j: the upper-triangle tiles, column by column.

    j = floor((sqrt(8p + 1) - 1) / 2) in fp32 is one too large from p ~ 1e7 on (and tl.sqrt may be
    approximate), so it is corrected both ways with exact integer arithmetic. Elementwise in p;
    exact while j * (j + 1) fits int32 (j < 46340 tiles per side).
    """
    j = ((tl.sqrt(p.to(tl.float32) * 8.0 + 1.0) - 1.0) * 0.5).to(tl.int32)
    j = tl.where(j * (j + 1) // 2 > p, j - 1, j)
    j = tl.where((j + 1) * (j + 2) // 2 <= p, j + 1, j)
    return p - j * (j + 1) // 2, j


@triton.jit
def _weighted_gram_kernel(
    a_ptr, b_ptr, w_ptr, idx_ptr, out_ptr, sq_ptr,
    T, M, N,
    stride_a, stride_b, stride_out,
    tokens_per_split,
    HAS_WEIGHTS: tl.constexpr, GATHER: tl.constexpr, SYMMETRIC: tl.constexpr, ROW_SQ: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, BF16_DOT_IN_FP32: tl.constexpr, ACCUMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[i, j] = sum_t w[t] * a[r_t, i] * b[r_t, j] over one tile and one token split, fp32 accumulate.

    ``r_t = idx[t]`` when GATHER (the compacted valid tokens) else ``t``; ``w = 1`` unless HAS_WEIGHTS.
    SYMMETRIC (a is b): program p owns upper-triangle tile (i, j), i <= j, enumerated column by column
    (p = j(j+1)/2 + i), and stores its upper part at (i, j) and its transpose at (j, i).
    BF16_DOT_IN_FP32 (interpreter only): the interpreter multiplies bf16 bit patterns in ``tl.dot``
    (triton-lang/triton#11584), so bf16 tiles are widened first; products of bf16 values are exact in
    fp32, so this reproduces the tensor-core result up to summation order.
    ROW_SQ: the programs of tile column 0 also store ``sq[i] = sum_t w[t] * a[r_t, i]^2``.
    Split s covers tokens [s * tokens_per_split, (s+1) * tokens_per_split) and writes the partial
    sums of out (M x N) and sq (M) at offset s in the (splits, M, N) and (splits, M) buffers.
    ACCUMULATE (one split only): out and sq are the caller's accumulators, and each element stored is
    the one loaded plus the new sum (each element is owned by one program: no race, no temporary).
    Reference: ``lorainit_kernels.reference.kfac_update`` / ``weighted_gram``.
    """
    pid = tl.program_id(0)
    split = tl.program_id(1)
    if SYMMETRIC:
        pid_m, pid_n = _upper_tile(pid)
    else:
        tiles_n = tl.cdiv(N, BLOCK_N)
        pid_m = pid // tiles_n
        pid_n = pid % tiles_n

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    in_m = offs_m < M
    in_n = offs_n < N
    t_begin = split * tokens_per_split
    t_end = tl.minimum(T, t_begin + tokens_per_split)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for t0 in range(t_begin, t_end, BLOCK_K):
        offs_t = t0 + tl.arange(0, BLOCK_K)
        in_t = offs_t < t_end
        if GATHER:
            rows = tl.load(idx_ptr + offs_t, mask=in_t, other=0)
        else:
            rows = offs_t
        # int64 row offsets: T * row stride can exceed 2^31 elements for long batches of wide layers.
        rows = rows.to(tl.int64)
        a = tl.load(a_ptr + rows[:, None] * stride_a + offs_m[None, :],
                    mask=in_t[:, None] & in_m[None, :], other=0.0)
        b = tl.load(b_ptr + rows[:, None] * stride_b + offs_n[None, :],
                    mask=in_t[:, None] & in_n[None, :], other=0.0)
        if HAS_WEIGHTS:
            w = tl.load(w_ptr + rows, mask=in_t, other=0.0)
            a_w = a.to(tl.float32) * w[:, None]
            if ROW_SQ:
                if pid_n == 0:
                    sq += tl.sum(a_w * a.to(tl.float32), axis=0)
            if UPCAST:
                a = a_w
            else:
                # bf16/fp32 only (fp16 is upcast by the launcher): see the module docstring.
                a = a_w.to(a.dtype)
        elif ROW_SQ:
            if pid_n == 0:
                a32 = a.to(tl.float32)
                sq += tl.sum(a32 * a32, axis=0)
        if UPCAST or BF16_DOT_IN_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=PRECISION)

    out_ptr += split.to(tl.int64) * M * N
    mask = in_m[:, None] & in_n[None, :]
    direct = out_ptr + offs_m[:, None] * stride_out + offs_n[None, :]
    if SYMMETRIC:
        # Store only i <= j and mirror it: Z[j, i] is bitwise Z[i, j], also inside diagonal tiles
        # (when accumulating: as long as the accumulator was symmetric bitwise, as every Z here is).
        upper = mask & (offs_m[:, None] <= offs_n[None, :])
        strict = mask & (offs_m[:, None] < offs_n[None, :])
        mirrored = out_ptr + offs_n[None, :] * stride_out + offs_m[:, None]
        if ACCUMULATE:
            tl.store(mirrored, acc + tl.load(mirrored, mask=strict, other=0.0), mask=strict)
            acc += tl.load(direct, mask=upper, other=0.0)
        else:
            tl.store(mirrored, acc, mask=strict)
        tl.store(direct, acc, mask=upper)
    else:
        if ACCUMULATE:
            acc += tl.load(direct, mask=mask, other=0.0)
        tl.store(direct, acc, mask=mask)
    if ROW_SQ:
        if pid_n == 0:
            if ACCUMULATE:
                sq += tl.load(sq_ptr + offs_m, mask=in_m, other=0.0)
            tl.store(sq_ptr + split * M + offs_m, sq, mask=in_m)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def _as_config(config: Union[str, BlockConfig]) -> BlockConfig:
    if isinstance(config, BlockConfig):
        return config
    if config not in CONFIGS:
        raise ValueError(f"unknown Triton block config {config!r}; shipped: {sorted(CONFIGS)}")
    return CONFIGS[config]


def _check_rows(name: str, t: Tensor, op: str) -> None:
    if t.dim() != 2 or t.stride(-1) != 1:
        raise ValueError(f"triton {op}: {name} must be 2-D with a contiguous last dimension, got shape "
                         f"{tuple(t.shape)} and strides {t.stride()}")
    if t.dtype not in _SUPPORTED:
        raise TypeError(f"triton {op}: {name} must be bf16, fp16 or fp32, got {t.dtype} (fp64 runs on the "
                        f"torch backend)")
    if t.device.type == "cpu" and not triton_interpreting():
        raise RuntimeError(f"triton {op}: {name} is on the CPU; Triton needs a CUDA tensor or TRITON_INTERPRET=1")


def _auto_splits(tiles: int, tokens: int, cfg: BlockConfig, device: torch.device) -> int:
    """Token splits so that a small output still fills the GPU (1 under the interpreter)."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if tiles >= sms:
        return 1
    # Enough programs for ~2 waves, but each split keeps >= 8 token steps so the pipeline fills.
    by_occupancy = triton.cdiv(2 * sms, tiles)
    by_length = max(1, tokens // (8 * cfg.block_k))
    return max(1, min(by_occupancy, by_length, 32))


def _upcast(a_dtype: torch.dtype, b_dtype: torch.dtype, weighted: bool) -> bool:
    """Whether the tiles are multiplied in fp32: mixed dtypes, or fp16 with weights (module docstring)."""
    return a_dtype != b_dtype or (weighted and a_dtype == torch.float16)


def _kernel_constexprs(
    a_dtype: torch.dtype, b_dtype: torch.dtype, *, weighted: bool, gather: bool, symmetric: bool,
    row_sq: bool, precision: str, config: BlockConfig, interpreting: bool, accumulate: bool = False,
) -> dict:
    """The compile-time arguments of ``_weighted_gram_kernel`` for one call (also used by the AOT tests)."""
    upcast = _upcast(a_dtype, b_dtype, weighted)
    dot_dtype = torch.float32 if upcast else a_dtype
    return dict(
        HAS_WEIGHTS=weighted, GATHER=gather, SYMMETRIC=symmetric, ROW_SQ=row_sq, UPCAST=upcast,
        # input_precision only matters for fp32 operands (and the interpreter's widened bf16: exact).
        PRECISION=precision if dot_dtype == torch.float32 else "ieee",
        BF16_DOT_IN_FP32=interpreting and dot_dtype == torch.bfloat16, ACCUMULATE=accumulate,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
    )


def _outer(
    a: Tensor, b: Tensor, w: Optional[Tensor], idx: Optional[Tensor], T: int, *,
    symmetric: bool, row_sq: bool, config, split_k: Optional[int], precision: str,
    acc: Optional[Tensor] = None, sq_acc: Optional[Tensor] = None,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Launch ``_weighted_gram_kernel``: (out (M, N), sq (M,) or None) for T (compacted) tokens, T >= 1.

    ``acc`` (M, N) / ``sq_acc`` (M,), fp32 contiguous: add the sums to them and return them. With one
    token split the kernel adds in place; with several (few output tiles: small outputs) the
    partial sums are added after the launch.
    """
    M, N = a.shape[1], b.shape[1]
    upcast = _upcast(a.dtype, b.dtype, w is not None)
    if config is None and acc is not None:  # not autotuned: a timing run would add into the accumulators
        cfg = default_config(a.dtype, M, N, upcast, accumulate=True)
    elif config is None:
        cfg = _pick_config(a, b, w, idx, T, symmetric, row_sq, upcast, precision)
    else:
        cfg = _as_config(config)
    if symmetric and cfg.block_m != cfg.block_n:
        raise ValueError(f"symmetric outputs need block_m == block_n, got {cfg}")
    if symmetric:
        t = triton.cdiv(N, cfg.block_n)
        tiles = t * (t + 1) // 2
    else:
        tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
    splits = split_k if split_k is not None else _auto_splits(tiles, T, cfg, a.device)
    if int(splits) < 1:
        raise ValueError(f"split_k must be >= 1, got {split_k}")
    per_split = triton.cdiv(triton.cdiv(T, int(splits)), cfg.block_k) * cfg.block_k
    splits = triton.cdiv(T, per_split)  # no empty splits
    in_place = acc is not None and splits == 1
    if in_place:
        out, sq = acc, sq_acc
    else:
        out = torch.empty((splits, M, N), device=a.device, dtype=torch.float32)
        sq = torch.empty((splits, M), device=a.device, dtype=torch.float32) if row_sq else None
    meta = _kernel_constexprs(a.dtype, b.dtype, weighted=w is not None, gather=idx is not None,
                              symmetric=symmetric, row_sq=row_sq, precision=precision, config=cfg,
                              interpreting=triton_interpreting(), accumulate=in_place)
    _weighted_gram_kernel[(tiles, splits)](
        a, b, w, idx, out, sq,
        T, M, N,
        a.stride(0), b.stride(0), N,
        per_split,
        **meta, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if in_place:
        return acc, sq_acc
    # Partial sums of the splits are added in a fixed order: deterministic, unlike atomics.
    out = out[0] if splits == 1 else out.sum(0)
    if sq is not None:
        sq = sq[0] if splits == 1 else sq.sum(0)
    if acc is not None:
        acc += out
        if sq is not None:
            sq_acc += sq
        return acc, sq_acc
    return out, sq


def kfac_update(
    x: Tensor,
    g: Optional[Tensor],
    mask: Optional[Tensor],
    with_input_cov: bool,
    *,
    config: Union[None, str, BlockConfig] = None,
    split_k: Optional[int] = None,
    fp32_precision: Optional[str] = None,
    out: Optional[Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """``(Zs, Gs, ss) = (sum_t x_t x_t^T, sum_t g_t x_t^T, sum_t g_t * g_t)`` over the valid tokens, fp32.

    ``x`` (T, n) and ``g`` (T, m) or None: 2-D, last dimension contiguous (any row stride), bf16, fp16
    or fp32; ``mask`` (T,) bool or None (True = valid). ``Zs`` is (n, n) and exactly symmetric, or
    (0, 0) when ``with_input_cov`` is False; ``Gs`` (m, n) and ``ss`` (m,) are (0, n) and (0,) when
    ``g`` is None. ``config`` (a name in ``CONFIGS`` or a ``BlockConfig``), ``split_k`` (token splits,
    default: automatic on GPU, 1 otherwise) and ``fp32_precision`` (default ``FP32_DOT_PRECISION``)
    are tuning knobs; the result does not depend on them beyond rounding. ``out``: accumulators
    ``(Z, G, s)`` (fp32, contiguous, on ``x``'s device; None where not tracked) that the sums are added
    to, in place by the kernel (no (n, n) or (m, n) temporary when one token split covers the batch),
    and returned.
    """
    op = "kfac_update"
    _check_rows("x", x, op)
    Tall, n = x.shape
    if g is not None:
        _check_rows("g", g, op)
        if g.shape[0] != Tall or g.device != x.device:
            raise ValueError(f"triton {op}: g {tuple(g.shape)} on {g.device} does not match x {tuple(x.shape)} on {x.device}")
    precision = _check_precision(fp32_precision, op)
    idx = None
    T = Tall
    if mask is not None:
        if mask.shape != (Tall,) or mask.dtype != torch.bool:
            raise ValueError(f"triton {op}: mask must be bool of shape ({Tall},), got {mask.dtype} {tuple(mask.shape)}")
        # Compaction: the kernel gathers the valid rows by index; int32 is enough for T < 2^31 rows.
        idx = mask.nonzero().squeeze(1).to(torch.int32)
        T = idx.numel()
    m = 0 if g is None else g.shape[1]
    f32 = dict(device=x.device, dtype=torch.float32)
    if out is not None:
        Z, G, s = _check_accumulators(out, n, m, x.device, op)
        if T > 0:
            knobs = dict(config=config, split_k=split_k, precision=precision)
            if Z is not None and with_input_cov:
                _outer(x, x, None, idx, T, symmetric=True, row_sq=False, acc=Z, **knobs)
            if G is not None and g is not None:
                _outer(g, x, None, idx, T, symmetric=False, row_sq=True, acc=G, sq_acc=s, **knobs)
        return Z, G, s
    if T == 0:  # no valid token: the sums are exactly zero
        Zs = torch.zeros((n, n) if with_input_cov else (0, 0), **f32)
        return Zs, torch.zeros((m, n), **f32), torch.zeros((m,), **f32)
    knobs = dict(config=config, split_k=split_k, precision=precision)
    if with_input_cov:
        Zs, _ = _outer(x, x, None, idx, T, symmetric=True, row_sq=False, **knobs)
    else:
        Zs = torch.zeros((0, 0), **f32)
    if g is None:
        return Zs, torch.zeros((0, n), **f32), torch.zeros((0,), **f32)
    Gs, ss = _outer(g, x, None, idx, T, symmetric=False, row_sq=True, **knobs)
    return Zs, Gs, ss


def weighted_gram(
    v: Tensor,
    weights: Optional[Tensor],
    *,
    config: Union[None, str, BlockConfig] = None,
    split_k: Optional[int] = None,
    fp32_precision: Optional[str] = None,
) -> Tensor:
    """``sum_t w_t v_t v_t^T`` (d, d), fp32 and exactly symmetric, for ``v`` (T, d) and ``weights`` (T,) or None (ones).

    Weights may be negative (the guidance matrix uses ``-alpha / s_i^2``). Knobs as in ``kfac_update``.
    """
    op = "weighted_gram"
    _check_rows("v", v, op)
    T, d = v.shape
    precision = _check_precision(fp32_precision, op)
    w = None
    if weights is not None:
        if weights.shape != (T,) or weights.device != v.device:
            raise ValueError(f"triton {op}: weights must have shape ({T},) on {v.device}, got "
                             f"{tuple(weights.shape)} on {weights.device}")
        w = weights.to(torch.float32).contiguous()
    if T == 0:
        return torch.zeros((d, d), device=v.device, dtype=torch.float32)
    out, _ = _outer(v, v, w, None, T, symmetric=True, row_sq=False,
                    config=config, split_k=split_k, precision=precision)
    return out


def _check_accumulators(out, n: int, m: int, device, op: str):
    """``out = (Z, G, s)`` as accumulators of ``kfac_update``: fp32, contiguous, shaped (n, n), (m, n), (m,)."""
    if not (isinstance(out, (tuple, list)) and len(out) == 3):
        raise ValueError(f"triton {op}: out must be a tuple (Z, G, s), got {type(out).__name__}")
    want = {"Z": (n, n), "G": (m, n), "s": (m,)}
    for name, t in zip(("Z", "G", "s"), out):
        if t is None:
            continue
        if t.dtype != torch.float32 or not t.is_contiguous() or t.device != device or tuple(t.shape) != want[name]:
            raise ValueError(f"triton {op}: accumulator {name} must be a contiguous fp32 tensor of shape "
                             f"{want[name]} on {device}, got {t.dtype} {tuple(t.shape)} on {t.device}"
                             f"{'' if t.is_contiguous() else ' (not contiguous)'}")
    if (out[1] is None) != (out[2] is None):
        raise ValueError(f"triton {op}: accumulators G and s go together (got one of them None)")
    return out


def _check_precision(p: Optional[str], op: str) -> str:
    p = FP32_DOT_PRECISION if p is None else p
    if p not in _PRECISIONS:
        raise ValueError(f"triton {op}: fp32_precision must be one of {_PRECISIONS}, got {p!r}")
    return p


# ----------------------------------------------------------------------------------------------
# Configuration choice; optional GPU autotuning over the shipped set
# ----------------------------------------------------------------------------------------------
_TUNED: Dict[tuple, BlockConfig] = {}


def _autotune_enabled() -> bool:
    return os.environ.get("LORAINIT_TRITON_AUTOTUNE", "0") not in ("", "0") and not triton_interpreting()


def _pick_config(a, b, w, idx, T, symmetric, row_sq, upcast, precision) -> BlockConfig:
    M, N = a.shape[1], b.shape[1]
    default = default_config(a.dtype, M, N, upcast)
    if not (_autotune_enabled() and a.is_cuda):
        return default
    # Shape class: powers of two of the sizes, so one tuning serves nearby shapes.
    key = (a.dtype, b.dtype, w is not None, idx is not None, symmetric, row_sq, upcast, precision,
           M.bit_length(), N.bit_length(), T.bit_length())
    if key not in _TUNED:
        from triton.testing import do_bench

        best, best_ms = default, float("inf")
        # Only the configurations verified ahead of time (no spills) for this operand width.
        names = ("fp32_64",) if (upcast or a.dtype == torch.float32) else ("tc16_128", "tc16_64")
        for cfg in (CONFIGS[k] for k in names):
            fn = lambda: _outer(a, b, w, idx, T, symmetric=symmetric, row_sq=row_sq,  # noqa: E731
                                config=cfg, split_k=None, precision=precision)
            ms = do_bench(fn, warmup=5, rep=20)
            if ms < best_ms:
                best, best_ms = cfg, ms
        _TUNED[key] = best
    return _TUNED[key]
