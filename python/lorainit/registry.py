"""The registry of initialization methods behind ``initialize_lora(..., method=NAME)``.

A method is a function ``fn(ctx, config) -> {layer name: LoRAFactors}`` (see
:class:`lorainit.context.InitContext` for what ``ctx`` offers) plus a config class and what it
needs, together a :class:`~lorainit.methods.common.MethodSpec`. ``initialize_lora`` owns
everything around it: finding the targets, the snapshot, writing the factors transactionally,
restoring the model on error and the report.

The built-in methods are one static table, ``BUILTIN``: name -> ``"module:attribute"`` of the spec
their method module declares. A spec's module is imported the first time the name is looked up,
so the registry imports no method module at import time and no method module imports the
registry. User methods join through :func:`register_method`::

    register_method("my_init", fn=my_init, config_cls=MyConfig, needs_data=False,
                    paper="Me et al. 2026, arXiv ...")
"""
from __future__ import annotations

import difflib
import importlib
from typing import Callable, Dict, List, Type

from .configs import InitConfig
from .errors import LoRAInitError
from .methods.common import MethodSpec

__all__ = ["BUILTIN", "MethodSpec", "register_method", "get_method", "methods"]

BUILTIN: Dict[str, str] = {
    "lora_da": "lorainit.methods.lora_da:LORA_DA",
    "hrp": "lorainit.methods.hrp:HRP",
    "lora": "lorainit.methods.baselines:LORA",
    "gaussian": "lorainit.methods.baselines:GAUSSIAN",
    "orthogonal": "lorainit.methods.baselines:ORTHOGONAL",
    "pissa": "lorainit.methods.baselines:PISSA",
    "milora": "lorainit.methods.baselines:MILORA",
    "lora_ga": "lorainit.methods.baselines:LORA_GA",
    "lora_one": "lorainit.methods.baselines:LORA_ONE",
    "eva": "lorainit.methods.eva:EVA",
    "corda": "lorainit.methods.corda:CORDA",
    "astra": "lorainit.methods.astra:ASTRA",
    "olora": "lorainit.methods.data_free:OLORA",
    "mica": "lorainit.methods.data_free:MICA",
}

_REGISTERED: Dict[str, MethodSpec] = {}  # register_method(); takes precedence over BUILTIN


def _builtin(name: str) -> MethodSpec:
    module, attr = BUILTIN[name].split(":")
    spec = getattr(importlib.import_module(module), attr)
    if not isinstance(spec, MethodSpec) or spec.name != name:
        raise RuntimeError(f"lorainit.registry: {BUILTIN[name]} is not the MethodSpec of {name!r}")
    return spec


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
    if (name in _REGISTERED or name in BUILTIN) and not replace:
        raise ValueError(f"register_method: method {name!r} is already registered (pass replace=True to override)")
    spec = MethodSpec(name, fn, config_cls, bool(needs_data), bool(needs_grad), bool(needs_training), paper, summary)
    _REGISTERED[name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    """The spec registered under ``name``; otherwise ``LoRAInitError`` (a ValueError) with the closest
    registered name (difflib) and the list of them."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name in BUILTIN:
        return _builtin(name)
    known = sorted({*BUILTIN, *_REGISTERED})
    close = difflib.get_close_matches(str(name).lower().replace("-", "_"), known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise LoRAInitError(f"unknown method {name!r}; {hint}registered methods: {known}")


def methods() -> List[Dict[str, object]]:
    """The registered methods: name, what each needs (data, gradients, training steps) and its paper."""
    return [get_method(name).describe() for name in sorted({*BUILTIN, *_REGISTERED})]
