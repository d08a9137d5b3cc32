"""lorainit: data-aware LoRA initialization for PEFT models, transformers' Trainer and plain loops.

    from lorainit import initialize_lora, LoRADAConfig
    report = initialize_lora(peft_model, dataloader, method="lora_da", config=LoRADAConfig())

``lorainit.methods()`` lists every registered method (LoRA-DA, HRP and the baselines) with what it
needs (``lorainit.methods`` is the package of the methods; calling it lists them). Layout: ``init`` (``initialize_lora``), ``methods/`` (one module per method family with its
config), ``registry`` (name -> method), ``context`` (what a method sees), ``passes/`` (statistics,
loss/eval and weight-gradient passes), ``cache/`` (the statistics cache), ``adapters`` (transactional writes), ``targets``,
``report``, ``distributed``, ``integrations/``, ``cli``, ``examples/``. The numerical core lives
in ``lorainit_kernels``.
"""
from .adapters import LoRAFactors, save_adapter, save_for_original_base
from .configs import InitConfig
from .context import InitContext
from .init import initialize_lora
from .memory import MemoryPlan, estimate_memory
from .methods.baselines import BaselineConfig, LoRAGAConfig, LoRAOneConfig, MiLoRAConfig, PiSSAConfig
from .methods.astra import AstraConfig
from .methods.corda import CorDAConfig
from .methods.data_free import MiCAConfig, OLoRAConfig
from .methods.eva import EVAConfig
from .methods.hrp import HRPConfig
from .methods.lora_da import LoRADAConfig
from .registry import register_method
from .report import InitReport
from .targets import LoRAInitError, LoRAInitWarning

__version__ = "0.1.0"

# Names defined by modules that need optional packages (transformers).
_LAZY = {
    "LoRAInitCallback": ("lorainit.integrations.trainer", "LoRAInitCallback"),
}

__all__ = ["AstraConfig", "BaselineConfig", "CorDAConfig", "EVAConfig", "MiCAConfig", "OLoRAConfig", "HRPConfig", "LoRAGAConfig", "LoRAOneConfig", "MiLoRAConfig", "PiSSAConfig",
           "InitConfig", "InitContext", "InitReport", "LoRAFactors", "LoRADAConfig", "LoRAInitCallback", "LoRAInitError", "LoRAInitWarning",
           "MemoryPlan", "estimate_memory", "initialize_lora", "methods", "register_method",
           "save_adapter", "save_for_original_base"]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'lorainit' has no attribute {name!r}")
