"""Fast (randomized) PiSSA vs exact PiSSA: time ratio and accuracy of the principal subspace.

``lorainit_kernels.methods.pissa(W, r, niter=k)`` (randomized range finder with ``k`` subspace
iterations, PEFT's ``"pissa_niter_k"``) against ``pissa(W, r)`` (exact ``torch.linalg.svd``) on a
square fp32 matrix with a realistic, slowly decaying power-law spectrum ``sigma_i = (i + 1)^-1/2``
(the flat head of pretrained LLM weights; the hard case for randomized SVD, ``sigma_17/sigma_16 =
0.97``) and a faster one ``sigma_i = (i + 1)^-1``. Columns: wall time (median), speedup over the
exact SVD measured in the same run, the largest principal angle between the fast and exact rank-r
singular subspaces (max over the left and right ones), the relative error of the rank-r adapter
``|fast - exact|_F / |exact|_F``, and the excess residual ``|W - fast|_F / |W - exact|_F - 1``
(0 = as good as the best rank-r approximation, Eckart-Young).
"""
from __future__ import annotations

import torch

from bench.common import timeit
from lorainit_kernels import methods as M


def _matrix(n: int, alpha: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(n, n, generator=g)).Q
    V = torch.linalg.qr(torch.randn(n, n, generator=g)).Q
    s = (torch.arange(n, dtype=torch.float32) + 1) ** -alpha
    return (U * s) @ V.T


def _angle(X: torch.Tensor, Y: torch.Tensor) -> float:
    """Largest principal angle between the column spans of X and Y (orthonormal columns), radians."""
    X, Y = X.double(), Y.double()
    resid = Y - X @ (X.T @ Y)
    return float(torch.asin(torch.linalg.matrix_norm(resid, ord=2).clamp(max=1.0)))


def _orth(t: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(t.double()).Q


def run(quick: bool = False) -> dict:
    n = 512 if quick else 4096
    r = 16
    sigma = 1.0
    repeats_exact = 2 if quick else 1
    rows = []
    notes = [f"W: {n}x{n} fp32, rank r={r}, threads={torch.get_num_threads()}. Exact = torch.linalg.svd "
             f"(timed {repeats_exact}x); fast = methods.randomized_svd (Halko et al. 2011), q = r + oversample; "
             "oversample=0 is PEFT's pissa_niter_k (torch.svd_lowrank with q = r)."]
    for alpha in (0.5, 1.0):
        W = _matrix(n, alpha, seed=0)
        holder = {}
        t_exact = timeit(lambda: holder.__setitem__("f", M.pissa(W, r, scaling=sigma)), repeats=repeats_exact, warmup=0)
        exact = holder["f"]
        ex_delta = exact.adapter_delta(sigma).double()
        res_exact = float(torch.linalg.norm(W.double() - ex_delta))
        Ue, Ve = _orth(exact.lora_B), _orth(exact.lora_A.T)
        rows.append({"spectrum": f"(i+1)^-{alpha:g}", "method": "exact", "niter": "-", "oversample": "-",
                     "time_s": t_exact["median"], "speedup": 1.0, "max_angle_rad": 0.0, "rel_err": 0.0,
                     "excess_residual": 0.0})
        for niter in (2, 4, 8):
            for over in (0, 8, 16):
                g = torch.Generator().manual_seed(1)
                t = timeit(lambda: holder.__setitem__(
                    "f", M.pissa(W, r, scaling=sigma, niter=niter, oversample=over, generator=g)), repeats=3, warmup=1)
                fast = holder["f"]
                delta = fast.adapter_delta(sigma).double()
                ang = max(_angle(Ue, _orth(fast.lora_B)), _angle(Ve, _orth(fast.lora_A.T)))
                rows.append({
                    "spectrum": f"(i+1)^-{alpha:g}", "method": "fast", "niter": niter, "oversample": over,
                    "time_s": t["median"], "speedup": t_exact["median"] / t["median"], "max_angle_rad": ang,
                    "rel_err": float(torch.linalg.norm(delta - ex_delta) / torch.linalg.norm(ex_delta)),
                    "excess_residual": float(torch.linalg.norm(W.double() - delta)) / res_exact - 1.0,
                })
        del W
    gap = lambda a: ((r + 1) / r) ** -a  # noqa: E731
    notes.append(f"sigma_(r+1)/sigma_r = {gap(0.5):.3f} (alpha 0.5) and {gap(1.0):.3f} (alpha 1): with such small "
                 "gaps the rank-r subspace itself is ill-conditioned, so a sizeable angle can coexist with a "
                 "near-zero excess residual; excess_residual is the criterion that matters for PiSSA.")
    return {
        "title": f"Fast vs exact PiSSA ({n}x{n}, r={r})",
        "columns": ["spectrum", "method", "niter", "oversample", "time_s", "speedup", "max_angle_rad", "rel_err",
                    "excess_residual"],
        "rows": rows,
        "notes": notes,
    }
