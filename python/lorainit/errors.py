"""``LoRAInitError``: the one error lorainit raises for inputs it cannot handle (also ``lorainit.targets.LoRAInitError``)."""
from __future__ import annotations

__all__ = ["LoRAInitError"]


class LoRAInitError(ValueError):
    """An input lorainit cannot initialize from (the model is left exactly as it was)."""
