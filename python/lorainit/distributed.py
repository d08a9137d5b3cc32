"""Multi-process support: the collective protocol, bucketed reductions, and FSDP2 (DTensor) weights.

When ``torch.distributed`` is initialized every rank passes over its own shard of the data, the
statistics' sums and counts are all-reduced (so each rank holds the statistics of the union of the
data), the per-layer solves are spread over the ranks and each result is broadcast from the rank
that computed it. Without an initialized process group every function here is the identity.

The protocol (docs/distributed.md), so that no rank can hang in a collective the
others never enter, and no reduction can mix tensors of different layers:

* :func:`agree_fingerprint`: before any reduction, one all-gather of a fingerprint (targets,
  shapes, dtypes, ...); any difference raises :class:`LoRAInitError` on every rank, naming it.
* :func:`agree`: every step that may fail on one rank only (a batch's forward, a solve, the checks
  before a write) is followed by an agreed status: one all-reduce of a flag, and on failure one
  all-gather of the messages; every rank then raises ``LoRAInitError`` naming the failing rank(s).
* :func:`all_reduce_sum` / :func:`broadcast_from`: tensors are flattened into a few buckets per
  device and dtype, so a reduction is a handful of collectives, not one per tensor.
* FSDP2 weights are ``DTensor`` s: :func:`full` gathers one of them (a collective every rank makes
  in the same order), :func:`local` is this rank's shard and :func:`shard_of` cuts a full tensor
  into this rank's shard (no communication), so writes go into each rank's shard.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .errors import LoRAInitError

__all__ = ["is_distributed", "rank_and_world", "all_reduce_sum", "all_reduce_stats", "all_reduce_scalars",
           "all_reduce_max", "assign_ranks", "split_owners", "broadcast_tensors", "broadcast_from", "agree",
           "agree_fingerprint", "gather_objects", "is_dtensor", "local", "full", "shard_of", "reshard", "COLLECTIVES",
           "BUCKET_BYTES", "samples_for_rank"]

#: Number of collectives issued by this module, by kind (tests and benchmarks read it).
COLLECTIVES: Counter = Counter()
#: Largest flat buffer of one bucketed all-reduce / broadcast (bytes).
BUCKET_BYTES = 256 << 20


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() > 1


def rank_and_world() -> Tuple[int, int]:
    if not is_distributed():
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def samples_for_rank(num_samples: Optional[int], rank: int, world: int) -> Optional[int]:
    """This rank's share of a *total* ``num_samples``: ``num_samples // world``, plus one on the first
    ``num_samples % world`` ranks, at least 1 (None = all of this rank's data)."""
    if num_samples is None or world == 1 or isinstance(num_samples, bool) or not isinstance(num_samples, int) \
            or num_samples < 1:
        return num_samples  # None, or an invalid value that take_samples reports
    return max(1, num_samples // world + (1 if rank < num_samples % world else 0))


# ------------------------------------------------------------------------------------------ DTensor
def _dtensor_cls():
    try:
        from torch.distributed.tensor import DTensor
    except Exception:  # pragma: no cover - torch without distributed
        return None
    return DTensor


def is_dtensor(t) -> bool:
    cls = _dtensor_cls()
    return cls is not None and isinstance(t, cls)


def local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (the tensor itself otherwise); in-place writes reach the parameter."""
    return t.to_local() if is_dtensor(t) else t


def full(t: Tensor) -> Tensor:
    """The full tensor of a DTensor (an all-gather: every rank calls it in the same order), else ``t``."""
    if is_dtensor(t):
        COLLECTIVES["all_gather_weight"] += 1
        return t.full_tensor()
    return t


def shard_of(like: Tensor, value: Tensor) -> Tensor:
    """``value`` (full shape of ``like``) cut to this rank's shard of the DTensor ``like`` (no communication)."""
    if not is_dtensor(like):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(like.device), like.device_mesh, like.placements, src_data_rank=None).to_local()


def reshard(model: nn.Module) -> None:
    """Put every FSDP2 module's parameters back into their sharded DTensors (a no-grad forward leaves the
    root's unsharded); a no-op for other models."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except Exception:  # pragma: no cover
        return
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


# ------------------------------------------------------------------------------------------ status
def _error_text(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}" if not isinstance(err, ValueError) else str(err)


def agree(err: Optional[BaseException], where: str) -> None:
    """Collective: raise on every rank if ``err`` is set on any rank (else return).

    Without a process group it re-raises ``err``. With one, every rank contributes a flag to one
    all-reduce; if any is set, one all-gather collects the messages and every rank raises a
    ``LoRAInitError`` naming the failing rank(s) and their message (chained to the local error).
    """
    if not is_distributed():
        if err is not None:
            raise err
        return
    flag = torch.tensor([0.0 if err is None else 1.0], dtype=torch.float64)
    _all_reduce_flat([flag])
    if float(flag) == 0:
        return
    msgs: List[Any] = [None] * torch.distributed.get_world_size()
    COLLECTIVES["all_gather_object"] += 1
    torch.distributed.all_gather_object(msgs, None if err is None else _error_text(err))
    failed = [(r, m) for r, m in enumerate(msgs) if m is not None]
    text = "; ".join(f"rank {r}: {m}" for r, m in failed)
    raise LoRAInitError(f"{where} failed on rank{'s' if len(failed) > 1 else ''} "
                        f"{', '.join(str(r) for r, _ in failed)} (every rank stops, models unchanged): {text}") from err


def agree_fingerprint(fingerprint: Any, what: str) -> List[Any]:
    """Collective: all-gather ``fingerprint`` (picklable); raise on every rank if the ranks differ.

    Returns the list of every rank's fingerprint (``[fingerprint]`` without a process group).
    """
    if not is_distributed():
        return [fingerprint]
    allfp: List[Any] = [None] * torch.distributed.get_world_size()
    COLLECTIVES["all_gather_object"] += 1
    torch.distributed.all_gather_object(allfp, fingerprint)
    bad = [r for r, fp in enumerate(allfp) if fp != allfp[0]]
    if bad:
        raise LoRAInitError(f"the ranks disagree on {what}: rank 0 has {_describe(allfp[0])}, rank {bad[0]} has "
                            f"{_describe(allfp[bad[0]])}; every rank must hold the same model and adapter")
    return allfp


def gather_objects(obj: Any) -> List[Any]:
    """Collective: every rank's ``obj`` (picklable), in rank order (``[obj]`` without a process group)."""
    if not is_distributed():
        return [obj]
    out: List[Any] = [None] * torch.distributed.get_world_size()
    COLLECTIVES["all_gather_object"] += 1
    torch.distributed.all_gather_object(out, obj)
    return out


def _describe(fp: Any) -> str:
    text = repr(fp)
    return text if len(text) < 300 else text[:300] + "..."


# ------------------------------------------------------------------------------------------ bucketed collectives
def _comm_device(t: Tensor) -> torch.device:
    """NCCL needs CUDA tensors; gloo takes CPU ones."""
    backend = torch.distributed.get_backend()
    if backend == "nccl" and t.device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    if backend == "gloo" and t.device.type != "cpu":
        return torch.device("cpu")
    return t.device


def _buckets(tensors: Sequence[Tensor]) -> List[List[Tensor]]:
    """Tensors grouped by (device, dtype), each group cut into buckets of at most ``BUCKET_BYTES`` (order kept)."""
    groups: Dict[tuple, List[List[Tensor]]] = {}
    sizes: Dict[tuple, int] = {}
    for t in tensors:
        key = (t.device, t.dtype)
        nbytes = t.numel() * t.element_size()
        if key not in groups or (sizes[key] + nbytes > BUCKET_BYTES and groups[key][-1]):
            groups.setdefault(key, []).append([])
            sizes[key] = 0
        groups[key][-1].append(t)
        sizes[key] += nbytes
    return [b for bs in groups.values() for b in bs]


def _all_reduce_flat(bucket: List[Tensor]) -> None:
    flat = torch.cat([t.reshape(-1) for t in bucket]) if len(bucket) > 1 else bucket[0].reshape(-1).clone()
    dev = _comm_device(flat)
    buf = flat.to(dev)
    COLLECTIVES["all_reduce"] += 1
    torch.distributed.all_reduce(buf)
    flat = buf.to(flat.device)
    off = 0
    for t in bucket:
        k = t.numel()
        t.copy_(flat[off:off + k].view_as(t))
        off += k


def all_reduce_sum(tensors: Sequence[Tensor]) -> None:
    """In-place sum over ranks of each tensor: a few flat all-reduces per device and dtype."""
    if not is_distributed():
        return
    for bucket in _buckets([t for t in tensors if t.numel()]):
        _all_reduce_flat(bucket)


def all_reduce_stats(stats: Dict[str, "object"]) -> None:
    """All-reduce the sums and token counts of ``KFACStats`` accumulators (the same names, shapes and
    dtypes on every rank: :func:`lorainit.passes.stats.stats_pass` agrees on them first)."""
    if not is_distributed():
        return
    names = sorted(stats)
    sums = [t for n in names for t in stats[n].sums()]
    counts = torch.tensor([stats[n].count for n in names], dtype=torch.float64)
    all_reduce_sum(sums + [counts])
    for n, c in zip(names, counts.tolist()):
        stats[n].count = int(round(c))


def all_reduce_scalars(values: Sequence[float]) -> List[float]:
    t = torch.tensor(list(values), dtype=torch.float64)
    all_reduce_sum([t])
    return t.tolist()


def all_reduce_max(value: int) -> int:
    """The largest ``value`` over ranks (e.g. the number of batches every rank must run under FSDP2)."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    COLLECTIVES["all_reduce"] += 1
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t)


# ------------------------------------------------------------------------------------------ owners and broadcasts
def assign_ranks(names: Sequence[str], world: int) -> Dict[str, int]:
    """Round-robin owner rank of each layer's solve (same on every rank: ``names`` in a fixed order)."""
    return {n: i % world for i, n in enumerate(names)}


def split_owners(names: Sequence[str], world: int) -> List[List[str]]:
    """``names`` cut into ``world`` contiguous chunks (as even as possible); chunk k is solved by rank k."""
    k, extra = divmod(len(names), world)
    out, start = [], 0
    for r in range(world):
        size = k + (1 if r < extra else 0)
        out.append(list(names[start:start + size]))
        start += size
    return out


def broadcast_tensors(tensors: Sequence[Tensor], src: int) -> None:
    """Broadcast tensors (already allocated with the right shapes on every rank) from ``src``, bucketed."""
    if not is_distributed():
        return
    for bucket in _buckets([t for t in tensors if t.numel()]):
        flat = torch.cat([t.reshape(-1) for t in bucket])
        buf = flat.to(_comm_device(flat))
        COLLECTIVES["broadcast"] += 1
        torch.distributed.broadcast(buf, src=src)
        flat = buf.to(flat.device)
        off = 0
        for t in bucket:
            t.copy_(flat[off:off + t.numel()].view_as(t))
            off += t.numel()


def broadcast_from(per_rank: Sequence[Sequence[Tensor]]) -> None:
    """``per_rank[k]``: tensors owned (filled) by rank k and allocated on the others; one bucketed
    broadcast per owner rank with any tensors."""
    for src, tensors in enumerate(per_rank):
        if tensors:
            broadcast_tensors(tensors, src)
