"""The statistics pass against a float64 brute force (summed loss, masks, shared inputs, Conv1D)."""
import pytest
import torch

from lorainit.context import InitContext
from lorainit.targets import find_targets

from helpers import (brute_stats, lm_batches, mlp_batches, mlp_loss, rel, tiny_gpt2, tiny_llama, tiny_mlp)


def _ctx(model, batches, loss_fn=None):
    return InitContext(model, find_targets(model), batches, loss_fn=loss_fn, num_samples=None, progress=False)


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("mask_mode", ["attention", "labels"])
def test_stats_match_float64_brute_force(build, mask_mode):
    model = build(seed=3)
    batches = lm_batches(n=12, bs=4, seed=5, labels=(mask_mode == "labels"))
    ref = brute_stats(model, batches, mask_mode=mask_mode)
    # fp64 model: the pass itself is exact up to transformers' loss, which upcasts logits with .float()
    # (fp32 even for an fp64 model), so G and s carry fp32 rounding; Z is exact.
    m64 = model.double()
    stats = _ctx(m64, batches).collect_stats(dtype=torch.float64, token_mask=mask_mode)
    assert set(stats) == set(ref)
    for name, st in stats.items():
        r = ref[name]
        assert st.count == r["count"]
        for key in ("Z", "G", "s"):
            err = rel(getattr(st, key), r[key])
            assert err < (1e-12 if key == "Z" else 1e-6), (name, key, err)
    # fp32 model, fp32 accumulation: within fp32 accuracy of the float64 truth
    m32 = model.float()
    stats32 = _ctx(m32, batches).collect_stats(token_mask=mask_mode)
    for name, st in stats32.items():
        for key in ("Z", "G", "s"):
            assert rel(getattr(st, key), ref[name][key]) < 1e-4, (name, key)


def test_mlp_user_loss_fn_and_weight_grads():
    model = tiny_mlp(seed=2)
    batches = mlp_batches(n=40, bs=8)
    ref = brute_stats(model, batches, kind="mlp", loss_fn=mlp_loss)
    ctx = _ctx(model, batches, loss_fn=mlp_loss)
    stats = ctx.collect_stats()
    for name, st in stats.items():
        assert st.count == 40
        for key in ("Z", "G", "s"):
            assert rel(getattr(st, key), ref[name][key]) < 1e-5, (name, key)
    # every token is valid here, so the full weight gradient / T equals G
    grads, T = ctx.collect_weight_grads()
    assert T == 40
    for name in stats:
        assert rel(grads[name], ref[name]["G"]) < 1e-5
    assert all(p.grad is None for p in model.parameters())


def test_shared_inputs_detected_and_batch_size_invariance():
    model = tiny_llama(seed=4)
    batches = lm_batches(n=12, bs=4, seed=2)
    ctx = _ctx(model, batches)
    stats = ctx.collect_stats()
    owner = {n.split(".")[-2] + "." + n.split(".")[-1]: st.z_owner.split(".")[-1] for n, st in stats.items()
             if ".layers.0." in n}
    assert owner["self_attn.k_proj"] == "q_proj" and owner["self_attn.v_proj"] == "q_proj"
    assert owner["mlp.up_proj"] == "gate_proj" and owner["mlp.down_proj"] == "down_proj"
    assert owner["self_attn.o_proj"] == "o_proj"
    # the same examples in batches of 2 and of 6 give the same statistics (summed-loss convention)
    flat = [{k: v[i:i + 1] for k, v in b.items()} for b in batches for i in range(4)]
    def rebatch(bs):
        return [{k: torch.cat([f[k] for f in flat[i:i + bs]]) for k in flat[0]} for i in range(0, len(flat), bs)]
    s2 = _ctx(model, rebatch(2)).collect_stats()
    s6 = _ctx(model, rebatch(6)).collect_stats()
    for name in stats:
        for key in ("Z", "G", "s"):
            assert rel(getattr(s2[name], key), getattr(s6[name], key)) < 1e-5


def test_pass_touches_no_grad_and_restores_state():
    from helpers import assert_same_state, model_state

    model = tiny_llama(seed=1)
    model.train()
    before = model_state(model)
    _ctx(model, lm_batches(n=8, bs=4)).collect_stats()
    assert_same_state(before, model_state(model))
