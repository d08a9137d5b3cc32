"""Validated configuration dataclasses for the initialization methods.

Every numerical knob is an explicit field with a documented default; ``__post_init__`` rejects bad
values with a message naming the field. Method configs derive from :class:`InitConfig` so that
``initialize_lora`` can check that a config belongs to the method it is given to.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Optional, Tuple, Union

import torch

__all__ = ["InitConfig", "LoRADAConfig", "DEFAULT_STEP_GRID"]

# Log grid of step scales eta searched by step_scale="auto" (eta = 0, no step, is always scored too).
DEFAULT_STEP_GRID: Tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)


def _check_number(cls: str, name: str, value, *, minimum: Optional[float] = None, positive: bool = False,
                  allow_none: bool = False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{cls}: {name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{cls}: {name} must be > 0, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{cls}: {name} must be >= {minimum}, got {value!r}")


def _check_bool(cls: str, name: str, value):
    if not isinstance(value, bool):
        raise TypeError(f"{cls}: {name} must be True or False, got {value!r}")


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
            out[f.name] = str(v) if isinstance(v, torch.dtype) else (list(v) if isinstance(v, tuple) else v)
        return out


@dataclass(frozen=True)
class LoRADAConfig(InitConfig):
    """LoRA-DA (Zhang et al. 2025, arXiv 2510.24561) options; DESIGN.md section 2.

    Per target layer ``W`` (m, n) with K-FAC statistics ``Z``, ``G``, ``s`` over ``T`` valid tokens::

        Z_d = Z + damping mean(diag Z) I,  s_d = s + damping mean(s)
        dW = -diag(s_d)^-1 G Z_d^-1                       (fisher=False: dW = -G)
        Omega = variance_weight (sum_i 1/s_d,i) / n_train Z_d^-1 - bias_weight dW^T dW
        A = r smallest eigenvectors of Omega,  P = dW A
        init update = eta P A^T   (eta = step_scale; divided by sigma_max(dW) with normalize_step)

    written as ``lora_A = A^T``, ``lora_B = eta P / sigma`` with PEFT's scaling ``sigma``.

    Args:
        n_train: number of training tokens ``N`` in the variance term; None estimates it as
            ``len(dataloader.dataset) * mean valid tokens per example`` of the statistics samples
            (the report says which value and source were used).
        damping: relative damping ``delta`` of ``Z`` and ``s``. Default 1e-2: on the digits task
            (3 seeds) it beat 1e-3 at rank 4 (test acc 0.986 vs 0.979 at eta=0.1) and rank 1
            (0.72 vs 0.69 at eta=0); with 1e-3, eta=1 started at a loss 39x that of no step.
        step_scale: ``eta``, a number >= 0, or ``"auto"`` (default): a coarse-to-fine search over
            ``step_grid`` (and eta = 0; ``lorainit.lora_da.search_step_grid``) scoring the mean loss of the held-out statistics samples with
            forward passes only; one common eta for all layers. With ``preserve_output`` the search
            scores the adapters without the base correction (the outputs it measures are those of
            the step), then writes the chosen eta with it. On digits at rank 4 auto reached
            0.980 (eta=1: 0.842, eta=0: 0.970, PEFT default 0.969). At rank 1 every eta > 0 hurt
            (auto 0.47, eta=0 0.72, PEFT default 0.85): for very low ranks use ``step_scale=0``.
        normalize_step: divide each layer's step by the largest singular value of its ``dW``
            (as the public reference code does) so that eta is a per-layer spectral norm. Default
            False: on digits (rank 4) the normalized step was too small to matter (0.971 at eta=1).
        preserve_output: subtract the init update ``eta P A^T`` from the base weight (computed in
            fp32), so the model's outputs are unchanged at step 0. Save such an adapter with
            ``save_pretrained(dir, path_initial_model_for_weight_conversion=...)`` or save the base too.
        freeze_A: LoRA-DA-FA: ``lora_A`` gets ``requires_grad=False`` (same init, A not trained).
        bias_weight, variance_weight, fisher: ``alpha``, ``beta`` and whether ``dW`` is the Fisher step;
            the paper's ablations are ``bias_weight=0`` (w/o bias), ``variance_weight=0`` (w/o var)
            and ``variance_weight=0, fisher=False`` (w/o var and Fisher): see :meth:`ablation`.
        token_mask: ``"attention"`` (tokens with ``attention_mask == 1``) or ``"labels"`` (only the
            positions whose loss label is not -100).
        max_memory: bytes for the statistics of one pass; None = all layers in one pass. Below what
            all layers need, layers are processed in groups with one pass each (identical results).
        solver: ``"lobpcg"`` (default; batched LOBPCG on the formed Omega) or ``"eigh"`` (dense, for
            comparison).
        step_grid: the etas ``"auto"`` tries (besides 0); holdout_fraction: share of the statistics
            samples held out to score them (at least one batch).
        stats_dtype: accumulator dtype of the statistics (float32, or float64 for exactness tests).
        backend: kernel backend for the statistics (``"auto"``, ``"native"``, ``"triton"``, ``"torch"``).
    """

    n_train: Optional[float] = None
    damping: float = 1e-2
    step_scale: Union[float, str] = "auto"
    normalize_step: bool = False
    preserve_output: bool = False
    freeze_A: bool = False
    bias_weight: float = 1.0
    variance_weight: float = 1.0
    fisher: bool = True
    token_mask: str = "attention"
    max_memory: Optional[int] = None
    solver: str = "lobpcg"
    step_grid: Tuple[float, ...] = DEFAULT_STEP_GRID
    holdout_fraction: float = 0.125
    stats_dtype: torch.dtype = torch.float32
    backend: str = "auto"

    def __post_init__(self):
        c = "LoRADAConfig"
        _check_number(c, "n_train", self.n_train, positive=True, allow_none=True)
        _check_number(c, "damping", self.damping, minimum=0.0)
        if isinstance(self.step_scale, str):
            if self.step_scale != "auto":
                raise ValueError(f"{c}: step_scale must be a number >= 0 or 'auto', got {self.step_scale!r}")
        else:
            _check_number(c, "step_scale", self.step_scale, minimum=0.0)
        for name in ("normalize_step", "preserve_output", "freeze_A", "fisher"):
            _check_bool(c, name, getattr(self, name))
        _check_number(c, "bias_weight", self.bias_weight, minimum=0.0)
        _check_number(c, "variance_weight", self.variance_weight, minimum=0.0)
        if self.bias_weight == 0 and self.variance_weight == 0:
            raise ValueError(f"{c}: bias_weight and variance_weight are both 0, so Omega = 0 and every subspace "
                             f"is optimal; enable at least one term")
        if self.token_mask not in ("attention", "labels"):
            raise ValueError(f"{c}: token_mask must be 'attention' or 'labels', got {self.token_mask!r}")
        if self.max_memory is not None and (isinstance(self.max_memory, bool) or not isinstance(self.max_memory, int)
                                            or self.max_memory <= 0):
            raise ValueError(f"{c}: max_memory must be None or a positive int (bytes), got {self.max_memory!r}")
        if self.solver not in ("lobpcg", "eigh"):
            raise ValueError(f"{c}: solver must be 'lobpcg' or 'eigh', got {self.solver!r}")
        grid = tuple(self.step_grid) if isinstance(self.step_grid, (list, tuple)) else None
        if not grid:
            raise ValueError(f"{c}: step_grid must be a non-empty sequence of positive numbers, got {self.step_grid!r}")
        for v in grid:
            _check_number(c, "step_grid entry", v, positive=True)
        object.__setattr__(self, "step_grid", tuple(float(v) for v in grid))
        _check_number(c, "holdout_fraction", self.holdout_fraction, positive=True)
        if self.holdout_fraction >= 1:
            raise ValueError(f"{c}: holdout_fraction must be in (0, 1), got {self.holdout_fraction!r}")
        if self.stats_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"{c}: stats_dtype must be torch.float32 or torch.float64, got {self.stats_dtype!r}")
        if self.backend not in ("auto", "native", "triton", "torch"):
            raise ValueError(f"{c}: backend must be 'auto', 'native', 'triton' or 'torch', got {self.backend!r}")

    @classmethod
    def ablation(cls, name: str, **kwargs) -> "LoRADAConfig":
        """The paper's Table 6 variants: ``"full"``, ``"no_bias"``, ``"no_variance"``, ``"no_variance_fisher"``."""
        table = {
            "full": {},
            "no_bias": {"bias_weight": 0.0},
            "no_variance": {"variance_weight": 0.0},
            "no_variance_fisher": {"variance_weight": 0.0, "fisher": False},
        }
        if name not in table:
            raise ValueError(f"LoRADAConfig.ablation: name must be one of {sorted(table)}, got {name!r}")
        return cls(**{**table[name], **kwargs})
