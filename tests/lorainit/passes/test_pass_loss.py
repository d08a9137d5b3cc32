"""lorainit.passes.loss: the summed loss against float64 cross-entropy, the model's loss normalization, loss_fn
reductions and their check, the token masks of a batch, non-finite forwards named, and the eval pass."""
import copy
import re
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import VOCAB, tiny_llama
from torch import nn

from lorainit import LoRAInitError
from lorainit.passes.loss import LossReductionWarning, LossRunner, eval_loss, first_nonfinite_module
from lorainit.passes.masks import TokenMasks
from lorainit.targets import find_targets


# ------------------------------------------------------------------------------------------ fixtures
def _lm_batch(b, s, seed=0, labels=False, left_pad_row=None):
    """Random tokens, right padding of random length in every other row (left padding in ``left_pad_row``)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, s), generator=g)
    am = torch.ones(b, s, dtype=torch.long)
    for i in range(0, b, 2):
        am[i, int(torch.randint(2, s, (), generator=g)):] = 0
    if left_pad_row is not None:
        am[left_pad_row] = 0
        am[left_pad_row, s // 2:] = 1
    ids = ids.masked_fill(am == 0, 0)
    batch = {"input_ids": ids, "attention_mask": am}
    if labels:
        lab = ids.masked_fill(am == 0, -100)
        lab[:, : s // 3] = -100  # a prompt without loss (completion-only labels): labels differ from the mask
        batch["labels"] = lab
    return batch


def _ce_sum64(logits, labels, shift):
    """Summed cross-entropy over the labels != -100, in float64, written out (log-softmax, gather)."""
    lg = logits.double()
    if shift:
        lg, labels = lg[..., :-1, :], labels[..., 1:]
    keep = labels != -100
    lp = torch.log_softmax(lg, -1).gather(-1, labels.clamp_min(0)[..., None])[..., 0]
    return float(-(lp * keep).sum()), int(keep.sum())


def _llama64_logits(model, batch):
    m64 = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        return m64(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


class Toy(nn.Module):
    """Embedding -> tanh -> linear head whose loss is normalized as ``norm`` says (a stand-in for HF heads):
    ``unshifted`` (token classification), ``shifted`` (causal LM), ``examples`` (sequence classification),
    ``regression`` (one float per example, MSE), ``twice`` (2x the unshifted mean: matches no candidate)."""

    def __init__(self, norm="unshifted", classes=6, seed=0, returns=("loss", "logits")):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(VOCAB, 8)
        self.head = nn.Linear(8, 1 if norm == "regression" else classes)
        self.norm, self.returns = norm, returns

    def forward(self, input_ids, attention_mask=None, labels=None):
        h = torch.tanh(self.emb(input_ids))
        if self.norm in ("examples", "regression"):
            h = h.mean(1)
        logits = self.head(h)
        out = {"logits": logits}
        if labels is not None:
            if self.norm in ("unshifted", "twice"):
                loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
                loss = 2 * loss if self.norm == "twice" else loss
            elif self.norm == "shifted":
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
            elif self.norm == "examples":
                loss = F.cross_entropy(logits, labels)
            else:
                loss = F.mse_loss(logits.squeeze(-1), labels)
            out["loss"] = loss
        return {k: v for k, v in out.items() if k in self.returns}


class ConstLoss(nn.Module):
    """A loss of 3 whatever the labels, logits (B, S, 3)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, input_ids, labels=None):
        return {"loss": self.w.sum(), "logits": self.w.expand(*input_ids.shape, 3)}


class CachedToy(Toy):
    def forward(self, input_ids, attention_mask=None, labels=None, use_cache=None):
        self.got_use_cache = use_cache
        return super().forward(input_ids, attention_mask, labels)


class MLP(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1, self.fc2, self.head = nn.Linear(5, 7), nn.Linear(7, 7), nn.Linear(7, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def _mlp_sum(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1], reduction="sum")


def _mlp_batch(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


# ------------------------------------------------------------------------------------------ the model's own loss
@pytest.mark.parametrize("shape,given_labels", [((3, 7), False), ((1, 5), False), ((5, 9), True)])
def test_summed_loss_of_a_causal_lm_is_float64_cross_entropy_over_the_shifted_label_tokens(shape, given_labels):
    model = tiny_llama(seed=1).eval()
    runner = LossRunner(model)
    batches = [_lm_batch(*shape, seed=s, labels=given_labels, left_pad_row=shape[0] - 1 if s else None)
               for s in range(2)]
    for i, batch in enumerate(batches):
        loss, count, mask = runner.forward(batch, i)
        labels = batch.get("labels", batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100))
        ref, n = _ce_sum64(_llama64_logits(model, batch), labels, shift=True)
        assert count == n and runner.mode == "shifted"
        assert loss.dim() == 0 and loss.requires_grad
        assert loss.item() == pytest.approx(ref, rel=1e-5)
        assert mask.dtype == torch.bool and torch.equal(mask, batch["attention_mask"].bool())
    assert runner.added_labels is (not given_labels)


@pytest.mark.parametrize("norm", ["unshifted", "shifted", "examples", "regression"])
def test_the_models_normalization_is_detected_on_the_first_batch_and_kept(norm):
    model = Toy(norm)
    runner = LossRunner(model)
    g = torch.Generator().manual_seed(3)
    for i, (b, s) in enumerate([(3, 5), (2, 9)]):
        ids = torch.randint(3, VOCAB, (b, s), generator=g)
        if norm in ("unshifted", "shifted"):
            labels = torch.randint(0, 6, (b, s), generator=g)
            labels[0, : s - 2] = -100  # all but the last two tokens of a row carry no loss
        elif norm == "examples":
            labels = torch.randint(0, 6, (b,), generator=g)
        else:
            labels = torch.randn(b, generator=g)
        loss, count, _ = runner.forward({"input_ids": ids, "labels": labels}, i)
        logits = model(input_ids=ids)["logits"].detach()
        if norm in ("unshifted", "shifted"):
            ref, n = _ce_sum64(logits, labels, shift=norm == "shifted")
        elif norm == "examples":
            ref, n = _ce_sum64(logits, labels, shift=False)
        else:
            ref, n = float(((logits.squeeze(-1).double() - labels.double()) ** 2).sum()), b
        assert runner.mode == ("examples" if norm == "regression" else norm)
        assert count == n and loss.item() == pytest.approx(ref, rel=1e-5), i
    assert not runner.added_labels  # the batches brought their labels


def test_one_loss_token_left_is_summed_alone():
    model = tiny_llama(seed=2).eval()
    runner = LossRunner(model)
    runner.forward(_lm_batch(3, 6, seed=1), 0)  # detects "shifted"
    batch = _lm_batch(3, 6, seed=2, labels=True)
    batch["labels"].fill_(-100)
    batch["labels"][1, 4] = 17
    loss, count, _ = runner.forward(batch, 1)
    ref, n = _ce_sum64(_llama64_logits(model, batch), batch["labels"], shift=True)
    assert count == n == 1 and loss.item() == pytest.approx(ref, rel=1e-5)


def test_a_loss_matching_no_normalization_is_an_error_listing_the_candidates():
    runner = LossRunner(Toy("twice"))
    batch = {"input_ids": torch.randint(3, VOCAB, (2, 4)), "labels": torch.randint(0, 6, (2, 4))}
    with pytest.raises(LoRAInitError, match=r"cannot tell how the model's loss \([\d.]+ on batch 3\) is normalized: "
                                            r"it matches none of shifted=[\d.]+, unshifted=[\d.]+; pass loss_fn"):
        runner.forward(batch, 3)
    assert runner.mode is None
    # 1-dim labels beside per-token logits: no candidate at all
    with pytest.raises(LoRAInitError, match=r"\(3 on batch 0\) is normalized: it matches none of no candidate"):
        LossRunner(ConstLoss()).forward({"input_ids": batch["input_ids"], "labels": torch.tensor([1, 2])}, 0)


def test_model_outputs_and_batches_it_cannot_use_are_errors_naming_the_batch():
    ids, labels = torch.randint(3, VOCAB, (2, 4)), torch.randint(0, 6, (2, 4))
    with pytest.raises(LoRAInitError, match="the model returned no loss for batch 2; include 'labels'"):
        LossRunner(Toy(returns=("logits",))).forward({"input_ids": ids, "labels": labels}, 2)
    with pytest.raises(LoRAInitError, match="output has no logits to tell how its loss is normalized"):
        LossRunner(Toy(returns=("loss",))).forward({"input_ids": ids, "labels": labels}, 0)
    with pytest.raises(LoRAInitError, match="batch 4 is a tuple, not a mapping of model inputs; pass loss_fn"):
        LossRunner(Toy()).forward((ids, labels), 4)
    with pytest.raises(LoRAInitError, match=r"the model cannot take batch 1 \(keys \['input_ids', 'labels', "
                                            r"'pixel_values'\]\): TypeError: .*pixel_values") as err:
        LossRunner(Toy()).forward({"input_ids": ids, "labels": labels, "pixel_values": torch.zeros(2)}, 1)
    assert isinstance(err.value.__cause__, TypeError)


def test_a_loss_without_labels_or_without_loss_tokens_is_an_error():
    class NoLabels(ConstLoss):  # computes its own loss, takes no labels: nothing to count its terms by
        def forward(self, input_ids):
            return super().forward(input_ids)

    with pytest.raises(LoRAInitError, match="batch 0 has no 'labels' tensor, so the model's mean loss"):
        LossRunner(NoLabels()).forward({"input_ids": torch.zeros(2, 3, dtype=torch.long)}, 0)
    batch = _lm_batch(3, 5)
    batch["attention_mask"].zero_()  # the labels made from input_ids are all -100
    with pytest.raises(LoRAInitError, match=r"batch 6 has no loss tokens \(every label is -100, e.g. an all-zero "
                                            r"attention_mask\)"):
        LossRunner(tiny_llama().eval()).forward(batch, 6)


def _one_token_rows():
    batch = _lm_batch(2, 5)
    batch["attention_mask"].zero_()
    batch["attention_mask"][:, 0] = 1  # one label per row, none of them predicted by a previous token
    return batch


def test_rows_of_one_token_have_no_causal_loss_tokens_once_the_normalization_is_known():
    runner = LossRunner(tiny_llama().eval())
    runner.forward(_lm_batch(2, 5), 0)
    with pytest.raises(LoRAInitError, match=r"^batch 1 has no loss tokens"):  # not a NaN blamed on a module
        runner.forward(_one_token_rows(), 1)


def test_rows_of_one_token_in_the_first_batch_have_no_causal_loss_tokens():
    with pytest.raises(LoRAInitError, match=r"^batch 0 has no loss tokens"):
        LossRunner(tiny_llama().eval()).forward(_one_token_rows(), 0)


def test_a_nan_forward_with_no_shifted_tokens_is_still_a_nan_forward():
    model = tiny_llama().eval()
    with torch.no_grad():
        model.get_input_embeddings().weight[0].fill_(float("nan"))
    batch = _one_token_rows()
    batch["input_ids"][:, 0] = 0  # the NaN reaches the logits: an overflow-like failure, not missing tokens
    with pytest.raises(LoRAInitError) as err:
        LossRunner(model).forward(batch, 0)
    assert "no loss tokens" not in str(err.value)


# ------------------------------------------------------------------------------------------ prepare / forward inputs
class Wrapper(nn.Module):
    """A DDP-like wrapper: forward(**kw) hides the inner model's ``labels`` argument behind ``.module``."""

    def __init__(self, inner):
        super().__init__()
        self.module = inner

    def forward(self, **kw):
        return self.module(**kw)


def test_prepare_makes_causal_lm_labels_only_when_the_model_takes_labels_and_the_batch_has_none():
    batch = _lm_batch(3, 6, seed=4)
    keys = set(batch)
    got = LossRunner(Wrapper(Toy())).prepare(batch)
    assert set(batch) == keys  # the caller's batch is not mutated
    assert torch.equal(got["labels"], batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100))
    assert (got["labels"] == -100).sum() == (batch["attention_mask"] == 0).sum() > 0

    class NoLabels(nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return {}

    runner = LossRunner(NoLabels())
    assert "labels" not in runner.prepare(batch) and not runner.added_labels
    own = {**batch, "labels": torch.full_like(batch["input_ids"], 4)}
    assert LossRunner(Toy()).prepare(own)["labels"] is own["labels"]
    marker = object()
    assert LossRunner(Toy(), loss_fn=lambda m, b: b).prepare(marker) is marker  # a loss_fn gets the batch as is


def test_models_taking_use_cache_run_without_a_kv_cache_unless_the_batch_says_otherwise():
    model = CachedToy()
    batch = {"input_ids": torch.randint(3, VOCAB, (2, 4)), "labels": torch.randint(0, 6, (2, 4))}
    LossRunner(model).forward(batch, 0)
    assert model.got_use_cache is False
    LossRunner(model).forward({**batch, "use_cache": True}, 0)
    assert model.got_use_cache is True
    LossRunner(Toy()).forward(batch, 0)  # Toy.forward has no use_cache argument: none passed (else a TypeError)


# ------------------------------------------------------------------------------------------ token masks of a batch
def test_mask_is_the_attention_mask_or_the_positions_predicting_a_label():
    batch = _lm_batch(3, 7, seed=5, labels=True)
    runner = LossRunner(Toy("shifted"))
    assert torch.equal(runner.mask(batch), batch["attention_mask"].bool())
    assert runner.mask({"input_ids": batch["input_ids"]}) is None and runner.mask((batch["input_ids"],)) is None
    lab = LossRunner(Toy("shifted"), token_mask="labels")
    want = torch.zeros(3, 7, dtype=torch.bool)
    for i in range(3):
        for t in range(6):
            want[i, t] = bool(batch["labels"][i, t + 1] != -100)
    assert torch.equal(lab.mask(batch), want) and not lab.mask(batch)[:, -1].any()
    lab.mode = "unshifted"  # token classification: position t carries label t
    assert torch.equal(lab.mask(batch), batch["labels"] != -100)


def test_token_mask_labels_needs_token_level_labels_in_mapping_batches():
    runner = LossRunner(Toy(), token_mask="labels")
    with pytest.raises(LoRAInitError, match="token_mask='labels' needs mapping batches with a 'labels' entry"):
        runner.masks((torch.zeros(2, 3),))
    with pytest.raises(LoRAInitError, match="token_mask='labels' needs token-level 'labels' in every batch"):
        runner.mask({"input_ids": torch.zeros(2, 3, dtype=torch.long)})
    with pytest.raises(LoRAInitError, match="token-level 'labels'"):
        runner.mask({"input_ids": torch.zeros(2, 3, dtype=torch.long), "labels": torch.tensor([1, 0])})


def test_masks_of_a_decoder_only_batch():
    batch = _lm_batch(5, 3, seed=6, labels=True)
    got = LossRunner(Toy()).masks(batch)
    assert isinstance(got, TokenMasks) and got.examples == 5 and got.decoder is None
    assert got.encoder[0] == "attention_mask" and got.primary is got.encoder[1]
    assert torch.equal(got.primary, batch["attention_mask"].bool())
    got = LossRunner(Toy(), token_mask="labels").masks(batch)
    assert got.encoder[0] == "labels" and torch.equal(got.primary[:, :-1], batch["labels"][:, 1:] != -100)
    got = LossRunner(Toy()).masks((torch.zeros(4, 2), torch.zeros(4)))
    assert got == TokenMasks(examples=4)
    assert LossRunner(Toy()).masks({"input_ids": torch.zeros(2, 3)}).primary is None


def _seq2seq():
    model = Toy()
    model.config = SimpleNamespace(is_encoder_decoder=True)
    return model


def test_masks_of_an_encoder_decoder_batch():
    g = torch.Generator().manual_seed(7)
    am = (torch.rand(3, 6, generator=g) > 0.3).long()
    labels = torch.randint(3, VOCAB, (3, 4), generator=g)
    labels[0, 2:] = -100
    dam = torch.ones(3, 4, dtype=torch.long)
    dam[2, 1:] = 0
    runner = LossRunner(_seq2seq())
    got = runner.masks({"input_ids": am, "attention_mask": am, "labels": labels})
    assert got.examples == 3 and got.encoder[0] == "attention_mask" and torch.equal(got.encoder[1], am.bool())
    assert got.decoder[0] == "labels (decoder)" and torch.equal(got.decoder[1], labels != -100)
    got = runner.masks({"input_ids": am, "attention_mask": am, "labels": labels, "decoder_attention_mask": dam})
    assert got.decoder[0] == "decoder_attention_mask" and torch.equal(got.decoder[1], dam.bool())
    got = LossRunner(_seq2seq(), token_mask="labels").masks(
        {"input_ids": am, "attention_mask": am, "labels": labels, "decoder_attention_mask": dam})
    assert got.decoder[0] == "labels (decoder)"  # token_mask="labels" prefers the labels to the decoder mask
    assert runner.masks({"input_ids": am, "labels": torch.tensor([1, 2, 0])}) == TokenMasks(examples=3)
    with pytest.raises(LoRAInitError, match="token_mask='labels' needs token-level 'labels'"):
        LossRunner(_seq2seq(), token_mask="labels").masks({"input_ids": am, "decoder_attention_mask": dam})
    # no decoder mask: the decoder's length tells its inputs from the encoder's, even when both are equal
    got = runner.masks({"input_ids": am, "attention_mask": am, "decoder_input_ids": am})
    assert got.decoder is None and got.decoder_length == 6 and got.encoder[0] == "attention_mask"
    assert runner.masks({"input_ids": am, "attention_mask": am, "labels": labels, "decoder_input_ids": am}) \
        .decoder_length is None  # the labels give the decoder mask


# ------------------------------------------------------------------------------------------ user loss_fn
def test_a_summed_loss_fn_is_taken_as_is_and_counts_the_batch_examples():
    model = MLP()
    batch = _mlp_batch(7)
    loss, count, mask = LossRunner(model, _mlp_sum, loss_reduction="sum").forward(batch, 0)
    logits = model(batch[0]).detach()
    ref, _ = _ce_sum64(logits, batch[1], shift=False)
    assert count == 7 and mask is None and loss.item() == pytest.approx(ref, rel=1e-5)
    # a batch without a tensor: one loss term
    loss, count, _ = LossRunner(model, lambda m, b: m(torch.ones(2, 5)).sum(), loss_reduction="sum").forward(
        {"text": ["a", "b"]}, 0)
    assert count == 1


@pytest.mark.parametrize("value,shown", [(lambda m, b: m(b[0]).sum(0), "Tensor torch.Size([3])"),
                                         (lambda m, b: 1.5, "float")])
def test_a_loss_fn_that_returns_no_scalar_tensor_is_an_error(value, shown):
    with pytest.raises(LoRAInitError, match=re.escape("loss_fn(model, batch) must return a scalar tensor (the summed "
                                                      f"loss), got {shown}") + " +for batch 5$"):
        LossRunner(MLP(), value).forward(_mlp_batch(4), 5)


def test_a_mean_loss_fn_is_scaled_by_the_models_own_loss_tokens_or_the_examples():
    model = tiny_llama(seed=3).eval()
    batch = _lm_batch(3, 7, seed=8)

    def lm_mean(m, b):
        logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)

    runner = LossRunner(model, lm_mean, loss_reduction="mean")
    loss, count, _ = runner.forward(batch, 0)
    ref, n = _ce_sum64(_llama64_logits(model, batch), batch["input_ids"].masked_fill(batch["attention_mask"] == 0,
                                                                                      -100), shift=True)
    assert runner.mode == "shifted" and count == n and loss.item() == pytest.approx(ref, rel=1e-5)
    mlp = MLP()
    b = _mlp_batch(5)
    loss, count, _ = LossRunner(mlp, lambda m, x: _mlp_sum(m, x) / 5, loss_reduction="mean").forward(b, 0)
    assert count == 5 and loss.item() == pytest.approx(_ce_sum64(mlp(b[0]).detach(), b[1], False)[0], rel=1e-5)
    dead = {**batch, "labels": torch.full_like(batch["input_ids"], -100)}
    with pytest.raises(LoRAInitError, match=r"batch 2 has no loss tokens \(every label is -100\)"):
        LossRunner(model, lm_mean, loss_reduction="mean").forward(dead, 2)


def _llama_loss(reduction):
    def fn(m, b):
        out = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
        return out.loss if reduction == "mean" else out.loss * int(b["labels"][:, 1:].ne(-100).sum())
    return fn


def test_finish_check_warns_once_per_checks_when_the_loss_fn_returned_the_models_mean():
    model = tiny_llama(seed=4).eval()
    batch = _lm_batch(3, 6, seed=9, labels=True)
    checks = {}
    runner = LossRunner(model, _llama_loss("mean"), checks=checks)
    value = float(runner.forward(batch, 0)[0])
    ref, n = _ce_sum64(_llama64_logits(model, batch), batch["labels"], shift=True)
    with pytest.warns(LossReductionWarning) as rec:
        runner.finish_check()
    assert len(rec) == 1 and checks["reduction_checked"] is True
    msg = str(rec[0].message)
    assert f"loss_fn returned {value:.6g} on batch 0, the model's own mean loss over its {n} loss tokens" in msg
    assert f"(their sum is {ref:.6g})" in msg and "loss_reduction='mean'" in msg
    with warnings.catch_warnings():
        warnings.simplefilter("error", LossReductionWarning)
        runner.finish_check()  # once per runner ...
        again = LossRunner(model, _llama_loss("mean"), checks=checks)  # ... and per checks dict
        again.forward(batch, 0)
        again.finish_check()
        summed = LossRunner(model, _llama_loss("sum"))
        summed.forward(batch, 0)
        summed.finish_check()
        assert summed.checks == {"reduction_checked": True}  # checked, and a sum passes
        for red, index in (("sum", 0), (None, 1)):  # no check asked; not the first batch
            r = LossRunner(model, _llama_loss("mean"), loss_reduction=red)
            r.forward(batch, index)
            r.finish_check()
            assert r.checks == {}


# ------------------------------------------------------------------------------------------ non-finite forwards
class Branches(nn.Module):
    """``b`` is registered first, ``a`` runs first; ``inner`` nests a module inside another."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.b, self.a = nn.Linear(4, 4), nn.Linear(4, 4)
        self.inner = nn.Sequential(nn.Linear(4, 4), nn.Tanh())

    def forward(self, x):
        return self.inner(self.a(x) + self.b(x))


def test_first_nonfinite_module_is_the_first_in_execution_order_with_its_bad_parameters():
    model = Branches()
    x = torch.randn(3, 4)
    with torch.no_grad():
        model.b.weight[0, 0] = float("nan")
        assert first_nonfinite_module(model, lambda: model(x)) == ("b", ["weight"])
        model.a.bias[1] = float("inf")
        model.a.weight[2, 2] = float("nan")
        assert first_nonfinite_module(model, lambda: model(x)) == ("a", ["weight", "bias"])  # ran before b
        model.a.weight.fill_(0.5), model.a.bias.fill_(0.0), model.b.weight.fill_(0.1)
        model.inner[0].weight[0, 0] = float("nan")
        assert first_nonfinite_module(model, lambda: model(x)) == ("inner.0", ["weight"])  # the innermost
    assert all(not m._forward_hooks for m in model.modules())  # its hooks are gone


def test_first_nonfinite_module_none_for_bad_data_and_kept_across_a_failing_run():
    model = Branches()
    bad = torch.randn(3, 4)
    bad[1, 1] = float("nan")
    assert first_nonfinite_module(model, lambda: model(bad)) is None  # no module started it
    with torch.no_grad():
        model.a.weight[0, 0] = float("nan")

    def run():
        model(torch.randn(2, 4))
        raise RuntimeError("after the bad module")

    assert first_nonfinite_module(model, run) == ("a", ["weight"])
    assert all(not m._forward_hooks for m in model.modules())


def test_first_nonfinite_module_reads_tuple_and_dict_outputs():
    class DictOut(nn.Module):
        def forward(self, x):
            return {"ids": torch.arange(3), "h": (x, torch.log(x - 10))}

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = DictOut()

        def forward(self, x):
            return self.head(x)["h"][1]

    model = Outer()
    assert first_nonfinite_module(model, lambda: model(torch.rand(2, 3))) == ("head", [])


class Exp(nn.Module):
    def forward(self, x):
        return torch.exp(x * 1e4)


class Blowup(nn.Module):
    """``exp_layer`` overflows to inf on finite input and has no parameters."""

    def __init__(self):
        super().__init__()
        self.fc1, self.exp_layer = nn.Linear(5, 3), Exp()

    def forward(self, x):
        return self.exp_layer(self.fc1(x))


def test_a_nonfinite_loss_names_the_module_where_it_started_or_the_input_or_the_batch():
    model = MLP()
    batch = _mlp_batch(4)
    with torch.no_grad():
        model.fc2.weight[3, 1] = float("nan")
    runner = LossRunner(model, _mlp_sum, loss_reduction="sum")
    with pytest.raises(LoRAInitError, match=r"^module 'fc2', batch 3: its parameter\(s\) \['weight'\] have NaN/Inf "
                                            r"entries \(the first module whose output is not finite\)$"):
        runner.forward(batch, 3)
    loss, _, _ = runner.forward(batch, 3, check_finite=False)
    assert torch.isnan(loss)
    blow = LossRunner(Blowup(), lambda m, b: m(b).sum(), loss_reduction="sum")
    with pytest.raises(LoRAInitError, match=r"module 'exp_layer', batch 0: its output is NaN/Inf although its "
                                            r"inputs are finite \(overflow\?\)"):
        torch.manual_seed(0)
        blow.forward(torch.randn(2, 5) * 100, 0)
    bad = (batch[0].clone(), batch[1])
    bad[0][2, 0] = float("nan")
    clean = LossRunner(MLP(), _mlp_sum, loss_reduction="sum")
    with pytest.raises(LoRAInitError, match=r"^module 'fc1', batch 1: its input has NaN/Inf activations$"):
        clean.forward(bad, 1, culprit=lambda: "fc1")
    with pytest.raises(LoRAInitError, match=r"^batch 1: the loss is nan \(NaN/Inf activations or logits\)$"):
        clean.forward(bad, 1)


# ------------------------------------------------------------------------------------------ eval pass
def test_eval_loss_is_the_mean_over_loss_tokens_with_the_adapters_on_and_restores_the_model():
    model = tiny_llama(seed=5)
    targets = find_targets(model)
    with torch.no_grad():
        for t in targets.values():
            t.lora_B.normal_(0, 0.3)  # a written adapter: eval_loss must see it
    model.train()
    batches = [_lm_batch(3, 7, seed=10), _lm_batch(1, 5, seed=11), _lm_batch(2, 9, seed=12, labels=True)]
    got = eval_loss(model, targets, LossRunner(model), batches)
    m64 = copy.deepcopy(model).double().eval()
    sums = []
    with torch.no_grad():
        for b in batches:
            labels = b.get("labels", b["input_ids"].masked_fill(b["attention_mask"] == 0, -100))
            sums.append(_ce_sum64(m64(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                  labels, True))
        with m64.disable_adapter():
            off = LossRunner(m64).forward(batches[0], 0)[0]
    assert got == pytest.approx(sum(s for s, _ in sums) / sum(n for _, n in sums), rel=1e-5)
    assert abs(float(off) - sums[0][0]) > 1e-3  # the adapters change the loss: eval_loss ran with them on
    assert model.training and all(m.training for m in model.modules() if m is not model)
    assert all(not getattr(m, "_disable_adapters", False) for m in model.modules())
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())


def test_eval_loss_of_a_summed_loss_fn_is_per_example_and_nonfinite_is_inf():
    from helpers import mlp_batches, mlp_loss, tiny_mlp

    model = tiny_mlp(seed=2)
    targets = find_targets(model)
    batches = mlp_batches(n=13, bs=5, seed=4)  # 5 + 5 + 3 examples
    got = eval_loss(model, targets, LossRunner(model, mlp_loss, loss_reduction="sum"), batches)
    m64 = copy.deepcopy(model).double().eval()
    ref = sum(_ce_sum64(m64(x.double()).detach(), y, False)[0] for x, y in batches) / 13
    assert got == pytest.approx(ref, rel=1e-6)
    with torch.no_grad():
        targets[next(iter(targets))].lora_B.fill_(float("nan"))
    assert eval_loss(model, targets, LossRunner(model, mlp_loss, loss_reduction="sum"), batches) == float("inf")
    with pytest.raises(LoRAInitError, match="batch 0 is a tuple, not a mapping"):
        eval_loss(model, targets, LossRunner(model), batches)
    with pytest.raises(LoRAInitError, match="^held-out loss: no batches on any process$"):
        eval_loss(model, targets, LossRunner(model, mlp_loss, loss_reduction="sum"), [])
