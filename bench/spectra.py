"""Generators of realistic LoRA-DA statistics and guidance matrices for the linalg benchmarks.

A layer ``y = W x`` (``W`` (m, n)) seen through K-FAC statistics (docs/math.md):

* inputs with a power-law covariance ``Z = Q diag(lambda) Q^T``, ``lambda_i ~ i^-a`` scaled to a
  chosen condition number (~1e4 for transformer hidden states);
* output gradients correlated with the inputs: ``g = W_* x + e`` with ``W_*`` (m, n) of decaying
  singular values (a low effective rank target direction) and isotropic noise ``e``, so that
  ``G = E[g x^T] = W_* Z`` and ``s = E[g * g] = diag(W_* Z W_*^T) + sigma^2``;
* ``Omega`` from ``lorainit_kernels.guidance_matrix`` with N training tokens.

Everything is drawn from a ``torch.Generator`` seeded by the caller, in float64.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch
from torch import Tensor


def random_orthogonal(batch: Sequence[int], n: int, gen: torch.Generator) -> Tensor:
    """Random orthogonal matrices (*batch, n, n), float64, in O(n^2) per matrix.

    The orthonormal DCT-II basis with randomly permuted rows and columns and random column signs:
    exactly orthogonal, dense and unstructured as far as an eigensolver is concerned, and cheap
    enough for n = 4096 batches (a Haar QR costs O(n^3) per matrix).
    """
    i = torch.arange(n, dtype=torch.float64)
    C = torch.cos(math.pi * (i[:, None] + 0.5) * i[None, :] / n) * math.sqrt(2.0 / n)
    C[:, 0] = 1.0 / math.sqrt(n)
    b = math.prod(batch)
    out = torch.empty(b, n, n, dtype=torch.float64)
    for j in range(b):
        rows = torch.randperm(n, generator=gen)
        cols = torch.randperm(n, generator=gen)
        signs = torch.randint(0, 2, (n,), generator=gen, dtype=torch.float64) * 2 - 1
        out[j] = C[rows][:, cols] * signs
    return out.reshape(*batch, n, n)


def with_spectrum(evals: Tensor, gen: torch.Generator) -> Tensor:
    """Symmetric ``Q diag(evals) Q^T`` for ``evals`` (*batch, n), Haar ``Q``; float64."""
    Q = random_orthogonal(tuple(evals.shape[:-1]), evals.shape[-1], gen)
    M = (Q * evals[..., None, :]) @ Q.transpose(-1, -2)
    return 0.5 * (M + M.transpose(-1, -2))


def power_law(n: int, cond: float) -> Tensor:
    """``lambda_i = i^-a`` (i = 1..n) with ``lambda_1 / lambda_n = cond``, float64, descending."""
    a = math.log(cond) / math.log(n) if n > 1 else 0.0
    return torch.arange(1, n + 1, dtype=torch.float64) ** (-a)


def kfac_stats(
    batch: Sequence[int], m: int, n: int, *, cond: float = 1e4, target_decay: float = 1.0,
    noise: float = 0.3, seed: int = 0,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Population K-FAC statistics ``(Z, G, s)`` of a layer with power-law inputs (float64).

    ``Z`` (*batch, n, n) has condition number ``cond``; ``W_*`` has singular values ``j^-target_decay``
    (normalized to 1), random singular vectors; gradient noise std ``noise`` (relative to the
    typical ``W_* x`` size).
    """
    gen = torch.Generator().manual_seed(seed)
    batch = tuple(batch)
    lam = power_law(n, cond).expand(*batch, n)
    Qz = random_orthogonal(batch, n, gen)
    Z = (Qz * lam[..., None, :]) @ Qz.transpose(-1, -2)
    Z = 0.5 * (Z + Z.transpose(-1, -2))
    r = min(m, n)
    sv = torch.arange(1, r + 1, dtype=torch.float64) ** (-target_decay)
    U = random_orthogonal(batch, m, gen)[..., :, :r]
    V = random_orthogonal(batch, n, gen)[..., :, :r]
    Wstar = (U * sv) @ V.transpose(-1, -2)
    G = Wstar @ Z
    signal = (Wstar @ Z * Wstar).sum(-1)                     # diag(W Z W^T)
    sigma2 = (noise ** 2) * signal.mean(-1, keepdim=True)
    s = signal + sigma2
    return Z, G, s


def guidance(
    batch: Sequence[int], n: int, *, m: int = None, cond: float = 1e4, variance_ratio: float = 1.0,
    n_train: float = None, seed: int = 0, damping: float = 1e-3,
) -> Tuple[Tensor, Tuple[Tensor, Tensor, Tensor], float]:
    """A realistic LoRA-DA guidance matrix ``Omega`` (*batch, n, n) (float64), its statistics and N.

    Unless ``n_train`` is given, N is chosen so that the variance term's norm ``c ||Z_d^-1||`` is
    ``variance_ratio`` times the bias term's ``alpha ||dW||^2`` (of the first matrix): with ratio ~1
    the two terms compete and ``Omega`` is indefinite with a wide spectrum (the hard regime;
    ratio -> 0 is the few-token regime where the bias term dominates and LOBPCG converges fast).
    """
    import lorainit_kernels as lk

    Z, G, s = kfac_stats(batch, m or n, n, cond=cond, seed=seed)
    if n_train is None:
        flat = lambda t: t.reshape(-1, *t.shape[len(batch):])[0]  # noqa: E731
        Z0, G0, s0 = flat(Z), flat(G), flat(s)
        lam_min = float(power_law(n, cond)[-1] + damping * Z0.diagonal().mean())   # lambda_min(Z_d)
        sd = s0 + damping * s0.mean()
        Zd = Z0 + damping * Z0.diagonal().mean() * torch.eye(n, dtype=Z.dtype)
        dW = -torch.cholesky_solve(G0.T, torch.linalg.cholesky(Zd)).T / sd[:, None]
        v = torch.randn(n, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        for _ in range(30):                                               # ||dW||_2^2 by power iteration
            v = dW.T @ (dW @ v)
            v = v / v.norm()
        bias = float((dW @ v).norm() ** 2)
        var_unit = float((1.0 / sd).sum()) / lam_min                     # c ||Z_d^-1|| at N = 1
        n_train = var_unit / (variance_ratio * bias)
    Om, _ = lk.guidance_matrix(Z, G, s, n_train=n_train, damping=damping, backend="torch")
    return Om, (Z, G, s), n_train


def fast_guidance(
    batch: Sequence[int], n: int, *, cond: float = 1e4, variance_ratio: float = 1.0, target_rank: int = 64,
    damping: float = 1e-3, seed: int = 0, dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The same model as ``guidance`` (square layer, m = n) in closed form, for large benchmarks.

    With ``Z = Q diag(lambda) Q^T`` and a rank-``target_rank`` target ``W_* = U diag(j^-1) V^T``, the
    gradient statistics are ``G = W_* Z`` exactly, so ``dW = -D W_* Z Z_d^-1`` and
    ``Omega = Q [c (Lambda + d)^-1 - alpha B^T B] Q^T`` with ``B = dW Q`` (m x n, rank target_rank):
    one dense n^3 product per matrix instead of ~10 (``guidance`` goes through the Cholesky path).
    N is set so that the variance term is ``variance_ratio`` times the bias term in norm.
    Returns Omega (*batch, n, n) in ``dtype``, symmetric.
    """
    gen = torch.Generator().manual_seed(seed)
    batch = tuple(batch)
    b = math.prod(batch)
    lam = power_law(n, cond)
    d = damping * lam.mean()                                # mean(diag Z) = mean(lambda)
    lam_d = lam + d
    r = min(target_rank, n)
    sv = torch.arange(1, r + 1, dtype=torch.float64) ** -1.0
    Q = random_orthogonal((b,), n, gen)
    out = torch.empty(b, n, n, dtype=dtype)
    for j in range(b):
        U = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64))[0]
        Vq = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64))[0]   # V in Q's basis
        # in Q's basis: Z = diag(lam); W_* Q = U sv Vq^T;  signal_i = sum_j (U sv Vq^T)_ij^2 lam_j
        WQ_lr = U * sv                                                  # (n, r); W_* Q = WQ_lr @ Vq^T
        signal = ((WQ_lr @ (Vq.T * lam.sqrt())) ** 2).sum(-1)
        s = signal * (1 + 0.09)                                         # 30% relative gradient noise
        sd = s + damping * s.mean()
        # B = dW Q = -D W_* Q diag(lam / lam_d)   (rank r)
        Bl = -(WQ_lr / sd[:, None])                                     # (n, r)
        Br = Vq.T * (lam / lam_d)                                       # (r, n)
        core = Br.T @ (Bl.T @ Bl) @ Br                                  # B^T B = Br^T Bl^T Bl Br  (n, n)
        bias = float(torch.linalg.eigvalsh(Bl.T @ Bl @ (Br @ Br.T))[-1].clamp_min(0)) if r else 0.0
        csum = float((1.0 / sd).sum())
        N = csum / float(lam_d.min()) / (variance_ratio * max(bias, 1e-300))
        c = csum / N
        Mq = torch.diag(c / lam_d) - core
        Om = Q[j] @ Mq @ Q[j].T
        out[j] = (0.5 * (Om + Om.T)).to(dtype)
    return out.reshape(*batch, n, n)
