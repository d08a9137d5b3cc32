"""Two processes (gloo, CPU) each with half of the data give the adapters of one process on all of it."""
import os
import sys

import pytest
import torch
import torch.multiprocessing as mp

from helpers import free_port

HERE = os.path.dirname(os.path.abspath(__file__))


def _config(**kw):
    from lorainit.methods.lora_da import LoRADAConfig

    return LoRADAConfig(n_train=2000.0, stats_dtype=torch.float64, solver="eigh", **kw)


def _worker(rank, world, port, out_dir):
    sys.path.insert(0, HERE)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import torch.distributed as dist

    from helpers import lm_batches, tiny_llama
    from lorainit.init import initialize_lora
    from lorainit.targets import find_targets

    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for step_scale in STEP_SCALES:
            model = tiny_llama(seed=11)
            batches = lm_batches(n=16, bs=4, seed=2)
            mine = batches[rank::world]  # each rank its own shard
            rep = initialize_lora(model, mine, config=_config(step_scale=step_scale), num_samples=None, progress=False)
            state = {n: (t.lora_A.detach().clone(), t.lora_B.detach().clone()) for n, t in find_targets(model).items()}
            torch.save({"state": state, "info": rep.info, "tokens": [r["tokens"] for r in rep.layers]},
                       os.path.join(out_dir, f"{step_scale}-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


STEP_SCALES = (0.4, "auto")


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    return out


@pytest.mark.parametrize("step_scale", STEP_SCALES)
def test_two_processes_equal_one_process_on_the_union(two_process_results, step_scale):
    sys.path.insert(0, HERE)
    from helpers import lm_batches, rel, tiny_llama
    from lorainit.init import initialize_lora
    from lorainit.targets import find_targets

    r0 = torch.load(two_process_results / f"{step_scale}-rank0.pt", weights_only=False)
    r1 = torch.load(two_process_results / f"{step_scale}-rank1.pt", weights_only=False)
    assert r0["info"]["world_size"] == 2
    model = tiny_llama(seed=11)
    batches = lm_batches(n=16, bs=4, seed=2)
    if step_scale == "auto":
        # each rank holds out the last of its 2 batches; one process gets the same split of the union
        order = batches[0::2][:-1] + batches[1::2][:-1] + [batches[0::2][-1], batches[1::2][-1]]
        rep = initialize_lora(model, order, config=_config(step_scale="auto", holdout_fraction=0.5),
                              num_samples=None, progress=False)
        assert rep.info["stats_examples"] == r0["info"]["stats_examples"] == 8
        s1 = rep.info["step_search"]["scores"]
        s2 = r0["info"]["step_search"]["scores"]
        assert s1.keys() == s2.keys() and all(abs(s1[k] - s2[k]) < 1e-5 * abs(s1[k]) for k in s1)
        assert rep.info["step_scale"] == r0["info"]["step_scale"] == r1["info"]["step_scale"]
    else:
        rep = initialize_lora(model, batches, config=_config(step_scale=step_scale), num_samples=None, progress=False)
    assert r0["tokens"] == [r["tokens"] for r in rep.layers] == r1["tokens"]
    for name, t in find_targets(model).items():
        A, B = t.lora_A.detach(), t.lora_B.detach()
        for r in (r0, r1):  # both ranks hold the same adapters (broadcast) ...
            A2, B2 = r["state"][name]
            assert rel(A2, A) < 1e-6 and rel(B2, B) < 1e-6, name  # ... equal to one process on the union
