"""initialize_lora with the PEFT-known methods eva, corda, astra, olora, mica, end to end on tiny models.

The written adapters equal lorainit_kernels.peft_inits applied to float64 statistics of the same
samples (the input mean and the output second moment come from the same pass as Z); the methods
that move part of W into the adapter keep the model's output; a planted NaN / Inf leaves the model
exactly as it was; save/load roundtrips; one statistics cache serves several methods; max_memory
splits the pass without changing the adapters; embeddings: MiCA as PEFT, the others refuse naming the layer.
"""
import copy

import pytest
import torch

import lorainit_kernels.peft_inits as lkp
from lorainit import (AstraConfig, CorDAConfig, EVAConfig, LoRADAConfig, MiCAConfig, OLoRAConfig, initialize_lora,
                      save_adapter)
from lorainit.targets import LoRAInitError, find_targets

from helpers import assert_same_state, lm_batches, model_state, rel, tiny_llama
from linalg_helpers import sin_max

torch.set_num_threads(1)

DATA_AWARE = {"eva": EVAConfig(token_mask="attention"), "corda": CorDAConfig(), "astra": AstraConfig()}
DATA_FREE = {"olora": OLoRAConfig(), "mica": MiCAConfig()}
ALL = {**DATA_AWARE, **DATA_FREE}


def _batches(n=24, bs=4, seed=1):
    return lm_batches(n=n, bs=bs, seed=seed, labels=True)


def _logits(model, batches):
    model.eval()
    with torch.no_grad():
        return torch.cat([model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits for b in batches])


def forward_stats64(model, batches):
    """Per target, from a float64 copy with the adapters off: the valid-token inputs X and outputs Y,
    then Z = X^T X / T, mu = mean x, Yc = Y^T Y / T (attention-mask tokens), the plain obvious way."""
    from peft.tuners.lora import LoraLayer

    m64 = copy.deepcopy(model).double().eval()
    layers = {n: mod for n, mod in m64.named_modules() if isinstance(mod, LoraLayer)}
    rows = {n: ([], []) for n in layers}
    current = {}
    handles = []
    for n, mod in layers.items():
        mod._disable_adapters = True

        def hook(module, inp, out, n=n):
            mask = current["mask"]
            rows[n][0].append(inp[0][mask])
            rows[n][1].append(out[mask])
        handles.append(mod.get_base_layer().register_forward_hook(hook))
    with torch.no_grad():
        for b in batches:
            current["mask"] = b["attention_mask"].bool()
            m64(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    for h in handles:
        h.remove()
    out = {}
    for n, (xs, ys) in rows.items():
        X, Y = torch.cat(xs), torch.cat(ys)
        T = X.shape[0]
        out[n] = {"Z": X.T @ X / T, "mu": X.mean(0), "Y": Y.T @ Y / T, "W": layers[n].get_base_layer().weight.detach(),
                  "count": T}
    return out


# ------------------------------------------------------------------------------------------ against float64
@pytest.mark.parametrize("method", list(DATA_AWARE))
def test_data_aware_methods_match_the_kernels_on_float64_statistics(method):
    model = tiny_llama(seed=3)
    batches = _batches()
    ref = forward_stats64(model, batches)
    W0 = {n: t.read_weight().clone() for n, t in find_targets(model).items()}
    rep = initialize_lora(model, batches, method=method, config=DATA_AWARE[method], progress=False)
    for name, t in find_targets(model).items():
        S = ref[name]
        A, B = t.lora_A.detach(), t.lora_B.detach()
        if method == "eva":
            comp = lkp.eva_components(S["Z"], S["mu"], t.r)
            assert sin_max(A.mT, comp.components.mT) < 1e-3, name
            assert not bool(B.any()) and torch.equal(t.read_weight(), W0[name])
        elif method == "corda":
            f = lkp.corda(S["W"], S["Z"], t.r, scaling=t.scaling)
            assert rel(t.scaling * B.double() @ A.double(), f.adapter_delta(t.scaling)) < 1e-4, name
        else:
            f = lkp.astra(S["W"], S["Y"], t.r, scaling=t.scaling, solver="eigh")
            assert rel(t.scaling * B.double() @ A.double(), f.adapter_delta(t.scaling)) < 1e-3, name
        assert rep.layer(name)["tokens"] == S["count"]


@pytest.mark.parametrize("method", list(ALL))
def test_output_is_unchanged_at_initialization(method):
    model = tiny_llama(seed=5)
    batches = _batches()
    before = _logits(model, batches)
    data = batches if method in DATA_AWARE else None
    rep = initialize_lora(model, data, method=method, config=ALL[method], progress=False)
    assert rel(_logits(model, batches), before) < 1e-5
    assert rep.info["base_modified"] == (method in ("corda", "astra", "olora"))
    if method in ("corda", "astra", "olora"):  # the adapter really holds part of W
        with model.disable_adapter():
            assert rel(_logits(model, batches), before) > 1e-3


def test_olora_and_mica_write_the_kernel_factors_and_mica_freezes_B():
    model = tiny_llama(seed=7)
    W0 = {n: t.read_weight().clone() for n, t in find_targets(model).items()}
    initialize_lora(model, None, method="olora", progress=False)
    for name, t in find_targets(model).items():
        f = lkp.olora(W0[name], t.r, scaling=t.scaling)
        assert torch.equal(t.lora_A.detach(), f.lora_A) and torch.equal(t.lora_B.detach(), f.lora_B)
    model = tiny_llama(seed=7)
    initialize_lora(model, None, method="mica", progress=False)
    for name, t in find_targets(model).items():
        assert sin_max(t.lora_B.detach(), lkp.mica(W0[name], t.r).lora_B) < 1e-5
        assert not bool(t.lora_A.any()) and not t.lora_B.requires_grad and t.lora_A.requires_grad
    model = tiny_llama(seed=7)
    initialize_lora(model, None, method="mica", config=MiCAConfig(freeze_B=False), progress=False)
    assert all(t.lora_B.requires_grad for t in find_targets(model).values())


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("method", list(DATA_AWARE))
def test_planted_nan_in_the_data_leaves_the_model_unchanged(method):
    model = tiny_llama(seed=2)
    emb = model.get_input_embeddings()
    batches = []
    for i, b in enumerate(_batches(n=12)):
        with torch.no_grad():
            x = emb.weight[b["input_ids"]].clone()
        if i == 2:
            x[1, 4, 7] = float("nan")
        batches.append({"inputs_embeds": x, "attention_mask": b["attention_mask"], "labels": b["labels"]})
    before = model_state(model)
    with pytest.raises(LoRAInitError, match="batch 2"):
        initialize_lora(model, batches, method=method, config=DATA_AWARE[method], progress=False)
    assert_same_state(before, model_state(model))


@pytest.mark.parametrize("method", list(ALL))
def test_planted_inf_weight_names_the_module_and_leaves_the_model_unchanged(method):
    model = tiny_llama(seed=2)
    bad = "base_model.model.model.layers.1.mlp.down_proj"
    with torch.no_grad():
        find_targets(model)[bad].base.weight[3, 5] = float("inf")
    before = model_state(model)
    data = _batches(n=8) if method in DATA_AWARE else None
    with pytest.raises(LoRAInitError, match=r"down_proj|batch 0"):
        initialize_lora(model, data, method=method, config=ALL[method], progress=False)
    assert_same_state(before, model_state(model))


def test_embeddings_mica_as_peft_the_others_refuse_naming_the_layer():
    targets = ["q_proj", "v_proj", "embed_tokens"]
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    def build():
        torch.manual_seed(1)
        cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=64)
        return get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=3, lora_alpha=6, target_modules=targets))

    for method in ("eva", "corda", "astra", "olora"):
        model = build()
        before = model_state(model)
        with pytest.raises(LoRAInitError, match="embed_tokens"):
            initialize_lora(model, _batches(n=8) if method in DATA_AWARE else None, method=method, progress=False)
        assert_same_state(before, model_state(model))
    model = build()
    initialize_lora(model, None, method="mica", progress=False)
    t = find_targets(model)["base_model.model.model.embed_tokens"]
    W = t.base.weight.detach().T  # (embedding_dim, num_embeddings), as PEFT's mica_init for embeddings
    assert sin_max(t.lora_B.detach(), lkp.mica(W, t.r).lora_B) < 1e-5 and not bool(t.lora_A.any())
    assert not t.lora_B.requires_grad


def test_eva_redistribution_names_the_rank_pattern_and_changes_nothing():
    model = tiny_llama(seed=4)
    before = model_state(model)
    with pytest.raises(LoRAInitError, match="rank_pattern=.*alpha_pattern="):
        initialize_lora(model, _batches(), method="eva", config=EVAConfig(rho=2.0), progress=False)
    assert_same_state(before, model_state(model))
    with pytest.raises(ValueError, match="rho"):
        EVAConfig(rho=0.5)


# ------------------------------------------------------------------------------------------ save / load
def test_save_load_roundtrip(tmp_path):
    """corda rewrote W: save_adapter saves the residual base beside the adapter; eva left W alone: the
    adapter alone loads onto a fresh copy of the same base."""
    from peft import AutoPeftModelForCausalLM, PeftModel

    batches = _batches(n=8)
    model = tiny_llama(seed=8)
    rep = initialize_lora(model, batches, method="corda", progress=False)
    y = _logits(model, batches)
    loaded = AutoPeftModelForCausalLM.from_pretrained(save_adapter(model, tmp_path / "corda", rep))
    assert rel(_logits(loaded, batches), y) < 1e-5

    model = tiny_llama(seed=8)
    initialize_lora(model, batches, method="eva", progress=False)
    model.save_pretrained(tmp_path / "eva")
    fresh = tiny_llama(seed=8).get_base_model()  # same seed: the same base weights, fresh LoRA layers
    base = type(fresh)(fresh.config)
    base.load_state_dict({k.replace(".base_layer", ""): v for k, v in fresh.state_dict().items() if "lora_" not in k})
    loaded = PeftModel.from_pretrained(base, tmp_path / "eva")
    for name, t in find_targets(loaded).items():
        assert torch.equal(t.lora_A.detach(), find_targets(model)[name].lora_A.detach()), name


# ------------------------------------------------------------------------------------------ one pass, many methods
def _products(model):
    return {n: (t.scaling * t.lora_B.detach().double() @ t.lora_A.detach().double(), t.read_weight().double())
            for n, t in find_targets(model).items()}


def _same_products(a, b, tol=0.0):
    for n in a:
        assert rel(a[n][0], b[n][0]) <= tol if a[n][0].norm() > 0 else b[n][0].norm() == 0, n
        assert rel(a[n][1], b[n][1]) <= tol, n


def test_one_stats_cache_serves_several_methods(tmp_path):
    """astra's forward-only pass writes Z, the mean and Y: eva and corda reuse it, lora_da (needs G, s) is told
    why not; lora_da's pass writes Z, G, s and the mean: eva and corda reuse it, astra (needs Y) is told why not."""
    batches = _batches(n=12)
    configs = {"astra": AstraConfig(solver="eigh"), "eva": EVAConfig(token_mask="attention", solver="eigh"),
               "corda": CorDAConfig(), "lora_da": LoRADAConfig(step_scale=0.1, solver="eigh")}
    plain = {}
    for method, cfg in configs.items():
        model = tiny_llama(seed=9)
        initialize_lora(model, batches, method=method, config=cfg, progress=False)
        plain[method] = _products(model)
    for writer, readers, refused, why in (("astra", ("eva", "corda"), "lora_da", "no gradient statistics"),
                                          ("lora_da", ("eva", "corda"), "astra", r"lacks the statistics \['output_cov'\]")):
        path = tmp_path / f"{writer}.safetensors"
        model = tiny_llama(seed=9)
        rep = initialize_lora(model, batches, method=writer, config=configs[writer], progress=False, stats_cache=path)
        assert not rep.info["stats_cache"]["hit"]
        _same_products(_products(model), plain[writer], tol=1e-6)
        for method in readers:
            model = tiny_llama(seed=9)
            rep = initialize_lora(model, batches, method=method, config=configs[method], progress=False,
                                  stats_cache=path)
            assert rep.info["stats_cache"]["hit"] and rep.info["passes"] == 0, (writer, method)
            _same_products(_products(model), plain[method], tol=1e-6)
        model = tiny_llama(seed=9)
        before = model_state(model)
        with pytest.raises(LoRAInitError, match=why):
            initialize_lora(model, batches, method=refused, config=configs[refused], progress=False, stats_cache=path)
        assert_same_state(before, model_state(model))


@pytest.mark.parametrize("method", list(DATA_AWARE))
def test_max_memory_splits_the_pass_without_changing_the_adapters(method):
    batches = _batches(n=8)
    cfg = DATA_AWARE[method]
    ref = tiny_llama(seed=6)
    initialize_lora(ref, batches, method=method, config=cfg, progress=False)
    model = tiny_llama(seed=6)
    rep = initialize_lora(model, batches, method=method, config=cfg.replace(max_memory=40_000), progress=False)
    assert rep.info["passes"] > 1
    _same_products(_products(model), _products(ref), tol=1e-6)


@pytest.mark.parametrize("method", list(DATA_AWARE))
def test_estimate_memory_plans_the_passes_the_call_makes(method):
    from lorainit import estimate_memory

    batches = _batches(n=8)
    budget = estimate_memory(tiny_llama(seed=6), method, DATA_AWARE[method]).smallest_budget
    cfg = DATA_AWARE[method].replace(max_memory=budget)
    plan = estimate_memory(tiny_llama(seed=6), method, cfg)
    rep = initialize_lora(tiny_llama(seed=6), batches, method=method, config=cfg, progress=False)
    assert plan.passes == rep.info["passes"] > 1 and plan.fits and plan.peak_bytes <= budget
    assert plan.snapshot_host_bytes > 0 if method != "eva" else True  # corda/astra rewrite W: snapshot of W
    with pytest.raises(LoRAInitError, match="smallest budget"):
        estimate_memory(tiny_llama(seed=6), method, cfg.replace(max_memory=1_000))
