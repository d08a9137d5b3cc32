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


# ---- forward-only passes end each batch's forward once every target has run ---------------------------------
def _forward_only(model, batches, early: bool, monkeypatch, **kw):
    from lorainit.passes import stats as stats_mod

    if not early:
        monkeypatch.setattr(stats_mod.StatsCollector, "enable_early_stop", lambda self: False)
    try:
        return _ctx(model, batches).collect_stats(grads=False, **kw)
    finally:
        monkeypatch.undo()


def _lm_head_calls(model, batches, monkeypatch):
    calls = []
    head = model.get_output_embeddings()
    h = head.register_forward_hook(lambda *a: calls.append(1))
    try:
        _forward_only(model, batches, True, monkeypatch)
    finally:
        h.remove()
    return len(calls)


@pytest.mark.parametrize("layers", [None, [0]], ids=["all layers", "lowest layer only"])
def test_forward_only_pass_stops_after_the_last_target_with_the_same_statistics(layers, monkeypatch):
    """Batches after the first end their forward once every target has run (no LM head, no loss): the
    statistics, outputs (extras) included, are bitwise those of the whole forward."""
    kw = {} if layers is None else {"layers_to_transform": layers, "layers_pattern": "layers"}
    model = tiny_llama(seed=8, **kw)
    batches = lm_batches(n=16, bs=4, seed=9)
    full = _forward_only(model, batches, False, monkeypatch, extras=("mean", "output_cov"))
    early = _forward_only(model, batches, True, monkeypatch, extras=("mean", "output_cov"))
    assert set(full) == set(early) and full
    for name in full:
        for key in ("Z", "mu", "Y"):
            a, b = getattr(full[name], key), getattr(early[name], key)
            assert (a is None and b is None) or torch.equal(a, b), (name, key)
        assert full[name].count == early[name].count
    # only the first of the 4 batches reached the LM head
    assert _lm_head_calls(model, batches, monkeypatch) == 1


def test_forward_only_pass_early_stop_on_an_encoder_decoder_model(monkeypatch):
    from peft import LoraConfig, get_peft_model
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=2, decoder_start_token_id=0,
                   pad_token_id=0)
    model = get_peft_model(T5ForConditionalGeneration(cfg), LoraConfig(r=2, lora_alpha=4, target_modules=["q", "k", "wi"]))
    g = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(3):
        ids = torch.randint(3, 64, (3, 7), generator=g)
        am = torch.ones_like(ids)
        am[1, 4:] = 0
        labels = torch.randint(3, 64, (3, 5), generator=g)
        labels[2, 3:] = -100
        batches.append({"input_ids": ids, "attention_mask": am, "labels": labels})
    full = _forward_only(model, batches, False, monkeypatch)
    early = _forward_only(model, batches, True, monkeypatch)
    assert set(full) == set(early) and any(".decoder." in n for n in full)
    for name in full:
        assert torch.equal(full[name].Z, early[name].Z) and full[name].count == early[name].count, name


def test_forward_only_pass_keeps_the_whole_forward_when_a_target_runs_twice(monkeypatch):
    """A module called twice per forward: 'every target ran' would not mean 'all its calls are done'."""
    from lorainit.passes.stats import StatsCollector

    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(6, 6)
            self.head = torch.nn.Linear(6, 3)

        def forward(self, x, y=None):
            return self.head(torch.tanh(self.a(torch.tanh(self.a(x)))))

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(Twice(), LoraConfig(r=2, lora_alpha=4, target_modules=["a"]))
    g = torch.Generator().manual_seed(1)
    batches = [{"x": torch.randn(4, 6, generator=g), "y": torch.randn(4, 3, generator=g)} for _ in range(3)]

    def loss_fn(m, b):
        return ((m(b["x"]) - b["y"]) ** 2).sum()

    enabled = []
    real = StatsCollector.enable_early_stop
    monkeypatch.setattr(StatsCollector, "enable_early_stop", lambda self: enabled.append(real(self)) or enabled[-1])
    stats = InitContext(model, find_targets(model), batches, loss_fn=loss_fn, num_samples=None,
                        progress=False).collect_stats(grads=False)
    assert enabled == [False] and stats
    (st,) = stats.values()
    assert st.count == 3 * 4 * 2  # both calls of every batch


def test_forward_only_pass_names_a_nonfinite_target_input_after_the_stop(monkeypatch):
    """A stopped forward has no loss to check: a NaN reaching a target's input in a later batch is named."""
    from lorainit.targets import LoRAInitError

    model = tiny_llama(seed=2)
    batches = lm_batches(n=12, bs=4, seed=3)
    emb = model.get_input_embeddings()
    state = {"n": 0}

    def poison(module, args, out):
        state["n"] += 1
        return out * float("nan") if state["n"] == 2 else out

    h = emb.register_forward_hook(poison)
    try:
        with pytest.raises(LoRAInitError, match=r"batch 1: its input has NaN/Inf activations"):
            _ctx(model, batches).collect_stats(grads=False)
    finally:
        h.remove()


def test_forward_only_pass_keeps_the_whole_forward_with_accelerate_hooks(monkeypatch):
    """accelerate's device hooks offload a module's weights after its forward: a forward ended from a
    hook would skip that, so such models keep the whole forward."""
    from lorainit.passes.stats import _stoppable

    model = tiny_llama(seed=1)
    assert _stoppable(model)
    layer = model.get_base_model().model.layers[0]
    layer._hf_hook = object()
    try:
        assert not _stoppable(model)
        assert _lm_head_calls(model, lm_batches(n=8, bs=4, seed=2), monkeypatch) == 2  # every batch ran whole
    finally:
        del layer._hf_hook
    assert not _stoppable(torch.nn.DataParallel(torch.nn.Linear(2, 2)))


def test_forward_only_pass_stopped_batch_without_loss_tokens_is_the_same_error(monkeypatch):
    """A stopped forward computes no loss: a later batch without loss tokens must still fail as it does when
    the loss is computed, naming the batch. (Batches whose labels are all -100 are skipped before the pass,
    with a warning; rows of one token leave a causal LM no shifted label, which only the loss notices.)"""
    from lorainit.targets import LoRAInitError

    model = tiny_llama(seed=2)
    batches = lm_batches(n=12, bs=4, seed=3)
    am = torch.zeros_like(batches[1]["attention_mask"])
    am[:, 0] = 1
    batches[1] = {**batches[1], "attention_mask": am}
    for early in (True, False):
        with pytest.raises(LoRAInitError, match=r"batch 1 has no loss tokens.*rows of one token"):
            _forward_only(model, batches, early, monkeypatch)
