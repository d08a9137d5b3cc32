"""The loss of a batch, and the loss/eval pass.

:class:`LossRunner` turns a batch into the **summed** loss over its loss tokens and the token mask
of docs/math.md (detecting, on the first batch, how the model normalizes its own loss);
every pass runs its forwards through one. :func:`eval_loss` is the eval pass: the mean loss of some
batches with the adapters as currently written, forward only.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .. import distributed as dist_utils
from ..targets import LoRAInitError, LoRAInitWarning, TargetLayer
from .batches import leading_size, model_device, to_device
from .masks import TokenMasks, is_encoder_decoder
from .state import pass_state

__all__ = ["LossRunner", "eval_loss", "LossReductionWarning", "LOSS_REDUCTIONS"]

LOSS_REDUCTIONS = (None, "sum", "mean")


class LossReductionWarning(LoRAInitWarning):
    """A user ``loss_fn`` returned what looks like a mean, not the summed loss lorainit expects."""


class ForwardStopped(BaseException):
    """Raised by a forward-only statistics pass's hook once every target layer has run: the rest of the
    forward (the layers above, the LM head, the loss) feeds nothing it collects. A BaseException, so
    that model code catching ``Exception`` does not swallow it; :meth:`LossRunner.forward_masks` ends
    the batch there."""


class _NoLossTokens(LoRAInitError):
    """A batch without loss tokens. The model's mean loss over none is 0/0 = NaN, so this error must not be
    re-diagnosed as a non-finite forward (that would blame the module computing the loss for an overflow)."""


def _takes_labels(model: nn.Module) -> bool:
    """Whether ``model.forward`` (or the wrapped model's, for PEFT/DDP wrappers) has a ``labels`` argument."""
    seen = set()
    while model is not None and id(model) not in seen:
        seen.add(id(model))
        try:
            if "labels" in inspect.signature(model.forward).parameters:
                return True
        except (TypeError, ValueError):
            pass
        inner = None
        if hasattr(model, "get_base_model"):
            try:
                inner = model.get_base_model()
            except Exception:
                inner = None
        model = inner if isinstance(inner, nn.Module) else getattr(model, "module", None)
    return False


def _tensors(obj):
    """The floating-point tensors in a module's input or output (tensors, tuples, lists, dicts, ModelOutputs)."""
    if isinstance(obj, Tensor):
        return [obj] if obj.is_floating_point() else []
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in _tensors(v)]
    return []


def _finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


@torch.no_grad()
def first_nonfinite_module(model: nn.Module, run: Callable[[], object]) -> Optional[Tuple[str, list]]:
    """``(name, its non-finite parameters)`` of the first module, in execution order, whose output has
    NaN/Inf entries while its inputs are finite: where a non-finite forward started. ``run()`` is
    called once more (no grad) under forward hooks on every module; None when no module qualifies
    (e.g. the data itself is not finite, or ``run`` is not deterministic)."""
    found = []

    def hook(module, args, kwargs, output):
        if found or _finite(_tensors(output)):
            return
        if _finite(_tensors(args) + _tensors(kwargs)):
            params = [n for n, p in module.named_parameters(recurse=False) if not bool(torch.isfinite(p).all())]
            found.append((names[module], params))

    names = {m: n for n, m in model.named_modules() if n}
    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in names]
    try:
        run()
    except Exception:  # noqa: BLE001 - a diagnosis: whatever ran before the failure is what we can name
        pass
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


def _takes_use_cache(model: nn.Module) -> bool:
    """Whether the (PEFT-unwrapped) model's forward names a ``use_cache`` argument."""
    inner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    try:
        return "use_cache" in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return False


def _no_cache(model: nn.Module, batch: Mapping) -> Mapping:
    """``batch`` plus ``use_cache=False`` for a model whose forward takes ``use_cache``, unless the batch sets it:
    training forwards run without a KV cache (the Trainer and TRL pass ``use_cache=False``), and with a cache
    transformers ignores the sequence boundaries of padding-free (packed) batches, which it reads from
    ``position_ids`` only when there is no cache."""
    if "use_cache" in batch or not _takes_use_cache(model):
        return batch
    return {**batch, "use_cache": False}


class LossRunner:
    """Turns a batch into the **summed** loss and the token mask (docs/math.md).

    With ``loss_fn(model, batch) -> summed loss`` the batch reaches it exactly as the dataloader
    yielded it. Otherwise the batch must be a mapping of model inputs; when it has no ``labels`` but
    ``input_ids`` and the model takes ``labels``, ``labels = input_ids`` with padding set to -100
    (causal LM). The model's mean loss is turned into a sum by multiplying with the number of its
    loss tokens, detected on the first batch by matching the reported loss against the
    cross-entropy of the logits with shifted (causal LM), unshifted (token classification) or
    per-example (sequence classification) labels.

    ``loss_reduction`` says what ``loss_fn`` returns: ``"sum"`` (the summed loss), ``"mean"`` (a
    mean over the batch's loss terms: multiplied by their number, the model's own loss tokens for
    batches with ``labels`` or with ``input_ids`` it makes causal-LM labels of (normalization
    detected as above, with one forward of the model), else the batch's examples) or None
    (``"sum"``, with a check after the first batch (:meth:`finish_check`) that warns once,
    through ``checks``, when the value equals the model's own mean loss on that batch).
    """

    def __init__(self, model: nn.Module, loss_fn: Optional[Callable] = None, token_mask: str = "attention",
                 loss_reduction: Optional[str] = None, checks: Optional[dict] = None):
        self.model = model
        self.loss_fn = loss_fn
        self.token_mask = token_mask
        self.loss_reduction = loss_reduction
        self.checks = {} if checks is None else checks
        self.enc_dec = is_encoder_decoder(model)
        self.device = model_device(model)
        self.mode: Optional[str] = None  # "shifted", "unshifted" or "examples" once detected
        self.added_labels = False
        self._takes_labels = _takes_labels(model)

    # -- masks
    def mask(self, batch) -> Optional[Tensor]:
        """Bool mask of the valid tokens (True = use), None = all positions valid."""
        if not isinstance(batch, Mapping):
            if self.token_mask == "labels":
                raise LoRAInitError("token_mask='labels' needs mapping batches with a 'labels' entry")
            return None
        if self.token_mask == "labels":
            labels = batch.get("labels")
            if not isinstance(labels, Tensor) or labels.dim() < 2:
                raise LoRAInitError("token_mask='labels' needs token-level 'labels' in every batch")
            if self.mode == "unshifted":
                return labels.ne(-100)
            mask = torch.zeros_like(labels, dtype=torch.bool)
            mask[..., :-1] = labels[..., 1:].ne(-100)  # position t predicts label t+1
            return mask
        am = batch.get("attention_mask")
        if isinstance(am, Tensor):
            return am.to(self.device).bool()
        return None

    def masks(self, batch) -> TokenMasks:
        """Every token mask of a prepared batch, for the per-layer choice of :mod:`~lorainit.passes.masks`."""
        if not isinstance(batch, Mapping):
            self.mask(batch)  # raises for token_mask="labels"
            return TokenMasks(examples=leading_size(batch))
        out = TokenMasks(examples=leading_size(batch))
        if self.enc_dec:
            am = batch.get("attention_mask")
            if isinstance(am, Tensor):
                out.encoder = ("attention_mask", am.to(self.device).bool())
            dam, labels = batch.get("decoder_attention_mask"), batch.get("labels")
            if self.token_mask == "labels" or not isinstance(dam, Tensor):
                if isinstance(labels, Tensor) and labels.dim() >= 2:
                    out.decoder = ("labels (decoder)", labels.to(self.device).ne(-100))
                elif self.token_mask == "labels":
                    raise LoRAInitError("token_mask='labels' needs token-level 'labels' in every batch")
            if out.decoder is None and isinstance(dam, Tensor):
                out.decoder = ("decoder_attention_mask", dam.to(self.device).bool())
            if out.decoder is None:
                dec = batch.get("decoder_input_ids", batch.get("decoder_inputs_embeds"))
                if isinstance(dec, Tensor) and dec.dim() >= 2:
                    out.decoder_length = int(dec.shape[1])
            return out
        mask = self.mask(batch)
        if mask is not None:
            out.encoder = ("labels" if self.token_mask == "labels" else "attention_mask", mask)
        return out

    # -- forward
    def prepare(self, batch):
        if self.loss_fn is not None:
            return batch  # a user loss_fn gets each batch exactly as the dataloader yielded it
        batch = to_device(batch, self.device)
        if self.loss_fn is None and isinstance(batch, Mapping) and "labels" not in batch and self._takes_labels \
                and isinstance(batch.get("input_ids"), Tensor):
            labels = batch["input_ids"].clone()
            am = batch.get("attention_mask")
            if isinstance(am, Tensor):
                labels = labels.masked_fill(am.to(labels.device) == 0, -100)
            batch = {**batch, "labels": labels}
            self.added_labels = True
        return batch

    def forward(self, batch, index: int, *, check_finite: bool = True,
                culprit: Optional[Callable[[], Optional[str]]] = None) -> Tuple[Tensor, int, Optional[Tensor]]:
        """``(summed loss, number of loss terms, token mask)`` of a raw batch.

        With ``check_finite`` a NaN/Inf loss raises, naming the module ``culprit()`` returns (the
        first target whose input was not finite) or else the batch.
        """
        loss, count, masks = self.forward_masks(batch, index, check_finite=check_finite, culprit=culprit)
        return loss, count, masks.primary

    def forward_masks(self, batch, index: int, *, check_finite: bool = True,
                      culprit: Optional[Callable[[], Optional[str]]] = None) -> Tuple[Tensor, int, TokenMasks]:
        """As :meth:`forward`, with every token mask of the batch (:class:`~lorainit.passes.masks.TokenMasks`)."""
        prepared = self.prepare(batch)
        try:
            loss, count = self.summed_loss(prepared, index)
        except ForwardStopped:
            # no loss to check: the target layers' inputs are what the pass uses, so check those
            self._check_loss_tokens(prepared, index)
            bad = culprit() if (check_finite and culprit is not None) else None
            if bad is not None:
                raise LoRAInitError(f"module {bad!r}, batch {index}: its input has NaN/Inf activations") from None
            return None, 0, self.masks(prepared)
        except _NoLossTokens:
            raise
        except LoRAInitError:  # e.g. NaN activations make the loss normalization undetectable: name the module
            if check_finite:
                self._raise_nonfinite(prepared, index, culprit, None)
            raise
        mask = self.masks(prepared)
        if check_finite and not bool(torch.isfinite(loss.detach())):
            self._raise_nonfinite(prepared, index, culprit, float(loss.detach()))
        return loss, count, mask

    def _raise_nonfinite(self, prepared, index: int, culprit, loss: Optional[float]) -> None:
        """Raise the error of a batch whose forward went non-finite, naming where it started: the first
        module whose output is NaN/Inf although its inputs are finite (:func:`first_nonfinite_module`,
        e.g. a NaN in its weight), else the first target whose input was not finite (non-finite data)."""
        bad_input = culprit() if culprit is not None else None
        source = None
        if not dist_utils.is_distributed():  # a rank-local extra forward would hang a sharded model
            try:
                source = first_nonfinite_module(self.model, lambda: self.summed_loss(prepared, index))
            except ForwardStopped:  # a forward-only pass ended this extra forward too: no source found
                source = None
        if source is not None:
            name, params = source
            why = (f"its parameter(s) {params} have NaN/Inf entries" if params
                   else "its output is NaN/Inf although its inputs are finite (overflow?)")
            raise LoRAInitError(f"module {name!r}, batch {index}: {why} (the first module whose output is not "
                                f"finite)") from None
        if bad_input is not None:
            raise LoRAInitError(f"module {bad_input!r}, batch {index}: its input has NaN/Inf activations") from None
        if loss is not None:
            raise LoRAInitError(f"batch {index}: the loss is {loss} (NaN/Inf activations or logits)")

    def summed_loss(self, batch, index: int) -> Tuple[Tensor, int]:
        """``(summed loss, number of loss terms)`` of a prepared batch (forward only)."""
        if self.loss_fn is not None:
            loss = self.loss_fn(self.model, batch)
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise LoRAInitError(f"loss_fn(model, batch) must return a scalar tensor (the summed loss), got "
                                    f"{type(loss).__name__} {getattr(loss, 'shape', '')} for batch {index}")
            loss = loss.reshape(())
            n = leading_size(batch)
            if self.loss_reduction == "mean":
                count = self._mean_count(batch, index)
                return loss * count, count
            if self.loss_reduction is None and index == 0 and not self.checks.get("reduction_checked"):
                self._pending = (batch, float(loss.detach()), index)  # checked by finish_check()
            return loss, (1 if n is None else n)
        if not isinstance(batch, Mapping):
            raise LoRAInitError(f"batch {index} is a {type(batch).__name__}, not a mapping of model inputs; pass "
                                f"loss_fn(model, batch) -> summed loss for such batches")
        try:
            out = self.model(**_no_cache(self.model, batch))
        except LoRAInitError:
            raise
        except Exception as err:
            raise LoRAInitError(f"the model cannot take batch {index} (keys {sorted(batch)}): "
                                f"{type(err).__name__}: {err}") from err
        loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
        if not isinstance(loss, Tensor):
            raise LoRAInitError(f"the model returned no loss for batch {index}; include 'labels' in the batches or "
                                f"pass loss_fn(model, batch) -> summed loss")
        logits = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
        count = self._loss_count(batch, logits, loss.detach(), index)
        return loss.reshape(()) * count, count

    @staticmethod
    def _no_loss_tokens(index: int) -> str:
        return f"batch {index} has no loss tokens (every label is -100, e.g. an all-zero attention_mask)"

    def _check_loss_tokens(self, batch, index: int) -> None:
        """A forward stopped before the loss: the model's labels still say whether the batch has loss tokens
        (a batch without any is the same error as when the loss is computed)."""
        labels = batch.get("labels") if self.loss_fn is None and isinstance(batch, Mapping) else None
        if not isinstance(labels, Tensor) or labels.is_floating_point():
            return
        if int(labels.ne(-100).sum()) == 0:
            raise _NoLossTokens(self._no_loss_tokens(index))
        if self.mode == "shifted" and labels.dim() >= 2 and int(labels[..., 1:].ne(-100).sum()) == 0:
            raise _NoLossTokens(self._no_shifted_tokens(index))

    def _loss_count(self, batch, logits, loss: Tensor, index: int) -> int:
        labels = batch.get("labels")
        if not isinstance(labels, Tensor):
            raise LoRAInitError(f"batch {index} has no 'labels' tensor, so the model's mean loss cannot be turned "
                                f"into the summed loss; pass loss_fn(model, batch) -> summed loss")
        counts = {
            "shifted": int(labels[..., 1:].ne(-100).sum()) if labels.dim() >= 2 else -1,
            "unshifted": int(labels.ne(-100).sum()),
            "examples": int(labels.shape[0]),
        }
        if counts["unshifted"] == 0:  # the mode-specific count is checked below
            raise _NoLossTokens(self._no_loss_tokens(index))
        if self.mode is None:
            if not bool(torch.isfinite(loss)):
                if counts["shifted"] == 0 and isinstance(logits, Tensor) and bool(torch.isfinite(logits).all()):
                    # finite logits, NaN loss: a shifted mean over no tokens (0/0), not an overflow
                    raise _NoLossTokens(self._no_shifted_tokens(index))
                return counts["shifted"] if counts["shifted"] > 0 else counts["unshifted"]  # the caller names the NaN
            self.mode = self._detect_mode(labels, logits, loss, index)
        count = counts[self.mode]
        if count <= 0:
            raise _NoLossTokens(self._no_shifted_tokens(index) if self.mode == "shifted" else
                                f"batch {index} has no loss tokens (every label is -100)")
        return count

    @staticmethod
    def _no_shifted_tokens(index: int) -> str:
        return (f"batch {index} has no loss tokens: a causal LM predicts no label at a row's first position, and "
                f"no row has a label after it (rows of one token?)")

    @staticmethod
    def _detect_mode(labels: Tensor, logits: Optional[Tensor], loss: Tensor, index: int) -> str:
        if not isinstance(logits, Tensor):
            raise LoRAInitError("the model's output has no logits to tell how its loss is normalized; pass "
                                "loss_fn(model, batch) -> summed loss")
        import torch.nn.functional as F

        with torch.no_grad():
            lg = logits.detach().float()
            cands = {}
            if labels.dim() >= 2 and lg.dim() == labels.dim() + 1 and lg.shape[:-1] == labels.shape:
                cands["shifted"] = F.cross_entropy(lg[..., :-1, :].reshape(-1, lg.shape[-1]),
                                                   labels[..., 1:].reshape(-1), ignore_index=-100)
                cands["unshifted"] = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), labels.reshape(-1),
                                                     ignore_index=-100)
            elif labels.dim() == 1 and lg.dim() == 2 and lg.shape[0] == labels.shape[0]:
                if labels.is_floating_point():
                    cands["examples"] = F.mse_loss(lg.squeeze(-1), labels)
                else:
                    cands["examples"] = F.cross_entropy(lg, labels)
        ref = float(loss.float())
        for mode, val in cands.items():
            if math.isfinite(ref) and math.isclose(float(val), ref, rel_tol=2e-3, abs_tol=1e-6):
                return mode
        raise LoRAInitError(f"cannot tell how the model's loss ({ref:.6g} on batch {index}) is normalized: it matches "
                            f"none of {', '.join(f'{k}={float(v):.6g}' for k, v in cands.items()) or 'no candidate'}; "
                            f"pass loss_fn(model, batch) -> summed loss")


    # -- loss_fn reductions
    def _model_batch(self, batch):
        """The batch as the model's own forward takes it (on its device, labels added), or None."""
        if not isinstance(batch, Mapping):
            return None
        b = to_device(batch, self.device)
        if "labels" not in b and self._takes_labels and isinstance(b.get("input_ids"), Tensor):
            labels = b["input_ids"].clone()
            am = b.get("attention_mask")
            if isinstance(am, Tensor):
                labels = labels.masked_fill(am.to(labels.device) == 0, -100)
            b = {**b, "labels": labels}
        return b if isinstance(b.get("labels"), Tensor) else None

    def _model_loss(self, batch, index: int):
        """``(model's mean loss, its number of loss terms)`` on ``batch`` (no grad), or None."""
        b = self._model_batch(batch)
        if b is None:
            return None
        try:
            with torch.no_grad():
                out = self.model(**_no_cache(self.model, b))
            loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
            logits = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
            if not isinstance(loss, Tensor) or not bool(torch.isfinite(loss)):
                return None
            return float(loss), self._loss_count(b, logits, loss.detach(), index)
        except Exception:
            return None

    def _mean_count(self, batch, index: int) -> int:
        """Loss terms of a batch whose ``loss_fn`` value is a mean (``loss_reduction="mean"``)."""
        b = self._model_batch(batch)  # labels, or the causal-LM labels the model's own loss would use
        labels = b.get("labels") if b is not None else None
        if isinstance(labels, Tensor) and labels.dim() >= 1 and not labels.is_floating_point():
            if self.mode is None:
                self._model_loss(batch, index)  # detects the model's normalization once
            if self.mode == "shifted" and labels.dim() >= 2:
                count = int(labels[..., 1:].ne(-100).sum())
            elif self.mode == "examples" or labels.dim() == 1:
                count = int(labels.shape[0])
            else:
                count = int(labels.ne(-100).sum())
            if count <= 0:
                raise _NoLossTokens(f"batch {index} has no loss tokens (every label is -100)")
            return count
        n = leading_size(batch)
        return 1 if n is None else n

    @torch.no_grad()
    def finish_check(self) -> None:
        """Warn (once per ``checks``) when ``loss_fn``, assumed to return a sum, returned the model's own mean loss.

        The value of ``loss_fn`` on the first batch is kept by :meth:`summed_loss`; the passes call
        this after that batch's backward (the model forward it needs must not feed their hooks
        inside the batch). No-op with ``loss_reduction`` set, without a ``loss_fn`` or after the check.
        """
        pending, self._pending = getattr(self, "_pending", None), None
        if pending is None or self.checks.get("reduction_checked"):
            return
        self.checks["reduction_checked"] = True
        batch, value, index = pending
        if not math.isfinite(value) or value == 0:
            return
        ref = self._model_loss(batch, index)
        if ref is None:
            return
        mean, count = ref
        if count > 1 and math.isclose(value, mean, rel_tol=1e-3, abs_tol=1e-7):
            import warnings

            warnings.warn(f"loss_fn returned {value:.6g} on batch {index}, the model's own mean loss over its {count} "
                          f"loss tokens (their sum is {mean * count:.6g}); lorainit expects loss_fn to return the "
                          f"summed loss over the batch's loss tokens: pass loss_reduction='mean' if it returns a "
                          f"mean (or loss_reduction='sum' to skip this check)", LossReductionWarning, stacklevel=2)


@torch.no_grad()
def eval_loss(model: nn.Module, targets: Dict[str, TargetLayer], runner: LossRunner, batches: Sequence) -> float:
    """Mean loss over ``batches`` with the adapters as written (forward only, eval mode, LoRA on).

    The summed loss divided by its number of loss terms (loss tokens, or examples with a user
    ``loss_fn``), summed over processes; NaN/Inf is returned as ``inf``. Every rank runs as many
    forwards as the rank with the most batches (the extra ones are not counted).
    """
    total, count = 0.0, 0
    steps = dist_utils.all_reduce_max(len(batches))  # FSDP2: every rank runs as many forwards
    with pass_state(model, targets, lora_enabled=True):
        for i in range(steps):
            err = None
            try:
                loss, c, _ = runner.forward(batches[min(i, len(batches) - 1)], i, check_finite=False)
            except Exception as e:
                err = e
            dist_utils.agree(err, f"held-out loss, batch {i}")
            if i < len(batches):
                total += float(loss)
                count += c
    total, count = dist_utils.all_reduce_scalars([total, count])
    if count == 0:  # a loss over nothing would read as a perfect score
        raise LoRAInitError("held-out loss: no batches on any process")
    value = total / count
    return value if math.isfinite(value) else math.inf
