"""LoRA-DA on a PEFT model: statistics pass, batched per-shape solves, step size, PEFT factors.

LoRA-DA (Zhang et al. 2025, "LoRA-DA: Data-Aware Initialization for Low-Rank Adaptation via
Asymptotic Analysis", arXiv 2510.24561). Per target ``W`` (m, n), from the K-FAC statistics
``Z, G, s`` of the statistics samples (DESIGN.md section 2)::

    dW    = -diag(s_d)^-1 G Z_d^-1                          (Fisher-gradient step)
    Omega = beta (sum_i 1/s_d,i) / N Z_d^-1 - alpha dW^T dW   (initialization guidance matrix)
    A     = r smallest eigenvectors of Omega,  P = dW A
    lora_A = A^T,  lora_B = eta P / (sigma nu)              (sigma: PEFT scaling, nu: 1 or sigma_max(dW))

The per-layer math is ``lorainit_kernels.methods.lora_da``; this module gathers the statistics,
stacks layers of one shape into one batched call, spreads the calls over processes, estimates
``N`` and searches ``eta`` (``step_scale="auto"``: the mean loss of held-out statistics samples
after writing ``eta P A^T`` to every layer, forward passes only, coarse-to-fine over
``{0} U step_grid``).
"""
from __future__ import annotations

import math
import time
from collections import defaultdict
from typing import Callable, Dict, List, Sequence, Tuple

import torch

import lorainit_kernels.methods as lkm

from . import distributed as dist_utils
from .adapters import LoRAFactors
from .configs import LoRADAConfig
from .context import InitContext
from .registry import register_method
from .targets import LoRAInitError, check_rank

PAPER = ("Zhang et al. 2025, LoRA-DA: Data-Aware Initialization for Low-Rank Adaptation via Asymptotic "
         "Analysis, arXiv 2510.24561")


def _n_train(ctx: InitContext, config: LoRADAConfig, count: int) -> Tuple[float, str]:
    if config.n_train is not None:
        return float(config.n_train), "config"
    examples = ctx.info.get("stats_examples") or 0
    length = ctx.dataset_length()
    if length and examples:
        return float(length) * count / examples, "len(dataset) x mean valid tokens per example"
    return float(count), "tokens in the statistics samples (the dataloader has no dataset length)"


def _ritz_residual(Z, G, s, A, P, evals, config: LoRADAConfig, N: float):
    """Relative residual ``max_i ||Omega a_i - lambda_i a_i|| / max_i |lambda_i|`` of the returned pairs.

    Without forming Omega (DESIGN.md section 2): with ``D = diag(s_d)^-1``, ``dW^T P = -Z_d^-1 G^T D P``,
    so ``Omega A = Z_d^-1 (c A + alpha G^T D P)`` (Fisher) or ``c Z_d^-1 A - alpha G^T (G A)`` (no Fisher):
    one Cholesky of ``Z_d`` per layer. Used when the solver reports no residuals itself.
    """
    dt = torch.float64
    Z, G, s, A, P = (t.to(dt) for t in (Z, G, s, A, P))
    zd = Z.diagonal(dim1=-2, dim2=-1)
    Zd = 0.5 * (Z + Z.mT) + torch.diag_embed((config.damping * zd.mean(-1, keepdim=True)).expand_as(zd))
    sd = s + config.damping * s.mean(-1, keepdim=True)
    c = (config.variance_weight * (1.0 / sd).sum(-1) / N)[..., None, None]
    L, info = torch.linalg.cholesky_ex(Zd)
    if bool((info > 0).any()):
        return None
    if config.fisher:
        OA = torch.cholesky_solve(c * A + config.bias_weight * (G.mT @ (P / sd[..., :, None])), L)
    else:
        OA = c * torch.cholesky_solve(A, L) - config.bias_weight * (G.mT @ (G @ A))
    ev = evals.to(dt)
    res = (OA - A * ev[..., None, :]).norm(dim=-2).amax(-1)
    return (res / ev.abs().amax(-1).clamp_min(1e-300)).tolist()


def _solve_part(ctx: InitContext, config: LoRADAConfig, part, owners, results) -> None:
    """Solve the layers of one statistics pass: batched by shape on their owner rank, then broadcast."""
    buckets: Dict[tuple, List[str]] = defaultdict(list)
    for name, st in part.items():
        t = ctx.targets[name]
        N, source = _n_train(ctx, config, st.count)
        ctx.record(name, n_train=N)
        ctx.info["n_train_source"] = source
        if owners[name] == ctx.rank:
            buckets[(t.m, t.n, t.r, t.scaling, N)].append(name)
    for (m, n, r, scaling, N), names in buckets.items():
        Z = torch.stack([part[k].Z for k in names])
        G = torch.stack([part[k].G for k in names])
        s = torch.stack([part[k].s for k in names])
        t0 = time.perf_counter()
        try:
            factors, info = lkm.lora_da(Z, G, s, r, n_train=N, scaling=scaling, step_scale=1.0,
                                        normalize_step=config.normalize_step, preserve_output=False,
                                        damping=config.damping, bias_weight=config.bias_weight,
                                        variance_weight=config.variance_weight, fisher=config.fisher,
                                        solver=config.solver)
        except (ValueError, TypeError, RuntimeError) as err:
            raise LoRAInitError(f"LoRA-DA solve for modules {names} (shape {m}x{n}, r={r}) failed: {err}") from err
        dt = (time.perf_counter() - t0) / len(names)
        solver = info.get("solver") or {}
        residuals = None
        if not (isinstance(solver, dict) and "residual_norms" in solver):
            # unnormalized P = dW A: lora_B (step 1) = P / (sigma nu)
            nu = info.get("step_norm")
            P = factors.lora_B.double() * scaling
            if nu is not None:
                P = P * nu.double()[..., None, None]
            residuals = _ritz_residual(Z, G, s, factors.lora_A.mT, P, info["evals"], config, N)
        for i, name in enumerate(names):
            row = {"eigenvalues": info["evals"][i].tolist(), "time_s": dt}
            if info.get("step_norm") is not None:
                row["step_norm"] = float(info["step_norm"][i])
            if isinstance(solver, dict):
                if "iterations" in solver:
                    row["iters"] = int(torch.as_tensor(solver["iterations"]).reshape(-1)[i])
                if "residual_norms" in solver:
                    row["residual"] = float(torch.as_tensor(solver["residual_norms"]).reshape(len(names), -1)[i].max())
            if residuals is not None:
                row["residual"] = residuals[i]
            ctx.record(name, **row)
            results[name] = (factors.lora_A[i].float(), factors.lora_B[i].float(),
                             info["evals"][i].float())
    if ctx.world > 1:
        for name in sorted(part):
            t = ctx.targets[name]
            if name in results:
                A, B, ev = results[name]
            else:
                A = torch.empty(t.r, t.n, device=t.device)
                B = torch.empty(t.m, t.r, device=t.device)
                ev = torch.empty(t.r, device=t.device)
            dist_utils.broadcast_tensors([A, B, ev], src=owners[name])
            results[name] = (A, B, ev)
            if owners[name] != ctx.rank:
                ctx.record(name, eigenvalues=ev.tolist())


def _factors(ctx: InitContext, results, eta: float, preserve: bool) -> Dict[str, LoRAFactors]:
    out = {}
    for name, (A, B1, _) in results.items():
        t = ctx.targets[name]
        lora_A = A.to(t.lora_A.dtype)
        lora_B = (eta * B1).to(t.lora_B.dtype)
        delta = None
        if preserve:  # from the factors as stored, in fp32: W + delta + sigma B A = W (up to one rounding)
            delta = -(t.scaling * (lora_B.float() @ lora_A.float()))
        out[name] = LoRAFactors(lora_A, lora_B, delta)
    return out


def search_step_grid(grid: Sequence[float], loss: Callable[[float], float]) -> Dict[float, float]:
    """Held-out losses of a coarse-to-fine search over the ascending step sizes ``grid``.

    First ``grid[0]`` and every other point from the largest down to ``grid[2]``; then the unscored points between
    the best coarse point and its coarse neighbours. When the loss is unimodal along the grid this
    finds the grid's minimum with fewer forward passes (6 instead of 8 for the default grid with
    its minimum at 0.1); otherwise it still returns the best point it scored. Returns {eta: loss}.
    """
    last = len(grid) - 1
    coarse = sorted({0, last, *range(last, 1, -2)})
    scores = {i: loss(grid[i]) for i in coarse}
    best = min(scores, key=lambda i: (_finite_or_inf(scores[i]), i))
    pos = coarse.index(best)
    left = coarse[pos - 1] if pos > 0 else best
    right = coarse[pos + 1] if pos + 1 < len(coarse) else best
    for i in range(left + 1, right):
        if i not in scores:
            scores[i] = loss(grid[i])
    return {grid[i]: scores[i] for i in sorted(scores)}


def _finite_or_inf(v: float) -> float:
    return v if math.isfinite(v) else math.inf


def lora_da_init(ctx: InitContext, config: LoRADAConfig) -> Dict[str, LoRAFactors]:
    """LoRA-DA factors of every target (see the module docstring); registered as ``"lora_da"``."""
    check_rank(ctx.targets, "lora_da")
    auto = config.step_scale == "auto"
    if auto:
        stat_batches, holdout = ctx.split_holdout(config.holdout_fraction)
    else:
        stat_batches, holdout = ctx.batches, []
    owners = dist_utils.assign_ranks(ctx.names, ctx.world)
    results: Dict[str, tuple] = {}
    for part in ctx.iter_stats(ctx.names, batches=stat_batches, max_memory=config.max_memory,
                               dtype=config.stats_dtype, backend=config.backend, token_mask=config.token_mask):
        with ctx.timed("solve"):
            _solve_part(ctx, config, part, owners, results)
        del part
    missing = [n for n in ctx.names if n not in results]
    if missing:
        raise LoRAInitError(f"LoRA-DA produced no factors for {missing[:5]}")
    ctx.info["n_train"] = sorted({ctx.layer_info[n]["n_train"] for n in ctx.names})[:4]
    if auto:
        with ctx.timed("step_search"):
            def held_out_loss(eta: float) -> float:
                ctx.write(_factors(ctx, results, eta, preserve=False))
                return ctx.eval_loss(holdout, token_mask="attention")

            scores = search_step_grid((0.0,) + tuple(sorted(config.step_grid)), held_out_loss)
            finite = {k: v for k, v in scores.items() if math.isfinite(v)}
            if not finite:
                raise LoRAInitError(f"step_scale='auto': every step size gave a NaN/Inf held-out loss: {scores}")
            eta = min(finite, key=lambda k: (finite[k], k))
        ctx.info["step_search"] = {"scores": {str(k): v for k, v in scores.items()}, "held_out_batches": len(holdout)}
    else:
        eta = float(config.step_scale)
    ctx.info["step_scale"] = eta
    return _factors(ctx, results, eta, preserve=config.preserve_output)


register_method("lora_da", fn=lora_da_init, config_cls=LoRADAConfig, needs_data=True, needs_grad=True,
                paper=PAPER, summary="K-FAC Fisher + guidance matrix; A = r smallest eigenvectors (LOBPCG)")
