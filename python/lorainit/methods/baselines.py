"""The baseline LoRA initializations behind ``initialize_lora(..., method=NAME)``, with their configs.

Declared here: ``"lora"``, ``"gaussian"``, ``"orthogonal"`` (PEFT's random inits), ``"pissa"``,
``"milora"`` (weight SVD), ``"lora_ga"``, ``"lora_one"`` (gradient SVD).

The per-layer math is :mod:`lorainit_kernels.methods` (formulas, papers and reference code in each
function's docstring); this module only gathers the inputs (base weights in torch orientation,
full weight gradients), stacks the layers of one shape (same ``m, n, r`` and PEFT scaling ``sigma``)
into one batched kernel call and hands the factors to ``initialize_lora``, which writes them
transactionally (``lora_A.weight``, ``lora_B.weight`` and, for PiSSA / MiLoRA / LoRA-GA, the
residual ``W <- W - sigma B A`` so that the model's output at initialization is unchanged).

Conventions:

* Random methods draw from one ``torch.Generator`` seeded with ``config.seed`` (``None``: torch's
  global RNG), shape group after shape group (groups in order of their first layer in the model,
  layers in model order within a group). A batched kernel call consumes the generator one layer
  after another, so the result is the same as one call per layer in that order.
* Gradient methods use ``ctx.collect_weight_grads()``: ``G = (1/T) sum_t g_t x_t^T`` with ``g_t``
  the output gradient of the *summed* loss and ``T`` the number of valid (attention-mask) tokens
  (docs/math.md), i.e. the gradient of the per-token mean loss over all samples. The
  LoRA-GA reference (Outsider565/LoRA-GA ``estimate_gradient``) averages the gradients of the
  model's *mean* loss over batches instead; the two differ by a positive factor (the ratio of loss
  tokens to valid tokens, e.g. ``(s - 1)/s`` for a causal LM whose last position has no label, and
  by how batches of unequal lengths are weighted). LoRA-GA (every ``scale``) and LoRA-One with
  ``normalize=True`` (the default, as its reference code) only use the singular *vectors* or the
  ratios ``S_i / S_1``, so they are invariant to that factor; only LoRA-One with
  ``normalize=False`` (the paper's formula ``B A = [-G]_r / gamma``) depends on the gradient scale.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor

import lorainit_kernels.methods as lkm

from .. import distributed as dist_utils
from .. import memory
from ..adapters import LoRAFactors
from ..configs import InitConfig, check_bool, check_choice, check_int, check_number, check_seed
from ..context import InitContext
from ..passes.stats import pack_passes
from ..targets import LoRAInitError, LoRAInitWarning, check_rank
from .common import MethodSpec, finalize, generator, kernel_call, layer_groups, solve_spread

__all__ = ["BaselineConfig", "PiSSAConfig", "MiLoRAConfig", "LoRAGAConfig", "LoRAOneConfig", "SPECS"]

PAPERS = {
    "lora": "Hu et al. 2021, LoRA: Low-Rank Adaptation of Large Language Models, arXiv 2106.09685 (PEFT default)",
    "gaussian": "PEFT init_lora_weights='gaussian' (A ~ N(0, 1/r^2), B = 0)",
    "orthogonal": "PEFT init_lora_weights='orthogonal' (B A = 0 with both factors non-zero)",
    "pissa": "Meng, Wang & Zhang 2024, PiSSA: Principal Singular Values and Singular Vectors Adaptation, "
             "arXiv 2404.02948",
    "milora": "Wang et al. 2024, MiLoRA: Harnessing Minor Singular Components for Parameter-Efficient LLM "
              "Finetuning, arXiv 2406.09044",
    "lora_ga": "Wang, Li, Wang & Zhou 2024, LoRA-GA: Low-Rank Adaptation with Gradient Approximation, "
               "arXiv 2407.05000",
    "lora_one": "Zhang, Liu & Chen 2025, LoRA-One: One-Step Full Gradient Could Suffice for Fine-Tuning LLMs, "
                "arXiv 2502.01235",
}


# ------------------------------------------------------------------------------------------ configs
@dataclass(frozen=True)
class BaselineConfig(InitConfig):
    """Options of the data-free random inits ``"lora"``, ``"gaussian"`` and ``"orthogonal"``.

    Args:
        seed: seed of the ``torch.Generator`` the factors are drawn from (default 0, reproducible);
            None draws from torch's global RNG (as PEFT does when it creates the adapter).
        max_batch: at most this many layers of one shape per kernel call (None: all of them);
            bounds the memory of the stacked inputs. Does not change the result of random inits.
    """

    seed: Optional[int] = 0
    max_batch: Optional[int] = None

    def __post_init__(self):
        c = type(self).__name__
        check_seed(c, self.seed)
        check_int(c, "max_batch", self.max_batch, minimum=1, allow_none=True)


@dataclass(frozen=True)
class PiSSAConfig(InitConfig):
    """PiSSA (Meng et al. 2024, arXiv 2404.02948): adapter = top-r singular components of ``W``.

    Args:
        niter: None (default) = exact SVD (PEFT ``init_lora_weights="pissa"``); an int ``k`` = the
            fast randomized SVD with ``k`` subspace iterations (PEFT ``"pissa_niter_k"``).
        oversample: extra sketch columns of the randomized SVD (0 = PEFT's ``torch.svd_lowrank``
            with ``q = r``; the default 16 is more accurate at the same ``niter``).
        seed: seed of the sketch (randomized SVD only); None = torch's global RNG.
        max_batch: at most this many same-shape layers per SVD call (None: all). With the
            randomized SVD one sketch is shared within a call.
    """

    niter: Optional[int] = None
    oversample: int = 16
    seed: Optional[int] = 0
    max_batch: Optional[int] = None

    def __post_init__(self):
        c = "PiSSAConfig"
        check_int(c, "niter", self.niter, minimum=0, allow_none=True)
        check_int(c, "oversample", self.oversample, minimum=0)
        check_seed(c, self.seed)
        check_int(c, "max_batch", self.max_batch, minimum=1, allow_none=True)


@dataclass(frozen=True)
class MiLoRAConfig(InitConfig):
    """MiLoRA (Wang et al. 2024, arXiv 2406.09044): adapter = the r *minor* singular components of ``W``.

    Always an exact SVD (randomized SVDs do not resolve the smallest singular values).
    ``max_batch``: at most this many same-shape layers per SVD call (None: all).
    """

    max_batch: Optional[int] = None

    def __post_init__(self):
        check_int("MiLoRAConfig", "max_batch", self.max_batch, minimum=1, allow_none=True)


def _check_gradient_options(c: str, config) -> None:
    """The fields LoRA-GA and LoRA-One share: stable_gamma, the randomized SVD, token_mask, max_batch."""
    check_number(c, "stable_gamma", config.stable_gamma, positive=True)
    check_int(c, "niter", config.niter, minimum=0, allow_none=True)
    check_int(c, "oversample", config.oversample, minimum=0, allow_none=True)
    check_seed(c, config.seed)
    check_choice(c, "token_mask", config.token_mask, ("attention", "labels"))
    check_int(c, "max_batch", config.max_batch, minimum=1, allow_none=True)
    check_int(c, "max_memory", config.max_memory, minimum=1, allow_none=True)


@dataclass(frozen=True)
class LoRAGAConfig(InitConfig):
    """LoRA-GA (Wang et al. 2024, arXiv 2407.05000): factors from the top 2r singular vectors of the gradient.

    Defaults follow the reference code (Outsider565/LoRA-GA): ``direction="ArB2r"``,
    ``scale="stable"`` with ``stable_gamma=16`` and a randomized SVD with ``q = 4r`` sketch columns
    and ``niter=4`` subspace iterations (``niter=None``: exact SVD). The initial adapter is
    subtracted from the base weight (the model is unchanged at initialization). The gradient is the
    per-token mean-loss gradient over the first ``num_samples`` examples (module docstring).

    Args:
        direction: ``"ArB2r"``, ``"A2rBr"`` or ``"ArBr"`` (which singular vectors go to A and B).
        scale: ``"stable"`` (``A, B *= m^(1/4) / sqrt(stable_gamma)``), ``"unit"`` or ``"gd"`` (``/ sigma``).
        stable_gamma: gamma of the stable scale. niter / oversample / seed: the randomized SVD
            (``oversample=None``: ``q = min(4r, m, n)`` as the reference). token_mask: ``"attention"``
            or ``"labels"`` (which tokens the gradient averages over). max_batch: layers per SVD call.
        max_memory: bytes bounding the weight-gradient accumulators plus one SVD call's stacked
            gradients (:func:`gradient_groups`); None = every layer in one pass.
    """

    direction: str = "ArB2r"
    scale: str = "stable"
    stable_gamma: float = 16.0
    niter: Optional[int] = 4
    oversample: Optional[int] = None
    seed: Optional[int] = 0
    token_mask: str = "attention"
    max_batch: Optional[int] = None
    max_memory: Optional[int] = None

    def __post_init__(self):
        c = "LoRAGAConfig"
        check_choice(c, "direction", self.direction, ("ArB2r", "A2rBr", "ArBr"))
        check_choice(c, "scale", self.scale, ("stable", "unit", "gd"))
        _check_gradient_options(c, self)


@dataclass(frozen=True)
class LoRAOneConfig(InitConfig):
    """LoRA-One (Zhang, Liu & Chen 2025, arXiv 2502.01235): the adapter starts at a best-rank-r GD step.

    ``sigma B A = sigma / (stable_gamma d) [-G]_r`` with ``d = S_1(G)`` when ``normalize`` (the
    reference code YuanheZ/LoRA-One, default) else 1 (the paper's formula; then the result depends
    on the gradient's scale, see the module docstring). By default the base weight is *not* changed
    (the model moves by that step at initialization); ``subtract_init=True`` subtracts it.

    Args:
        stable_gamma: gamma (default 128, the reference's value). normalize, subtract_init: above.
        niter / oversample / seed: randomized SVD (``niter=None``, default: exact SVD).
        token_mask: ``"attention"`` or ``"labels"``. max_batch: layers per SVD call.
        max_memory: as for :class:`LoRAGAConfig`.
    """

    stable_gamma: float = 128.0
    normalize: bool = True
    subtract_init: bool = False
    niter: Optional[int] = None
    oversample: int = 16
    seed: Optional[int] = 0
    token_mask: str = "attention"
    max_batch: Optional[int] = None
    max_memory: Optional[int] = None

    def __post_init__(self):
        c = "LoRAOneConfig"
        for name in ("normalize", "subtract_init"):
            check_bool(c, name, getattr(self, name))
        check_int(c, "oversample", self.oversample, minimum=0)
        _check_gradient_options(c, self)


# ------------------------------------------------------------------------------------------ random inits
def _random_embedding(ctx: InitContext, method: str, names: List[str], gen) -> Dict[str, LoRAFactors]:
    """PEFT's init of an embedding adapter (``init_lora_weights=True`` and ``"gaussian"`` alike):
    ``lora_embedding_A = 0``, ``lora_embedding_B ~ N(0, 1)``; PEFT defines no orthogonal init for embeddings."""
    if method == "orthogonal":
        raise LoRAInitError(f"orthogonal: cannot initialize the embedding targets {names[:4]}: PEFT defines the "
                            f"orthogonal init only for linear layers (embedding adapters start from A = 0, B ~ N(0, 1)); "
                            f"use method='lora' or leave the embeddings out of target_modules")
    out = {}
    for name in names:
        t = ctx.targets[name]
        A = torch.zeros(t.r, t.n, dtype=t.lora_A.dtype)
        B = torch.randn(t.m, t.r, generator=gen, dtype=torch.float32).to(t.lora_B.dtype)
        out[name] = finalize(t, A, B)
        ctx.record(name, init="PEFT embedding init: A = 0, B ~ N(0, 1)")
    return out


def _random_init(kernel: Callable, method: str) -> Callable:
    def init(ctx: InitContext, config: BaselineConfig) -> Dict[str, LoRAFactors]:
        check_rank(ctx.targets, method)
        gen = generator(config.seed)
        out: Dict[str, LoRAFactors] = {}
        key = (lambda t: (t.m, t.n, t.r))
        embeddings = [n for n, t in ctx.targets.items() if t.kind == "embedding"]
        if embeddings and method == "orthogonal":
            _random_embedding(ctx, method, embeddings, gen)  # raises: not defined for embeddings
        linear = [n for n in ctx.names if n not in embeddings]
        for (m, n, r), names in layer_groups(ctx.targets, linear, max_batch=config.max_batch, key=key):
            t0 = time.perf_counter()
            lora_A = ctx.targets[names[0]].lora_A
            f = kernel_call(method, names, kernel, m, n, r, batch_shape=(len(names),), generator=gen,
                            dtype=lora_A.dtype, device=lora_A.device)
            dt = (time.perf_counter() - t0) / len(names)
            for i, name in enumerate(names):
                out[name] = finalize(ctx.targets[name], f.lora_A[i], f.lora_B[i])
                ctx.record(name, time_s=dt, time_group_size=len(names))  # one batched call: an even share
        if embeddings:  # after the linear layers, from the same generator
            out.update(_random_embedding(ctx, method, embeddings, gen))
        if ctx.world > 1:  # cheap draws on every rank; rank 0's win (seed=None draws from each rank's own RNG)
            dist_utils.broadcast_tensors([x for f in out.values() for x in (f.lora_A, f.lora_B)], src=0)
        ctx.info["seed"] = config.seed
        return out

    init.__name__ = f"{method}_init"
    init.__doc__ = f"``{method}``: :func:`lorainit_kernels.methods.{kernel.__name__}` per shape group (seeded)."
    return init


# ------------------------------------------------------------------------------------------ weight SVD
def _weight_svd(ctx: InitContext, method: str, fn: Callable, max_batch: Optional[int], generator=None, **kwargs):
    """``fn`` (``lkm.pissa`` or ``lkm.milora``) on the stacked base weights of each shape group.

    The full weights are read one layer at a time (an all-gather each for FSDP2) and the groups'
    solves are spread over the ranks (:func:`~lorainit.methods.common.solve_spread`).
    """
    check_rank(ctx.targets, method)

    def solve(key, names, inputs):
        m, n, r, scaling = key
        t0 = time.perf_counter()
        f = kernel_call(method, names, fn, torch.stack([inputs[k] for k in names]), r, scaling=scaling,
                        generator=generator, **kwargs)
        dt = (time.perf_counter() - t0) / len(names)
        for name in names:
            ctx.record(name, time_s=dt, time_group_size=len(names))  # one batched call: an even share
        return {name: (f.lora_A[i], f.lora_B[i], f.base_delta[i]) for i, name in enumerate(names)}

    out: Dict[str, LoRAFactors] = {}
    with ctx.timed("svd"):
        groups = layer_groups(ctx.targets, max_batch=max_batch)
        solved = solve_spread(ctx, method, groups, solve, read=lambda k: ctx.targets[k].read_weight(),
                              with_delta=True, gen=generator)
        for (m, n, r, scaling), names in groups:
            for name in names:
                A, B, D = solved[name]
                out[name] = finalize(ctx.targets[name], A, B, D)
                sv = (scaling * A.float().pow(2).sum(-1)).tolist()  # sigma |a_i|^2 = S_i
                ctx.record(name, singular_values=sv)
    return out


def pissa_init(ctx: InitContext, config: PiSSAConfig) -> Dict[str, LoRAFactors]:
    """PiSSA: ``lkm.pissa`` on the stacked base weights of each shape group; the residual goes to the base."""
    out = _weight_svd(ctx, "pissa", lkm.pissa, config.max_batch, niter=config.niter, oversample=config.oversample,
                      generator=generator(config.seed))
    ctx.info["svd"] = "exact" if config.niter is None else f"randomized (niter={config.niter}, oversample={config.oversample})"
    return out


def milora_init(ctx: InitContext, config: MiLoRAConfig) -> Dict[str, LoRAFactors]:
    """MiLoRA: ``lkm.milora`` on the stacked base weights of each shape group; the residual goes to the base."""
    return _weight_svd(ctx, "milora", _no_generator(lkm.milora), config.max_batch)


def _no_generator(fn: Callable) -> Callable:
    def call(*args, generator=None, **kwargs):
        return fn(*args, **kwargs)
    return call


# ------------------------------------------------------------------------------------------ gradient SVD
def gradient_groups(ctx: InitContext, max_memory: Optional[int]) -> List[List[str]]:
    """The targets in model order, cut into weight-gradient passes that fit in ``max_memory`` bytes.

    :func:`lorainit.memory.plan_grad_groups` on the fp32 accumulators (:func:`lorainit.memory.grad_bytes`):
    a pass holds its accumulators until they are solved; its SVD calls then stack at most what the
    budget leaves (:func:`_chunk_by_bytes`, one layer at a time when nothing is left: a one-layer call
    stacks a view, no copy).
    """
    return memory.plan_grad_groups(ctx.names, {n: memory.grad_bytes(ctx.targets[n]) for n in ctx.names},
                                   max_memory)


def _chunk_by_bytes(ctx: InitContext, names: List[str], room: Optional[int]) -> List[List[str]]:
    """``names`` (one shape group) in runs whose stacked fp32 gradients fit in ``room`` bytes (one layer
    per run at least): the packing rule of :func:`lorainit.passes.stats.pack_passes`."""
    if room is None:
        return [names]
    return pack_passes([([n], memory.grad_bytes(ctx.targets[n]), 0) for n in names], room)


def _grads(ctx: InitContext, token_mask: str, names: List[str]) -> Dict[str, Tensor]:
    grads, tokens = ctx.collect_weight_grads(names, token_mask=token_mask)
    ctx.info["grad_tokens"] = tokens
    for name, g in grads.items():
        ctx.record(name, grad_norm=float(g.norm()))
        if not bool(g.abs().amax() > 0):
            raise LoRAInitError(f"module {name!r}: its weight gradient is exactly zero over the samples; the loss "
                                f"does not depend on this layer (cannot take singular vectors of a zero gradient)")
    return grads


def _gradient_method(ctx: InitContext, config, name: str, fn, **kwargs) -> Dict[str, LoRAFactors]:
    """``fn`` (``lkm.lora_ga`` or ``lkm.lora_one``) on the stacked weight gradients of each shape group.

    With ``config.max_memory`` the gradients come in several passes (:func:`gradient_groups`), each
    solved and dropped before the next. With a seed, every SVD call draws its sketch from a generator
    freshly seeded with ``config.seed``, so a layer's factors do not depend on which layers share its
    call (the same adapters for every ``max_memory`` and ``max_batch``).
    """
    shared_gen = generator(config.seed)
    with_delta = name == "lora_ga" or bool(getattr(config, "subtract_init", False))
    passes = gradient_groups(ctx, config.max_memory)
    if config.max_memory is not None:
        over = [n for n in ctx.names if 2 * memory.grad_bytes(ctx.targets[n]) > config.max_memory]
        ctx.info["memory"] = {"budget": config.max_memory, "passes": len(passes), "over_budget": over[:8]}
        if over:
            warnings.warn(f"{name}: max_memory={config.max_memory} bytes is below one layer's weight-gradient working "
                          f"set (its fp32 accumulator and the solve; e.g. {over[0]!r}: "
                          f"{2 * memory.grad_bytes(ctx.targets[over[0]])} bytes); such layers get a pass of their own and "
                          f"exceed the budget", LoRAInitWarning, stacklevel=4)
    ctx.info["passes"] = len(passes)
    out: Dict[str, LoRAFactors] = {}
    for group in passes:
        grads = _grads(ctx, config.token_mask, group)

        def solve(key, names, inputs):
            m, n, r, scaling = key
            G = grads[names[0]].unsqueeze(0) if len(names) == 1 else torch.stack([grads[k] for k in names])
            gen = generator(config.seed) if config.seed is not None else shared_gen
            f = kernel_call(name, names, fn, G, r, scaling=scaling, niter=config.niter, oversample=config.oversample,
                            generator=gen, **kwargs)
            del G
            for k in names:  # the accumulator is not needed once its layer is solved
                grads.pop(k, None)
            return {layer: (f.lora_A[i], f.lora_B[i], None if f.base_delta is None else f.base_delta[i])
                    for i, layer in enumerate(names)}

        held = sum(memory.grad_bytes(ctx.targets[k]) for k in group)
        room = None if config.max_memory is None else max(config.max_memory - held, 0)
        groups = [(key, chunk) for key, names in layer_groups(ctx.targets, group, max_batch=config.max_batch)
                  for chunk in _chunk_by_bytes(ctx, names, room)]
        with ctx.timed("svd"):
            for layer, (A, B, D) in solve_spread(ctx, name, groups, solve, with_delta=with_delta,
                                                 gen=shared_gen).items():
                out[layer] = finalize(ctx.targets[layer], A, B, D)
        del grads
    ctx.info["gradient"] = "per-token mean of the summed-loss gradient, (1/T) sum_t g_t x_t^T"
    return out


def lora_ga_init(ctx: InitContext, config: LoRAGAConfig) -> Dict[str, LoRAFactors]:
    """LoRA-GA: ``lkm.lora_ga`` on the stacked weight gradients of each shape group; residual to the base."""
    for t in ctx.targets.values():
        if 2 * t.r > min(t.m, t.n):
            raise LoRAInitError(f"lora_ga: module {t.name!r} has r={t.r} but LoRA-GA needs 2r <= min(m, n) = "
                                f"min({t.m}, {t.n}) (it uses the top 2r singular vectors of the gradient)")
    return _gradient_method(ctx, config, "lora_ga", lkm.lora_ga, direction=config.direction, scale=config.scale,
                            stable_gamma=config.stable_gamma)


def lora_one_init(ctx: InitContext, config: LoRAOneConfig) -> Dict[str, LoRAFactors]:
    """LoRA-One: ``lkm.lora_one`` on the stacked weight gradients of each shape group (base unchanged by default)."""
    check_rank(ctx.targets, "lora_one")
    return _gradient_method(ctx, config, "lora_one", lkm.lora_one, stable_gamma=config.stable_gamma,
                            normalize=config.normalize, subtract_init=config.subtract_init)


# ------------------------------------------------------------------------------------------ specs
def _spec(name: str, fn: Callable, config_cls, summary: str, needs_data: bool = False) -> MethodSpec:
    return MethodSpec(name, fn=fn, config_cls=config_cls, needs_data=needs_data, needs_grad=needs_data,
                      paper=PAPERS[name], summary=summary)


LORA = _spec("lora", _random_init(lkm.lora_default, "lora"), BaselineConfig, "PEFT default: kaiming-uniform A, zero B")
GAUSSIAN = _spec("gaussian", _random_init(lkm.gaussian, "gaussian"), BaselineConfig, "Gaussian A (std 1/r), zero B")
ORTHOGONAL = _spec("orthogonal", _random_init(lkm.orthogonal, "orthogonal"), BaselineConfig,
                   "orthogonal A and B with B A = 0 (even r)")
PISSA = _spec("pissa", pissa_init, PiSSAConfig, "top-r singular components of W in the adapter, residual in the base")
MILORA = _spec("milora", milora_init, MiLoRAConfig, "minor r singular components of W in the adapter, residual in the base")
LORA_GA = _spec("lora_ga", lora_ga_init, LoRAGAConfig, "top-2r gradient singular vectors, stable scale, residual in the "
                "base", needs_data=True)
LORA_ONE = _spec("lora_one", lora_one_init, LoRAOneConfig, "best rank-r one-step GD update from the full gradient",
                 needs_data=True)
SPECS = (LORA, GAUSSIAN, ORTHOGONAL, PISSA, MILORA, LORA_GA, LORA_ONE)
