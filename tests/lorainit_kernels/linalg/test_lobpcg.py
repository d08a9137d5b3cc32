"""Batched LOBPCG on matrices with chosen spectra, against scipy.linalg.eigh in float64.

Eigenvectors are compared as subspaces (principal angles, where the eigengap allows) and by the
objective tr(V^T A V); the bounds are the rigorous a-posteriori ones (Davis-Kahan, quadratic Ritz
bound) computed from the returned vectors' own float64 residual, plus a check that this residual
is as small as the solver's tolerance promises.
"""
import math
import warnings

import pytest
import torch

import lorainit_kernels as lk
from linalg_helpers import (gen, orthogonal, kfac_stats, laplacian_1d, laplacian_1d_evals, objective, reference_guidance,
                            ritz_bounds, scipy_eigh, sin_theta, spectrum, with_spectrum)

DTYPES = [(torch.float64, 1e-8), (torch.float32, 1e-4)]


def _check(A, vals, vecs, k, tol, *, largest=False, sin_tol=None):
    """vals/vecs of A (*batch, n, n) against scipy in float64, with residual-based bounds."""
    batch = tuple(A.shape[:-2])
    n = A.shape[-1]
    A64 = A.double()
    assert vals.shape == batch + (k,) and vecs.shape == batch + (n, k)
    V = vecs.double()
    eye = torch.eye(k, dtype=torch.float64)
    ortho_tol = 1e-12 if vecs.dtype == torch.float64 else 1e-5
    assert (V.transpose(-1, -2) @ V - eye).abs().max() < ortho_tol
    lo, hi = (n - k - 1, n - 1) if largest else (0, k)
    lam, vec = scipy_eigh(A64, lo, hi)
    if largest:
        lam, vec = lam.flip(-1), vec.flip(-1)
    lam_k, lam_next = lam[..., :k], lam[..., k]
    # ordering
    if largest:
        assert (vals[..., 1:] <= vals[..., :-1]).all()
    else:
        assert (vals[..., 1:] >= vals[..., :-1]).all()
    normA = lam.abs().amax(-1).clamp_min(torch.linalg.matrix_norm(A64, ord=2))
    # the returned vectors' float64 residual meets the tolerance (column-wise, scale-invariant)
    Rcols = (A64 @ V - V * vals.double()[..., None, :]).norm(dim=-2)
    fp_floor = 50 * torch.finfo(vecs.dtype).eps * math.sqrt(n)
    assert (Rcols <= (tol + fp_floor) * (normA[..., None] + vals.double().abs()) * 1.01).all(), \
        (Rcols / normA[..., None]).max()
    # objective: Ky Fan lower bound and the quadratic upper bound from the residual
    sb, ob, rf = ritz_bounds(A64, V, lam_next, largest=largest)
    obj = objective(A64, V)
    opt = lam_k.sum(-1)
    slack = 100 * torch.finfo(vecs.dtype).eps * normA * k
    if largest:
        assert (obj <= opt + slack).all() and (opt - obj <= 2 * ob + slack).all()
    else:
        assert (obj >= opt - slack).all() and (obj - opt <= 2 * ob + slack).all()
    # subspace: Davis-Kahan bound, and a fixed target when the gap is wide
    ang = sin_theta(V, vec[..., :k])
    assert (ang <= 1.01 * sb + 1e-12).all()
    if sin_tol is not None:
        assert (ang <= sin_tol).all(), ang.max()
    # values are the Ritz values
    torch.testing.assert_close(vals.double(), (V * (A64 @ V)).sum(-2), rtol=0, atol=float(slack.max()) + 1e-6 * float(normA.max()) * (vecs.dtype == torch.float32))


def _inexact_inverse(ev, g, rel=0.3):
    """An SPD preconditioner spectrally equivalent to (A - sigma I)^-1 within (1 +- rel), sigma just
    below the spectrum: Q diag(1 / ((ev - sigma)(1 + u))) Q^T.

    Uses A's own eigenvectors, perturbed per eigenvalue: a stand-in for a good problem-specific
    preconditioner (multigrid, incomplete factorization...) with a known quality.
    """
    u = (2 * torch.rand(ev.shape, generator=g, dtype=torch.float64) - 1) * rel
    lo = ev.amin(-1, keepdim=True)
    sigma = lo - 1e-2 * (lo.abs() + 1.0)
    return 1.0 / ((ev - sigma) * (1 + u))


@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("kind", ["cond1e2", "cond1e5", "cond1e8", "clustered", "repeated", "indefinite"])
def test_chosen_spectra_preconditioned(dtype, tol, kind):
    """Condition numbers 1e2..1e8, clustered/repeated/indefinite bottoms, with an inexact SPD preconditioner."""
    n, k = 120, 5
    g = gen(sum(map(ord, kind)))
    ev = spectrum(kind, n, k, g).expand(3, n)
    Q = orthogonal((3,), n, g)
    A = (Q * ev[..., None, :]) @ Q.transpose(-1, -2)
    A = 0.5 * (A + A.transpose(-1, -2))
    m = _inexact_inverse(ev, g)
    M = (Q * m[..., None, :]) @ Q.transpose(-1, -2)
    M = 0.5 * (M + M.transpose(-1, -2))
    vals, vecs, info = lk.lobpcg(A.to(dtype), k, M=M.to(dtype), tol=tol, maxiter=300, return_info=True)
    assert info["converged"].all() and not info["fallback"]
    assert (info["iterations"] < 150).all()
    _check(A.to(dtype), vals, vecs, k, tol)


@pytest.mark.parametrize("kind", ["cond1e2", "indefinite"])
def test_chosen_spectra_unpreconditioned(kind):
    n, k = 100, 4
    g = gen(sum(map(ord, kind)) + 1)
    A = with_spectrum(spectrum(kind, n, k, g).expand(2, n), g)
    vals, vecs, info = lk.lobpcg(A, k, maxiter=2000, return_info=True)
    assert info["converged"].all()
    _check(A, vals, vecs, k, 1.5e-8)


@pytest.mark.parametrize("batch", [(), (3,), (2, 3)])
@pytest.mark.parametrize("largest", [False, True])
def test_batch_shapes_and_largest(batch, largest):
    n, k = 60, 4
    g = gen(len(batch) + 10 * largest)
    ev = torch.linspace(-10.0, 50.0, n, dtype=torch.float64) + 0.1 * torch.rand(n, generator=g, dtype=torch.float64)
    ev = ev.sort().values.expand(*batch, n) if batch else ev.sort().values
    A = with_spectrum(ev, g)
    vals, vecs = lk.lobpcg(A, k, largest=largest, maxiter=3000)
    _check(A, vals, vecs, k, 1.5e-8, largest=largest, sin_tol=1e-5)


def test_batched_equals_one_by_one_and_deterministic():
    n, k = 80, 3
    g = gen(4)
    A = with_spectrum(torch.stack([torch.linspace(1.0, 30.0, n, dtype=torch.float64),
                                   spectrum("indefinite", n, k, g)]), g)
    vals, vecs = lk.lobpcg(A, k)
    vals2, vecs2 = lk.lobpcg(A, k)
    assert torch.equal(vals, vals2) and torch.equal(vecs, vecs2)
    for i in range(2):
        vi, Vi = lk.lobpcg(A[i], k)
        torch.testing.assert_close(vi, vals[i], rtol=1e-10, atol=1e-10 * vals[i].abs().max().item())
        assert sin_theta(Vi, vecs[i]) < 1e-6


def test_laplacian_hard_case():
    """1-D Laplacian: eigenvalues known in closed form, condition ~ n^2, tiny relative gaps."""
    n, k = 100, 4
    A = laplacian_1d(n)
    vals, vecs, info = lk.lobpcg(A, k, tol=1e-9, maxiter=5000, return_info=True)
    assert info["converged"].all()
    torch.testing.assert_close(vals, laplacian_1d_evals(n)[:k], rtol=1e-7, atol=0)
    _check(A, vals, vecs, k, 1e-9)


def test_laplacian_2048_preconditioned_callable():
    """n = 2048 Laplacian through callables for A and M (M: inverse of a shifted Laplacian by banded
    Cholesky); the preconditioner must cut the iterations by an order of magnitude."""
    import scipy.linalg as sla

    n, k = 2048, 4
    off = -torch.ones(n - 1, dtype=torch.float64)

    def apply_A(X):
        Y = 2.0 * X
        Y[..., :-1, :] += off[:, None] * X[..., 1:, :]
        Y[..., 1:, :] += off[:, None] * X[..., :-1, :]
        return Y

    ab = torch.stack([torch.cat([torch.zeros(1), off]), torch.full((n,), 2.0 + 1e-4)]).numpy()  # upper band
    cb = sla.cholesky_banded(ab)

    def apply_M(R):
        Rn = R.reshape(n, -1).numpy()
        return torch.from_numpy(sla.cho_solve_banded((cb, False), Rn)).reshape(R.shape)

    vals, vecs, info = lk.lobpcg(apply_A, k, M=apply_M, n=n, dtype=torch.float64, tol=1e-10, maxiter=200,
                                 return_info=True)
    assert info["converged"].all() and int(info["iterations"]) < 60
    torch.testing.assert_close(vals, laplacian_1d_evals(n)[:k], rtol=1e-6, atol=0)
    V = vecs
    j = torch.arange(1, n + 1, dtype=torch.float64)
    exact = torch.stack([torch.sin(i * j * math.pi / (n + 1)) for i in range(1, k + 1)], -1)
    assert sin_theta(V, exact / exact.norm(dim=0)) < 1e-5


@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("n", [5, 32, 200])
def test_indefinite_guidance_matrix(dtype, tol, n):
    """Omega from synthetic K-FAC statistics (indefinite); n=5 exercises the dense fallback."""
    k = 1 if n == 5 else 6
    Z, G, s = kfac_stats((2,), max(4, n // 2), n, seed=n)
    Om, _ = reference_guidance(Z, G, s, n_train=300.0)
    vals, vecs, info = lk.lobpcg(Om.to(dtype), k, tol=tol, maxiter=3000, return_info=True)
    assert info["fallback"] == (n < 5 * k)
    assert info["converged"].all()
    _check(Om.to(dtype), vals, vecs, k, tol)


@pytest.mark.slow
def test_guidance_n2048_fp32():
    """One realistic-size Omega (n = 2048, fp32) against scipy's subset eigh."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
    from bench.spectra import fast_guidance

    Om = fast_guidance((1,), 2048, seed=3, target_rank=32)[0]
    vals, vecs, info = lk.lobpcg(Om, 8, return_info=True)
    assert info["converged"].all()
    lam, _ = scipy_eigh(Om.double(), 0, 7)
    obj = objective(Om.double(), vecs)
    assert (obj - lam.sum()).abs() <= 1e-5 * lam.sum().abs()


def test_callable_equals_tensor_and_warm_start():
    n, k = 90, 4
    g = gen(8)
    A = with_spectrum(spectrum("indefinite", n, k, g).expand(2, n), g)
    v1, V1, i1 = lk.lobpcg(A, k, return_info=True, maxiter=3000)
    v2, V2, i2 = lk.lobpcg(lambda X: A @ X, k, n=n, batch_shape=(2,), dtype=torch.float64, return_info=True,
                           maxiter=3000)
    torch.testing.assert_close(v1, v2, rtol=1e-9, atol=0)
    assert (sin_theta(V1, V2) < 1e-6).all()
    # warm start from a slightly perturbed solution converges in far fewer iterations
    X = V1 + 1e-6 * torch.randn(V1.shape, generator=gen(9), dtype=torch.float64)
    v3, V3, i3 = lk.lobpcg(A, k, X=X, return_info=True, maxiter=3000)
    assert (i3["iterations"] * 2 <= i1["iterations"]).all(), (i3["iterations"], i1["iterations"])
    _check(A, v3, V3, k, 1.5e-8)


def test_tensor_preconditioner_speeds_up():
    n, k = 90, 4
    g = gen(12)
    A = with_spectrum(spectrum("cond1e2", n, k, g), g)
    M = torch.linalg.inv(A + 0.5 * torch.eye(n, dtype=torch.float64))   # test-only: a near-exact SPD inverse
    _, _, i0 = lk.lobpcg(A, k, return_info=True, maxiter=2000, chebyshev=1)   # plain LOBPCG
    v, V, i1 = lk.lobpcg(A, k, M=M, return_info=True)
    assert int(i1["iterations"]) * 5 < int(i0["iterations"])
    _check(A, v, V, k, 1.5e-8)


def test_nonconvergence_warns_and_reports():
    A = laplacian_1d(200)
    with pytest.warns(RuntimeWarning, match="did not converge"):
        vals, vecs, info = lk.lobpcg(A, 3, maxiter=3, return_info=True)
    assert not info["converged"].all()
    assert (info["residual"] > 1e-8).any()
    assert int(info["iterations"]) == 3
    # still orthonormal and the best Ritz approximation found
    assert (vecs.T @ vecs - torch.eye(3, dtype=torch.float64)).abs().max() < 1e-12
    assert objective(A, vecs) >= laplacian_1d_evals(200)[:3].sum() - 1e-12


def test_nan_from_operator_recovers_by_restart():
    """One poisoned operator application: the NaN guard restarts from the best iterate and converges."""
    n, k = 80, 3
    g = gen(13)
    A = with_spectrum(torch.linspace(-3.0, 30.0, n, dtype=torch.float64).expand(2, n), g)
    calls = {"n": 0}

    def flaky(X):
        calls["n"] += 1
        Y = A @ X
        if calls["n"] == 4:
            Y = Y.clone()
            Y[1, 0, 0] = float("nan")
        return Y

    vals, vecs, info = lk.lobpcg(flaky, k, n=n, batch_shape=(2,), dtype=torch.float64, return_info=True)
    assert info["converged"].all() and int(info["restarts"][1]) >= 1
    _check(A, vals, vecs, k, 1.5e-8)


@pytest.mark.parametrize("kind", ["cond1e5", "indefinite", "clustered"])
def test_fp32_symmetric_kernel_path_matches_bmm_path(kind, monkeypatch):
    """fp32 CPU matrices with n >= 128 are multiplied by the native one-triangle kernel (when built):
    it meets the same checks as the general bmm path, with a lower triangle it never reads."""
    import importlib

    lob = importlib.import_module("lorainit_kernels.linalg.lobpcg")  # the module (the package exports the function)

    n, k = 200, 5
    g = gen(sum(map(ord, kind)) + 7)
    A = with_spectrum(spectrum(kind, n, k, g).expand(3, n), g).float()
    out = {}
    for path, min_n in (("symm", 128), ("bmm", 10 ** 9)):
        monkeypatch.setattr(lob, "_SYMM_MIN_N", min_n)
        vals, vecs, info = lk.lobpcg(A, k, tol=1e-4, maxiter=3000, return_info=True)
        assert info["converged"].all(), (path, info["residual"])
        _check(A, vals, vecs, k, 1e-4)
        out[path] = vals.double()
    normA = A.double().abs().sum(-1).amax()
    assert (out["symm"] - out["bmm"]).abs().max() <= 1e-4 * float(normA)


def test_fp32_asymmetric_input_is_caught_on_the_symmetric_kernel_path():
    g = gen(77)
    A = with_spectrum(torch.linspace(1.0, 5.0, 256, dtype=torch.float64), g).float()
    A[3, 200] += 0.5
    with pytest.raises(ValueError, match=r"A \(256, 256\) is not symmetric at batch index \(\)"):
        lk.lobpcg(A, 4)


def test_asymmetry_caught_with_a_one_column_block_or_a_full_warm_start():
    """The symmetry check probes with two random columns besides the block, so neither a one-column
    block (k=1) nor a warm start of unit vectors that fills the block hides an asymmetric entry."""
    A = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))
    A[1, 3] += 0.7
    with pytest.raises(ValueError, match="not symmetric"):
        lk.lobpcg(A, 1)
    B = torch.diag(torch.arange(1.0, 41.0, dtype=torch.float64))
    B[30, 31] += 0.7
    with pytest.raises(ValueError, match="not symmetric"):
        lk.lobpcg(B, 2, X=torch.eye(40, dtype=torch.float64)[:, :8])


def test_nan_and_inf_from_operator_recover_on_the_fp32_native_path():
    """fp32 CPU blocks take the native Gram kernel: a NaN in one matrix's A W and an Inf in the
    other's (different steps) are caught from the Gram, each matrix restarts once and converges."""
    n, k = 300, 3
    g = gen(14)
    A = with_spectrum(torch.linspace(-3.0, 30.0, n, dtype=torch.float64).expand(2, n), g).float()
    calls = {"n": 0}
    poison = {4: (0, float("nan")), 6: (1, float("inf"))}   # call number -> (matrix, value)

    def flaky(X):
        calls["n"] += 1
        Y = A @ X
        if calls["n"] in poison:
            i, v = poison[calls["n"]]
            Y = Y.clone()
            Y[i, 5, 0] = v
        return Y

    vals, vecs, info = lk.lobpcg(flaky, k, n=n, batch_shape=(2,), dtype=torch.float32, tol=1e-4, return_info=True)
    assert info["converged"].all() and (info["restarts"] == 1).all(), info["restarts"]
    _check(A, vals, vecs, k, 1e-4)


@pytest.mark.parametrize("cholesky_first", [False, True])
def test_orthonormalization_drops_dependent_directions(cholesky_first):
    """The W orthonormalization: a well-conditioned block takes Cholesky-QR (when allowed) and a block
    with a dependent column falls back to SVQB, which drops it; masked columns stay out."""
    import importlib

    lob = importlib.import_module("lorainit_kernels.linalg.lobpcg")
    g = gen(21)
    V = torch.randn(2, 50, 4, generator=g, dtype=torch.float64).float()
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[1, 2] = False
    drop = (100 * torch.finfo(torch.float32).eps) ** 2
    Q, keep = lob._svqb(V, mask, drop, cholesky_first=cholesky_first)
    assert keep.sum(-1).tolist() == [4, 3]
    for i in range(2):
        Qi = Q[i][:, keep[i]].double()
        assert (Qi.T @ Qi - torch.eye(Qi.shape[1], dtype=torch.float64)).abs().max() < 1e-5
        Vi = V[i][:, mask[i]].double()
        assert sin_theta(Qi, torch.linalg.qr(Vi)[0]).max() < 1e-5   # same span as the kept columns
    # a dependent column (exact combination of two others): dropped, never amplified noise
    Vd = V.clone()
    Vd[0, :, 3] = Vd[0, :, 0] - 2 * Vd[0, :, 1]
    Q, keep = lob._svqb(Vd, torch.ones(2, 4, dtype=torch.bool), drop, cholesky_first=cholesky_first)
    assert keep[0].sum() == 3 and keep[1].sum() == 4
    Q0 = Q[0][:, keep[0]].double()
    assert (Q0.T @ Q0 - torch.eye(3, dtype=torch.float64)).abs().max() < 1e-5


def test_bad_input():
    A = torch.randn(2, 3, 20, 20, dtype=torch.float64)
    A = A + A.transpose(-1, -2)
    with pytest.raises(ValueError, match=r"square matrix .* got shape \(4, 5\)"):
        lk.lobpcg(torch.randn(4, 5), 1)
    with pytest.raises(ValueError, match=r"k must be an int with 1 <= k <= n = 20, got 21"):
        lk.lobpcg(A, 21)
    An = A.clone()
    An[1, 2, 3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"NaN/Inf .* batch index \(1, 2\)"):
        lk.lobpcg(An, 2)
    Aa = A.clone()
    Aa[0, 1, 0, 1] += 5.0
    with pytest.raises(ValueError, match=r"not symmetric at batch index \(0, 1\)"):
        lk.lobpcg(Aa, 2)
    with pytest.raises(ValueError, match=r"X \(warm start\) must have shape"):
        lk.lobpcg(A, 2, X=torch.randn(2, 20, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"M must have shape"):
        lk.lobpcg(A, 2, M=torch.eye(19))
    with pytest.raises(ValueError, match="n= .* is required"):
        lk.lobpcg(lambda X: X, 2)
    with pytest.raises(ValueError, match=r"callable A returned \(20, 3\)"):
        lk.lobpcg(lambda X: X[..., :3], 2, n=20)
    with pytest.raises(ValueError, match=r"NaN/Inf .* batch index \(1,\)"):
        lk.lobpcg(lambda X: X * torch.tensor([1.0, float("nan")])[:, None, None], 2, n=20, batch_shape=(2,))
    with pytest.raises(ValueError, match="tol must be"):
        lk.lobpcg(A, 2, tol=-1.0)


# ---------------------------------------------------------------------------------------------
# shift-invert preconditioner
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, tol, kind", [(torch.float64, 1e-8, "laplacian"), (torch.float32, 1e-4, "laplacian")])
def test_shift_invert_converges_in_few_iterations(dtype, tol, kind):
    """Hard spectra (Laplacian: condition ~n^2, tiny relative gaps; geometric 1..1e5): the shift-invert
    preconditioner converges in a handful of iterations, where plain LOBPCG needs many."""
    from lorainit_kernels.linalg import shift_invert_preconditioner

    n, k = 300, 4
    if kind == "laplacian":
        A = torch.stack([laplacian_1d(n), 3.0 * laplacian_1d(n)])
    else:
        g = gen(31)
        A = with_spectrum(spectrum("cond1e5", n, k, g).expand(2, n), g)
    A = A.to(dtype)
    M = shift_invert_preconditioner(A)
    lam_min = torch.linalg.eigvalsh(A.double())[..., 0]
    assert (M.sigma < lam_min).all() and (M.tries >= 1).all()
    vals, vecs, info = lk.lobpcg(A, k, M=M, tol=tol, return_info=True)
    assert info["converged"].all() and (info["iterations"] <= 12).all(), info["iterations"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, _, info0 = lk.lobpcg(A, k, tol=tol, maxiter=60, return_info=True, chebyshev=1)   # plain LOBPCG
    assert (info0["iterations"] >= 4 * info["iterations"]).all(), (info0["iterations"], info["iterations"])
    _check(A, vals, vecs, k, tol)


def test_shift_invert_retry_when_shift_too_high():
    """A shift above lambda_min makes Cholesky fail: the shift is lowered and refactored, per matrix."""
    from lorainit_kernels.linalg import shift_invert_preconditioner

    n, k = 80, 3
    g = gen(32)
    ev = torch.stack([torch.linspace(-3.0, 30.0, n, dtype=torch.float64), torch.linspace(1.0, 9.0, n, dtype=torch.float64)])
    A = with_spectrum(ev, g)
    sigma = torch.tensor([-2.0, 0.5], dtype=torch.float64)      # too high for matrix 0, fine for matrix 1
    M = shift_invert_preconditioner(A, sigma)
    assert int(M.tries[0]) >= 2 and int(M.tries[1]) == 1
    assert float(M.sigma[0]) < -3.0 and float(M.sigma[1]) == 0.5
    vals, vecs, info = lk.lobpcg(A, k, M=M, return_info=True)
    assert info["converged"].all()
    _check(A, vals, vecs, k, 1.5e-8)
    # the Gershgorin fallback: a huge first guess that never works within two tries lands on the safe bound
    M2 = shift_invert_preconditioner(A, 100.0, max_tries=2)
    gersh = (2 * A.diagonal(dim1=-2, dim2=-1) - A.abs().sum(-1)).amin(-1)
    assert (M2.sigma <= gersh).all() and (M2.tries == 2).all()
    # a lower bound is respected
    M3 = shift_invert_preconditioner(A, lower_bound=torch.tensor([-3.5, 0.9], dtype=torch.float64))
    assert (M3.sigma >= torch.tensor([-3.5, 0.9], dtype=torch.float64) - 1e-6).all()
    assert (M3.sigma < ev[:, 0]).all()


def test_shift_invert_bad_input():
    from lorainit_kernels.linalg import shift_invert_preconditioner

    with pytest.raises(ValueError, match="square"):
        shift_invert_preconditioner(torch.randn(3, 4))
    A = laplacian_1d(20)
    An = A.clone()
    An[3, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        shift_invert_preconditioner(An)
    M = shift_invert_preconditioner(A)
    with pytest.raises(ValueError, match="built for shape"):
        lk.lobpcg(A.expand(2, 20, 20), 2, M=M)


def test_fp32_lower_triangle_asymmetry_and_nan_caught_on_the_symmetric_kernel_path():
    """The one-triangle kernel reads A's upper triangle only; the input check's U^T A reads both, so
    an asymmetric or NaN entry in the strict lower triangle is still reported."""
    g = gen(78)
    A = with_spectrum(torch.linspace(1.0, 5.0, 256, dtype=torch.float64), g).float().expand(2, 256, 256).clone()
    Aa = A.clone()
    Aa[1, 200, 3] += 0.5
    with pytest.raises(ValueError, match=r"not symmetric at batch index \(1,\)"):
        lk.lobpcg(Aa, 4)
    An = A.clone()
    An[1, 200, 3] = float("nan")
    with pytest.raises(ValueError, match=r"NaN/Inf .* batch index \(1,\)"):
        lk.lobpcg(An, 4)
    An[1, 200, 3] = float("inf")
    with pytest.raises(ValueError, match=r"NaN/Inf .* batch index \(1,\)"):
        lk.lobpcg(An, 4)


# ---- Chebyshev polynomial preconditioner (chebyshev=m) ------------------------------------------------

@pytest.mark.parametrize("kind", ["cond1e2", "clustered", "indefinite"])
@pytest.mark.parametrize("largest", [False, True])
def test_chebyshev_preconditioner_same_pairs_fewer_iterations(kind, largest):
    n, k = 150, 4
    g = gen(91)
    A = with_spectrum(spectrum(kind, n, k, g).expand(2, n), g)
    if largest:
        A = -A
    v1, V1, i1 = lk.lobpcg(A, k, largest=largest, return_info=True, maxiter=3000, chebyshev=1)
    v3, V3, i3 = lk.lobpcg(A, k, largest=largest, return_info=True, maxiter=3000)          # default: 3
    v5, V5, i5 = lk.lobpcg(A, k, largest=largest, return_info=True, maxiter=3000, chebyshev=5)
    for v, V, info in ((v1, V1, i1), (v3, V3, i3), (v5, V5, i5)):
        assert info["converged"].all()
        _check(A, v, V, k, 1.5e-8, largest=largest)
    # fewer iterations (Rayleigh-Ritz steps); 3 (5) products each instead of 1
    assert (i3["iterations"] * 3 <= 2 * i1["iterations"]).all(), (i1["iterations"], i3["iterations"])
    assert (i5["iterations"] <= i3["iterations"]).all(), (i3["iterations"], i5["iterations"])


def test_chebyshev_polynomial_is_positive_whatever_the_estimates():
    """q(A) from _Solver.chebyshev_filter is SPD for odd m even with estimates that are off:
    eigenvalues below s, between s and alpha, and above beta (lambda_max underestimated)."""
    lob = __import__("importlib").import_module("lorainit_kernels.linalg.lobpcg")
    n, k, nb = 60, 3, 6
    lam = torch.linspace(-5.0, 20.0, n, dtype=torch.float64)
    A = torch.diag(lam).expand(4, n, n).contiguous()
    op = lob._Op(A, "A", (4,), n, torch.float64, A.device)
    for m in (3, 5, 7):
        solver = lob._Solver(op, None, k, nb, 1e-8, 10, 1, lambda rows, p: None, chebyshev=m)
        # per matrix: estimates far inside the spectrum, at its ends, and lambda_max underestimated 4x
        solver.theta = torch.tensor([[0.0] * k + [1.0] * (nb - k), [-5.0] * k + [-4.0] * (nb - k),
                                     [3.0] * k + [3.0] * (nb - k), [10.0] * k + [15.0] * (nb - k)], dtype=torch.float64)
        solver.theta = solver.theta + torch.linspace(0, 1e-3, nb, dtype=torch.float64)
        solver.lmax = torch.tensor([5.0, 20.0, 3.5, 15.0], dtype=torch.float64)
        Q = solver.chebyshev_filter(torch.eye(n, dtype=torch.float64).expand(4, n, n).contiguous())
        d = Q.diagonal(dim1=-2, dim2=-1)
        assert (Q - torch.diag_embed(d)).abs().max() <= 1e-9 * d.abs().max()   # q(diag) is diagonal
        assert (d > 0).all(), (m, d.min(-1))


def test_chebyshev_argument_checks_and_defaults():
    A = torch.diag(torch.arange(1.0, 41.0, dtype=torch.float64))
    for bad in (0, 2, 4, -1, True, 3.0):
        with pytest.raises(ValueError, match="chebyshev must be an odd int"):
            lk.lobpcg(A, 2, chebyshev=bad)
    with pytest.raises(ValueError, match="chebyshev > 1 and M are exclusive"):
        lk.lobpcg(A, 2, M=torch.eye(40, dtype=torch.float64), chebyshev=3)
    lk.lobpcg(A, 2, M=torch.eye(40, dtype=torch.float64), chebyshev=1)
    # callables default to plain LOBPCG (their products may be expensive); chebyshev=3 on request
    g = gen(5)
    B = with_spectrum(spectrum("cond1e2", 200, 4, g), g)
    _, _, i_plain = lk.lobpcg(B, 4, return_info=True, chebyshev=1)
    _, _, i_call = lk.lobpcg(lambda X: B @ X, 4, n=200, dtype=torch.float64, return_info=True)
    assert int(i_call["iterations"]) == int(i_plain["iterations"])
    v, V, i_c3 = lk.lobpcg(lambda X: B @ X, 4, n=200, dtype=torch.float64, return_info=True, chebyshev=3)
    assert i_c3["converged"].all() and int(i_c3["iterations"]) < int(i_plain["iterations"])
    _check(B, v, V, 4, 1.5e-8)
