"""LoRADAConfig's defaults come from lorainit_kernels.defaults; solver options reach the solver; the shared
per-layer helpers of lorainit.methods.common."""
import warnings

import pytest
import torch

from lorainit_kernels import defaults
from lorainit.init import initialize_lora
from lorainit.methods.common import finalize, layer_groups
from lorainit.methods.lora_da import LoRADAConfig
from lorainit.targets import find_targets

from helpers import mlp_batches, mlp_loss, tiny_mlp


def test_defaults_are_the_cores():
    cfg = LoRADAConfig()
    assert (cfg.damping, cfg.bias_weight, cfg.variance_weight, cfg.fisher, cfg.normalize_step) == (
        defaults.DAMPING, defaults.BIAS_WEIGHT, defaults.VARIANCE_WEIGHT, defaults.FISHER, defaults.NORMALIZE_STEP)
    assert cfg.step_grid == tuple(defaults.STEP_GRID)
    assert cfg.step_scale == "auto" and cfg.solver == "auto" and cfg.solver_options == {}


@pytest.mark.parametrize("options", [{"tol": 0.0}, {"maxiter": 0}, {"tol": "small"}, {"precond": 1}, [("tol", 1e-3)]])
def test_bad_solver_options_are_refused(options):
    with pytest.raises((ValueError, TypeError), match="solver_options"):
        LoRADAConfig(solver_options=options)
    with pytest.raises(ValueError, match="solver must be"):
        LoRADAConfig(solver="svd")


@pytest.mark.parametrize("solver", ["eigh", "lobpcg", "auto"])
def test_report_records_the_solvers_own_convergence(solver):
    model = tiny_mlp(seed=1)
    rep = initialize_lora(model, mlp_batches(), config=LoRADAConfig(step_scale=0.1, solver=solver), loss_fn=mlp_loss,
                          progress=False)
    for row in rep.layers:
        assert row["solver"] in ("eigh", "lobpcg") and (solver == "auto" or row["solver"] == solver)
        assert isinstance(row["converged"], bool) and row["converged"]
        assert 0 <= row["residual"] < 1e-3  # relative to ||Omega|| + |lambda|; fp32 LOBPCG stops near sqrt(eps)
        assert row["iters"] >= 0


def test_solver_options_reach_the_lobpcg():
    model = tiny_mlp(seed=1)
    cfg = LoRADAConfig(step_scale=0.1, solver="lobpcg", solver_options={"maxiter": 1})
    rep = initialize_lora(model, mlp_batches(), config=cfg, loss_fn=mlp_loss, progress=False)
    assert all(row["iters"] <= 1 for row in rep.layers)
    assert rep.config["solver_options"] == {"maxiter": 1}


def test_layer_groups_split_by_dtype_and_finalize_casts_consistently():
    model = tiny_mlp(seed=0)
    targets = find_targets(model)
    names = list(targets)
    assert len(layer_groups(targets, key=lambda t: ())) == 1
    targets[names[1]].base.double()  # a different base dtype: never stacked with the others
    groups = layer_groups(targets, key=lambda t: ())
    assert [g for _, g in groups] == [[names[0], names[2]], [names[1]]]
    assert [g for _, g in layer_groups(targets, key=lambda t: (), max_batch=1)] == [[n] for n in (names[0], names[2],
                                                                                                  names[1])]
    t = targets[names[0]]
    t.module.lora_A[t.adapter].half()
    A = torch.randn(t.r, t.n, dtype=torch.float64)
    B = torch.randn(t.m, t.r, dtype=torch.float64)
    f = finalize(t, A, B, -(t.scaling * B @ A))
    assert f.lora_A.dtype == torch.float16 and f.lora_B.dtype == t.lora_B.dtype
    assert torch.allclose(f.base_delta, -(t.scaling * f.lora_B.float() @ f.lora_A.float()))
    assert finalize(t, A, B).base_delta is None


# ------------------------------------------------------------------ what the report and one warning say
def test_auto_falling_back_to_b_zero_says_so_with_the_scores():
    from helpers import lm_batches, tiny_llama

    from lorainit import LoRAInitWarning, initialize_lora
    from lorainit.methods.lora_da import LoRADAConfig

    model = tiny_llama(seed=3)
    # steps a million times the layer's own: every one of them raises the held-out loss
    cfg = LoRADAConfig(step_scale="auto", step_grid=(1e6, 1e7), holdout_fraction=0.25)
    with pytest.warns(LoRAInitWarning, match="B = 0") as rec:
        report = initialize_lora(model, lm_batches(n=16, bs=4), config=cfg, progress=False)
    assert sum("B = 0" in str(w.message) for w in rec) == 1
    search = report.info["step_search"]
    assert search["fallback"] is True and report.info["step_scale"] == 0.0
    assert set(search["scores"]) == {"0.0", "1000000.0", "10000000.0"}


def test_warnings_for_n_train_fallback_and_rank_deficient_statistics():
    from helpers import lm_batches, tiny_llama

    from lorainit import LoRAInitWarning, initialize_lora
    from lorainit.methods.lora_da import LoRADAConfig

    model = tiny_llama(seed=4)
    few = lm_batches(n=2, bs=2)  # a plain list (no dataset length) with fewer tokens than the hidden size
    with pytest.warns(LoRAInitWarning) as rec:
        report = initialize_lora(model, few, config=LoRADAConfig(step_scale=0.5), progress=False)
    text = [str(w.message) for w in rec]
    assert sum("n_train fell back" in t for t in text) == 1
    assert sum("fewer statistics tokens than their input dimension" in t for t in text) == 1
    assert "n_train_fallback" in report.info["warnings"] and report.info["rank_deficient_Z"]
    # with n_train given and enough tokens, neither warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", LoRAInitWarning)
        initialize_lora(tiny_llama(seed=4), lm_batches(n=24, bs=4),
                        config=LoRADAConfig(step_scale=0.5, n_train=1e5), progress=False)
