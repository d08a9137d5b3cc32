"""The base of every method's configuration and the validators the configs share.

Each method module under :mod:`lorainit.methods` owns its config dataclass (``LoRADAConfig`` in
``methods/lora_da.py``, ``HRPConfig`` in ``methods/hrp.py``, the baselines' in
``methods/baselines.py``). Every numerical knob is an explicit field with a documented default;
``__post_init__`` rejects bad values with a message naming the config and the field, through the
``check_*`` functions here: a value of the wrong type raises ``TypeError``, a value out of range
``ValueError``. Configs derive from :class:`InitConfig` so that ``initialize_lora`` can check that
a config belongs to the method it is given to.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Optional, Sequence

import torch

__all__ = ["InitConfig", "check_number", "check_int", "check_bool", "check_choice", "check_seed"]


def check_number(cls: str, name: str, value, *, minimum: Optional[float] = None, positive: bool = False,
                 allow_none: bool = False) -> None:
    """A finite real number (``positive``: > 0; ``minimum``: >= minimum; ``allow_none``: or None)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{cls}: {name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{cls}: {name} must be > 0, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{cls}: {name} must be >= {minimum}, got {value!r}")


def check_int(cls: str, name: str, value, *, minimum: int, allow_none: bool = False) -> None:
    """An int >= ``minimum`` (``allow_none``: or None); anything else is a ValueError naming the range."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = f"None or an int >= {minimum}" if allow_none else f"an int >= {minimum}"
        raise ValueError(f"{cls}: {name} must be {what}, got {value!r}")


def check_bool(cls: str, name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{cls}: {name} must be True or False, got {value!r}")


def check_choice(cls: str, name: str, value, choices: Sequence[str], hint: str = "") -> None:
    """One of ``choices`` (``hint`` replaces the listed choices in the message)."""
    if value not in choices:
        names = [repr(c) for c in choices]
        listed = hint or (", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0])
        raise ValueError(f"{cls}: {name} must be {listed}, got {value!r}")


def check_seed(cls: str, seed) -> None:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"{cls}: seed must be an int or None (torch's global RNG), got {seed!r}")


@dataclass(frozen=True)
class InitConfig:
    """Base class of every method's configuration (a frozen, validated dataclass)."""

    def replace(self, **changes) -> "InitConfig":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def to_dict(self) -> dict:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.dtype):
                v = str(v)
            elif isinstance(v, tuple):
                v = list(v)
            elif callable(v):
                v = getattr(v, "__qualname__", None) or type(v).__name__
            out[f.name] = v
        return out
