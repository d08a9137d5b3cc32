"""lorainit_kernels.peft_inits (EVA, CorDA, Astra, OLoRA, MiCA) against plain float64 references.

Fresh random inputs with awkward shapes (m != n, odd sizes, batches), never zeros; eigen/singular
vectors compared as subspaces (principal angles) or through sign-invariant products; bad input
raises naming the argument. The KFACStats extras (input mean, output second moment) against float64.
"""

import pytest
import torch

import lorainit_kernels as lk
import lorainit_kernels.peft_inits as lkp
from helpers import rel
from linalg_helpers import sin_max

torch.set_num_threads(1)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _spd_from_tokens(T, n, seed, shift=0.7, dtype=torch.float32):
    g = _gen(seed)
    X = torch.randn(T, n, generator=g, dtype=torch.float64) @ torch.randn(n, n, generator=g, dtype=torch.float64) / n ** 0.5
    X = X + shift * torch.randn(n, generator=g, dtype=torch.float64)  # a non-zero mean
    return X, (X.T @ X / T).to(dtype), X.mean(0).to(dtype)


# ------------------------------------------------------------------------------------------ EVA
@pytest.mark.parametrize("solver", ["eigh", "lobpcg"])
@pytest.mark.parametrize("n,k", [(37, 5), (64, 3)])
def test_eva_components_span_the_top_principal_directions_of_the_centered_inputs(n, k, solver):
    X, Z, mu = _spd_from_tokens(300, n, seed=n + k)
    Xc = X - X.mean(0)
    _, S, Vh = torch.linalg.svd(Xc, full_matrices=False)  # float64 PCA of the centered data
    c = lkp.eva_components(Z, mu, k, solver=solver)
    assert c.components.shape == (k, n)
    assert sin_max(c.components.mT, Vh[:k].mT) < 2e-3
    ev_ref = S[:k] ** 2 / X.shape[0]
    assert rel(c.explained_variance, ev_ref) < 1e-4
    assert rel(c.explained_variance_ratio, ev_ref / (S ** 2 / X.shape[0]).sum()) < 1e-4
    # the uncentered second moment gives another subspace here (the mean is large): centering matters
    _, _, Vh_u = torch.linalg.svd(X, full_matrices=False)
    assert sin_max(Vh_u[:k].mT, Vh[:k].mT) > 0.1


def test_eva_factors_and_whitening():
    X, Z, mu = _spd_from_tokens(200, 21, seed=3)
    f = lkp.eva(Z, mu, 4, out_features=13, whiten=True, count=200)
    assert f.lora_B.shape == (13, 4) and not bool(f.lora_B.any()) and f.base_delta is None
    _, S, Vh = torch.linalg.svd(X - X.mean(0), full_matrices=False)
    ref = Vh[:4] / S[:4].sqrt().unsqueeze(-1)  # PEFT: components_ / sqrt(singular_values_) over the T tokens
    signs = torch.sign((f.lora_A.double() * ref).sum(-1, keepdim=True))
    assert rel(f.lora_A.double() * signs, ref) < 1e-4


def test_eva_batched_equals_per_layer():
    Zs, mus = zip(*[_spd_from_tokens(150, 19, seed=s)[1:] for s in range(3)])
    Z, mu = torch.stack(Zs), torch.stack(mus)
    f = lkp.eva(Z, mu, 3, out_features=7)
    for i in range(3):
        assert sin_max(f.lora_A[i].mT, lkp.eva(Z[i], mu[i], 3, out_features=7).lora_A.mT) < 1e-4


def test_eva_rank_distribution_follows_peft():
    ratios = {"a": torch.tensor([0.5, 0.2, 0.1, 0.05]), "b": torch.tensor([0.4, 0.3, 0.05, 0.01]),
              "c": torch.tensor([0.9, 0.02, 0.0, 0.0])}
    # budget 6 over the pooled top values: a 0.5 0.2 0.1 | b 0.4 0.3 | c 0.9 -> a 3, b 2, c 1
    assert lkp.eva_rank_distribution(ratios, 6, {"a": 4, "b": 4, "c": 4}) == {"a": 3, "b": 2, "c": 1}
    # max_components caps what a layer offers
    assert lkp.eva_rank_distribution(ratios, 6, {"a": 1, "b": 4, "c": 4}) == {"a": 1, "b": 3, "c": 2}
    # a layer sharing its input offers the owner's ratios; the owner keeps the higher count
    r = lkp.eva_rank_distribution({"q": ratios["c"], "k": ratios["c"], "o": ratios["a"]}, 4,
                                  {"q": 2, "k": 2, "o": 2}, shared={"k": "q"})
    assert r["q"] >= r["k"] and sum(r.values()) == 4


def test_eva_bad_input():
    _, Z, mu = _spd_from_tokens(50, 9, seed=1)
    with pytest.raises(ValueError, match="mu has shape"):
        lkp.eva_components(Z, mu[:-1], 2)
    with pytest.raises(ValueError, match="k=10"):
        lkp.eva_components(Z, mu, 10)
    bad = mu.clone()
    bad[3] = float("nan")
    with pytest.raises(ValueError, match="mu .*NaN"):
        lkp.eva_components(Z, bad, 2)
    with pytest.raises(ValueError, match="count"):
        lkp.eva(Z, mu, 2, out_features=4, whiten=True)
    with pytest.raises(ValueError, match="non-positive trace"):  # every token the same vector
        x = torch.randn(9)
        lkp.eva_components(torch.outer(x, x), x, 2)


# ------------------------------------------------------------------------------------------ CorDA
def _corda_ref(W, C, r, scaling, mode, damping=0.01, dtype=torch.float64):
    """PEFT's collect_eigens_for_layer + corda_init in ``dtype`` (explicit inverse, as PEFT)."""
    W, C = W.to(dtype), C.to(dtype)
    Cd = C + torch.eye(C.shape[0], dtype=C.dtype) * torch.diagonal(C).mean() * damping
    U, S, Vh = torch.linalg.svd(W @ Cd, full_matrices=False)
    V = (Vh @ torch.linalg.inv(Cd)).T
    sl = slice(0, r) if mode == "ipm" else slice(S.shape[0] - r, S.shape[0])
    U, S, V = U[:, sl], S[sl] / scaling, V[:, sl]
    A, B = V.T * S.sqrt()[:, None], U * S.sqrt()
    return A, B


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
@pytest.mark.parametrize("m,n", [(23, 17), (11, 30)])
def test_corda_matches_the_float64_reference_and_preserves_the_weight(m, n, mode):
    g = _gen(m * n)
    W = torch.randn(m, n, generator=g)
    _, C, _ = _spd_from_tokens(400, n, seed=m + n)
    r, sigma = 4, 1.7
    f = lkp.corda(W, C, r, scaling=sigma, mode=mode)
    A_ref, B_ref = _corda_ref(W, C, r, sigma, mode)
    assert rel(f.adapter_delta(sigma), sigma * B_ref @ A_ref) < 1e-4  # sign-invariant product
    signs = torch.sign((f.lora_B.double() * B_ref).sum(0))
    assert rel(f.lora_B.double() * signs, B_ref) < 1e-3 and rel(f.lora_A.double() * signs[:, None], A_ref) < 1e-3
    assert rel(W.double() + f.base_delta.double() + f.adapter_delta(sigma).double(), W) < 1e-6


def test_corda_product_does_not_depend_on_the_scale_of_C_and_batches_broadcast():
    g = _gen(5)
    W = torch.randn(2, 13, 9, generator=g, dtype=torch.float64)
    _, C, _ = _spd_from_tokens(100, 9, seed=5, dtype=torch.float64)
    f1 = lkp.corda(W, C, 3, scaling=2.0)
    f2 = lkp.corda(W, 37.0 * C, 3, scaling=2.0)
    assert rel(f1.adapter_delta(2.0), f2.adapter_delta(2.0)) < 1e-10
    assert rel(f1.adapter_delta(2.0)[1], lkp.corda(W[1], C, 3, scaling=2.0).adapter_delta(2.0)) < 1e-12


def test_corda_bad_input():
    W = torch.randn(6, 5)
    C = torch.eye(5) + 0.1
    with pytest.raises(ValueError, match=r"C has shape"):
        lkp.corda(W, torch.eye(6), 2, scaling=1.0)
    with pytest.raises(ValueError, match="mode"):
        lkp.corda(W, C, 2, scaling=1.0, mode="ipn")
    with pytest.raises(ValueError, match="rank"):
        lkp.corda(W, C, 6, scaling=1.0)
    with pytest.raises(ValueError, match="mean diagonal"):
        lkp.corda(W, -C, 2, scaling=1.0)
    Wn = W.clone()
    Wn[2, 3] = float("inf")
    with pytest.raises(ValueError, match="W .*NaN/Inf"):
        lkp.corda(Wn, C, 2, scaling=1.0)


# ------------------------------------------------------------------------------------------ Astra
@pytest.mark.parametrize("mode", ["ipm", "kpm"])
@pytest.mark.parametrize("solver", ["eigh", "lobpcg"])
def test_astra_matches_the_reference_projection(mode, solver):
    g = _gen(11)
    m, n, r, sigma = 29, 18, 3, 0.75
    W = torch.randn(m, n, generator=g)
    Yt, Y, _ = _spd_from_tokens(500, m, seed=7)
    f = lkp.astra(W, Y, r, scaling=sigma, mode=mode, solver=solver)
    evals, V = torch.linalg.eigh(Y.double())  # the reference: ascending eigh, last r (ipm) / first r (kpm) columns
    Vr = V[:, -r:] if mode == "ipm" else V[:, :r]
    # LOBPCG stops at a relative residual sqrt(eps) ~ 3.5e-4: its subspace is exact to residual / gap,
    # its objective tr(B^T Y B) to second order
    tol = 2e-3 if solver == "eigh" else 2e-2
    assert sin_max(f.lora_B, Vr) < tol
    obj = torch.trace(f.lora_B.double().T @ Y.double() @ f.lora_B.double())
    assert abs(float(obj) - float((evals[-r:] if mode == "ipm" else evals[:r]).sum())) < 1e-5 * float(evals.abs().max())
    P = Vr @ Vr.T
    assert rel(f.adapter_delta(sigma), sigma * P @ W.double()) < tol
    assert rel(f.lora_A, f.lora_B.double().T @ W.double()) < 1e-6
    assert rel(W.double() + f.base_delta.double() + f.adapter_delta(sigma).double(), W) < 1e-6


def test_astra_bad_input():
    W = torch.randn(7, 5)
    with pytest.raises(ValueError, match=r"Y has shape"):
        lkp.astra(W, torch.eye(5), 2, scaling=1.0)
    with pytest.raises(ValueError, match="exceeds out_features"):
        lkp.astra(W, torch.eye(7), 8, scaling=1.0)
    with pytest.raises(ValueError, match="mode"):
        lkp.astra(W, torch.eye(7), 2, scaling=1.0, mode="tail")


# ------------------------------------------------------------------------------------------ OLoRA, MiCA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,n", [(19, 12), (8, 21)])
def test_olora_is_the_reduced_qr_and_preserves_the_weight(m, n, dtype):
    W = torch.randn(3, m, n, generator=_gen(m + n)).to(dtype)
    r, sigma = 5, 3.0
    f = lkp.olora(W, r, scaling=sigma)
    Q, R = torch.linalg.qr(W.double())
    for i in range(3):  # Householder QR is unique up to column signs
        s = torch.sign(torch.diagonal(R[i])[:r]) * torch.sign(torch.diagonal(f.lora_A[i].double()[:, :r]))
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        assert rel(f.lora_B[i].double() * s, Q[i][:, :r]) < tol
        assert rel(f.lora_A[i].double() * s[:, None], R[i][:r]) < tol
    assert f.lora_A.dtype == dtype
    assert rel(W.double() + f.base_delta.double() + f.adapter_delta(sigma).double(), W.double()) < 1e-6


@pytest.mark.parametrize("m,n", [(17, 10), (9, 25)])
def test_mica_takes_the_minor_left_singular_vectors(m, n):
    W = torch.randn(m, n, generator=_gen(m * 3 + n), dtype=torch.float64)
    f = lkp.mica(W.float(), 3)
    U, S, _ = torch.linalg.svd(W, full_matrices=False)
    assert sin_max(f.lora_B, U[:, -3:]) < 1e-4
    assert not bool(f.lora_A.any()) and f.base_delta is None and f.lora_A.shape == (3, n)


def test_data_free_bad_input():
    with pytest.raises(ValueError, match="rank"):
        lkp.olora(torch.randn(4, 6), 5, scaling=1.0)
    with pytest.raises(ValueError, match="rank"):
        lkp.mica(torch.randn(4, 6), 0)
    with pytest.raises(TypeError, match="floating"):
        lkp.mica(torch.ones(4, 6, dtype=torch.long), 2)


def test_symmetric_eigs_against_eigh():
    _, C, _ = _spd_from_tokens(300, 40, seed=2)
    ev, V = torch.linalg.eigh(C.double())
    for largest in (True, False):
        for solver in ("eigh", "lobpcg"):
            e, U = lkp.symmetric_eigs(C, 4, largest=largest, solver=solver)
            ref = ev[-4:].flip(0) if largest else ev[:4]
            assert float((e.double() - ref).abs().max()) < 1e-5 * float(ev.abs().max())
            assert sin_max(U, V[:, -4:] if largest else V[:, :4]) < (2e-3 if solver == "eigh" else 2e-2)
            obj = torch.trace(U.double().T @ C.double() @ U.double())  # second-order accurate
            assert abs(float(obj - ref.sum())) < 1e-5 * float(ev.abs().max())
            assert float((U.double().T @ U.double() - torch.eye(4, dtype=torch.float64)).abs().max()) < 1e-5
    with pytest.raises(ValueError, match="square"):
        lkp.symmetric_eigs(torch.randn(3, 4), 1, largest=True)


# ------------------------------------------------------------------------------------------ KFACStats extras
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_kfac_stats_input_mean_and_output_cov_against_float64(dtype, tol):
    g = _gen(9)
    n, m = 13, 7
    st = lk.KFACStats(n, m, track_input_mean=True, track_output_cov=True)
    xs, ys = [], []
    for b in range(3):
        x = (torch.randn(2, 11, n, generator=g) + 0.5).to(dtype)
        y = torch.randn(2, 11, m, generator=g).to(dtype)
        gr = torch.randn(2, 11, m, generator=g).to(dtype)
        mask = torch.rand(2, 11, generator=g) > 0.3
        st.update(x, gr, mask, output=y)
        xs.append(x.double()[mask])
        ys.append(y.double()[mask])
    X, Y = torch.cat(xs), torch.cat(ys)
    assert st.count == X.shape[0]
    assert rel(st.input_mean(), X.mean(0)) < tol
    assert rel(st.output_cov(), Y.T @ Y / X.shape[0]) < tol
    assert len(st.sums()) == 5  # all-reduced with the others


def test_kfac_stats_extras_bad_input_leaves_the_accumulator_unchanged():
    st = lk.KFACStats(5, 3, track_input_mean=True, track_output_cov=True)
    x, g, y = torch.randn(4, 5), torch.randn(4, 3), torch.randn(4, 3)
    st.update(x, g, output=y)
    before = [t.clone() for t in st.sums()]
    with pytest.raises(ValueError, match="output is required"):
        st.update(x, g)
    y_bad = y.clone()
    y_bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="output .*non-finite"):
        st.update(x, g, output=y_bad)
    with pytest.raises(ValueError, match="output"):
        st.update(x, g, output=torch.randn(4, 2))
    assert all(torch.equal(a, b) for a, b in zip(before, st.sums())) and st.count == 4
    with pytest.raises(ValueError, match="needs out_features"):
        lk.KFACStats(5, None, track_output_cov=True)
    plain = lk.KFACStats(5, 3)
    with pytest.raises(ValueError, match="not accepted"):
        plain.update(x, g, output=y)
    with pytest.raises(ValueError, match="not tracked"):
        plain.input_mean()


def test_kfac_stats_forward_only_keeps_z_mean_and_y_without_gradients():
    g = _gen(12)
    x, y = torch.randn(3, 9, 6, generator=g) + 1.0, torch.randn(3, 9, 4, generator=g)
    mask = torch.rand(3, 9, generator=g) > 0.4
    st = lk.KFACStats(6, 4, track_grad=False, track_input_mean=True, track_output_cov=True)
    assert st.update(x, None, mask, output=y) == int(mask.sum())
    X, Y = x.double()[mask], y.double()[mask]
    assert rel(st.input_cov(), X.T @ X / X.shape[0]) < 1e-6 and rel(st.input_mean(), X.mean(0)) < 1e-6
    assert rel(st.output_cov(), Y.T @ Y / X.shape[0]) < 1e-6
    assert st.g_sum is None and st.s_sum is None and len(st.sums()) == 3
    with pytest.raises(ValueError, match="keeps no gradient statistics"):
        st.update(x, torch.randn(3, 9, 4), mask, output=y)
    counter = lk.KFACStats(6, 4, track_input_cov=False, track_grad=False)  # a layer sharing another's Z
    assert counter.update(x, None, mask) == int(mask.sum()) and counter.sums() == []


def test_corda_doubles_the_damping_until_the_covariance_factors_accurately():
    """A rank-deficient C (fewer tokens than features) with a tiny damping: the damping doubles (PEFT's retry,
    here until the Cholesky factor's condition estimate times eps is below 0.05), and the result equals the
    float64 reference at the damping used."""
    g = _gen(21)
    X = torch.randn(3, 12, generator=g, dtype=torch.float64)
    C = (X.T @ X / 3).float()  # rank 3 of 12
    W = torch.randn(7, 12, generator=g)
    Cd, L, used = lkp._damped_cholesky(C, 1e-30, "corda")
    assert 1e-30 < used <= 1.0 and torch.allclose(L @ L.T, Cd, atol=1e-5)
    assert float(torch.linalg.cond(Cd.double())) * torch.finfo(torch.float32).eps < 0.2
    f = lkp.corda(W, C, 2, scaling=1.0, damping=1e-30)
    A_ref, B_ref = _corda_ref(W, C, 2, 1.0, "ipm", damping=used)
    # as ill-conditioned as PEFT accepts: fp32 is as accurate as plain fp32 torch (PEFT's explicit inverse)
    A32, B32 = _corda_ref(W, C, 2, 1.0, "ipm", damping=used, dtype=torch.float32)
    err_torch = rel(B32 @ A32, B_ref @ A_ref)
    assert rel(f.adapter_delta(1.0), B_ref @ A_ref) <= 2 * err_torch + 1e-6
    f64 = lkp.corda(W.double(), C.double(), 2, scaling=1.0, damping=used)  # and exact in fp64
    assert rel(f64.adapter_delta(1.0), B_ref @ A_ref) < 1e-6
    with pytest.raises(ValueError, match="not positive semi-definite"):
        lkp.corda(W, torch.diag(torch.tensor([1.0] * 11 + [-5.0])), 2, scaling=1.0)
