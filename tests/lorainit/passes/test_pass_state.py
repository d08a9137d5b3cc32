"""lorainit.passes.state: a pass freezes, switches LoRA off, is deterministic, and puts everything back."""
import pytest
import torch
from torch import nn

from lorainit.passes import state as S
from lorainit.targets import find_targets


class _Attention(nn.Module):
    """Reads a float dropout probability through ``self.training``, as transformers' attention modules do."""

    def __init__(self, d):
        super().__init__()
        self.q = nn.Linear(d, d)
        self.attention_dropout = 0.3

    def forward(self, x):
        return nn.functional.dropout(self.q(x), p=self.attention_dropout if self.training else 0.0)


class _Net(nn.Module):
    def __init__(self, d=6):
        super().__init__()
        self.attn = _Attention(d)
        self.drop = nn.Dropout(0.4)
        self.norm = nn.BatchNorm1d(d)
        self.out = nn.Linear(d, 3)

    def forward(self, x):
        return self.out(self.norm(self.drop(self.attn(x))))


def _model(seed=0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(_Net(), LoraConfig(r=2, lora_alpha=4, target_modules=["q", "out"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            nn.init.normal_(p)  # a non-zero adapter, so that "LoRA off" changes the output
    return model


def _snapshot(model):
    return ([(n, p.requires_grad, p.grad) for n, p in model.named_parameters()],
            [(n, m.training) for n, m in model.named_modules()],
            [(n, m._disable_adapters) for n, m in model.named_modules() if hasattr(m, "_disable_adapters")],
            {n: (m.p if isinstance(m, nn.Dropout) else m.__dict__.get("attention_dropout"))
             for n, m in model.named_modules()},
            {k: v.clone() for k, v in model.state_dict().items()})


def _assert_restored(model, before):
    after = _snapshot(model)
    assert after[:4] == before[:4]
    assert all(torch.equal(after[4][k], before[4][k]) for k in before[4])


@pytest.mark.parametrize("train_mode", [False, True])
def test_inside_a_pass_everything_is_frozen_lora_is_off_and_outputs_are_deterministic(train_mode):
    model = _model()
    model.train()
    targets = find_targets(model)
    grad_name = next(n for n in targets if n.endswith("attn.q"))
    w = targets[grad_name].weight
    w.grad = torch.ones_like(w)
    before = _snapshot(model)
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    with S.pass_state(model, targets, grad_weights=[grad_name], train_mode=train_mode):
        assert [n for n, p in model.named_parameters() if p.requires_grad] == [n for n, p in model.named_parameters()
                                                                                if p is w]
        assert w.grad is None  # cleared for the pass
        assert all(t.module._disable_adapters for t in targets.values())
        assert model.training is train_mode
        assert not model.base_model.model.drop.training and not model.base_model.model.norm.training
        if train_mode:  # train mode for gradient checkpointing, without its randomness
            assert model.base_model.model.drop.p == 0.0 and model.base_model.model.attn.attention_dropout == 0.0
        y1, y2 = model(x), model(x)
        assert torch.equal(y1, y2)
        with model.disable_adapter():
            assert torch.equal(model(x), y1)  # the base model's output: LoRA is off
    _assert_restored(model, before)  # running statistics untouched too (norms in eval inside)
    assert model(x).shape == (8, 3)


def test_an_error_inside_the_pass_restores_the_state():
    model = _model(seed=2)
    model.train()
    targets = find_targets(model)
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        with S.pass_state(model, targets, train_mode=True, lora_enabled=True):
            assert not any(t.module._disable_adapters for t in targets.values())  # lora_enabled keeps LoRA on
            raise RuntimeError("boom")
    _assert_restored(model, before)


def test_deterministic_train_mode_reports_what_it_changed_and_restore_puts_it_back():
    model = _Net()
    model.eval()
    changed = S.deterministic_train_mode(model)
    assert model.training and model.attn.training and not model.drop.training and not model.norm.training
    assert sorted((type(m).__name__, attr, v) for m, attr, v in changed) == [("Dropout", "p", 0.4),
                                                                            ("_Attention", "attention_dropout", 0.3)]
    S.restore_dropout_attrs(changed)
    assert model.drop.p == 0.4 and model.attn.attention_dropout == 0.3
    assert S.deterministic_train_mode(nn.Sequential(nn.Dropout(0.0), nn.Linear(2, 2))) == []  # nothing to zero


class _WithEmbeddings(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 4)

    def get_input_embeddings(self):
        return self.emb


def test_gradient_checkpointing_detection_and_input_grad_hook():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=16)
    model = LlamaForCausalLM(cfg)
    assert not S.uses_gradient_checkpointing(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    assert S.uses_gradient_checkpointing(model)

    frozen = _WithEmbeddings().requires_grad_(False)
    ids = torch.tensor([[3, 4, 5]])
    assert not frozen.emb(ids).requires_grad
    handle = S._inputs_require_grad(frozen)
    try:
        assert frozen.emb(ids).requires_grad  # a frozen model's checkpointed layers still build a graph
        with torch.no_grad():
            assert not frozen.emb(ids).requires_grad  # only where a graph is being built
    finally:
        handle.remove()
    assert not frozen.emb(ids).requires_grad
    assert S._inputs_require_grad(nn.Linear(2, 2)) is None  # no input embeddings: no hook


def test_progress_bar_counts_and_is_silent_when_disabled(capsys):
    bar = S.progress_bar(3, "lorainit test", enabled=True, unit="layer")
    bar.update(2)
    assert bar.n == 2 and bar.total == 3
    bar.close()
    err = capsys.readouterr().err
    assert "lorainit test" in err and "/3 " in err and "layer/s" in err
    quiet = S.progress_bar(3, "lorainit quiet", enabled=False)
    quiet.update(3)
    quiet.close()
    assert quiet.disable and capsys.readouterr().err == ""
