"""The initialization methods, one module per family, each owning its config dataclass.

* :mod:`~lorainit.methods.lora_da`: LoRA-DA (``LoRADAConfig``; the step-size search).
* :mod:`~lorainit.methods.hrp`: HRP, high-rank preheating (``HRPConfig``).
* :mod:`~lorainit.methods.baselines`: ``lora``, ``gaussian``, ``orthogonal``, ``pissa``, ``milora``,
  ``lora_ga``, ``lora_one`` (``BaselineConfig``, ``PiSSAConfig``, ``MiLoRAConfig``,
  ``LoRAGAConfig``, ``LoRAOneConfig``).
* :mod:`~lorainit.methods.eva`, :mod:`~lorainit.methods.corda`, :mod:`~lorainit.methods.astra`: the
  forward-only statistics inits PEFT users know (``EVAConfig``, ``CorDAConfig``, ``AstraConfig``), on
  :mod:`~lorainit.methods.peft_common` (one statistics pass, per-layer solves spread over ranks).
* :mod:`~lorainit.methods.data_free`: ``olora``, ``mica`` (``OLoRAConfig``, ``MiCAConfig``).
* :mod:`~lorainit.methods.common`: what they share (``MethodSpec``, grouping layers by shape,
  device and dtype, kernel calls with named errors, casting factors); it imports no method.

Each family module declares a :class:`~lorainit.methods.common.MethodSpec` per method;
:data:`lorainit.registry.BUILTIN` maps the names to them. The package imports none of its modules.
Calling it, ``lorainit.methods()``, lists the registered methods (:func:`lorainit.registry.methods`).
"""
import sys
import types


class _MethodsPackage(types.ModuleType):
    """``lorainit.methods`` is this package and, called, :func:`lorainit.registry.methods` (the public listing).

    The listing lives in the registry; this call only forwards to it. A module subclass is Python's own
    way to give a module behaviour (the data model's "customizing module attribute access"); a function
    ``lorainit.methods`` would hide the package, breaking ``import lorainit.methods.lora_da as m`` and
    ``lorainit.methods.eva``.
    """

    def __call__(self):
        from ..registry import methods

        return methods()


sys.modules[__name__].__class__ = _MethodsPackage
