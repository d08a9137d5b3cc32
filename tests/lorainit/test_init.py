"""initialize_lora with LoRA-DA end to end: factors, PEFT scaling, options, transactions, bad input."""
import json
import math

import pytest
import torch

import lorainit_kernels as lk
from lorainit_kernels import defaults as lk_defaults
from lorainit.methods.lora_da import LoRADAConfig
from lorainit.init import initialize_lora
from lorainit.registry import methods, register_method
from lorainit.targets import LoRAInitError, find_targets

from helpers import (assert_same_state, brute_stats, lm_batches, mlp_batches, mlp_loss, model_state, rel,
                     tiny_gpt2, tiny_llama, tiny_mlp)


def test_adapters_equal_lora_da_factors_on_the_pass_statistics():
    """fp32 model: the written factors are lk.lora_da_factors of the pass's own statistics."""
    from lorainit.context import InitContext

    model = tiny_llama(seed=7, alpha=16)
    batches = lm_batches(n=16, bs=4, seed=3)
    stats = InitContext(model, find_targets(model), batches, num_samples=None, progress=False).collect_stats()
    # dense solver on both sides: fp32 LOBPCG stops at its own tolerance (P A^T within ~1e-3)
    cfg = LoRADAConfig(step_scale=0.5, n_train=1000.0, solver="eigh", normalize_step=False)
    initialize_lora(model, batches, config=cfg, num_samples=None, progress=False)
    for name, t in find_targets(model).items():
        st = stats[name]
        A, P, _ = lk.lora_da_factors(st.Z, st.G, st.s, t.r, n_train=1000.0, damping=cfg.damping, solver="eigh")
        assert t.scaling == 4.0
        assert rel(t.scaling * t.lora_B @ t.lora_A, 0.5 * P @ A.T) < 1e-5, name


def test_default_step_is_normalized_by_the_largest_singular_value_of_the_step():
    # the default parametrization (lorainit_kernels.defaults): eta * dW A A^T / sigma_max(dW) per layer
    import lorainit_kernels.methods as lkm

    model = tiny_llama(seed=5).double()
    batches = lm_batches(n=16, bs=4, seed=2)
    ref = brute_stats(model, batches)
    eta = 0.7
    initialize_lora(model, batches, config=LoRADAConfig(step_scale=eta, n_train=3000.0, solver="eigh",
                                                        stats_dtype=torch.float64), num_samples=None, progress=False)
    for name, t in find_targets(model).items():
        r = ref[name]
        A, P, _ = lk.lora_da_factors(r["Z"], r["G"], r["s"], t.r, n_train=3000.0, solver="eigh")
        Zd = r["Z"] + lk_defaults.DAMPING * r["Z"].diagonal().mean() * torch.eye(r["Z"].shape[0], dtype=r["Z"].dtype)
        sd = r["s"] + lk_defaults.DAMPING * r["s"].mean()
        dW = -(r["G"] / sd[:, None]) @ torch.linalg.inv(Zd)
        nu = torch.linalg.matrix_norm(dW, ord=2)
        update = t.scaling * (t.lora_B.double() @ t.lora_A.double())
        assert rel(update, eta * P @ A.T / nu) < 1e-5, name
        # and it is what the tensor-level methods.lora_da gives with its defaults
        f, _ = lkm.lora_da(r["Z"], r["G"], r["s"], t.r, n_train=3000.0, scaling=t.scaling, step_scale=eta, solver="eigh")
        assert rel(update, t.scaling * f.lora_B @ f.lora_A) < 1e-5, name


def _factors(model):
    return {n: (t.lora_A.detach().clone(), t.lora_B.detach().clone()) for n, t in find_targets(model).items()}


@pytest.mark.parametrize("build,rslora", [(tiny_llama, False), (tiny_gpt2, True)], ids=["llama", "gpt2-rslora"])
def test_adapters_equal_lora_da_factors_on_brute_force_stats(build, rslora):
    # float64 model and accumulators, so that the comparison tests the pipeline, not fp32 rounding
    # amplified by the eigen-solve (the fp32 statistics are checked against the same reference in test_stats)
    model = build(seed=7, rslora=rslora).double()
    batches = lm_batches(n=16, bs=4, seed=3)
    ref = brute_stats(model, batches)
    eta, damping = 0.37, 1e-2
    cfg = LoRADAConfig(step_scale=eta, damping=damping, n_train=5000.0, stats_dtype=torch.float64,
                       normalize_step=False)
    report = initialize_lora(model, batches, config=cfg, num_samples=None, progress=False)
    targets = find_targets(model)
    for name, t in targets.items():
        r = ref[name]
        A, P, evals = lk.lora_da_factors(r["Z"], r["G"], r["s"], t.r, n_train=5000.0, damping=damping, solver="eigh")
        sigma = 8 / math.sqrt(4) if rslora else 8 / 4
        assert t.scaling == pytest.approx(sigma)
        # the adapter's update is eta * P A^T (invariant to the eigenvectors' signs/rotations)
        update = t.scaling * (t.lora_B.double() @ t.lora_A.double())
        assert rel(update, eta * P @ A.T) < 1e-5, name
        # lora_A spans the same subspace as A (orthonormal rows)
        cosines = torch.linalg.svdvals(t.lora_A.double() @ A)
        assert float(cosines.min()) > 1 - 1e-6, name
        assert report.layer(name)["eigenvalues"] == pytest.approx(evals.tolist(), rel=1e-5)
        assert report.layer(name)["residual"] < 1e-5  # the report's Ritz residual of the solver's pairs


def test_preserve_output_keeps_logits_and_conv1d_transposed_base():
    for build in (tiny_llama, tiny_gpt2):
        model = build(seed=2).eval()  # eval: lora/attention dropout off when comparing logits
        batches = lm_batches(n=12, bs=4)
        x = batches[0]
        with torch.no_grad():
            before = model(**x).logits
        w_before = {n: t.weight_torch().detach().clone() for n, t in find_targets(model).items()}
        rep = initialize_lora(model, batches, config=LoRADAConfig(step_scale=0.5, preserve_output=True),
                              progress=False)
        assert rep.info["base_modified"]
        with torch.no_grad():
            after = model(**x).logits
        assert (after - before).abs().max() < 1e-4
        changed = 0
        for n, t in find_targets(model).items():
            upd = t.scaling * t.lora_B.float() @ t.lora_A.float()
            assert upd.norm() > 0
            assert rel(t.weight_torch() - w_before[n], -upd) < 1e-4  # W_new = W - sigma B A (orientation)
            changed += 1
        assert changed > 0


def test_step_scale_auto_picks_best_held_out_eta():
    model = tiny_llama(seed=5)
    batches = lm_batches(n=24, bs=4, seed=9)
    rep = initialize_lora(model, batches, config=LoRADAConfig(step_scale="auto", holdout_fraction=0.25), progress=False)
    search = rep.info["step_search"]
    scores = {float(k): v for k, v in search["scores"].items()}
    eta = rep.info["step_scale"]
    assert scores[eta] == min(scores.values())
    assert search["held_out_batches"] == 2
    # the written adapter is the chosen eta's, and the held-out loss is what the search measured
    from lorainit.context import InitContext
    ctx = InitContext(model, find_targets(model), batches, num_samples=None, progress=False)
    assert ctx.eval_loss(batches[-2:]) == pytest.approx(scores[eta], rel=1e-5)


def test_freeze_a_ablations_and_report(tmp_path):
    base = tiny_mlp(seed=4)
    batches = mlp_batches()
    runs = {}
    for name in ("full", "no_bias", "no_variance", "no_variance_fisher"):
        model = tiny_mlp(seed=4)
        cfg = LoRADAConfig.ablation(name, step_scale=0.1, freeze_A=(name == "full"))
        rep = initialize_lora(model, batches, config=cfg, loss_fn=mlp_loss, progress=False)
        runs[name] = _factors(model)
        if name == "full":
            for t in find_targets(model).values():
                assert not t.lora_A.requires_grad and t.lora_B.requires_grad
            path = tmp_path / "report.json"
            rep.to_json(path)
            data = json.loads(path.read_text())
            assert data["method"] == "lora_da" and len(data["layers"]) == 3
            row = data["layers"][0]
            for key in ("tokens", "n_train", "eigenvalues", "time_s"):
                assert key in row
            assert row["tokens"] == 48 and len(row["eigenvalues"]) == 3
            assert "base_model.model.fc1" in str(rep)
    # n_train falls back to the tokens seen for a list of batches (no dataset length)
    assert rep.info["n_train_source"].startswith("tokens")
    for name in ("no_bias", "no_variance", "no_variance_fisher"):
        a_full, a_abl = runs["full"]["base_model.model.fc2"][0], runs[name]["base_model.model.fc2"][0]
        cos = torch.linalg.svdvals(a_full.double() @ a_abl.double().T)
        assert float(cos.min()) < 0.999, name  # a different subspace
    del base


def test_n_train_estimate_from_dataset_length():
    from torch.utils.data import DataLoader, TensorDataset

    x, y = torch.randn(40, 12), torch.randint(0, 5, (40,))
    dl = DataLoader(TensorDataset(x, y), batch_size=8)
    model = tiny_mlp(seed=1)
    rep = initialize_lora(model, dl, config=LoRADAConfig(step_scale=0.1), num_samples=16, loss_fn=mlp_loss,
                          progress=False)
    assert rep.info["n_train_source"].startswith("len(dataset)")
    assert rep.layers[0]["n_train"] == pytest.approx(40.0)  # 40 examples x 1 token each


@pytest.mark.parametrize("solver", ["eigh", "lobpcg"])
def test_memory_budget_gives_one_pass_adapters(solver):
    batches = lm_batches(n=12, bs=4, seed=4)
    cfg = LoRADAConfig(step_scale=0.3, solver=solver)
    one = tiny_llama(seed=6)
    r1 = initialize_lora(one, batches, config=cfg, progress=False)
    two = tiny_llama(seed=6)
    budget = 4 * (32 * 32 + 3 * (64 * 32 + 64))  # about one MLP block's statistics
    r2 = initialize_lora(two, batches, config=cfg.replace(max_memory=budget), progress=False)
    assert r1.info["passes"] == 1 and r2.info["passes"] >= 3
    f1, f2 = _factors(one), _factors(two)
    for name, t in find_targets(one).items():
        if solver == "eigh":  # statistics and per-matrix dense solves are bitwise reproducible on CPU
            assert torch.equal(f1[name][0], f2[name][0]) and torch.equal(f1[name][1], f2[name][1]), name
        else:  # batched LOBPCG depends on which layers share a batch: equal up to its tolerance
            u1, u2 = f1[name][1] @ f1[name][0], f2[name][1] @ f2[name][0]
            assert rel(u2, u1) < 5e-3, name


def test_save_and_load_roundtrip(tmp_path):
    from peft import PeftModel

    model = tiny_llama(seed=8).eval()
    batches = lm_batches(n=8, bs=4)
    initialize_lora(model, batches, config=LoRADAConfig(step_scale=0.2), progress=False)
    model.save_pretrained(tmp_path / "adapter")
    fresh = tiny_llama(seed=8).get_base_model()
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        a = model(**batches[0]).logits
        b = loaded(**batches[0]).logits
    assert torch.allclose(a, b, atol=1e-6)
    f1, f2 = _factors(model), _factors(loaded)
    for name in f1:
        assert torch.equal(f1[name][1], f2[name][1])


def test_error_mid_pass_leaves_model_untouched():
    model = tiny_mlp(seed=3)
    model.train()
    model.base_model.model.fc1.lora_A["default"].weight.grad = torch.ones(3, 12)
    before = model_state(model)
    calls = {"n": 0}

    def flaky_loss(m, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom in batch 2")
        return mlp_loss(m, batch)

    with pytest.raises(RuntimeError, match="boom"):
        initialize_lora(model, mlp_batches(), config=LoRADAConfig(step_scale=0.1), loss_fn=flaky_loss, progress=False)
    assert_same_state(before, model_state(model))


def test_error_in_step_search_and_write_restores_everything():
    model = tiny_llama(seed=3)
    before = model_state(model)
    batches = lm_batches(n=12, bs=4)
    bad = dict(batches[-1])
    bad["input_ids"] = bad["input_ids"].clone()
    bad["input_ids"][0, 0] = 10_000  # out of vocabulary: only the held-out batch fails, after a write
    with pytest.raises(LoRAInitError, match="cannot take batch"):
        initialize_lora(model, batches[:-1] + [bad], config=LoRADAConfig(step_scale="auto"), progress=False)
    assert_same_state(before, model_state(model))


def test_nan_activation_names_module_and_batch():
    model = tiny_mlp(seed=3)
    before = model_state(model)
    calls = {"n": 0}

    def nan_loss(m, batch):
        calls["n"] += 1
        x, y = batch
        if calls["n"] == 2:
            x = x.clone()
            x[1, 2] = float("nan")
        return mlp_loss(m, (x, y))

    with pytest.raises(LoRAInitError, match=r"module 'base_model.model.fc1'.*batch 1"):
        initialize_lora(model, mlp_batches(), config=LoRADAConfig(step_scale=0.1), loss_fn=nan_loss, progress=False)
    assert_same_state(before, model_state(model))


def test_inf_gradient_names_module_and_batch():
    model = tiny_mlp(seed=3)
    before = model_state(model)
    calls = {"n": 0}

    def inf_grad_loss(m, batch):
        calls["n"] += 1
        x, y = batch
        out = m(x)
        if calls["n"] == 3:  # finite loss, infinite gradient at the logits of example 0
            out = out + (torch.sqrt(out[:1] - out[:1].detach()) * 0).sum()
        return torch.nn.functional.cross_entropy(out, y, reduction="sum")

    with pytest.raises(LoRAInitError, match=r"module 'base_model.model.head', batch 2"):
        initialize_lora(model, mlp_batches(), config=LoRADAConfig(step_scale=0.1), loss_fn=inf_grad_loss,
                        progress=False)
    assert_same_state(before, model_state(model))


def test_bad_inputs_give_clear_errors_and_leave_model_untouched():
    batches = lm_batches(n=8, bs=4)
    # a model without LoRA layers
    from helpers import MLP
    with pytest.raises(LoRAInitError, match="no PEFT LoRA layers"):
        initialize_lora(MLP(), mlp_batches(), loss_fn=mlp_loss)
    # rank larger than min(m, n): k_proj is 16 x 32
    model = tiny_llama(seed=1, r=20)
    before = model_state(model)
    with pytest.raises(LoRAInitError, match=r"rank r=20 larger than min\(m, n\)"):
        initialize_lora(model, batches, progress=False)
    assert_same_state(before, model_state(model))
    model = tiny_llama(seed=1)
    before = model_state(model)
    # an empty dataloader
    with pytest.raises(LoRAInitError, match="no examples"):
        initialize_lora(model, [], progress=False)
    # zero valid tokens
    empty = [{"input_ids": b["input_ids"], "attention_mask": torch.zeros_like(b["attention_mask"])} for b in batches]
    with pytest.raises(LoRAInitError, match="no loss tokens"):
        initialize_lora(model, empty, config=LoRADAConfig(step_scale=1.0), progress=False)
    # batches the model cannot take
    with pytest.raises(LoRAInitError, match="cannot take batch 0"):
        initialize_lora(model, [{"input_ids": b["input_ids"][..., None].float()} for b in batches], progress=False)
    with pytest.raises(LoRAInitError, match="not a mapping"):
        initialize_lora(model, [(b["input_ids"],) for b in batches], progress=False)
    # a wrong config type / value
    with pytest.raises(ValueError, match="damping"):
        LoRADAConfig(damping=-1.0)
    with pytest.raises(ValueError, match="step_scale"):
        LoRADAConfig(step_scale="big")
    assert_same_state(before, model_state(model))
    # a quantized (integer) base weight
    t = next(iter(find_targets(model).values()))
    t.base.weight = torch.nn.Parameter(torch.zeros(t.m, t.n, dtype=torch.int8), requires_grad=False)
    before = model_state(model)
    with pytest.raises(LoRAInitError, match="quantized"):
        initialize_lora(model, batches, progress=False)
    assert_same_state(before, model_state(model))


def test_registry_lists_and_plugs_in_methods():
    names = {m["name"]: m for m in methods()}
    assert names["lora_da"]["needs_data"] and "2510.24561" in names["lora_da"]["paper"]
    from dataclasses import dataclass

    from lorainit.adapters import LoRAFactors
    from lorainit.configs import InitConfig

    @dataclass(frozen=True)
    class GradSignConfig(InitConfig):
        scale: float = 1.0

    def grad_top(ctx, config):  # a toy gradient method: top right singular vectors of the weight gradient
        grads, _ = ctx.collect_weight_grads()
        out = {}
        for n, g in grads.items():
            t = ctx.targets[n]
            _, _, Vh = torch.linalg.svd(g)
            out[n] = LoRAFactors(Vh[:t.r].contiguous(), torch.zeros(t.m, t.r), None)
        return out

    register_method("test_grad_top", fn=grad_top, config_cls=GradSignConfig, needs_data=True, needs_grad=True,
                    replace=True)
    assert any(m["name"] == "test_grad_top" for m in methods())
    model = tiny_mlp(seed=2)
    rep = initialize_lora(model, mlp_batches(), method="test_grad_top", loss_fn=mlp_loss, progress=False)
    assert rep.method == "test_grad_top"
    with pytest.raises(LoRAInitError, match="takes a GradSignConfig"):
        initialize_lora(model, mlp_batches(), method="test_grad_top", config=LoRADAConfig(), loss_fn=mlp_loss)
    with pytest.raises(ValueError, match="unknown method"):
        initialize_lora(model, mlp_batches(), method="nope")


def test_step_grid_search_finds_the_grid_minimum_of_unimodal_losses_with_fewer_passes():
    import math

    from lorainit.methods.lora_da import search_step_grid

    grid = (0.0, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
    for best in range(len(grid)):
        calls = []

        def loss(eta, best=best):
            calls.append(eta)
            return abs(grid.index(eta) - best) + 0.1 * math.sin(eta)  # unimodal along the grid

        scores = search_step_grid(grid, loss)
        assert min(scores, key=scores.get) == grid[best]
        assert len(calls) == len(set(calls)) <= 7
        assert set(scores) == set(calls)
    # a one-value grid still scores its value
    assert set(search_step_grid((0.0, 0.5), lambda eta: -eta)) == {0.0, 0.5}
    # a NaN loss counts as worst, never as best
    scores = search_step_grid(grid, lambda eta: float("nan") if eta > 0.05 else -eta)
    assert min((v, k) for k, v in scores.items() if math.isfinite(v))[1] == 3e-2
