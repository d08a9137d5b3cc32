"""initialize_lora with the baseline methods (lora, gaussian, orthogonal, pissa, milora, lora_ga, lora_one).

Each method end to end on a PEFT-wrapped plain MLP and a tiny Llama: the written adapters equal the
kernels-level function (lorainit_kernels.methods) applied to the layer's weight / float64
brute-force gradient, with PEFT's scaling (incl. rsLoRA); methods that subtract their init keep the
model's output; data-free methods take dataloader=None, data methods refuse it; bad input leaves the
model exactly as it was; a save_pretrained / from_pretrained roundtrip.
"""
import math
from collections import OrderedDict

import pytest
import torch

import lorainit_kernels.methods as lkm
from lorainit.methods.baselines import BaselineConfig, LoRAGAConfig, LoRAOneConfig, MiLoRAConfig, PiSSAConfig
from lorainit.init import initialize_lora
from lorainit.registry import methods
from lorainit.targets import LoRAInitError, find_targets

from helpers import (assert_same_state, brute_stats, lm_batches, mlp_batches, mlp_loss, model_state, rel, tiny_llama,
                     tiny_mlp)

torch.set_num_threads(1)


def _weights(model):
    return {n: t.weight_torch().detach().clone() for n, t in find_targets(model).items()}


def _lm_out(model, batches):
    model.eval()
    with torch.no_grad():
        return torch.cat([model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits for b in batches])


def _mlp_out(model, batches):
    model.eval()
    with torch.no_grad():
        return torch.cat([model(x) for x, _ in batches])


BUILDS = {
    "mlp": (lambda **kw: tiny_mlp(seed=3, **kw), mlp_batches, _mlp_out),
    "llama": (lambda **kw: tiny_llama(seed=3, **kw), lambda: lm_batches(n=8, bs=4, seed=2), _lm_out),
}


def test_methods_lists_every_baseline_with_its_needs():
    table = {m["name"]: m for m in methods()}
    for name in ("lora", "gaussian", "orthogonal", "pissa", "milora", "lora_ga", "lora_one", "hrp", "lora_da"):
        assert name in table, name
        assert table[name]["paper"], name
    for name in ("lora", "gaussian", "orthogonal", "pissa", "milora"):
        assert not table[name]["needs_data"] and not table[name]["needs_grad"]
    assert table["lora_ga"]["needs_data"] and table["lora_ga"]["needs_grad"]
    assert table["lora_one"]["needs_grad"]
    assert table["hrp"]["needs_data"] and table["hrp"]["needs_training"]


# ------------------------------------------------------------------------------------------ random inits
def _groups(targets):
    """Shape groups as the docs promise: key (m, n, r, dtype), groups by first appearance, model order."""
    g = OrderedDict()
    for name, t in targets.items():
        g.setdefault((t.m, t.n, t.r, t.lora_A.dtype), []).append(name)
    return g


@pytest.mark.parametrize("kind", ["mlp", "llama"])
@pytest.mark.parametrize("method,kernel", [("lora", lkm.lora_default), ("gaussian", lkm.gaussian),
                                           ("orthogonal", lkm.orthogonal)])
def test_random_inits_equal_the_kernel_with_the_seeded_generator(kind, method, kernel):
    build, _, _ = BUILDS[kind]
    model = build(r=4)
    W0 = _weights(model)
    initialize_lora(model, None, method=method, config=BaselineConfig(seed=11), progress=False)
    targets = find_targets(model)
    gen = torch.Generator().manual_seed(11)
    for (m, n, r, dtype), names in _groups(targets).items():
        ref = kernel(m, n, r, batch_shape=(len(names),), generator=gen, dtype=dtype)
        for i, name in enumerate(names):
            t = targets[name]
            assert torch.equal(t.lora_A.detach(), ref.lora_A[i]), name
            assert torch.equal(t.lora_B.detach(), ref.lora_B[i]), name
            assert torch.equal(t.weight_torch(), W0[name]), name  # base untouched
    if method == "orthogonal":  # B A = 0 but both factors non-zero
        for t in targets.values():
            assert float(t.lora_A.detach().abs().max()) > 0 and float(t.lora_B.detach().abs().max()) > 0
            assert float((t.lora_B @ t.lora_A).detach().abs().max()) < 1e-6
    # the seed makes it reproducible, another seed changes it
    again = build(r=4)
    initialize_lora(again, None, method=method, config=BaselineConfig(seed=11), progress=False)
    other = build(r=4)
    initialize_lora(other, None, method=method, config=BaselineConfig(seed=12), progress=False)
    name = next(iter(targets))
    assert torch.equal(find_targets(again)[name].lora_A, targets[name].lora_A)
    assert not torch.equal(find_targets(other)[name].lora_A, targets[name].lora_A)


def test_orthogonal_with_odd_rank_fails_cleanly():
    model = tiny_mlp(seed=0, r=3)
    before = model_state(model)
    with pytest.raises(LoRAInitError, match=r"orthogonal.*fc1.*even"):
        initialize_lora(model, None, method="orthogonal", progress=False)
    assert_same_state(before, model_state(model))


# ------------------------------------------------------------------------------------------ PiSSA / MiLoRA
@pytest.mark.parametrize("kind,rslora", [("mlp", False), ("llama", False), ("llama", True)],
                         ids=["mlp", "llama", "llama-rslora"])
@pytest.mark.parametrize("method", ["pissa", "milora"])
def test_weight_svd_methods_equal_the_kernel_and_keep_the_output(kind, rslora, method):
    build, batches_fn, out_fn = BUILDS[kind]
    model = build(r=4, alpha=8, **({"rslora": True} if rslora else {}))
    batches = batches_fn()
    W0 = _weights(model)
    y0 = _mlp_out(model, batches) if kind == "mlp" else _lm_out(model, batches)
    cfg = PiSSAConfig() if method == "pissa" else MiLoRAConfig()
    report = initialize_lora(model, None, method=method, config=cfg, progress=False)
    assert report.info["base_modified"] is True
    for name, t in find_targets(model).items():
        sigma = 8 / math.sqrt(4) if rslora else 8 / 4
        assert t.scaling == pytest.approx(sigma)
        # one-layer kernel call on the original weight (the method stacks same-shape layers)
        ref = (lkm.pissa if method == "pissa" else lkm.milora)(W0[name], t.r, scaling=sigma)
        assert rel(t.lora_A.detach(), ref.lora_A) < 1e-4, name
        assert rel(t.lora_B.detach(), ref.lora_B) < 1e-4, name
        # residual base + adapter = the original weight
        W = t.weight_torch().detach().double() + sigma * t.lora_B.detach().double() @ t.lora_A.detach().double()
        assert rel(W, W0[name]) < 1e-6, name
        # the adapter holds the principal (PiSSA) or minor (MiLoRA) part of the spectrum
        S = torch.linalg.svdvals(W0[name].double())
        held = torch.linalg.svdvals(sigma * t.lora_B.detach().double() @ t.lora_A.detach().double())[:t.r]
        want = S[:t.r] if method == "pissa" else S[-t.r:]
        assert torch.allclose(held, want, rtol=1e-4, atol=1e-6), name
    y1 = out_fn(model, batches)
    assert rel(y1, y0) < 1e-5


def test_fast_pissa_equals_the_batched_randomized_kernel():
    model = tiny_llama(seed=5, r=4)
    W0 = _weights(model)
    initialize_lora(model, None, method="pissa", config=PiSSAConfig(niter=2, oversample=4, seed=7), progress=False)
    targets = find_targets(model)
    gen = torch.Generator().manual_seed(7)
    groups = OrderedDict()
    for name, t in targets.items():
        groups.setdefault((t.m, t.n, t.r, t.scaling), []).append(name)
    for (m, n, r, sigma), names in groups.items():
        ref = lkm.pissa(torch.stack([W0[k] for k in names]), r, scaling=sigma, niter=2, oversample=4, generator=gen)
        for i, name in enumerate(names):
            assert rel(targets[name].lora_A.detach(), ref.lora_A[i]) < 1e-5, name
            assert rel(targets[name].weight_torch().detach().float() - W0[name], ref.base_delta[i]) < 1e-4, name


# ------------------------------------------------------------------------------------------ LoRA-GA / LoRA-One
def _brute_grads(model, kind, batches):
    ref = brute_stats(model, batches, kind="lm" if kind == "llama" else "mlp", loss_fn=mlp_loss)
    return {n: r["G"] for n, r in ref.items()}


def _run_grad_method(kind, method, config, rslora=False):
    build, batches_fn, out_fn = BUILDS[kind]
    model = build(r=2, alpha=4, **({"rslora": True} if rslora else {}))
    batches = batches_fn()
    G = _brute_grads(model, kind, batches)
    W0 = _weights(model)
    y0 = out_fn(model, batches)
    kw = {"loss_fn": mlp_loss} if kind == "mlp" else {}
    report = initialize_lora(model, batches, method=method, config=config, num_samples=None, progress=False, **kw)
    return model, batches, G, W0, y0, report


@pytest.mark.parametrize("kind,rslora", [("mlp", False), ("llama", True)], ids=["mlp", "llama-rslora"])
def test_lora_ga_equals_the_kernel_on_the_brute_force_gradient(kind, rslora):
    cfg = LoRAGAConfig(niter=None)  # exact SVD, so the comparison does not depend on a sketch
    model, batches, G, W0, y0, report = _run_grad_method(kind, "lora_ga", cfg, rslora)
    out_fn = BUILDS[kind][2]
    for name, t in find_targets(model).items():
        g = G[name].float()
        ref = lkm.lora_ga(g, t.r, scaling=t.scaling)
        assert t.scaling == pytest.approx(4 / math.sqrt(2) if rslora else 2.0)
        assert rel(t.lora_A.detach(), ref.lora_A) < 1e-3, name
        assert rel(t.lora_B.detach(), ref.lora_B) < 1e-3, name
        # reference scale "stable": rows of A / columns of B have norm m^(1/4) / sqrt(16)
        c = t.m ** 0.25 / 4.0
        assert torch.allclose(t.lora_A.detach().norm(dim=1), torch.full((t.r,), c), rtol=1e-4), name
        # LoRA-GA subtracts its init: residual + adapter = W
        W = t.weight_torch().detach().double() + t.scaling * t.lora_B.detach().double() @ t.lora_A.detach().double()
        assert rel(W, W0[name]) < 1e-6, name
    assert rel(out_fn(model, batches), y0) < 1e-5
    assert report.info["base_modified"] is True


@pytest.mark.parametrize("kind,rslora", [("mlp", False), ("llama", True)], ids=["mlp", "llama-rslora"])
@pytest.mark.parametrize("normalize", [True, False])
def test_lora_one_is_the_best_rank_r_gradient_step(kind, rslora, normalize):
    cfg = LoRAOneConfig(normalize=normalize, stable_gamma=64.0)
    model, batches, G, W0, y0, report = _run_grad_method(kind, "lora_one", cfg, rslora)
    for name, t in find_targets(model).items():
        g = G[name]
        U, S, Vh = torch.linalg.svd(-g, full_matrices=False)
        d = S[0] if normalize else 1.0
        want = t.scaling / (64.0 * d) * (U[:, :t.r] * S[:t.r]) @ Vh[:t.r]  # the paper's formula, by hand
        got = t.scaling * t.lora_B.detach().double() @ t.lora_A.detach().double()
        assert rel(got, want) < 1e-3, name
        ref = lkm.lora_one(g.float(), t.r, scaling=t.scaling, stable_gamma=64.0, normalize=normalize)
        assert rel(t.lora_A.detach(), ref.lora_A) < 1e-3, name
        assert torch.equal(t.weight_torch(), W0[name]), name  # no base subtraction by default
    assert report.info["base_modified"] is False


def test_lora_one_subtract_init_keeps_the_output():
    model, batches, G, W0, y0, report = _run_grad_method("mlp", "lora_one", LoRAOneConfig(subtract_init=True))
    assert rel(_mlp_out(model, batches), y0) < 1e-5
    assert report.info["base_modified"] is True


def test_lora_ga_needs_2r_le_min_dim_and_leaves_the_model_alone():
    model = tiny_mlp(seed=0, r=3)  # head is 5 x 24: 2r = 6 > 5
    before = model_state(model)
    with pytest.raises(LoRAInitError, match=r"lora_ga.*head.*2r <= min"):
        initialize_lora(model, mlp_batches(), method="lora_ga", loss_fn=mlp_loss, progress=False)
    assert_same_state(before, model_state(model))


# ------------------------------------------------------------------------------------------ data handling
@pytest.mark.parametrize("method", ["lora_ga", "lora_one", "hrp"])
def test_data_methods_refuse_dataloader_none(method):
    model = tiny_mlp(seed=0, r=2)
    before = model_state(model)
    with pytest.raises(LoRAInitError, match="needs data"):
        initialize_lora(model, None, method=method, progress=False)
    assert_same_state(before, model_state(model))


class _Batch:
    """A batch type lorainit knows nothing about."""

    def __init__(self, x, y):
        self.x, self.y = x, y


def test_loss_fn_gets_the_batches_exactly_as_yielded():
    batches = [_Batch(x, y) for x, y in mlp_batches()]
    seen = []

    def loss_fn(model, batch):
        seen.append(batch)
        return mlp_loss(model, (batch.x, batch.y))

    model = tiny_mlp(seed=0, r=2)
    initialize_lora(model, batches, method="lora_one", loss_fn=loss_fn, num_samples=None, progress=False)
    assert seen and all(any(b is s for b in batches) for s in seen)
    # the same as with tuple batches
    ref = tiny_mlp(seed=0, r=2)
    initialize_lora(ref, mlp_batches(), method="lora_one", loss_fn=mlp_loss, num_samples=None, progress=False)
    for name, t in find_targets(model).items():
        assert rel(t.lora_A.detach(), find_targets(ref)[name].lora_A.detach()) < 1e-6


def test_zero_gradient_module_is_named():
    model = tiny_mlp(seed=0, r=2)
    before = model_state(model)

    def loss_fn(m, batch):  # never uses fc2 / head
        x, _ = batch
        return m.base_model.model.fc1(x).pow(2).sum()

    with pytest.raises(LoRAInitError, match="fc2"):
        initialize_lora(model, mlp_batches(), method="lora_one", loss_fn=loss_fn, progress=False)
    assert_same_state(before, model_state(model))


# ------------------------------------------------------------------------------------------ save / load
def test_save_pretrained_roundtrip(tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = tiny_llama(seed=4, r=2)
    batches = lm_batches(n=8, bs=4, seed=2)
    base_state = {k: v.clone() for k, v in model.get_base_model().state_dict().items() if "lora_" not in k}
    initialize_lora(model, batches, method="lora_one", config=LoRAOneConfig(stable_gamma=8.0), progress=False)
    y = _lm_out(model, batches)
    model.save_pretrained(tmp_path / "adapter")
    # a fresh base with the same (untouched: LoRA-One does not change it) weights
    fresh = LlamaForCausalLM(model.get_base_model().config)
    missing = fresh.load_state_dict({k.replace(".base_layer", ""): v for k, v in base_state.items()}, strict=False)
    assert not missing.missing_keys
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    assert rel(_lm_out(loaded, batches), y) < 1e-6
    assert rel(_lm_out(loaded, batches), _lm_out(tiny_llama(seed=4, r=2), batches)) > 1e-4  # the adapter matters


@pytest.mark.parametrize("method,cls", [("lora_ga", LoRAGAConfig), ("lora_one", LoRAOneConfig)])
def test_gradient_methods_under_max_memory_match_one_pass(method, cls):
    """max_memory cuts the weight-gradient pass into groups; the adapters (randomized SVD, seed 0) stay identical."""
    from lorainit.methods.baselines import gradient_groups  # noqa: F401  (public helper of the plan)

    def run(**kw):
        model = tiny_llama(r=2, alpha=4)
        rep = initialize_lora(model, lm_batches(), method=method, config=cls(niter=2, oversample=4, **kw),
                              num_samples=None, progress=False)
        return {n: (t.lora_A.detach().clone(), t.lora_B.detach().clone()) for n, t in find_targets(model).items()}, rep

    full, rep_full = run()
    targets = find_targets(tiny_llama(r=2, alpha=4))
    largest = max(4 * t.m * t.n for t in targets.values())
    budget = 3 * largest  # room for about two accumulators beside one solve: several passes
    grouped, rep = run(max_memory=budget)
    assert rep_full.info["passes"] == 1 and rep.info["passes"] > 1
    from lorainit.memory import estimate_memory
    plan = estimate_memory(tiny_llama(r=2, alpha=4), method, cls(max_memory=budget))
    assert len(plan.groups) == rep.info["passes"] and plan.peak_bytes <= budget
    assert rep.info["memory"]["over_budget"] == []
    per_call, _ = run(max_batch=1)
    for name, (A, B) in full.items():
        assert torch.equal(grouped[name][0], A) and torch.equal(grouped[name][1], B), name
        assert torch.equal(per_call[name][0], A) and torch.equal(per_call[name][1], B), name


def test_gradient_budget_below_one_layer_warns_and_names_it():
    from lorainit.errors import LoRAInitWarning

    model = tiny_llama(r=2, alpha=4)
    with pytest.warns(LoRAInitWarning, match="below one layer's weight-gradient working set"):
        rep = initialize_lora(model, lm_batches(), method="lora_ga", config=LoRAGAConfig(max_memory=1024),
                              num_samples=None, progress=False)
    assert rep.info["passes"] == len(find_targets(model))
    assert rep.info["memory"]["over_budget"]
    with pytest.raises(ValueError, match="max_memory"):
        LoRAGAConfig(max_memory=0)
