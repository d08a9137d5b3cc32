"""initialize_lora(..., stats_cache=PATH): statistics saved once, reused bitwise, refused when they do not match."""
import json
import os
import warnings

import pytest
import torch
from helpers import assert_same_state, lm_batches, model_state, tiny_llama

from lorainit import LoRADAConfig, LoRAInitError, LoRAInitWarning, initialize_lora
from lorainit.cache import store as cache
from lorainit.targets import find_targets

pytestmark = [pytest.mark.filterwarnings("ignore:lora_da. n_train fell back:lorainit.LoRAInitWarning"),
              pytest.mark.filterwarnings("ignore:LoRADAConfig.max_memory=:RuntimeWarning")]

BUDGET = 4 * (32 * 32 + 3 * (64 * 32 + 64))  # about one MLP block's statistics: several passes


def _factors(model):
    return {n: (t.lora_A.detach().clone(), t.lora_B.detach().clone()) for n, t in find_targets(model).items()}


def _assert_equal(f1, f2):
    assert f1.keys() == f2.keys()
    for name in f1:
        assert torch.equal(f1[name][0], f2[name][0]) and torch.equal(f1[name][1], f2[name][1]), name


class _Calls:
    """Counts forward calls of a model's target base layers, and those with grad enabled (a statistics pass)."""

    def __init__(self, model):
        self.forward = self.with_grad = 0
        self.handles = [t.base.register_forward_hook(self._hook) for t in find_targets(model).values()]

    def _hook(self, module, inputs, output):
        self.forward += 1
        self.with_grad += int(torch.is_grad_enabled())

    def remove(self):
        for h in self.handles:
            h.remove()


def _meta(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()[cache.META_KEY]), list(f.keys())


@pytest.mark.parametrize("solver", ["eigh", "lobpcg"])
def test_second_call_reuses_the_statistics_bitwise_without_a_pass(tmp_path, solver):
    path = tmp_path / "stats.safetensors"
    batches = lm_batches(n=12, bs=4, seed=4)
    cfg = LoRADAConfig(step_scale=0.3, solver=solver)
    first = tiny_llama(seed=6)
    r1 = initialize_lora(first, batches, config=cfg, progress=False, stats_cache=path)
    assert r1.info["stats_cache"] == {"path": str(path), "hit": False, "saved": True, "files": [str(path)]}
    assert "stats_pass" in r1.timings and "stats_cache_save" in r1.timings
    plain = tiny_llama(seed=6)  # writing the cache does not change the result
    initialize_lora(plain, batches, config=cfg, progress=False)
    _assert_equal(_factors(plain), _factors(first))

    meta, keys = _meta(path)
    names = list(find_targets(first))
    assert meta["targets"] == names and meta["stats_dtype"] == "float32" and meta["token_mask"] == "attention"
    assert meta["stats_examples"] == 12 and meta["data"]["batches"] == 3 and meta["data"]["holdout"] is False
    owners = {n: meta["layers"][n]["z_owner"] for n in names}
    assert sum(o == n for n, o in owners.items()) < len(names)  # q/k/v and gate/up share one Z
    assert sorted(keys) == sorted([f"{n}/G" for n in names] + [f"{n}/s" for n in names]
                                  + [f"{n}/Z" for n in names if owners[n] == n]
                                  + [f"{n}/mu" for n in names if owners[n] == n])  # every cache holds the mean
    assert meta["extras"] == ["mean"]
    assert [meta["layers"][n]["tokens"] for n in names] == [r1.layer(n)["tokens"] for n in names]

    second = tiny_llama(seed=6)
    calls = _Calls(second)
    r2 = initialize_lora(second, batches, config=cfg, progress=False, stats_cache=path)
    calls.remove()
    assert calls.forward == 0  # no statistics pass (and no probe): the numeric step needs no forward
    assert r2.info["stats_cache"]["hit"] is True and r2.info["passes"] == 0
    assert "stats_pass" not in r2.timings and "stats_cache_load" in r2.timings
    _assert_equal(_factors(first), _factors(second))
    for n in names:  # the report says the same about each layer
        for key in ("tokens", "token_mask", "shares_input_with", "n_train"):
            assert r2.layer(n)[key] == r1.layer(n)[key], (n, key)


def test_rank_sweep_reuses_one_cache_and_auto_step_still_searches(tmp_path):
    path = tmp_path / "stats.safetensors"
    batches = lm_batches(n=16, bs=4, seed=2, labels=True)
    cfg = LoRADAConfig(step_grid=(0.01, 0.03, 0.1, 0.3))  # step_scale="auto": 1 of 4 batches held out
    ref = tiny_llama(seed=2, r=2)
    initialize_lora(ref, batches, config=cfg, progress=False)
    r1 = initialize_lora(tiny_llama(seed=2, r=4), batches, config=cfg, progress=False, stats_cache=path)
    assert _meta(path)[0]["data"]["holdout"] is True and _meta(path)[0]["data"]["batches"] == 3
    model = tiny_llama(seed=2, r=2)  # another rank: same statistics
    calls = _Calls(model)
    r2 = initialize_lora(model, batches, config=cfg, progress=False, stats_cache=path)
    calls.remove()
    assert r2.info["stats_cache"]["hit"] is True and r2.info["step_search"]["fallback"] is False
    assert r2.info["step_scale"] > 0
    assert calls.forward > 0 and calls.with_grad == 0  # the held-out forwards of the step search, no backward
    _assert_equal(_factors(ref), _factors(model))
    # a numeric step uses every sample: other statistics samples, refused with the reason
    with pytest.raises(LoRAInitError, match="step_scale='auto' and a numeric step_scale need separate caches"):
        initialize_lora(tiny_llama(seed=2), batches, config=cfg.replace(step_scale=0.3), progress=False,
                        stats_cache=path)
    assert r1.info["stats_cache"]["hit"] is False


@pytest.mark.parametrize("solver", ["eigh", "lobpcg"])
def test_memory_budget_writes_one_file_per_pass_and_reads_group_by_group(tmp_path, solver, monkeypatch):
    path = tmp_path / "stats.safetensors"
    batches = lm_batches(n=12, bs=4, seed=4)
    cfg = LoRADAConfig(step_scale=0.3, solver=solver, max_memory=BUDGET)
    first = tiny_llama(seed=6)
    r1 = initialize_lora(first, batches, config=cfg, progress=False, stats_cache=path)
    k = r1.info["passes"]
    assert k >= 3
    parts = sorted(p.name for p in tmp_path.iterdir() if p.name != path.name)
    assert parts == sorted(f"stats.pass-{i}-of-{k}.safetensors" for i in range(1, k + 1))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left
    meta, keys = _meta(path)
    assert keys == [] and meta["passes"] == k and len(meta["parts"]) == k  # the main file: metadata only

    loaded = []
    load = cache._Reader.load
    monkeypatch.setattr(cache._Reader, "load", lambda self, group, *a: loaded.append(list(group)) or load(self, group, *a))
    second = tiny_llama(seed=6)
    r2 = initialize_lora(second, batches, config=cfg, progress=False, stats_cache=path)
    assert r2.info["stats_cache"]["hit"] is True and r2.info["stats_cache"]["groups"] == k == len(loaded)
    assert sum(len(g) for g in loaded) == len(find_targets(second))
    _assert_equal(_factors(first), _factors(second))

    if solver == "eigh":  # a cache without budget read under a budget (re-planned groups) and the reverse
        whole = tmp_path / "whole.safetensors"
        initialize_lora(tiny_llama(seed=6), batches, config=cfg.replace(max_memory=None), progress=False,
                        stats_cache=whole)
        third = tiny_llama(seed=6)
        r3 = initialize_lora(third, batches, config=cfg, progress=False, stats_cache=whole)
        assert r3.info["stats_cache"]["groups"] == k
        _assert_equal(_factors(first), _factors(third))
        fourth = tiny_llama(seed=6)
        initialize_lora(fourth, batches, config=cfg.replace(max_memory=None), progress=False, stats_cache=path)
        _assert_equal(_factors(first), _factors(fourth))


def _refused(path, model, batches, cfg, match):
    before = model_state(model)
    data = path.read_bytes()
    with pytest.raises(LoRAInitError, match=match) as info:
        initialize_lora(model, batches, config=cfg, progress=False, stats_cache=path)
    assert_same_state(before, model_state(model))
    assert path.read_bytes() == data  # never overwritten
    assert "delete" in str(info.value) and str(path) in str(info.value)
    return str(info.value)


def test_a_cache_that_does_not_match_is_refused_naming_the_difference(tmp_path):
    path = tmp_path / "stats.safetensors"
    batches = lm_batches(n=8, bs=4, seed=5)
    cfg = LoRADAConfig(step_scale=0.3)
    initialize_lora(tiny_llama(seed=1), batches, config=cfg, progress=False, stats_cache=path)

    msg = _refused(path, tiny_llama(seed=2), batches, cfg, "another model")
    assert "q_proj.weight" in msg  # names a parameter whose values differ

    msg = _refused(path, tiny_llama(seed=1, layers_to_transform=[0]), batches, cfg, "other targets")
    assert "the cache has 7 target(s) this call does not have" in msg and "layers.1." in msg

    _refused(path, tiny_llama(seed=1), batches, cfg.replace(stats_dtype=torch.float64), "stats dtype float32 in the cache, float64")
    _refused(path, tiny_llama(seed=1), batches, cfg.replace(token_mask="labels"), "token_mask 'attention' in the cache")
    _refused(path, tiny_llama(seed=1, dtype=torch.float64), batches, cfg, "another model")
    _refused(path, tiny_llama(seed=1), batches[:1], cfg, "2 batches / 8 examples in the cache, 1 / 4 here")
    _refused(path, tiny_llama(seed=1), lm_batches(n=8, bs=4, seed=6), cfg, "same counts, other contents")
    # the rank, the scaling and the method's options are not part of the key
    rep = initialize_lora(tiny_llama(seed=1, r=2, alpha=3), batches, config=cfg.ablation("no_bias", step_scale=0.1),
                          progress=False, stats_cache=path)
    assert rep.info["stats_cache"]["hit"] is True


def test_a_different_loss_is_refused(tmp_path):
    from helpers import MLP, mlp_batches, mlp_loss
    from peft import LoraConfig, get_peft_model

    def other_loss(model, batch):
        return mlp_loss(model, batch) * 2.0

    def mlp():
        torch.manual_seed(0)
        return get_peft_model(MLP(), LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2", "head"]))

    path = tmp_path / "mlp.safetensors"
    cfg = LoRADAConfig(step_scale=0.2, n_train=100.0)
    batches = mlp_batches(n=32, bs=8)
    initialize_lora(mlp(), batches, config=cfg, loss_fn=mlp_loss, progress=False, stats_cache=path)
    with pytest.raises(LoRAInitError, match="another loss: helpers.mlp_loss"):
        initialize_lora(mlp(), batches, config=cfg, loss_fn=other_loss, progress=False, stats_cache=path)
    rep = initialize_lora(mlp(), batches, config=cfg, loss_fn=mlp_loss, progress=False, stats_cache=path)
    assert rep.info["stats_cache"]["hit"] is True


def test_embedding_targets_cache_their_diagonal_z(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    def model():
        torch.manual_seed(3)
        cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        return get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, lora_alpha=8,
                                                                target_modules=["embed_tokens", "q_proj"]))

    path = tmp_path / "emb.safetensors"
    batches = lm_batches(n=8, bs=4, seed=7)
    cfg = LoRADAConfig(step_scale=0.3)
    first, second = model(), model()
    initialize_lora(first, batches, config=cfg, progress=False, stats_cache=path)
    from safetensors import safe_open

    name = next(n for n, t in find_targets(first).items() if t.kind == "embedding")
    with safe_open(str(path), framework="pt") as f:
        assert tuple(f.get_slice(f"{name}/Z").get_shape()) == (97,)  # token frequencies, not 97 x 97
    rep = initialize_lora(second, batches, config=cfg, progress=False, stats_cache=path)
    assert rep.info["stats_cache"]["hit"] is True
    _assert_equal(_factors(first), _factors(second))


def test_corrupt_or_foreign_files_give_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    batches = lm_batches(n=8, bs=4, seed=5)
    cfg = LoRADAConfig(step_scale=0.3)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    _refused(garbage, tiny_llama(seed=1), batches, cfg, "cannot be read as a safetensors file")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(3)}, str(foreign))
    _refused(foreign, tiny_llama(seed=1), batches, cfg, "not a lorainit statistics cache")

    good = tmp_path / "stats.safetensors"
    initialize_lora(tiny_llama(seed=1), batches, config=cfg, progress=False, stats_cache=good)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    _refused(truncated, tiny_llama(seed=1), batches, cfg, "cannot be read|corrupt")

    parts = tmp_path / "parts.safetensors"
    budget = cfg.replace(max_memory=BUDGET)
    initialize_lora(tiny_llama(seed=1), batches, config=budget, progress=False, stats_cache=parts)
    (tmp_path / "parts.pass-2-of-8.safetensors").unlink()
    _refused(parts, tiny_llama(seed=1), batches, budget, "per-pass file .*parts.pass-2-of-8.safetensors' is missing")

    for bad in (tmp_path, tmp_path / "no" / "such" / "dir.safetensors", 3):
        with pytest.raises(LoRAInitError, match="stats_cache"):
            initialize_lora(tiny_llama(seed=1), batches, config=cfg, progress=False, stats_cache=bad)


def test_failed_write_or_failed_call_leaves_no_cache_and_the_model_untouched(tmp_path, monkeypatch):
    import lorainit.methods.lora_da as lora_da_module

    batches = lm_batches(n=8, bs=4, seed=5)
    cfg = LoRADAConfig(step_scale=0.3, max_memory=BUDGET)
    path = tmp_path / "stats.safetensors"
    write = cache._write_safetensors
    count = {"n": 0}

    def failing_write(target, tensors, metadata):
        count["n"] += 1
        if count["n"] == 3:
            raise OSError(28, "No space left on device")
        write(target, tensors, metadata)

    model = tiny_llama(seed=1)
    before = model_state(model)
    monkeypatch.setattr(cache, "_write_safetensors", failing_write)
    with pytest.raises(LoRAInitError, match="writing .*stats.pass-3-of-8.safetensors' failed .*No space left"):
        initialize_lora(model, batches, config=cfg, progress=False, stats_cache=path)
    assert_same_state(before, model_state(model))
    assert list(tmp_path.iterdir()) == []  # the two passes already written were removed
    monkeypatch.setattr(cache, "_write_safetensors", write)

    solve = lora_da_module._solve_part
    seen = {"n": 0}

    def failing_solve(ctx, config, part, owners, results, *rest):
        seen["n"] += 1
        if seen["n"] == 4:
            raise RuntimeError("solver failed")
        solve(ctx, config, part, owners, results, *rest)

    monkeypatch.setattr(lora_da_module, "_solve_part", failing_solve)
    with pytest.raises(RuntimeError, match="solver failed"):
        initialize_lora(model, batches, config=cfg, progress=False, stats_cache=path)
    assert_same_state(before, model_state(model))
    assert list(tmp_path.iterdir()) == []


def test_methods_without_statistics_warn_that_the_cache_is_unused(tmp_path):
    path = tmp_path / "stats.safetensors"
    with pytest.warns(LoRAInitWarning, match="stats_cache=.* is unused: method 'pissa' computes no K-FAC"):
        rep = initialize_lora(tiny_llama(seed=1), None, method="pissa", progress=False, stats_cache=path)
    assert rep.info["stats_cache"] == {"path": str(path), "used": False}
    assert not path.exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error", LoRAInitWarning)
        initialize_lora(tiny_llama(seed=1), None, method="pissa", progress=False)  # no cache: no warning


def test_cli_stats_cache_flag(tmp_path):
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorainit.cli import main

    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                 pad_token_id=0, bos_token_id=1, eos_token_id=2)).save_pretrained(model_dir)
    g = torch.Generator().manual_seed(0)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"input_ids": torch.randint(3, 50, (10,), generator=g).tolist()}) + "\n"
                            for _ in range(12)))
    stats = tmp_path / "stats.safetensors"
    outs = []
    for i in range(2):
        out = tmp_path / f"adapter{i}"
        assert main(["init", "--model", str(model_dir), "--data", str(data), "--rank", "2", "--target-modules",
                     "q_proj,v_proj", "--num-samples", "12", "--batch-size", "4", "--set", "step_scale=0.3",
                     "--stats-cache", str(stats), "--out", str(out), "--quiet"]) == 0
        report = json.loads((out / "lorainit_report.json").read_text())
        assert report["info"]["stats_cache"]["hit"] is (i == 1)
        outs.append(load_file(out / "adapter_model.safetensors"))
    assert outs[0].keys() == outs[1].keys()
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
    assert os.path.isfile(stats)


def _dist_worker(rank, world, port, out_dir):
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        path = os.path.join(out_dir, "stats.safetensors")
        cfg = LoRADAConfig(step_scale=0.3, n_train=2000.0, solver="eigh")
        mine = lm_batches(n=16, bs=4, seed=2)[rank::world]
        out = {}
        for call in ("miss", "hit"):
            model = tiny_llama(seed=11)
            rep = initialize_lora(model, mine, config=cfg, num_samples=None, progress=False, stats_cache=path)
            out[call] = {"factors": _factors(model), "cache": rep.info["stats_cache"], "passes": rep.info["passes"],
                         "tokens": [r["tokens"] for r in rep.layers]}
        try:  # another rank split of the same batches: other per-rank samples, refused on every rank
            initialize_lora(tiny_llama(seed=11), lm_batches(n=16, bs=4, seed=2)[(1 - rank)::world][::-1],
                            config=cfg, num_samples=None, progress=False, stats_cache=path)
            out["refused"] = None
        except LoRAInitError as err:
            out["refused"] = str(err)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_processes_write_on_rank_0_and_read_on_every_rank(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_dist_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    single = tiny_llama(seed=11)
    initialize_lora(single, lm_batches(n=16, bs=4, seed=2), config=LoRADAConfig(step_scale=0.3, n_train=2000.0,
                                                                                  solver="eigh"), progress=False)
    for r in res:
        assert r["miss"]["cache"]["hit"] is False and r["hit"]["cache"]["hit"] is True and r["hit"]["passes"] == 0
        assert r["hit"]["tokens"] == r["miss"]["tokens"]
        _assert_equal(r["miss"]["factors"], r["hit"]["factors"])
        for name, (A, B) in _factors(single).items():  # the union of the ranks' samples, as one process
            assert torch.allclose(r["hit"]["factors"][name][1] @ r["hit"]["factors"][name][0], B @ A, atol=1e-5)
        assert "other statistics samples" in r["refused"]
    _assert_equal(res[0]["hit"]["factors"], res[1]["hit"]["factors"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0.pt", "rank1.pt", "stats.safetensors"]
