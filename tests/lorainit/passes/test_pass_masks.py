"""lorainit.passes.masks: the token mask each target layer gets (decoder-only, encoder-decoder, per-example
layers, embeddings, no mask), the error naming the shapes, the labels the report shows, and count_rows."""
import re
from types import SimpleNamespace

import pytest
import torch
from helpers import VOCAB
from torch import nn

from lorainit import LoRAInitError
from lorainit.passes.loss import LossRunner
from lorainit.passes.masks import LayerMasks, TokenMasks, count_rows, is_encoder_decoder
from lorainit.targets import find_targets


def _inject(model, targets):
    from peft import LoraConfig, inject_adapter_in_model

    return inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, target_modules=list(targets)), model)


def _short(name):
    return name.split("base_model.model.", 1)[-1]


def _run(model, batch, runner=None, layer_masks=None):
    """Forward ``batch`` through ``runner`` (a LossRunner of ``model``), recording every target call's input:
    ``([(name, x), ...], TokenMasks, LayerMasks)``; the masks are chosen after the forward, as the passes do."""
    targets = find_targets(model)
    lm = layer_masks or LayerMasks(model, targets, list(targets))
    runner = runner or LossRunner(model)
    seen = []
    handles = [t.base.register_forward_hook(lambda mod, inp, out, n=n: seen.append((n, inp[0])))
               for n, t in targets.items()]
    handles += lm.attach()
    lm.begin_batch()
    try:
        with torch.no_grad():
            _, _, masks = runner.forward_masks(batch, 0)
    finally:
        for h in handles:
            h.remove()
    return seen, masks, lm


def _padded(b, s, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, s), generator=g)
    am = torch.ones(b, s, dtype=torch.long)
    for i in range(0, b if s > 1 else 0, 2):  # right padding in every other row, one token kept
        am[i, int(torch.randint(1, s, (), generator=g)):] = 0
    return {"input_ids": ids.masked_fill(am == 0, 0), "attention_mask": am}


# ------------------------------------------------------------------------------------------ small pieces
def test_is_encoder_decoder_reads_the_models_config():
    model = nn.Linear(2, 2)
    assert not is_encoder_decoder(model)
    model.config = SimpleNamespace(is_encoder_decoder=False)
    assert not is_encoder_decoder(model)
    model.config = SimpleNamespace(is_encoder_decoder=True)
    assert is_encoder_decoder(model)


def test_primary_is_the_encoder_mask():
    m = torch.tensor([[True, False]])
    assert TokenMasks(examples=1).primary is None
    assert TokenMasks(examples=1, decoder=("decoder_attention_mask", m)).primary is None
    assert TokenMasks(examples=1, encoder=("attention_mask", m)).primary is m


def test_count_rows_is_the_masks_sum_or_every_row_of_the_input():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(3, 7, generator=g) > 0.4
    x = torch.randn(3, 7, 5)
    assert count_rows(mask, x, "linear") == int(mask.sum()) == sum(bool(v) for v in mask.flatten())
    assert count_rows(torch.zeros(3, 7, dtype=torch.bool), x, "linear") == 0
    assert count_rows(None, x, "linear") == 21 and count_rows(None, x, "conv1d") == 21
    assert count_rows(None, torch.zeros(3, 7, dtype=torch.long), "embedding") == 21  # token ids: every entry
    assert count_rows(None, torch.randn(4, 5), "linear") == 4


# ------------------------------------------------------------------------------------------ decoder-only
def _llama(targets=("embed_tokens", "q_proj", "down_proj", "lm_head")):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32, pad_token_id=0)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=2, lora_alpha=4, target_modules=list(targets)))
    return model.eval()


def test_decoder_only_every_target_kind_uses_the_attention_mask():
    model = _llama()
    batch = _padded(3, 7)
    seen, masks, lm = _run(model, batch)
    assert {_short(n).split(".")[-1] for n, _ in seen} == {"embed_tokens", "q_proj", "down_proj", "lm_head"}
    am = batch["attention_mask"].bool()
    for name, x in seen:
        mask, label = lm.select(name, x, masks)
        assert label == "attention_mask" and torch.equal(mask, am), name
        assert count_rows(mask, x, lm.targets[name].kind) == int(am.sum()) == 19, name  # 6 + 7 + 6 tokens
    assert all(lm.label(n) == "attention_mask" for n in lm.targets)


def test_decoder_only_token_mask_labels_uses_the_positions_predicting_a_label():
    model = _llama(("q_proj", "lm_head"))
    batch = _padded(5, 6, seed=1)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels[:, :2] = -100  # a prompt: the mask is no longer the attention mask
    seen, masks, lm = _run(model, {**batch, "labels": labels}, LossRunner(model, token_mask="labels"))
    want = torch.zeros(5, 6, dtype=torch.bool)
    want[:, :-1] = labels[:, 1:] != -100
    for name, x in seen:
        mask, label = lm.select(name, x, masks)
        assert label == "labels" and torch.equal(mask, want), name
        assert count_rows(mask, x, "linear") == int((labels[:, 1:] != -100).sum())


def test_no_mask_in_the_batch_means_every_position():
    model = _llama(("embed_tokens", "q_proj"))
    ids = _padded(3, 5)["input_ids"]
    seen, masks, lm = _run(model, {"input_ids": ids})
    assert masks == TokenMasks(examples=3)
    for name, x in seen:
        assert lm.select(name, x, masks) == (None, "all positions")
        assert count_rows(None, x, lm.targets[name].kind) == 15, name
    assert lm.select(name, x, None) == (None, "all positions")  # a pass without masks


# ------------------------------------------------------------------------------------------ per-example layers
class Classifier(nn.Module):
    """Encoder-only classifier: token layer ``enc``, then ``pooler`` and ``classifier`` on one vector per example."""

    def __init__(self, d=6, classes=3):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.enc = nn.Embedding(VOCAB, d), nn.Linear(d, d)
        self.pooler, self.classifier = nn.Linear(d, d), nn.Linear(d, classes)

    def forward(self, input_ids, attention_mask=None, labels=None):
        h = torch.tanh(self.enc(self.emb(input_ids)))
        logits = self.classifier(torch.tanh(self.pooler(h[:, 0])))
        return {"logits": logits, "loss": nn.functional.cross_entropy(logits, labels)}


@pytest.mark.parametrize("b,s", [(5, 5), (1, 4), (1, 1), (3, 1)])
def test_per_example_layers_count_one_token_per_example_even_when_shapes_coincide(b, s):
    model = _inject(Classifier(), ["enc", "pooler", "classifier"])
    batch = {**_padded(b, s, seed=2), "labels": torch.arange(b) % 3}
    seen, masks, lm = _run(model, batch)
    am = batch["attention_mask"].bool()
    for name, x in seen:
        mask, label = lm.select(name, x, masks)
        if name == "enc":
            assert label == "attention_mask" and torch.equal(mask, am)
            assert count_rows(mask, x, "linear") == int(am.sum())
        else:
            assert (mask, label) == (None, "one token per example"), name
            assert count_rows(mask, x, "linear") == b


def test_flattened_tokens_of_a_decoder_only_batch_use_the_mask_reshaped():
    model = _inject(Classifier(), ["enc"])
    lm = LayerMasks(model, find_targets(model), ["enc"])
    am = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 1, 1], [1, 1, 0]], dtype=torch.bool)
    mask, label = lm.select("enc", torch.randn(15, 6), TokenMasks(examples=5, encoder=("attention_mask", am)))
    assert label == "attention_mask" and mask.tolist() == [bool(v) for row in am.tolist() for v in row]


def test_an_input_matching_no_mask_is_an_error_naming_the_shapes():
    model = _inject(Classifier(), ["enc"])
    lm = LayerMasks(model, find_targets(model), ["enc"])
    masks = TokenMasks(examples=3, encoder=("attention_mask", torch.ones(3, 5, dtype=torch.bool)))
    msg = ("input of shape (3, 7, 6) matches none of the token masks (attention_mask (3, 5)) and is not one vector "
           "per example (3 examples)")
    with pytest.raises(LoRAInitError, match=f"^{re.escape(msg)}$"):
        lm.select("enc", torch.randn(3, 7, 6), masks)
    with pytest.raises(LoRAInitError, match=re.escape("input of shape (4, 6) matches none")):  # 4 rows, 3 examples
        lm.select("enc", torch.randn(4, 6), masks)
    assert "enc" not in lm.used  # a failed call records no mask


def test_used_lists_each_mask_a_layer_used_once_in_order():
    model = _inject(Classifier(), ["enc", "pooler"])
    lm = LayerMasks(model, find_targets(model), ["enc", "pooler"])
    masks = TokenMasks(examples=2, encoder=("attention_mask", torch.ones(2, 4, dtype=torch.bool)))
    for x in (torch.randn(2, 4, 6), torch.randn(2, 6), torch.randn(2, 4, 6)):  # a layer called on both kinds
        lm.select("enc", x, masks)
    assert lm.used["enc"] == ["attention_mask", "one token per example"]
    assert lm.label("enc") == "attention_mask / one token per example" and lm.label("pooler") is None


# ------------------------------------------------------------------------------------------ encoder-decoder
class Seq2Seq(nn.Module):
    """``encoder.0`` inside the encoder; ``k`` reads the encoder's output (cross-attention keys); ``q`` and
    ``ff`` read the decoder's sequence."""

    def __init__(self, d=8):
        super().__init__()
        torch.manual_seed(0)
        self.config = SimpleNamespace(is_encoder_decoder=True)
        self.emb = nn.Embedding(VOCAB, d)
        self.encoder = nn.Sequential(nn.Linear(d, d), nn.Tanh())
        self.q, self.k, self.ff = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, VOCAB)

    def get_encoder(self):
        return self.encoder

    def forward(self, input_ids, decoder_input_ids, attention_mask=None, labels=None):
        enc = self.encoder(self.emb(input_ids))
        dec = self.emb(decoder_input_ids)
        att = torch.softmax(self.q(dec) @ self.k(enc).transpose(1, 2), -1) @ enc
        return self.ff(dec + att)


def _seq2seq_run(enc_len, dec_len, attach=True):
    model = _inject(Seq2Seq(), ["encoder.0", "q", "k", "ff"])
    g = torch.Generator().manual_seed(4)
    ids, dec = torch.randint(3, VOCAB, (3, enc_len), generator=g), torch.randint(3, VOCAB, (3, dec_len), generator=g)
    am = torch.ones(3, enc_len, dtype=torch.bool)
    am[0, 1:] = False
    dm = torch.ones(3, dec_len, dtype=torch.bool)
    dm[2, 2:] = False
    lm = LayerMasks(model, find_targets(model), list(find_targets(model)))
    seen = []
    handles = [t.base.register_forward_hook(lambda mod, inp, out, n=n: seen.append((n, inp[0])))
               for n, t in lm.targets.items()]
    handles += lm.attach() if attach else []
    lm.begin_batch()
    with torch.no_grad():
        model(ids, dec)
    for h in handles:
        h.remove()
    return lm, dict(seen), am, dm


@pytest.mark.parametrize("enc_len,dec_len", [(5, 5), (7, 3)])
def test_encoder_decoder_layers_reading_the_encoders_output_use_the_encoder_mask(enc_len, dec_len):
    lm, seen, am, dm = _seq2seq_run(enc_len, dec_len)
    assert lm.in_encoder == {"encoder.0"}
    masks = TokenMasks(examples=3, encoder=("attention_mask", am), decoder=("decoder_attention_mask", dm))
    for name, x in seen.items():
        mask, label = lm.select(name, x, masks)
        want = ("attention_mask", am) if name in ("encoder.0", "k") else ("decoder_attention_mask", dm)
        assert label == want[0] and mask is want[1], name
    # the encoder's output is known per batch: after begin_batch, k's equal-length input is a decoder input
    lm.begin_batch()
    if enc_len == dec_len:
        assert lm.select("k", seen["k"], masks)[1] == "decoder_attention_mask"
    # the fallbacks without the side's own mask
    if enc_len != dec_len:
        assert lm.select("q", seen["q"], TokenMasks(examples=3, encoder=("attention_mask", am))) == \
            (None, "all decoder positions")
    assert lm.select("encoder.0", seen["encoder.0"], TokenMasks(examples=3, decoder=("decoder_attention_mask", dm))) \
        == (None, "all positions")


def test_an_encoder_decoder_input_matching_no_mask_lists_both_masks():
    lm, seen, am, dm = _seq2seq_run(6, 4)
    masks = TokenMasks(examples=3, encoder=("attention_mask", am), decoder=("labels (decoder)", dm))
    msg = ("input of shape (3, 5, 8) matches none of the token masks (labels (decoder) (3, 4), attention_mask (3, 6)) "
           "and is not one vector per example (3 examples)")
    with pytest.raises(LoRAInitError, match=f"^{re.escape(msg)}$"):
        lm.select("q", torch.randn(3, 5, 8), masks)
    with pytest.raises(LoRAInitError, match=re.escape("input of shape (12, 8) matches none")):  # no flat reshape
        lm.select("q", torch.randn(12, 8), masks)


@pytest.mark.parametrize("enc_len,dec_len", [(5, 5), (7, 3), (3, 7)])
def test_a_decoder_layer_without_a_decoder_mask_uses_every_decoder_position_whatever_the_lengths(enc_len, dec_len):
    lm, seen, am, dm = _seq2seq_run(enc_len, dec_len)
    masks = TokenMasks(examples=3, encoder=("attention_mask", am), decoder_length=dec_len)  # what LossRunner.masks builds
    for name in ("q", "ff"):
        assert lm.select(name, seen[name], masks) == (None, "all decoder positions"), name
    assert lm.select("k", seen["k"], masks) == (am, "attention_mask")  # it reads the encoder's output
    assert lm.select("encoder.0", seen["encoder.0"], masks) == (am, "attention_mask")


def _t5():
    from peft import LoraConfig, get_peft_model
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2,
                   decoder_start_token_id=0, pad_token_id=0)
    return get_peft_model(T5ForConditionalGeneration(cfg), LoraConfig(r=2, lora_alpha=4, target_modules=["q", "k", "wi"]))


def test_t5_behind_peft_encoder_cross_attention_and_decoder_masks():
    model = _t5().eval()
    batch = _padded(3, 7, seed=5)
    labels = torch.randint(3, VOCAB, (3, 4))
    labels[1, 2:] = -100
    seen, masks, lm = _run(model, {**batch, "labels": labels})
    assert lm.in_encoder == {n for n in lm.targets if ".encoder." in n} != set()  # get_encoder through PEFT
    am, lab = batch["attention_mask"].bool(), labels != -100
    kinds = set()
    for name, x in seen:
        mask, label = lm.select(name, x, masks)
        encoder_side = ".encoder." in name or name.endswith("EncDecAttention.k")
        kinds.add((encoder_side, name.split(".")[-1]))
        want = ("attention_mask", am) if encoder_side else ("labels (decoder)", lab)
        assert label == want[0] and torch.equal(mask, want[1]), name
        assert count_rows(mask, x, "linear") == int(want[1].sum()), name
    assert kinds == {(True, "q"), (True, "k"), (True, "wi"), (False, "q"), (False, "k"), (False, "wi")}
