"""Issue 23: errors name the layer that holds the problem, once; a method typo suggests the right name."""
import warnings

import pytest
import torch

from lorainit import LoRAInitError, initialize_lora

from helpers import assert_same_state, lm_batches, model_state, tiny_llama


def _finite(state):  # NaN != NaN: compare the planted NaN as a number
    state["values"] = {k: torch.nan_to_num(v, nan=12345.0) for k, v in state["values"].items()}
    return state


def _plant_nan(model, where):
    with torch.no_grad():
        dict(model.get_base_model().named_parameters())[where].view(-1)[5] = float("nan")


@pytest.mark.parametrize("where, module", [
    ("model.layers.0.self_attn.q_proj.base_layer.weight", "model.layers.0.self_attn.q_proj.base_layer"),
    ("model.layers.1.mlp.down_proj.base_layer.weight", "model.layers.1.mlp.down_proj.base_layer"),
    ("model.layers.1.post_attention_layernorm.weight", "model.layers.1.post_attention_layernorm"),
])
def test_nan_weight_under_lora_da_names_the_first_module_with_a_nonfinite_output(where, module):
    model = tiny_llama(seed=1)
    _plant_nan(model, where)
    before = _finite(model_state(model))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(LoRAInitError) as err:
            initialize_lora(model, lm_batches(n=8, bs=4, labels=True), method="lora_da", progress=False)
    msg = str(err.value)
    assert f"module 'base_model.model.{module}', batch 0" in msg, msg
    assert "['weight'] have NaN/Inf" in msg, msg
    # no torch warning about converting a tensor that requires grad to a Python number
    assert not [w for w in caught if "requires_grad" in str(w.message) or "requires grad" in str(w.message)]
    assert_same_state(before, _finite(model_state(model)))


def test_nan_in_an_embedding_row_names_the_embedding_not_the_next_target():
    model = tiny_llama(seed=1)
    batches = lm_batches(n=8, bs=4, labels=True)
    with torch.no_grad():
        model.get_base_model().model.embed_tokens.weight[7] = float("nan")
    batches = [{**b, "input_ids": b["input_ids"].clone().fill_(7)} for b in batches]
    with pytest.raises(LoRAInitError, match=r"embed_tokens'.*\['weight'\] have NaN/Inf"):
        initialize_lora(model, batches, method="lora_da", progress=False)


@pytest.mark.parametrize("method", ["pissa", "milora"])
def test_batched_group_error_names_the_one_layer_with_the_nan_and_the_method_once(method):
    model = tiny_llama(seed=1)  # q_proj and o_proj of both layers are 32x32: one batched group
    _plant_nan(model, "model.layers.1.self_attn.o_proj.base_layer.weight")
    with pytest.raises(LoRAInitError) as err:
        initialize_lora(model, method=method, progress=False)
    msg = str(err.value)
    assert msg.count(f"{method}:") == 1, msg
    assert "module 'base_model.model.model.layers.1.self_attn.o_proj'" in msg, msg
    assert "layers.0" not in msg and "q_proj" not in msg, msg


@pytest.mark.parametrize("name, hint", [("lora-da", "lora_da"), ("pisa", "pissa"), ("LoRA_GA", "lora_ga")])
def test_method_typo_raises_lorainit_error_with_a_suggestion(name, hint):
    model = tiny_llama()
    with pytest.raises(LoRAInitError, match=f"did you mean '{hint}'"):
        initialize_lora(model, lm_batches(n=4, bs=4), method=name, progress=False)
    with pytest.raises(ValueError):  # still a ValueError for callers that catch that
        initialize_lora(model, lm_batches(n=4, bs=4), method=name, progress=False)


def test_callback_method_typo_suggests_the_name():
    pytest.importorskip("transformers")
    from lorainit import LoRAInitCallback

    with pytest.raises(LoRAInitError, match="did you mean 'lora_da'"):
        LoRAInitCallback(method="lora_dq")
