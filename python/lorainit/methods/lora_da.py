"""LoRA-DA on a PEFT model: its config, the statistics pass, the layer-by-layer solves, the step size.

LoRA-DA (Zhang et al. 2025, "LoRA-DA: Data-Aware Initialization for Low-Rank Adaptation via
Asymptotic Analysis", arXiv 2510.24561). Per target ``W`` (m, n), from the K-FAC statistics
``Z, G, s`` of the statistics samples (docs/math.md)::

    dW    = -diag(s_d)^-1 G Z_d^-1                          (Fisher-gradient step)
    Omega = beta (sum_i 1/s_d,i) / N Z_d^-1 - alpha dW^T dW   (initialization guidance matrix)
    A     = r smallest eigenvectors of Omega,  P = dW A
    lora_A = A^T,  lora_B = eta P / (sigma nu)              (sigma: PEFT scaling, nu: 1 or sigma_max(dW))

Embedding targets (``nn.Embedding``, the linear map ``W = weight^T`` (d, vocab) on one-hot
inputs) have a diagonal ``Z = diag(token frequencies)``, so ``Omega = c Z_d^-1 - alpha dW^T dW`` is
diagonal minus rank <= d and is never formed (vocab n can be 50k):
``lorainit_kernels.methods.lora_da_embedding``.

The per-layer math is ``lorainit_kernels.methods.lora_da``; this module gathers the statistics,
solves layer by layer with one in-place factorization per input (a ``Z`` shared by q/k/v or
gate/up is damped and factored once: :func:`_solve_part`), spreads the solves over processes, estimates
``N`` and searches ``eta`` (``step_scale="auto"``: the mean loss of held-out statistics samples
after writing ``eta P A^T`` to every layer, forward passes only, coarse-to-fine over
``{0} U step_grid``).
"""
from __future__ import annotations

import math
import time
import warnings
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

import lorainit_kernels.linalg as lkg
import lorainit_kernels.methods as lkm
from lorainit_kernels import defaults

from .. import distributed as dist_utils
from .. import memory
from ..adapters import LoRAFactors
from ..configs import InitConfig, check_bool, check_choice, check_int, check_number
from ..context import InitContext
from ..passes.batches import packed_sequences
from ..targets import LoRAInitError, LoRAInitWarning, check_rank
from .common import MethodSpec, finalize, kernel_call

__all__ = ["LoRADAConfig", "lora_da_init", "search_step_grid", "LORA_DA"]

PAPER = ("Zhang et al. 2025, LoRA-DA: Data-Aware Initialization for Low-Rank Adaptation via Asymptotic "
         "Analysis, arXiv 2510.24561")

SOLVERS = ("auto", "lobpcg", "eigh")
TOKEN_MASKS = ("attention", "labels")
BACKENDS = ("auto", "native", "triton", "torch")


@dataclass(frozen=True)
class LoRADAConfig(InitConfig):
    """LoRA-DA (Zhang et al. 2025, arXiv 2510.24561) options; the math in docs/math.md.

    Per target layer ``W`` (m, n) with K-FAC statistics ``Z``, ``G``, ``s`` over ``T`` valid tokens::

        Z_d = Z + damping mean(diag Z) I,  s_d = s + damping mean(s)
        dW = -diag(s_d)^-1 G Z_d^-1                       (fisher=False: dW = -G)
        Omega = variance_weight (sum_i 1/s_d,i) / n_train Z_d^-1 - bias_weight dW^T dW
        A = r smallest eigenvectors of Omega,  P = dW A
        init update = eta P A^T   (eta = step_scale; divided by sigma_max(dW) with normalize_step)

    written as ``lora_A = A^T``, ``lora_B = eta P / sigma`` with PEFT's scaling ``sigma``.

    Defaults of the shared knobs (``damping``, ``bias_weight``, ``variance_weight``, ``fisher``,
    ``normalize_step``, ``step_grid``) come from ``lorainit_kernels.defaults``, the same as the
    tensor-level ``lk.lora_da_factors`` and ``lorainit_kernels.methods.lora_da``.

    Args:
        n_train: number of training tokens ``N`` in the variance term; None estimates it as
            ``len(dataloader.dataset) * mean valid tokens per example`` of the statistics samples
            (the report says which value and source were used).
        damping: relative damping ``delta`` of ``Z`` and ``s`` (default ``defaults.DAMPING``, 0.1:
            the lowest held-out losses right after init on SmolLM2-135M and on digits among 1e-3,
            1e-2 and 0.1; bench/experiments/results/smollm2_step_research.md).
        step_scale: ``eta``, a number >= 0, or ``"auto"`` (default): a coarse-to-fine search over
            ``step_grid`` (and eta = 0; :func:`search_step_grid`) scoring the mean loss of the
            held-out statistics samples with forward passes only; one common eta for all layers.
            When eta = 0 wins (B = 0: no step helps), the report's ``info["step_search"]`` says
            ``fallback=True`` with the scores and one warning says so. With ``preserve_output``
            the search scores the adapters without the base correction, then writes the chosen
            eta with it.
        normalize_step: divide each layer's step by the largest singular value of its ``dW``
            (as the public reference code does), so ``eta`` is the spectral norm of the step
            relative to the layer's own. Default True: the raw step is 81x-275x ``||W||_F`` on
            SmolLM2, whose optimum raw eta (<= 1e-4) lies 3.5 decades from digits' (0.3);
            normalized, the optima are ~1 (SmolLM2: held-out loss 1.57 vs 2.35 untouched) and 3-10
            (digits), one grid ``{0.3, 1, 3, 10}`` for both. With ``normalize_step=False`` pass a
            ``step_grid`` of raw etas (e.g. ``(1e-4, 1e-3, 1e-2, 0.1)``).
        preserve_output: subtract the init update ``eta P A^T`` from the base weight (computed in
            fp32), so the model's outputs are unchanged at step 0. Save such an adapter with
            ``save_pretrained(dir, path_initial_model_for_weight_conversion=...)`` or save the base too.
        freeze_A: LoRA-DA-FA: ``lora_A`` gets ``requires_grad=False`` (same init, A not trained).
        bias_weight, variance_weight, fisher: ``alpha``, ``beta`` and whether ``dW`` is the Fisher step;
            the paper's ablations are ``bias_weight=0`` (w/o bias), ``variance_weight=0`` (w/o var)
            and ``variance_weight=0, fisher=False`` (w/o var and Fisher): see :meth:`ablation`.
        token_mask: ``"attention"`` (tokens with ``attention_mask == 1``) or ``"labels"`` (only the
            positions whose loss label is not -100).
        max_memory: bytes bounding the peak of the whole call above the model and one forward/backward
            of a batch (docs/memory.md); None = all layers in one pass. Below what all statistics plus
            one layer's solve need, layers are processed in groups with one pass each and solved in
            chunks that fit beside their statistics (identical adapters: each layer's LOBPCG start is
            seeded from its name). A budget below one layer's working set warns with the smallest
            budget that works (``lorainit.estimate_memory`` refuses it).
        solver: ``"auto"`` (default: dense ``eigh`` below the measured crossover size
            ``lorainit_kernels.defaults.EIGH_CROSSOVER_N``, batched LOBPCG above), ``"lobpcg"`` or
            ``"eigh"``. The report records per layer the solver used, its iterations, whether all
            ``r`` pairs converged and the largest relative residual
            ``||Omega a - lambda a|| / (||Omega|| + |lambda|)``, as the solver computed them.
        solve_batch: without ``max_memory``, up to this many layers of one shape that read their input
            alone (o_proj, down_proj) accumulate their statistics into one stack and are solved in one
            batched LOBPCG call (their LOBPCG blocks side by side: about ``80 n r`` floats per layer;
            ``estimate_memory`` counts them); 1 = one layer at a time, as always with ``max_memory``.
            The adapters do not depend on it (a layer's solve is bitwise the same alone or batched).
        solver_options: ``{"tol": float > 0, "maxiter": int >= 1}`` (either key optional) passed to
            ``lorainit_kernels.methods.lora_da`` for the LOBPCG; empty (default) = its defaults.
        step_grid: the etas ``"auto"`` tries (besides 0; default ``defaults.STEP_GRID``);
            holdout_fraction: share of the statistics samples held out to score them (at least
            one batch).
        stats_dtype: accumulator dtype of the statistics (float32, or float64 for exactness tests).
        backend: kernel backend for the statistics (``"auto"``, ``"native"``, ``"triton"``, ``"torch"``).
    """

    n_train: Optional[float] = None
    damping: float = defaults.DAMPING
    step_scale: Union[float, str] = "auto"
    normalize_step: bool = defaults.NORMALIZE_STEP
    preserve_output: bool = False
    freeze_A: bool = False
    bias_weight: float = defaults.BIAS_WEIGHT
    variance_weight: float = defaults.VARIANCE_WEIGHT
    fisher: bool = defaults.FISHER
    token_mask: str = "attention"
    max_memory: Optional[int] = None
    solver: str = "auto"
    solver_options: Dict[str, Any] = field(default_factory=dict)
    solve_batch: int = 8
    step_grid: Tuple[float, ...] = tuple(defaults.STEP_GRID)
    holdout_fraction: float = 0.125
    stats_dtype: torch.dtype = torch.float32
    backend: str = "auto"

    def __post_init__(self):
        c = "LoRADAConfig"
        check_number(c, "n_train", self.n_train, positive=True, allow_none=True)
        check_number(c, "damping", self.damping, minimum=0.0)
        if isinstance(self.step_scale, str):
            check_choice(c, "step_scale", self.step_scale, ("auto",), hint="a number >= 0 or 'auto'")
        else:
            check_number(c, "step_scale", self.step_scale, minimum=0.0)
        for name in ("normalize_step", "preserve_output", "freeze_A", "fisher"):
            check_bool(c, name, getattr(self, name))
        check_number(c, "bias_weight", self.bias_weight, minimum=0.0)
        check_number(c, "variance_weight", self.variance_weight, minimum=0.0)
        if self.bias_weight == 0 and self.variance_weight == 0:
            raise ValueError(f"{c}: bias_weight and variance_weight are both 0, so Omega = 0 and every subspace "
                             f"is optimal; enable at least one term")
        check_choice(c, "token_mask", self.token_mask, TOKEN_MASKS)
        check_int(c, "max_memory", self.max_memory, minimum=1, allow_none=True)
        check_choice(c, "solver", self.solver, SOLVERS)
        if not isinstance(self.solver_options, dict) or set(self.solver_options) - {"tol", "maxiter"}:
            raise ValueError(f"{c}: solver_options must be a dict with the keys 'tol' and/or 'maxiter', "
                             f"got {self.solver_options!r}")
        check_number(c, "solver_options['tol']", self.solver_options.get("tol"), positive=True, allow_none=True)
        check_int(c, "solver_options['maxiter']", self.solver_options.get("maxiter"), minimum=1, allow_none=True)
        object.__setattr__(self, "solver_options", dict(self.solver_options))
        check_int(c, "solve_batch", self.solve_batch, minimum=1)
        grid = tuple(self.step_grid) if isinstance(self.step_grid, (list, tuple)) else None
        if not grid:
            raise ValueError(f"{c}: step_grid must be a non-empty sequence of positive numbers, got {self.step_grid!r}")
        for v in grid:
            check_number(c, "step_grid entry", v, positive=True)
        object.__setattr__(self, "step_grid", tuple(float(v) for v in grid))
        check_number(c, "holdout_fraction", self.holdout_fraction, positive=True)
        if self.holdout_fraction >= 1:
            raise ValueError(f"{c}: holdout_fraction must be in (0, 1), got {self.holdout_fraction!r}")
        if self.stats_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"{c}: stats_dtype must be torch.float32 or torch.float64, got {self.stats_dtype!r}")
        check_choice(c, "backend", self.backend, BACKENDS)

    @classmethod
    def ablation(cls, name: str, **kwargs) -> "LoRADAConfig":
        """The paper's Table 6 variants: ``"full"``, ``"no_bias"``, ``"no_variance"``, ``"no_variance_fisher"``."""
        table = {
            "full": {},
            "no_bias": {"bias_weight": 0.0},
            "no_variance": {"variance_weight": 0.0},
            "no_variance_fisher": {"variance_weight": 0.0, "fisher": False},
        }
        if name not in table:
            raise ValueError(f"LoRADAConfig.ablation: name must be one of {sorted(table)}, got {name!r}")
        return cls(**{**table[name], **kwargs})


# ------------------------------------------------------------------------------------------ solves
def _n_train(ctx: InitContext, config: LoRADAConfig, count: int) -> Tuple[float, str]:
    if config.n_train is not None:
        return float(config.n_train), "config"
    examples = ctx.info.get("stats_examples") or 0
    length = ctx.dataset_length()
    if any(packed_sequences(b) is not None for b in ctx.batches):
        # padding-free (packed) batches: dataset rows are packed rows, not examples; count batches instead
        try:
            n_batches = len(ctx.dataloader)
        except TypeError:
            n_batches = 0
        if n_batches:
            return float(n_batches) * count / len(ctx.batches), "len(dataloader) x mean valid tokens per batch (packed)"
        return float(count), _N_FALLBACK
    if length and examples:
        return float(length) * count / examples, "len(dataset) x mean valid tokens per example"
    return float(count), _N_FALLBACK


_N_FALLBACK = "tokens in the statistics samples (the dataloader has no dataset length)"


def _warn_about_statistics(ctx: InitContext) -> None:
    """One warning each (and the report) when N fell back to the statistics tokens, and when layers saw
    fewer statistics tokens than their input dimension (Z is then rank deficient: damping decides A)."""
    if ctx.info.get("n_train_source") == _N_FALLBACK:
        ctx.info.setdefault("warnings", []).append("n_train_fallback")
        warnings.warn("lora_da: n_train fell back to the number of statistics tokens because the dataloader has no "
                      "dataset length; N sets the variance term of Omega, so pass LoRADAConfig(n_train=tokens in "
                      "your training set) or a DataLoader over a sized dataset", LoRAInitWarning, stacklevel=4)
    short = [n for n in ctx.names if ctx.targets[n].kind != "embedding"
             and (ctx.layer_info[n].get("tokens") or 0) < ctx.targets[n].n]
    if short:
        ctx.info["rank_deficient_Z"] = short
        t = ctx.targets[short[0]]
        warnings.warn(f"lora_da: {len(short)} layer(s) saw fewer statistics tokens than their input dimension (e.g. "
                      f"{short[0]!r}: {ctx.layer_info[short[0]].get('tokens')} tokens, n = {t.n}): their Z is rank "
                      f"deficient and the damping decides A there; raise num_samples", LoRAInitWarning, stacklevel=4)


def _solver_row(solver: Dict[str, Any], i: int) -> Dict[str, Any]:
    """The report's solver columns of layer ``i`` of a batched solve (``info["solver"]`` of ``lkm.lora_da``)."""
    return {"solver": solver["solver"],
            "iters": int(torch.as_tensor(solver["iterations"]).reshape(-1)[i]),
            "converged": bool(solver["converged"][i].all()),
            "residual": float(solver["residual"][i].max())}


def layer_seed(name: str) -> int:
    """The LOBPCG seed of a layer: from its name, so its result does not depend on its batch neighbours."""
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def _solve_embeddings(ctx: InitContext, config: LoRADAConfig, part, names, n_train, results, bar) -> None:
    for name in names:
        t, st = ctx.targets[name], part[name]
        t0 = time.perf_counter()
        try:
            factors, info = lkm.lora_da_embedding(
                st.Z, st.G, st.s, t.r, n_train=n_train[name], scaling=t.scaling, damping=config.damping,
                bias_weight=config.bias_weight, variance_weight=config.variance_weight, fisher=config.fisher,
                normalize_step=config.normalize_step, solver=config.solver, **config.solver_options)
        except (ValueError, RuntimeError) as err:
            raise LoRAInitError(f"lora_da: embedding {name!r}: {err}") from err
        row = {"eigenvalues": info["evals"].tolist(), "time_s": time.perf_counter() - t0, "solver": info["solver"],
               "iters": info["iterations"], "converged": info["converged"], "residual": info["residual"],
               "seen_tokens": info["seen_tokens"]}
        if "step_norm" in info:
            row["step_norm"] = info["step_norm"]
        ctx.record(name, **row)
        results[name] = UnitStep(factors.lora_A, factors.lora_B, info["evals"])
        _release(st)
        part[name] = _Solved(st.count)
        bar.update(1)


def _solve_part(ctx: InitContext, config: LoRADAConfig, part, owners, results, solve_batch: int = 1) -> None:
    """Solve the layers of one statistics pass on their owner rank (then broadcast).

    Layers are solved grouped by the input they read: a ``Z`` shared by several layers (q/k/v,
    gate/up; ``LayerStats.z_owner``) is damped and Cholesky-factored **once, in place**
    (``lorainit_kernels.linalg.factor_input_cov(overwrite=True)``: the means are this method's own and
    nobody reads them after the solve), and the factor serves each of its layers, whatever their
    ``m`` (q and k/v under GQA). Each solve may use its ``G`` as workspace (``overwrite=True``: ``G``
    becomes ``H = G Z_d^-1``, then ``dW``), and the last layer of an input turns the factor into
    ``Z_d^-1`` and that into its Omega in place, so a layer's solve allocates no (n, n) or (m, n)
    tensor beyond one Omega (none for a layer that reads its input alone) and, for a shared input,
    the cached ``Z_d^-1``. Layers that read their input alone are solved in runs of up to
    ``solve_batch`` (:func:`_runs`): one batched call on the stack their statistics were accumulated
    in (no copy). A layer's statistics leave ``part`` before its solve (a shared ``Z`` with the last
    of its layers), so their memory is freed as the solve consumes them. Each layer's LOBPCG start is
    seeded from its name and its solve does not depend on its batch, so the adapters depend neither
    on ``max_memory`` nor on ``solve_batch``.
    """
    n_train = {}
    for name, st in part.items():
        N, source = _n_train(ctx, config, st.count)
        n_train[name] = N
        ctx.record(name, n_train=N)
        ctx.info["n_train_source"] = source
    mine = [n for n in part if owners[n] == ctx.rank]
    embeddings = [n for n in mine if part[n].diag]
    units: Dict[str, list] = {}
    for name in mine:
        if not part[name].diag:
            units.setdefault(part[name].z_owner, []).append(name)
    needs_factor = config.fisher or config.variance_weight > 0
    err = None
    bar = ctx.progress_bar(len(mine), "lorainit LoRA-DA solve", unit="layer")
    try:
        _solve_embeddings(ctx, config, part, embeddings, n_train, results, bar)
        alone = [names[0] for names in units.values() if len(names) == 1]
        for run in _runs(ctx, config, part, alone, n_train, solve_batch):
            _solve_run(ctx, config, part, run, n_train[run[0]], results, bar)
        for owner, names in units.items():
            if len(names) == 1:
                continue
            factor = None
            if needs_factor:
                factor = kernel_call(f"lora_da (the input of {owner})", names, lkg.factor_input_cov, part[names[0]].Z,
                                     damping=config.damping, overwrite=True, uses=len(names))
            for name in names:
                st = part[name]
                part[name] = _Solved(st.count)  # the solve consumes G (and Z, with the input's last layer)
                Z = factor if factor is not None else st.Z
                G, s = st.G.unsqueeze(0), st.s.unsqueeze(0)
                _release(st)
                del st
                _solve_call(ctx, config, [name], Z, G, s, n_train[name], results, bar)
                del Z, G, s
            if factor is not None:
                factor.release()
            del factor
        _release_all(part)  # other ranks' layers: this rank does not need their statistics
    except Exception as e:  # agreed below: an error on the owner of a solve stops every rank before any broadcast
        err = e
    finally:
        bar.close()
    if ctx.world > 1:
        dist_utils.agree(err, "lora_da: the solves")
        per_rank = [[] for _ in range(ctx.world)]
        for name in sorted(part):
            t = ctx.targets[name]
            if owners[name] != ctx.rank:
                results[name] = UnitStep(torch.empty(t.r, t.n, device=t.device), torch.empty(t.m, t.r, device=t.device),
                                         torch.empty(t.r, device=t.device))
            per_rank[owners[name]].extend(results[name])
        dist_utils.broadcast_from(per_rank)  # one bucketed broadcast per owner rank
        for name in sorted(part):
            if owners[name] != ctx.rank:
                ctx.record(name, eigenvalues=results[name].eigenvalues.tolist())
    elif err is not None:
        raise err


def _stack_view(tensors: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
    """One ``(len, *shape)`` view of ``tensors`` when they are consecutive slices of one storage (the
    stacks :class:`lorainit.passes.stats.StatsCollector` accumulates in), else None."""
    t0 = tensors[0]
    step = t0.numel()
    for i, t in enumerate(tensors):
        if (t.shape != t0.shape or t.dtype != t0.dtype or t.device != t0.device or not t.is_contiguous()
                or t.untyped_storage().data_ptr() != t0.untyped_storage().data_ptr()
                or t.storage_offset() != t0.storage_offset() + i * step):
            return None
    return t0.as_strided((len(tensors),) + tuple(t0.shape), (step,) + tuple(t0.stride()), t0.storage_offset())


def _runs(ctx: InitContext, config: LoRADAConfig, part, names: Sequence[str], n_train, solve_batch: int):
    """``names`` (layers that read their input alone) in runs solved by one batched call: consecutive
    slices of one statistics stack with the same shape, rank, scaling and ``n_train`` and a LOBPCG
    solve (a batched dense ``eigh`` would hold every layer's eigenvectors at once), at most
    ``solve_batch`` long; every other layer is a run of its own."""
    runs: List[List[str]] = []
    open_runs: Dict[tuple, List[str]] = {}  # per (shape, rank, scaling, n_train): the run that may grow
    for name in names:
        t = ctx.targets[name]
        key = (t.n, t.m, t.r, t.scaling, n_train[name])
        prev = open_runs.get(key)
        if prev is not None and len(prev) < solve_batch and memory.layer_solver(t, config.solver) == "lobpcg" and all(
                _stack_view([getattr(part[n], k) for n in prev + [name]]) is not None for k in ("Z", "G", "s")):
            prev.append(name)
            continue
        runs.append([name])
        open_runs[key] = runs[-1]
    return runs


def _solve_run(ctx: InitContext, config: LoRADAConfig, part, run: List[str], n_train: float, results, bar) -> None:
    """One batched solve of the layers ``run`` (reading their inputs alone) on their statistics' stack."""
    sts = [part[n] for n in run]
    Z, G, s = (_stack_view([getattr(st, k) for st in sts]) if len(run) > 1 else getattr(sts[0], k).unsqueeze(0)
               for k in ("Z", "G", "s"))
    for name, st in zip(run, sts):
        part[name] = _Solved(st.count)  # the solve consumes the stack
        _release(st)
    del sts
    _solve_call(ctx, config, run, Z, G, s, n_train, results, bar)


def _solve_call(ctx: InitContext, config: LoRADAConfig, run: List[str], Z, G, s, n_train: float, results, bar) -> None:
    """``lorainit_kernels.methods.lora_da`` on the layers ``run`` (one shape; ``Z`` a stack, a single
    layer's or an ``InputFactor``), in place, each layer's LOBPCG start seeded from its name."""
    t = ctx.targets[run[0]]
    t0 = time.perf_counter()
    factors, info = kernel_call(
        f"lora_da (shape {t.m}x{t.n}, r={t.r})", run, lkm.lora_da, Z, G, s, t.r, n_train=n_train,
        scaling=t.scaling, step_scale=1.0, normalize_step=config.normalize_step, preserve_output=False,
        damping=config.damping, bias_weight=config.bias_weight, variance_weight=config.variance_weight,
        fisher=config.fisher, solver=config.solver, seeds=[layer_seed(n) for n in run], overwrite=True,
        **config.solver_options)
    seconds = (time.perf_counter() - t0) / len(run)
    for i, name in enumerate(run):
        row = {"eigenvalues": info["evals"][i].tolist(), "time_s": seconds, "batched_with": len(run),
               **_solver_row(info["solver"], i)}
        if info.get("step_norm") is not None:
            row["step_norm"] = float(info["step_norm"][i])
        ctx.record(name, **row)
        results[name] = UnitStep(factors.lora_A[i].float().clone(), factors.lora_B[i].float().clone(),
                                 info["evals"][i].float().clone())
        bar.update(1)
    bar.set_postfix(layer=".".join(run[-1].split(".")[-3:]), refresh=False)


def _release(st) -> None:
    """Drop a layer's statistics tensors from its ``LayerStats`` itself: a reference to the object that
    outlives the solve (e.g. a loop variable of the pass that yielded it) then holds no memory."""
    st.Z = st.G = st.s = None


def _release_all(part) -> None:
    for name in list(part):
        if not isinstance(part[name], _Solved):
            _release(part[name])
            part[name] = _Solved(part[name].count)


class UnitStep(NamedTuple):
    """A solved layer at unit step (``eta = 1``) in PEFT form; the step search scales ``lora_B`` only."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    eigenvalues: torch.Tensor


class _Solved:
    """What stays of a solved layer's statistics: its token count."""

    def __init__(self, count: int):
        self.count = count


def _factors(ctx: InitContext, results, eta: float, preserve: bool) -> Dict[str, LoRAFactors]:
    """PEFT factors at step ``eta`` (``preserve``: base_delta from the cast factors, in fp32)."""
    return {name: finalize(ctx.targets[name], step.lora_A, eta * step.lora_B, subtract_init=preserve)
            for name, step in results.items()}


# ------------------------------------------------------------------------------------------ step size
def search_step_grid(grid: Sequence[float], loss: Callable[[float], float]) -> Dict[float, float]:
    """Held-out losses of a coarse-to-fine search over the ascending step sizes ``grid``.

    First ``grid[0]`` and every other point from the largest down to ``grid[2]``; then the unscored points between
    the best coarse point and its coarse neighbours. When the loss is unimodal along the grid this
    finds the grid's minimum with fewer forward passes than scoring every point (on a grid of 8,
    at most 7; the default 4-point grid is scored whole); otherwise it still returns the best point
    it scored. Returns {eta: loss}.
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


# ------------------------------------------------------------------------------------------ method
def lora_da_init(ctx: InitContext, config: LoRADAConfig) -> Dict[str, LoRAFactors]:
    """LoRA-DA factors of every target (see the module docstring); the method ``"lora_da"``."""
    check_rank(ctx.targets, "lora_da")
    auto = config.step_scale == "auto"
    if auto:
        stat_batches, holdout = ctx.split_holdout(config.holdout_fraction)
    else:
        stat_batches, holdout = ctx.batches, []
    owners = dist_utils.assign_ranks(ctx.names, ctx.world)
    results: Dict[str, tuple] = {}
    sharing = memory.structural_sharing(ctx.targets)
    readers: Dict[str, int] = {}
    for name in ctx.names:
        readers[sharing[name]] = readers.get(sharing[name], 0) + 1
    work = (lambda name: memory.solve_bytes(ctx.targets[name], config.solver, config.stats_dtype,
                                            shares_input=readers[sharing[name]] > 1))
    if config.max_memory is not None:
        plan = memory.plan_lora_da(ctx.targets, ctx.names, sharing, config.max_memory,
                                   solver=config.solver, dtype=config.stats_dtype)
        ctx.info["memory"] = {"budget": config.max_memory, "predicted_peak": plan.peak_bytes,
                              "smallest_budget": plan.smallest_budget}
        if not plan.fits:
            warnings.warn(f"LoRADAConfig.max_memory={config.max_memory} bytes is below one layer's working set (its "
                          f"statistics and solve): the peak will be about {plan.peak_bytes} bytes; the smallest "
                          f"budget that works is {plan.smallest_budget} bytes (lorainit.estimate_memory)",
                          RuntimeWarning, stacklevel=3)
    stack = config.solve_batch if config.max_memory is None else 1  # a budget's peaks were measured layer by layer
    for part in ctx.iter_stats(ctx.names, batches=stat_batches, max_memory=config.max_memory,
                               dtype=config.stats_dtype, backend=config.backend, token_mask=config.token_mask,
                               working_set=work, stack_size=stack):
        with ctx.timed("solve"):
            _solve_part(ctx, config, part, owners, results, stack)
        del part
        memory.release_freed_host_memory()  # the pass's freed statistics and workspace, back to the OS
    missing = [n for n in ctx.names if n not in results]
    if missing:
        raise LoRAInitError(f"LoRA-DA produced no factors for {missing[:5]}")
    ctx.info["n_train"] = sorted({ctx.layer_info[n]["n_train"] for n in ctx.names})[:4]
    _warn_about_statistics(ctx)
    if auto:
        with ctx.timed("step_search"):
            grid = (0.0,) + tuple(sorted(config.step_grid))
            # at most every grid point is scored (the search usually needs fewer: the bar may end early)
            bar = ctx.progress_bar(len(grid), "lorainit LoRA-DA step search", unit="step size")

            def held_out_loss(eta: float) -> float:
                ctx.write(_factors(ctx, results, eta, preserve=False))
                loss = ctx.eval_loss(holdout, token_mask="attention")
                bar.update(1)
                bar.set_postfix(eta=f"{eta:g}", loss=f"{loss:.4g}", refresh=False)
                return loss

            try:
                scores = search_step_grid(grid, held_out_loss)
            finally:
                bar.close()
            finite = {k: v for k, v in scores.items() if math.isfinite(v)}
            if not finite:
                raise LoRAInitError(f"step_scale='auto': every step size gave a NaN/Inf held-out loss: {scores}")
            eta = min(finite, key=lambda k: (finite[k], k))
        fallback = eta == 0.0
        ctx.info["step_search"] = {"scores": {str(k): v for k, v in scores.items()}, "held_out_batches": len(holdout),
                                   "fallback": fallback}
        if fallback:
            shown = ", ".join(f"{k:g}: {v:.4g}" for k, v in scores.items())
            warnings.warn(f"lora_da step_scale='auto': no step of the grid lowered the held-out loss, so the "
                          f"adapters start with B = 0 (only A is data-aware); held-out loss by eta: {shown}. "
                          f"Try a smaller step_grid or a numeric step_scale", LoRAInitWarning, stacklevel=3)
    else:
        eta = float(config.step_scale)
    ctx.info["step_scale"] = eta
    return _factors(ctx, results, eta, preserve=config.preserve_output)


LORA_DA = MethodSpec("lora_da", fn=lora_da_init, config_cls=LoRADAConfig, needs_data=True, needs_grad=True,
                     paper=PAPER, summary="K-FAC Fisher + guidance matrix; A = r smallest eigenvectors (LOBPCG)")
