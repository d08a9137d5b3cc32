"""LoRA-DA's Initialization Guidance Matrix and the per-layer LoRA-DA factors.

LoRA-DA (Zhang et al., 2025, "LoRA-DA: Data-Aware Initialization for Low-Rank Adaptation via
Asymptotic Analysis", arXiv 2510.24561), in torch orientation (DESIGN.md section 2). For one layer
``W`` (m, n) with K-FAC statistics ``Z`` (n, n), ``G`` (m, n), ``s`` (m,):

* relative damping: ``Z_d = Z + delta * mean(diag Z) * I``, ``s_d = s + delta * mean(s)``;
* Fisher-gradient step: ``dW = -diag(s_d)^-1 G Z_d^-1`` (``dW = -G`` with ``fisher=False``);
* guidance matrix: ``Omega = beta * (sum_i 1/s_d,i) / N * Z_d^-1 - alpha * dW^T dW``;
* ``A`` = orthonormal eigenvectors of ``Omega`` for its ``r`` smallest eigenvalues, ``P = dW A``.

No explicit inverse is formed for the computation: ``Z_d`` is factored once (``cholesky_ex``, info
checked, retried in fp64) and ``Z_d^-1`` is applied with ``cholesky_solve``. ``Omega`` is assembled
from the identity ``Omega = Z_d^-1 (c Z_d - alpha G^T D^2 G) Z_d^-1 = c Z_d^-1 - alpha H^T D^2 H``
(``D = diag(s_d)^-1``, ``c = beta sum_i 1/s_d,i / N``, ``H = G Z_d^-1``) as the fused weighted Gram
``ops.weighted_gram(H, -alpha / s_d^2)`` plus ``c Z_d^-1`` (Omega's own term, by ``cholesky_inverse``).
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from .. import defaults, ops
from ._common import batch_index, chol_solve
from .lobpcg import lobpcg, shift_invert_preconditioner

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_scalar(op: str, name: str, val, *, positive: bool = False) -> float:
    if isinstance(val, bool) or not isinstance(val, (int, float)):
        raise TypeError(f"{op}: {name} must be a real number, got {type(val).__name__} {val!r}")
    val = float(val)
    if not math.isfinite(val) or val < 0 or (positive and val == 0):
        need = "> 0" if positive else ">= 0"
        raise ValueError(f"{op}: {name} must be finite and {need}, got {val!r}")
    return val


def _check_inputs(op, Z, G, s, n_train, damping, bias_weight, variance_weight):
    """Validate the statistics and the scalar knobs; returns (batch, m, n, dtype, scalars)."""
    for name, t, nd in (("Z", Z, 2), ("G", G, 2), ("s", s, 1)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{op}: {name} must be a floating tensor, got {t.dtype} with shape {tuple(t.shape)}")
        if t.dim() < nd:
            raise ValueError(f"{op}: {name} must have at least {nd} dims, got shape {tuple(t.shape)}")
    if Z.shape[-1] != Z.shape[-2]:
        raise ValueError(f"{op}: Z must be square (..., n, n), got shape {tuple(Z.shape)}")
    n = Z.shape[-1]
    batch = tuple(Z.shape[:-2])
    if G.shape[-1] != n or tuple(G.shape[:-2]) != batch:
        raise ValueError(f"{op}: G has shape {tuple(G.shape)}, expected (*{batch}, m, {n}) to match Z {tuple(Z.shape)}")
    m = G.shape[-2]
    if tuple(s.shape) != batch + (m,):
        raise ValueError(f"{op}: s has shape {tuple(s.shape)}, expected {batch + (m,)} to match G {tuple(G.shape)}")
    if G.device != Z.device or s.device != Z.device:
        raise ValueError(f"{op}: Z, G, s must be on one device, got {Z.device}, {G.device}, {s.device}")
    if n == 0 or m == 0:
        raise ValueError(f"{op}: empty statistics: Z {tuple(Z.shape)}, G {tuple(G.shape)}")
    for name, t, tail in (("Z", Z, n * n), ("G", G, m * n), ("s", s, m)):
        bad = ~torch.isfinite(t.reshape(-1, tail)).all(dim=-1)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"{op}: {name} {tuple(t.shape)} has NaN/Inf entries at batch index {batch_index(i, batch)}")
    neg = (s.reshape(-1, m) < 0).any(dim=-1)
    if bool(neg.any()):
        i = int(neg.nonzero()[0, 0])
        raise ValueError(f"{op}: s {tuple(s.shape)} (mean squared gradients) has negative entries at batch index "
                         f"{batch_index(i, batch)}")
    if isinstance(n_train, bool) or not isinstance(n_train, (int, float)) or not n_train > 0 or not math.isfinite(n_train):
        raise ValueError(f"{op}: n_train (number of training tokens N) must be a finite number > 0, got {n_train!r}")
    damping = _check_scalar(op, "damping", damping)
    alpha = _check_scalar(op, "bias_weight", bias_weight)
    beta = _check_scalar(op, "variance_weight", variance_weight)
    dtype = torch.promote_types(torch.promote_types(Z.dtype, G.dtype), s.dtype)
    if dtype not in (torch.float32, torch.float64):
        dtype = torch.float32
    return batch, m, n, dtype, float(n_train), damping, alpha, beta


def _damp(Z: Tensor, s: Tensor, damping: float) -> Tuple[Tensor, Tensor]:
    """``Z_d = Z + delta mean(diag Z) I`` and ``s_d = s + delta mean(s)`` (relative damping)."""
    Zs = 0.5 * (Z + Z.transpose(-1, -2))
    zd = Zs.diagonal(dim1=-2, dim2=-1)
    Zd = Zs + torch.diag_embed((damping * zd.mean(-1, keepdim=True)).expand_as(zd))
    sd = s + damping * s.mean(-1, keepdim=True)
    return Zd, sd


def _cholesky(op: str, Zd: Tensor, batch) -> Tensor:
    """Lower Cholesky factor of ``Z_d``; failures are retried in fp64, then reported by batch index."""
    L, info = torch.linalg.cholesky_ex(Zd)
    if not bool((info > 0).any()):
        return L
    L64, info64 = torch.linalg.cholesky_ex(Zd.double())
    bad = (info64.reshape(-1) > 0).nonzero()
    if bad.numel():
        i = int(bad[0, 0])
        raise ValueError(f"{op}: the damped input covariance Z_d = Z + damping*mean(diag Z)*I {tuple(Zd.shape)} is not "
                         f"positive definite (also in float64) at batch index {batch_index(i, batch)}; "
                         f"increase damping")
    return L64


class _Prepared:
    """Everything both the guidance matrix and the factors need: damped stats, factor, dW, c."""

    def __init__(self, op, Z, G, s, n_train, damping, bias_weight, variance_weight, fisher):
        batch, m, n, dtype, N, delta, alpha, beta = _check_inputs(
            op, Z, G, s, n_train, damping, bias_weight, variance_weight)
        self.batch, self.m, self.n, self.dtype = batch, m, n, dtype
        self.alpha, self.beta, self.fisher = alpha, beta, fisher
        Zd, sd = _damp(Z.to(dtype), s.to(dtype), delta)
        Gw = G.to(dtype)
        bad = ~(sd.reshape(-1, m) > 0).all(dim=-1)
        if (fisher or beta > 0) and bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"{op}: the damped output second moment s_d = s + damping*mean(s) {tuple(s.shape)} has "
                             f"non-positive entries at batch index {batch_index(i, batch)} (zero gradients with "
                             f"damping={delta}); increase damping")
        self.Zd, self.sd, self.G = Zd, sd, Gw
        need_z = fisher or beta > 0
        self.L = _cholesky(op, Zd, batch) if need_z else None
        # c = beta * sum_i 1/s_d,i / N: the weight of Z_d^-1 in Omega (the variance term)
        self.c = (beta * (1.0 / sd).sum(-1) / N) if beta > 0 else torch.zeros(batch, dtype=dtype, device=Z.device)
        if fisher:
            # H = G Z_d^-1 = (Z_d^-1 G^T)^T;  dW = -diag(s_d)^-1 H
            self.H = chol_solve(Gw.transpose(-1, -2), self.L).transpose(-1, -2)
            self.dW = -(self.H / sd[..., :, None])
        else:
            self.dW = -Gw

    def omega(self, backend) -> Tensor:
        """Assemble ``Omega`` (..., n, n) with the fused weighted Gram, symmetrized.

        ``Omega = c Z_d^-1 - alpha dW^T dW = c Z_d^-1 + sum_i (-alpha / s_d,i^2) h_i h_i^T`` with
        ``h_i`` the rows of ``H = G Z_d^-1`` (fisher) or of ``G`` (``fisher=False``, weights ``-alpha``).
        This is DESIGN.md's identity ``Z_d^-1 (c Z_d - alpha G^T D^2 G) Z_d^-1`` with the solves
        applied to ``G`` before the Gram instead of after it: the same weighted-Gram kernel, but the
        cancellation inside ``c Z_d - alpha G^T D^2 G`` is not amplified by ``kappa(Z_d)^2`` (in fp32
        the solve-after form loses two more digits on realistic statistics, where ``G ~ W Z``).
        ``c Z_d^-1`` is Omega's own variance term, computed from the Cholesky factor.
        """
        if self.fisher:
            w = (-self.alpha) / (self.sd * self.sd)
            Om = ops.weighted_gram(self.H, w, backend=backend).to(self.dtype)
        else:
            w = torch.full(self.sd.shape, -self.alpha, dtype=self.dtype, device=self.G.device)
            Om = ops.weighted_gram(self.G, w, backend=backend).to(self.dtype)
        if self.beta > 0:
            Om = Om + self.c[..., None, None] * torch.cholesky_inverse(self.L).to(self.dtype)
        return 0.5 * (Om + Om.transpose(-1, -2))

    def operator(self) -> Callable[[Tensor], Tensor]:
        """``X -> Omega X = c Z_d^-1 X - alpha dW^T (dW X)`` for X (..., n, p), without forming Omega."""
        c = self.c[..., None, None]
        dW, dWt, alpha, L, beta = self.dW, self.dW.transpose(-1, -2), self.alpha, self.L, self.beta

        def apply(X: Tensor) -> Tensor:
            out = -alpha * (dWt @ (dW @ X))
            if beta > 0:
                out = out + c * chol_solve(X, L)
            return out

        return apply

    def step_norm(self) -> Tuple[Tensor, Tensor]:
        """``sigma_max(dW)`` per matrix (fp64, batch shape) and its right singular vector (..., n, 1).

        LOBPCG (largest, k = 1) on the smaller Gram operator (``dW^T dW`` or ``dW dW^T``) in float64,
        tol 1e-10: two thin products per step, no SVD.
        """
        dW = self.dW.double()
        m, n = self.m, self.n
        if m < n:
            op = lambda X: dW @ (dW.transpose(-1, -2) @ X)                         # noqa: E731
            size = m
        else:
            op = lambda X: dW.transpose(-1, -2) @ (dW @ X)                         # noqa: E731
            size = n
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lam, u = lobpcg(op, 1, largest=True, n=size, batch_shape=self.batch, dtype=torch.float64,
                            device=dW.device, tol=1e-10, maxiter=500)
        lam = lam[..., 0].clamp_min(0)
        nu = lam.sqrt()
        if m < n:   # u is a left singular vector: v = dW^T u / nu
            v = dW.transpose(-1, -2) @ u
            v = v / v.norm(dim=-2, keepdim=True).clamp_min(1e-300)
        else:
            v = u
        return nu, v


def guidance_matrix(
    Z: Tensor,
    G: Tensor,
    s: Tensor,
    *,
    n_train: float,
    damping: float = defaults.DAMPING,
    bias_weight: float = defaults.BIAS_WEIGHT,
    variance_weight: float = defaults.VARIANCE_WEIGHT,
    fisher: bool = defaults.FISHER,
    backend: Optional[str] = "auto",
) -> Tuple[Tensor, Tensor]:
    """LoRA-DA's Initialization Guidance Matrix ``Omega`` and the Fisher-gradient step ``dW``.

    Zhang et al. 2025 (arXiv 2510.24561), torch orientation (DESIGN.md section 2), batched over
    leading dims: ``Z`` (..., n, n) input covariance, ``G`` (..., m, n) mean gradient, ``s`` (..., m)
    mean squared output gradient, ``n_train`` = N training tokens, ``bias_weight`` = alpha,
    ``variance_weight`` = beta, ``damping`` = delta (relative)::

        Z_d = Z + delta mean(diag Z) I,   s_d = s + delta mean(s)
        dW = -diag(s_d)^-1 G Z_d^-1                    (fisher=False: dW = -G)
        Omega = beta (sum_i 1/s_d,i) / N  Z_d^-1  -  alpha dW^T dW

    assembled as ``c Z_d^-1 + weighted_gram(H, -alpha / s_d^2)`` with ``H = G Z_d^-1`` (one
    Cholesky factorization, ``cholesky_solve`` for ``H``, ``cholesky_inverse`` for Omega's own
    ``c Z_d^-1`` term; DESIGN.md's identity with the solves before the Gram, which keeps fp32
    accurate), and with ``fisher=False`` as ``c Z_d^-1 + weighted_gram(G, -alpha)``.

    Returns ``(Omega, dW)``: (..., n, n) symmetric and (..., m, n), in the inputs' promoted dtype
    (fp32 for half inputs). ``backend`` selects the ``weighted_gram`` implementation.
    Raises ValueError naming the argument, shapes and batch index for invalid input or a ``Z_d``
    that is not positive definite even in fp64.
    """
    prep = _Prepared("guidance_matrix", Z, G, s, n_train, damping, bias_weight, variance_weight, fisher)
    return prep.omega(backend), prep.dW


def lora_da_factors(
    Z: Tensor,
    G: Tensor,
    s: Tensor,
    rank: int,
    *,
    n_train: float,
    damping: float = defaults.DAMPING,
    bias_weight: float = defaults.BIAS_WEIGHT,
    variance_weight: float = defaults.VARIANCE_WEIGHT,
    fisher: bool = defaults.FISHER,
    solver: str = defaults.SOLVER,
    X: Optional[Tensor] = None,
    tol: Optional[float] = None,
    maxiter: Optional[int] = None,
    backend: Optional[str] = "auto",
    preconditioner: Optional[str] = None,
    form_omega: bool = True,
    guard: Optional[int] = None,
    return_info: bool = False,
    step_norm: Optional[bool] = None,
    seeds=None,
):
    """LoRA-DA factors of one (batch of) layer(s): ``A`` = the ``rank`` smallest eigenvectors of ``Omega``.

    Zhang et al. 2025 (arXiv 2510.24561), DESIGN.md section 2; arguments as in ``guidance_matrix``
    (defaults from ``lorainit_kernels.defaults``). Returns ``(A, P, evals)``: ``A`` (..., n, rank)
    orthonormal eigenvectors of ``Omega`` for its ``rank`` smallest eigenvalues ``evals`` (..., rank)
    (ascending) and ``P = dW A`` (..., m, rank), so that ``P A^T`` is the projection of the
    Fisher-gradient step onto span(A).

    ``solver``: ``"auto"`` (default, ``defaults.SOLVER``) is ``"eigh"`` for
    ``n < defaults.EIGH_CROSSOVER_N[device type]`` (or ``n < 5 rank``) and ``"lobpcg"`` above;
    ``"eigh"`` assembles ``Omega`` and calls the dense ``torch.linalg.eigh``; ``"lobpcg"`` runs
    ``lobpcg`` (Knyazev 2001; Duersch et al. 2018). With ``form_omega=True`` (default) it assembles
    ``Omega`` (as ``guidance_matrix``) and iterates with three ``(n, n) @ (n, p)`` products per step
    (one for the step, two for the default Chebyshev preconditioner of ``lobpcg``);
    ``preconditioner="shift_invert"`` uses the preconditioner ``(Omega - sigma I)^-1`` (one batched
    Cholesky, ``shift_invert_preconditioner``), the shift estimated below ``lambda_min(Omega)`` and
    bounded by ``lambda_min >= -alpha ||dW||_2^2`` (``c Z_d^-1`` is PSD), instead of it (one product per
    step and the two solves). The default (None) keeps the Chebyshev one (about 2.5x fewer steps for about as many
    products as plain LOBPCG): on realistic Omega (bench/spectra.py) the shift-invert preconditioner cuts the
    iterations by only ~30%, which does not pay for the factorization and the two triangular solves
    per step (bench/results/lobpcg.md). With ``form_omega=False`` (``preconditioner`` must be None)
    ``Omega`` is never formed and LOBPCG runs on the operator ``X -> c Z_d^-1 X - alpha dW^T (dW X)``
    (two triangular solves and two thin products per step; O(m n) memory instead of O(n^2)).
    ``guard`` is passed to ``lobpcg``. ``X`` (..., n, >= 1) warm-starts it; ``tol`` and ``maxiter``
    are passed through. ``seeds`` (one int per layer) seed each layer's LOBPCG start (default: the
    same fixed seed for every layer, so a layer's result does not depend on its batch).

    ``return_info=True`` returns a 4th value, a dict with the same keys for both solvers:

    * ``solver``: the solver used (``"eigh"`` or ``"lobpcg"``; ``"auto"`` resolved);
    * ``iterations`` (batch shape) int: LOBPCG iterations (0 for ``eigh``);
    * ``converged`` (..., rank) bool;
    * ``residual`` (..., rank) fp64: ``||Omega a - lambda a|| / (||Omega||_2 + |lambda|)`` of the
      returned pairs, from an explicit product (``||Omega||_2``: exact for ``eigh``, the largest Ritz
      value magnitude seen for ``lobpcg``, which estimates it from below); ``residual_norms`` is the
      same tensor under its former name;
    * ``step_norm`` (batch shape, fp64) = ``sigma_max(dW)`` (computed when ``step_norm`` is True, or
      None and ``return_info`` is True, else None);
    * for ``lobpcg`` also ``fallback``, ``restarts``, ``replaced``, ``ortho_error``, ``preconditioner``,
      and ``shift`` (the shifts ``sigma``, fp64) and ``factorizations`` (Cholesky tries per matrix)
      for the shift-invert path.
    """
    op = "lora_da_factors"
    if solver not in ("auto", "lobpcg", "eigh"):
        raise ValueError(f"{op}: solver must be 'auto', 'lobpcg' or 'eigh', got {solver!r}")
    if preconditioner not in ("shift_invert", None):
        raise ValueError(f"{op}: preconditioner must be 'shift_invert' or None, got {preconditioner!r}")
    if preconditioner is not None and not form_omega:
        raise ValueError(f"{op}: preconditioner={preconditioner!r} needs form_omega=True")
    prep = _Prepared(op, Z, G, s, n_train, damping, bias_weight, variance_weight, fisher)
    m, n = prep.m, prep.n
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1 or rank > min(m, n):
        raise ValueError(f"{op}: rank must be an int with 1 <= rank <= min(m, n) = min({m}, {n}), got {rank!r} "
                         f"(G {tuple(G.shape)})")
    if solver == "auto":
        solver = choose_solver(n, rank, prep.G.device)
    info = {"solver": solver}
    need_norm = (return_info if step_norm is None else step_norm) or (solver == "lobpcg" and preconditioner == "shift_invert" and prep.alpha > 0)
    nu, v1 = prep.step_norm() if need_norm else (None, None)
    if solver == "eigh":
        Om = prep.omega(backend)
        evals_all, vecs = torch.linalg.eigh(Om)
        A = vecs[..., :rank].contiguous()
        evals = evals_all[..., :rank].contiguous()
        if return_info:
            info.update(_eigh_info(Om, A, evals, evals_all, tol))
    else:
        kw = dict(largest=False, X=X, tol=tol, maxiter=maxiter, guard=guard, seeds=seeds, return_info=True)
        if form_omega:
            Om = prep.omega(backend)
            M = None
            if preconditioner == "shift_invert":
                lower = -prep.alpha * nu * nu if prep.alpha > 0 else 0.0     # c Z_d^-1 is PSD
                M = shift_invert_preconditioner(Om, lower_bound=lower)
                info.update(shift=M.sigma, factorizations=M.tries)
            evals, A, linfo = lobpcg(Om, rank, M=M, **kw)
        else:
            evals, A, linfo = lobpcg(prep.operator(), rank, n=n, batch_shape=prep.batch, dtype=prep.dtype,
                                     device=prep.G.device, **kw)
        info.update(linfo)
        info["preconditioner"] = preconditioner
    P = prep.dW @ A
    if not return_info:
        return A, P, evals
    info["step_norm"] = nu
    return A, P, evals, info


def choose_solver(n: int, rank: int, device) -> str:
    """``solver="auto"``: ``"eigh"`` below ``defaults.EIGH_CROSSOVER_N`` for the device type (or where
    LOBPCG itself would solve densely, ``n < 5 rank``), else ``"lobpcg"``."""
    kind = torch.device(device).type
    cross = defaults.EIGH_CROSSOVER_N.get(kind, defaults.EIGH_CROSSOVER_N["cuda"])
    return "eigh" if n < max(cross, 5 * rank) else "lobpcg"


def _eigh_info(Om: Tensor, A: Tensor, evals: Tensor, evals_all: Tensor, tol: Optional[float]) -> dict:
    """The solver info of the dense path, with the residual definition of ``lobpcg``'s."""
    batch = tuple(Om.shape[:-2])
    Ad = A.double()
    ev = evals.double()
    res = torch.linalg.vector_norm(Om.double() @ Ad - Ad * ev[..., None, :], dim=-2)
    norm = evals_all.double().abs().amax(-1, keepdim=True)
    rel = res / (norm + ev.abs()).clamp_min(torch.finfo(torch.float64).tiny)
    t = float(torch.finfo(Om.dtype).eps) ** 0.5 if tol is None else tol
    return {"iterations": torch.zeros(batch, dtype=torch.long, device=Om.device), "converged": rel <= t,
            "residual": rel, "residual_norms": rel}
