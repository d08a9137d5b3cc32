"""HRP (High-Rank Preheating) on a PEFT model: its config and the method ``initialize_lora(..., method="hrp")``.

Chen, Wang, Fu, Shen, Jing, Tian & Tao (2025), "HRP: High-Rank Preheating for Superior LoRA
Initialization", arXiv 2502.07739. Math conventions: docs/math.md. Per target layer ``W`` (m, n):

1. **Preheat.** A rank-``R`` *asymmetric* LoRA branch ``delta W = B_pre A_pre`` is attached to every
   target layer: for RSI (``side="A"``, default) ``A_pre`` (R, n) is random and frozen and
   ``B_pre`` (m, R) starts at 0 and is trained; for LSI (``side="B"``) the other way round.
   The frozen factor has Haar-random orthonormal rows/columns
   (:func:`lorainit_kernels.methods.hrp_preheat_factors`: perfectly conditioned for every ``R``,
   so a few hundred steps suffice). The branch is trained for ``steps`` optimizer steps
   (AdamW, constant learning rate) on the dataloader with every model parameter frozen; the
   dataloader is cycled (with a warning) if it ends earlier.
2. **Directions.** ``B_pre A_pre = U S V^T`` from the factors (QR of each factor + an R x R core
   SVD, :func:`lorainit_kernels.linalg.svd_of_product`, batched over layers of one shape,
   via :func:`lorainit_kernels.methods.hrp`), never forming the m x n product.
3. **Init.** The preheat branch is discarded and the user's rank-``r`` adapter is written:
   RSI ``lora_A = V[:, :r]^T, lora_B = 0``; LSI ``lora_B = U[:, :r], lora_A = 0``. Only the
   directions are kept: the base weights are unchanged and the user's optimizer starts fresh.

The preheat branch is *not* a PEFT adapter: it is a forward hook on each target's LoRA layer that
adds ``B_pre A_pre x`` (fp32 tensors held here, never registered in the model) while the user's
LoRA branches are disabled. So the user's adapter name, active adapter, ``peft_config``,
``state_dict`` and parameter list are never touched, it works for classic and frozen-A
(asymmetric) LoRA alike, and the hooks are removed on every exit path (``initialize_lora``
additionally restores the whole model on error).

Loss: ``HRPConfig.loss_fn(model, batch)`` if given (minimized as returned, e.g. a mean loss),
else ``initialize_lora``'s ``loss_fn`` (a summed loss, divided by the batch's number of examples),
else the model's own mean loss from the batch (``labels`` added from ``input_ids`` for causal LMs
as in the statistics pass). With a user ``loss_fn`` every batch reaches it exactly as the
dataloader yielded it. HRP trains on the dataloader itself: ``num_samples`` is not used.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

import lorainit_kernels.methods as lkm

from .. import distributed as dist_utils
from ..adapters import LoRAFactors
from ..configs import InitConfig, check_bool, check_choice, check_int, check_number, check_seed
from ..context import InitContext
from ..passes.batches import has_loss_tokens
from ..targets import LoRAInitError, LoRAInitWarning, check_rank
from .common import MethodSpec, finalize, generator, kernel_call, layer_groups, solve_spread

__all__ = ["HRPConfig", "hrp_init", "HRPDataWarning", "HRP"]

PAPER = ("Chen et al. 2025, HRP: High-Rank Preheating for Superior LoRA Initialization, arXiv 2502.07739")

_OPTIMIZERS = ("adamw", "adam", "sgd")


class HRPDataWarning(UserWarning):
    """The dataloader ended before the preheat's ``steps``: it was cycled."""


@dataclass(frozen=True)
class HRPConfig(InitConfig):
    """HRP (Chen et al. 2025, arXiv 2502.07739) options.

    Args:
        rank: preheat rank ``R`` (default 128); must exceed every target's LoRA rank ``r``. Capped
            per layer at ``in_features`` (``side="A"``) / ``out_features`` (``side="B"``), where the
            preheat is full rank (the report lists the rank used per layer).
        steps: number ``S`` of preheat optimizer steps (default 200), one batch each. More steps than
            the dataloader has batches cycle it: a warning says how many passes before the preheat starts.
        lr: constant learning rate of the preheat (default 1e-4). Only the directions of the
            preheated product are kept, so what matters is that the preheat makes progress
            without diverging: choose about the learning rate that trains plain LoRA stably.
        side: ``"A"`` (RSI, default: ``A_pre`` frozen, ``B_pre`` trained; init ``lora_A = V_r^T``,
            ``lora_B = 0``) or ``"B"`` (LSI: ``B_pre`` frozen, ``A_pre`` trained; init
            ``lora_B = U_r``, ``lora_A = 0``). The factor set to 0 must be trainable in the user's
            model (frozen-A LoRA needs ``side="A"``).
        loss_fn: ``loss_fn(model, batch) -> scalar`` minimized by the preheat (overrides
            ``initialize_lora``'s ``loss_fn`` for HRP); batches reach it exactly as yielded.
        optimizer: ``"adamw"`` (default, the paper's), ``"adam"`` or ``"sgd"``.
        weight_decay, betas, eps: optimizer hyper-parameters (AdamW weight decay default 0: the
            preheat is short and starts at 0).
        init_scale: norm of each row (column for ``side="B"``) of the frozen random factor (default 1).
        train_mode: run the preheat in train mode (dropout active, as in fine-tuning; default True).
        seed: seed of the frozen random factors (None = torch's global RNG).
        max_batch: at most this many same-shape layers per ``svd_of_product`` call (None: all).
    """

    rank: int = 128
    steps: int = 200
    lr: float = 1e-4
    side: str = "A"
    loss_fn: Optional[Callable] = None
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    init_scale: float = 1.0
    train_mode: bool = True
    seed: Optional[int] = 0
    max_batch: Optional[int] = None

    def __post_init__(self):
        c = "HRPConfig"
        check_int(c, "rank", self.rank, minimum=1)
        check_int(c, "steps", self.steps, minimum=1)
        check_number(c, "lr", self.lr, positive=True)
        check_number(c, "init_scale", self.init_scale, positive=True)
        check_choice(c, "side", self.side, ("A", "B"), hint="'A' (RSI: train B_pre, init lora_A = V_r^T) or 'B' "
                                                           "(LSI: train A_pre, init lora_B = U_r)")
        if self.loss_fn is not None and not callable(self.loss_fn):
            raise TypeError(f"{c}: loss_fn must be callable as loss_fn(model, batch) -> scalar, got "
                            f"{type(self.loss_fn).__name__}")
        check_choice(c, "optimizer", self.optimizer, _OPTIMIZERS)
        check_number(c, "weight_decay", self.weight_decay, minimum=0.0)
        betas = tuple(self.betas) if isinstance(self.betas, (tuple, list)) else None
        if betas is None or len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
            raise ValueError(f"{c}: betas must be two numbers in [0, 1), got {self.betas!r}")
        object.__setattr__(self, "betas", tuple(float(b) for b in betas))
        check_number(c, "eps", self.eps, positive=True)
        check_bool(c, "train_mode", self.train_mode)
        check_seed(c, self.seed)
        check_int(c, "max_batch", self.max_batch, minimum=1, allow_none=True)


# ------------------------------------------------------------------------------------------ preheat branch
class _PreheatGroup:
    """The preheat factors of the layers of one shape, stacked: ``B`` (k, m, R), ``A`` (k, R, n), fp32."""

    def __init__(self, names: List[str], m: int, n: int, R: int, factors: LoRAFactors, side: str):
        self.names, self.m, self.n, self.R = names, m, n, R
        self.A = factors.lora_A.float().contiguous()
        self.B = factors.lora_B.float().contiguous()
        self.trained = self.B if side == "A" else self.A
        self.trained.requires_grad_(True)


def _make_hook(group: _PreheatGroup, i: int, embedding: bool = False):
    def hook(module, args, output):
        if not isinstance(output, Tensor) or not args or not isinstance(args[0], Tensor):
            return None
        x = args[0]
        if embedding:  # W = weight^T on one-hot inputs: B A e_id = B A[:, id]
            delta = F.linear(F.embedding(x, group.A[i].mT), group.B[i])
        else:
            delta = F.linear(F.linear(x.to(group.A.dtype), group.A[i]), group.B[i])
        return output + delta.to(output.dtype)
    return hook


# ------------------------------------------------------------------------------------------ data
def _batches_per_pass(dataloader: Iterable) -> Optional[int]:
    """``len(dataloader)`` (batches per pass) when the dataloader has a length, else None."""
    try:
        n = len(dataloader)  # type: ignore[arg-type]
    except TypeError:
        return None
    return n if isinstance(n, int) and n > 0 else None


def _warn_passes(steps: int, per_pass: Optional[int]) -> Optional[int]:
    """Warn before the preheat starts when ``steps`` exceeds one pass over the data; the number of passes."""
    if per_pass is None or steps <= per_pass:
        return None
    passes = math.ceil(steps / per_pass)
    warnings.warn(f"hrp: steps={steps} preheat steps over a dataloader of {per_pass} batches: it will be cycled, "
                  f"{passes} passes over the data (each batch about {steps / per_pass:.1f} times). Lower "
                  f"HRPConfig.steps (steps={per_pass} is one pass) or pass more data to avoid repeating batches.",
                  HRPDataWarning, stacklevel=4)
    return passes


def _cycle(dataloader: Iterable, steps: int, keep: Optional[Callable[[Any], bool]] = None, *,
           announced: bool = False) -> Iterator[Tuple[Any, int]]:
    """Yield ``(batch, epoch)`` for ``steps`` batches, re-iterating the dataloader (and warning once, unless
    ``announced`` already did before the start) if it ends.

    A one-shot iterator (``iter(x) is x``) is cycled over the batches it yielded, kept in memory.
    Batches for which ``keep(batch)`` is False (no loss tokens) are skipped, with one warning.
    """
    skipped = [0]

    def usable(batch) -> bool:
        if keep is None or keep(batch):
            return True
        if skipped[0] == 0:
            warnings.warn("hrp: skipping batches without loss tokens (every label -100)", LoRAInitWarning,
                          stacklevel=4)
        skipped[0] += 1
        return False

    try:
        first = iter(dataloader)
    except TypeError as err:
        raise LoRAInitError(f"hrp: the dataloader must be iterable, got {type(dataloader).__name__}") from err
    one_shot = first is dataloader
    kept: List[Any] = []
    it, epoch, per_epoch, done, warned = first, 0, 0, 0, announced
    while done < steps:
        try:
            batch = next(it)
        except StopIteration:
            if epoch == 0:
                per_epoch = done
            if done == 0 and skipped[0]:
                raise LoRAInitError(f"hrp: none of the {skipped[0]} batches of the dataloader has a loss token "
                                    f"(every label is -100)") from None
            if done == 0 or (epoch > 0 and per_epoch == 0):
                raise LoRAInitError("hrp: the dataloader yielded no batches (empty dataloader)") from None
            if not warned:
                warnings.warn(f"hrp: the dataloader ended after {per_epoch} batches, before the preheat's "
                              f"steps={steps}; cycling it ({math.ceil(steps / per_epoch)} passes). Lower "
                              f"HRPConfig.steps or pass more data to avoid repeating batches.", HRPDataWarning,
                              stacklevel=4)
                warned = True
            epoch += 1
            if one_shot:
                it = iter(list(kept))
            else:
                it = iter(dataloader)
            count_before = done
            try:
                batch = next(it)
            except StopIteration:
                raise LoRAInitError(f"hrp: the dataloader yielded no batches on pass {epoch + 1} (after "
                                    f"{count_before} in the first); pass a re-iterable dataloader") from None
        if one_shot and epoch == 0:
            kept.append(batch)
        if not usable(batch):
            continue
        done += 1
        yield batch, epoch


def _batch_loss(ctx: InitContext, config: HRPConfig, batch, step: int) -> Tuple[Tensor, float]:
    """The loss the preheat minimizes: ``config.loss_fn`` as returned, else a per-example/per-token mean.

    ``initialize_lora``'s ``loss_fn`` and the model's own loss both give a summed loss over the
    batch's loss terms (:class:`~lorainit.passes.loss.LossRunner`); dividing by their number keeps
    the step size independent of the batch size. Returns ``(loss, weight)``: the weight (the number
    of loss terms; 1 for ``config.loss_fn``) averages the ranks' gradients into the gradient of the
    union's mean loss.
    """
    if config.loss_fn is not None:
        loss = config.loss_fn(ctx.model, batch)  # exactly as the dataloader yielded it
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise LoRAInitError(f"hrp: loss_fn(model, batch) must return a scalar tensor, got {type(loss).__name__} "
                                f"{tuple(getattr(loss, 'shape', ()))} at preheat step {step}")
        return loss.reshape(()), 1.0
    runner = ctx.runner("attention")
    loss, count = runner.summed_loss(runner.prepare(batch), step)
    return loss / max(count, 1), float(max(count, 1))


def _optimizer(config: HRPConfig, params: List[Tensor]) -> torch.optim.Optimizer:
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, betas=config.betas, eps=config.eps,
                                 weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, betas=config.betas, eps=config.eps,
                                weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, weight_decay=config.weight_decay)


# ------------------------------------------------------------------------------------------ method
def _check_targets(ctx: InitContext, config: HRPConfig) -> Dict[str, int]:
    check_rank(ctx.targets, "hrp")
    ranks = {}
    for name, t in ctx.targets.items():
        if t.r >= config.rank:
            raise LoRAInitError(f"hrp: the preheat rank HRPConfig.rank={config.rank} must be larger than the LoRA "
                                f"rank r={t.r} of module {name!r} (HRP preheats with a higher rank than it keeps)")
        zeroed = t.lora_B if config.side == "A" else t.lora_A
        if not zeroed.requires_grad:
            which, other = ("lora_B", "lora_A") if config.side == "A" else ("lora_A", "lora_B")
            raise LoRAInitError(f"hrp: module {name!r} has a frozen {which} (requires_grad=False), but side="
                                f"{config.side!r} sets {which} = 0, so the adapter could never move; use side="
                                f"{'B' if config.side == 'A' else 'A'!r} (which sets {other} = 0) or unfreeze {which}")
        dim = t.n if config.side == "A" else t.m
        ranks[name] = min(config.rank, dim)
    return ranks


def hrp_init(ctx: InitContext, config: HRPConfig) -> Dict[str, LoRAFactors]:
    """HRP factors of every target (module docstring); the method ``"hrp"``."""
    if ctx.dataloader is None:
        raise LoRAInitError("hrp needs data to preheat on: pass a dataloader")
    ranks = _check_targets(ctx, config)
    gen = generator(config.seed)
    groups: List[_PreheatGroup] = []
    key = (lambda t: (t.m, t.n, ranks[t.name]))
    for (m, n, R), names in layer_groups(ctx.targets, key=key):
        dev = ctx.targets[names[0]].device
        f = lkm.hrp_preheat_factors(m, n, R, side=config.side, row_norm=float(config.init_scale),
                                    batch_shape=(len(names),), generator=gen, dtype=torch.float32, device=dev)
        groups.append(_PreheatGroup(names, m, n, R, f, config.side))
    params = [g.trained for g in groups]
    opt = _optimizer(config, params)
    where = {name: (g, i) for g in groups for i, name in enumerate(g.names)}

    losses: List[float] = []
    handles = []
    epochs = 0
    with ctx.timed("preheat"), ctx.pass_state(lora_enabled=False):
        if config.train_mode:
            ctx.model.train()
        try:
            for name, (g, i) in where.items():
                embedding = ctx.targets[name].kind == "embedding"
                handles.append(ctx.targets[name].module.register_forward_hook(_make_hook(g, i, embedding)))
            planned = _warn_passes(config.steps, _batches_per_pass(ctx.dataloader))
            if planned is not None:
                ctx.info["preheat_passes_planned"] = planned
            bar = ctx.progress_bar(config.steps, f"lorainit HRP preheat (rank {config.rank})", unit="step")
            try:
                keep = has_loss_tokens if config.loss_fn is None and ctx.needs_loss_tokens() else None
                for step, (batch, epoch) in enumerate(_cycle(ctx.dataloader, config.steps, keep,
                                                             announced=planned is not None)):
                    epochs = epoch + 1
                    opt.zero_grad(set_to_none=True)
                    err, weight = None, 1.0
                    with torch.enable_grad():
                        try:
                            loss, weight = _batch_loss(ctx, config, batch, step)
                            if not bool(torch.isfinite(loss.detach())):
                                raise LoRAInitError(f"hrp: the preheat loss is {float(loss.detach())} at step {step}; lower "
                                                    f"HRPConfig.lr (now {config.lr}) or check the data")
                            if not loss.requires_grad:
                                raise LoRAInitError(f"hrp: the loss at preheat step {step} does not depend on any "
                                                    f"LoRA target layer's output")
                        except Exception as e:
                            err = e
                        dist_utils.agree(err, f"hrp: preheat step {step}")  # before backward's FSDP2 collectives
                        loss.backward()
                    if step == 0:
                        err = None
                        try:
                            _check_grads_reached(groups)
                            ctx.runner("attention").finish_check()
                        except Exception as e:
                            err = e
                        dist_utils.agree(err, "hrp: the first preheat step")
                    if ctx.world > 1:  # gradient of the union's mean loss: sum_k w_k grad_k / sum_k w_k
                        grads = [p.grad.mul_(weight) if p.grad is not None else torch.zeros_like(p) for p in params]
                        total = torch.tensor([weight], dtype=torch.float64)
                        dist_utils.all_reduce_sum(grads + [total])
                        for p, gr in zip(params, grads):
                            p.grad = gr.div_(float(total))
                    opt.step()
                    losses.append(float(loss.detach()))
                    bar.update(1)
                    bar.set_postfix(loss=f"{losses[-1]:.4g}", refresh=False)
            finally:
                bar.close()
        finally:
            for h in handles:
                h.remove()
    for p in params:
        p.requires_grad_(False)
        p.grad = None

    out: Dict[str, LoRAFactors] = {}
    with ctx.timed("svd"):
        preheated: Dict[str, Tuple[_PreheatGroup, int]] = {}
        solve_groups = []
        for g in groups:
            position = {name: j for j, name in enumerate(g.names)}
            for (r,), sel in layer_groups(ctx.targets, g.names, key=lambda t: (t.r,), max_batch=config.max_batch):
                solve_groups.append(((r,), sel))
                preheated.update({name: (g, position[name]) for name in sel})

        def solve(key, sel, inputs):
            B_pre = torch.stack([preheated[n][0].B.detach()[preheated[n][1]] for n in sel])
            A_pre = torch.stack([preheated[n][0].A.detach()[preheated[n][1]] for n in sel])
            f = kernel_call("hrp", sel, lkm.hrp, B_pre, A_pre, key[0], side=config.side)
            return {name: (f.lora_A[j], f.lora_B[j], None) for j, name in enumerate(sel)}

        solved = solve_spread(ctx, "hrp", solve_groups, solve)
        for (r,), sel in solve_groups:
            for name in sel:
                g, j = preheated[name]
                B_pre, A_pre = g.B.detach()[j], g.A.detach()[j]
                out[name] = finalize(ctx.targets[name], solved[name][0], solved[name][1])
                ctx.record(name, preheat_rank=g.R, preheat_norm=float(B_pre.norm() * A_pre.norm() / math.sqrt(g.R)),
                           preheat_singular_values=_product_singular_values(B_pre, A_pre, r + 1).tolist())
    ctx.info.update({
        "preheat_rank": config.rank,
        "preheat_steps": config.steps,
        "preheat_passes": epochs,
        "preheat_loss_first": losses[0] if losses else None,
        "preheat_loss_last": losses[-1] if losses else None,
        "side": "RSI (lora_A = V_r^T, lora_B = 0)" if config.side == "A" else "LSI (lora_B = U_r, lora_A = 0)",
    })
    return out


def _product_singular_values(B: Tensor, A: Tensor, k: int) -> Tensor:
    """The ``k`` largest singular values of ``B @ A`` (for the report), from the R x R core of the QRs."""
    core = torch.linalg.qr(B.double()).R @ torch.linalg.qr(A.double().mT).R.mT
    return torch.linalg.svdvals(core)[..., :k]


def _check_grads_reached(groups: List[_PreheatGroup]) -> None:
    missing = []
    for g in groups:
        grad = g.trained.grad
        if grad is None:
            missing.extend(g.names)
            continue
        dead = grad.flatten(1).abs().amax(1) == 0
        missing.extend(name for name, d in zip(g.names, dead.tolist()) if d)
    if missing:
        raise LoRAInitError(f"hrp: no gradient reached the preheat adapter of modules {missing[:5]}"
                            f"{'...' if len(missing) > 5 else ''} in the first preheat step; is the module used by "
                            f"the loss (model forward / loss_fn)? HRP cannot find directions for a layer the loss "
                            f"does not depend on")


HRP = MethodSpec("hrp", fn=hrp_init, config_cls=HRPConfig, needs_data=True, needs_training=True, paper=PAPER,
                 summary="rank-R asymmetric preheat, then top-r singular vectors of the product (RSI/LSI)")
