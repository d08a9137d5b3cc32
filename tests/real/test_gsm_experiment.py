"""The headline experiment's bookkeeping (bench/experiments/smollm2_gsm.py): rows per method and rank,
runs written before the rank sweep existed, and the rank sweep's argument check. No model is loaded."""
import types

import pytest

from bench.experiments import smollm2_gsm as gsm


def _run(method, seed, accuracy, rank=None):
    r = {"method": method, "seed": seed, "accuracy": accuracy, "heldout_loss_init": 2.0 + seed,
         "heldout_loss_end": 1.0, "init_s": 0.5, "train_s": 3.0}
    if rank is not None:
        r["rank"] = rank
    return r


def test_rank_sweep_rows_group_by_method_and_rank():
    runs = [_run("lora", 0, 0.2, 1), _run("lora", 1, 0.4, 1), _run("lora", 0, 0.5, 4),
            _run("lora_da", 0, 0.1, 1), _run("lora_da", 0, 0.3, 4), _run("lora_da", 1, 0.5, 4)]
    rows = gsm.summarize(runs, ["lora", "lora_da"], [1, 4], default_rank=8)
    got = {(r["method"], r["r"]): (r["exact match"], r["seeds"]) for r in rows}
    assert got == {("lora", 1): (pytest.approx(0.3), 2), ("lora", 4): (0.5, 1),
                   ("lora_da", 1): (0.1, 1), ("lora_da", 4): (pytest.approx(0.4), 2)}
    assert [r["std"] for r in rows if r["seeds"] == 1] == [0.0, 0.0]


def test_one_rank_has_no_rank_column_and_old_runs_count_at_the_default_rank():
    runs = [_run("lora", 0, 0.2), _run("lora", 1, 0.6, 8), _run("lora", 2, 0.9, 4)]
    rows = gsm.summarize(runs, ["lora"], [8], default_rank=8)
    assert len(rows) == 1 and "r" not in rows[0]
    assert rows[0]["seeds"] == 2 and rows[0]["exact match"] == pytest.approx(0.4)


def test_markdown_names_the_ranks():
    args = types.SimpleNamespace(quick=False, steps=4, lr=1e-3, batch=2, init_samples=8, test=10, heldout_loss=4)
    rows = gsm.summarize([_run("lora", 0, 0.2, 1), _run("lora", 0, 0.3, 2)], ["lora"], [1, 2], 8)
    md = gsm.markdown(rows, 0.0, 2.0, args, [1, 2], 60.0)
    assert "rank sweep" in md and "r in {1, 2}" in md and "| method | r | exact match |" in md


def test_bad_rank_is_refused_before_the_model_loads():
    with pytest.raises(SystemExit, match="--ranks"):
        gsm.main(["--ranks", "0,2"])
