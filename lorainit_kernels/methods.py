"""Per-layer initialization math of every LoRA initialization method, as pure functions of tensors.

Orientation (docs/math.md): a target layer is ``y = W x + b`` with ``W`` of shape ``(m, n)``
= ``(out_features, in_features)``. PEFT stores ``lora_A.weight`` ``(r, n)`` and ``lora_B.weight``
``(m, r)`` and adds ``sigma * lora_B @ lora_A`` to ``W``, with ``sigma = lora_alpha / r``
(``lora_alpha / sqrt(r)`` with rsLoRA; see :func:`peft_scaling`). Every function returns
:class:`LoRAFactors` in exactly that layout, ready to be copied into a PEFT model:

* ``lora_A`` ``(..., r, n)`` -> ``lora_A.weight``;
* ``lora_B`` ``(..., m, r)`` -> ``lora_B.weight``;
* ``base_delta`` ``(..., m, n)`` or None: to be ADDED to the base weight ``W``.

Every function is batched over leading dimensions (layers of the same shape stacked as
``(..., m, n)``), and deterministic given a ``torch.Generator`` where it is random. Random
initializations consume the generator one layer after another, so a batched call returns exactly
what the same number of one-layer calls return when they share the generator.

Precision: SVDs run in fp32 (fp64 for fp64 inputs; bf16/fp16 inputs are upcast). ``lora_A`` and
``lora_B`` come back in the input dtype; ``base_delta`` comes back in the compute dtype (fp32, or
fp64) and is computed from the *returned* (already cast) factors, so that
``W.float() + base_delta + sigma * lora_B.float() @ lora_A.float()`` reproduces ``W`` up to one
rounding (the same convention as PEFT's LoRA-GA, which computes the offset in fp32 from the
dtype-converted adapter weights).

Methods (formulas in each docstring): :func:`lora_default`, :func:`gaussian`, :func:`orthogonal`
(PEFT's random initializations), :func:`pissa`, :func:`milora` (weight SVD), :func:`lora_ga`,
:func:`lora_one` (gradient SVD), :func:`hrp` / :func:`hrp_preheat_factors` (High-Rank Preheating)
and :func:`lora_da` (LoRA-DA, wrapping ``lorainit_kernels.linalg``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import defaults
from .linalg import guidance as _guidance
from .linalg._common import canonical_signs
from .linalg.operators import DiagonalMinusLowRank
from .linalg.products import svd_of_product

__all__ = [
    "LoRAFactors",
    "gaussian",
    "hrp",
    "hrp_preheat_factors",
    "lora_da",
    "lora_da_embedding",
    "lora_default",
    "lora_ga",
    "lora_one",
    "milora",
    "orthogonal",
    "peft_scaling",
    "pissa",
    "randomized_svd",
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class LoRAFactors:
    """The initial state of one (or a stack of) LoRA adapter(s), in PEFT's layout.

    ``lora_A`` ``(..., r, n)`` -> PEFT ``lora_A.weight``; ``lora_B`` ``(..., m, r)`` -> PEFT
    ``lora_B.weight``; ``base_delta`` ``(..., m, n)``: to be ADDED to the base weight ``W`` (torch
    orientation), or None when the base weight stays as it is.
    """

    lora_A: Tensor
    lora_B: Tensor
    base_delta: Optional[Tensor] = None

    def adapter_delta(self, scaling: float) -> Tensor:
        """``scaling * lora_B @ lora_A`` (..., m, n), what the adapter adds to ``W`` at initialization."""
        dt = _work_dtype(self.lora_A.dtype)
        return scaling * (self.lora_B.to(dt) @ self.lora_A.to(dt))


# ----------------------------------------------------------------------------------------------
# argument checks and small helpers
# ----------------------------------------------------------------------------------------------
def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_int(name: str, value: Any, op: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{op}: {name} must be an int >= {low}, got {value!r}")
    return value


def _check_matrix(name: str, t: Any, op: str) -> Tensor:
    """A floating tensor of shape (..., rows, cols) with no NaN/Inf."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be a floating tensor (bf16, fp16, fp32 or fp64), got {t.dtype} "
                        f"with shape {tuple(t.shape)}")
    if t.dim() < 2:
        raise ValueError(f"{op}: {name} must have shape (..., rows, cols), got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{op}: {name} is empty (shape {tuple(t.shape)})")
    _check_finite(name, t, op)
    return t


def _check_finite(name: str, t: Tensor, op: str) -> None:
    # a NaN/Inf entry makes the sum non-finite: one reduction, no elementwise (numel-byte) mask
    # unless something is wrong (or the sum of finite entries overflowed)
    if bool(torch.isfinite(t.sum())):
        return
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        bad = (~finite).nonzero()[0].tolist()
        raise ValueError(f"{op}: {name} (shape {tuple(t.shape)}) has NaN/Inf entries, first at index {tuple(bad)}")


def _check_rank(rank: Any, m: int, n: int, op: str, *, factor: int = 1, what: str = "min(m, n)") -> int:
    _check_int("rank", rank, op)
    limit = min(m, n) // factor
    if rank > limit:
        need = f"{factor} * rank <= {what}" if factor > 1 else f"rank <= {what}"
        raise ValueError(f"{op}: {need} = {min(m, n)} for a ({m}, {n}) weight, got rank={rank}")
    return rank


def _check_scaling(scaling: Any, op: str) -> float:
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling) or scaling <= 0:
        raise ValueError(f"{op}: scaling must be a finite positive number (PEFT's lora_alpha / r, or "
                         f"lora_alpha / sqrt(r) with rsLoRA), got {scaling!r}")
    return float(scaling)


def _check_batch_shape(batch_shape: Any, op: str) -> Tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in batch_shape)
    except TypeError:
        raise TypeError(f"{op}: batch_shape must be a sequence of ints, got {batch_shape!r}") from None
    if any(d < 1 for d in shape):
        raise ValueError(f"{op}: batch_shape entries must be >= 1, got {shape}")
    return shape


def _check_generator(generator: Any, op: str) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{op}: generator must be a torch.Generator or None, got {type(generator).__name__}")


def peft_scaling(lora_alpha: float, r: int, use_rslora: bool = False) -> float:
    """PEFT's adapter scaling: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA.

    rsLoRA: Kalajdzievski (2023), "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA",
    arXiv 2312.03732; PEFT ``tuners/lora/layer.py`` ``update_layer``.
    """
    _check_int("r", r, "peft_scaling")
    if not isinstance(lora_alpha, (int, float)) or isinstance(lora_alpha, bool) or not math.isfinite(lora_alpha):
        raise ValueError(f"peft_scaling: lora_alpha must be a finite number, got {lora_alpha!r}")
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def _exact_svd(M: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Thin SVD ``M = U diag(S) V^T`` (U (..., m, k), S (..., k) descending, V (..., n, k)), canonical signs."""
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    U, V = canonical_signs(U, Vh.mT)
    return U, S, V


def _randn(shape: Sequence[int], generator: Optional[torch.Generator], dtype: torch.dtype, device) -> Tensor:
    """Standard normal draws on the generator's device (so a CPU generator works for CUDA outputs)."""
    gdev = generator.device if generator is not None else device
    draw_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    out = torch.randn(tuple(shape), generator=generator, dtype=draw_dtype, device=gdev)
    return out.to(device=device, dtype=dtype)


def randomized_svd(
    M: Tensor,
    k: int,
    *,
    niter: int = 4,
    oversample: int = 16,
    generator: Optional[torch.Generator] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Top-``k`` singular triplets of ``M`` (..., m, n) by a randomized range finder with subspace iteration.

    Halko, Martinsson & Tropp (2011), "Finding structure with randomness", Algorithms 4.4 + 5.1 (the
    algorithm of ``torch.svd_lowrank``): with a Gaussian sketch ``Omega`` (n, q), ``q = min(k +
    oversample, m, n)``, ``Q = orth(M Omega)``, then ``niter`` times ``Q = orth(M orth(M^T Q))``
    (re-orthonormalized every half step for stability); finally the SVD of the small ``Q^T M``
    (q, n) gives ``U = Q U_small``. The error of the rank-k approximation decays like
    ``(sigma_{q+1} / sigma_k)^(2 niter + 1)``. One sketch ``Omega`` (drawn from ``generator``) is
    shared by every matrix of the batch, so a batched call equals one-by-one calls with equally
    seeded generators. Runs in fp32 (fp64 for fp64 input). Returns ``U`` (..., m, k), ``S`` (..., k)
    descending and ``V`` (..., n, k), with canonical signs.
    """
    op = "randomized_svd"
    _check_matrix("M", M, op)
    m, n = M.shape[-2:]
    _check_rank(k, m, n, op)
    _check_int("niter", niter, op, low=0)
    _check_int("oversample", oversample, op, low=0)
    _check_generator(generator, op)
    dt = _work_dtype(M.dtype)
    X = M.to(dt)
    q = min(k + oversample, m, n)
    omega = _randn((n, q), generator, dt, X.device)
    Q = torch.linalg.qr(X @ omega).Q
    for _ in range(niter):
        Q = torch.linalg.qr(X.mT @ Q).Q
        Q = torch.linalg.qr(X @ Q).Q
    Us, S, Vh = torch.linalg.svd(Q.mT @ X, full_matrices=False)
    U = Q @ Us[..., :, :k]
    U, V = canonical_signs(U, Vh[..., :k, :].mT)
    return U, S[..., :k], V


def _svd_topk(M: Tensor, k: int, niter: Optional[int], oversample: int, generator, op: str):
    if niter is None:
        U, S, V = _exact_svd(M)
        return U[..., :k], S[..., :k], V[..., :k]
    _check_int("niter", niter, op, low=0)
    return randomized_svd(M, k, niter=niter, oversample=oversample, generator=generator)


def _per_layer_random(batch_shape: Tuple[int, ...], draw) -> Tuple[Tensor, ...]:
    """Call ``draw()`` once per layer (row-major over ``batch_shape``) and stack the results."""
    count = math.prod(batch_shape)
    outs = [draw() for _ in range(count)]
    return tuple(torch.stack([o[i] for o in outs]).reshape(*batch_shape, *outs[0][i].shape)
                 for i in range(len(outs[0])))


def _random_setup(m, n, rank, batch_shape, generator, dtype, device, op):
    _check_int("m", m, op)
    _check_int("n", n, op)
    _check_int("rank", rank, op)
    shape = _check_batch_shape(batch_shape, op)
    _check_generator(generator, op)
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: dtype must be a floating dtype, got {dtype}")
    dev = torch.device(device) if device is not None else (generator.device if generator is not None else torch.device("cpu"))
    return shape, dev


# ----------------------------------------------------------------------------------------------
# PEFT's random initializations
# ----------------------------------------------------------------------------------------------
def lora_default(
    m: int,
    n: int,
    rank: int,
    *,
    batch_shape: Sequence[int] = (),
    generator: Optional[torch.Generator] = None,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> LoRAFactors:
    """PEFT's default LoRA init (``init_lora_weights=True``): kaiming-uniform ``A``, zero ``B``.

    ``lora_A ~ U(-b, b)`` i.i.d. with ``b = sqrt(3) * gain / sqrt(n)``, ``gain = sqrt(2 / (1 + a^2))``,
    ``a = sqrt(5)``, i.e. ``b = 1 / sqrt(n)`` (``nn.init.kaiming_uniform_(A, a=sqrt(5))``, the
    ``nn.Linear`` default, as in Hu et al. (2021) "LoRA", arXiv 2106.09685, microsoft/LoRA
    ``loralib/layers.py``); ``lora_B = 0``; ``base_delta = None`` (the adapter starts at zero).
    With the same generator state this reproduces PEFT ``reset_lora_parameters`` bit for bit.
    """
    a = math.sqrt(5)
    bound = math.sqrt(3.0) * math.sqrt(2.0 / (1 + a * a)) / math.sqrt(n)  # torch's kaiming_uniform_ bound
    return _random_A_zero_B("lora_default", m, n, rank, batch_shape, generator, dtype, device,
                            lambda A: A.uniform_(-bound, bound, generator=generator))


def _random_A_zero_B(op, m, n, rank, batch_shape, generator, dtype, device, fill) -> LoRAFactors:
    """``lora_A`` filled in place by ``fill`` layer by layer (PEFT's draw order), ``lora_B = 0``."""
    shape, dev = _random_setup(m, n, rank, batch_shape, generator, dtype, device, op)
    gdev = generator.device if generator is not None else dev
    (A,) = _per_layer_random(shape, lambda: (fill(torch.empty(rank, n, dtype=_work_dtype(dtype), device=gdev)),))
    return LoRAFactors(A.to(device=dev, dtype=dtype), torch.zeros(*shape, m, rank, dtype=dtype, device=dev), None)


def gaussian(
    m: int,
    n: int,
    rank: int,
    *,
    batch_shape: Sequence[int] = (),
    generator: Optional[torch.Generator] = None,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> LoRAFactors:
    """PEFT's ``init_lora_weights="gaussian"``: ``lora_A ~ N(0, std^2)`` with ``std = 1 / r``, ``lora_B = 0``.

    Note PEFT uses standard deviation ``1/r`` (``nn.init.normal_(A, std=1 / r)``, so the variance is
    ``1/r^2``); we follow PEFT exactly (bitwise, given the same generator state). ``base_delta = None``.
    """
    return _random_A_zero_B("gaussian", m, n, rank, batch_shape, generator, dtype, device,
                            lambda A: A.normal_(0.0, 1.0 / rank, generator=generator))


def orthogonal(
    m: int,
    n: int,
    rank: int,
    *,
    batch_shape: Sequence[int] = (),
    generator: Optional[torch.Generator] = None,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> LoRAFactors:
    """PEFT's ``init_lora_weights="orthogonal"`` (rank must be even): ``B != 0``, ``A != 0``, ``B A = 0``.

    With ``Q`` the orthogonal factor of a Gaussian ``r x r`` matrix, ``Q_o = Q[0::2]`` and
    ``Q_e = Q[1::2]`` (``r/2 x r`` each, mutually orthogonal rows), and Gaussian ``G_A`` (n, r/2),
    ``G_B`` (r/2, m):

        ``lora_A = (G_A Q_o)^T / 10``  (r, n),   ``lora_B = G_B^T Q_e / 10``  (m, r),

    so ``lora_B @ lora_A = G_B^T (Q_e Q_o^T) G_A^T / 100 = 0`` while both factors are non-zero and
    receive gradients from the first step. PEFT ``tuners/lora/layer.py`` ``orthogonal_init`` (after
    https://datta0.github.io/posts/rethink-lora-init/#orthogonal-initialisation); same draws in the
    same order, so the same generator state reproduces PEFT exactly. ``base_delta = None``.
    """
    op = "orthogonal"
    shape, dev = _random_setup(m, n, rank, batch_shape, generator, dtype, device, op)
    if rank % 2 != 0:
        raise ValueError(f"{op}: rank must be even (A and B take alternate rows of an r x r orthogonal "
                         f"matrix), got rank={rank}")
    draw_dtype = _work_dtype(dtype)
    gdev = generator.device if generator is not None else dev
    h = rank // 2

    def draw():
        X = torch.randn(rank, rank, generator=generator, dtype=draw_dtype, device=gdev)
        Q = torch.linalg.qr(X).Q
        A = torch.randn(n, h, generator=generator, dtype=draw_dtype, device=gdev).mm(Q[0::2, :]).T / 10.0
        B = torch.randn(h, m, generator=generator, dtype=draw_dtype, device=gdev).T.mm(Q[1::2, :]) / 10.0
        return A.contiguous(), B.contiguous()

    A, B = _per_layer_random(shape, draw)
    return LoRAFactors(A.to(device=dev, dtype=dtype), B.to(device=dev, dtype=dtype), None)


# ----------------------------------------------------------------------------------------------
# weight-SVD methods
# ----------------------------------------------------------------------------------------------
def _split_sqrt(U: Tensor, S: Tensor, V: Tensor, scaling: float, out_dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """``lora_A = diag(sqrt(S/sigma)) V^T``, ``lora_B = U diag(sqrt(S/sigma))`` so ``sigma B A = U S V^T``."""
    root = (S / scaling).clamp_min(0).sqrt()
    A = (root.unsqueeze(-1) * V.mT).to(out_dtype)
    B = (U * root.unsqueeze(-2)).to(out_dtype)
    return A, B


def _residual(A: Tensor, B: Tensor, scaling: float) -> Tensor:
    """``-sigma * B @ A`` in the compute dtype, from the (already cast) factors."""
    dt = _work_dtype(A.dtype)
    return -(scaling * (B.to(dt) @ A.to(dt)))


def pissa(
    W: Tensor,
    rank: int,
    *,
    scaling: float,
    niter: Optional[int] = None,
    oversample: int = 16,
    generator: Optional[torch.Generator] = None,
) -> LoRAFactors:
    """PiSSA: the adapter takes the ``r`` principal singular components of ``W``, the base keeps the rest.

    Meng, Wang & Zhang (2024), "PiSSA: Principal Singular Values and Singular Vectors Adaptation of
    Large Language Models", arXiv 2404.02948; PEFT ``tuners/lora/layer.py`` ``pissa_init``. With
    ``W = U S V^T`` (exact SVD when ``niter`` is None, else :func:`randomized_svd` with ``niter``
    subspace iterations and ``oversample`` extra sketch columns, PEFT's ``"pissa_niter_<k>"``):

        ``lora_A = diag(sqrt(S_r / sigma)) V_r^T``,  ``lora_B = U_r diag(sqrt(S_r / sigma))``,
        ``sigma * lora_B @ lora_A = U_r S_r V_r^T``,  ``base_delta = -sigma * lora_B @ lora_A``,

    so the residual base ``W + base_delta`` plus the adapter equals ``W`` (up to one rounding), and
    the adapter is the best rank-``r`` approximation of ``W`` (Eckart-Young). ``W`` (..., m, n).
    """
    op = "pissa"
    _check_matrix("W", W, op)
    m, n = W.shape[-2:]
    _check_rank(rank, m, n, op)
    scaling = _check_scaling(scaling, op)
    _check_generator(generator, op)
    U, S, V = _svd_topk(W.to(_work_dtype(W.dtype)), rank, niter, oversample, generator, op)
    A, B = _split_sqrt(U, S, V, scaling, W.dtype)
    return LoRAFactors(A, B, _residual(A, B, scaling))


def milora(W: Tensor, rank: int, *, scaling: float) -> LoRAFactors:
    """MiLoRA: the adapter takes the ``r`` *minor* singular components of ``W``; the base keeps the rest.

    Wang et al. (2024), "MiLoRA: Harnessing Minor Singular Components for Parameter-Efficient LLM
    Finetuning", arXiv 2406.09044. With the thin SVD ``W = U S V^T`` (``k = min(m, n)`` values,
    descending) and ``I = {k - r, ..., k - 1}`` (the ``r`` smallest, kept in descending order):

        ``lora_A = diag(sqrt(S_I / sigma)) V_I^T``,  ``lora_B = U_I diag(sqrt(S_I / sigma))``,
        ``base_delta = -sigma * lora_B @ lora_A = -U_I S_I V_I^T``,

    the same PiSSA-style split and PEFT scaling convention. Exact SVD only (a randomized SVD does not
    resolve the smallest singular values). ``W`` (..., m, n).
    """
    op = "milora"
    _check_matrix("W", W, op)
    m, n = W.shape[-2:]
    _check_rank(rank, m, n, op)
    scaling = _check_scaling(scaling, op)
    U, S, V = _exact_svd(W.to(_work_dtype(W.dtype)))
    A, B = _split_sqrt(U[..., -rank:], S[..., -rank:], V[..., -rank:], scaling, W.dtype)
    return LoRAFactors(A, B, _residual(A, B, scaling))


# ----------------------------------------------------------------------------------------------
# gradient-SVD methods
# ----------------------------------------------------------------------------------------------
_GA_DIRECTIONS = ("ArB2r", "A2rBr", "ArBr")
_GA_SCALES = ("stable", "unit", "gd")


def lora_ga(
    W_grad: Tensor,
    rank: int,
    *,
    scaling: float,
    direction: str = "ArB2r",
    scale: str = "stable",
    stable_gamma: float = 16.0,
    niter: Optional[int] = None,
    oversample: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> LoRAFactors:
    """LoRA-GA: adapter factors from the top ``2r`` singular vectors of the full weight gradient.

    Wang, Li, Wang & Zhou (2024), "LoRA-GA: Low-Rank Adaptation with Gradient Approximation",
    arXiv 2407.05000; reference code Outsider565/LoRA-GA (``peft/src/peft/tuners/lora/layer.py``
    ``lora_ga_init``, defaults ``direction="ArB2r"``, ``scale="stable"``, ``stable_gamma=16``).
    ``W_grad`` (..., m, n) is ``dL/dW``; with ``W_grad = U S V^T`` (exact SVD, or
    :func:`randomized_svd` when ``niter`` is given; the reference uses ``q = 4r``, ``niter = 4``):

    * ``direction="ArB2r"`` (reference default): ``A = V[:, :r]^T``, ``B = U[:, r:2r]``;
      ``"A2rBr"``: ``A = V[:, r:2r]^T``, ``B = U[:, :r]``; ``"ArBr"``: ``A = V[:, 1:2r:2]^T``,
      ``B = U[:, 0:2r:2]``. Any split of the top ``2r`` indices makes the first LoRA step
      ``B B^T G + G A^T A`` equal to ``c^2`` times the best rank-``2r`` approximation of ``G``.
    * ``scale="stable"``: ``A, B *= c`` with ``c = m^(1/4) / sqrt(stable_gamma)`` (output-scale
      stable init, ``m`` = out_features); ``"unit"``: ``c = 1``; ``"gd"``: ``A, B /= sigma``.
    * ``base_delta = -sigma * B @ A`` (LoRA-GA subtracts the initial adapter from the base weight,
      so the model is unchanged at initialization). The sign convention of the SVD does not matter:
      the first update ``-lr * sigma^2 (B B^T G + G A^T A)`` is invariant to it.

    Note: PEFT 0.21's built-in ``lora_ga`` additionally multiplies ``B`` by the corresponding
    singular values; we follow the paper's reference code (orthonormal directions times ``c``).
    """
    op = "lora_ga"
    _check_matrix("W_grad", W_grad, op)
    m, n = W_grad.shape[-2:]
    _check_rank(rank, m, n, op, factor=2, what="min(m, n)")
    scaling = _check_scaling(scaling, op)
    if direction not in _GA_DIRECTIONS:
        raise ValueError(f"{op}: direction must be one of {_GA_DIRECTIONS}, got {direction!r}")
    if scale not in _GA_SCALES:
        raise ValueError(f"{op}: scale must be one of {_GA_SCALES}, got {scale!r}")
    if not isinstance(stable_gamma, (int, float)) or isinstance(stable_gamma, bool) or not stable_gamma > 0:
        raise ValueError(f"{op}: stable_gamma must be a positive number, got {stable_gamma!r}")
    _check_generator(generator, op)
    k = 2 * rank
    over = (min(4 * rank, m, n) - k) if oversample is None else oversample
    U, S, V = _svd_topk(W_grad.to(_work_dtype(W_grad.dtype)), k, niter, max(over, 0), generator, op)
    if direction == "ArB2r":
        A, B = V[..., :rank].mT, U[..., rank:k]
    elif direction == "A2rBr":
        A, B = V[..., rank:k].mT, U[..., :rank]
    else:
        A, B = V[..., 1:k:2].mT, U[..., 0:k:2]
    if scale == "stable":
        c = m ** 0.25 / math.sqrt(stable_gamma)
        A, B = A * c, B * c
    elif scale == "gd":
        A, B = A / scaling, B / scaling
    A, B = A.contiguous().to(W_grad.dtype), B.contiguous().to(W_grad.dtype)
    return LoRAFactors(A, B, _residual(A, B, scaling))


def lora_one(
    W_grad: Tensor,
    rank: int,
    *,
    scaling: float,
    stable_gamma: float = 128.0,
    normalize: bool = True,
    subtract_init: bool = False,
    niter: Optional[int] = None,
    oversample: int = 16,
    generator: Optional[torch.Generator] = None,
) -> LoRAFactors:
    """LoRA-One: spectral init from the one-step full gradient; the adapter starts at a GD step.

    Zhang, Liu & Chen (2025), "LoRA-One: One-Step Full Gradient Could Suffice for Fine-Tuning Large
    Language Models, Provably and Efficiently", arXiv 2502.01235 (ICML 2025); reference code
    YuanheZ/LoRA-One ``run_exp.py`` ``reinit_lora_modules`` (``direction="LoRA-One"``,
    ``scale="stable"``, ``stable_gamma=128``, used with rsLoRA). With the SVD of the *negative*
    gradient ``-W_grad = U S V^T`` (``W_grad`` (..., m, n) = ``dL/dW``), ``d = S_1`` when
    ``normalize`` (the reference code) else ``d = 1`` (the paper's formula):

        ``lora_B = U_r diag(sqrt(S_r)) / sqrt(stable_gamma * d)``   (m, r),
        ``lora_A = diag(sqrt(S_r)) V_r^T / sqrt(stable_gamma * d)`` (r, n),
        ``sigma * lora_B @ lora_A = (sigma / (stable_gamma * d)) * [-W_grad]_r``,

    i.e. the adapter starts at one best-rank-``r`` gradient-descent step of size
    ``sigma / (stable_gamma * d)`` (equivalently ``B = -U'_r S_r^(1/2) / ...`` with ``U' S V^T`` the
    SVD of ``+W_grad``). The factors are balanced (``B^T B = A A^T``). No base subtraction by default
    (``base_delta = None``: the model moves by that step at initialization); ``subtract_init=True``
    returns ``base_delta = -sigma * B @ A`` instead.
    """
    op = "lora_one"
    _check_matrix("W_grad", W_grad, op)
    m, n = W_grad.shape[-2:]
    _check_rank(rank, m, n, op)
    scaling = _check_scaling(scaling, op)
    if not isinstance(stable_gamma, (int, float)) or isinstance(stable_gamma, bool) or not stable_gamma > 0:
        raise ValueError(f"{op}: stable_gamma must be a positive number, got {stable_gamma!r}")
    _check_generator(generator, op)
    U, S, V = _svd_topk(-W_grad.to(_work_dtype(W_grad.dtype)), rank, niter, oversample, generator, op)
    if normalize:
        top = S[..., :1]
        if bool((top <= 0).any()):
            raise ValueError(f"{op}: W_grad (shape {tuple(W_grad.shape)}) is zero for some layer; "
                             "cannot normalize by its largest singular value")
        S = S / top
    root = S.clamp_min(0).sqrt() / math.sqrt(stable_gamma)
    B = (U * root.unsqueeze(-2)).to(W_grad.dtype)
    A = (root.unsqueeze(-1) * V.mT).to(W_grad.dtype)
    return LoRAFactors(A, B, _residual(A, B, scaling) if subtract_init else None)


# ----------------------------------------------------------------------------------------------
# HRP: High-Rank Preheating
# ----------------------------------------------------------------------------------------------
def hrp_preheat_factors(
    m: int,
    n: int,
    rank_R: int,
    *,
    side: str = "A",
    row_norm: float = 1.0,
    batch_shape: Sequence[int] = (),
    generator: Optional[torch.Generator] = None,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> LoRAFactors:
    """The rank-``R`` preheat adapter of HRP: one random *frozen* factor, the trained factor at zero.

    HRP (Chen et al., 2025, "HRP: High-Rank Preheating for Superior LoRA Initialization", arXiv
    2502.07739) preheats with *asymmetric* LoRA: ``side="A"`` (for RSI) freezes a random
    ``lora_A`` (R, n) and trains ``lora_B`` (m, R) from 0; ``side="B"`` (for LSI) freezes a random
    ``lora_B`` (m, R) and trains ``lora_A`` (R, n) from 0.

    Choice of the frozen factor: Haar-random orthonormal rows (columns for ``side="B"``) times
    ``row_norm``, i.e. ``A A^T = row_norm^2 I_R`` (``Q`` from the QR of a Gaussian with the signs of
    ``diag(R)`` fixed). Reasons: (i) the row space is uniformly distributed, which is what the HRP
    theory assumes (``E[P_A] = (R/n) I``); (ii) the preheat problem for the trained factor is
    perfectly conditioned (its Gram is ``row_norm^2 I``) for every ``R`` up to full rank, whereas a
    Gaussian ``n x n`` factor has condition number ``~n`` and needs far more steps; (iii) with the
    default ``row_norm = 1`` the frozen factor is a partial isometry (``|A x| <= |x|``), so
    the preheat learning rate does not depend on ``R``. On matrix sensing with a full-rank preheat a
    few hundred Adam steps recover the target's top-``r`` subspace to a few hundredths of a radian
    (``tests/lorainit_kernels/test_hrp_theory.py``). Requires ``R <= n`` (``side="A"``) or ``R <= m``
    (``side="B"``). ``base_delta = None``.
    """
    op = "hrp_preheat_factors"
    if side not in ("A", "B"):
        raise ValueError(f"{op}: side must be 'A' (freeze lora_A, train lora_B; for RSI) or 'B' (for LSI), got {side!r}")
    shape, dev = _random_setup(m, n, rank_R, batch_shape, generator, dtype, device, op)
    dim = n if side == "A" else m
    if rank_R > dim:
        raise ValueError(f"{op}: rank_R={rank_R} exceeds {'n (in_features)' if side == 'A' else 'm (out_features)'}"
                         f"={dim}; the frozen factor cannot have {rank_R} orthonormal "
                         f"{'rows' if side == 'A' else 'columns'}")
    if not isinstance(row_norm, (int, float)) or isinstance(row_norm, bool) or not math.isfinite(row_norm) or row_norm <= 0:
        raise ValueError(f"{op}: row_norm must be a finite positive number, got {row_norm!r}")
    draw_dtype = _work_dtype(dtype)
    gdev = generator.device if generator is not None else dev

    def draw():
        X = torch.randn(dim, rank_R, generator=generator, dtype=draw_dtype, device=gdev)
        Q, Rr = torch.linalg.qr(X)
        sign = torch.sign(torch.diagonal(Rr))
        sign = torch.where(sign == 0, torch.ones_like(sign), sign)
        return ((Q * sign) * row_norm,)

    (Q,) = _per_layer_random(shape, draw)
    Q = Q.to(device=dev, dtype=dtype)
    if side == "A":
        return LoRAFactors(Q.mT.contiguous(), torch.zeros(*shape, m, rank_R, dtype=dtype, device=dev), None)
    return LoRAFactors(torch.zeros(*shape, rank_R, n, dtype=dtype, device=dev), Q, None)


def hrp(B_pre: Tensor, A_pre: Tensor, rank: int, *, side: str = "A", scale: float = 1.0) -> LoRAFactors:
    """HRP main initialization from the preheated factors: top-``r`` singular vectors of ``B_pre @ A_pre``.

    Chen et al. (2025), "HRP: High-Rank Preheating for Superior LoRA Initialization", arXiv
    2502.07739. With ``B_pre A_pre = U S V^T`` computed from the factors (``B_pre`` (..., m, R),
    ``A_pre`` (..., R, n); :func:`lorainit_kernels.linalg.products.svd_of_product`, QR of each
    factor and an R x R core SVD, never forming the m x n product):

    * RSI (``side="A"``, default): ``lora_A = scale * V[:, :r]^T``, ``lora_B = 0``;
    * LSI (``side="B"``): ``lora_B = scale * U[:, :r]``, ``lora_A = 0``.

    Only the directions are kept (orthonormal rows/columns, ``scale = 1``); the preheat adapter is
    discarded, the base weight is not changed (``base_delta = None``) and the optimizer restarts.
    Raises if ``B_pre @ A_pre`` has fewer than ``rank`` non-negligible singular values (e.g. an
    untrained, all-zero preheat factor), since its singular vectors would then be arbitrary.
    """
    op = "hrp"
    if side not in ("A", "B"):
        raise ValueError(f"{op}: side must be 'A' (RSI: keep V as lora_A) or 'B' (LSI: keep U as lora_B), got {side!r}")
    _check_matrix("B_pre", B_pre, op)
    _check_matrix("A_pre", A_pre, op)
    if B_pre.shape[-1] != A_pre.shape[-2] or B_pre.shape[:-2] != A_pre.shape[:-2]:
        raise ValueError(f"{op}: B_pre {tuple(B_pre.shape)} must be (..., m, R) and A_pre {tuple(A_pre.shape)} "
                         f"(..., R, n) with the same R and batch dims")
    m, R = B_pre.shape[-2:]
    n = A_pre.shape[-1]
    _check_int("rank", rank, op)
    if rank > min(m, n, R):
        raise ValueError(f"{op}: rank must be <= min(m, n, R) = min({m}, {n}, {R}) = {min(m, n, R)}, got rank={rank}")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"{op}: scale must be a finite positive number, got {scale!r}")
    U, S, V = svd_of_product(B_pre, A_pre, rank)
    tol = S[..., :1] * max(m, n, R) * torch.finfo(S.dtype).eps
    if bool((S[..., -1:] <= tol).any()):
        raise ValueError(f"{op}: B_pre @ A_pre (B_pre {tuple(B_pre.shape)}, A_pre {tuple(A_pre.shape)}) has fewer "
                         f"than rank={rank} non-negligible singular values (S = {S.flatten()[:8].tolist()}...); "
                         "was the preheat adapter trained?")
    out = torch.promote_types(B_pre.dtype, A_pre.dtype)
    batch = B_pre.shape[:-2]
    if side == "A":
        A = (scale * V.mT).contiguous().to(out)
        return LoRAFactors(A, torch.zeros(*batch, m, rank, dtype=out, device=B_pre.device), None)
    B = (scale * U).contiguous().to(out)
    return LoRAFactors(torch.zeros(*batch, rank, n, dtype=out, device=B_pre.device), B, None)


# ----------------------------------------------------------------------------------------------
# LoRA-DA
# ----------------------------------------------------------------------------------------------
def lora_da(
    Z: Tensor,
    G: Tensor,
    s: Tensor,
    rank: int,
    *,
    n_train: float,
    scaling: float,
    step_scale: float = defaults.STEP_SCALE,
    normalize_step: bool = defaults.NORMALIZE_STEP,
    preserve_output: bool = False,
    damping: float = defaults.DAMPING,
    bias_weight: float = defaults.BIAS_WEIGHT,
    variance_weight: float = defaults.VARIANCE_WEIGHT,
    fisher: bool = defaults.FISHER,
    solver: str = defaults.SOLVER,
    X: Optional[Tensor] = None,
    tol: Optional[float] = None,
    maxiter: Optional[int] = None,
    seeds=None,
    overwrite: bool = False,
) -> Tuple[LoRAFactors, Dict[str, Any]]:
    """LoRA-DA in PEFT form, from the K-FAC statistics of one (or a stack of) layer(s).

    Zhang et al. (2025), "LoRA-DA: Data-Aware Initialization for Low-Rank Adaptation via Asymptotic
    Analysis", arXiv 2510.24561; reference code zqy0126/LoRA-DA ``lora_da.py``. ``Z`` (..., n, n),
    ``G`` (..., m, n), ``s`` (..., m) as in docs/math.md. ``lorainit_kernels.linalg``
    computes the Fisher-gradient step ``dW = -diag(s_d)^-1 G Z_d^-1``, the guidance matrix
    ``Omega = beta (sum_i 1/s_d,i) / N Z_d^-1 - alpha dW^T dW`` and ``A`` (n, r), the orthonormal
    eigenvectors of its ``r`` smallest eigenvalues, and ``P = dW A`` (m, r). Then:

        ``lora_A = A^T``,   ``lora_B = eta * P / (sigma * nu)``,
        ``sigma * lora_B @ lora_A = (eta / nu) * dW A A^T``  (the step projected on span(A)),

    with ``eta = step_scale`` and ``nu = sigma_max(dW)`` when ``normalize_step`` (as the reference
    code does; scaling ``dW`` by ``1/nu`` and ``Omega`` by ``1/nu^2`` leaves the eigenvectors
    unchanged), else ``nu = 1``. ``preserve_output=True`` returns
    ``base_delta = -eta/nu * P A^T`` (fp32, fp64 for fp64 inputs, from the cast factors), so the
    model output is unchanged at initialization; otherwise ``base_delta = None``.

    Defaults come from ``lorainit_kernels.defaults`` (the same as ``lk.lora_da_factors`` and the
    trainer's ``LoRADAConfig``). ``solver`` is ``"auto"`` (dense ``eigh`` below the measured
    crossover ``defaults.EIGH_CROSSOVER_N``, LOBPCG above), ``"eigh"`` or ``"lobpcg"``; ``tol``,
    ``maxiter`` and ``seeds`` go to the LOBPCG.

    ``Z`` may be shared by the layers of the batch (a batch shape that broadcasts to ``G``'s, e.g.
    (n, n) for q/k/v stacked in ``G``), or be a ``lorainit_kernels.linalg.InputFactor`` built once by
    ``factor_input_cov`` for every call whose layers read that input: ``Z`` is then damped and
    Cholesky-factored once. ``overwrite=True`` lets the call use ``Z`` and ``G`` as workspace
    (contents unspecified afterwards; for callers that own them, like the trainer's means), so it
    allocates no (n, n) or (m, n) temporaries; by default they are left as they were.

    Returns ``(factors, info)``: ``info["evals"]`` (..., r) are the eigenvalues of ``Omega`` for
    ``A``, ``info["step_norm"]`` is ``nu`` (None without ``normalize_step``), and ``info["solver"]``
    is ``lora_da_factors``' solver info: for both solvers ``"solver"`` (the one used),
    ``"iterations"`` (batch shape, 0 for eigh), ``"converged"`` (..., r) and ``"residual"`` (..., r),
    ``||Omega a - lambda a|| / (||Omega||_2 + |lambda|)``.
    """
    op = "lora_da"
    if not isinstance(Z, _guidance.InputFactor):
        _check_matrix("Z", Z, op)
    _check_matrix("G", G, op)
    if not isinstance(s, Tensor) or s.dim() < 1:
        raise TypeError(f"{op}: s must be a tensor of shape (..., m), got {type(s).__name__ if not isinstance(s, Tensor) else tuple(s.shape)}")
    zshape = Z.shape if isinstance(Z, _guidance.InputFactor) else tuple(Z.shape)
    n = zshape[-1]
    m = G.shape[-2]
    if zshape[-2] != n or G.shape[-1] != n or s.shape[-1] != m:
        raise ValueError(f"{op}: expected Z (..., n, n), G (..., m, n), s (..., m); got Z {zshape}, "
                         f"G {tuple(G.shape)}, s {tuple(s.shape)}")
    _check_finite("s", s, op)
    _check_rank(rank, m, n, op)
    scaling = _check_scaling(scaling, op)
    if isinstance(step_scale, bool) or not isinstance(step_scale, (int, float)) or not math.isfinite(step_scale):
        raise ValueError(f"{op}: step_scale must be a finite number, got {step_scale!r}")
    kw = dict(n_train=n_train, damping=damping, bias_weight=bias_weight, variance_weight=variance_weight, fisher=fisher)
    A, P, evals, solver_info = _guidance.lora_da_factors(Z, G, s, rank, solver=solver, X=X, tol=tol, maxiter=maxiter,
                                                         seeds=seeds, return_info=True, step_norm=normalize_step,
                                                         overwrite=overwrite, **kw)
    info: Dict[str, Any] = {"evals": evals, "step_norm": None, "solver": solver_info}
    dt = _work_dtype(A.dtype)
    A, P = A.to(dt), P.to(dt)
    if normalize_step:
        nu = solver_info["step_norm"].to(dt)  # sigma_max(dW), computed by the solver beside Omega
        if bool((nu <= 0).any()) or not bool(torch.isfinite(nu).all()):
            raise ValueError(f"{op}: the Fisher-gradient step has largest singular value {nu.flatten().tolist()[:8]}; "
                             "cannot normalize (is G zero?)")
        P = P / nu[..., None, None]
        info["step_norm"] = nu
    out_dtype = G.dtype
    lora_A = A.mT.contiguous().to(out_dtype)
    lora_B = (step_scale * P / scaling).to(out_dtype)
    base_delta = _residual(lora_A, lora_B, scaling) if preserve_output else None
    return LoRAFactors(lora_A, lora_B, base_delta), info


def lora_da_embedding(z: Tensor, G: Tensor, s: Tensor, rank: int, *, n_train: float, scaling: float,
                      damping: float = defaults.DAMPING,
                      bias_weight: float = defaults.BIAS_WEIGHT, variance_weight: float = defaults.VARIANCE_WEIGHT,
                      fisher: bool = defaults.FISHER, normalize_step: bool = defaults.NORMALIZE_STEP,
                      solver: str = "auto", tol: Optional[float] = None,
                      maxiter: Optional[int] = None) -> Tuple[LoRAFactors, Dict[str, Any]]:
    """LoRA-DA of an embedding target from its diagonal statistics, without any n x n matrix.

    ``z`` (n,) token frequencies (``Z = diag(z)``), ``G`` (m, n), ``s`` (m,) as in docs/math.md.
    With ``z_d = z + damping mean(z)``, ``s_d = s + damping mean(s)``,
    ``dW = -diag(s_d)^-1 G diag(z_d)^-1`` (``-G`` without ``fisher``), ``c = beta sum(1/s_d) / N``:
    ``Omega = diag(c / z_d) - alpha dW^T dW``. A token that never occurs has a zero column in ``G`` and
    so in ``dW``: ``e_j`` is an eigenvector of ``Omega`` with the largest diagonal value ``c / z_d,j``,
    above every eigenvalue of the block of the occurring tokens (a diagonal minus a PSD matrix). The
    r smallest eigenpairs therefore come from that block, ``n_s x n_s`` (n_s = distinct tokens seen),
    completed with unseen ``e_j`` when ``n_s < r``; the block is solved densely (``eigh``) where
    ``linalg.choose_solver(n_s, r, device)`` says so (or ``solver="eigh"``) and otherwise by
    ``linalg.lobpcg`` on the operator ``diag(c / z_d) - alpha dW_s^T dW_s`` (``linalg.DiagonalMinusLowRank``).
    Same PEFT form as :func:`lora_da` at ``step_scale=1``: returns ``(LoRAFactors(lora_A (r, n),
    lora_B (m, r)), info)`` with ``scaling lora_B lora_A = dW A A^T / nu`` and ``info``: ``evals``
    (r,), ``solver``, ``iterations``, ``converged``, ``residual``, ``seen_tokens``, ``step_norm``
    (with ``normalize_step``).
    """
    from .linalg import lobpcg

    n = z.shape[0]
    dt = torch.float64
    z, s = z.to(dt), s.to(dt)
    zd = z + damping * z.mean()
    sd = s + damping * s.mean()
    seen = torch.nonzero(z > 0).flatten()
    unseen = torch.nonzero(z <= 0).flatten()
    if bool((zd <= 0).any()):
        raise ValueError(f"damping={damping}: {int(unseen.numel())} of the {n} tokens never occur in the samples, so "
                         f"Z = diag(token frequencies) is singular; use damping > 0")
    if bool((sd <= 0).any()):
        raise ValueError("the output-gradient second moment s is zero; the loss does not depend on this layer")
    Gs = G[:, seen].to(dt)
    dWs = -(Gs / sd[:, None]) / zd[seen][None, :] if fisher else -Gs
    c = variance_weight * float((1.0 / sd).sum()) / float(n_train)
    d = c / zd  # the diagonal of c Z_d^-1
    ds = d[seen]
    ns = int(seen.numel())
    k = min(rank, ns)
    info: Dict[str, Any] = {"seen_tokens": ns}
    use_eigh = k > 0 and (solver == "eigh" or _guidance.choose_solver(ns, k, G.device) == "eigh")
    if k == 0:
        vals, vecs = torch.zeros(0, dtype=dt), torch.zeros(0, 0, dtype=dt)
        info.update(solver="none", iterations=0, converged=True, residual=0.0)
    elif use_eigh:
        Om = torch.diag(ds) - bias_weight * (dWs.T @ dWs)
        ev, V = torch.linalg.eigh(Om)
        vals, vecs = ev[:k], V[:, :k]
        res = (Om @ vecs - vecs * vals).norm(dim=0) / (ev.abs().max() + vals.abs())
        info.update(solver="eigh", iterations=0, converged=True, residual=float(res.max()))
    else:
        op_dt = torch.float32 if G.dtype != torch.float64 else torch.float64
        Om = DiagonalMinusLowRank(ds.to(op_dt), dWs.to(op_dt).contiguous(), bias_weight)
        vals, vecs, linfo = lobpcg(Om, k, tol=tol, maxiter=maxiter, return_info=True)
        vals, vecs = vals.to(dt), vecs.to(dt)
        info.update(solver="lobpcg", iterations=int(torch.as_tensor(linfo["iterations"]).reshape(-1)[0]),
                    converged=bool(torch.as_tensor(linfo["converged"]).all()),
                    residual=float(torch.as_tensor(linfo["residual"]).max()))
    A = torch.zeros(n, rank, dtype=dt, device=G.device)
    A[seen, :k] = vecs
    evals = torch.empty(rank, dtype=dt, device=G.device)
    evals[:k] = vals
    if k < rank:  # fewer distinct tokens than the rank: the unseen e_j (all at the largest eigenvalue)
        fill = unseen[: rank - k]
        A[fill, torch.arange(k, rank, device=G.device)] = 1.0
        evals[k:] = d[fill]
    P = dWs @ A[seen]  # dW A: unseen columns of dW are zero
    nu = 1.0
    if normalize_step:
        nu = float(torch.linalg.matrix_norm(dWs, ord=2)) if ns else 0.0
        if not nu > 0 or not math.isfinite(nu):
            raise ValueError(f"the Fisher-gradient step has largest singular value {nu}; cannot normalize (is G zero?)")
        info["step_norm"] = nu
    info["evals"] = evals.float()
    return LoRAFactors(A.T.contiguous().float(), (P / (scaling * nu)).float()), info
