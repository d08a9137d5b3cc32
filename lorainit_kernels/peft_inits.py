"""Per-layer math of the initializations PEFT users know: EVA, CorDA, Astra, OLoRA, MiCA (pure functions of tensors).

Orientation and layout as :mod:`lorainit_kernels.methods` (docs/math.md): ``W`` (..., m, n) =
``(out_features, in_features)``; every function returns :class:`~lorainit_kernels.methods.LoRAFactors`
(``lora_A`` (..., r, n), ``lora_B`` (..., m, r), ``base_delta`` (..., m, n) to ADD to ``W``, or None).
Statistics are means over the ``T`` valid tokens (docs/math.md):

* ``Z = (1/T) sum_t x_t x_t^T`` (n, n) and ``mu = (1/T) sum_t x_t`` (n,): the layer's input second moment and mean;
* ``Y = (1/T) sum_t y_t y_t^T`` (m, m): the second moment of the layer's output ``y = W x + b``.

Functions and the implementations they follow (read, not copied):

* :func:`eva_components` / :func:`eva` / :func:`eva_rank_distribution`: EVA, Paischer et al. 2024,
  "One Initialization to Rule them All: Fine-tuning via Explained Variance Adaptation", arXiv 2410.07170;
  PEFT ``tuners/lora/eva.py`` (incremental PCA of the **centered** inputs, rank redistribution).
* :func:`corda`: CorDA, Yang et al. 2024, "CorDA: Context-Oriented Decomposition Adaptation of Large
  Language Models", arXiv 2406.05223; PEFT ``tuners/lora/corda.py`` and ``layer.py`` ``corda_init``.
* :func:`astra`: Astra, Liu et al. 2026, "Astra: Activation-Space Tail-Eigenvector Low-Rank Adaptation of
  Large Language Models", arXiv 2602.19111; reference code LyoAI/Astra ``astra.py``.
* :func:`olora`: OLoRA, Büyükakyüz 2024, "OLoRA: Orthonormal Low-Rank Adaptation of Large Language
  Models", arXiv 2406.01775; PEFT ``layer.py`` ``olora_init``.
* :func:`mica`: MiCA (Minor Component Adaptation), arXiv 2604.01694; PEFT ``layer.py`` ``mica_init``.

Symmetric eigenproblems go through :func:`symmetric_eigs`: dense ``eigh`` below the measured
crossover, the batched LOBPCG above it (:func:`lorainit_kernels.linalg.guidance.choose_solver`).
Everything is computed in fp32 (fp64 for fp64 inputs); factors come back in the weight's dtype and
``base_delta`` from the returned (cast) factors, as in :mod:`lorainit_kernels.methods`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .linalg._common import canonical_signs, chol_solve
from .linalg.guidance import choose_solver
from .linalg.lobpcg import lobpcg
from .methods import (LoRAFactors, _check_finite, _check_int, _check_matrix, _check_rank, _check_scaling,
                      _residual, _split_sqrt, _work_dtype)

__all__ = ["EVAComponents", "symmetric_eigs", "eva_components", "eva", "eva_rank_distribution", "corda", "astra",
           "olora", "mica", "CORDA_DAMPING"]

#: CorDA's relative damping of the input covariance, ``C + damping * mean(diag C) * I`` (PEFT's start value).
CORDA_DAMPING = 0.01


def _check_square(name: str, t, op: str, size: Optional[int] = None) -> Tensor:
    _check_matrix(name, t, op)
    if t.shape[-1] != t.shape[-2]:
        raise ValueError(f"{op}: {name} must be square (..., k, k), got shape {tuple(t.shape)}")
    if size is not None and t.shape[-1] != size:
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected (..., {size}, {size})")
    return t


def _sym(C: Tensor) -> Tensor:
    return 0.5 * (C + C.mT)


def symmetric_eigs(C: Tensor, k: int, *, largest: bool, solver: str = "auto",
                   tol: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    """The ``k`` largest (``largest``) or smallest eigenpairs of symmetric ``C`` (..., d, d): ``(evals, vecs)``.

    ``evals`` (..., k) descending for ``largest`` else ascending; ``vecs`` (..., d, k) orthonormal, each
    column's largest-magnitude entry positive. ``solver``: ``"eigh"`` (dense), ``"lobpcg"`` or
    ``"auto"`` (:func:`~lorainit_kernels.linalg.guidance.choose_solver`: dense below the measured
    crossover). In the compute dtype of ``C`` (fp32, or fp64 for fp64 input).
    """
    op = "symmetric_eigs"
    _check_square("C", C, op)
    d = C.shape[-1]
    _check_int("k", k, op)
    if k > d:
        raise ValueError(f"{op}: k={k} eigenpairs requested of a ({d}, {d}) matrix")
    if solver not in ("auto", "eigh", "lobpcg"):
        raise ValueError(f"{op}: solver must be 'auto', 'eigh' or 'lobpcg', got {solver!r}")
    C = _sym(C.to(_work_dtype(C.dtype)))
    use = choose_solver(d, k, C.device) if solver == "auto" else solver
    if use == "eigh":
        evals, vecs = torch.linalg.eigh(C)
        if largest:
            evals, vecs = evals[..., -k:].flip(-1), vecs[..., -k:].flip(-1)
        else:
            evals, vecs = evals[..., :k], vecs[..., :k]
    else:
        evals, vecs = lobpcg(C, k, largest=largest, tol=tol)  # a fixed seed per matrix: batch-independent
    idx = vecs.abs().argmax(-2, keepdim=True)
    sign = torch.gather(vecs, -2, idx).sign()
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return evals, vecs * sign


# ------------------------------------------------------------------------------------------ EVA
@dataclass
class EVAComponents:
    """The principal directions of a layer's centered inputs (EVA): ``components`` (..., k, n) rows
    orthonormal, ``explained_variance`` (..., k) descending (eigenvalues of ``Z - mu mu^T``), and
    ``explained_variance_ratio`` (..., k) = ``explained_variance / trace(Z - mu mu^T)``."""

    components: Tensor
    explained_variance: Tensor
    explained_variance_ratio: Tensor


def eva_components(Z: Tensor, mu: Tensor, k: int, *, solver: str = "auto", tol: Optional[float] = None) -> EVAComponents:
    """The top ``k`` principal directions of the inputs: eigenvectors of the covariance ``Z - mu mu^T``.

    PEFT's EVA runs an incremental PCA (sklearn's ``IncrementalPCA`` algorithm) over minibatches of the
    layer inputs, which **centers** them by the running mean; its ``components_`` are the top right
    singular vectors of the centered data matrix ``X - 1 mu^T``, i.e. the top eigenvectors of
    ``(1/T) (X - 1 mu^T)^T (X - 1 mu^T) = Z - mu mu^T``, and ``explained_variance_ratio_`` is each
    eigenvalue over their sum (the trace). Here the covariance comes from one pass's ``Z`` and ``mu``.
    ``Z`` (..., n, n), ``mu`` (..., n).
    """
    op = "eva_components"
    _check_square("Z", Z, op)
    n = Z.shape[-1]
    if not isinstance(mu, Tensor):
        raise TypeError(f"{op}: mu must be a torch.Tensor (the token mean of the inputs), got {type(mu).__name__}")
    if tuple(mu.shape) != tuple(Z.shape[:-1]):
        raise ValueError(f"{op}: mu has shape {tuple(mu.shape)}, expected {tuple(Z.shape[:-1])} (Z is {tuple(Z.shape)})")
    _check_finite("mu", mu, op)
    _check_int("k", k, op)
    if k > n:
        raise ValueError(f"{op}: k={k} components requested of n={n} input features")
    dt = _work_dtype(Z.dtype)
    mu = mu.to(dt)
    C = Z.to(dt) - mu.unsqueeze(-1) * mu.unsqueeze(-2)
    total = torch.diagonal(C, dim1=-2, dim2=-1).sum(-1)
    if bool((total <= 0).any()):
        raise ValueError(f"{op}: the centered input covariance Z - mu mu^T has a non-positive trace (every input "
                         f"token is the same vector, or too few tokens); EVA needs inputs that vary")
    evals, vecs = symmetric_eigs(C, k, largest=True, solver=solver, tol=tol)
    evals = evals.clamp_min(0)
    return EVAComponents(vecs.mT.contiguous(), evals, evals / total.unsqueeze(-1))


def eva(Z: Tensor, mu: Tensor, rank: int, *, out_features: int, whiten: bool = False, count: Optional[int] = None,
        dtype: Optional[torch.dtype] = None, solver: str = "auto") -> LoRAFactors:
    """EVA: ``lora_A`` = the top ``rank`` principal directions of the centered inputs, ``lora_B = 0``.

    ``lora_A = V_r^T`` with ``V_r`` the top eigenvectors of ``Z - mu mu^T`` (:func:`eva_components`),
    ``lora_B = 0`` (m, r), base unchanged (PEFT ``get_eva_state_dict`` / ``initialize_lora_eva_weights``).
    ``whiten`` (PEFT ``EvaConfig.whiten``) divides each row by the square root of its singular value
    of the centered data matrix, ``sqrt(sqrt(T * lambda_i))`` over the ``count = T`` tokens (PEFT's
    incremental PCA uses the tokens it has seen, which depends on when it converged).
    ``dtype``: of the factors (default ``Z``'s).
    """
    op = "eva"
    _check_int("out_features", out_features, op)
    if whiten and (count is None or isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise ValueError(f"{op}: whiten=True needs count, the number of tokens (an int >= 1), got {count!r}")
    comp = eva_components(Z, mu, rank, solver=solver)
    A = comp.components
    if whiten:
        sv = (count * comp.explained_variance).sqrt()
        if bool((sv <= 0).any()):
            raise ValueError(f"{op}: whiten=True but a selected component has zero variance (cannot divide by it)")
        A = A / sv.sqrt().unsqueeze(-1)
    out = dtype or Z.dtype
    B = torch.zeros(*Z.shape[:-2], out_features, rank, dtype=out, device=Z.device)
    return LoRAFactors(A.to(out), B, None)


def eva_rank_distribution(ratios: Mapping[str, Tensor], budget: int, max_components: Mapping[str, int],
                          shared: Optional[Mapping[str, str]] = None) -> Dict[str, int]:
    """EVA's rank redistribution: the ``budget`` largest explained-variance ratios over all layers win.

    PEFT ``eva.py`` ``_get_rank_distribution``: every layer offers its first ``max_components[layer]``
    ratios (``round(r * rho)``), all offers are sorted descending and the top ``budget`` (the sum of
    the layers' ranks) are counted per layer. A layer that shares its input with another
    (``shared[layer] = owner``) offers the owner's ratios; when it won more than the owner, the two
    counts are swapped (the owner keeps the higher rank, as PEFT does). Ties break by layer order.
    Returns ``{layer: rank}`` (0 allowed) in the order of ``ratios``.
    """
    op = "eva_rank_distribution"
    _check_int("budget", budget, op)
    shared = dict(shared or {})
    names = list(ratios)
    offers = []
    for i, name in enumerate(names):
        src = shared.get(name, name)
        if src not in ratios:
            raise ValueError(f"{op}: layer {name!r} shares its input with {src!r}, which has no ratios")
        k = _check_int(f"max_components[{name!r}]", max_components.get(name), op, low=0)
        vals = ratios[src].double().reshape(-1)[:k].tolist()
        offers += [(-v, i, j) for j, v in enumerate(vals)]
    offers.sort()
    counts = {name: 0 for name in names}
    for _, i, _ in offers[:budget]:
        counts[names[i]] += 1
    for name, owner in shared.items():
        if name in counts and owner in counts and counts[owner] < counts[name]:
            counts[owner], counts[name] = counts[name], counts[owner]
    return counts


# ------------------------------------------------------------------------------------------ CorDA
def _damped_cholesky(C: Tensor, damping: float, op: str, retries: int = 128) -> Tuple[Tensor, Tensor, float]:
    """``(C_d, L, damping)``: ``C_d = C + damping * mean(diag C) * I`` with its Cholesky factor; the damping
    doubles while ``C_d`` does not factor or solves with it would be inaccurate: PEFT's
    ``collect_eigens_for_layer`` doubles it until ``|C_d C_d^-1 - I| < 0.05``; without forming the
    inverse, here until ``cond_est * eps < 0.05`` with ``cond_est = (max diag L / min diag L)^2`` (a lower
    estimate of the condition number) and ``eps`` of the compute dtype."""
    n = C.shape[-1]
    mean_diag = torch.diagonal(C, dim1=-2, dim2=-1).mean(-1)
    if bool((mean_diag <= 0).any()):
        raise ValueError(f"{op}: the input covariance C has a non-positive mean diagonal (all inputs zero?)")
    eye = torch.eye(n, dtype=C.dtype, device=C.device)
    d = damping
    for _ in range(retries + 1):
        Cd = C + (d * mean_diag)[..., None, None] * eye
        L, info = torch.linalg.cholesky_ex(Cd)
        if not bool((info != 0).any()):
            diag = torch.diagonal(L, dim1=-2, dim2=-1).abs()
            cond = (diag.amax(-1) / diag.amin(-1).clamp_min(torch.finfo(C.dtype).tiny)) ** 2
            if bool((cond * torch.finfo(C.dtype).eps < 0.05).all()):
                return Cd, L, d
        if d >= 1.0:  # a PSD C damped by its mean diagonal always factors: C itself is not PSD
            break
        d = min(2 * d, 1.0)
    raise ValueError(f"{op}: the damped input covariance is not positive definite even with damping {d:g} "
                     f"(the input covariance C is not positive semi-definite)")


def corda(W: Tensor, C: Tensor, rank: int, *, scaling: float, mode: str = "ipm",
          damping: float = CORDA_DAMPING) -> LoRAFactors:
    """CorDA: the SVD of ``W C`` (context-oriented), ``r`` components into the adapter, the rest in the base.

    Yang et al. (2024), arXiv 2406.05223; PEFT ``corda.py`` ``collect_eigens_for_layer`` and
    ``layer.py`` ``corda_init``. With ``C_d = C + damping * mean(diag C) * I`` (C the input second
    moment ``Z``; PEFT doubles ``damping`` from 0.01 until ``C_d`` inverts accurately; here until its
    Cholesky factor's condition estimate times eps is below 0.05, :func:`_damped_cholesky`) and ``U S Vh = svd(W C_d)``, ``V = C_d^{-1} Vh^T`` (a Cholesky solve, no inverse):

        ``I`` = the ``r`` largest (``mode="ipm"``, instruction-previewed) or smallest (``"kpm"``,
        knowledge-preserving) singular values,
        ``lora_A = diag(sqrt(S_I / sigma)) V_I^T``,  ``lora_B = U_I diag(sqrt(S_I / sigma))``,
        ``base_delta = -sigma lora_B lora_A``  (``= -U_I S_I Vh_I C_d^{-1}``),

    so base + adapter = ``W`` (preserve-output). ``sigma B A = [W C_d]_I C_d^{-1}`` does not depend on
    the scale of ``C`` (the factors do: PEFT divides each batch's inputs by their largest entry).
    ``W`` (..., m, n), ``C`` (..., n, n) or (n, n).
    """
    op = "corda"
    _check_matrix("W", W, op)
    m, n = W.shape[-2:]
    _check_square("C", C, op, n)
    _check_rank(rank, m, n, op)
    scaling = _check_scaling(scaling, op)
    if mode not in ("ipm", "kpm"):
        raise ValueError(f"{op}: mode must be 'ipm' (r largest components) or 'kpm' (r smallest), got {mode!r}")
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not math.isfinite(damping) or damping <= 0:
        raise ValueError(f"{op}: damping must be a finite positive number, got {damping!r}")
    dt = _work_dtype(W.dtype)
    Cd, L, _ = _damped_cholesky(_sym(C.to(dt)), float(damping), op)
    U, S, Vh = torch.linalg.svd(W.to(dt) @ Cd, full_matrices=False)
    sl = slice(0, rank) if mode == "ipm" else slice(S.shape[-1] - rank, S.shape[-1])
    U, S, Vh = U[..., :, sl], S[..., sl], Vh[..., sl, :]
    U, Vt = canonical_signs(U, Vh.mT)
    V = chol_solve(Vt, L)  # C_d^{-1} Vh_I^T
    A, B = _split_sqrt(U, S, V, scaling, W.dtype)
    return LoRAFactors(A, B, _residual(A, B, scaling))


# ------------------------------------------------------------------------------------------ Astra
def astra(W: Tensor, Y: Tensor, rank: int, *, scaling: float, mode: str = "ipm", solver: str = "auto") -> LoRAFactors:
    """Astra: ``lora_B`` = eigenvectors of the output-activation covariance, ``lora_A = B^T W``, residual in the base.

    Liu et al. (2026), arXiv 2602.19111; reference code LyoAI/Astra ``astra.py`` (``collect_eigens_for_layer``,
    ``crop_astra_eigens``, ``AstraLayer.astra_init``). With ``Y = (1/T) sum_t y_t y_t^T`` (m, m) and
    ``V_r`` (m, r) its eigenvectors for the ``r`` largest eigenvalues (``mode="ipm"``, the reference's
    default: the last ``r`` columns of ``torch.linalg.eigh``'s ascending order) or the ``r`` smallest
    (``"kpm"``):

        ``lora_B = V_r``,  ``lora_A = V_r^T W``,  ``base_delta = -sigma lora_B lora_A = -sigma V_r V_r^T W``,

    so base + adapter = ``W`` (preserve-output); the adapter is ``sigma`` times the projection of ``W``
    onto the chosen output subspace. Columns in ascending eigenvalue order, as the reference.
    ``W`` (..., m, n), ``Y`` (..., m, m) or (m, m).
    """
    op = "astra"
    _check_matrix("W", W, op)
    m, n = W.shape[-2:]
    _check_square("Y", Y, op, m)
    _check_int("rank", rank, op)
    if rank > m:
        raise ValueError(f"{op}: rank={rank} exceeds out_features m={m} (Astra takes r eigenvectors of the m x m "
                         f"output covariance)")
    scaling = _check_scaling(scaling, op)
    if mode not in ("ipm", "kpm"):
        raise ValueError(f"{op}: mode must be 'ipm' (largest eigenvalues) or 'kpm' (smallest), got {mode!r}")
    dt = _work_dtype(W.dtype)
    _, V = symmetric_eigs(Y.to(dt), rank, largest=mode == "ipm", solver=solver)
    if mode == "ipm":
        V = V.flip(-1)  # ascending eigenvalues, as eigh's last r columns
    V = V.expand(*W.shape[:-2], m, rank) if V.dim() < W.dim() else V
    B = V.to(W.dtype)
    A = (B.to(dt).mT @ W.to(dt)).to(W.dtype)
    return LoRAFactors(A.contiguous(), B.contiguous(), _residual(A, B, scaling))


# ------------------------------------------------------------------------------------------ data-free
def olora(W: Tensor, rank: int, *, scaling: float) -> LoRAFactors:
    """OLoRA: ``Q R = qr(W)``, ``lora_B = Q[:, :r]``, ``lora_A = R[:r]``, the base keeps ``W - sigma B A``.

    Büyükakyüz (2024), arXiv 2406.01775; PEFT ``layer.py`` ``olora_init`` (reduced QR of the fp32
    weight, no scaling of the factors, ``W <- W - sigma lora_B @ lora_A``). Signs are LAPACK's
    Householder QR, as PEFT (``torch.linalg.qr``). ``W`` (..., m, n); ``r <= min(m, n)``.
    """
    op = "olora"
    _check_matrix("W", W, op)
    m, n = W.shape[-2:]
    _check_rank(rank, m, n, op)
    scaling = _check_scaling(scaling, op)
    Q, R = torch.linalg.qr(W.to(_work_dtype(W.dtype)))
    B = Q[..., :, :rank].to(W.dtype).contiguous()
    A = R[..., :rank, :].to(W.dtype).contiguous()
    return LoRAFactors(A, B, _residual(A, B, scaling))


def mica(W: Tensor, rank: int) -> LoRAFactors:
    """MiCA: ``lora_B`` = the left singular vectors of the ``r`` smallest singular values, ``lora_A = 0``.

    Minor Component Adaptation, arXiv 2604.01694; PEFT ``layer.py`` ``mica_init``: ``U S Vh = svd(W)``
    (fp32), ``lora_B = U[:, -r:]`` (ascending position order of the thin SVD's last ``r`` columns),
    ``lora_A = 0``; the base is unchanged (``B A = 0``) and PEFT freezes ``lora_B`` (only ``A`` trains).
    For an embedding, ``W = weight^T`` (embedding_dim, num_embeddings), as PEFT. ``W`` (..., m, n).
    """
    op = "mica"
    _check_matrix("W", W, op)
    m, n = W.shape[-2:]
    _check_rank(rank, m, n, op)
    U, _, _ = torch.linalg.svd(W.to(_work_dtype(W.dtype)), full_matrices=False)
    B = U[..., :, -rank:].to(W.dtype).contiguous()
    A = torch.zeros(*W.shape[:-2], rank, n, dtype=W.dtype, device=W.device)
    return LoRAFactors(A, B, None)
