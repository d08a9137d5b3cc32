"""Memory: the rollback snapshot on the CPU, statistics in train mode (gradient checkpointing), the memory
model and budget (``lorainit.memory``), the statistics cache."""
from __future__ import annotations

import torch
import pytest

from lorainit import LoRADAConfig, initialize_lora
from lorainit.context import InitContext
from lorainit.targets import find_targets

from helpers import lm_batches, tiny_llama


def _stats(model, batches, **kw):
    ctx = InitContext(model, find_targets(model), batches, num_samples=None, progress=False)
    return ctx.collect_stats(**kw)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_keeps_running_and_gives_identical_statistics(reentrant):
    batches = lm_batches(n=8, bs=4)
    ref = _stats(tiny_llama(seed=3), batches)
    model = tiny_llama(seed=3)
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    calls = []
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert layers
    for layer in layers:  # count the checkpointed forwards
        def spy(*a, _f=layer._gradient_checkpointing_func, **k):
            calls.append(1)
            return _f(*a, **k)
        layer._gradient_checkpointing_func = spy
    got = _stats(model, batches)
    assert len(calls) == len(layers) * len(batches)  # the checkpointed forward ran during the pass
    assert model.training and all(m.training for m in model.modules())  # the user's mode is back
    for name, st in ref.items():
        o = got[name]
        assert o.count == st.count
        for a, b in ((o.Z, st.Z), (o.G, st.G), (o.s, st.s)):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), name


def test_snapshot_of_base_weights_is_on_the_cpu_and_restores():
    from lorainit.adapters import ModelSnapshot

    model = tiny_llama(seed=1)
    targets = find_targets(model)
    snap = ModelSnapshot(model, targets)
    t = next(iter(targets.values()))
    before = t.weight.detach().clone()
    snap.save_base(t)
    assert snap.base[t.name].device.type == "cpu"
    assert snap.base[t.name].data_ptr() != t.weight.data_ptr()
    with torch.no_grad():
        t.weight.add_(1.0)
    snap.restore()
    assert torch.equal(t.weight, before)


def test_residual_base_state_dict_has_plain_names_and_no_copies():
    from lorainit.adapters import residual_base_state_dict

    model = tiny_llama(seed=1)
    sd = residual_base_state_dict(model)
    assert not any("lora_" in k or "base_layer" in k for k in sd)
    plain = {k for k in model.get_base_model().state_dict() if "lora_" not in k}
    assert {k.replace(".base_layer", "") for k in plain} == set(sd)
    w = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    assert sd["model.layers.0.self_attn.q_proj.weight"].data_ptr() == w.data_ptr()


def test_plan_and_estimate_memory():
    from lorainit import estimate_memory
    from lorainit.memory import solve_bytes, structural_sharing
    from lorainit.passes.stats import stats_bytes
    from lorainit.targets import LoRAInitError

    model = tiny_llama(seed=1)
    targets = find_targets(model)
    shared = structural_sharing(targets)
    assert shared[[n for n in targets if n.endswith("layers.0.self_attn.v_proj")][0]].endswith("layers.0.self_attn.q_proj")
    full = estimate_memory(model, "lora_da")
    assert full.passes == 1
    total = sum(stats_bytes(t, with_z=(shared[n] == n)) for n, t in targets.items())
    assert full.stats_bytes == total
    readers = {o: list(shared.values()).count(o) for o in shared.values()}
    assert full.peak_bytes == total + max(solve_bytes(t, shares_input=readers[shared[n]] > 1) for n, t in targets.items())
    half = estimate_memory(model, "lora_da", LoRADAConfig(max_memory=full.smallest_budget))
    assert half.passes > 1 and half.peak_bytes <= full.smallest_budget < full.peak_bytes
    assert all(g for g in half.groups) and sum(map(len, half.groups)) == len(targets)
    with pytest.raises(LoRAInitError, match=f"smallest budget that works for method 'lora_da' is {full.smallest_budget}"):
        estimate_memory(model, "lora_da", LoRADAConfig(max_memory=full.smallest_budget - 1))
    assert "passes: 1" in str(full)


def test_budgets_give_identical_adapters_with_the_default_solver():
    # the default solver with LOBPCG forced on a tiny model: seeds from layer names make the chunks irrelevant
    batches = lm_batches(n=8, bs=4, seed=4)
    outs = []
    base = LoRADAConfig(step_scale=0.3, solver="lobpcg")
    full, smallest = estimate_memory_for(base)
    for budget in (None, (full + smallest) // 2, smallest):
        model = tiny_llama(seed=6, r=2)
        rep = initialize_lora(model, batches, config=base.replace(max_memory=budget), progress=False)
        outs.append((rep.info["passes"], {n: (t.lora_A.detach().clone(), t.lora_B.detach().clone())
                                          for n, t in find_targets(model).items()}))
    assert outs[0][0] == 1 and outs[2][0] > 1
    for _, f in outs[1:]:
        for name, (A, B) in outs[0][1].items():
            assert torch.equal(A, f[name][0]) and torch.equal(B, f[name][1]), name


def estimate_memory_for(config):
    from lorainit import estimate_memory

    plan = estimate_memory(tiny_llama(seed=6, r=2), "lora_da", config)
    return plan.peak_bytes, plan.smallest_budget


def test_a_shared_Z_is_factored_once_for_all_its_layers(monkeypatch):
    """q/k/v (GQA: q and k/v of different m) and gate/up: one in-place factorization per input, reused by
    every layer that reads it (o and down, which read their input alone, are factored inside their own
    solve call); the adapters equal the separate (copying) solves of each layer."""
    import lorainit.methods.lora_da as lora_da
    import lorainit_kernels as lk
    from lorainit.context import InitContext

    calls = []
    real = lora_da.lkg.factor_input_cov

    def spy(Z, **kw):
        calls.append((tuple(Z.shape), kw["uses"], kw["overwrite"]))
        return real(Z, **kw)

    monkeypatch.setattr(lora_da.lkg, "factor_input_cov", spy)
    batches = lm_batches(n=8, bs=4, seed=5)
    m0 = tiny_llama(seed=2)
    stats = InitContext(m0, find_targets(m0), batches, num_samples=None, progress=False).collect_stats()
    model = tiny_llama(seed=2)
    cfg = LoRADAConfig(step_scale=0.5, n_train=1000.0, solver="eigh")
    rep = initialize_lora(model, batches, config=cfg, num_samples=None, progress=False)
    targets = find_targets(model)
    inputs = {st.z_owner for st in stats.values()}
    assert len(inputs) == 4 * 2                        # q/k/v, o, gate/up, down per decoder layer
    assert sorted(u for _, u, _ in calls) == sorted([3, 2] * 2) and all(o for _, _, o in calls)
    assert sum(1 for r in rep.layers if r.get("shares_input_with")) == 3 * 2
    for name, t in targets.items():
        st = stats[name]
        f, _ = lk.methods.lora_da(st.Z, st.G[None], st.s[None], t.r, n_train=1000.0, scaling=t.scaling, step_scale=0.5,
                                  solver="eigh")
        upd, ref = t.lora_B @ t.lora_A, f.lora_B[0] @ f.lora_A[0]
        assert ((upd - ref).norm() / ref.norm()) < 1e-5, name
