"""lorainit: data-aware LoRA initialization for PEFT models, transformers' Trainer and plain loops.

    from lorainit import initialize_lora, LoRADAConfig
    report = initialize_lora(peft_model, dataloader, method="lora_da", config=LoRADAConfig())

``lorainit.methods()`` lists every registered method (LoRA-DA, HRP and the baselines) with what it
needs. The numerical core lives in ``lorainit_kernels``.
"""
from .adapters import LoRAFactors
from .baselines import BaselineConfig, LoRAGAConfig, LoRAOneConfig, MiLoRAConfig, PiSSAConfig
from .configs import InitConfig, LoRADAConfig
from .context import InitContext
from .hrp import HRPConfig
from .init import initialize_lora
from .registry import methods, register_method
from .report import InitReport
from .targets import LoRAInitError

__version__ = "0.1.0"

# Names defined by modules that need optional packages (transformers) or register methods on import.
_LAZY = {
    "LoRAInitCallback": ("lorainit.integrations.trainer", "LoRAInitCallback"),
}

__all__ = ["BaselineConfig", "HRPConfig", "LoRAGAConfig", "LoRAOneConfig", "MiLoRAConfig", "PiSSAConfig",
           "InitConfig", "InitContext", "InitReport", "LoRAFactors", "LoRADAConfig", "LoRAInitCallback", "LoRAInitError", "initialize_lora",
           "methods", "register_method"]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'lorainit' has no attribute {name!r}")
