"""Adapters of inits that change the base weight convert to plain LoRA on the original base (PEFT)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 24)
        self.fc2 = nn.Linear(24, 5)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


@pytest.mark.parametrize("method, config", [("pissa", None), ("lora_da", "preserve_output")])
def test_initial_adapter_conversion_gives_the_trained_model_on_the_original_base(method, config, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    from lorainit import LoRADAConfig, initialize_lora

    torch.manual_seed(0)
    original = MLP()
    model = get_peft_model(copy.deepcopy(original), LoraConfig(r=3, lora_alpha=6, target_modules=["fc1", "fc2"]))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 12, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(4)]
    loss_fn = lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="sum")  # noqa: E731
    cfg = LoRADAConfig(preserve_output=True, step_scale=0.5) if config else None
    report = initialize_lora(model, batches, method=method, config=cfg, loss_fn=loss_fn, progress=False)
    assert report.info["base_modified"]
    model.save_pretrained(tmp_path / "init")  # the documented step: save the initial adapter first
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for b in batches:
        opt.zero_grad()
        loss_fn(model, b).backward()
        opt.step()
    model.save_pretrained(tmp_path / "final", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    converted = PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "final")
    x = torch.randn(6, 12, generator=g)
    with torch.no_grad():
        want, got = model(x), converted(x)
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
        assert not torch.allclose(original(x), want, atol=1e-3)  # training really changed the model
