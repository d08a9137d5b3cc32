"""The ``"native"`` backend: the C++ CPU kernels of ``lorainit_kernels._C`` (through ``lorainit_kernels._native``).

CPU tensors only, the extension built. ``kfac_update`` and ``weighted_gram`` take bf16, fp16 or
fp32 operands (fp32 accumulation), and can add into existing fp32 accumulators in place
(``ops.kfac_accumulate_``, ``ops.weighted_gram(..., out=)``: no per-call temporary); ``sym_matmul`` and ``rr_grams`` take fp32 (``rr_grams``
accumulates in fp64). fp64 inputs are declined: the ``"torch"`` backend computes them.

The automatic choice passes over the native ``kfac_update`` where it is slower than plain torch: on CPUs
without AVX2, whose only native level is the plain-C++ ``portable`` kernel (``backends.auto_reasons``
says so; docs/kernels.md has the measurements per ISA).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import _native
from . import HALF_OR_FP32, implements

_FP32 = (torch.float32,)
RR_MAX_PARTS = 4


@lru_cache(maxsize=None)
def _kfac_slower_here() -> Optional[str]:
    best = _native.isa_levels()[-1]
    if best == "portable":
        # bench/results/kfac.md, the no-AVX2 table: against torch with MKL held to SSE4.2, the plain-C++
        # kernel is no faster on one thread (0.93x CPU time at T=2048, n=m=512, 2026-12-07); every SIMD
        # level is faster than torch
        return ("this CPU has no AVX2 (native level 'portable'), where the native kernel is no faster than "
                "plain torch's BLAS matmuls on one thread (bench/results/kfac.md); running torch")
    return None


def _kfac_slower(*tensors: Tensor) -> Optional[str]:
    """Why the automatic choice runs torch rather than the native kfac_update here (None: native is faster)."""
    if not tensors or tensors[0].device.type != "cpu":
        return None
    return _kfac_slower_here()


@implements("kfac_update", "native", dtypes=HALF_OR_FP32, symbol="kfac_update", slower=_kfac_slower)
def kfac_update(x: Tensor, g: Optional[Tensor], mask: Optional[Tensor], with_input_cov: bool, out=None
                ) -> Tuple[Tensor, Tensor, Tensor]:
    """``(sum x x^T, sum g x^T, sum g*g)`` over the valid tokens, fp32: ``_native.kfac_update``
    (``out``: fp32 accumulators added to in place)."""
    return _native.kfac_update(x, g, mask, with_input_cov, out)


@implements("weighted_gram", "native", dtypes=HALF_OR_FP32, symbol="weighted_gram")
def weighted_gram(v: Tensor, weights: Optional[Tensor], out: Optional[Tensor] = None) -> Tensor:
    """``sum_t w_t v_t v_t^T``, fp32, exactly symmetric: ``_native.weighted_gram`` (``out``: added to in place)."""
    return _native.weighted_gram(v, weights, out)


@implements("sym_matmul", "native", dtypes=_FP32, symbol="sym_matmul")
def sym_matmul(A: Tensor, W: Tensor) -> Tensor:
    """``A @ W`` reading only the upper triangle of each symmetric ``A``: ``_native.sym_matmul``."""
    return _native.sym_matmul(A, W).contiguous()


def _rr_parts(S_parts: Sequence[Tensor], AS_parts: Sequence[Tensor]) -> Optional[str]:
    if not (1 <= len(S_parts) <= RR_MAX_PARTS and 1 <= len(AS_parts) <= RR_MAX_PARTS):
        return (f"the native kernel takes 1 to {RR_MAX_PARTS} column parts each, got {len(S_parts)} and "
                f"{len(AS_parts)}")
    return None


@implements("rr_grams", "native", dtypes=_FP32, check=_rr_parts, symbol="rr_grams")
def rr_grams(S_parts: Sequence[Tensor], AS_parts: Sequence[Tensor]) -> Tuple[Tensor, Tensor]:
    """``(S^T S, S^T AS)`` in fp64 from fp32 parts, never forming ``S`` or ``AS``: ``_native.rr_grams``."""
    return _native.rr_grams(S_parts, AS_parts)
