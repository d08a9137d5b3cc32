"""guidance_matrix and lora_da_factors against a plain float64 formula with explicit inverses."""
import pytest
import torch

import lorainit_kernels as lk
from lorainit_kernels import ops
from linalg_helpers import (kfac_stats, reference_guidance, scipy_eigh, sin_theta, objective,
                            weighted_gram_backend)

BACKEND = weighted_gram_backend()
N_TRAIN = 500.0


def _plain_fp32_guidance(Z, G, s, *, n_train, damping=1e-3, alpha=1.0, beta=1.0, fisher=True):
    """The same formula as the reference, computed naively in float32 (the error yardstick)."""
    Z, G, s = Z.float(), G.float(), s.float()
    n = Z.shape[-1]
    Zd = Z + damping * Z.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None] * torch.eye(n)
    sd = s + damping * s.mean(-1, keepdim=True)
    Zi = torch.linalg.inv(Zd)
    dW = -(G @ Zi) / sd[..., :, None] if fisher else -G
    c = beta * (1.0 / sd).sum(-1) / n_train
    return c[..., None, None] * Zi - alpha * dW.transpose(-1, -2) @ dW, dW


def _rel(a, b):
    return (torch.linalg.norm((a.double() - b.double()).flatten()) / torch.linalg.norm(b.double().flatten())).item()


@pytest.mark.parametrize("batch", [(), (3,), (2, 3)])
@pytest.mark.parametrize("fisher", [True, False])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.0, 1.0), (1.0, 0.0), (2.5, 0.3)])
def test_guidance_matches_reference_fp64(batch, fisher, weights):
    alpha, beta = weights
    Z, G, s = kfac_stats(batch, 12, 20, seed=hash((batch, fisher, weights)) % 1000)
    Om, dW = lk.guidance_matrix(Z, G, s, n_train=N_TRAIN, damping=1e-2, bias_weight=alpha, variance_weight=beta,
                                fisher=fisher, backend=BACKEND)
    Om_r, dW_r = reference_guidance(Z, G, s, n_train=N_TRAIN, damping=1e-2, alpha=alpha, beta=beta, fisher=fisher)
    assert Om.shape == batch + (20, 20) and dW.shape == batch + (12, 20)
    assert Om.dtype == torch.float64
    assert _rel(Om, Om_r) < 1e-10
    assert _rel(dW, dW_r) < 1e-12
    assert torch.equal(Om, Om.transpose(-1, -2))


@pytest.mark.parametrize("fisher", [True, False])
def test_guidance_fp32_error_within_plain_fp32(fisher):
    Z, G, s = kfac_stats((4,), 24, 40, cond=1e3, seed=7)
    Om_r, dW_r = reference_guidance(Z, G, s, n_train=N_TRAIN, fisher=fisher)
    Om, dW = lk.guidance_matrix(Z.float(), G.float(), s.float(), n_train=N_TRAIN, damping=1e-3, fisher=fisher,
                                backend=BACKEND)
    Om_p, dW_p = _plain_fp32_guidance(Z, G, s, n_train=N_TRAIN, fisher=fisher)
    assert Om.dtype == torch.float32
    assert _rel(Om, Om_r) <= 4 * _rel(Om_p, Om_r) + 1e-6
    assert _rel(dW, dW_r) <= 4 * _rel(dW_p, dW_r) + 1e-6


def test_guidance_uses_weighted_gram(monkeypatch):
    """Omega is assembled through ops.weighted_gram (the fused kernel), with weights -alpha / s_d^2."""
    calls = []
    real = ops.weighted_gram

    def spy(v, weights=None, *, out=None):
        calls.append((tuple(v.shape), None if weights is None else weights.clone()))
        return real(v, weights, out=out)

    monkeypatch.setattr(ops, "weighted_gram", spy)
    Z, G, s = kfac_stats((2,), 6, 10, seed=3)
    lk.guidance_matrix(Z, G, s, n_train=N_TRAIN, bias_weight=0.7, damping=0.1, backend=BACKEND)
    assert len(calls) == 1 and calls[0][0] == (2, 6, 10)
    sd = s + 0.1 * s.mean(-1, keepdim=True)
    torch.testing.assert_close(calls[0][1], -0.7 / sd ** 2)


def test_damping_is_relative():
    """Scaling Z by a and s by b scales Omega as the formula says: damping is relative."""
    Z, G, s = kfac_stats((), 8, 12, seed=11)
    Om1, dW1 = lk.guidance_matrix(Z, G, s, n_train=N_TRAIN, damping=0.05, backend=BACKEND)
    a, b = 1e3, 1e-2
    Om2, dW2 = lk.guidance_matrix(a * Z, G, b * s, n_train=N_TRAIN, damping=0.05, backend=BACKEND)
    # dW scales by 1/(a b); Z_d^-1 by 1/a and sum 1/s_d by 1/b -> Omega by 1/(a b) and 1/(a b)^2 per term
    Om_r, _ = reference_guidance(a * Z, G, b * s, n_train=N_TRAIN, damping=0.05)
    assert _rel(dW2, dW1 / (a * b)) < 1e-10
    assert _rel(Om2, Om_r) < 1e-10


def test_cholesky_retried_in_fp64():
    """A damped Z that fp32 Cholesky rejects but fp64 accepts is factored in fp64 (no error)."""
    g = torch.Generator().manual_seed(5)
    n = 64
    Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    ev = torch.ones(n, dtype=torch.float64)
    ev[-8:] = 2e-8                                  # PD in fp64, below fp32 Cholesky's backward error
    Z = ((Q * ev) @ Q.T).float()
    Z = 0.5 * (Z + Z.T)
    assert int(torch.linalg.cholesky_ex(Z)[1]) > 0, "precondition: fp32 Cholesky must fail on this matrix"
    assert int(torch.linalg.cholesky_ex(Z.double())[1]) == 0, "precondition: fp64 Cholesky must succeed"
    G = torch.randn(5, n, generator=g)
    s = torch.rand(5, generator=g) + 0.5
    Om, dW = lk.guidance_matrix(Z, G, s, n_train=N_TRAIN, damping=0.0, backend=BACKEND)
    assert Om.dtype == torch.float32 and torch.isfinite(Om).all() and torch.isfinite(dW).all()
    _, dW_r = reference_guidance(Z.double(), G.double(), s.double(), n_train=N_TRAIN, damping=0.0)
    assert _rel(dW, dW_r) < 1e-5


def test_not_positive_definite_names_batch_index():
    Z, G, s = kfac_stats((2, 3), 4, 6, seed=1)
    Z = Z.clone()
    Z[1, 2] = -torch.eye(6, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"not positive definite.*batch index \(1, 2\)"):
        lk.guidance_matrix(Z, G, s, n_train=N_TRAIN, backend=BACKEND)


@pytest.mark.parametrize("case, pattern", [
    ("nonsquare", r"Z must be square"),
    ("G_shape", r"G has shape \(2, 5, 7\)"),
    ("s_shape", r"s has shape \(2, 4\)"),
    ("nan", r"G .* NaN/Inf .* batch index \(1,\)"),
    ("n_train", r"n_train"),
    ("damping", r"damping must be finite and >= 0"),
    ("alpha", r"bias_weight must be finite and >= 0"),
    ("beta", r"variance_weight must be finite and >= 0"),
    ("neg_s", r"s .* negative entries at batch index \(0,\)"),
])
def test_guidance_bad_input(case, pattern):
    Z, G, s = kfac_stats((2,), 5, 6, seed=2)
    kw = dict(n_train=N_TRAIN)
    if case == "nonsquare":
        Z = Z[..., :5]
    elif case == "G_shape":
        G = torch.zeros(2, 5, 7, dtype=torch.float64) + 1
    elif case == "s_shape":
        s = s[..., :4]
    elif case == "nan":
        G = G.clone()
        G[1, 0, 3] = float("nan")
    elif case == "n_train":
        kw["n_train"] = 0
    elif case == "damping":
        kw["damping"] = -1e-3
    elif case == "alpha":
        kw["bias_weight"] = -1.0
    elif case == "beta":
        kw["variance_weight"] = float("inf")
    elif case == "neg_s":
        s = s.clone()
        s[0, 1] = -1.0
    with pytest.raises(ValueError, match=pattern):
        lk.guidance_matrix(Z, G, s, backend=BACKEND, **kw)


# ---------------------------------------------------------------------------------------------
# lora_da_factors
# ---------------------------------------------------------------------------------------------
def _check_factors(A, P, evals, Om_r, dW_r, rank, *, sin_tol, obj_tol):
    batch = tuple(Om_r.shape[:-2])
    n = Om_r.shape[-1]
    assert A.shape == batch + (n, rank) and P.shape == batch + (dW_r.shape[-2], rank) and evals.shape == batch + (rank,)
    eye = torch.eye(rank, dtype=torch.float64)
    assert (A.double().transpose(-1, -2) @ A.double() - eye).abs().max() < (1e-5 if A.dtype == torch.float32 else 1e-12)
    assert (evals[..., 1:] >= evals[..., :-1]).all(), "evals must be ascending"
    lam, vec = scipy_eigh(Om_r, 0, rank)
    opt = lam[..., :rank].sum(-1)
    obj = objective(Om_r, A)
    scale = lam.abs().amax(-1)
    assert ((obj - opt).abs() <= obj_tol * scale).all(), ((obj - opt) / scale)
    gap = lam[..., rank] - lam[..., rank - 1]
    wide = gap > 1e-3 * scale
    if bool(wide.any()):
        assert (sin_theta(A, vec[..., :rank])[wide] <= sin_tol).all()
    # evals are the Ritz values of the returned A on Omega
    ritz = torch.linalg.eigvalsh(A.double().transpose(-1, -2) @ Om_r @ A.double())
    assert ((evals.double() - ritz).abs() <= obj_tol * scale[..., None] + 1e-6 * ritz.abs()).all()
    # P = dW A
    Pr = dW_r @ A.double()
    assert _rel(P, Pr) < (1e-3 if P.dtype == torch.float32 else 1e-10)


@pytest.mark.parametrize("solver", ["eigh", "lobpcg"])
@pytest.mark.parametrize("batch", [(), (3,), (2, 3)])
@pytest.mark.parametrize("fisher", [True, False])
def test_factors_fp64(solver, batch, fisher):
    rank = 4
    Z, G, s = kfac_stats(batch, 20, 48, seed=len(batch) * 10 + int(fisher))
    A, P, evals = lk.lora_da_factors(Z, G, s, rank, n_train=N_TRAIN, damping=1e-3, fisher=fisher, solver=solver, backend=BACKEND)
    Om_r, dW_r = reference_guidance(Z, G, s, n_train=N_TRAIN, fisher=fisher)
    _check_factors(A, P, evals, Om_r, dW_r, rank, sin_tol=1e-5, obj_tol=1e-9)


@pytest.mark.parametrize("solver", ["eigh", "lobpcg"])
def test_factors_fp32_within_plain_fp32_error(solver):
    """fp32 factors: the objective gap to the fp64 optimum is within a small multiple of fp32 eigh's."""
    rank = 6
    Z, G, s = kfac_stats((3,), 40, 96, cond=1e3, seed=21)
    Om_r, dW_r = reference_guidance(Z, G, s, n_train=N_TRAIN)
    # tol=1e-4: at the default fp32 tol (sqrt(eps) = 3.5e-4) the objective gap depends on the random start
    A, P, evals = lk.lora_da_factors(Z.float(), G.float(), s.float(), rank, n_train=N_TRAIN, damping=1e-3, solver=solver,
                                     tol=1e-4 if solver == "lobpcg" else None,
                                     backend=BACKEND)
    assert A.dtype == P.dtype == evals.dtype == torch.float32
    lam, _ = scipy_eigh(Om_r, 0, rank - 1)
    opt = lam.sum(-1)
    Om_p, _ = _plain_fp32_guidance(Z, G, s, n_train=N_TRAIN)
    A_p = torch.linalg.eigh(Om_p)[1][..., :rank]
    err_plain = (objective(Om_r, A_p) - opt).abs()
    err = (objective(Om_r, A) - opt).abs()
    assert (err <= 10 * err_plain + 1e-6 * opt.abs()).all(), (err, err_plain)
    _check_factors(A, P, evals, Om_r, dW_r, rank, sin_tol=1e-2, obj_tol=1e-4)


def test_factors_indefinite_with_positive_tail():
    """alpha, beta > 0 and the r-th smallest eigenvalue positive: A must still be Omega's bottom."""
    rank = 8
    kw = dict(n_train=N_TRAIN, variance_weight=100.0, damping=1e-3)
    Z, G, s = kfac_stats((2,), 12, 40, seed=4)
    Om_r, dW_r = reference_guidance(Z, G, s, n_train=N_TRAIN, beta=100.0)
    lam = torch.linalg.eigvalsh(Om_r)
    assert (lam[..., 0] < 0).all() and (lam[..., rank - 1] > 0).all(), "precondition: indefinite bottom"
    A, P, evals = lk.lora_da_factors(Z, G, s, rank, solver="lobpcg", backend=BACKEND, **kw)
    _check_factors(A, P, evals, Om_r, dW_r, rank, sin_tol=1e-5, obj_tol=1e-9)
    with pytest.raises(ValueError, match=r"rank must be .* min\(12, 40\)"):
        lk.lora_da_factors(Z, G, s, 13, backend=BACKEND, **kw)


def test_factors_batched_equals_one_by_one_and_deterministic():
    rank = 3
    Z, G, s = kfac_stats((2, 2), 10, 32, seed=9)
    A, P, ev = lk.lora_da_factors(Z, G, s, rank, n_train=N_TRAIN, damping=1e-3, solver="lobpcg", backend=BACKEND)
    A2, P2, ev2 = lk.lora_da_factors(Z, G, s, rank, n_train=N_TRAIN, damping=1e-3, solver="lobpcg", backend=BACKEND)
    assert torch.equal(A, A2) and torch.equal(P, P2) and torch.equal(ev, ev2)
    for i in range(2):
        for j in range(2):
            Ai, Pi, evi = lk.lora_da_factors(Z[i, j], G[i, j], s[i, j], rank, n_train=N_TRAIN, damping=1e-3,
                                             solver="lobpcg", backend=BACKEND)
            assert sin_theta(Ai, A[i, j]) < 1e-6
            torch.testing.assert_close(evi, ev[i, j], rtol=1e-9, atol=1e-9 * ev[i, j].abs().max().item())
            # P A^T is sign-independent
            assert _rel(Pi @ Ai.T, P[i, j] @ A[i, j].T) < 1e-5


def test_factors_warm_start():
    rank = 4
    Z, G, s = kfac_stats((2,), 16, 40, seed=13)
    Om_r, dW_r = reference_guidance(Z, G, s, n_train=N_TRAIN)
    _, vec = scipy_eigh(Om_r, 0, rank - 1)
    X = vec + 1e-3 * torch.randn(vec.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    A, P, evals = lk.lora_da_factors(Z, G, s, rank, n_train=N_TRAIN, damping=1e-3, X=X, solver="lobpcg", backend=BACKEND)
    _check_factors(A, P, evals, Om_r, dW_r, rank, sin_tol=1e-5, obj_tol=1e-9)


def test_factors_bad_input():
    Z, G, s = kfac_stats((2,), 5, 8, seed=2)
    with pytest.raises(ValueError, match=r"rank must be an int with 1 <= rank <= min\(m, n\) = min\(5, 8\)"):
        lk.lora_da_factors(Z, G, s, 6, n_train=N_TRAIN, damping=1e-3, backend=BACKEND)
    with pytest.raises(ValueError, match="rank must be"):
        lk.lora_da_factors(Z, G, s, 0, n_train=N_TRAIN, damping=1e-3, backend=BACKEND)
    with pytest.raises(ValueError, match="solver must be"):
        lk.lora_da_factors(Z, G, s, 2, n_train=N_TRAIN, damping=1e-3, solver="arpack", backend=BACKEND)
    with pytest.raises(ValueError, match="s has shape"):
        lk.lora_da_factors(Z, G, s[:1], 2, n_train=N_TRAIN, damping=1e-3, backend=BACKEND)
    Zn = Z.clone()
    Zn[1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"Z .* NaN/Inf .* batch index \(1,\)"):
        lk.lora_da_factors(Zn, G, s, 2, n_train=N_TRAIN, damping=1e-3, backend=BACKEND)


@pytest.mark.parametrize("mode", ["shift_invert", "formed", "operator"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_factors_solver_modes_and_info(mode, dtype):
    """Every LOBPCG mode finds Omega's bottom; return_info gives the solver info and sigma_max(dW)."""
    rank = 5
    Z, G, s = kfac_stats((2,), 24, 64, cond=1e3, seed=41)
    Om_r, dW_r = reference_guidance(Z, G, s, n_train=N_TRAIN)
    kw = {"shift_invert": dict(preconditioner="shift_invert"), "formed": {}, "operator": dict(form_omega=False)}[mode]
    kw["solver"] = "lobpcg"
    out = lk.lora_da_factors(Z.to(dtype), G.to(dtype), s.to(dtype), rank, n_train=N_TRAIN, damping=1e-3, backend=BACKEND,
                             return_info=True, **kw)
    assert len(out) == 4
    A, P, evals, info = out
    fp64 = dtype == torch.float64
    _check_factors(A, P, evals, Om_r, dW_r, rank, sin_tol=1e-5 if fp64 else 1e-2, obj_tol=1e-9 if fp64 else 1e-4)
    assert info["converged"].all() and info["iterations"].shape == (2,) and not info["fallback"]
    assert info["residual"].shape == (2, rank) and info["restarts"].shape == (2,)
    nu_ref = torch.linalg.matrix_norm(dW_r, ord=2)
    assert ((info["step_norm"] - nu_ref).abs() <= (1e-9 if fp64 else 1e-5) * nu_ref).all()
    if mode == "shift_invert":
        lam_min = torch.linalg.eigvalsh(Om_r)[..., 0]
        assert (info["shift"] < lam_min).all() and (info["factorizations"] >= 1).all()
        assert (info["shift"] >= -nu_ref ** 2 * (1 + 1e-4) - 1e-3 * lam_min.abs()).all()
    # the default return is the 3 values
    assert len(lk.lora_da_factors(Z, G, s, rank, n_train=N_TRAIN, damping=1e-3, backend=BACKEND, **kw)) == 3


def test_factors_mode_bad_input():
    Z, G, s = kfac_stats((), 6, 10, seed=2)
    with pytest.raises(ValueError, match="preconditioner must be"):
        lk.lora_da_factors(Z, G, s, 2, n_train=N_TRAIN, damping=1e-3, backend=BACKEND, preconditioner="jacobi")
    with pytest.raises(ValueError, match="needs form_omega=True"):
        lk.lora_da_factors(Z, G, s, 2, n_train=N_TRAIN, damping=1e-3, backend=BACKEND, preconditioner="shift_invert",
                           form_omega=False)


# ---------------------------------------------------------------------------------------------
# one source of defaults, solver="auto", one solver-info contract for both solvers
# ---------------------------------------------------------------------------------------------
def test_defaults_come_from_one_place():
    from lorainit_kernels import defaults

    Z, G, s = kfac_stats((), 10, 24, seed=3)
    Om, _ = lk.guidance_matrix(Z, G, s, n_train=N_TRAIN, backend=BACKEND)
    Om_d, _ = lk.guidance_matrix(Z, G, s, n_train=N_TRAIN, damping=defaults.DAMPING, backend=BACKEND)
    assert torch.equal(Om, Om_d)
    A, _, _ = lk.lora_da_factors(Z, G, s, 3, n_train=N_TRAIN, backend=BACKEND)
    A_d, _, _ = lk.lora_da_factors(Z, G, s, 3, n_train=N_TRAIN, damping=defaults.DAMPING, solver=defaults.SOLVER,
                                   backend=BACKEND)
    assert torch.equal(A, A_d)


@pytest.mark.parametrize("solver", ["eigh", "lobpcg"])
def test_solver_info_has_the_same_keys_for_both_solvers(solver):
    rank = 4
    Z, G, s = kfac_stats((2,), 16, 48, seed=5)
    Om_r, _ = reference_guidance(Z, G, s, n_train=N_TRAIN)
    A, P, evals, info = lk.lora_da_factors(Z, G, s, rank, n_train=N_TRAIN, damping=1e-3, solver=solver,
                                           backend=BACKEND, return_info=True)
    assert info["solver"] == solver
    assert info["iterations"].shape == (2,) and info["iterations"].dtype == torch.long
    assert (info["iterations"] == 0).all() == (solver == "eigh")
    assert info["converged"].shape == (2, rank) and info["converged"].dtype == torch.bool and info["converged"].all()
    # one residual definition: ||Omega a - lambda a|| / (||Omega||_2 + |lambda|)
    Ad = A.double()
    res = (Om_r @ Ad - Ad * evals[..., None, :]).norm(dim=-2)
    norm2 = torch.linalg.matrix_norm(Om_r, ord=2)[..., None]
    ref = res / (norm2 + evals.abs())
    assert info["residual"].shape == (2, rank)
    assert (info["residual"] <= 1.5e-8).all() and (ref <= 1.5e-8 * 1.01 + 1e-14).all()


def test_auto_solver_uses_the_crossover(monkeypatch):
    from lorainit_kernels import defaults

    Z, G, s = kfac_stats((), 12, 40, seed=6)
    monkeypatch.setitem(defaults.EIGH_CROSSOVER_N, "cpu", 41)
    info = lk.lora_da_factors(Z, G, s, 3, n_train=N_TRAIN, backend=BACKEND, return_info=True)[3]
    assert info["solver"] == "eigh"
    monkeypatch.setitem(defaults.EIGH_CROSSOVER_N, "cpu", 40)
    info = lk.lora_da_factors(Z, G, s, 3, n_train=N_TRAIN, backend=BACKEND, return_info=True)[3]
    assert info["solver"] == "lobpcg"
    monkeypatch.undo()
    assert lk.linalg.choose_solver(4096, 8, "cpu") == "lobpcg" and lk.linalg.choose_solver(64, 8, "cpu") == "eigh"


# ----------------------------------------------------------------------------- a shared Z, factored once
def _shared_stats(ms, n, seed, dtype=torch.float64):
    """One input (Z) read by several layers of output sizes ``ms``: their G, s."""
    Z, _, _ = kfac_stats((), 4, n, seed=seed, dtype=dtype)
    Gs, ss = [], []
    for i, m in enumerate(ms):
        _, G, s = kfac_stats((), m, n, seed=seed + 1 + i, dtype=dtype)
        Gs.append(G)
        ss.append(s)
    return Z, Gs, ss


@pytest.mark.parametrize("zshape", ["n,n", "1,n,n"])
@pytest.mark.parametrize("fisher", [True, False])
def test_shared_Z_broadcast_equals_stacked_copies(zshape, fisher):
    """Z (n, n) or (1, n, n) for a batch of layers that read one input = Z stacked per layer."""
    Z, Gs, ss = _shared_stats([9, 9, 9], 16, seed=21)
    G, s = torch.stack(Gs), torch.stack(ss)
    Zb = Z if zshape == "n,n" else Z[None]
    Om, dW = lk.guidance_matrix(Zb, G, s, n_train=N_TRAIN, damping=1e-2, fisher=fisher, backend=BACKEND)
    Om_s, dW_s = lk.guidance_matrix(Z.expand(3, 16, 16).clone(), G, s, n_train=N_TRAIN, damping=1e-2, fisher=fisher,
                                    backend=BACKEND)
    Om_r, dW_r = reference_guidance(Z.expand(3, 16, 16), G, s, n_train=N_TRAIN, damping=1e-2, fisher=fisher)
    assert _rel(Om, Om_s) < 1e-13 and _rel(dW, dW_s) < 1e-13
    assert _rel(Om, Om_r) < 1e-10 and _rel(dW, dW_r) < 1e-12


@pytest.mark.parametrize("solver", ["eigh", "lobpcg"])
def test_input_factor_shared_by_layers_of_different_m_equals_separate_solves(solver):
    """An InputFactor reused by q (m = 24) and k/v (m = 8) as under GQA: the factors of separate solves,
    one factorization, and the factor is spent after its uses."""
    n = 40
    Z, Gs, ss = _shared_stats([24, 8, 8], n, seed=31, dtype=torch.float32)
    kw = dict(n_train=N_TRAIN, damping=0.1, solver=solver, return_info=True, step_norm=True)
    sep = [lk.lora_da_factors(Z, G[None], s[None], 4, seeds=[7 + i], **kw) for i, (G, s) in enumerate(zip(Gs, ss))]
    f = lk.linalg.factor_input_cov(Z, damping=0.1, uses=3)
    q = lk.lora_da_factors(f, Gs[0][None], ss[0][None], 4, seeds=[7], **kw)
    kv = lk.lora_da_factors(f, torch.stack(Gs[1:]), torch.stack(ss[1:]), 4, seeds=[8, 9], **kw)
    got = [(q[0][0], q[1][0], q[2][0], q[3]["step_norm"][0])] + \
          [(kv[0][i], kv[1][i], kv[2][i], kv[3]["step_norm"][i]) for i in range(2)]
    for (A, P, ev, nu), (A1, P1, ev1, info1) in zip(got, sep):
        assert sin_theta(A.double(), A1[0].double()).max() < 1e-4
        assert torch.allclose(ev, ev1[0], rtol=1e-5, atol=1e-6 * ev1.abs().max())
        assert abs(float(nu) / float(info1["step_norm"][0]) - 1) < 1e-6
        # P A^T (the step projected on span(A)) does not depend on the eigenvectors' signs
        PA, PA1 = P.double() @ A.double().T, P1[0].double() @ A1[0].double().T
        assert _rel(PA, PA1) < 1e-4
    assert f.uses == 0 and f.L is None
    with pytest.raises(ValueError, match="spent"):
        lk.lora_da_factors(f, Gs[1][None], ss[1][None], 4, n_train=N_TRAIN, damping=0.1)


def test_input_factor_damping_must_match():
    Z, Gs, ss = _shared_stats([6], 12, seed=3)
    f = lk.linalg.factor_input_cov(Z, damping=0.1)
    with pytest.raises(ValueError, match="damping=0.1"):
        lk.guidance_matrix(f, Gs[0], ss[0], n_train=N_TRAIN, damping=0.01)


@pytest.mark.parametrize("batch", [(), (3,)])
@pytest.mark.parametrize("solver", ["eigh", "lobpcg"])
def test_public_calls_never_modify_their_inputs(batch, solver):
    """lk.lora_da_factors, lk.guidance_matrix, methods.lora_da and factor_input_cov leave Z, G, s as they were
    (only overwrite=True, which the trainer passes for its own means, may use them as workspace)."""
    import lorainit_kernels.methods as lkm

    Z, G, s = kfac_stats(batch, 10, 48, seed=5, dtype=torch.float32)
    Z0, G0, s0 = Z.clone(), G.clone(), s.clone()
    lk.lora_da_factors(Z, G, s, 3, n_train=N_TRAIN, solver=solver, return_info=True)
    lk.guidance_matrix(Z, G, s, n_train=N_TRAIN)
    lkm.lora_da(Z, G, s, 3, n_train=N_TRAIN, scaling=2.0, solver=solver)
    f = lk.linalg.factor_input_cov(Z, uses=2 * (batch[0] if batch else 1))  # uses: layer matrices
    lk.lora_da_factors(f, G, s, 3, n_train=N_TRAIN, solver=solver)
    lk.lora_da_factors(f, G, s, 3, n_train=N_TRAIN, solver=solver)
    for a, b in ((Z, Z0), (G, G0), (s, s0)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("solver", ["eigh", "lobpcg"])
def test_overwrite_gives_the_results_of_the_copying_path(solver):
    """overwrite=True (Z and G as workspace, nothing n x n allocated) = the default path, to rounding."""
    import lorainit_kernels.methods as lkm

    Z, G, s = kfac_stats((1,), 12, 64, seed=9, dtype=torch.float32)
    ref, info = lkm.lora_da(Z, G, s, 4, n_train=N_TRAIN, scaling=2.0, solver=solver, seeds=[3])
    Zw, Gw = Z.clone(), G.clone()
    got, info2 = lkm.lora_da(Zw, Gw, s, 4, n_train=N_TRAIN, scaling=2.0, solver=solver, seeds=[3], overwrite=True)
    assert not torch.equal(Zw, Z) and not torch.equal(Gw, G)   # they were used as workspace
    assert sin_theta(got.lora_A.mT.double(), ref.lora_A.mT.double()).max() < 1e-4
    upd = lambda f: f.lora_B.double() @ f.lora_A.double()       # noqa: E731
    assert _rel(upd(got), upd(ref)) < 1e-4
    assert torch.allclose(info2["evals"], info["evals"], rtol=1e-5)


def test_overwrite_failure_is_clear_and_copy_path_still_retries_in_fp64():
    g = torch.Generator().manual_seed(5)
    n = 64
    Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    ev = torch.ones(n, dtype=torch.float64)
    ev[-8:] = 2e-8
    Z = ((Q * ev) @ Q.T).float()
    Z = 0.5 * (Z + Z.T)
    G = torch.randn(5, n, generator=g)
    s = torch.rand(5, generator=g) + 0.5
    lk.guidance_matrix(Z, G, s, n_train=N_TRAIN, damping=0.0)        # copy: retried in fp64
    with pytest.raises(ValueError, match="factored in place, so there is no fp64 retry"):
        lk.guidance_matrix(Z.clone(), G.clone(), s, n_train=N_TRAIN, damping=0.0, overwrite=True)
