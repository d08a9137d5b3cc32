"""Data passes over a model: K-FAC statistics through hooks, full weight gradients, held-out losses.

The statistics pass (DESIGN.md section 2) runs forward and backward over the statistics samples
with every parameter frozen and the LoRA branches disabled, so each target computes ``y = W x + b``
of its base weight. A forward hook on each target's base layer sees ``x`` (the layer input) and
puts a tensor hook on ``y``; backward then delivers ``g = dL/dy`` of the **summed** loss and
``KFACStats.update(x, g, mask)`` accumulates ``Z``, ``G`` and ``s`` over the valid tokens. No
``.grad`` is stored for any parameter. Targets whose inputs are the same tensor (q/k/v, gate/up)
are found at run time on the first batch and share one ``Z``.
"""
from __future__ import annotations

import inspect
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

import lorainit_kernels as lk

from .targets import LoRAInitError, TargetLayer

__all__ = ["take_samples", "LossRunner", "LayerStats", "StatsCollector", "stats_bytes", "plan_groups"]


# ------------------------------------------------------------------------------------------ batches
def _leading_size(batch) -> Optional[int]:
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


def _slice_batch(batch, k: int):
    """The first ``k`` examples of a dict/tuple/tensor batch (other values pass through)."""
    def cut(v):
        return v[:k] if isinstance(v, Tensor) and v.dim() else v
    if isinstance(batch, Tensor):
        return batch[:k]
    if isinstance(batch, Mapping):
        return type(batch)({key: cut(v) for key, v in batch.items()}) if type(batch) is not dict else \
            {key: cut(v) for key, v in batch.items()}
    if isinstance(batch, tuple):
        return type(batch)(*map(cut, batch)) if hasattr(batch, "_fields") else tuple(map(cut, batch))
    if isinstance(batch, list):
        return [cut(v) for v in batch]
    return batch


def take_samples(dataloader: Iterable, num_samples: Optional[int]) -> Tuple[List[Any], int]:
    """The first ``num_samples`` examples of ``dataloader`` as a list of batches (last one cut).

    Batches whose size is unknown (no tensor inside) count as one example each. Materializing the
    (small) input batches once makes every pass of a multi-pass run see identical data.
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
        size = _leading_size(batch)
        size = 1 if size is None else size
        if size == 0:
            continue
        if num_samples is not None and seen + size > num_samples:
            k = num_samples - seen
            if _leading_size(batch) is not None:
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


def _to_device(batch, device):
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


# ------------------------------------------------------------------------------------------ losses
def _takes_labels(model: nn.Module) -> bool:
    """Whether ``model.forward`` (or the wrapped model's, for PEFT/DDP wrappers) has a ``labels`` argument."""
    seen = set()
    while model is not None and id(model) not in seen:
        seen.add(id(model))
        try:
            if "labels" in inspect.signature(model.forward).parameters:
                return True
        except (TypeError, ValueError):
            pass
        inner = None
        if hasattr(model, "get_base_model"):
            try:
                inner = model.get_base_model()
            except Exception:
                inner = None
        model = inner if isinstance(inner, nn.Module) else getattr(model, "module", None)
    return False


class LossRunner:
    """Turns a batch into the **summed** loss and the token mask (DESIGN.md section 2).

    With ``loss_fn(model, batch) -> summed loss`` the batch reaches it exactly as the dataloader
    yielded it. Otherwise the batch must be a mapping of model inputs; when it has no ``labels`` but
    ``input_ids`` and the model takes ``labels``, ``labels = input_ids`` with padding set to -100
    (causal LM). The model's mean loss is turned into a sum by multiplying with the number of its
    loss tokens, detected on the first batch by matching the reported loss against the
    cross-entropy of the logits with shifted (causal LM), unshifted (token classification) or
    per-example (sequence classification) labels.
    """

    def __init__(self, model: nn.Module, loss_fn: Optional[Callable] = None, token_mask: str = "attention"):
        self.model = model
        self.loss_fn = loss_fn
        self.token_mask = token_mask
        self.device = model_device(model)
        self.mode: Optional[str] = None  # "shifted", "unshifted" or "examples" once detected
        self.added_labels = False
        self._takes_labels = _takes_labels(model)

    # -- masks
    def mask(self, batch) -> Optional[Tensor]:
        """Bool mask of the valid tokens (True = use), None = all positions valid."""
        if not isinstance(batch, Mapping):
            if self.token_mask == "labels":
                raise LoRAInitError("token_mask='labels' needs mapping batches with a 'labels' entry")
            return None
        if self.token_mask == "labels":
            labels = batch.get("labels")
            if not isinstance(labels, Tensor) or labels.dim() < 2:
                raise LoRAInitError("token_mask='labels' needs token-level 'labels' in every batch")
            if self.mode == "unshifted":
                return labels.ne(-100)
            mask = torch.zeros_like(labels, dtype=torch.bool)
            mask[..., :-1] = labels[..., 1:].ne(-100)  # position t predicts label t+1
            return mask
        am = batch.get("attention_mask")
        if isinstance(am, Tensor):
            return am.to(self.device).bool()
        return None

    # -- forward
    def prepare(self, batch):
        if self.loss_fn is not None:
            return batch  # a user loss_fn gets each batch exactly as the dataloader yielded it
        batch = _to_device(batch, self.device)
        if self.loss_fn is None and isinstance(batch, Mapping) and "labels" not in batch and self._takes_labels \
                and isinstance(batch.get("input_ids"), Tensor):
            labels = batch["input_ids"].clone()
            am = batch.get("attention_mask")
            if isinstance(am, Tensor):
                labels = labels.masked_fill(am.to(labels.device) == 0, -100)
            batch = {**batch, "labels": labels}
            self.added_labels = True
        return batch

    def summed_loss(self, batch, index: int) -> Tuple[Tensor, int]:
        """``(summed loss, number of loss terms)`` of a prepared batch (forward only)."""
        if self.loss_fn is not None:
            loss = self.loss_fn(self.model, batch)
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise LoRAInitError(f"loss_fn(model, batch) must return a scalar tensor (the summed loss), got "
                                    f"{type(loss).__name__} {getattr(loss, 'shape', '')} for batch {index}")
            n = _leading_size(batch)
            return loss.reshape(()), (1 if n is None else n)
        if not isinstance(batch, Mapping):
            raise LoRAInitError(f"batch {index} is a {type(batch).__name__}, not a mapping of model inputs; pass "
                                f"loss_fn(model, batch) -> summed loss for such batches")
        try:
            out = self.model(**batch)
        except LoRAInitError:
            raise
        except Exception as err:
            raise LoRAInitError(f"the model cannot take batch {index} (keys {sorted(batch)}): "
                                f"{type(err).__name__}: {err}") from err
        loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
        if not isinstance(loss, Tensor):
            raise LoRAInitError(f"the model returned no loss for batch {index}; include 'labels' in the batches or "
                                f"pass loss_fn(model, batch) -> summed loss")
        logits = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
        count = self._loss_count(batch, logits, loss.detach(), index)
        return loss.reshape(()) * count, count

    def _loss_count(self, batch, logits, loss: Tensor, index: int) -> int:
        labels = batch.get("labels")
        if not isinstance(labels, Tensor):
            raise LoRAInitError(f"batch {index} has no 'labels' tensor, so the model's mean loss cannot be turned "
                                f"into the summed loss; pass loss_fn(model, batch) -> summed loss")
        counts = {
            "shifted": int(labels[..., 1:].ne(-100).sum()) if labels.dim() >= 2 else -1,
            "unshifted": int(labels.ne(-100).sum()),
            "examples": int(labels.shape[0]),
        }
        if counts["unshifted"] == 0:  # the mode-specific count is checked below
            raise LoRAInitError(f"batch {index} has no loss tokens (every label is -100, e.g. an all-zero "
                                f"attention_mask)")
        if self.mode is None:
            self.mode = self._detect_mode(labels, logits, loss, index)
        count = counts[self.mode]
        if count <= 0:
            raise LoRAInitError(f"batch {index} has no loss tokens (every label is -100)")
        return count

    @staticmethod
    def _detect_mode(labels: Tensor, logits: Optional[Tensor], loss: Tensor, index: int) -> str:
        if not isinstance(logits, Tensor):
            raise LoRAInitError("the model's output has no logits to tell how its loss is normalized; pass "
                                "loss_fn(model, batch) -> summed loss")
        import torch.nn.functional as F

        with torch.no_grad():
            lg = logits.detach().float()
            cands = {}
            if labels.dim() >= 2 and lg.dim() == labels.dim() + 1 and lg.shape[:-1] == labels.shape:
                cands["shifted"] = F.cross_entropy(lg[..., :-1, :].reshape(-1, lg.shape[-1]),
                                                   labels[..., 1:].reshape(-1), ignore_index=-100)
                cands["unshifted"] = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), labels.reshape(-1),
                                                     ignore_index=-100)
            elif labels.dim() == 1 and lg.dim() == 2 and lg.shape[0] == labels.shape[0]:
                if labels.is_floating_point():
                    cands["examples"] = F.mse_loss(lg.squeeze(-1), labels)
                else:
                    cands["examples"] = F.cross_entropy(lg, labels)
        ref = float(loss.float())
        for mode, val in cands.items():
            if math.isfinite(ref) and math.isclose(float(val), ref, rel_tol=2e-3, abs_tol=1e-6):
                return mode
        raise LoRAInitError(f"cannot tell how the model's loss ({ref:.6g} on batch {index}) is normalized: it matches "
                            f"none of {', '.join(f'{k}={float(v):.6g}' for k, v in cands.items()) or 'no candidate'}; "
                            f"pass loss_fn(model, batch) -> summed loss")


# ------------------------------------------------------------------------------------------ statistics
@dataclass
class LayerStats:
    """The statistics of one target after a pass (means over its ``count`` valid tokens)."""

    name: str
    Z: Tensor  # (n, n), shared object with the layers of the same input
    G: Tensor  # (m, n)
    s: Tensor  # (m,)
    count: int
    z_owner: str  # the layer whose accumulator holds Z (itself when not shared)


def stats_bytes(t: TargetLayer, dtype: torch.dtype = torch.float32, with_z: bool = True) -> int:
    """Bytes of one layer's accumulators: Z (n^2, unless shared), G (m n), s (m)."""
    e = torch.finfo(dtype).bits // 8
    return e * ((t.n * t.n if with_z else 0) + t.m * t.n + t.m)


def plan_groups(names: Sequence[str], targets: Dict[str, TargetLayer], shared: Dict[str, str],
                max_memory: Optional[int], dtype: torch.dtype) -> List[List[str]]:
    """Split targets (in model order) into passes whose statistics fit in ``max_memory`` bytes.

    Layers sharing an input (``shared[name] = owner``) stay in one group (one Z). A unit larger than
    the budget gets a pass of its own.
    """
    units: Dict[str, List[str]] = {}
    for name in names:
        units.setdefault(shared.get(name, name), []).append(name)
    if max_memory is None:
        return [list(names)]
    groups, cur, used = [], [], 0
    for owner, members in units.items():
        need = sum(stats_bytes(targets[n], dtype, with_z=(n == members[0])) for n in members)
        if cur and used + need > max_memory:
            groups.append(cur)
            cur, used = [], 0
        cur.extend(members)
        used += need
    if cur:
        groups.append(cur)
    return groups


def _input_key(x: Tensor):
    return (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype, x.device, x._version)


class StatsCollector:
    """Hooks on the base layers of ``targets`` that feed one ``KFACStats`` per layer (Z shared).

    Use as a context manager around the batches of one pass; call :meth:`begin_batch` before each
    forward and :meth:`end_forward` between forward and backward. Every hook is removed on exit.
    """

    def __init__(self, targets: Dict[str, TargetLayer], names: Sequence[str], *, dtype=torch.float32,
                 backend: str = "auto", probe_only: bool = False):
        self.targets = targets
        self.names = list(names)
        self.dtype, self.backend = dtype, backend
        self.probe_only = probe_only
        self.stats: Dict[str, lk.KFACStats] = {}
        self.owner: Dict[str, str] = {}  # layer -> layer whose accumulator holds its Z
        self.handles = []
        self.batch_index = -1
        self.mask: Optional[Tensor] = None
        self.calls: Dict[str, List[Tuple]] = {}
        self.order: List[str] = []
        self.error: Optional[BaseException] = None
        self.kernel_time = 0.0
        self._live: List[Tuple[str, Tensor]] = []

    def __enter__(self):
        for name in self.names:
            t = self.targets[name]
            self.handles.append(t.base.register_forward_hook(self._make_hook(name)))
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self):
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self._live.clear()
        self.calls.clear()

    # -- per batch
    def begin_batch(self, index: int):
        self.batch_index = index
        self.mask = None
        self.calls = {}
        self.order = []
        self._live = []
        self.error = None

    def _make_hook(self, name: str):
        def hook(module, inputs, output):
            if not inputs or not isinstance(inputs[0], Tensor) or not isinstance(output, Tensor):
                raise LoRAInitError(f"module {name!r}: expected a tensor input and output in batch {self.batch_index}")
            x = inputs[0]
            self.calls.setdefault(name, []).append(_input_key(x))
            self.order.append(name)
            self._live.append((name, x))
            if self.probe_only:
                return None
            if not output.requires_grad:
                output.requires_grad_(True)  # all parameters are frozen: start the graph here
            output.register_hook(self._make_grad_hook(name, x))
            return None
        return hook

    def _mask_for(self, name: str, x: Tensor) -> Optional[Tensor]:
        mask = self.mask
        if mask is None:
            return None
        lead = tuple(x.shape[:-1])
        if tuple(mask.shape) == lead:
            return mask
        if mask.numel() == math.prod(lead):
            return mask.reshape(lead)
        raise LoRAInitError(f"module {name!r}: input of shape {tuple(x.shape)} does not match the token mask of shape "
                            f"{tuple(mask.shape)} in batch {self.batch_index}")

    def _make_grad_hook(self, name: str, x: Tensor):
        def grad_hook(g: Tensor):
            if self.error is not None:
                return None
            try:
                t0 = time.perf_counter()
                mask = self._mask_for(name, x)  # the batch's mask is final once backward runs
                st = self.stats[name]
                st.update(x.detach(), g.detach(), mask)
                self.kernel_time += time.perf_counter() - t0
            except Exception as err:  # named and re-raised after backward
                self.error = LoRAInitError(f"module {name!r}, batch {self.batch_index}: {err}")
                self.error.__cause__ = err
            return None
        return grad_hook

    def end_forward(self, mask: Optional[Tensor] = None):
        """Set the batch's token mask; fix Z-sharing on the first batch (layers called once whose inputs
        are one tensor object) and check it on later batches."""
        self.mask = mask
        if self.batch_index == 0 or not self.stats:
            seen: Dict[Tuple, str] = {}
            for name in self.order:
                if name in self.owner or name not in self.calls:
                    continue
                keys = self.calls[name]
                if len(keys) == 1 and keys[0] in seen:
                    self.owner[name] = seen[keys[0]]
                else:
                    self.owner[name] = name
                    if len(keys) == 1:
                        seen[keys[0]] = name
            if self.probe_only:
                return
            for name in self.names:
                if name not in self.owner:
                    continue
                t = self.targets[name]
                self.stats[name] = lk.KFACStats(t.n, t.m, track_input_cov=self.owner[name] == name,
                                                device=t.device, dtype=self.dtype, backend=self.backend)
        for name in self.names:
            if name not in self.stats and name in self.calls:
                raise LoRAInitError(f"module {name!r} ran in batch {self.batch_index} but not in batch 0; "
                                    f"its statistics would cover different data than the others")
            owner = self.owner.get(name, name)
            if owner != name and self.calls.get(name) != self.calls.get(owner):
                raise LoRAInitError(f"modules {owner!r} and {name!r} shared their input tensor in batch 0 but not in "
                                    f"batch {self.batch_index}; the model's data flow changes between batches")

    def first_nonfinite_input(self) -> Optional[str]:
        for name, x in self._live:
            if not bool(torch.isfinite(x).all()):
                return name
        return None

    def end_batch(self):
        self._live = []
        if self.error is not None:
            raise self.error

    def results(self) -> Dict[str, LayerStats]:
        out = {}
        for name in self.names:
            st = self.stats.get(name)
            if st is None or st.count == 0:
                raise LoRAInitError(f"module {name!r} received no valid tokens in the statistics pass (it never ran, "
                                    f"or every token was masked)")
            owner = self.owner[name]
            out[name] = LayerStats(name=name, Z=None, G=st.grad(), s=st.grad_sq(), count=st.count, z_owner=owner)
        zs = {o: self.stats[o].input_cov() for o in {s.z_owner for s in out.values()}}
        for s in out.values():
            s.Z = zs[s.z_owner]
            if self.stats[s.z_owner].count != s.count:
                raise LoRAInitError(f"modules {s.z_owner!r} and {s.name!r} share an input but saw different token counts")
        return out
