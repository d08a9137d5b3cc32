"""FSDP2 (``fully_shard`` per decoder layer and on the root), 2 gloo processes on CPU, one spawned run.

Every check that needs the process group runs in one ``mp.spawn`` (CI time); the tests below read
what each rank saved and compare it with one process on the union of the ranks' data:

* lora_da, pissa, lora_ga, lora_one, hrp, corda, astra on an FSDP2 tiny Llama: ``scaling * B @ A`` and the base
  weights equal the one-process union result (1e-4 relative); both ranks hold the same values;
* a training step runs afterwards (the model is still an FSDP2 model: DTensor parameters);
* a NaN planted in rank 1's data only: both ranks raise ``LoRAInitError`` naming rank 1 and the
  module, within seconds, and both models are unchanged;
* a target that runs on rank 0 only gets zero statistics on rank 1 and the union result;
* the Trainer recipe (initialize the unsharded model on every rank, then ``fully_shard``) gives the
  union result and trains;
* bucketed all-reduce: 3 dtypes x 10 tensors are 3 collectives.
"""
import copy
import os
import sys
import time
import warnings

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from helpers import free_port

HERE = os.path.dirname(os.path.abspath(__file__))
WORLD = 2
METHODS = ("lora_da", "pissa", "lora_ga", "lora_one", "hrp", "corda", "astra")
HRP_STEPS = 4


def _config(method):
    from lorainit.methods.astra import AstraConfig
    from lorainit.methods.baselines import LoRAGAConfig, LoRAOneConfig, PiSSAConfig
    from lorainit.methods.corda import CorDAConfig
    from lorainit.methods.hrp import HRPConfig
    from lorainit.methods.lora_da import LoRADAConfig

    return {
        "lora_da": LoRADAConfig(n_train=2000.0, stats_dtype=torch.float64, solver="eigh", step_scale=0.4),
        "pissa": PiSSAConfig(),
        "lora_ga": LoRAGAConfig(),
        "lora_one": LoRAOneConfig(),
        "hrp": HRPConfig(rank=8, steps=HRP_STEPS, lr=1e-2),
        "corda": CorDAConfig(),
        "astra": AstraConfig(solver="eigh"),
    }[method]


def _shard(model):
    from torch.distributed.fsdp import fully_shard

    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


class BranchMLP(nn.Module):
    """fc1 -> fc2 -> head, plus ``extra`` (on its own input) only for batches that ask for it."""

    def __init__(self, d_in=12, hidden=24, d_out=5):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.extra = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, d_out)

    def forward(self, x, use_extra=False):
        h = torch.tanh(self.fc2(torch.tanh(self.fc1(x))))
        if use_extra:
            h = h + self.extra(torch.sin(h))
        return self.head(h)


def branch_mlp(seed=0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(BranchMLP(), LoraConfig(r=3, lora_alpha=6, target_modules=["fc1", "fc2", "extra", "head"]))


def branch_loss(model, batch):
    x, y, use_extra = batch
    return F.cross_entropy(model(x, use_extra=use_extra), y, reduction="sum")


def branch_batches(rank, n=16, bs=4):
    g = torch.Generator().manual_seed(100 + rank)
    x, y = torch.randn(n, 12, generator=g), torch.randint(0, 5, (n,), generator=g)
    return [(x[i:i + bs], y[i:i + bs], rank == 0) for i in range(0, n, bs)]


def _full_state(model):
    """Products sigma B A and base weights of every target, as full tensors (collective on every rank)."""
    from lorainit.distributed import full
    from lorainit.targets import find_targets

    out = {}
    for name, t in find_targets(model).items():
        A, B = full(t.lora_A.detach()), full(t.lora_B.detach())
        out[name] = (t.scaling * B.double() @ A.double(), t.read_weight().double().clone())
    return out


def _local_state(model):
    """Everything an error must leave untouched, per rank: local shards, flags, grads, modes, hooks."""
    from lorainit.distributed import local

    return {
        "values": {n: local(p.detach()).clone() for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grads": {n: p.grad is None for n, p in model.named_parameters()},
        "modes": [m.training for m in model.modules()],
        "hooks": [tuple(getattr(m, a, {}).keys()) for m in model.modules()
                  for a in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks")],
        "types": {n: type(p).__name__ for n, p in model.named_parameters()},
    }


def _same(a, b):
    return a.keys() == b.keys() and all(
        (torch.equal(a[k][n], b[k][n]) for n in a[k]) if k == "values" else a[k] == b[k] for k in a)


def _worker(rank, world, port, out_dir):
    sys.path.insert(0, HERE)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import torch.distributed as dist

    from helpers import lm_batches, tiny_llama
    from lorainit import distributed as dist_utils
    from lorainit.init import initialize_lora
    from lorainit.targets import LoRAInitError

    dist.init_process_group("gloo", rank=rank, world_size=world)
    res = {"stages": [("start", time.perf_counter())]}
    try:
        mine = lm_batches(n=16, bs=4, seed=2)[rank::world]
        for method in METHODS:
            model = _shard(tiny_llama(seed=11))
            res["stages"].append(("model " + method, time.perf_counter()))
            t0 = time.perf_counter()
            rep = initialize_lora(model, mine, method=method, config=_config(method), num_samples=None,
                                  progress=False)
            res[method] = {"state": _full_state(model), "seconds": time.perf_counter() - t0, "info": rep.info,
                           "dtensor": all(dist_utils.is_dtensor(p) for p in model.parameters())}
            res["stages"].append(("init " + method, time.perf_counter()))
            if method in ("lora_da", "pissa"):  # it keeps training as an FSDP2 model
                opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
                model.train()
                batch = dict(mine[0], labels=mine[0]["input_ids"].masked_fill(mine[0]["attention_mask"] == 0, -100))
                loss = model(**batch).loss
                loss.backward()
                opt.step()
                res[method]["train_loss"] = float(loss)
                res[method]["after_step"] = _full_state(model)
            res["stages"].append((method, time.perf_counter()))
        # the Trainer recipe: initialize the unsharded model on every rank (its own data), then shard, then train
        model = tiny_llama(seed=11)
        initialize_lora(model, mine, method="lora_da", config=_config("lora_da"), num_samples=None, progress=False)
        model = _shard(model)
        res["recipe"] = {"state": _full_state(model), "dtensor": all(dist_utils.is_dtensor(p) for p in model.parameters())}
        model.train()
        batch = dict(mine[0], labels=mine[0]["input_ids"].masked_fill(mine[0]["attention_mask"] == 0, -100))
        model(**batch).loss.backward()
        res["recipe"]["grads"] = all(p.grad is not None for p in model.parameters() if p.requires_grad)
        # a NaN in rank 1's data only
        model = _shard(tiny_llama(seed=11))
        emb = model.get_input_embeddings()
        batches = []
        for b in mine:
            with torch.no_grad():
                x = emb.weight.full_tensor()[b["input_ids"]].clone()
            if rank == 1:
                x[0, 3, 5] = float("nan")
            batches.append({"inputs_embeds": x, "attention_mask": b["attention_mask"],
                            "labels": b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)})
        before = _local_state(model)
        t0 = time.perf_counter()
        try:
            initialize_lora(model, batches, method="lora_da", config=_config("lora_da"), num_samples=None,
                            progress=False)
            res["nan"] = {"raised": None}
        except LoRAInitError as err:
            res["nan"] = {"raised": str(err)}
        res["nan"].update(seconds=time.perf_counter() - t0, unchanged=_same(before, _local_state(model)))
        res["stages"].append(("nan", time.perf_counter()))
        # a target that runs on rank 0 only
        from torch.distributed.fsdp import fully_shard

        model = fully_shard(branch_mlp())
        rep = initialize_lora(model, branch_batches(rank), method="lora_da", config=_config("lora_da"),
                              num_samples=None, loss_fn=branch_loss, progress=False)
        res["branch"] = {"state": _full_state(model), "tokens": {r["name"]: r["tokens"] for r in rep.layers}}
        res["stages"].append(("branch", time.perf_counter()))
        # bucketed all-reduce
        dist_utils.COLLECTIVES.clear()
        ts = [torch.full((k + 1,), float(rank + 1), dtype=dt) for dt in (torch.float32, torch.float64, torch.int64)
              for k in range(10)]
        dist_utils.all_reduce_sum(ts)
        res["bucket"] = {"all_reduce": dist_utils.COLLECTIVES["all_reduce"], "ok": all(bool((t == 3).all()) for t in ts)}
        # num_samples is the total over ranks
        res["share"] = [dist_utils.samples_for_rank(n, rank, world) for n in (7, 8, 1, None)]
    finally:
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    sys.path.insert(0, HERE)
    import helpers  # noqa: F401  (imported here, so that forked workers skip the imports: seconds, not tens)
    import lorainit.init  # noqa: F401
    from transformers import LlamaForCausalLM  # noqa: F401

    t0 = time.perf_counter()
    mp.start_processes(_worker, args=(WORLD, free_port(), str(out)), nprocs=WORLD, join=True, start_method="fork")
    elapsed = time.perf_counter() - t0
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)], elapsed


def _union_reference(method):
    sys.path.insert(0, HERE)
    from helpers import lm_batches, tiny_llama
    from lorainit.init import initialize_lora

    batches = lm_batches(n=16, bs=4, seed=2)
    shards = [batches[r::WORLD] for r in range(WORLD)]
    model = tiny_llama(seed=11)
    if method == "hrp":  # each preheat step: one batch per rank = one process on their union
        steps = [{k: torch.cat([s[i][k] for s in shards]) for k in shards[0][i]} for i in range(len(shards[0]))]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            initialize_lora(model, steps, method=method, config=_config(method), num_samples=None, progress=False)
    else:
        initialize_lora(model, [b for s in shards for b in s], method=method, config=_config(method),
                        num_samples=None, progress=False)
    return _full_state(model)


def _rel(a, b):
    return float((a - b).norm() / max(float(b.norm()), 1e-30))


def test_spawned_run_is_quick(fsdp_results):
    _, elapsed = fsdp_results
    assert elapsed < 60, f"the 2-process FSDP2 run took {elapsed:.1f} s"


@pytest.mark.parametrize("method", METHODS)
def test_fsdp2_equals_one_process_on_the_union(fsdp_results, method):
    ranks, _ = fsdp_results
    ref = _union_reference(method)
    for res in ranks:
        assert res[method]["dtensor"]  # still an FSDP2 model: every parameter a DTensor
        state = res[method]["state"]
        assert state.keys() == ref.keys()
        for name, (prod, W) in ref.items():
            assert _rel(state[name][0], prod) < 1e-4, (method, name, _rel(state[name][0], prod))
            assert _rel(state[name][1], W) < 1e-4, (method, name)
        if method in ("pissa", "lora_ga"):  # the base weights did change (residual)
            assert any(_rel(state[n][1], ranks[0]["lora_da"]["state"][n][1]) > 1e-3 for n in ref)


def test_trainer_recipe_init_then_shard(fsdp_results):
    """README recipe for accelerate/Trainer FSDP2: initialize_lora on the unsharded model, then shard."""
    ranks, _ = fsdp_results
    ref = _union_reference("lora_da")
    for res in ranks:
        assert res["recipe"]["dtensor"] and res["recipe"]["grads"]
        for name, (prod, W) in ref.items():
            assert _rel(res["recipe"]["state"][name][0], prod) < 1e-4, name


@pytest.mark.parametrize("method", ["lora_da", "pissa"])
def test_training_step_after_init(fsdp_results, method):
    ranks, _ = fsdp_results
    for res in ranks:
        r = res[method]
        assert torch.isfinite(torch.tensor(r["train_loss"]))
        moved = [n for n in r["state"] if _rel(r["after_step"][n][0], r["state"][n][0]) > 1e-6]
        assert moved, "the optimizer step did not move any adapter"
    a0, a1 = ranks[0][method]["after_step"], ranks[1][method]["after_step"]
    assert all(torch.equal(a0[n][0], a1[n][0]) for n in a0)  # one model, sharded: the same on both ranks


def test_nan_on_rank1_raises_on_both_ranks_and_changes_nothing(fsdp_results):
    ranks, _ = fsdp_results
    for res in ranks:
        nan = res["nan"]
        assert nan["raised"] is not None, "no LoRAInitError"
        assert "rank 1" in nan["raised"] and "layers.0.self_attn.q_proj" in nan["raised"], nan["raised"]
        assert "rank 0" not in nan["raised"]
        assert nan["seconds"] < 10
        assert nan["unchanged"]


def test_target_that_runs_on_rank0_only(fsdp_results):
    from lorainit.init import initialize_lora

    ranks, _ = fsdp_results
    model = branch_mlp()
    rep = initialize_lora(model, branch_batches(0) + branch_batches(1), method="lora_da", config=_config("lora_da"),
                          num_samples=None, loss_fn=branch_loss, progress=False)
    ref = _full_state(model)
    tokens = {r["name"]: r["tokens"] for r in rep.layers}
    for res in ranks:
        assert res["branch"]["tokens"] == tokens
        assert tokens[[n for n in tokens if n.endswith("extra")][0]] == 16 and tokens[[n for n in tokens if
                                                                                        n.endswith("fc1")][0]] == 32
        for name, (prod, W) in ref.items():
            assert _rel(res["branch"]["state"][name][0], prod) < 1e-4, name


def test_bucketed_all_reduce_and_sample_split(fsdp_results):
    ranks, _ = fsdp_results
    assert [r["bucket"]["all_reduce"] for r in ranks] == [3, 3]  # 30 tensors, 3 dtypes
    assert all(r["bucket"]["ok"] for r in ranks)
    assert ranks[0]["share"] == [4, 4, 1, None] and ranks[1]["share"] == [3, 4, 1, None]
