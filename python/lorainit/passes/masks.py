"""Token validity per layer: which positions of a target's input are statistics tokens (docs/math.md).

A batch can carry several token masks; each target layer uses the one that matches *its* input:

* **encoder-decoder models** (``model.config.is_encoder_decoder``): layers inside the encoder
  (``model.get_encoder()``) and layers whose input is the encoder's output tensor (the keys and
  values of cross-attention) use the encoder mask ``attention_mask``; every other layer (decoder
  self- and cross-attention queries, MLPs, the LM head) uses the decoder mask:
  ``decoder_attention_mask`` when the batch has one, else ``labels != -100`` of the decoder
  sequence, else every decoder position;
* **decoder-only / encoder-only models**: ``attention_mask`` (with ``token_mask="labels"``: the
  positions whose next-token label is not -100);
* **per-example layers** (poolers, classifier heads, any layer whose input has one vector per
  example, i.e. leading dims with as many entries as the batch has examples): every example is one
  token;
* no mask in the batch (or a non-mapping batch): every position is a token.

``nn.Embedding`` targets see token ids, so their token shape is the whole input shape (a linear
layer's is its input's leading dims). A layer whose input matches no mask and is not per-example
is an error naming the shapes. :class:`LayerMasks` resolves the mask per call and remembers per
layer which one it used (the report's ``token_mask`` column).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..targets import LoRAInitError, TargetLayer

__all__ = ["TokenMasks", "LayerMasks", "is_encoder_decoder"]


def is_encoder_decoder(model: nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    return bool(getattr(cfg, "is_encoder_decoder", False))


def _encoder(model: nn.Module) -> Optional[nn.Module]:
    if not is_encoder_decoder(model):
        return None
    for m in (model, getattr(model, "get_base_model", lambda: None)()):
        get = getattr(m, "get_encoder", None)
        if callable(get):
            try:
                enc = get()
            except Exception:
                continue
            if isinstance(enc, nn.Module):
                return enc
    return None


@dataclass
class TokenMasks:
    """The candidate token masks of one prepared batch: ``(name, bool mask)`` pairs, and its number of examples.

    ``encoder`` is the mask of the main input sequence (``attention_mask``, or the label mask with
    ``token_mask="labels"`` on a decoder-only model); ``decoder`` the decoder sequence's of an
    encoder-decoder model. ``primary`` is the encoder one (what a pass without per-layer masks uses).
    """

    examples: Optional[int] = None
    encoder: Optional[Tuple[str, Tensor]] = None
    decoder: Optional[Tuple[str, Tensor]] = None
    decoder_length: Optional[int] = None  # the decoder sequence's length where it has no mask

    @property
    def primary(self) -> Optional[Tensor]:
        return None if self.encoder is None else self.encoder[1]


@dataclass
class LayerMasks:
    """Per-layer mask resolution for the targets ``names`` of one model (see the module docstring).

    Use :meth:`attach` (returns hook handles to remove) so that the encoder's output tensor is known,
    then :meth:`select` per layer call. ``used[name]`` lists the masks a layer used.
    """

    model: Optional[nn.Module]
    targets: Dict[str, TargetLayer]
    names: Sequence[str]
    used: Dict[str, List[str]] = field(default_factory=dict)

    def __post_init__(self):
        self.enc_dec = self.model is not None and is_encoder_decoder(self.model)
        enc = _encoder(self.model) if self.enc_dec else None
        inside = {id(m) for m in enc.modules()} if enc is not None else set()
        self.in_encoder = {n for n in self.names if id(self.targets[n].module) in inside}
        self._encoder_module = enc
        self._enc_out: set = set()

    def attach(self) -> list:
        """Hook the encoder to learn its output tensor (cross-attention keys/values read it)."""
        if self._encoder_module is None:
            return []

        def hook(module, args, output):
            t = output[0] if isinstance(output, (tuple, list)) else getattr(output, "last_hidden_state", output)
            if isinstance(t, Tensor):
                self._enc_out.add(t.data_ptr())
            return None

        return [self._encoder_module.register_forward_hook(hook)]

    def begin_batch(self) -> None:
        self._enc_out = set()

    def side(self, name: str, x: Tensor) -> Optional[str]:
        if not self.enc_dec:
            return None
        if name in self.in_encoder or (x.is_floating_point() and x.data_ptr() in self._enc_out):
            return "encoder"
        return "decoder"

    def select(self, name: str, x: Tensor, masks: Optional[TokenMasks]) -> Tuple[Optional[Tensor], str]:
        """``(mask or None = every row, label)`` for one call of layer ``name`` on input ``x``."""
        kind = self.targets[name].kind
        lead = tuple(x.shape) if kind == "embedding" else tuple(x.shape[:-1])
        mask, label = self._select(name, x, lead, masks)
        if mask is not None and mask.device != x.device:  # a model spread over devices: follow the input
            mask = mask.to(x.device)
        seen = self.used.setdefault(name, [])
        if label not in seen:
            seen.append(label)
        return mask, label

    def _select(self, name, x, lead, masks):
        if masks is None:
            return None, "all positions"
        if masks.examples is not None and math.prod(lead) == masks.examples and len(lead) <= 1:
            return None, "one token per example"
        side = self.side(name, x)
        if side == "decoder" and masks.decoder is None and masks.decoder_length is not None and len(lead) >= 2 \
                and lead[:2] == (masks.examples, masks.decoder_length):
            # a decoder input without a decoder mask, even when it is as long as the encoder's mask
            return None, "all decoder positions"
        order = [masks.decoder, masks.encoder] if side == "decoder" else \
            [masks.encoder] if side == "encoder" else [masks.encoder, masks.decoder]
        cands = [c for c in order if c is not None]
        for label, m in cands:
            if tuple(m.shape) == lead:
                return m, label
        if side == "decoder" and masks.decoder is None and lead and masks.examples is not None \
                and lead[0] == masks.examples:
            return None, "all decoder positions"
        if masks.examples is not None and math.prod(lead) == masks.examples:
            return None, "one token per example"
        if not cands:
            return None, "all positions"
        if side is None and len(cands) == 1 and cands[0][1].numel() == math.prod(lead):
            return cands[0][1].reshape(lead), cands[0][0]
        listed = ", ".join(f"{lab} {tuple(m.shape)}" for lab, m in cands)
        raise LoRAInitError(f"input of shape {tuple(x.shape)} matches none of the token masks ({listed}) and is not "
                            f"one vector per example ({masks.examples} examples)")

    def label(self, name: str) -> Optional[str]:
        used = self.used.get(name)
        return None if not used else " / ".join(used)


def count_rows(mask: Optional[Tensor], x: Tensor, kind: str) -> int:
    """Tokens of one call: ``mask.sum()``, or every row of the input."""
    if mask is not None:
        return int(mask.sum())
    lead = tuple(x.shape) if kind == "embedding" else tuple(x.shape[:-1])
    return math.prod(lead)
