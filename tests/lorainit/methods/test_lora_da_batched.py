"""LoRA-DA's batched solve (``LoRADAConfig.solve_batch``): layers of one shape that read their input alone
accumulate into one statistics stack and are solved in one batched LOBPCG call, without a copy, with the
same adapters bit for bit as one layer at a time or under a memory budget."""
import pytest
import torch

from lorainit import LoRADAConfig, estimate_memory, initialize_lora
from lorainit.memory import batched_solve_bytes, plan_lora_da, solve_bytes, solve_stacks, structural_sharing
from lorainit.passes.stats import StatsCollector
from lorainit.targets import find_targets

from helpers import lm_batches, tiny_llama


def _init(**kw):
    model = tiny_llama(seed=3)
    cfg = LoRADAConfig(**{"solver": "lobpcg", "step_scale": 0.5, "n_train": 500.0, **kw})
    rep = initialize_lora(model, lm_batches(n=12, bs=4, seed=2), config=cfg, progress=False)
    return {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}, rep


def test_batched_solves_give_the_same_adapters_bit_for_bit():
    batched, rep = _init()
    alone, rep1 = _init(solve_batch=1)
    budget, _ = _init(max_memory=150_000)   # several passes, one layer at a time
    assert batched.keys() == alone.keys() == budget.keys()
    for k in batched:
        assert torch.equal(batched[k], alone[k]) and torch.equal(batched[k], budget[k]), k
    width = {row["name"].split("layers.")[1]: row["batched_with"] for row in rep.layers}
    # o_proj and down_proj read their inputs alone: one stack each over the two decoder layers
    assert width == {f"{i}.{p}": (2 if p in ("self_attn.o_proj", "mlp.down_proj") else 1)
                     for i in (0, 1) for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                               "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert all(row["batched_with"] == 1 for row in rep1.layers)
    assert all(row["converged"] for row in rep.layers)


def test_eigh_layers_are_not_batched():
    _, rep = _init(solver="eigh")
    assert all(row["batched_with"] == 1 and row["solver"] == "eigh" for row in rep.layers)


def test_the_statistics_of_a_stack_are_slices_of_one_tensor():
    model = tiny_llama(seed=3)
    targets = find_targets(model)
    names = list(targets)
    col = StatsCollector(targets, names, model=model, stack_size=8)
    col.owner = {n: n for n in names}
    for shared in ("k_proj", "v_proj"):  # k and v read q's input
        for n in names:
            if n.endswith(shared):
                col.owner[n] = n.replace(shared, "q_proj")
    bufs = col._stacked_buffers()
    assert sorted(n.split("layers.")[1] for n in bufs) == ["0.mlp.down_proj", "0.mlp.gate_proj", "0.mlp.up_proj",
                                                            "0.self_attn.o_proj", "1.mlp.down_proj", "1.mlp.gate_proj",
                                                            "1.mlp.up_proj", "1.self_attn.o_proj"]
    o0, o1 = (bufs[n] for n in names if n.endswith("o_proj"))
    for a, b in zip(o0, o1):
        assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
        assert b.storage_offset() == a.storage_offset() + a.numel()
    assert StatsCollector(targets, names, model=model, stack_size=1)._stacked_buffers() == {}


def test_the_plan_counts_the_batched_solves_and_only_without_a_budget():
    model = tiny_llama(seed=3, r=2)
    targets = find_targets(model)
    names = list(targets)
    sharing = structural_sharing(targets)
    stacks = solve_stacks(targets, names, sharing, 8)
    assert sorted(len(s) for s in stacks) == [2, 2] and all(len({targets[n].n for n in s}) == 1 for s in stacks)
    assert solve_stacks(targets, names, sharing, 1) == []
    down = targets[next(n for n in names if n.endswith("down_proj"))]
    assert batched_solve_bytes(down, 2, "lobpcg") - solve_bytes(down, "lobpcg") == \
        4 * (80 * down.n * down.r + down.r * (down.m + down.n + 1) + 3 * down.m)
    one = plan_lora_da(targets, names, sharing, None, solver="lobpcg", solve_batch=1)
    many = plan_lora_da(targets, names, sharing, None, solver="lobpcg", solve_batch=8)
    assert many.peak_bytes >= one.peak_bytes and many.stats_bytes == one.stats_bytes
    assert plan_lora_da(targets, names, sharing, 10 ** 9, solver="lobpcg", solve_batch=8).peak_bytes == \
        plan_lora_da(targets, names, sharing, 10 ** 9, solver="lobpcg", solve_batch=1).peak_bytes
    assert estimate_memory(model, "lora_da", LoRADAConfig(solver="lobpcg")).peak_bytes >= \
        estimate_memory(model, "lora_da", LoRADAConfig(solver="lobpcg", solve_batch=1)).peak_bytes


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "8"])
def test_a_bad_solve_batch_is_named(bad):
    with pytest.raises((ValueError, TypeError), match="solve_batch"):
        LoRADAConfig(solve_batch=bad)
