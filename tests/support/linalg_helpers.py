"""Shared float64 references and generators for the linalg tests (matrices with chosen spectra).

Everything here is plain torch/scipy in float64 with explicit inverses where convenient: it is the
tests' ground truth, never used by the library.
"""
from __future__ import annotations

import math

import numpy as np
import scipy.linalg as sla
import torch


def weighted_gram_backend() -> str:
    """"auto" when the default dispatch of ``weighted_gram`` runs here, else "torch".

    (While the compiled backend is being built the "auto" path may not import; the linalg tests are
    about the linear algebra, the kernels have their own tests.)
    """
    import lorainit_kernels as lk

    try:
        lk.weighted_gram(torch.ones(3, 2), torch.ones(3))
        return "auto"
    except ImportError:
        return "torch"


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def orthogonal(batch, n, g):
    Q, R = torch.linalg.qr(torch.randn(*batch, n, n, generator=g, dtype=torch.float64))
    return Q * torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))[..., None, :]


def with_spectrum(evals: torch.Tensor, g) -> torch.Tensor:
    """``Q diag(evals) Q^T`` for evals (*batch, n) (random orthogonal Q, one per matrix), float64."""
    Q = orthogonal(tuple(evals.shape[:-1]), evals.shape[-1], g)
    M = (Q * evals[..., None, :]) @ Q.transpose(-1, -2)
    return 0.5 * (M + M.transpose(-1, -2))


def spectrum(kind: str, n: int, k: int, g) -> torch.Tensor:
    """Named test spectra (ascending), float64; each keeps a gap after the k-th eigenvalue."""
    if kind.startswith("cond"):
        cond = float(kind[4:])
        ev = torch.logspace(0, math.log10(cond), n, dtype=torch.float64)  # geometric, smallest 1
        return ev
    if kind == "clustered":
        # k smallest within 1e-6 of each other, then a clear gap, then spread out to 1e3
        low = 1.0 + 1e-6 * torch.rand(k, generator=g, dtype=torch.float64)
        rest = torch.logspace(0.5, 3, n - k, dtype=torch.float64)
        return torch.cat([low, rest]).sort().values
    if kind == "repeated":
        low = torch.tensor([-2.0] * 3 + [-1.0] * (k - 3), dtype=torch.float64)
        rest = torch.linspace(1.0, 50.0, n - k, dtype=torch.float64)
        return torch.cat([low, rest])
    if kind == "indefinite":
        return torch.linspace(-5.0, 5.0, n, dtype=torch.float64) ** 3
    raise ValueError(kind)


def laplacian_1d(n: int) -> torch.Tensor:
    """The 1-D Dirichlet Laplacian tridiag(-1, 2, -1); eigenvalues 4 sin^2(j pi / (2 (n + 1)))."""
    A = 2.0 * torch.eye(n, dtype=torch.float64)
    i = torch.arange(n - 1)
    A[i, i + 1] = -1.0
    A[i + 1, i] = -1.0
    return A


def laplacian_1d_evals(n: int) -> torch.Tensor:
    j = torch.arange(1, n + 1, dtype=torch.float64)
    return 4.0 * torch.sin(j * math.pi / (2 * (n + 1))) ** 2


def scipy_eigh(A: torch.Tensor, lo: int, hi: int):
    """Eigenpairs ``lo..hi`` (inclusive, ascending) of every matrix of A (*batch, n, n) by scipy, float64."""
    batch = tuple(A.shape[:-2])
    n = A.shape[-1]
    flat = A.detach().double().reshape(-1, n, n).numpy()
    vals, vecs = [], []
    for M in flat:
        w, v = sla.eigh(M, subset_by_index=[lo, hi])
        vals.append(w)
        vecs.append(v)
    vals = torch.from_numpy(np.stack(vals)).reshape(*batch, hi - lo + 1)
    vecs = torch.from_numpy(np.stack(vecs)).reshape(*batch, n, hi - lo + 1)
    return vals, vecs


def sin_theta(U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """Sine of the largest principal angle between span(U) and span(V) (orthonormal columns), (*batch)."""
    U = torch.linalg.qr(U.double())[0]
    V = torch.linalg.qr(V.double())[0]
    D = V - U @ (U.transpose(-1, -2) @ V)          # (I - U U^T) V: accurate for small angles
    return torch.linalg.matrix_norm(D, ord=2)


def sin_max(U: torch.Tensor, V: torch.Tensor) -> float:
    """:func:`sin_theta` of one pair of bases as a float (the subspace comparisons of the method tests)."""
    return float(sin_theta(U, V))


def objective(A: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """``tr(V^T A V)`` in float64, (*batch)."""
    V = V.double()
    return (V * (A.double() @ V)).sum((-2, -1))


def ritz_bounds(A: torch.Tensor, V: torch.Tensor, lam_next: torch.Tensor, largest: bool = False):
    """Rigorous a-posteriori bounds for an orthonormal V (float64, exact A).

    With ``Theta = V^T A V``, ``R = A V - V Theta`` and the gap ``delta = lam_{k+1} - max eig(Theta)``
    (smallest case): Davis-Kahan ``sin(angle) <= ||R||_F / delta`` and
    ``tr(V^T A V) - sum_{i<=k} lam_i <= ||R||_F^2 / delta``. Returns (sin_bound, obj_bound, ||R||_F).
    """
    A = A.double()
    V = V.double()
    Th = V.transpose(-1, -2) @ A @ V
    R = A @ V - V @ Th
    rf = torch.linalg.matrix_norm(R)
    th = torch.linalg.eigvalsh(0.5 * (Th + Th.transpose(-1, -2)))
    delta = (th[..., 0] - lam_next) if largest else (lam_next - th[..., -1])
    delta = delta.clamp_min(1e-300)
    return rf / delta, rf * rf / delta, rf


def kfac_stats(batch, m, n, *, cond=1e3, seed=0, T=None, dtype=torch.float64):
    """Synthetic K-FAC statistics from T tokens: power-law inputs, gradients correlated with them."""
    g = gen(seed)
    T = T or 3 * n + 10
    lam = torch.logspace(0, -math.log10(cond), n, dtype=torch.float64)
    Q = orthogonal(batch, n, g)
    x = torch.randn(*batch, T, n, generator=g, dtype=torch.float64) @ (Q * lam.sqrt()).transpose(-1, -2)
    Wt = torch.randn(*batch, n, m, generator=g, dtype=torch.float64) / math.sqrt(n)
    gr = x @ Wt + 0.1 * torch.randn(*batch, T, m, generator=g, dtype=torch.float64)
    Z = x.transpose(-1, -2) @ x / T
    G = gr.transpose(-1, -2) @ x / T
    s = (gr * gr).mean(-2)
    return Z.to(dtype), G.to(dtype), s.to(dtype)


def reference_guidance(Z, G, s, *, n_train, damping=1e-3, alpha=1.0, beta=1.0, fisher=True):
    """docs/math.md in float64 with explicit inverses: returns (Omega, dW)."""
    Z, G, s = Z.double(), G.double(), s.double()
    n = Z.shape[-1]
    Zs = 0.5 * (Z + Z.transpose(-1, -2))
    Zd = Zs + damping * Zs.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None] * torch.eye(n, dtype=torch.float64)
    sd = s + damping * s.mean(-1, keepdim=True)
    # Z_d is SPD: its inverse from the Cholesky factor (MKL's LU path, getrf + laswp, was seen to fail
    # spuriously under a loaded full-suite run with "Parameter 6 was incorrect on entry to DLASWP")
    Zi = torch.cholesky_inverse(torch.linalg.cholesky(Zd))
    Zi = 0.5 * (Zi + Zi.transpose(-1, -2))
    dW = -(G @ Zi) / sd[..., :, None] if fisher else -G
    c = beta * (1.0 / sd).sum(-1) / n_train
    Om = c[..., None, None] * Zi - alpha * dW.transpose(-1, -2) @ dW
    return 0.5 * (Om + Om.transpose(-1, -2)), dW
