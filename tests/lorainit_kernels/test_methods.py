"""Per-layer init math of every method (``lorainit_kernels.methods``) against independent references.

References are computed here from the papers' formulas with an explicit float64 numpy SVD, and
against PEFT itself (same generator state -> same bits for its random inits). Subspaces are compared
by principal angles; singular vectors only up to sign where the singular values are distinct.
"""
import math

import numpy as np
import pytest
import torch

from lorainit_kernels import methods as M

F64 = torch.float64


# ------------------------------------------------------------------------------------------ helpers
def _rng(seed):
    return torch.Generator().manual_seed(seed)


def _matrix(m, n, seed, *, decay=None, batch=(), dtype=F64):
    """Random (..., m, n) matrix; with ``decay`` its singular values are ``decay**i`` (distinct)."""
    g = _rng(seed)
    if decay is None:
        return torch.randn(*batch, m, n, generator=g, dtype=F64).to(dtype)
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(*batch, m, k, generator=g, dtype=F64)).Q
    V = torch.linalg.qr(torch.randn(*batch, n, k, generator=g, dtype=F64)).Q
    s = decay ** torch.arange(k, dtype=F64)
    return ((U * s.unsqueeze(-2)) @ V.mT).to(dtype)


def _np_svd(X):
    U, S, Vt = np.linalg.svd(np.asarray(X, dtype=np.float64), full_matrices=False)
    return U, S, Vt


def _max_angle(X, Y):
    """Largest principal angle between the column spans of X (d, k) and Y (d, k), in radians."""
    Qx = torch.linalg.qr(torch.as_tensor(X, dtype=F64)).Q
    Qy = torch.linalg.qr(torch.as_tensor(Y, dtype=F64)).Q
    resid = Qy - Qx @ (Qx.T @ Qy)
    return float(torch.asin(torch.linalg.matrix_norm(resid, ord=2).clamp(max=1.0)))


def _rel(a, b):
    a, b = torch.as_tensor(a, dtype=F64), torch.as_tensor(b, dtype=F64)
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def _align_rows(X, ref):
    """Flip each row of X to the sign of the matching row of ref (vectors are unique up to sign)."""
    X = torch.as_tensor(X, dtype=F64)
    ref = torch.as_tensor(ref, dtype=F64)
    sign = torch.sign((X * ref).sum(-1, keepdim=True))
    return X * sign


def _peft_layer(m, n, r, *, alpha=8, use_rslora=False, weight=None):
    """A PEFT LoRA Linear (PEFT's own code) wrapping nn.Linear(n, m)."""
    from peft import LoraConfig, get_peft_model

    base = torch.nn.Sequential(torch.nn.Linear(n, m, bias=False))
    if weight is not None:
        base[0].weight.data.copy_(weight)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=["0"], init_lora_weights=False, use_rslora=use_rslora)
    return get_peft_model(base, cfg).base_model.model[0]


def _scaling():
    return M.peft_scaling(16, 4)


# ------------------------------------------------------------------------ PEFT's random initializations
@pytest.mark.parametrize("seed", [0, 7])
def test_random_inits_reproduce_peft_bit_for_bit(seed):
    m, n, r = 10, 14, 4
    layer = _peft_layer(m, n, r)
    A_peft = layer.lora_A["default"].weight.data
    B_peft = layer.lora_B["default"].weight.data

    torch.manual_seed(seed)
    layer.reset_lora_parameters("default", True)
    ours = M.lora_default(m, n, r, generator=_rng(seed))
    assert torch.equal(ours.lora_A, A_peft) and torch.equal(ours.lora_B, B_peft)
    assert float(ours.lora_A.abs().max()) <= 1 / math.sqrt(n)  # kaiming_uniform(a=sqrt 5) bound is 1/sqrt(n)

    torch.manual_seed(seed)
    layer.reset_lora_parameters("default", "gaussian")
    ours = M.gaussian(m, n, r, generator=_rng(seed))
    assert torch.equal(ours.lora_A, A_peft) and torch.equal(ours.lora_B, B_peft)

    torch.manual_seed(seed)
    layer.orthogonal_init("default")
    ours = M.orthogonal(m, n, r, generator=_rng(seed))
    assert torch.equal(ours.lora_A, layer.lora_A["default"].weight.data)
    assert torch.equal(ours.lora_B, layer.lora_B["default"].weight.data)
    for f in (M.lora_default(m, n, r), M.gaussian(m, n, r), ours):
        assert f.base_delta is None


def test_random_init_statistics():
    """Distribution checks on many draws: kaiming U(-1/sqrt n, 1/sqrt n), gaussian std 1/r."""
    n, r = 400, 8
    A = M.lora_default(3, n, r, batch_shape=(10,), generator=_rng(1), dtype=F64).lora_A
    var = float(A.var())
    assert abs(var - 1 / (3 * n)) < 0.05 / (3 * n)  # uniform(-b, b) variance b^2/3, 32k samples
    A = M.gaussian(3, n, r, batch_shape=(10,), generator=_rng(2), dtype=F64).lora_A
    assert abs(float(A.std()) - 1 / r) < 0.02 / r


def test_orthogonal_product_is_zero_and_factors_are_not():
    f = M.orthogonal(30, 20, 6, batch_shape=(3,), generator=_rng(3), dtype=F64)
    assert f.lora_A.shape == (3, 6, 20) and f.lora_B.shape == (3, 30, 6)
    prod = f.lora_B @ f.lora_A
    assert float(prod.abs().max()) < 1e-14 * float(f.lora_B.abs().max() * f.lora_A.abs().max()) * 30
    assert float(f.lora_A.abs().min(dim=-1).values.max()) > 0 and float(f.lora_B.abs().max()) > 0
    # rows of A span the odd rows of Q, columns of B the even ones: A B = 0 is not implied, B A is
    assert torch.linalg.matrix_rank(f.lora_A[0]).item() == 3


@pytest.mark.parametrize("fn", [M.lora_default, M.gaussian, M.orthogonal])
def test_random_batched_equals_one_by_one_and_seeded(fn):
    m, n, r = 6, 9, 4
    batched = fn(m, n, r, batch_shape=(2, 3), generator=_rng(11))
    g = _rng(11)
    singles = [fn(m, n, r, generator=g) for _ in range(6)]
    assert torch.equal(batched.lora_A, torch.stack([s.lora_A for s in singles]).reshape(2, 3, r, n))
    assert torch.equal(batched.lora_B, torch.stack([s.lora_B for s in singles]).reshape(2, 3, m, r))
    again = fn(m, n, r, batch_shape=(2, 3), generator=_rng(11))
    other = fn(m, n, r, batch_shape=(2, 3), generator=_rng(12))
    assert torch.equal(again.lora_A, batched.lora_A)
    assert not torch.equal(other.lora_A, batched.lora_A)


def test_random_inits_dtype_and_device():
    f = M.lora_default(5, 7, 2, generator=_rng(0), dtype=torch.bfloat16)
    assert f.lora_A.dtype == torch.bfloat16 and f.lora_B.dtype == torch.bfloat16
    assert f.lora_A.device.type == "cpu"


# ------------------------------------------------------------------------------------------ PiSSA
def test_pissa_residual_plus_adapter_is_w_and_adapter_is_best_rank_r():
    m, n, r = 24, 16, 5
    W = _matrix(m, n, 0)
    sigma = _scaling()
    f = M.pissa(W, r, scaling=sigma)
    assert f.lora_A.shape == (r, n) and f.lora_B.shape == (m, r) and f.base_delta.shape == (m, n)
    adapter = sigma * (f.lora_B @ f.lora_A)  # what PEFT adds in the forward pass
    recon = (W + f.base_delta) + adapter
    eps = torch.finfo(F64).eps
    assert float((recon - W).abs().max()) <= 4 * eps * float(W.abs().max() + adapter.abs().max())
    U, S, Vt = _np_svd(W)
    best = torch.from_numpy(U[:, :r] * S[:r] @ Vt[:r])
    assert _rel(adapter, best) < 1e-12
    # balanced split: B^T B == A A^T == diag(S_r / sigma)
    assert torch.allclose(f.lora_B.T @ f.lora_B, torch.diag(torch.from_numpy(S[:r]) / sigma), atol=1e-12)
    assert torch.allclose(f.lora_A @ f.lora_A.T, torch.diag(torch.from_numpy(S[:r]) / sigma), atol=1e-12)


def test_pissa_matches_peft_pissa_init():
    m, n, r = 20, 12, 4
    W = _matrix(m, n, 1, dtype=torch.float32)
    layer = _peft_layer(m, n, r, alpha=8, weight=W)
    layer.pissa_init("default", "pissa")
    sigma = layer.scaling["default"]
    f = M.pissa(W, r, scaling=sigma)
    peft_adapter = sigma * (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach()
    assert _rel(f.adapter_delta(sigma), peft_adapter) < 1e-5
    assert _rel(W + f.base_delta, layer.base_layer.weight.detach()) < 1e-5


def test_pissa_bf16_weight_keeps_factors_in_bf16_and_residual_in_fp32():
    m, n, r = 32, 24, 4
    W = _matrix(m, n, 2, dtype=torch.bfloat16)
    sigma = 2.0
    f = M.pissa(W, r, scaling=sigma)
    assert f.lora_A.dtype == torch.bfloat16 and f.lora_B.dtype == torch.bfloat16
    assert f.base_delta.dtype == torch.float32
    recon = W.float() + f.base_delta + sigma * (f.lora_B.float() @ f.lora_A.float())
    assert float((recon - W.float()).abs().max()) <= 8 * torch.finfo(torch.float32).eps * float(W.float().abs().max())


@pytest.mark.parametrize("niter", [2, 4])
def test_fast_pissa_subspace_close_to_exact(niter):
    m, n, r = 200, 150, 8
    W = _matrix(m, n, 3, decay=0.85)  # sigma_{r+1} / sigma_r = 0.85, q = r + 8
    sigma = 1.0
    exact = M.pissa(W, r, scaling=sigma)
    fast = M.pissa(W, r, scaling=sigma, niter=niter, oversample=8, generator=_rng(0))
    ang = _max_angle(fast.lora_A.T, exact.lora_A.T)
    # Halko et al.: error ~ (sigma_{q+1}/sigma_r)^(2 niter + 1) = 0.85^(8 (2 niter + 1))
    bound = 10 * 0.85 ** (8 * (2 * niter + 1))
    assert ang < bound, (ang, bound)
    assert _rel(fast.adapter_delta(sigma), exact.adapter_delta(sigma)) < bound
    U, S, Vt = _np_svd(W)
    assert _max_angle(fast.lora_B, torch.from_numpy(U[:, :r])) < bound
    # and the fast residual still reconstructs W
    recon = W + fast.base_delta + fast.adapter_delta(sigma)
    assert _rel(recon, W) < 1e-14


def test_fast_pissa_is_seeded_and_batched_equals_one_by_one():
    W = _matrix(40, 30, 4, decay=0.8, batch=(3,))
    a = M.pissa(W, 4, scaling=1.0, niter=1, oversample=0, generator=_rng(5))
    b = M.pissa(W, 4, scaling=1.0, niter=1, oversample=0, generator=_rng(5))
    assert torch.equal(a.lora_A, b.lora_A)
    for i in range(3):
        one = M.pissa(W[i], 4, scaling=1.0, niter=1, oversample=0, generator=_rng(5))
        assert torch.allclose(one.lora_A, a.lora_A[i], atol=1e-12)
        assert torch.allclose(one.lora_B, a.lora_B[i], atol=1e-12)
    c = M.pissa(W, 4, scaling=1.0, niter=1, oversample=0, generator=_rng(6))
    assert not torch.equal(c.lora_A, a.lora_A)  # with so little iteration the sketch shows


# ------------------------------------------------------------------------------------------ MiLoRA
def test_milora_uses_the_minor_components():
    m, n, r = 18, 12, 3
    W = _matrix(m, n, 5)
    sigma = 0.5
    f = M.milora(W, r, scaling=sigma)
    U, S, Vt = _np_svd(W)
    minor = torch.from_numpy(U[:, -r:] * S[-r:] @ Vt[-r:])
    assert _rel(f.adapter_delta(sigma), minor) < 1e-12
    assert _rel(f.base_delta, -minor) < 1e-12
    # rows of lora_A span the minor right singular vectors, orthogonal to the principal ones
    assert _max_angle(f.lora_A.T, torch.from_numpy(Vt[-r:].T)) < 1e-10
    assert float((torch.from_numpy(Vt[: n - r]) @ f.lora_A.T).abs().max()) < 1e-10
    # the residual base is the best rank-(k - r) approximation
    principal = torch.from_numpy(U[:, : n - r] * S[: n - r] @ Vt[: n - r])
    assert _rel(W + f.base_delta, principal) < 1e-12
    assert torch.allclose(f.lora_A @ f.lora_A.T, torch.diag(torch.from_numpy(S[-r:]) / sigma), atol=1e-12)


# ------------------------------------------------------------------------------------------ LoRA-GA
def _ga_expected(Gnp, r, direction):
    U, S, Vt = _np_svd(Gnp)
    if direction == "ArB2r":
        return Vt[:r], U[:, r:2 * r]
    if direction == "A2rBr":
        return Vt[r:2 * r], U[:, :r]
    return Vt[1:2 * r:2], U[:, 0:2 * r:2]


@pytest.mark.parametrize("direction", ["ArB2r", "A2rBr", "ArBr"])
def test_lora_ga_matches_paper_formulas_on_small_case(direction):
    m, n, r = 6, 5, 2
    Gnp = np.array([[0.9, -0.2, 0.1, 0.4, -0.5],
                    [0.3, 0.8, -0.6, 0.2, 0.1],
                    [-0.4, 0.1, 0.7, -0.3, 0.6],
                    [0.2, -0.5, 0.3, 0.9, -0.1],
                    [0.6, 0.4, 0.2, -0.7, 0.3],
                    [-0.1, 0.3, -0.8, 0.5, 0.2]])
    G = torch.from_numpy(Gnp)
    sigma, gamma = 4.0, 16.0
    f = M.lora_ga(G, r, scaling=sigma, direction=direction, stable_gamma=gamma)
    A_dir, B_dir = _ga_expected(Gnp, r, direction)
    c = m ** 0.25 / math.sqrt(gamma)  # stable scale of the reference code
    assert f.lora_A.shape == (r, n) and f.lora_B.shape == (m, r)
    assert torch.allclose(_align_rows(f.lora_A, c * A_dir), torch.from_numpy(c * A_dir), atol=1e-12)
    assert torch.allclose(_align_rows(f.lora_B.T, c * B_dir.T), torch.from_numpy(c * B_dir.T), atol=1e-12)
    assert torch.allclose(f.base_delta, -sigma * f.lora_B @ f.lora_A, atol=1e-15)
    # LoRA-GA's defining property: the first LoRA step B B^T G + G A^T A = c^2 * (best rank-2r of G)
    U, S, Vt = _np_svd(Gnp)
    G2r = torch.from_numpy(U[:, :2 * r] * S[:2 * r] @ Vt[:2 * r])
    step = f.lora_B @ f.lora_B.T @ G + G @ f.lora_A.T @ f.lora_A
    assert torch.allclose(step, c * c * G2r, atol=1e-12)


def test_lora_ga_scale_options_and_base_subtraction():
    G = _matrix(20, 14, 6)
    sigma = 2.0
    unit = M.lora_ga(G, 3, scaling=sigma, scale="unit")
    assert torch.allclose(unit.lora_A @ unit.lora_A.T, torch.eye(3, dtype=F64), atol=1e-12)
    assert torch.allclose(unit.lora_B.T @ unit.lora_B, torch.eye(3, dtype=F64), atol=1e-12)
    gd = M.lora_ga(G, 3, scaling=sigma, scale="gd")
    assert torch.allclose(gd.lora_A * sigma, unit.lora_A, atol=1e-12)
    assert torch.allclose(gd.lora_B * sigma, unit.lora_B, atol=1e-12)
    for f in (unit, gd):
        recon = f.base_delta + f.adapter_delta(sigma)
        assert float(recon.abs().max()) < 1e-14


def test_lora_ga_randomized_matches_exact_subspaces():
    G = _matrix(60, 40, 7, decay=0.7)
    exact = M.lora_ga(G, 3, scaling=1.0)
    fast = M.lora_ga(G, 3, scaling=1.0, niter=4, generator=_rng(0))
    assert _max_angle(fast.lora_A.T, exact.lora_A.T) < 1e-6
    assert _max_angle(fast.lora_B, exact.lora_B) < 1e-6


# ------------------------------------------------------------------------------------------ LoRA-One
@pytest.mark.parametrize("normalize", [True, False])
def test_lora_one_matches_formula_on_small_case(normalize):
    Gnp = np.array([[0.5, -1.0, 0.2, 0.3],
                    [0.1, 0.4, -0.7, 0.9],
                    [-0.6, 0.2, 0.8, 0.1],
                    [0.3, 0.3, -0.2, -0.4],
                    [0.9, -0.1, 0.05, 0.6]])
    G = torch.from_numpy(Gnp)
    r, gamma = 2, 128.0
    sigma = M.peft_scaling(16, r, use_rslora=True)  # the reference runs rsLoRA
    f = M.lora_one(G, r, scaling=sigma, stable_gamma=gamma, normalize=normalize)
    assert f.base_delta is None
    U, S, Vt = _np_svd(-Gnp)  # spectral init from the *negative* gradient
    d = S[0] if normalize else 1.0
    expected = torch.from_numpy(U[:, :r] * S[:r] @ Vt[:r]) * sigma / (gamma * d)
    assert torch.allclose(f.adapter_delta(sigma), expected, atol=1e-14)
    # per factor: B = U_r S_r^(1/2) / sqrt(gamma d), A = S_r^(1/2) V_r^T / sqrt(gamma d) (up to paired signs)
    B_exp = U[:, :r] * np.sqrt(S[:r]) / math.sqrt(gamma * d)
    A_exp = np.sqrt(S[:r])[:, None] * Vt[:r] / math.sqrt(gamma * d)
    assert torch.allclose(_align_rows(f.lora_B.T, B_exp.T), torch.from_numpy(B_exp.T), atol=1e-14)
    assert torch.allclose(_align_rows(f.lora_A, A_exp), torch.from_numpy(A_exp), atol=1e-14)
    # it is a descent direction: <adapter, grad> < 0
    assert float((f.adapter_delta(sigma) * G).sum()) < 0
    sub = M.lora_one(G, r, scaling=sigma, stable_gamma=gamma, normalize=normalize, subtract_init=True)
    assert torch.allclose(sub.base_delta, -f.adapter_delta(sigma), atol=1e-15)


# ------------------------------------------------------------------------------------------ rsLoRA
@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_scaling_matches_peft(use_rslora):
    layer = _peft_layer(8, 6, 4, alpha=16, use_rslora=use_rslora)
    assert M.peft_scaling(16, 4, use_rslora=use_rslora) == layer.scaling["default"]


def test_rslora_scaling_changes_factors_not_adapter():
    W = _matrix(16, 12, 8)
    r = 4
    s_plain, s_rs = M.peft_scaling(8, r), M.peft_scaling(8, r, use_rslora=True)
    assert s_rs == pytest.approx(8 / 2) and s_plain == pytest.approx(2)
    for fn in (M.pissa, M.milora):
        a, b = fn(W, r, scaling=s_plain), fn(W, r, scaling=s_rs)
        assert _rel(a.adapter_delta(s_plain), b.adapter_delta(s_rs)) < 1e-13
        assert torch.allclose(a.lora_A * math.sqrt(s_plain), b.lora_A * math.sqrt(s_rs), atol=1e-12)
    a = M.lora_ga(W, 2, scaling=s_plain, scale="gd")
    b = M.lora_ga(W, 2, scaling=s_rs, scale="gd")
    assert torch.allclose(a.lora_A * s_plain, b.lora_A * s_rs, atol=1e-12)


# ------------------------------------------------------------------------------------------ HRP
def test_hrp_rsi_and_lsi_are_top_singular_vectors_of_the_product():
    m, n, R, r = 30, 22, 10, 4
    g = _rng(9)
    B = torch.randn(m, R, generator=g, dtype=F64)
    A = torch.randn(R, n, generator=g, dtype=F64)
    U, S, Vt = _np_svd((B @ A).numpy())
    rsi = M.hrp(B, A, r)
    assert rsi.lora_A.shape == (r, n) and rsi.lora_B.shape == (m, r) and rsi.base_delta is None
    assert float(rsi.lora_B.abs().max()) == 0.0
    assert torch.allclose(rsi.lora_A @ rsi.lora_A.T, torch.eye(r, dtype=F64), atol=1e-12)
    assert _max_angle(rsi.lora_A.T, torch.from_numpy(Vt[:r].T)) < 1e-10
    lsi = M.hrp(B, A, r, side="B")
    assert float(lsi.lora_A.abs().max()) == 0.0 and lsi.lora_B.shape == (m, r)
    assert _max_angle(lsi.lora_B, torch.from_numpy(U[:, :r])) < 1e-10
    scaled = M.hrp(B, A, r, scale=0.5)
    assert torch.allclose(scaled.lora_A, 0.5 * rsi.lora_A)


def test_hrp_preheat_factors_are_scaled_orthonormal_and_seeded():
    fA = M.hrp_preheat_factors(12, 20, 8, side="A", row_norm=0.5, batch_shape=(2,), generator=_rng(1), dtype=F64)
    assert fA.lora_A.shape == (2, 8, 20) and fA.lora_B.shape == (2, 12, 8)
    assert float(fA.lora_B.abs().max()) == 0.0
    assert torch.allclose(fA.lora_A @ fA.lora_A.mT, 0.25 * torch.eye(8, dtype=F64).expand(2, 8, 8), atol=1e-13)
    fB = M.hrp_preheat_factors(12, 20, 8, side="B", generator=_rng(1), dtype=F64)
    assert fB.lora_B.shape == (12, 8) and float(fB.lora_A.abs().max()) == 0.0
    assert torch.allclose(fB.lora_B.T @ fB.lora_B, torch.eye(8, dtype=F64), atol=1e-13)
    g = _rng(4)
    singles = [M.hrp_preheat_factors(12, 20, 8, generator=g).lora_A for _ in range(3)]
    batched = M.hrp_preheat_factors(12, 20, 8, batch_shape=(3,), generator=_rng(4)).lora_A
    assert torch.equal(batched, torch.stack(singles))
    # Haar row space: E[P_A] = (R/n) I, checked on 400 draws (diag sd ~ 0.1/sqrt(400))
    A = M.hrp_preheat_factors(5, 20, 8, batch_shape=(400,), generator=_rng(2), dtype=F64).lora_A
    P = (A.mT @ A).mean(0)
    assert torch.allclose(P, 0.4 * torch.eye(20, dtype=F64), atol=0.03)


def test_hrp_rejects_an_untrained_preheat():
    f = M.hrp_preheat_factors(10, 8, 6, generator=_rng(0), dtype=F64)
    with pytest.raises(ValueError, match="preheat adapter trained"):
        M.hrp(f.lora_B, f.lora_A, 2)


# ------------------------------------------------------------------------------------------ dtypes
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 2e-5), (torch.bfloat16, 1.5e-2)])
@pytest.mark.parametrize("name", ["pissa", "milora", "lora_ga", "lora_one"])
def test_low_precision_inputs_against_fp64(name, dtype, rtol):
    """Adapter from fp32/bf16 inputs vs the fp64 result on the same (rounded) matrix."""
    fn = {"pissa": M.pissa, "milora": M.milora, "lora_ga": M.lora_ga, "lora_one": M.lora_one}[name]
    sigma = 2.0
    W = _matrix(40, 24, 13, decay=0.93, dtype=dtype)  # distinct, well-separated singular values
    low = fn(W, 4, scaling=sigma)
    ref = fn(W.to(F64), 4, scaling=sigma)
    assert low.lora_A.dtype == dtype and low.lora_B.dtype == dtype
    assert _rel(low.adapter_delta(sigma), ref.adapter_delta(sigma)) < rtol
    if ref.base_delta is not None:
        assert low.base_delta.dtype == torch.float32
        assert _rel(low.base_delta, ref.base_delta) < rtol


# ------------------------------------------------------------------------------------------ batching
def _deterministic_methods():
    sigma = 2.0
    return {
        "pissa": lambda W: M.pissa(W, 3, scaling=sigma),
        "milora": lambda W: M.milora(W, 3, scaling=sigma),
        "lora_ga": lambda W: M.lora_ga(W, 3, scaling=sigma),
        "lora_one": lambda W: M.lora_one(W, 3, scaling=sigma, subtract_init=True),
        "hrp": lambda W: M.hrp(W[..., :, :8], W[..., :8, :], 3),
        "hrp_lsi": lambda W: M.hrp(W[..., :, :8], W[..., :8, :], 3, side="B"),
    }


@pytest.mark.parametrize("name", list(_deterministic_methods()))
def test_deterministic_methods_batched_equal_one_by_one(name):
    fn = _deterministic_methods()[name]
    W = _matrix(14, 10, 12, batch=(2, 3))
    batched = fn(W)
    assert batched.lora_A.shape[:2] == (2, 3) and batched.lora_B.shape[:2] == (2, 3)
    assert batched.lora_A.shape[-1] == 10 and batched.lora_B.shape[-2] == 14
    for i in range(2):
        for j in range(3):
            one = fn(W[i, j])
            assert torch.allclose(batched.lora_A[i, j], one.lora_A, atol=1e-12)
            assert torch.allclose(batched.lora_B[i, j], one.lora_B, atol=1e-12)
            if one.base_delta is not None:
                assert torch.allclose(batched.base_delta[i, j], one.base_delta, atol=1e-12)
    again = fn(W)
    assert torch.equal(again.lora_A, batched.lora_A) and torch.equal(again.lora_B, batched.lora_B)


# ------------------------------------------------------------------------------------------ bad input
def test_bad_inputs_raise_clear_errors():
    W = _matrix(6, 4, 0)
    with pytest.raises(ValueError, match=r"rank <= min\(m, n\) = 4 for a \(6, 4\) weight, got rank=5"):
        M.pissa(W, 5, scaling=1.0)
    with pytest.raises(ValueError, match="2 \\* rank <= min\\(m, n\\) = 4"):
        M.lora_ga(W, 3, scaling=1.0)
    with pytest.raises(ValueError, match="rank must be an int >= 1, got 0"):
        M.milora(W, 0, scaling=1.0)
    with pytest.raises(ValueError, match=r"W must have shape \(\.\.\., rows, cols\), got shape \(6,\)"):
        M.pissa(W[:, 0], 1, scaling=1.0)
    bad = W.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"W_grad \(shape \(6, 4\)\) has NaN/Inf entries, first at index \(2, 1\)"):
        M.lora_one(bad, 1, scaling=1.0)
    with pytest.raises(ValueError, match="NaN/Inf"):
        M.pissa(bad, 1, scaling=1.0)
    with pytest.raises(TypeError, match="W must be a floating tensor"):
        M.pissa(torch.ones(4, 4, dtype=torch.int64), 1, scaling=1.0)
    with pytest.raises(ValueError, match="scaling must be a finite positive number"):
        M.pissa(W, 1, scaling=0.0)
    with pytest.raises(ValueError, match="direction must be one of"):
        M.lora_ga(W, 1, scaling=1.0, direction="BrA2r")
    with pytest.raises(ValueError, match="rank must be even"):
        M.orthogonal(5, 5, 3)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        M.lora_default(5, 5, 2, generator=3)
    with pytest.raises(ValueError, match=r"B_pre \(6, 3\) must be \(\.\.\., m, R\) and A_pre \(4, 4\)"):
        M.hrp(W[:, :3], W[:4, :4], 2)
    with pytest.raises(ValueError, match=r"rank must be <= min\(m, n, R\)"):
        M.hrp(W[:, :2], W[:2, :], 3)
    with pytest.raises(ValueError, match="rank_R=9 exceeds n"):
        M.hrp_preheat_factors(20, 8, 9)
    with pytest.raises(ValueError, match="side must be"):
        M.hrp(W[:, :3], W[:3, :], 2, side="left")
    with pytest.raises(ValueError, match="cannot normalize"):
        M.lora_one(torch.zeros(5, 4, dtype=F64), 1, scaling=1.0)


# ------------------------------------------------------------------------------------------ LoRA-DA
def _kfac_stats(m, n, seed, batch=()):
    g = _rng(seed)
    T = 4 * n
    x = torch.randn(*batch, T, n, generator=g, dtype=F64) * torch.linspace(0.3, 2.0, n, dtype=F64)
    gy = torch.randn(*batch, T, m, generator=g, dtype=F64) * torch.linspace(0.5, 1.5, m, dtype=F64)
    gy = gy + 0.3 * x[..., :m] if m <= n else gy  # correlate g and x so G is not noise only
    Z = x.mT @ x / T
    G = gy.mT @ x / T
    s = (gy * gy).mean(-2)
    return Z, G, s


def _lora_da_reference(Z, G, s, r, n_train, damping, alpha=1.0, beta=1.0):
    """docs/math.md in plain fp64 with explicit inverses (test-only reference)."""
    n = Z.shape[-1]
    Zd = Z + damping * Z.diagonal().mean() * torch.eye(n, dtype=F64)
    sd = s + damping * s.mean()
    Zinv = torch.linalg.inv(Zd)
    dW = -torch.diag(1 / sd) @ G @ Zinv
    Om = beta * (1 / sd).sum() / n_train * Zinv - alpha * dW.T @ dW
    evals, vecs = torch.linalg.eigh((Om + Om.T) / 2)
    return dW, vecs[:, :r], evals[:r]


@pytest.mark.parametrize("solver", ["lobpcg", "eigh"])
def test_lora_da_peft_form_against_fp64_reference(solver):
    pytest.importorskip("lorainit_kernels.linalg.guidance")
    m, n, r = 12, 16, 3
    Z, G, s = _kfac_stats(m, n, 0)
    n_train, damping, sigma, eta = 500.0, 1e-2, 2.0, 0.3
    f, info = M.lora_da(Z, G, s, r, n_train=n_train, scaling=sigma, step_scale=eta, damping=damping, solver=solver,
                        normalize_step=False)
    dW, A_ref, ev_ref = _lora_da_reference(Z, G, s, r, n_train, damping)
    assert f.lora_A.shape == (r, n) and f.lora_B.shape == (m, r) and f.base_delta is None
    assert torch.allclose(f.lora_A @ f.lora_A.T, torch.eye(r, dtype=F64), atol=1e-8)
    assert _max_angle(f.lora_A.T, A_ref) < 1e-5
    assert torch.allclose(info["evals"].to(F64), ev_ref, rtol=1e-6, atol=1e-9 * float(ev_ref.abs().max()))
    # sigma * B @ A = eta * dW A A^T (the step projected on span(A))
    expected = eta * dW @ A_ref @ A_ref.T
    assert _rel(f.adapter_delta(sigma), expected) < 1e-5
    assert info["step_norm"] is None and "solver" in info
    si = info["solver"]
    assert si["solver"] == solver and si["iterations"].shape == () and si["converged"].shape == (r,)
    assert si["converged"].all() and si["residual"].shape == (r,)


def test_lora_da_normalize_step_and_preserve_output():
    pytest.importorskip("lorainit_kernels.linalg.guidance")
    m, n, r = 10, 14, 2
    Z, G, s = _kfac_stats(m, n, 1, batch=(2,))
    sigma, eta = M.peft_scaling(16, r, use_rslora=True), 0.5
    f, info = M.lora_da(Z, G, s, r, n_train=1e3, scaling=sigma, step_scale=eta, normalize_step=True,
                        preserve_output=True, damping=1e-3, solver="eigh")
    for i in range(2):
        dW, A_ref, _ = _lora_da_reference(Z[i], G[i], s[i], r, 1e3, 1e-3)
        nu = torch.linalg.matrix_norm(dW, ord=2)
        assert float(info["step_norm"][i]) == pytest.approx(float(nu), rel=1e-8)
        expected = eta * dW @ A_ref @ A_ref.T / nu
        assert _rel(f.adapter_delta(sigma)[i], expected) < 1e-6
        assert _rel(f.base_delta[i], -expected) < 1e-6
    one, _ = M.lora_da(Z[1], G[1], s[1], r, n_train=1e3, scaling=sigma, step_scale=eta, normalize_step=True,
                       damping=1e-3, solver="eigh")
    assert _rel(one.adapter_delta(sigma), f.adapter_delta(sigma)[1]) < 1e-10


def test_lora_da_bad_inputs():
    Z, G, s = _kfac_stats(6, 8, 2)
    with pytest.raises(ValueError, match=r"expected Z \(\.\.\., n, n\), G \(\.\.\., m, n\), s \(\.\.\., m\)"):
        M.lora_da(Z, G, s[:5], 2, n_train=10.0, scaling=1.0)
    with pytest.raises(ValueError, match="rank <= min"):
        M.lora_da(Z, G, s, 7, n_train=10.0, scaling=1.0)
    bad = G.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="G .* has NaN/Inf"):
        M.lora_da(Z, bad, s, 2, n_train=10.0, scaling=1.0)
