"""sigma_max(dW) for LoRA-DA's step normalization (``_Prepared.step_norm``): subspace iteration started
from A instead of a full-tolerance LOBPCG. The chosen step ``eta dW A A^T / sigma_max`` must stay within
1% of the exact one (issue 27); in practice it is within fp32 rounding."""
import math
import warnings

import pytest
import torch

import lorainit_kernels as lk
from lorainit_kernels.linalg import guidance as gd

from bench.spectra import kfac_stats as smollm2_like_stats


def _random_stats(m, n, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(2 * n + 3, n, generator=g, dtype=torch.float64)
    Z = X.T @ X / X.shape[0]
    G = torch.randn(m, n, generator=g, dtype=torch.float64)
    s = torch.rand(m, generator=g, dtype=torch.float64) + 0.05
    return Z.to(dtype), G.to(dtype), s.to(dtype)


def _exact(Z, G, s, **kw):
    prep = gd._Prepared("ref", Z.double(), G.double(), s.double(), 1e4, kw.get("damping", 0.1),
                        kw.get("bias_weight", 1.0), 1.0, True)
    prep.omega("torch")
    return prep.dW, torch.linalg.matrix_norm(prep.dW, ord=2)


@pytest.mark.parametrize("data", ["smollm2_like", "random"])
@pytest.mark.parametrize("m,n", [(96, 160), (161, 97), (40, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("solver", ["eigh", "lobpcg"])
def test_step_is_unchanged(data, m, n, dtype, solver):
    seed = 1000 * m + n
    if data == "smollm2_like":
        Z, G, s = (t.to(dtype) for t in smollm2_like_stats((2,), m, n, seed=seed))
    else:
        Zs, Gs, ss = zip(*(_random_stats(m, n, seed + i, dtype) for i in range(2)))
        Z, G, s = torch.stack(Zs), torch.stack(Gs), torch.stack(ss)
    r = 4
    A, P, _, info = lk.lora_da_factors(Z, G, s, r, n_train=1e4, solver=solver, return_info=True, step_norm=True)
    dW, nu_ref = _exact(Z, G, s)
    nu = info["step_norm"]
    assert nu.dtype == torch.float64 and nu.shape == (2,)
    # the requirement: the step eta dW A A^T / nu within 1% of the one with the exact sigma_max
    Ad = A.double()
    step, step_ref = dW @ Ad @ Ad.mT / nu[:, None, None], dW @ Ad @ Ad.mT / nu_ref[:, None, None]
    assert float(((step - step_ref).norm(dim=(-2, -1)) / step_ref.norm(dim=(-2, -1))).max()) < 1e-2
    # and in fact to rounding: sigma is the fp64 norm of an fp32 Ritz vector's image
    assert float(((nu - nu_ref).abs() / nu_ref).max()) < (1e-9 if dtype == torch.float64 else 1e-5)


def test_without_a_start_and_without_the_bias_term():
    """bias_weight = 0: A says nothing about dW; the random start still converges."""
    Z, G, s = smollm2_like_stats((), 70, 90, seed=3)
    _, _, _, info = lk.lora_da_factors(Z, G, s, 3, n_train=1e4, bias_weight=0.0, return_info=True)
    _, nu_ref = _exact(Z, G, s, bias_weight=0.0)
    assert abs(float(info["step_norm"]) / float(nu_ref) - 1) < 1e-9


def test_non_convergence_warns_with_the_batch_index():
    Z, G, s = _random_stats(120, 150, 5, torch.float64)
    prep = gd._Prepared("lora_da_factors", Z[None], G[None], s[None], 1e4, 0.1, 1.0, 1.0, True)
    prep.omega("torch")
    with pytest.warns(RuntimeWarning, match=r"did not settle.*batch index \(0,\)"):
        nu = prep.step_norm(maxiter=2)          # a random start, flat spectrum: 2 iterations are not enough
    _, nu_ref = _exact(Z, G, s)
    assert 0 < float(nu[0]) <= float(nu_ref) * (1 + 1e-12)   # a Ritz value: a lower bound
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prep.step_norm()
    assert math.isfinite(float(nu[0]))


@pytest.mark.parametrize("solver,n,m", [("eigh", 53, 29), ("lobpcg", 203, 71)])
def test_a_layers_factors_do_not_depend_on_its_batch(solver, n, m):
    """Bitwise: a layer solved in a stack of three gives what it gives alone (the LOBPCG start is seeded
    per layer, sigma_max(dW) iterates per matrix), so a solve may batch layers of one shape freely."""
    stats = [_random_stats(m, n, 70 + i, torch.float32) for i in range(3)]
    kw = dict(n_train=1e4, solver=solver, return_info=True, step_norm=True)
    A, P, ev, info = lk.lora_da_factors(*(torch.stack(t) for t in zip(*stats)), 5, seeds=[3, 4, 5], **kw)
    for i, (Z, G, s) in enumerate(stats):
        Ai, Pi, evi, infoi = lk.lora_da_factors(Z[None], G[None], s[None], 5, seeds=[3 + i], **kw)
        assert torch.equal(A[i], Ai[0]) and torch.equal(P[i], Pi[0]) and torch.equal(ev[i], evi[0])
        assert torch.equal(info["step_norm"][i], infoi["step_norm"][0])


def test_non_convergence_names_only_the_matrices_that_did_not_settle():
    Z, G, s = _random_stats(120, 150, 5, torch.float64)
    g = torch.Generator().manual_seed(9)
    G1 = torch.randn(120, 1, generator=g, dtype=torch.float64) @ torch.randn(1, 150, generator=g, dtype=torch.float64)
    prep = gd._Prepared("lora_da_factors", torch.stack([Z, Z]), torch.stack([G1, G]), torch.stack([s, s]),
                        1e4, 0.1, 1.0, 1.0, True)
    prep.omega("torch")
    with pytest.warns(RuntimeWarning, match=r"did not settle.*batch index \(1,\);"):
        nu = prep.step_norm(maxiter=3)  # rank-one dW settles in 3 iterations, the flat spectrum does not
    dW, _ = _exact(Z, G1, s)
    assert abs(float(nu[0]) / float(torch.linalg.matrix_norm(dW, ord=2)) - 1) < 1e-12
