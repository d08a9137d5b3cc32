"""The registry of initialization methods behind ``initialize_lora(..., method=NAME)``.

A method is a function ``fn(ctx, config) -> {layer name: LoRAFactors}`` (see
:class:`lorainit.context.InitContext` for what ``ctx`` offers) plus a config class and what it
needs. ``initialize_lora`` owns everything around it: finding the targets, the snapshot, writing
the factors transactionally, restoring the model on error and the report. Adding a method::

    register_method("pissa", fn=_pissa, config_cls=PiSSAConfig, needs_data=False,
                    paper="Meng et al. 2024, PiSSA, arXiv 2404.02948")
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Type

from .configs import InitConfig

__all__ = ["MethodSpec", "register_method", "get_method", "methods"]


@dataclass(frozen=True)
class MethodSpec:
    """One registered method: its function, config class and needs (data, gradients, training steps)."""

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


_REGISTRY: Dict[str, MethodSpec] = {}


def register_method(name: str, *, fn: Callable, config_cls: Type[InitConfig], needs_data: bool,
                    needs_grad: bool = False, needs_training: bool = False, paper: str = "", summary: str = "",
                    replace: bool = False) -> MethodSpec:
    """Register ``fn(ctx, config) -> {layer: LoRAFactors}`` under ``name`` (``replace=True`` to override)."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"register_method: name must be an identifier-like string, got {name!r}")
    if not callable(fn):
        raise TypeError(f"register_method({name!r}): fn must be callable, got {type(fn).__name__}")
    if not (isinstance(config_cls, type) and issubclass(config_cls, InitConfig)):
        raise TypeError(f"register_method({name!r}): config_cls must subclass lorainit.configs.InitConfig, "
                        f"got {config_cls!r}")
    if name in _REGISTRY and not replace:
        raise ValueError(f"register_method: method {name!r} is already registered (pass replace=True to override)")
    spec = MethodSpec(name, fn, config_cls, bool(needs_data), bool(needs_grad), bool(needs_training), paper, summary)
    _REGISTRY[name] = spec
    return spec


def _ensure_builtin() -> None:
    # Built-in methods register themselves on import; importing here avoids import cycles.
    import importlib
    import importlib.util

    from . import lora_da  # noqa: F401
    if importlib.util.find_spec("lorainit.baselines") is not None:  # issue 5's methods, once they exist
        importlib.import_module("lorainit.baselines")


def get_method(name: str) -> MethodSpec:
    _ensure_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; registered methods: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def methods() -> List[Dict[str, object]]:
    """The registered methods: name, what each needs (data, gradients, training steps) and its paper."""
    _ensure_builtin()
    return [spec.describe() for spec in sorted(_REGISTRY.values(), key=lambda s: s.name)]
