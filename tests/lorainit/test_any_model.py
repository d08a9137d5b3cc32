"""Issue 15: encoder-decoders, per-example layers, embedding targets, mean losses and bad inputs.

Tiny random models built from configs; every data-aware method on each; per-layer token masks
recorded in the report; embedding LoRA-DA checked against the dense kernel on diag(Z).
"""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import lorainit_kernels.methods as lkm
from lorainit import initialize_lora
from lorainit.methods.hrp import HRPConfig
from lorainit.methods.lora_da import LoRADAConfig
from lorainit_kernels.methods import lora_da_embedding
from lorainit.methods.baselines import LoRAGAConfig
from lorainit.passes.loss import LossReductionWarning
from lorainit.targets import LoRAInitError, LoRAInitWarning, find_targets

from helpers import VOCAB, assert_same_state, lm_batches, mlp_batches, mlp_loss, model_state, rel, tiny_mlp

warnings.filterwarnings("ignore", category=FutureWarning)

ALL = ["lora", "gaussian", "orthogonal", "pissa", "milora", "lora_ga", "lora_one", "lora_da", "hrp"]
FAST = {"hrp": HRPConfig(rank=8, steps=2), "lora_da": LoRADAConfig(step_scale=0.1)}


def _peft(model, **kw):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, **kw))


def tiny_t5(targets=("q", "k", "v", "wi")):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2,
                   decoder_start_token_id=0, pad_token_id=0)
    return _peft(T5ForConditionalGeneration(cfg), target_modules=list(targets))


def t5_batches(enc_len=10, dec_len=5, n=3):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(3, VOCAB, (4, enc_len), generator=g)
        am = torch.ones_like(ids)
        am[0, enc_len - 3:] = 0
        labels = torch.randint(3, VOCAB, (4, dec_len), generator=g)
        labels[1, dec_len - 2:] = -100
        out.append({"input_ids": ids, "attention_mask": am, "labels": labels})
    return out


def tiny_bert(targets="all-linear"):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, num_labels=4)
    return _peft(BertForSequenceClassification(cfg), target_modules=targets)


def bert_batches(n=3):
    out = []
    for i, b in enumerate(lm_batches(n=4 * n, bs=4, seed=3)):
        out.append({**b, "labels": torch.tensor([0, 1, 2, i % 3])})
    return out


def tiny_lm(kind, targets):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=32))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                             max_position_embeddings=32, pad_token_id=0))
    return _peft(model, target_modules=targets, **({"fan_in_fan_out": True} if kind == "gpt2" else {}))


def _short(name):
    return name.split("base_model.model.", 1)[-1]


# ------------------------------------------------------------------------------------------ T5
@pytest.mark.parametrize("method", ["lora_da", "lora_ga", "lora_one", "hrp"])
def test_t5_encoder_and_decoder_targets_use_their_own_masks(method):
    model = tiny_t5()
    batches = t5_batches()
    report = initialize_lora(model, batches, method=method, config=FAST.get(method), progress=False)
    rows = {_short(r["name"]): r for r in report.layers}
    assert len(rows) == len(find_targets(model))
    if method == "hrp":
        return
    enc_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    dec_tokens = sum(int(b["labels"].ne(-100).sum()) for b in batches)
    for name, row in rows.items():
        if name.startswith("encoder.") or "EncDecAttention.k" in name or "EncDecAttention.v" in name:
            assert row["token_mask"] == "attention_mask", name
            assert row["tokens"] == enc_tokens, name
        else:
            assert row["token_mask"] == "labels (decoder)", name
            assert row["tokens"] == dec_tokens, name


def test_t5_equal_lengths_and_decoder_attention_mask():
    """Cross-attention keys/values read the encoder output: the encoder mask even when lengths agree."""
    model = tiny_t5(targets=("q", "v"))
    batches = t5_batches(enc_len=6, dec_len=6, n=2)
    for b in batches:
        b["decoder_attention_mask"] = b["labels"].ne(-100).long()
    report = initialize_lora(model, batches, method="lora_ga", progress=False)
    for row in report.layers:
        name = _short(row["name"])
        want = "attention_mask" if name.startswith("encoder.") or "EncDecAttention.v" in name \
            else "decoder_attention_mask"
        assert row["token_mask"] == want, name


# ------------------------------------------------------------------------------------------ BERT classifier
@pytest.mark.parametrize("method", ALL)
def test_bert_classifier_all_linear_every_method(method):
    model = tiny_bert()
    report = initialize_lora(model, bert_batches(), method=method, config=FAST.get(method), progress=False)
    rows = {_short(r["name"]): r for r in report.layers}
    assert any("pooler" in n for n in rows) and any("classifier" in n for n in rows)
    if method in ("lora_da", "lora_ga", "lora_one"):
        for name, row in rows.items():
            per_example = "pooler" in name or "classifier" in name
            assert row["token_mask"] == ("one token per example" if per_example else "attention_mask"), name
            if per_example:
                assert row["tokens"] == 12, name


# ------------------------------------------------------------------------------------------ embeddings
@pytest.mark.parametrize("kind,targets", [("gpt2", ["wte", "c_attn"]), ("llama", ["embed_tokens"])])
@pytest.mark.parametrize("method", ALL)
def test_embedding_targets_initialized_or_refused(kind, targets, method):
    model = tiny_lm(kind, targets)
    emb = [n for n, t in find_targets(model).items() if t.kind == "embedding"]
    assert len(emb) == 1
    before = model_state(model)
    batches = lm_batches(n=8, bs=4, seed=5)
    if method == "orthogonal":
        with pytest.raises(LoRAInitError, match="orthogonal.*embedding"):
            initialize_lora(model, batches, method=method, progress=False)
        assert_same_state(before, model_state(model))
        return
    report = initialize_lora(model, batches, method=method, config=FAST.get(method), progress=False)
    assert emb[0] in [r["name"] for r in report.layers]
    t = find_targets(model)[emb[0]]
    A, B = t.lora_A.detach(), t.lora_B.detach()
    if method in ("lora", "gaussian"):  # PEFT's embedding init: A = 0, B ~ N(0, 1)
        assert torch.count_nonzero(A) == 0 and 0.5 < float(B.std()) < 1.5
    elif method == "hrp":
        assert torch.count_nonzero(A) > 0 and torch.count_nonzero(B) == 0
    else:
        assert torch.count_nonzero(A) > 0 and torch.count_nonzero(B) > 0
    if method in ("pissa", "milora", "lora_ga"):  # residual + adapter = W (embedding weight is W^T)
        W = t.weight_torch().detach().double() + t.scaling * B.double() @ A.double()
        assert rel(W, before["values"][_weight_key(model, emb[0])].double().T) < 1e-5


def _weight_key(model, name):
    prefix = name + ".base_layer.weight"
    return next(k for k in model.state_dict() if k == prefix)


def test_embedding_lora_da_equals_the_dense_kernel_on_diag_z():
    """The diagonal-plus-low-rank solve equals lkm.lora_da on the dense diag(z) (eigh and LOBPCG paths)."""
    g = torch.Generator().manual_seed(0)
    n, m, r = 300, 12, 3
    z = torch.rand(n, generator=g) * (torch.rand(n, generator=g) > 0.3)  # 30% tokens unseen
    z = z / z.sum()
    G = torch.randn(m, n, generator=g) * (z > 0)
    s = torch.rand(m, generator=g) + 0.1
    ref, info = lkm.lora_da(torch.diag(z).double(), G.double(), s.double(), r, n_train=1e3, scaling=2.0,
                            solver="eigh")
    for solver in ("eigh", "lobpcg"):
        got, ginfo = lora_da_embedding(z, G, s, r, n_train=1e3, scaling=2.0, solver=solver,
                                       **({"tol": 1e-7} if solver == "lobpcg" else {}))
        A, B, evals = got.lora_A, got.lora_B, ginfo["evals"]
        assert torch.allclose(evals.double(), info["evals"], rtol=1e-4, atol=1e-6), solver
        # same subspace: the projections agree
        P, Pr = A.double().T @ A.double(), ref.lora_A.T @ ref.lora_A
        assert rel(P, Pr) < 1e-4, solver
        assert rel(B.double() @ A.double(), ref.lora_B @ ref.lora_A) < 1e-4, solver


def test_embedding_only_targets_and_fewer_seen_tokens_than_rank():
    model = tiny_lm("llama", ["embed_tokens"])
    ids = torch.tensor([[5, 6, 5, 6, 5]] * 4)  # 2 distinct tokens, rank 2 -> fine; check r > seen with r=2
    report = initialize_lora(model, [{"input_ids": ids}, {"input_ids": ids.flip(1)}], method="lora_da",
                             config=LoRADAConfig(step_scale=0.1), progress=False)
    row = report.layers[0]
    assert row["seen_tokens"] == 2 and row["token_mask"] == "all positions"
    A = find_targets(model)[row["name"]].lora_A.detach()
    assert torch.allclose(A @ A.T, torch.eye(2), atol=1e-5)
    assert torch.count_nonzero(A[:, [0, 1, 2, 3]]) == 0  # only seen tokens carry the subspace


# ------------------------------------------------------------------------------------------ losses
def _lm_loss(reduction):
    def loss_fn(model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                               ignore_index=-100, reduction=reduction)
    return loss_fn


@pytest.mark.parametrize("kind", ["mlp", "lm"])
def test_mean_loss_fn_with_loss_reduction_mean_equals_the_summed_one(kind):
    def mean_mlp(model, batch):
        return mlp_loss(model, batch) / batch[0].shape[0]

    if kind == "mlp":
        build, batches, fs, fm = (lambda: tiny_mlp(seed=1)), mlp_batches(n=32, bs=8), mlp_loss, mean_mlp
    else:
        build, batches = (lambda: tiny_lm("llama", ["q_proj", "v_proj"])), lm_batches(n=12, bs=4, seed=2)
        fs, fm = _lm_loss("sum"), _lm_loss("mean")
    out = []
    for fn, red in ((fs, "sum"), (fm, "mean")):
        model = build()
        initialize_lora(model, batches, method="lora_da", loss_fn=fn, loss_reduction=red, progress=False)
        out.append({n: (t.lora_A.detach().clone(), t.lora_B.detach().clone()) for n, t in find_targets(model).items()})
    for name, (A, B) in out[0].items():
        assert rel(out[1][name][0].T @ out[1][name][0], A.T @ A) < 1e-4, name
        assert rel(out[1][name][1] @ out[1][name][0], B @ A) < 1e-4, name


def test_mean_loss_fn_without_loss_reduction_warns_once():
    model = tiny_lm("llama", ["q_proj"])
    with pytest.warns(LossReductionWarning, match="mean") as rec:
        initialize_lora(model, lm_batches(n=8, bs=4), method="lora_ga", loss_fn=_lm_loss("mean"), progress=False)
    assert sum(issubclass(w.category, LossReductionWarning) for w in rec) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", LossReductionWarning)
        initialize_lora(tiny_lm("llama", ["q_proj"]), lm_batches(n=8, bs=4), method="lora_ga",
                        loss_fn=_lm_loss("sum"), progress=False)


# ------------------------------------------------------------------------------------------ rough edges
def _finite(state):
    state["values"] = {k: torch.nan_to_num(v, nan=12345.0) for k, v in state["values"].items()}
    return state


def test_batches_without_loss_tokens_are_skipped_and_single_batch_auto_holds_out():
    model = tiny_lm("llama", ["q_proj"])
    batches = lm_batches(n=8, bs=4, labels=True)
    dead = {**batches[0], "labels": torch.full_like(batches[0]["labels"], -100)}
    with pytest.warns(LoRAInitWarning, match="skipped 1 of 3"):
        report = initialize_lora(model, [dead] + batches, method="lora_da", progress=False)
    assert report.info["skipped_batches"] == 1
    report = initialize_lora(tiny_lm("llama", ["q_proj"]), batches[:1], method="lora_da", progress=False)
    assert report.info["held_out_examples"] == 1 and "step_search" in report.info


@pytest.mark.parametrize("case", ["all_dead", "nan_embedding", "two_active", "mean_reduction_without_loss_fn"])
def test_bad_inputs_give_a_clear_error_and_leave_the_model_unchanged(case):
    from peft import LoraConfig

    model = tiny_lm("llama", ["q_proj", "v_proj"])
    batches = lm_batches(n=8, bs=4, labels=True)
    kw, match = {}, None
    if case == "all_dead":
        batches = [{**b, "labels": torch.full_like(b["labels"], -100)} for b in batches]
        match = "no loss tokens: every label of their 2 batches"
    elif case == "nan_embedding":
        with torch.no_grad():
            model.get_base_model().model.embed_tokens.weight[7] = float("nan")
        batches = [{**b, "input_ids": b["input_ids"].clone().fill_(7)} for b in batches]
        match = "NaN"
    elif case == "two_active":
        model.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
        model.base_model.set_adapter(["default", "other"])
        match = "several active LoRA adapters.*adapter=NAME"
    else:
        kw, match = {"loss_reduction": "mean"}, "loss_reduction='mean' describes a loss_fn"
    before = _finite(model_state(model))
    with pytest.raises(LoRAInitError, match=match) as err:
        initialize_lora(model, batches, method="lora_da", progress=False, **kw)
    assert "cannot tell how" not in str(err.value)
    assert_same_state(before, _finite(model_state(model)))
    # no message repeats the module name
    for name in find_targets(model, adapter="default"):
        assert str(err.value).count(repr(name)) <= 1
