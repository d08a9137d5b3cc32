"""The statistics samples: the first ``num_samples`` examples of a dataloader, counted and moved to a device.

Batches are dicts of tensors, tuples/lists (named tuples too) or single tensors; a batch's size is
the first dimension of its first tensor, and a batch without a tensor counts as one example.
A padding-free batch (TRL's ``packing`` / ``padding_free``, transformers' ``DataCollatorWithFlattening``:
one row of concatenated sequences, ``position_ids`` restarting at 0 at each sequence, no
``attention_mask``) counts as its number of sequences (:func:`packed_sequences`) and is never cut.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..targets import LoRAInitError

__all__ = ["leading_size", "count_examples", "count_positions", "take_samples", "to_device", "model_device",
           "slice_examples", "has_loss_tokens", "packed_sequences"]


def leading_size(batch) -> Optional[int]:
    """Number of examples in a batch (first dim of its first tensor), or None when unknown."""
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.dim() else None
    if isinstance(batch, Mapping):
        for v in batch.values():
            if isinstance(v, Tensor) and v.dim():
                return int(v.shape[0])
        return None
    if isinstance(batch, (list, tuple)):
        for v in batch:
            if isinstance(v, Tensor) and v.dim():
                return int(v.shape[0])
    return None


def packed_sequences(batch) -> Optional[int]:
    """Sequences in a padding-free batch (one row, ``position_ids`` restarting at 0 per sequence, no
    ``attention_mask``): the number of zeros in ``position_ids``; None for any other batch."""
    if isinstance(batch, Mapping) and not isinstance(batch.get("attention_mask"), Tensor):
        pos = batch.get("position_ids")
        if isinstance(pos, Tensor) and pos.dim() == 2 and pos.shape[0] == 1:
            return max(1, int(pos.eq(0).sum()))
    return None


def _examples(batch) -> int:
    """Examples in one batch: its sequences when padding-free, else its leading size (1 when unknown)."""
    packed = packed_sequences(batch)
    if packed is not None:
        return packed
    size = leading_size(batch)
    return 1 if size is None else size


def _map_tensors(batch, cut):
    """``batch`` with ``cut`` applied to every value of a dict / tuple / namedtuple / list (or to a tensor)."""
    if isinstance(batch, Tensor):
        return cut(batch)
    if isinstance(batch, Mapping):
        items = {key: cut(v) for key, v in batch.items()}
        return items if type(batch) is dict else type(batch)(items)
    if isinstance(batch, tuple):
        return type(batch)(*map(cut, batch)) if hasattr(batch, "_fields") else tuple(map(cut, batch))
    if isinstance(batch, list):
        return [cut(v) for v in batch]
    return batch


def _slice_batch(batch, k: int):
    """The first ``k`` examples of a dict/tuple/tensor batch (other values pass through)."""
    return _map_tensors(batch, lambda v: v[:k] if isinstance(v, Tensor) and v.dim() else v)


def slice_examples(batch, start: int, stop: int):
    """Examples ``start:stop`` of a dict/tuple/tensor batch (tensors with a leading batch dim are cut)."""
    if isinstance(batch, Tensor):
        return batch[start:stop]
    size = leading_size(batch)
    return _map_tensors(batch, lambda v: v[start:stop] if isinstance(v, Tensor) and v.dim() and v.shape[0] == size
                        else v)


def has_loss_tokens(batch) -> bool:
    """False for a mapping batch whose integer ``labels`` are all -100 (or, without labels, whose
    ``attention_mask`` is all 0, so that the labels made from ``input_ids`` would be); True otherwise."""
    if not isinstance(batch, Mapping):
        return True
    labels = batch.get("labels")
    if isinstance(labels, Tensor):
        return labels.is_floating_point() or bool(labels.ne(-100).any())
    am = batch.get("attention_mask")
    if isinstance(am, Tensor) and isinstance(batch.get("input_ids"), Tensor):
        return bool(am.ne(0).any())
    return True


def take_samples(dataloader: Iterable, num_samples: Optional[int]) -> Tuple[List[Any], int]:
    """The first ``num_samples`` examples of ``dataloader`` as a list of batches (last one cut).

    Batches whose size is unknown (no tensor inside) count as one example each; a padding-free batch
    counts as its sequences and is kept whole (the samples may then exceed ``num_samples`` by part of
    that batch; the count returned is the real one). Materializing the (small) input batches once
    makes every pass of a multi-pass run see identical data.
    """
    if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1):
        raise LoRAInitError(f"num_samples must be a positive int or None (all), got {num_samples!r}")
    try:
        iterator = iter(dataloader)
    except TypeError as err:
        raise LoRAInitError(f"dataloader must be iterable (a torch DataLoader or any iterable of batches), "
                            f"got {type(dataloader).__name__}") from err
    batches, seen = [], 0
    for batch in iterator:
        size = _examples(batch)
        if size == 0:
            continue
        if num_samples is not None and seen + size > num_samples:
            k = num_samples - seen
            if packed_sequences(batch) is not None:  # cutting would need new cu_seq_lens: keep it whole
                batches.append(batch)
                seen += size
            elif leading_size(batch) is not None:
                batches.append(_slice_batch(batch, k))
                seen += k
            break
        batches.append(batch)
        seen += size
        if num_samples is not None and seen >= num_samples:
            break
    if not batches:
        raise LoRAInitError("the dataloader yielded no examples (empty dataloader)")
    return batches, seen


def to_device(batch, device):
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def count_examples(batches: Sequence[Any]) -> int:
    """Examples in ``batches`` (a batch of unknown size counts as one, a padding-free batch as its sequences)."""
    return sum(_examples(b) for b in batches)


def count_positions(batch) -> int:
    """Token positions of a batch without a mask: ``input_ids.numel()``, else its number of examples."""
    if isinstance(batch, Mapping) and isinstance(batch.get("input_ids"), Tensor):
        return int(batch["input_ids"].numel())
    return leading_size(batch) or 1
