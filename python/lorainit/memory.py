"""The memory model of an initialization, and the plan a budget gives (``estimate_memory``).

Bytes above what the model and one forward/backward of a batch already use (``e`` = bytes of the
statistics dtype, 4 for fp32; ``m x n`` a target's weight, ``r`` its rank):

* **statistics** of a target: ``Z`` ``e n^2`` (once per distinct input: q/k/v, gate/up share it),
  ``G`` ``e m n``, ``s`` ``e m`` (:func:`lorainit.passes.stats.stats_bytes`); they live from the
  pass that accumulates them until the layer is solved (the means are taken in place).
* **one layer's LoRA-DA solve** (:func:`solve_bytes`, on top of the statistics): the trainer lets
  each solve use its own means as workspace
  (``lorainit_kernels.linalg.factor_input_cov(overwrite=True)`` and ``methods.lora_da(overwrite=True)``):
  ``Z`` is damped and Cholesky-factored **in place, once per input**, ``G`` becomes ``H = G Z_d^-1``
  and then ``dW`` in place, and for the last (or only) layer of an input ``Z_d^-1`` (``potri``) and
  that layer's Omega take ``Z``'s storage (the weighted Gram is added into it by the native kernel).
  What is allocated beyond the statistics: for a layer whose input is shared (q/k/v, gate/up) and
  that is not the input's last, ``Z_d^-1`` cached for the others and its own Omega (``2 e n^2``);
  none of size n^2 otherwise. Then the eigensolver: LOBPCG's blocks (``~80 e n r``) or, for the
  dense path (n below the ``eigh`` crossover), ``eigh``'s eigenvectors, workspace and an fp64 copy of
  Omega for the residuals (``5 e n^2``); ``sigma_max(dW)`` is evaluated in fp64 from ``dW`` read in
  row blocks (at most 32 MiB); the fused Gram kernel packs at most 64 MiB of panels; the factors (``e r (m + n)``).
  Without a budget, up to ``solve_batch`` same-shape layers that read their input alone are solved in
  one batched LOBPCG call on the stack their statistics were accumulated in: their LOBPCG blocks side
  by side (:func:`batched_solve_bytes`).
  A statistics pass adds one batch's accumulation into the accumulators in place (the native
  kernel: no (n, n) temporary; Triton and torch backends allocate one batch's sums, ``e (n^2 + m n)``,
  which this model does not count).
* **rollback snapshot** (:func:`snapshot_bytes`): the adapters' values, and the base weight of every
  target the method changes (PiSSA, MiLoRA, LoRA-GA, LoRA-One with ``subtract_init``, LoRA-DA with
  ``preserve_output``), all on the **CPU** (pinned with CUDA): host memory, not device memory.
* **a weight-gradient pass** (LoRA-GA, LoRA-One; :func:`grad_bytes`): per target an fp32 ``m x n``
  accumulator filled by hooks (no ``.grad`` is written); its SVD call stacks at most what the
  budget leaves beside the pass's accumulators (:func:`plan_grad_groups`).

:func:`plan_lora_da` turns a budget into passes: layers (a shared-input unit stays together) in
model order, a pass closed when its statistics plus the largest working set of its layers would
exceed the budget. The peak of the call is the largest ``statistics of a pass + working set of
one of its layers``; a budget below the smallest such peak cannot be honoured and
:func:`estimate_memory` (``lorainit init --dry-run``) refuses it, naming the smallest budget that works.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn

from lorainit_kernels.linalg import choose_solver

from .passes.stats import pack_passes, pack_passes_sized, stack_groups, stats_bytes
from .targets import LoRAInitError, TargetLayer, find_targets

__all__ = ["MemoryPlan", "estimate_memory", "plan_lora_da", "solve_bytes", "batched_solve_bytes", "solve_stacks", "layer_solver",
           "snapshot_bytes", "grad_bytes",
           "release_freed_host_memory",
           "structural_sharing", "MiB"]

MiB = 1 << 20
_SHARED_NAMES = ({"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"}, {"query", "key", "value"},
                 {"w1", "w3"}, {"wq", "wk", "wv"})


def _elem(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


FP64_BLOCK = 32 << 20   # lorainit_kernels.linalg.guidance._FP64_BLOCK_BYTES: sigma_max(dW) in fp64, dW read in row blocks
PACK_BUDGET = 64 << 20  # csrc/gram_driver.inc kPackBudget: the fused Gram kernel's packed panels


def layer_solver(t: TargetLayer, solver: str = "auto") -> str:
    """The eigensolver LoRA-DA runs for target ``t`` (``"auto"`` resolved by ``choose_solver``)."""
    return choose_solver(t.n, max(t.r, 1), t.device) if solver == "auto" else solver


def solve_bytes(t: TargetLayer, solver: str = "auto", dtype: torch.dtype = torch.float32, *,
                shares_input: bool = False) -> int:
    """Bytes of one layer's LoRA-DA solve above its statistics, as the trainer runs it (module docstring).

    ``shares_input``: the layer reads a ``Z`` shared with other targets (q/k/v, gate/up): until the
    last of them, its Omega is a fresh n x n tensor beside the cached ``Z_d^-1``."""
    e, m, n, r = _elem(dtype), t.m, t.n, t.r
    solver = layer_solver(t, solver)
    words = 2 * n * n if shares_input else 0         # cached Z_d^-1 + this layer's Omega (else both in Z's storage)
    if solver == "eigh":
        words += 5 * n * n                            # eigenvectors, LAPACK workspace, fp64 Omega for the residuals
    else:
        words += 80 * n * max(r, 1)                   # LOBPCG's blocks (X, P, W, A X, ..., fp64 Rayleigh-Ritz parts)
    out = e * words + e * (r * (m + n + 1) + 3 * m)  # the factors, s_d and its weights
    out += min(8 * m * n, FP64_BLOCK)                 # an fp64 row block of dW (sigma_max, evaluated once)
    out += min(e * 2 * n * m, PACK_BUDGET)            # packed panels of the weighted Gram (Omega)
    return out


def release_freed_host_memory() -> None:
    """Give the host memory freed so far back to the operating system (glibc ``malloc_trim(0)``).

    glibc keeps freed blocks below its mmap threshold (which grows up to 32 MiB as large blocks are
    freed) in its heap, so after a pass's statistics and solves are freed the process can still hold
    hundreds of MiB that the next pass's (larger, mmapped) statistics cannot reuse. A no-op where
    there is no glibc."""
    global _TRIM
    if _TRIM is None:
        try:
            import ctypes

            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM = None


def snapshot_bytes(targets: Dict[str, TargetLayer], changes_base: bool) -> int:
    """Host bytes of the rollback snapshot: every adapter's values, the base weights when they change."""
    out = 0
    for t in targets.values():
        out += t.lora_A.numel() * t.lora_A.element_size() + t.lora_B.numel() * t.lora_B.element_size()
        if changes_base:
            out += t.m * t.n * t.weight.element_size()
    return out


def grad_bytes(t: TargetLayer) -> int:
    """Bytes of one target in a weight-gradient pass: its fp32 ``m x n`` accumulator (the hook-based
    pass of :mod:`lorainit.passes.grads` writes no ``.grad``)."""
    return 4 * t.m * t.n


def structural_sharing(targets: Dict[str, TargetLayer]) -> Dict[str, str]:
    """Layer -> owner of its ``Z``, guessed without data: siblings named q/k/v (gate/up, ...) with one input size.

    The statistics pass finds the real sharing on its first batch; this guess serves the estimate."""
    owner: Dict[str, str] = {}
    seen: Dict[tuple, str] = {}
    for name in targets:
        parent, _, leaf = name.rpartition(".")
        group = next((i for i, g in enumerate(_SHARED_NAMES) if leaf in g), None)
        key = (parent, group, targets[name].n)
        if group is not None and key in seen:
            owner[name] = seen[key]
        else:
            owner[name] = name
            if group is not None:
                seen[key] = name
    return owner


@dataclass
class MemoryPlan:
    """What a call will do under a budget: passes (groups of layers), peak bytes, the smallest budget."""

    method: str
    budget: Optional[int]
    groups: List[List[str]]
    stats_bytes: int                # all statistics, one pass
    peak_bytes: int                 # predicted peak above the model and one forward/backward
    smallest_budget: int            # the smallest budget this plan can honour
    snapshot_host_bytes: int = 0
    per_group: List[Dict[str, int]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    @property
    def passes(self) -> int:
        return len(self.groups)

    @property
    def fits(self) -> bool:
        return self.budget is None or self.budget >= self.smallest_budget

    def to_dict(self) -> Dict[str, Any]:
        return {"method": self.method, "budget": self.budget, "passes": self.passes, "groups": self.groups,
                "stats_bytes": self.stats_bytes, "peak_bytes": self.peak_bytes,
                "smallest_budget": self.smallest_budget, "snapshot_host_bytes": self.snapshot_host_bytes,
                "per_group": self.per_group, "notes": self.notes}

    def __str__(self) -> str:
        b = "none" if self.budget is None else f"{self.budget / MiB:.1f} MiB"
        lines = [f"lorainit memory plan: method {self.method}, budget {b}",
                 f"  statistics of all targets: {self.stats_bytes / MiB:.1f} MiB",
                 f"  passes: {self.passes}; predicted peak above the model and one forward/backward: "
                 f"{self.peak_bytes / MiB:.1f} MiB",
                 f"  smallest budget that works: {self.smallest_budget / MiB:.1f} MiB",
                 f"  rollback snapshot (host memory): {self.snapshot_host_bytes / MiB:.1f} MiB"]
        for i, (g, d) in enumerate(zip(self.groups, self.per_group)):
            lines.append(f"  pass {i + 1}: {len(g)} layers, statistics {d['stats'] / MiB:.1f} MiB, "
                         f"peak {d['peak'] / MiB:.1f} MiB")
            if i == 7 and self.passes > 9:
                lines.append(f"  ... {self.passes - 8} more passes")
                break
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _units(names: Sequence[str], shared: Dict[str, str]) -> List[List[str]]:
    units: Dict[str, List[str]] = {}
    for name in names:
        units.setdefault(shared.get(name, name), []).append(name)
    return list(units.values())


def batched_solve_bytes(t: TargetLayer, count: int, solver: str = "auto", dtype: torch.dtype = torch.float32) -> int:
    """Bytes of one batched LoRA-DA solve of ``count`` layers shaped like ``t`` that read their input
    alone (their statistics are one stack, Omega in its storage): :func:`solve_bytes` plus, per further
    layer, its LOBPCG blocks, factors and ``s_d`` (the capped fp64 and packing buffers are per call)."""
    e, m, n, r = _elem(dtype), t.m, t.n, max(t.r, 1)
    return solve_bytes(t, solver, dtype) + (count - 1) * e * (80 * n * r + r * (m + n + 1) + 3 * m)


def solve_stacks(targets: Dict[str, TargetLayer], names: Sequence[str], shared: Dict[str, str],
                 solve_batch: int) -> List[List[str]]:
    """The layers LoRA-DA solves together (``solve_batch`` > 1, no budget): the stacks of
    :func:`lorainit.passes.stats.stack_groups`, with the input sharing ``shared`` (layer -> owner)."""
    return stack_groups(targets, names, {n: shared.get(n, n) for n in names}, solve_batch)


def plan_lora_da(targets: Dict[str, TargetLayer], names: Sequence[str], shared: Dict[str, str],
                 budget: Optional[int], *, solver: str = "auto", dtype: torch.dtype = torch.float32,
                 solve_batch: int = 1) -> MemoryPlan:
    """Passes of LoRA-DA under ``budget`` bytes (None: one pass); see the module docstring.
    ``solve_batch`` > 1 without a budget: the batched solves of :func:`solve_stacks` (LOBPCG layers)."""
    units = _units(names, shared)
    u_stats = [sum(stats_bytes(targets[n], dtype, with_z=(i == 0)) for i, n in enumerate(u)) for u in units]
    u_work = [max(solve_bytes(targets[n], solver, dtype, shares_input=len(u) > 1) for n in u) for u in units]
    stacked_work = 0  # the largest batched solve (budget None: one pass, so it adds to that pass's work)
    if budget is None and solve_batch > 1:
        for stack in solve_stacks(targets, names, shared, solve_batch):
            t = targets[stack[0]]
            if layer_solver(t, solver) == "lobpcg":
                stacked_work = max(stacked_work, batched_solve_bytes(t, len(stack), solver, dtype))
    smallest = max(s + w for s, w in zip(u_stats, u_work))
    packed = pack_passes_sized([(u, s, w) for u, s, w in zip(units, u_stats, u_work)], budget)
    groups = [members for members, _, _ in packed]
    per = [{"stats": used, "peak": used + max(work, stacked_work)} for _, used, work in packed]
    peak = max(d["peak"] for d in per)
    return MemoryPlan("lora_da", budget, groups, sum(u_stats), peak, smallest, per_group=per)


#: The forward-only statistics methods: (extra statistics, fp32 (m, n) tensors and (d, d) tensors of one
#: layer's solve, d = "n" or "m"): EVA's centered covariance and eigenvectors; CorDA's W, W C_d, SVD
#: factors and base_delta, C_d and its Cholesky factor; Astra's W and base_delta, the eigen-solve of Y.
STATS_SOLVES = {"eva": (("mean",), 0, 2, "n"), "corda": ((), 5, 2, "n"), "astra": (("output_cov",), 2, 2, "m")}


def stats_solve_bytes(t: TargetLayer, method: str) -> int:
    """fp32 bytes of one layer's solve for a method of :data:`STATS_SOLVES`, on top of its statistics."""
    _, copies, squares, side = STATS_SOLVES[method]
    d = t.n if side == "n" else t.m
    return 4 * (copies * t.m * t.n + squares * d * d)


def plan_stats_solves(method: str, targets: Dict[str, TargetLayer], names: Sequence[str], shared: Dict[str, str],
                      budget: Optional[int]) -> MemoryPlan:
    """Passes of a forward-only statistics method (eva, corda, astra) under ``budget`` (None: one pass):
    the same packing as the statistics pass (:func:`lorainit.passes.stats.plan_groups`)."""
    from .passes.stats import plan_groups

    extras = STATS_SOLVES[method][0]
    work = {n: stats_solve_bytes(targets[n], method) for n in names}
    sizes = {n: stats_bytes(targets[n], torch.float32, with_z=shared.get(n, n) == n, extras=extras, grads=False)
             for n in names}
    groups = plan_groups(names, targets, shared, budget, torch.float32, work.get, extras=extras, grads=False)
    per = [{"stats": sum(sizes[n] for n in g), "peak": sum(sizes[n] for n in g) + max(work[n] for n in g)}
           for g in groups]
    smallest = max(sum(sizes[n] for n in u) + max(work[n] for n in u) for u in _units(names, shared))
    return MemoryPlan(method, budget, groups, sum(sizes.values()), max(d["peak"] for d in per), smallest,
                      per_group=per)


def _changes_base(method: str, config) -> bool:
    if method in ("pissa", "milora", "lora_ga", "corda", "astra", "olora"):
        return True
    if method == "lora_one":
        return bool(getattr(config, "subtract_init", False))
    return bool(getattr(config, "preserve_output", False))


def estimate_memory(model: nn.Module, method: str = "lora_da", config=None, *, dataloader: Optional[Iterable] = None,
                    adapter: Optional[str] = None, strict: bool = True) -> MemoryPlan:
    """The memory plan of ``initialize_lora(model, dataloader, method, config)``, before running it.

    Which layers share an input is guessed from their names (q/k/v, gate/up siblings) unless a
    ``dataloader`` is given (one forward of its first batch finds it, as the statistics pass does).
    With ``strict`` a ``max_memory`` below the smallest budget that works raises ``LoRAInitError``
    naming that budget. Methods without statistics get a plan of one pass (the weight-gradient
    methods: groups of fp32 gradients under ``max_memory``).
    """
    from .registry import get_method

    spec = get_method(method)
    config = spec.config_cls() if config is None else config
    targets = find_targets(model, adapter)
    names = list(targets)
    budget = getattr(config, "max_memory", None)
    snap = snapshot_bytes(targets, _changes_base(method, config))
    if method == "lora_da":
        shared = structural_sharing(targets)
        if dataloader is not None:
            from .context import InitContext
            from .passes.stats import probe_shared_inputs

            ctx = InitContext(model, targets, dataloader, num_samples=1, progress=False)
            shared = probe_shared_inputs(model, targets, names, ctx.runner(config.token_mask), ctx.batches[0])
        plan = plan_lora_da(targets, names, shared, budget, solver=config.solver, dtype=config.stats_dtype,
                            solve_batch=config.solve_batch)
        if any(o != n for n, o in shared.items()):
            plan.notes.append("layers sharing an input share one Z: damped and Cholesky-factored once, in place, "
                              "for all of them; Z_d^-1 is kept beside one Omega until the last of them is solved")
    elif method in STATS_SOLVES:
        plan = plan_stats_solves(method, targets, names, structural_sharing(targets), budget)
    elif method in ("lora_ga", "lora_one"):
        sizes = {n: grad_bytes(targets[n]) for n in names}
        groups = plan_grad_groups(names, sizes, budget)
        # a pass holds its accumulators; its SVD call stacks up to one more accumulator's bytes
        per = [{"stats": sum(sizes[n] for n in g), "peak": sum(sizes[n] for n in g) + max(sizes[n] for n in g)}
               for g in groups]
        plan = MemoryPlan(method, budget, groups, sum(sizes.values()), max(d["peak"] for d in per),
                          2 * max(sizes.values()), per_group=per)
    else:
        plan = MemoryPlan(method, budget, [names], 0, 0, 0, per_group=[{"stats": 0, "peak": 0}])
    plan.snapshot_host_bytes = snap
    on_cpu = all(t.device.type == "cpu" for t in targets.values())
    if on_cpu and snap:
        plan.notes.append("the model is on the CPU: the rollback snapshot is in the same memory")
    if strict and not plan.fits:
        raise LoRAInitError(f"max_memory={budget} bytes ({budget / MiB:.1f} MiB) is below one layer's working set; "
                            f"the smallest budget that works for method {method!r} is {plan.smallest_budget} bytes "
                            f"({math.ceil(plan.smallest_budget / MiB)} MiB)")
    return plan


def plan_grad_groups(names: Sequence[str], sizes: Dict[str, int], budget: Optional[int]) -> List[List[str]]:
    """Targets (model order) in weight-gradient passes (None: one pass).

    A pass is closed when its accumulators plus its largest one (the SVD call's stacked copy) would
    exceed ``budget``; a layer whose own working set (``2 x`` its accumulator) exceeds the budget gets
    a pass of its own.
    """
    if budget is None:
        return [list(names)]
    return pack_passes([([n], sizes[n], sizes[n]) for n in names], budget)
