"""initialize_lora(method="hrp"): HRP (Chen et al. 2025, arXiv 2502.07739) on PEFT models.

Matrix sensing on a single PEFT linear layer recovers the target's top-r singular subspace (RSI and
LSI); the written adapter equals lorainit_kernels.methods.hrp of an independently re-implemented
preheat; no trace is left (parameters, adapters, hooks, modes, the user's optimizer); errors in the
middle of the preheat leave the model exactly as before; frozen-A LoRA; bad input.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorainit_kernels.methods as lkm
from lorainit.methods.hrp import HRPConfig, HRPDataWarning
from lorainit.init import initialize_lora
from lorainit.targets import LoRAInitError, find_targets

from helpers import assert_same_state, lm_batches, mlp_batches, mlp_loss, model_state, rel, tiny_llama, tiny_mlp

torch.set_num_threads(1)


def _max_angle(X, Y):
    """Largest principal angle (radians) between the column spans of X and Y."""
    Qx, Qy = torch.linalg.qr(X.double()).Q, torch.linalg.qr(Y.double()).Q
    return float(torch.acos(torch.linalg.svdvals(Qx.T @ Qy).min().clamp(max=1.0)))


# ------------------------------------------------------------------------------------------ matrix sensing
class _One(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.lin = nn.Linear(n, n, bias=False)

    def forward(self, x):
        return self.lin(x)


def _sensing(side, seed=0, n=16, r=2, steps=300):
    """Target W0 + M, M with a decaying spectrum; loss 1/2 |(W - W0 - M) x|^2 averaged over Gaussian x."""
    from peft import LoraConfig, get_peft_model

    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(n, n, generator=g)).Q
    V = torch.linalg.qr(torch.randn(n, n, generator=g)).Q
    S = torch.tensor([4.0, 3.0] + [0.6 * 0.7 ** i for i in range(n - 2)])
    M = (U * S) @ V.T
    torch.manual_seed(seed)
    model = get_peft_model(_One(n), LoraConfig(r=r, lora_alpha=r, target_modules=["lin"]))
    W0 = model.base_model.model.lin.base_layer.weight.detach().clone()
    xs = [torch.randn(32, n, generator=g) for _ in range(steps)]

    def loss_fn(model, x):
        return 0.5 * (model(x) - x @ (W0 + M).T).pow(2).sum(-1).mean()

    cfg = HRPConfig(rank=n, steps=steps, lr=0.03, side=side, loss_fn=loss_fn, seed=seed)
    report = initialize_lora(model, xs, method="hrp", config=cfg, progress=False)
    t = next(iter(find_targets(model).values()))
    return t, U[:, :r], V[:, :r], W0, report


@pytest.mark.parametrize("side", ["A", "B"])
def test_matrix_sensing_full_rank_preheat_recovers_the_top_r_subspace(side):
    t, Ur, Vr, W0, report = _sensing(side)
    if side == "A":  # RSI: lora_A = V_r^T, lora_B = 0
        assert float(t.lora_B.detach().abs().max()) == 0.0
        angle = _max_angle(t.lora_A.detach().T, Vr)
        assert torch.allclose(t.lora_A.detach() @ t.lora_A.detach().T, torch.eye(2), atol=1e-5)
    else:  # LSI: lora_B = U_r, lora_A = 0
        assert float(t.lora_A.detach().abs().max()) == 0.0
        angle = _max_angle(t.lora_B.detach(), Ur)
        assert torch.allclose(t.lora_B.detach().T @ t.lora_B.detach(), torch.eye(2), atol=1e-5)
    assert angle < 0.05, angle  # a few hundredths of a radian
    assert torch.equal(t.weight.detach(), W0)  # only directions are kept
    assert report.info["preheat_loss_last"] < 0.05 * report.info["preheat_loss_first"]
    assert report.layers[0]["preheat_rank"] == 16


def test_matrix_sensing_random_directions_are_far():
    """Control for the test above: a random r-subspace is far from the target's (so < 0.05 is informative)."""
    _, _, Vr, _, _ = _sensing("A", steps=1)
    g = torch.Generator().manual_seed(3)
    assert _max_angle(torch.randn(16, 2, generator=g), Vr) > 0.5


# ------------------------------------------------------------------------------------------ exact pipeline
def test_written_adapter_equals_kernel_hrp_of_a_reimplemented_preheat():
    model = tiny_mlp(seed=2, r=3)
    batches = mlp_batches(n=48, bs=8, seed=4)
    lr, steps, R, seed = 1e-2, 6, 8, 5
    base = model.base_model.model
    layers = [("fc1", base.fc1), ("fc2", base.fc2), ("head", base.head)]
    Ws = [(mod.base_layer.weight.detach().clone(), mod.base_layer.bias.detach().clone()) for _, mod in layers]
    # reference: the preheat written out by hand (three distinct shapes -> generator consumed in model order)
    gen = torch.Generator().manual_seed(seed)
    pre = []
    for (W, _), (_, mod) in zip(Ws, layers):
        m, n = W.shape
        f = lkm.hrp_preheat_factors(m, n, min(R, n), side="A", batch_shape=(1,), generator=gen)
        pre.append((f.lora_A[0], f.lora_B[0].clone().requires_grad_(True)))
    opt = torch.optim.AdamW([B for _, B in pre], lr=lr, weight_decay=0.0)
    for x, y in batches[:steps]:
        h = x
        for k, ((W, b), (A, B)) in enumerate(zip(Ws, pre)):
            h = F.linear(h, W, b) + (h @ A.T) @ B.T
            if k < 2:
                h = torch.tanh(h)
        loss = F.cross_entropy(h, y, reduction="sum")
        opt.zero_grad()
        loss.backward()
        opt.step()
    initialize_lora(model, batches, method="hrp", loss_fn=mlp_loss,
                    config=HRPConfig(rank=R, steps=steps, lr=lr, seed=seed), progress=False)
    targets = find_targets(model)
    for (name, _), (A, B) in zip(layers, pre):
        t = next(v for k, v in targets.items() if k.endswith(name))
        ref = lkm.hrp(B.detach()[None], A[None], t.r, side="A")
        assert rel(t.lora_A.detach(), ref.lora_A[0]) < 1e-4, name
        assert float(t.lora_B.detach().abs().max()) == 0.0


# ------------------------------------------------------------------------------------------ state
def test_hrp_on_llama_leaves_no_trace_and_keeps_the_users_adapter():
    model = tiny_llama(seed=1, r=4)
    batches = lm_batches(n=24, bs=4, seed=2)  # no labels: the causal-LM loss from input_ids
    user_opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    opt_params = [p for g in user_opt.param_groups for p in g["params"]]
    keys = list(model.state_dict().keys())
    pnames = [(n, p.requires_grad) for n, p in model.named_parameters()]
    adapters = (model.active_adapter, sorted(model.peft_config))
    before = model_state(model)
    model.train()
    modes = [m.training for m in model.modules()]
    with torch.no_grad():
        y0 = model.eval()(**batches[0]).logits
    model.train()
    report = initialize_lora(model, batches, method="hrp", config=HRPConfig(rank=16, steps=6, lr=1e-3),
                             progress=False)
    after = model_state(model)
    assert list(model.state_dict().keys()) == keys
    assert [(n, p.requires_grad) for n, p in model.named_parameters()] == pnames
    assert (model.active_adapter, sorted(model.peft_config)) == adapters
    assert [m.training for m in model.modules()] == modes
    assert after["hooks"] == before["hooks"] and after["disabled"] == before["disabled"]
    assert user_opt.state == {} and [p for g in user_opt.param_groups for p in g["params"]] == opt_params
    for k, v in before["values"].items():
        if "lora_" not in k:
            assert torch.equal(v, after["values"][k]), f"{k} changed"
    for name, t in find_targets(model).items():
        A = t.lora_A.detach()
        assert torch.allclose(A @ A.T, torch.eye(t.r), atol=1e-5), name
        assert not torch.equal(A, before["values"][name + ".lora_A.default.weight"]), name
        assert float(t.lora_B.detach().abs().max()) == 0.0
    with torch.no_grad():
        assert rel(model.eval()(**batches[0]).logits, y0) < 1e-6  # B = 0: the model computes what it did
    assert report.info["preheat_steps"] == 6 and math.isfinite(report.info["preheat_loss_last"])


def test_error_in_the_middle_of_the_preheat_leaves_the_model_exactly_as_before():
    model = tiny_mlp(seed=0, r=2)
    model.train()
    before = model_state(model)
    calls = []

    def loss_fn(m, batch):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("boom at step 3")
        return mlp_loss(m, batch)

    with pytest.raises(RuntimeError, match="boom at step 3"):
        initialize_lora(model, mlp_batches(), method="hrp", config=HRPConfig(rank=8, steps=6, lr=1e-2, loss_fn=loss_fn),
                        progress=False)
    assert len(calls) == 4
    assert_same_state(before, model_state(model))


def test_frozen_A_lora_rsi_works_lsi_refuses():
    model = tiny_mlp(seed=0, r=2)
    for t in find_targets(model).values():
        t.lora_A.requires_grad_(False)
    before = model_state(model)
    with pytest.raises(LoRAInitError, match=r"frozen lora_A.*side='A'"):
        initialize_lora(model, mlp_batches(), method="hrp", loss_fn=mlp_loss,
                        config=HRPConfig(rank=8, steps=3, lr=1e-2, side="B"), progress=False)
    assert_same_state(before, model_state(model))
    initialize_lora(model, mlp_batches(), method="hrp", loss_fn=mlp_loss,
                    config=HRPConfig(rank=8, steps=3, lr=1e-2), progress=False)
    for t in find_targets(model).values():
        assert not t.lora_A.requires_grad and t.lora_B.requires_grad
        assert torch.allclose(t.lora_A @ t.lora_A.T, torch.eye(2), atol=1e-5)


# ------------------------------------------------------------------------------------------ data and bad input
def test_short_dataloader_is_cycled_with_a_warning_and_one_shot_iterators_too():
    seen = []

    def loss_fn(m, batch):
        seen.append(batch)
        return mlp_loss(m, (batch["x"], batch["y"]))

    batches = [{"x": x, "y": y} for x, y in mlp_batches(n=24, bs=8)]  # 3 batches
    cfg = HRPConfig(rank=8, steps=7, lr=1e-2, loss_fn=loss_fn)
    with pytest.warns(HRPDataWarning, match=r"steps=7 .* 3 batches: it will be cycled, 3 passes") as caught:
        report = initialize_lora(tiny_mlp(seed=0, r=2), batches, method="hrp", config=cfg, progress=False)
    assert len([w for w in caught if issubclass(w.category, HRPDataWarning)]) == 1  # said once, before the start
    assert report.info["preheat_passes"] == 3 and report.info["preheat_passes_planned"] == 3
    assert report.info["preheat_rank"] == 8
    assert len(seen) == 7 and all(s is batches[i % 3] for i, s in enumerate(seen))  # exactly as yielded
    seen.clear()
    with pytest.warns(HRPDataWarning, match=r"ended after 3 batches.*steps=7"):  # no length: said when it ends
        initialize_lora(tiny_mlp(seed=0, r=2), iter(batches), method="hrp", config=cfg, progress=False)
    assert len(seen) == 7 and all(s is batches[i % 3] for i, s in enumerate(seen))


def test_bad_input_is_refused_clearly():
    model = tiny_mlp(seed=0, r=4)
    before = model_state(model)
    with pytest.raises(LoRAInitError, match=r"preheat rank HRPConfig.rank=4 must be larger than the LoRA rank r=4"):
        initialize_lora(model, mlp_batches(), method="hrp", loss_fn=mlp_loss, config=HRPConfig(rank=4), progress=False)
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        HRPConfig(steps=0)
    with pytest.raises(ValueError, match="side must be"):
        HRPConfig(side="C")
    with pytest.raises(LoRAInitError, match="empty dataloader"):
        initialize_lora(model, [], method="hrp", loss_fn=mlp_loss, config=HRPConfig(rank=8, steps=2), progress=False)

    def fc1_only(m, batch):
        return m.base_model.model.fc1(batch[0]).pow(2).sum()

    with pytest.raises(LoRAInitError, match=r"no gradient reached the preheat adapter of modules .*fc2.*head"):
        initialize_lora(model, mlp_batches(), method="hrp", loss_fn=fc1_only, config=HRPConfig(rank=8, steps=2),
                        progress=False)

    def nan_loss(m, batch):
        return mlp_loss(m, batch) * float("nan")

    with pytest.raises(LoRAInitError, match=r"preheat loss is nan at step 0"):
        initialize_lora(model, mlp_batches(), method="hrp", loss_fn=nan_loss, config=HRPConfig(rank=8, steps=2),
                        progress=False)
    assert_same_state(before, model_state(model))
