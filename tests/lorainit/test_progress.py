"""Issue 23: every long phase shows a tqdm bar: the LoRA-DA solve (per layer), its step search (per
candidate step size) and HRP's preheat (per step), as well as the data passes."""
import pytest

import lorainit.context
from lorainit import HRPConfig, LoRADAConfig, initialize_lora

from helpers import lm_batches, tiny_llama


class _Bar:
    def __init__(self, total, desc, enabled, unit="batch"):
        self.total, self.desc, self.enabled, self.unit, self.n, self.closed = total, desc, enabled, unit, 0, False

    def update(self, k=1):
        self.n += k

    def set_postfix(self, *args, **kwargs):
        pass

    def close(self):
        self.closed = True


@pytest.fixture
def bars(monkeypatch):
    made = []

    def fake(total, desc, enabled, unit="batch"):
        made.append(_Bar(total, desc, enabled, unit))
        return made[-1]

    monkeypatch.setattr(lorainit.context, "progress_bar", fake)
    return made


def _bar(bars, text):
    found = [b for b in bars if text in b.desc]
    assert len(found) == 1, [b.desc for b in bars]
    return found[0]


def test_lora_da_solve_and_step_search_have_bars(bars):
    model = tiny_llama(seed=0, r=2)
    report = initialize_lora(model, lm_batches(n=16, bs=4, labels=True), method="lora_da", num_samples=16,
                             config=LoRADAConfig(step_scale="auto"), progress=True)
    solve = _bar(bars, "LoRA-DA solve")
    assert solve.enabled and solve.closed and solve.unit == "layer"
    assert solve.total == solve.n == len(report.layers)
    search = _bar(bars, "step search")
    assert search.enabled and search.closed
    assert search.n == len(report.info["step_search"]["scores"]) <= search.total


def test_hrp_preheat_has_a_bar_naming_its_rank(bars):
    model = tiny_llama(seed=0, r=2)
    initialize_lora(model, lm_batches(n=8, bs=4, labels=True), method="hrp", config=HRPConfig(rank=8, steps=2),
                    progress=True)
    preheat = _bar(bars, "HRP preheat")
    assert "rank 8" in preheat.desc and preheat.n == preheat.total == 2 and preheat.closed


def test_progress_false_disables_every_bar(bars):
    initialize_lora(tiny_llama(seed=0, r=2), lm_batches(n=16, bs=4, labels=True), method="lora_da", num_samples=16,
                    config=LoRADAConfig(step_scale="auto"), progress=False)
    assert bars and not any(b.enabled for b in bars)


@pytest.mark.parametrize("method", ["pissa", "milora"])
def test_weight_svd_solves_have_a_bar_over_every_layer(bars, method):
    report = initialize_lora(tiny_llama(seed=0, r=2), method=method, progress=True)
    solve = _bar(bars, f"{method} solve")
    assert solve.enabled and solve.closed and solve.total == solve.n == len(report.layers)
