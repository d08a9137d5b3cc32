"""The error and the warning class lorainit raises (also importable from ``lorainit.targets``).

``LoRAInitError``: an input lorainit cannot handle (the model is left exactly as it was).
``LoRAInitWarning``: something lorainit worked around and says so once (a skipped batch, a loss
that looks like a mean, ...).
"""
from __future__ import annotations

__all__ = ["LoRAInitError", "LoRAInitWarning"]


class LoRAInitError(ValueError):
    """An input lorainit cannot initialize from (the model is left exactly as it was)."""


class LoRAInitWarning(UserWarning):
    """Something lorainit worked around (a skipped batch, a loss that looks like a mean, ...)."""
