"""Issue 23: the printed report shows what a user needs (solver, converged, preheat rank, time shares), the JSON
loads back, and busy CPUs get a hint."""
import json
import warnings

import pytest

import lorainit.init as init_module
from lorainit import HRPConfig, InitReport, LoRADAConfig, initialize_lora
from lorainit.report import thread_hint

from helpers import mlp_batches, mlp_loss, tiny_mlp


def _header(report):
    return report.table().splitlines()[0].split()


def test_lora_da_table_has_solver_and_converged_and_no_raw_eigenvalues():
    report = initialize_lora(tiny_mlp(seed=0, r=2), mlp_batches(), loss_fn=mlp_loss, progress=False,
                             config=LoRADAConfig(step_scale=0.1, solver="eigh"))
    head = _header(report)
    assert "solver" in head and "converged" in head and "eigenvalues" not in head
    assert all("eigenvalues" in row for row in report.layers)  # still in the JSON
    body = report.table().splitlines()[2:]
    col = head.index("converged")
    assert all(line.split()[col] == "yes" for line in body)
    assert all(line.split()[head.index("solver")] == "eigh" for line in body)
    assert all(line.split()[head.index("iters")] == "-" for line in body)  # a dense solve has no iterations


def test_hrp_report_shows_the_preheat_rank():
    cfg = HRPConfig(rank=8, steps=2, lr=1e-2)
    report = initialize_lora(tiny_mlp(seed=0, r=2), [(x, y) for x, y in mlp_batches()], method="hrp", config=cfg,
                             loss_fn=mlp_loss, progress=False)
    assert report.info["preheat_rank"] == 8
    head = _header(report)
    assert "preheat_rank" in head
    assert "preheat_rank: 8" in str(report)


def test_group_time_shares_are_labelled():
    from helpers import tiny_llama

    report = initialize_lora(tiny_llama(seed=0, r=2), method="pissa", progress=False)
    sizes = {r["name"].split("layers.")[1]: r["time_group_size"] for r in report.layers}
    assert sizes["0.self_attn.q_proj"] >= 2  # q_proj and o_proj of both layers: one batched SVD
    text = report.table()
    q_row = next(line for line in text.splitlines() if "layers.0.self_attn.q_proj" in line)
    assert q_row.rstrip().endswith("*")
    assert text.splitlines()[-1].startswith("* time_s: an even share of one batched call")


def test_from_json_round_trips(tmp_path):
    report = initialize_lora(tiny_mlp(seed=0, r=2), mlp_batches(), loss_fn=mlp_loss, progress=False,
                             config=LoRADAConfig(step_scale=0.1))
    path = tmp_path / "r.json"
    report.to_json(path)
    back = InitReport.from_json(path)
    assert back.to_dict() == json.loads(report.to_json())
    assert InitReport.from_json(report.to_json()).to_dict() == back.to_dict()
    assert str(back) == str(InitReport.from_json(path))
    with pytest.raises(ValueError, match="not a lorainit report"):
        InitReport.from_json('{"layers": []}')


def test_thread_hint_only_when_wall_time_is_far_above_cpu_time():
    assert thread_hint(10.0, 8.0, 2) is None
    assert thread_hint(1.0, 0.01, 2) is None  # too short to tell
    hint = thread_hint(82.0, 8.3, 2)
    assert "--num-threads 1" in hint and "docs/performance.md" in hint and "2 torch threads" in hint
    alone = thread_hint(20.0, 5.0, 1)  # one thread already: nothing to lower
    assert "busy" in alone and "--num-threads" not in alone


def test_busy_cpus_give_a_report_hint_and_one_warning(monkeypatch):
    clock = {"cpu": 0.0}
    monkeypatch.setattr(init_module.time, "process_time", lambda: clock["cpu"])  # no CPU time: fully starved
    monkeypatch.setattr("lorainit.report.MIN_WALL_S", 0.0)
    monkeypatch.setattr(init_module, "_THREADS_WARNED", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r1 = initialize_lora(tiny_mlp(seed=0, r=2), method="lora", progress=False)
        r2 = initialize_lora(tiny_mlp(seed=0, r=2), method="lora", progress=False)
    assert "busy with other jobs" in r1.info["hint"] and "busy with other jobs" in r2.info["hint"]
    assert r1.info["cpu_time_s"] == 0.0
    assert len([w for w in caught if "busy with other jobs" in str(w.message)]) == 1
    assert "hint:" in str(r1)
