"""report.lr_scale / suggest_lr: 1 for plain LoRA, the analytic value for PiSSA on a known spectrum, clear errors."""
import math

import pytest
import torch
from torch import nn

from helpers import lm_batches, tiny_llama
from lorainit import InitReport, initialize_lora
from lorainit.errors import LoRAInitError


def test_plain_lora_gives_exactly_one_and_its_layers_agree():
    model = tiny_llama(seed=1)
    rep = initialize_lora(model, method="lora", progress=False)
    assert rep.lr_scale == 1.0 and rep.suggest_lr(2e-4) == 2e-4
    # the formula on the kaiming draws themselves is 1 up to sampling noise
    info = rep.info["lr_scale"]
    assert 0.8 < info["layer_min"] <= info["layer_max"] < 1.25


def _linear_with_spectrum(m, n, sing, seed=0):
    from peft import LoraConfig, get_peft_model

    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    k = min(m, n)
    W = U[:, :k] @ torch.diag(torch.tensor(sing, dtype=torch.float64)) @ V[:, :k].T
    net = nn.Sequential(nn.Linear(n, m, bias=False))
    net[0].weight.data = W.float()
    return get_peft_model(net, LoraConfig(r=2, lora_alpha=6, target_modules=["0"]))


def test_pissa_matches_its_closed_form():
    """PiSSA: ||A||^2 = ||B||^2 = sum_{i<=r} s_i / sigma, so lr_scale = sqrt(sigma m r / (3 (m + n) sum s_i))."""
    m, n, r, sigma = 6, 9, 2, 3.0
    sing = [5.0, 3.0, 1.0, 0.5, 0.25, 0.1]
    rep = initialize_lora(_linear_with_spectrum(m, n, sing), method="pissa", progress=False)
    want = math.sqrt(sigma * m * r / (3 * (m + n) * (5.0 + 3.0)))
    assert rep.lr_scale == pytest.approx(want, rel=1e-5)
    assert rep.suggest_lr(1e-3) == pytest.approx(1e-3 * want, rel=1e-5)


def test_scaling_a_frozen_A_divides_the_scale(monkeypatch):
    """A method whose A is c times plain LoRA's (B = 0, A frozen) gets lr_scale 1/c."""
    from lorainit import register_method
    from lorainit.adapters import LoRAFactors
    from lorainit.methods.baselines import BaselineConfig
    from lorainit.registry import _REGISTERED

    c = 5.0

    def scaled(ctx, config):
        out = {}
        for name, t in ctx.targets.items():
            A = torch.empty(t.r, t.n)
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            out[name] = LoRAFactors(c * A.to(t.lora_A.dtype), torch.zeros(t.m, t.r, dtype=t.lora_B.dtype))
        return out

    monkeypatch.setitem(_REGISTERED, "scaled_kaiming", None)
    register_method("scaled_kaiming", fn=scaled, config_cls=BaselineConfig, needs_data=False, replace=True)
    torch.manual_seed(0)
    rep = initialize_lora(tiny_llama(seed=2, r=8), method="scaled_kaiming", progress=False)
    assert rep.lr_scale == pytest.approx(1 / c, rel=0.05)


@pytest.mark.parametrize("bad", ["1e-3", -1e-3, 0.0, float("nan"), float("inf"), True, None])
def test_bad_lora_lr_names_the_argument(bad):
    rep = InitReport(method="pissa", config={}, info={"lr_scale": {"value": 0.2}})
    with pytest.raises(LoRAInitError, match="lora_lr"):
        rep.suggest_lr(bad)


def test_no_scale_when_the_first_step_moves_nothing():
    rep = InitReport(method="x", config={}, info={"lr_scale": {"value": None, "reason": "does not move any weight"}})
    assert rep.lr_scale is None
    with pytest.raises(ValueError, match="does not move any weight"):
        rep.suggest_lr(1e-3)


def test_the_scale_survives_the_json_round_trip(tmp_path):
    model = tiny_llama(seed=3)
    rep = initialize_lora(model, lm_batches(8, labels=True), method="lora_da", num_samples=8, progress=False)
    back = InitReport.from_json(rep.to_json(tmp_path / "r.json"))
    assert back.lr_scale == pytest.approx(rep.lr_scale) and 0 < rep.lr_scale < 10
