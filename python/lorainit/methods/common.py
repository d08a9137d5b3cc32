"""What the method modules share: the spec a method declares and the per-layer helpers around a kernel call.

* :class:`MethodSpec`: a method's function, config class, needs and paper; each method module
  declares its specs and :mod:`lorainit.registry` maps names to them.
* :func:`layer_groups`: the targets one batched kernel call can take (same key, e.g. shape, rank and
  PEFT scaling, **and** same device and dtype of the base weight and of the adapter), in model order.
* :func:`kernel_call`: a ``lorainit_kernels`` call whose ``ValueError``/``TypeError``/``RuntimeError``
  becomes a :class:`~lorainit.targets.LoRAInitError` naming the method and the modules.
* :func:`finalize`: factors cast to the adapter's dtype and device, with ``base_delta`` consistent
  with the cast factors.
* :func:`solve_spread`: the per-group solves spread over the ranks of a process group (each
  group's layers cut into one contiguous chunk per rank), the full weights read one layer at a
  time, an agreed status before the owners broadcast their factors.

This module imports no method module.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Type

import torch
from torch import Tensor

from .. import distributed as dist_utils
from ..adapters import LoRAFactors
from ..configs import InitConfig
from ..targets import LoRAInitError, TargetLayer

__all__ = ["MethodSpec", "layer_groups", "kernel_call", "finalize", "generator", "solve_spread"]


@dataclass(frozen=True)
class MethodSpec:
    """One method: ``fn(ctx, config) -> {layer name: LoRAFactors}``, its config class and needs."""

    name: str
    fn: Callable
    config_cls: Type[InitConfig]
    needs_data: bool
    needs_grad: bool = False
    needs_training: bool = False
    paper: str = ""
    summary: str = ""

    def describe(self) -> Dict[str, object]:
        return {"name": self.name, "needs_data": self.needs_data, "needs_grad": self.needs_grad,
                "needs_training": self.needs_training, "paper": self.paper, "summary": self.summary,
                "config": self.config_cls.__name__}


def _placement(t: TargetLayer) -> tuple:
    return (t.device, t.dtype, t.lora_A.device, t.lora_A.dtype)


def layer_groups(targets: Dict[str, TargetLayer], names: Optional[List[str]] = None, *,
                 key: Optional[Callable[[TargetLayer], tuple]] = None,
                 max_batch: Optional[int] = None) -> List[Tuple[tuple, List[str]]]:
    """``[(key, names)]``: layers of one ``key(t)`` (default ``(m, n, r, scaling)``) and one placement.

    A group holds layers whose base weights share device and dtype and whose adapters share device
    and dtype, so their tensors stack into one batched call. Groups come in the order of their
    first layer, layers in model order; ``max_batch`` splits a group into chunks of at most that
    many layers. Only ``key(t)`` is returned: the placement is that of ``targets[names[0]]``.
    """
    names = list(targets) if names is None else list(names)
    key = key or (lambda t: (t.m, t.n, t.r, t.scaling))
    groups: Dict[tuple, Tuple[tuple, List[str]]] = {}
    for name in names:
        t = targets[name]
        k = key(t)
        groups.setdefault(k + _placement(t), (k, []))[1].append(name)
    out = []
    for k, members in groups.values():
        step = max_batch or len(members)
        for i in range(0, len(members), step):
            out.append((k, members[i:i + step]))
    return out


def kernel_call(method: str, names: List[str], fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)``, its argument errors re-raised as LoRAInitError naming ``method`` and the modules.

    For a batched call (one layer per index of a leading batch axis of ``len(names)``) the error names the
    layer(s) whose inputs hold NaN/Inf entries, when that is the cause, rather than the whole group.
    """
    try:
        return fn(*args, **kwargs)
    except LoRAInitError:
        raise
    except (ValueError, TypeError, RuntimeError) as err:
        text = str(err)
        for prefix in (f"{method}: ", f"{method.split(' ')[0]}: "):  # the kernel may already name the method
            if text.startswith(prefix):
                text = text[len(prefix):]
                break
        bad = _nonfinite_members(names, args, kwargs) if len(names) > 1 else []
        shown = bad or names
        where = (f"module {shown[0]!r}" if len(shown) == 1
                 else f"modules {shown[:4]}{'...' if len(shown) > 4 else ''}")
        if bad:
            where += f" (batch index {[names.index(n) for n in bad][:4]} of the {len(names)} layers solved together)"
        raise LoRAInitError(f"{method}: {where}: {text}") from err


def _nonfinite_members(names: List[str], args, kwargs) -> List[str]:
    """The ``names[i]`` whose slice ``i`` of a batched tensor argument (leading axis ``len(names)``) has NaN/Inf."""
    bad = set()
    for x in (*args, *kwargs.values()):
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() >= 2 and x.shape[0] == len(names):
            finite = torch.isfinite(x.detach()).reshape(len(names), -1).all(dim=1)
            bad.update(i for i in range(len(names)) if not bool(finite[i]))
    return [names[i] for i in sorted(bad)]


def generator(seed: Optional[int]) -> Optional[torch.Generator]:
    """A CPU generator seeded with ``seed``; None (torch's global RNG) for ``seed=None``."""
    return None if seed is None else torch.Generator().manual_seed(seed)


def finalize(t: TargetLayer, A: Tensor, B: Tensor, delta: Optional[Tensor] = None, *,
             subtract_init: bool = False) -> LoRAFactors:
    """The factors cast to the adapter's dtype and device, contiguous.

    ``base_delta`` is ``-sigma B A`` of the *cast* factors (fp32) when ``subtract_init``, or when a
    ``delta`` is given and the cast changed the factors, so that base + adapter = W still holds
    up to one rounding; otherwise ``delta`` as given.
    """
    A2 = A.to(device=t.lora_A.device, dtype=t.lora_A.dtype)
    B2 = B.to(device=t.lora_B.device, dtype=t.lora_B.dtype)
    if subtract_init or (delta is not None and (A2.dtype != A.dtype or B2.dtype != B.dtype)):
        delta = -(t.scaling * (B2.float() @ A2.float()))
    return LoRAFactors(A2.contiguous(), B2.contiguous(), delta)


Solved = Tuple[Tensor, Tensor, Optional[Tensor]]


def solve_spread(ctx: Any, method: str, groups: List[Tuple[tuple, List[str]]],
                 solve: Callable[[tuple, List[str], Dict[str, Tensor]], Dict[str, Solved]], *,
                 read: Optional[Callable[[str], Tensor]] = None, with_delta: bool = False,
                 gen: Optional[torch.Generator] = None) -> Dict[str, Solved]:
    """``{name: (lora_A, lora_B, base_delta or None)}`` of every layer of ``groups``, on every rank.

    ``solve(key, names, inputs)`` computes the factors of ``names`` (one batched kernel call);
    ``inputs[name] = read(name)`` when ``read`` is given (e.g. the full base weight). One process: one
    call per group. With a process group each group's layers are cut into
    ``world`` contiguous chunks and rank ``k`` solves chunk ``k``: every rank calls ``read`` for every
    layer of the group in order (an all-gather for an FSDP2 weight, one layer at a time) and keeps
    only its own chunk's; the solve's outcome is agreed (an error on any rank raises on all, naming
    it); then each owner broadcasts its factors (``with_delta``: and ``base_delta``), fp32 or wider.
    ``gen`` (the solves' random generator) is set to rank 0's state after each group, so a chunk
    starts from the state the whole group's call starts from in one process (one sketch per call).
    """
    out: Dict[str, Solved] = {}
    rank, world = ctx.rank, ctx.world
    bar = ctx.progress_bar(sum(len(names) for _, names in groups), f"lorainit {method} solve", unit="layer")
    try:
        _solve_groups(ctx, method, groups, solve, read, with_delta, gen, out, bar)
    finally:
        bar.close()
    return out


def _solve_groups(ctx, method, groups, solve, read, with_delta, gen, out, bar) -> None:
    """The loop of :func:`solve_spread`, advancing ``bar`` by each group's layers."""
    rank, world = ctx.rank, ctx.world
    for key, names in groups:
        if world == 1:
            inputs = {n: read(n) for n in names} if read is not None else {}
            out.update(solve(key, names, inputs))
            bar.update(len(names))
            continue
        chunks = dist_utils.split_owners(names, world)
        mine = chunks[rank]
        inputs = {}
        err, res = None, {}
        try:
            if read is not None:
                for n in names:  # collective reads: every rank, every layer of the group, in order
                    w = read(n)
                    if n in mine:
                        inputs[n] = w
                    del w
            if mine:
                res = solve(key, mine, inputs)
        except Exception as e:
            err = e
        inputs.clear()
        dist_utils.agree(err, f"{method}: the solve of modules {names[:3]}{'...' if len(names) > 3 else ''}")
        per_rank: List[List[Tensor]] = []
        for r, chunk in enumerate(chunks):
            tensors = []
            for n in chunk:
                t = ctx.targets[n]
                work = torch.promote_types(t.dtype, torch.float32)
                if r == rank:
                    A, B, D = res[n]
                    A, B = A.to(t.device, work).contiguous(), B.to(t.device, work).contiguous()
                    D = D.to(t.device, work).contiguous() if with_delta else None
                else:
                    A = torch.empty(t.r, t.n, dtype=work, device=t.device)
                    B = torch.empty(t.m, t.r, dtype=work, device=t.device)
                    D = torch.empty(t.m, t.n, dtype=work, device=t.device) if with_delta else None
                out[n] = (A, B, D)
                tensors += [A, B] + ([D] if with_delta else [])
            per_rank.append(tensors)
        dist_utils.broadcast_from(per_rank)
        if gen is not None:
            state = gen.get_state()
            dist_utils.broadcast_tensors([state], src=0)
            gen.set_state(state)
        bar.update(len(names))
