"""What the method modules share: the spec a method declares and the per-layer helpers around a kernel call.

* :class:`MethodSpec`: a method's function, config class, needs and paper; each method module
  declares its specs and :mod:`lorainit.registry` maps names to them.
* :func:`layer_groups`: the targets one batched kernel call can take (same key, e.g. shape, rank and
  PEFT scaling, **and** same device and dtype of the base weight and of the adapter), in model order.
* :func:`kernel_call`: a ``lorainit_kernels`` call whose ``ValueError``/``TypeError``/``RuntimeError``
  becomes a :class:`~lorainit.targets.LoRAInitError` naming the method and the modules.
* :func:`finalize`: factors cast to the adapter's dtype and device, with ``base_delta`` consistent
  with the cast factors.

This module imports no method module.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, Type

import torch
from torch import Tensor

from ..adapters import LoRAFactors
from ..configs import InitConfig
from ..targets import LoRAInitError, TargetLayer

__all__ = ["MethodSpec", "layer_groups", "kernel_call", "finalize", "generator"]


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
    """``fn(*args, **kwargs)``, its argument errors re-raised as LoRAInitError naming ``method`` and the modules."""
    try:
        return fn(*args, **kwargs)
    except LoRAInitError:
        raise
    except (ValueError, TypeError, RuntimeError) as err:
        raise LoRAInitError(f"{method}: modules {names[:4]}{'...' if len(names) > 4 else ''}: {err}") from err


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
