"""The statistics pass: hooks on the target layers feed one ``KFACStats`` per layer (docs/math.md).

The pass runs forward and backward over the statistics samples with every parameter frozen and
the LoRA branches disabled, so each target computes ``y = W x + b`` of its base weight. A forward
hook on each target's base layer sees ``x`` (the layer input) and puts a tensor hook on ``y``;
backward then delivers ``g = dL/dy`` of the **summed** loss and ``KFACStats.update(x, g, mask)``
accumulates ``Z``, ``G`` and ``s`` over the valid tokens. No ``.grad`` is stored for any
parameter. Each layer's valid tokens come from the mask that matches its input
(:mod:`~lorainit.passes.masks`: encoder / decoder masks, one token per example for poolers and
heads). Targets whose inputs are the same tensor (q/k/v, gate/up) are found at run time on the
first batch and share one ``Z``. ``nn.Embedding`` targets get :class:`EmbeddingStats`: their
one-hot inputs make ``Z`` diagonal (the token frequencies), kept as a vector. Under a memory budget :func:`plan_groups` splits the targets
into groups with one pass each (layers sharing an input stay together). A method may ask for
extra statistics of the same pass (:data:`EXTRAS`): the input mean (EVA) and the output second
moment ``(1/T) sum_t y_t y_t^T`` (Astra, from the forward hook's output, kept until its backward).

With a process group (:mod:`lorainit.distributed`): every rank runs as many batches as the rank
with the most (a rank that ran out repeats its first batch with the statistics off, so FSDP2's
collectives inside forward/backward always pair up); each batch's forward and backward end in an
agreed status; after the last batch the ranks exchange which targets ran and which share an
input (one all-gather), a target that did not run on some rank gets zero statistics there, and
the sums and counts go through one bucketed all-reduce. Masks are moved to each input's device
(models spread over devices).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

import lorainit_kernels as lk

from .. import distributed as dist_utils
from ..targets import LoRAInitError, TargetLayer
from .batches import count_examples
from .loss import ForwardStopped, LossRunner
from .masks import LayerMasks, TokenMasks
from .state import pass_state, progress_bar

__all__ = ["EXTRAS", "check_extras", "LayerStats", "EmbeddingStats", "StatsCollector", "StatsPass", "stats_bytes", "plan_groups", "pack_passes", "pack_passes_sized", "probe_shared_inputs", "stack_groups",
           "stats_pass"]


@dataclass
class LayerStats:
    """The statistics of one target after a pass (means over its ``count`` valid tokens)."""

    name: str
    Z: Tensor  # (n, n), shared object with the layers of the same input
    G: Optional[Tensor]  # (m, n); None after a forward-only pass
    s: Optional[Tensor]  # (m,); None after a forward-only pass
    count: int
    z_owner: str  # the layer whose accumulator holds Z (itself when not shared)
    diag: bool = False  # Z is the (n,) diagonal (embedding targets: token frequencies)
    mu: Optional[Tensor] = None  # (n,) input mean (extra "mean"; shared like Z; an embedding's is its Z)
    Y: Optional[Tensor] = None  # (m, m) output second moment (1/T) sum_t y_t y_t^T (extra "output_cov")


#: The optional statistics a method may ask the pass for, beside ``Z, G, s``: ``"mean"`` (the input
#: mean, O(T n), EVA) and ``"output_cov"`` (the output second moment, O(T m^2) and m^2 bytes, Astra).
EXTRAS = ("mean", "output_cov")


def check_extras(extras) -> tuple:
    """``extras`` as a sorted tuple of names from :data:`EXTRAS` (ValueError naming an unknown one)."""
    extras = tuple(sorted(set(extras or ())))
    bad = [e for e in extras if e not in EXTRAS]
    if bad:
        raise ValueError(f"unknown statistics {bad}; the pass can add {list(EXTRAS)}")
    return extras


class EmbeddingStats:
    """K-FAC statistics of an ``nn.Embedding`` target (the linear map ``W = weight^T`` on one-hot inputs).

    With ``x_t = e_{id_t}``: ``Z = (1/T) sum_t e e^T = diag(token frequencies)`` (kept as the (n,)
    vector of counts), ``G = (1/T) sum_t g_t e_{id_t}^T`` (column ``id`` += ``g_t``, stored (n, m)
    for row scatters) and ``s = (1/T) sum_t g_t * g_t``; never an n x n matrix. Accumulated in
    ``dtype`` (fp32 default) on the weight's device.
    """

    def __init__(self, n: int, m: int, *, device=None, dtype=torch.float32):
        self.n, self.m, self.dtype = n, m, dtype
        self.z = torch.zeros(n, dtype=dtype, device=device)
        self.gt = torch.zeros(n, m, dtype=dtype, device=device)
        self.g2 = torch.zeros(m, dtype=dtype, device=device)
        self.count = 0

    def update(self, ids: Tensor, grad_output: Tensor, mask: Optional[Tensor] = None) -> int:
        ids = ids.reshape(-1)
        g = grad_output.reshape(-1, self.m)
        if mask is not None:
            keep = mask.reshape(-1).to(ids.device)
            ids, g = ids[keep], g[keep]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.n):
            raise ValueError(f"token ids outside [0, {self.n})")
        g = g.to(self.dtype)
        self.z.index_add_(0, ids, torch.ones_like(ids, dtype=self.dtype))
        self.gt.index_add_(0, ids, g)
        self.g2 += (g * g).sum(0)
        self.count += int(ids.numel())
        return int(ids.numel())

    def sums(self) -> list:
        return [self.z, self.gt, self.g2]

    def input_cov(self) -> Tensor:
        return self.z / max(self.count, 1)

    def grad(self) -> Tensor:
        return self.gt.t() / max(self.count, 1)

    def grad_sq(self) -> Tensor:
        return self.g2 / max(self.count, 1)


def stats_bytes(t: TargetLayer, dtype: torch.dtype = torch.float32, with_z: bool = True, extras: Sequence[str] = (),
                grads: bool = True) -> int:
    """Bytes of one layer's accumulators: Z (n^2, unless shared), G (m n) and s (m) (``grads``: not in a
    forward-only pass); with ``extras``: the input mean (n, with Z) and the output second moment (m^2)."""
    e = torch.finfo(dtype).bits // 8
    z = (t.n if t.kind == "embedding" else t.n * t.n) if with_z else 0
    extra = (t.n if with_z and "mean" in extras else 0) + (t.m * t.m if "output_cov" in extras else 0)
    return e * (z + (t.m * t.n + t.m if grads else 0) + extra)


def plan_groups(names: Sequence[str], targets: Dict[str, TargetLayer], shared: Dict[str, str],
                max_memory: Optional[int], dtype: torch.dtype,
                working_set: Optional[Callable[[str], int]] = None, extras: Sequence[str] = (),
                grads: bool = True) -> List[List[str]]:
    """Split targets (in model order) into passes whose peak fits in ``max_memory`` bytes.

    A pass's peak is its statistics plus the largest ``working_set(name)`` of its layers (bytes used
    on top of the statistics while that layer is processed; none by default). Layers sharing an
    input (``shared[name] = owner``) stay in one group (one Z). A unit larger than the budget gets a
    pass of its own (:mod:`lorainit.memory` says which budget it needs).
    """
    units: Dict[str, List[str]] = {}
    for name in names:
        units.setdefault(shared.get(name, name), []).append(name)
    if max_memory is None:
        return [list(names)]
    work_of = working_set or (lambda name: 0)
    return pack_passes([(members, sum(stats_bytes(targets[n], dtype, with_z=(n == members[0]), extras=extras,
                                                  grads=grads) for n in members),
                         max(work_of(n) for n in members)) for members in units.values()], max_memory)


def pack_passes(units: Sequence[Tuple[List[str], int, int]], budget: Optional[int]) -> List[List[str]]:
    """Units ``(names, held bytes, working bytes)`` in order, packed greedily into passes whose held
    bytes plus the largest working bytes of the pass fit in ``budget``; a unit that alone exceeds it
    gets a pass of its own; ``budget=None``: one pass. The one packing rule of the statistics and
    weight-gradient plans."""
    return [members for members, _, _ in pack_passes_sized(units, budget)]


def pack_passes_sized(units: Sequence[Tuple[List[str], int, int]],
                      budget: Optional[int]) -> List[Tuple[List[str], int, int]]:
    """:func:`pack_passes` with each pass's held bytes and largest working bytes: ``(names, held, work)``."""
    out: List[Tuple[List[str], int, int]] = []
    cur: List[str] = []
    used = work = 0
    for members, need, w in units:
        if budget is not None and cur and used + need + max(work, w) > budget:
            out.append((cur, used, work))
            cur, used, work = [], 0, 0
        cur.extend(members)
        used += need
        work = max(work, w)
    if cur:
        out.append((cur, used, work))
    return out


def stack_groups(targets: Dict[str, TargetLayer], names: Sequence[str], owners: Dict[str, str],
                 size: int) -> List[List[str]]:
    """Linear targets that read their input alone (no other target's ``owners`` entry points at them),
    grouped by ``(n, m, device)`` in model order, in stacks of up to ``size`` (stacks of one left out;
    names without an ``owners`` entry are skipped). The statistics pass accumulates each stack's sums in
    one tensor (``StatsCollector(stack_size=)``) and LoRA-DA solves it in one batched call."""
    readers: Dict[str, int] = {}
    for name in names:
        if name in owners:
            readers[owners[name]] = readers.get(owners[name], 0) + 1
    groups: Dict[tuple, List[str]] = {}
    for name in names:
        t = targets[name]
        if owners.get(name) == name and readers[name] == 1 and t.kind != "embedding":
            groups.setdefault((t.n, t.m, str(t.device)), []).append(name)
    size = max(size, 1)
    return [g[i:i + size] for g in groups.values() for i in range(0, len(g), size) if len(g[i:i + size]) > 1]


def _input_key(x: Tensor):
    return (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype, x.device, x._version)


class StatsCollector:
    """Hooks on the base layers of ``targets`` that feed one ``KFACStats`` per layer (Z shared).

    Use as a context manager around the batches of one pass; call :meth:`begin_batch` before each
    forward and :meth:`end_forward` between forward and backward. Every hook is removed on exit.
    """

    def __init__(self, targets: Dict[str, TargetLayer], names: Sequence[str], *, dtype=torch.float32,
                 backend: str = "auto", probe_only: bool = False, model: Optional[nn.Module] = None,
                 extras: Sequence[str] = (), with_grad: bool = True, stack_size: int = 1):
        self.targets = targets
        # linear layers of one shape that read their input alone accumulate into slices of shared stacks of
        # up to this many layers (model order), so that a batched solve reads them without a copy
        self.stack_size = stack_size
        self.extras = check_extras(extras)
        self.keep_output = "output_cov" in self.extras
        self.with_grad = with_grad  # False: a forward-only pass (Z and the extras; no G, s)
        self._pending: List[Tuple[str, Tensor, Optional[Tensor]]] = []  # forward-only: updates once masks are known
        self.layer_masks = LayerMasks(model, targets, list(names))
        self.names = list(names)
        self.dtype, self.backend = dtype, backend
        self.probe_only = probe_only
        self.stats: Dict[str, lk.KFACStats] = {}
        self.owner: Dict[str, str] = {}  # layer -> layer whose accumulator holds its Z
        self.handles = []
        self.batch_index = -1
        self.masks: Optional[TokenMasks] = None
        self.calls: Dict[str, List[Tuple]] = {}
        self.order: List[str] = []
        self.error: Optional[BaseException] = None
        self.kernel_time = 0.0
        self.active = True
        self._live: List[Tuple[str, Tensor]] = []
        # forward-only pass: stop a batch's forward once this many targets have run (enable_early_stop)
        self.stop_after: Optional[int] = None

    def enable_early_stop(self) -> bool:
        """After a complete forward-only batch: end later batches' forwards once every target that ran in
        it has run again (the layers above the last target, the LM head and the loss feed nothing the
        pass collects). Only where each target ran exactly once in that batch, so that "every target ran"
        is "all their calls are done"; a layer called twice (a shared module) keeps the whole forward.
        Returns whether it is enabled."""
        if self.with_grad or self.probe_only or not self.calls or any(len(c) != 1 for c in self.calls.values()):
            return False
        self.stop_after = len(self.calls)
        return True

    def __enter__(self):
        for name in self.names:
            t = self.targets[name]
            self.handles.append(t.base.register_forward_hook(self._make_hook(name)))
        self.handles.extend(self.layer_masks.attach())
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self):
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self._live.clear()
        self._pending.clear()
        self.calls.clear()

    # -- per batch
    def begin_batch(self, index: int, active: bool = True):
        """Start batch ``index``; an inactive batch (a rank's padding batch) runs the hooks but adds nothing."""
        self.batch_index = index
        self.active = active
        self.masks = None
        self.layer_masks.begin_batch()
        self.calls = {}
        self.order = []
        self._live = []
        self.error = None
        self._pending = []

    def _make_hook(self, name: str):
        def hook(module, inputs, output):
            if not inputs or not isinstance(inputs[0], Tensor) or not isinstance(output, Tensor):
                raise LoRAInitError(f"module {name!r}, batch {self.batch_index}: expected a tensor input and output")
            x = inputs[0]
            self.calls.setdefault(name, []).append(_input_key(x))
            self.order.append(name)
            self._live.append((name, x))
            if self.probe_only:
                return None
            y = output.detach() if self.keep_output and self.targets[name].kind != "embedding" else None
            if not self.with_grad:  # the batch's masks are final after the forward: update in end_forward
                self._pending.append((name, x.detach(), y))
                if self.stop_after is not None and len(self.calls) == self.stop_after:
                    raise ForwardStopped()
                return None
            if not output.requires_grad:
                output.requires_grad_(True)  # all parameters are frozen: start the graph here
            output.register_hook(self._make_grad_hook(name, x, y))
            return None
        return hook

    def _mask_for(self, name: str, x: Tensor) -> Optional[Tensor]:
        """The mask matching this layer's input (:meth:`LayerMasks.select`; errors do not name the module)."""
        return self.layer_masks.select(name, x, self.masks)[0]

    def _make_grad_hook(self, name: str, x: Tensor, y: Optional[Tensor] = None):
        def grad_hook(g: Tensor):
            if self.error is not None or not self.active:
                return None
            try:
                t0 = time.perf_counter()
                mask = self._mask_for(name, x)  # the batch's mask is final once backward runs
                st = self.stats[name]
                if y is None:
                    st.update(x.detach(), g.detach(), mask)
                else:
                    st.update(x.detach(), g.detach(), mask, output=y)
                self.kernel_time += time.perf_counter() - t0
            except Exception as err:  # named and re-raised after backward
                self.error = LoRAInitError(f"module {name!r}, batch {self.batch_index}: {err}")
                self.error.__cause__ = err
            return None
        return grad_hook

    def end_forward(self, mask=None):
        """Set the batch's token masks (a :class:`TokenMasks`, or one mask tensor); fix Z-sharing on the first
        batch (layers called once whose inputs are one tensor object) and check it on later batches."""
        if isinstance(mask, Tensor):
            mask = TokenMasks(encoder=("attention_mask", mask))
        self.masks = mask
        if self.batch_index == 0 or not self.stats:
            seen: Dict[Tuple, str] = {}
            for name in self.order:
                if name in self.owner or name not in self.calls:
                    continue
                keys = self.calls[name]
                if self.targets[name].kind == "embedding":  # token ids: its own (diagonal) Z
                    self.owner[name] = name
                elif len(keys) == 1 and keys[0] in seen:
                    self.owner[name] = seen[keys[0]]
                else:
                    self.owner[name] = name
                    if len(keys) == 1:
                        seen[keys[0]] = name
            if self.probe_only:
                return
            buffers = self._stacked_buffers()
            for name in self.names:
                if name not in self.owner:
                    continue
                t = self.targets[name]
                if t.kind == "embedding":
                    if not self.with_grad:
                        raise LoRAInitError(f"module {name!r}: the forward-only statistics pass takes linear layers "
                                            f"only (an embedding's statistics come from the gradient pass)")
                    self.stats[name] = EmbeddingStats(t.n, t.m, device=t.device, dtype=self.dtype)
                    continue
                self.stats[name] = self._accumulator(t, self.owner[name] == name, buffers.get(name))
        for name in self.names:
            if name not in self.stats and name in self.calls:
                raise LoRAInitError(f"module {name!r} ran in batch {self.batch_index} but not in batch 0; "
                                    f"its statistics would cover different data than the others")
            owner = self.owner.get(name, name)
            if owner != name and self.calls.get(name) != self.calls.get(owner):
                raise LoRAInitError(f"modules {owner!r} and {name!r} shared their input tensor in batch 0 but not in "
                                    f"batch {self.batch_index}; the model's data flow changes between batches")
        pending, self._pending = self._pending, []
        for name, x, y in pending:  # forward-only: the updates the gradient hooks make otherwise
            if self.error is not None or not self.active:
                break
            try:
                t0 = time.perf_counter()
                mask = self._mask_for(name, x)
                if y is None:
                    self.stats[name].update(x, None, mask)
                else:
                    self.stats[name].update(x, None, mask, output=y)
                self.kernel_time += time.perf_counter() - t0
            except Exception as err:  # named and re-raised at the end of the batch
                self.error = LoRAInitError(f"module {name!r}, batch {self.batch_index}: {err}")
                self.error.__cause__ = err

    def complete(self, owners: Dict[str, str]) -> None:
        """Adopt the Z-sharing of all ranks (``owners``: layer -> owner, for the targets that ran anywhere) and
        give the targets that did not run here zero accumulators, so every rank reduces the same tensors."""
        for name in self.names:
            if name not in owners:
                continue
            if name in self.owner and self.owner[name] != owners[name]:
                raise LoRAInitError(f"module {name!r} shares its input with {self.owner[name]!r} on this rank but "
                                    f"with {owners[name]!r} on another")
            self.owner[name] = owners[name]
        for name in self.names:
            if name in owners and name not in self.stats:
                self.stats[name] = self._accumulator(self.targets[name], owners[name] == name)

    def _accumulator(self, t: TargetLayer, owns_z: bool, buffers=None) -> lk.KFACStats:
        """A linear target's accumulator: Z (and the input mean) only where it owns its input's Z."""
        return lk.KFACStats(t.n, t.m, track_input_cov=owns_z, track_grad=self.with_grad,
                            track_input_mean=owns_z and "mean" in self.extras,
                            track_output_cov="output_cov" in self.extras, device=t.device, dtype=self.dtype,
                            backend=self.backend, buffers=buffers)

    def _stacked_buffers(self) -> Dict[str, tuple]:
        """``{layer: (Z, G, s) slices}`` for the stacks of :func:`stack_groups` (``stack_size``)."""
        if self.stack_size <= 1 or not self.with_grad:
            return {}
        out = {}
        for chunk in stack_groups(self.targets, self.names, self.owner, self.stack_size):
            t = self.targets[chunk[0]]
            kw = dict(device=t.device, dtype=self.dtype)
            Zs, Gs, ss = (torch.zeros(len(chunk), *shape, **kw) for shape in ((t.n, t.n), (t.m, t.n), (t.m,)))
            for j, name in enumerate(chunk):
                out[name] = (Zs[j], Gs[j], ss[j])
        return out

    def fingerprint(self) -> Dict[str, tuple]:
        """{target that ran here: (Z owner, accumulator dtype, tracks Z)}, what the ranks exchange before reducing."""
        return {n: (self.owner[n], str(st.dtype), st.track_input_cov) for n, st in self.stats.items()}

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
        """The means ``Z, G, s`` of every layer, taken **in place** in the accumulators (no second copy);
        the collector's accumulators are released."""
        out = {}
        for name in self.names:
            st = self.stats.get(name)
            if st is None or st.count == 0:
                raise LoRAInitError(f"module {name!r} received no valid tokens in the statistics pass (it never ran, "
                                    f"or every token was masked)")
            owner = self.owner[name]
            diag = isinstance(st, EmbeddingStats)
            # means in place (no second copy): the accumulators are released below
            if diag:
                G, s = st.grad(), st.grad_sq()
            elif st.g_sum is None:  # a forward-only pass
                G = s = None
            else:
                G, s = st.g_sum.div_(st.count), st.s_sum.div_(st.count)
            out[name] = LayerStats(name=name, Z=None, G=G, s=s, count=st.count, z_owner=owner, diag=diag)
        for name, s in out.items():
            st = self.stats[name]
            if "output_cov" in self.extras:
                if s.diag:
                    raise LoRAInitError(f"module {name!r}: the output covariance is not defined for an embedding "
                                        f"target in lorainit (its method takes linear layers only)")
                s.Y = st.y_sum.div_(st.count)
        zs = {o: self.stats[o].input_cov() if isinstance(self.stats[o], EmbeddingStats)
              else self.stats[o].z_sum.div_(self.stats[o].count) for o in {s.z_owner for s in out.values()}}
        mus = {}
        if "mean" in self.extras:  # an embedding's one-hot inputs have the token frequencies as their mean
            mus = {o: zs[o] if isinstance(self.stats[o], EmbeddingStats) else self.stats[o].mu_sum.div_(self.stats[o].count)
                   for o in zs}
        for s in out.values():
            s.Z = zs[s.z_owner]
            s.mu = mus.get(s.z_owner)
            if self.stats[s.z_owner].count != s.count:
                raise LoRAInitError(f"modules {s.z_owner!r} and {s.name!r} share an input but saw different token counts")
        self.stats = {}
        return out


@dataclass
class StatsPass:
    """What one statistics pass produced: per-layer statistics, examples seen (all ranks), kernel seconds."""

    stats: Dict[str, LayerStats]
    examples: int
    kernel_s: float
    masks: Dict[str, Optional[str]] = None  # per layer: which token mask its statistics used


def probe_shared_inputs(model: nn.Module, targets: Dict[str, TargetLayer], names: Sequence[str],
                        runner: LossRunner, batch: Any) -> Dict[str, str]:
    """Which targets receive the same input tensor (layer -> owner), from one forward of ``batch``."""
    with pass_state(model, targets), torch.no_grad(), \
            StatsCollector(targets, names, probe_only=True, model=model) as col:
        col.begin_batch(0)
        runner.summed_loss(runner.prepare(batch), 0)
        col.end_forward(None)
    return dict(col.owner)


def _stoppable(model: nn.Module) -> bool:
    """Whether a forward of ``model`` may be ended from a hook: not with accelerate's device hooks (their
    post-forward, which offloads a module's weights again, would be skipped) nor under DataParallel
    (the replicas' threads)."""
    if isinstance(model, nn.DataParallel):
        return False
    return not any(hasattr(m, "_hf_hook") for m in model.modules())


def stats_pass(model: nn.Module, targets: Dict[str, TargetLayer], names: Sequence[str], batches: Sequence[Any],
               runner: LossRunner, *, dtype: torch.dtype = torch.float32, backend: str = "auto",
               progress: bool = False, desc: str = "lorainit statistics", extras: Sequence[str] = (),
               with_grad: bool = True, stack_size: int = 1) -> StatsPass:
    """K-FAC statistics of the targets ``names`` over ``batches`` (one forward/backward each), all-reduced.

    ``extras`` (:data:`EXTRAS`): optional statistics accumulated in the same pass (``LayerStats.mu``, ``.Y``).
    ``with_grad=False``: a forward-only pass (no backward; ``LayerStats.G`` and ``.s`` are None), for the
    methods that need only input/output statistics (EVA, CorDA, Astra): about a third of the cost. From
    the second batch on, its forward ends once every target has run (the layers above the last target,
    the LM head and the loss are skipped; :meth:`StatsCollector.enable_early_stop`), except under a
    process group (a sharded model's forward holds collectives), with accelerate's device hooks or
    DataParallel (:func:`_stoppable`) and where a target runs more than once.
    ``stack_size`` > 1: same-shape layers that read their input alone accumulate into shared stacks of up
    to that many layers (:class:`StatsCollector`), for a batched solve without a copy.

    With a process group: padded to the same number of batches on every rank, an agreed status after
    each forward and backward, the targets that ran agreed before the bucketed all-reduce (module docstring).
    """
    examples = 0
    steps = dist_utils.all_reduce_max(len(batches))
    with pass_state(model, targets, train_mode=True), \
            StatsCollector(targets, names, dtype=dtype, backend=backend, model=model, extras=extras,
                           with_grad=with_grad, stack_size=stack_size) as col:
        bar = progress_bar(len(batches), desc, progress)
        try:
            for i in range(steps):
                real = i < len(batches)
                batch = batches[i] if real else batches[0]
                col.begin_batch(i, active=real)
                with torch.enable_grad() if with_grad else torch.no_grad():
                    err = loss = None
                    try:
                        loss, _, masks = runner.forward_masks(batch, i, culprit=col.first_nonfinite_input)
                        col.end_forward(masks)
                        if with_grad and not loss.requires_grad:
                            raise LoRAInitError(f"batch {i}: the loss does not depend on any LoRA target layer's "
                                                f"output")
                    except Exception as e:
                        err = e
                    dist_utils.agree(err, f"statistics pass, batch {i}")
                    if with_grad:
                        loss.backward()
                err = None
                try:
                    col.end_batch()
                    if i == 0:
                        runner.finish_check()  # the loss_fn reduction check, outside the batch's hooks
                        if not with_grad and not dist_utils.is_distributed() and _stoppable(model):
                            col.enable_early_stop()
                except Exception as e:
                    err = e
                dist_utils.agree(err, f"statistics pass, batch {i} (backward)")
                if real:
                    examples += count_examples([batch])
                    bar.update(1)
        finally:
            bar.close()
        if dist_utils.is_distributed():
            merged: Dict[str, Tuple[str, str, bool]] = {}
            for rank, fp in enumerate(dist_utils.gather_objects(col.fingerprint())):
                for name, entry in fp.items():
                    if merged.setdefault(name, entry) != entry:
                        raise LoRAInitError(f"module {name!r}: the ranks disagree on its statistics (rank {rank}: "
                                            f"Z owner, dtype, tracks Z = {entry}; an earlier rank: {merged[name]}); "
                                            f"the model's data flow differs between ranks")
            col.complete({name: entry[0] for name, entry in merged.items()})
        dist_utils.all_reduce_stats(col.stats)
        results = col.results()
    if dist_utils.is_distributed():
        examples = int(dist_utils.all_reduce_scalars([examples])[0])
    return StatsPass(results, examples, col.kernel_time, {n: col.layer_masks.label(n) for n in names})
