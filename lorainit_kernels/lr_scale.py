"""How far one Adam step moves the adapted weight, and the learning-rate scale that follows from it.

An initialization changes what one optimizer step does in weight space. With ``W' = W + s B A``
(PEFT's scaling ``s``, ``A`` ``(r, n)``, ``B`` ``(m, r)``) a step ``(dA, dB)`` moves the weight by

    dW = s (B dA + dB A)      (to first order)

and an Adam step has entries of about the same size, ``lr``, whatever the gradient's scale: its
first step is ``-lr * sign(grad)``. Taking the signs as independent (they are for a fresh random
``A``), ``E ||dW||_F^2 = lr^2 * rho^2`` with

    rho^2 = s^2 (n ||B||_F^2 [B trained, A trained] + m ||A||_F^2 [A shapes the B step])

where each term counts only when the factor it multiplies is trained (``n ||B||^2`` comes from ``dA``,
``m ||A||^2`` from ``dB``). Plain LoRA (PEFT's ``init_lora_weights=True``: ``A ~ U(-1/sqrt(n), 1/sqrt(n))``
by ``kaiming_uniform_(a=sqrt(5))``, ``B = 0``) gives in expectation ``rho_ref^2 = s^2 m r / 3``;
an embedding adapter (``A = 0``, ``B ~ N(0, 1)``) gives ``rho_ref^2 = s^2 n m r``.

The learning-rate scale of an init is the factor that makes its first Adam step as large, over all
target layers together, as plain LoRA's at the same rate, and never above 1:

    lr_scale = min(1, sqrt(sum_l rho_ref,l^2 / sum_l rho_l^2))

so an init whose factors are large (PiSSA: ``||A||^2 = ||B||^2 = sum of the top r singular values / s``)
gets a smaller rate. The cap: Adam moves every entry by about ``lr`` per step whatever the init, so
after a few steps the factors of an init smaller than plain LoRA's (LoRA-One's) are as large as
plain LoRA's, and its rate is plain LoRA's (measured: without the cap LoRA-One's suggested rate was
about 10x its tuned one). This is the weight-space step size argument of "Learning Rate Matters"
(arXiv 2602.04998: the spectral inits need rates several times smaller than LoRA's) reduced to the
norms of the factors; the experiments (docs/learning-rate.md) measure how well it predicts each init's
tuned rate.
"""
from __future__ import annotations

import math
from typing import Iterable, Tuple

import torch
from torch import Tensor

__all__ = ["adam_step_norm_sq", "plain_lora_step_norm_sq", "lr_scale_from_norms"]


def adam_step_norm_sq(lora_A: Tensor, lora_B: Tensor, scaling: float, *, train_A: bool = True,
                      train_B: bool = True) -> Tensor:
    """``rho^2 = s^2 (n ||B||_F^2 [train_A] + m ||A||_F^2 [train_B])`` per adapter (leading dims batch).

    ``lora_A`` ``(..., r, n)``, ``lora_B`` ``(..., m, r)`` in PEFT's layout; returns a float64 tensor of
    the leading shape: the expected squared Frobenius norm of the weight change of one unit-rate
    sign-like Adam step.
    """
    if lora_A.dim() < 2 or lora_B.dim() < 2:
        raise ValueError(f"adam_step_norm_sq: lora_A and lora_B must be at least 2-D, got {tuple(lora_A.shape)} and "
                         f"{tuple(lora_B.shape)}")
    r, n = lora_A.shape[-2:]
    m, rb = lora_B.shape[-2:]
    if rb != r or lora_A.shape[:-2] != lora_B.shape[:-2]:
        raise ValueError(f"adam_step_norm_sq: lora_A {tuple(lora_A.shape)} and lora_B {tuple(lora_B.shape)} do not "
                         f"form an adapter (need (..., r, n) and (..., m, r))")
    if not math.isfinite(scaling) or scaling == 0:
        raise ValueError(f"adam_step_norm_sq: scaling must be finite and non-zero, got {scaling}")
    a2 = lora_A.detach().to(torch.float64).square().sum((-2, -1))
    b2 = lora_B.detach().to(torch.float64).square().sum((-2, -1))
    out = torch.zeros_like(a2)
    if train_A:
        out = out + n * b2
    if train_B:
        out = out + m * a2
    return scaling ** 2 * out


def plain_lora_step_norm_sq(m: int, n: int, r: int, scaling: float, *, embedding: bool = False) -> float:
    """``rho_ref^2`` of PEFT's default init in expectation: ``s^2 m r / 3`` (linear), ``s^2 n m r`` (embedding)."""
    if min(m, n, r) < 1:
        raise ValueError(f"plain_lora_step_norm_sq: m, n, r must be >= 1, got {m}, {n}, {r}")
    return float(scaling) ** 2 * (n * m * r if embedding else m * r / 3.0)


def lr_scale_from_norms(pairs: Iterable[Tuple[float, float]]) -> float:
    """``min(1, sqrt(sum rho_ref^2 / sum rho^2))`` over ``(rho_ref^2, rho^2)`` pairs, one per layer.

    Raises ``ValueError`` when the init's step is zero in every layer (no trainable factor moves the
    weight: e.g. ``A = 0`` and ``B = 0``), where no finite scale exists.
    """
    ref = got = 0.0
    for r2, g2 in pairs:
        ref += float(r2)
        got += float(g2)
    if not (math.isfinite(ref) and math.isfinite(got)):
        raise ValueError(f"lr_scale_from_norms: non-finite step norms (reference {ref}, init {got})")
    if got <= 0.0:
        raise ValueError("lr_scale_from_norms: the init's first Adam step does not move any weight "
                         "(every trained factor multiplies a zero factor); no learning-rate scale exists")
    return min(1.0, math.sqrt(ref / got))
