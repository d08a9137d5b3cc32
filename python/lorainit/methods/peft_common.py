"""What the PEFT-known data-aware inits (EVA, CorDA, Astra) share: one statistics pass, per-layer solves.

:func:`solve_from_stats` runs :meth:`lorainit.context.InitContext.iter_stats` (with the extra
statistics the method needs, under its ``max_memory``, through the ``stats_cache`` when the call has
one; a forward-only pass: these methods need no gradients) and hands each layer's
:class:`~lorainit.passes.stats.LayerStats` (and, for a method that
rewrites the base weight, the full weight ``W``) to the method's per-layer solve, which calls
:mod:`lorainit_kernels.peft_inits`. With a process group the layers are solved round-robin on their
owner rank, every rank reads every full weight in the same order (an FSDP2 all-gather each, one layer
at a time), the solves' outcome is agreed (an error on one rank raises on all) and the owners
broadcast the factors. :func:`refuse_embeddings` names the embedding targets a method cannot take.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .. import distributed as dist_utils
from .. import memory
from ..adapters import LoRAFactors
from ..context import InitContext
from ..passes.stats import LayerStats
from ..targets import LoRAInitError
from .common import finalize

__all__ = ["refuse_embeddings", "solve_from_stats"]

Solved = Tuple[Tensor, Tensor, Optional[Tensor]]


def refuse_embeddings(ctx: InitContext, method: str, why: str) -> None:
    """LoRAInitError naming the embedding targets, when there are any (``why``: the method's reason)."""
    emb = [n for n, t in ctx.targets.items() if t.kind == "embedding"]
    if emb:
        raise LoRAInitError(f"{method}: cannot initialize the embedding targets {emb[:4]}: {why}; leave the embeddings "
                            f"out of target_modules, or initialize them with another method in a second call")


def solve_from_stats(ctx: InitContext, method: str, config, solve: Callable[[str, LayerStats, Optional[Tensor]], Solved],
                     *, needs_weight: bool = False, with_delta: bool = False) -> Dict[str, LoRAFactors]:
    """``{layer: LoRAFactors}`` from ``solve(name, stats, W) -> (lora_A, lora_B, base_delta or None)`` per layer.

    ``config`` supplies ``max_memory``, ``token_mask`` and ``backend`` of the statistics pass (fp32
    statistics). ``needs_weight``: ``W`` is the full base weight (m, n) in torch orientation, else None.
    ``with_delta``: the solve returns a ``base_delta`` (broadcast with the factors). The extra statistics
    and each layer's solve working set (``max_memory``) come from :data:`lorainit.memory.STATS_SOLVES`.
    """
    owners = dist_utils.assign_ranks(ctx.names, ctx.world)
    results: Dict[str, Solved] = {}
    working_set = (lambda n: memory.stats_solve_bytes(ctx.targets[n], method))
    extras = memory.STATS_SOLVES[method][0]
    bar = None  # opened after the first statistics pass (which shows its own bar)
    try:
        for part in ctx.iter_stats(ctx.names, max_memory=config.max_memory, backend=config.backend,
                                   token_mask=config.token_mask, extras=extras, grads=False, working_set=working_set):
            if bar is None:
                bar = ctx.progress_bar(len(ctx.names), f"lorainit {method} solves", unit="layer")
            _solve_part(ctx, method, part, owners, results, solve, needs_weight, with_delta, bar)
            del part
            memory.release_freed_host_memory()
    finally:
        if bar is not None:
            bar.close()
    missing = [n for n in ctx.names if n not in results]
    if missing:
        raise LoRAInitError(f"{method} produced no factors for {missing[:5]}")
    return {n: finalize(ctx.targets[n], *results[n]) for n in ctx.names}


def _solve_part(ctx: InitContext, method: str, part, owners, results: Dict[str, Solved], solve, needs_weight: bool,
                with_delta: bool, bar) -> None:
    """The solves of one statistics pass's layers (each on its owner rank), then the agreed status and broadcast."""
    with ctx.timed("solve"):
        err = None
        for name in [n for n in ctx.names if n in part]:
            W = ctx.targets[name].read_weight() if needs_weight else None  # collective: every rank, in order
            bar.update(1)
            if owners[name] != ctx.rank or err is not None:
                continue
            try:
                t0 = time.perf_counter()
                A, B, D = solve(name, part[name], W)
                results[name] = (A.float(), B.float(), None if D is None else D.float())
                ctx.record(name, time_s=time.perf_counter() - t0)
            except LoRAInitError as e:
                err = e
            except (ValueError, TypeError, RuntimeError) as e:
                err = LoRAInitError(f"{method}: module {name!r}: {e}")
                err.__cause__ = e
            del W
        if ctx.world > 1:
            dist_utils.agree(err, f"{method}: the solves")
            _broadcast(ctx, part, owners, results, with_delta)
        elif err is not None:
            raise err


def _broadcast(ctx: InitContext, part, owners, results: Dict[str, Solved], with_delta: bool) -> None:
    per_rank: List[List[Tensor]] = [[] for _ in range(ctx.world)]
    for name in sorted(part):
        t = ctx.targets[name]
        if owners[name] == ctx.rank:
            A, B, D = results[name]
            A, B = A.to(t.device).contiguous(), B.to(t.device).contiguous()
            D = D.to(t.device).contiguous() if with_delta else None
        else:
            A = torch.empty(t.r, t.n, device=t.device)
            B = torch.empty(t.m, t.r, device=t.device)
            D = torch.empty(t.m, t.n, device=t.device) if with_delta else None
        results[name] = (A, B, D)
        per_rank[owners[name]].extend([A, B] + ([D] if with_delta else []))
    dist_utils.broadcast_from(per_rank)
