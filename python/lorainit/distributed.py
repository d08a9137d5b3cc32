"""Multi-process support: when ``torch.distributed`` is initialized every rank passes over its own
shard of the data, the statistics' sums and counts are all-reduced (so each rank holds the
statistics of the union of the data), the per-layer solves are spread over the ranks and each
result is broadcast from the rank that computed it. Without an initialized process group every
function here is the identity.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["is_distributed", "rank_and_world", "all_reduce_sum", "all_reduce_stats", "assign_ranks",
           "broadcast_tensors"]


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() > 1


def rank_and_world() -> Tuple[int, int]:
    if not is_distributed():
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def _comm_device(t: Tensor) -> torch.device:
    """NCCL needs CUDA tensors; gloo takes CPU ones."""
    backend = torch.distributed.get_backend()
    if backend == "nccl" and t.device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    if backend == "gloo" and t.device.type != "cpu":
        return torch.device("cpu")
    return t.device


def all_reduce_sum(tensors: Sequence[Tensor]) -> None:
    """In-place sum over ranks of each tensor (moved to the backend's device when needed)."""
    if not is_distributed():
        return
    for t in tensors:
        dev = _comm_device(t)
        if dev == t.device:
            torch.distributed.all_reduce(t)
        else:
            buf = t.to(dev)
            torch.distributed.all_reduce(buf)
            t.copy_(buf.to(t.device))


def all_reduce_stats(stats: Dict[str, "object"]) -> None:
    """All-reduce the sums and token counts of ``KFACStats`` accumulators (same names on every rank)."""
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


def assign_ranks(names: Sequence[str], world: int) -> Dict[str, int]:
    """Round-robin owner rank of each layer's solve (same on every rank: ``names`` in a fixed order)."""
    return {n: i % world for i, n in enumerate(names)}


def broadcast_tensors(tensors: Sequence[Tensor], src: int) -> None:
    """Broadcast tensors (already allocated with the right shapes on every rank) from ``src``."""
    if not is_distributed():
        return
    for t in tensors:
        dev = _comm_device(t)
        if dev == t.device:
            torch.distributed.broadcast(t, src=src)
        else:
            buf = t.to(dev)
            torch.distributed.broadcast(buf, src=src)
            t.copy_(buf.to(t.device))
