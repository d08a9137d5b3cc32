"""lk.lobpcg never returns a wrong answer in silence: degenerate warm starts and search directions,
verification of what is returned, NaN-safe best iterates, per-matrix independence inside a batch,
scipy's operator conventions, and ports of scipy's own lobpcg test problems
(scipy/sparse/linalg/_eigen/lobpcg/tests/test_lobpcg.py: regression, diagonal with a preconditioner,
Fiedler vector, eigsh consistency, float32 tolerance, Sakurai, Sakurai inverse by a callable).

Properties against float64 eigh; eigenvectors compared as subspaces or by the objective."""
import math
import warnings

import pytest
import torch

import lorainit_kernels as lk
from linalg_helpers import gen, objective, sin_theta, spectrum, with_spectrum

F64 = torch.float64
DTYPES = [(torch.float64, 1.5e-8), (torch.float32, 1e-4)]


def _no_warning_call(*args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        return lk.lobpcg(*args, return_info=True, **kw)


def _assert_right(A, vals, vecs, info, k, *, largest=False, obj_rtol=None):
    """Orthonormal columns, the true extreme eigenvalues, the optimal objective, info says converged."""
    A64 = A.double()
    n = A.shape[-1]
    lam = torch.linalg.eigvalsh(A64)
    want = lam.flip(-1)[..., :k] if largest else lam[..., :k]
    eps = float(torch.finfo(vecs.dtype).eps)
    V = vecs.double()
    eye = torch.eye(k, dtype=F64)
    assert (V.transpose(-1, -2) @ V - eye).abs().max() <= 10 * math.sqrt(n) * eps
    scale = lam.abs().amax(-1, keepdim=True)
    tol_v = 1e-6 if vecs.dtype == F64 else 2e-3
    assert ((vals.double() - want).abs() <= tol_v * scale).all(), (vals, want)
    obj = objective(A64, V)
    rt = obj_rtol if obj_rtol is not None else (1e-10 if vecs.dtype == F64 else 1e-4)
    assert ((obj - want.sum(-1)).abs() <= rt * scale[..., 0] * k).all()
    assert info["converged"].all()
    # the reported residual is the explicit one of the returned pairs
    R = (A64 @ V - V * vals.double()[..., None, :]).norm(dim=-2)
    rel = R / (scale + vals.double().abs())
    assert (rel <= 2 * info["residual"] + 50 * eps).all()


def path_laplacian(n):
    """L = D - Adj of the path graph (scipy's Fiedler problem): eigenvalues 2 (1 - cos(pi j / n))."""
    L = 2.0 * torch.eye(n, dtype=F64)
    i = torch.arange(n - 1)
    L[i, i + 1] = -1.0
    L[i + 1, i] = -1.0
    L[0, 0] = L[-1, -1] = 1.0
    return L


def fiedler_guess(n):
    return torch.stack([torch.ones(n, dtype=F64), torch.cat([torch.ones(n // 2), -torch.ones(n - n // 2)]).double()], -1)


# ---------------------------------------------------------------------------------------------
# degenerate warm starts
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_path_laplacian_warm_start_spanning_an_invariant_pair(dtype, tol):
    """The issue's case: 12-node path Laplacian, k=2, X = [ones, +-1]: the P block collapses."""
    L = path_laplacian(12).to(dtype)
    vals, vecs, info = _no_warning_call(L, 2, X=fiedler_guess(12).to(dtype), tol=tol)
    _assert_right(L, vals, vecs, info, 2)


@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("case", ["duplicated", "rank_one", "exact", "top_subspace", "zero_column"])
def test_degenerate_warm_starts(dtype, tol, case):
    n, k = 60, 4
    g = gen(sum(map(ord, case)))
    A = with_spectrum(spectrum("indefinite", n, k, g), g)
    lam, Q = torch.linalg.eigh(A)
    v = torch.randn(n, 1, generator=g, dtype=F64)
    X = {"duplicated": torch.cat([v, v, v, v], -1),
         "rank_one": v @ torch.randn(1, 8, generator=g, dtype=F64),
         "exact": Q[:, :k],
         "top_subspace": Q[:, -8:],                     # the whole block: an invariant subspace, the wrong end
         "zero_column": torch.cat([Q[:, :1], torch.zeros(n, 1, dtype=F64)], -1)}[case]
    vals, vecs, info = _no_warning_call(A.to(dtype), k, X=X.to(dtype), tol=tol, maxiter=2000)
    _assert_right(A.to(dtype), vals, vecs, info, k)
    if case == "exact":
        assert int(info["iterations"]) <= 2
    if case in ("duplicated", "rank_one", "zero_column"):
        assert int(info["replaced"]) >= 1


@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_batch_mixing_an_easy_and_a_degenerate_matrix(dtype, tol):
    """One matrix with a collapsing warm start beside an easy one: both right, the easy one exactly
    what it is alone."""
    n, k = 12, 2
    g = gen(5)
    easy = with_spectrum(torch.linspace(1.0, 9.0, n, dtype=F64), g)
    A = torch.stack([easy, path_laplacian(n)]).to(dtype)
    X = torch.stack([torch.randn(n, 2, generator=g, dtype=F64), fiedler_guess(n)]).to(dtype)
    vals, vecs, info = _no_warning_call(A, k, X=X, tol=tol)
    _assert_right(A, vals, vecs, info, k)
    v0, V0, i0 = _no_warning_call(A[0], k, X=X[0], tol=tol)
    assert int(i0["iterations"]) == int(info["iterations"][0])
    torch.testing.assert_close(v0, vals[0], rtol=1e-6, atol=0)


def test_multiplicity_larger_than_the_block_stresses_locking():
    """A 57-fold eigenvalue right after the wanted ones: W keeps vanishing inside the eigenspace."""
    n, k = 60, 4
    g = gen(6)
    ev = torch.cat([torch.tensor([1.0, 2.0, 3.0]), torch.full((n - 3,), 10.0)]).double()
    A = with_spectrum(ev, g)
    vals, vecs, info = _no_warning_call(A, k)
    _assert_right(A, vals, vecs, info, k)


@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_large_k_and_the_dense_path(dtype, tol):
    """k = n/5 (the largest k that iterates: the block [X, P, W] then fills the space) and n < 5 k
    (dense path, with its explicit residuals)."""
    g = gen(7)
    A = with_spectrum(spectrum("indefinite", 60, 12, g), g).to(dtype)
    vals, vecs, info = _no_warning_call(A, 12, tol=tol, maxiter=3000)
    _assert_right(A, vals, vecs, info, 12)
    assert not info["fallback"]
    B = with_spectrum(spectrum("indefinite", 9, 3, g), g).to(dtype)
    vals, vecs, info = _no_warning_call(B, 3, tol=tol)
    _assert_right(B, vals, vecs, info, 3)
    assert info["fallback"] and (info["residual"] < 1e-3 * tol).all()


# ---------------------------------------------------------------------------------------------
# flagged, never silent; NaN-safe best iterate
# ---------------------------------------------------------------------------------------------
def test_unconverged_matrix_is_flagged_with_one_warning_naming_it():
    g = gen(8)
    easy = torch.cat([torch.tensor([1.0, 2.0, 3.0]), torch.linspace(1e3, 2e3, 197)]).double()
    L = torch.stack([with_spectrum(easy, g), with_spectrum(torch.logspace(0, 6, 200, dtype=F64), g)])
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        vals, vecs, info = lk.lobpcg(L, 3, maxiter=30, tol=1e-6, return_info=True)
    msgs = [str(w.message) for w in rec if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "(1,)" in msgs[0] and "(0,)" not in msgs[0], msgs
    assert info["converged"][0].all() and not info["converged"][1].all()
    assert torch.isfinite(vecs).all() and float(info["ortho_error"].max()) < 1e-12


def test_nan_at_the_last_verification_returns_the_best_finite_iterate():
    """At maxiter the explicit product of the current block is NaN: the best iterate is returned."""
    n, k, maxiter = 200, 3, 5
    g = gen(9)
    A = with_spectrum(torch.logspace(0, 4, n, dtype=F64), g)
    calls = {"n": 0}

    def flaky(X):
        calls["n"] += 1
        Y = A @ X
        return Y * float("nan") if calls["n"] == maxiter + 2 else Y   # 1 initial + maxiter steps + 1

    with pytest.warns(RuntimeWarning, match="did not converge"):
        vals, vecs, info = lk.lobpcg(flaky, k, n=n, dtype=F64, maxiter=maxiter, return_info=True)
    assert calls["n"] >= maxiter + 2
    assert torch.isfinite(vals).all() and torch.isfinite(vecs).all()
    assert float(info["ortho_error"]) < 1e-12 and not info["converged"].any()
    assert objective(A, vecs) >= torch.linalg.eigvalsh(A)[:k].sum() - 1e-9


# ---------------------------------------------------------------------------------------------
# per-matrix independence, seeds, generators, scipy's conventions
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_matrix_result_does_not_depend_on_its_batch(dtype):
    """Alone or beside harder matrices (that iterate longer): the same iterations and result."""
    n, k = 80, 4
    g = gen(10)
    gapped = torch.cat([torch.arange(1.0, 5.0), torch.linspace(8.0, 40.0, n - 4)]).double()
    A = with_spectrum(torch.stack([gapped, torch.linspace(1.0, 10.0, n, dtype=F64),
                                   spectrum("indefinite", n, k, g)]), g).to(dtype)
    fp64 = dtype == torch.float64
    tol = None if fp64 else 1e-4
    vals, vecs, info = _no_warning_call(A, k, seeds=[3, 4, 5], tol=tol, maxiter=3000)
    assert len(set(info["iterations"].tolist())) > 1          # the neighbours iterate longer or shorter
    for i in range(3):
        vi, Vi, ii = _no_warning_call(A[i], k, seeds=[3 + i], tol=tol, maxiter=3000)
        if fp64:   # fp32 products of a batch may round differently from one matrix's (BLAS blocking)
            assert int(ii["iterations"]) == int(info["iterations"][i])
        else:
            assert abs(int(ii["iterations"]) - int(info["iterations"][i])) <= 0.2 * int(info["iterations"][i]) + 2
        rtol = 1e-6 if fp64 else 1e-4
        torch.testing.assert_close(vi.double(), vals[i].double(), rtol=rtol, atol=rtol * float(vals[i].abs().max()))
        assert sin_theta(Vi, vecs[i]) < (1e-6 if fp64 else 1e-2)
    # the default seed is the same for every matrix: independence without seeds too
    v_all, _, i_all = _no_warning_call(A, k, tol=tol, maxiter=3000)
    v_one, _, i_one = _no_warning_call(A[1:2], k, tol=tol, maxiter=3000)
    if fp64:
        assert int(i_all["iterations"][1]) == int(i_one["iterations"][0])
    with pytest.raises(ValueError, match="one int per matrix"):
        lk.lobpcg(A, k, seeds=[1, 2])


def test_generator_and_seeds_reproducible():
    g = gen(11)
    A = with_spectrum(torch.linspace(-2.0, 5.0, 80, dtype=F64).expand(2, 80), g)
    a = lk.lobpcg(A, 3, generator=torch.Generator().manual_seed(1))
    b = lk.lobpcg(A, 3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = lk.lobpcg(A, 3, seeds=torch.tensor([7, 8]))
    d = lk.lobpcg(A, 3, seeds=[7, 8])
    assert torch.equal(c[1], d[1])


def test_generator_draws_on_the_device(device):
    """A generator on the matrix's device draws the start there (CPU always, CUDA when present); the result is
    reproducible and right."""
    g = gen(12)
    A = with_spectrum(torch.linspace(1.0, 5.0, 100, dtype=F64), g).to(device)
    vals, vecs, info = lk.lobpcg(A, 3, generator=torch.Generator(device=device).manual_seed(0), return_info=True)
    again = lk.lobpcg(A, 3, generator=torch.Generator(device=device).manual_seed(0))
    assert vecs.device.type == device and info["converged"].all()
    assert torch.equal(vals, again[0]) and torch.equal(vecs, again[1])
    torch.testing.assert_close(vals.cpu(), torch.linspace(1.0, 5.0, 100, dtype=F64)[:3], rtol=1e-6, atol=1e-6)


def test_callable_infers_size_batch_and_dtype_from_X():
    g = gen(13)
    A = with_spectrum(torch.linspace(1.0, 30.0, 50, dtype=F64).expand(2, 50), g).float()
    X = torch.randn(2, 50, 3, generator=g).float()
    vals, vecs, info = _no_warning_call(lambda V: A @ V, 3, X=X, tol=1e-4)
    assert vals.shape == (2, 3) and vals.dtype == torch.float32
    _assert_right(A, vals, vecs, info, 3)


# ---------------------------------------------------------------------------------------------
# scipy's lobpcg test problems
# ---------------------------------------------------------------------------------------------
def test_scipy_regression_identity():
    vals, vecs, info = _no_warning_call(torch.eye(10, dtype=F64), 1, X=torch.ones(10, 1, dtype=F64))
    torch.testing.assert_close(vals, torch.ones(1, dtype=F64), rtol=1e-12, atol=0)
    assert info["converged"].all()


@pytest.mark.parametrize("form", ["tensor", "callable"])
def test_scipy_diagonal_with_preconditioner(form):
    n, k = 30, 4
    d = torch.arange(1, n + 1, dtype=F64)
    A, Mt = torch.diag(d), torch.diag(1.0 / d)
    M = Mt if form == "tensor" else (lambda R: R / d[:, None])
    X = torch.randn(n, k, generator=gen(14), dtype=F64)
    vals, vecs, info = _no_warning_call(A if form == "tensor" else (lambda V: d[:, None] * V), k, X=X, M=M, maxiter=40)
    torch.testing.assert_close(vals, d[:k], rtol=1e-7, atol=0)
    torch.testing.assert_close(A @ vecs, vecs * vals, rtol=0, atol=1e-3)


@pytest.mark.parametrize("n", [8, 12])   # 8: the dense path; 12: iterative
def test_scipy_fiedler(n):
    L = path_laplacian(n)
    w = 2 * (1 - torch.cos(math.pi * torch.arange(n, dtype=F64) / n))
    Vexact = torch.cos(torch.outer(torch.arange(n, dtype=F64) + 0.5, math.pi * torch.arange(n, dtype=F64) / n))
    for X, largest, want in ((Vexact[:, :2], False, w[:2]), (Vexact[:, -2:], True, w[-2:].flip(0)),
                             (fiedler_guess(n), False, w[:2])):
        vals, vecs, info = _no_warning_call(L, 2, X=X, largest=largest, tol=1e-10)
        torch.testing.assert_close(vals, want, rtol=0, atol=1e-13)
        torch.testing.assert_close(L @ vecs, vecs * vals, rtol=0, atol=1e-8)
        assert info["converged"].all()


@pytest.mark.parametrize("n, atol", [(20, 1e-3), (5, 1e-8)])
def test_scipy_eigsh_consistency(n, atol):
    d = torch.arange(1, n + 1, dtype=F64)
    X = torch.randn(n, 2, generator=gen(15), dtype=F64)
    vals, vecs = lk.lobpcg(torch.diag(d), 2, X=X, largest=True, maxiter=100)
    torch.testing.assert_close(vals, d.flip(0)[:2], rtol=0, atol=1e-12)
    torch.testing.assert_close(d[:, None] * vecs, vecs * vals, rtol=0, atol=atol)


def test_scipy_tolerance_float32():
    n, m = 50, 3
    A = torch.diag(-torch.arange(1, n + 1, dtype=torch.float32))
    X = torch.randn(n, m, generator=gen(16))
    vals, _ = lk.lobpcg(A, m, X=X, tol=1.25e-5, maxiter=50, largest=True)   # scipy's default: largest
    torch.testing.assert_close(vals, -torch.arange(1, m + 1, dtype=torch.float32), atol=2e-5, rtol=1e-5)


def sakurai(n):
    """scipy.linalg.sakurai: the pentadiagonal (5, 6, ..., 6, 5; -4; 1) = T^2 with T = tridiag(-1, 2, -1);
    eigenvalues (2 - 2 cos(j pi / (n + 1)))^2."""
    d0 = torch.full((n,), 6.0, dtype=F64)
    d0[0] = d0[-1] = 5.0
    S = torch.diag(d0) + torch.diag(torch.full((n - 1,), -4.0, dtype=F64), 1) + torch.diag(torch.full((n - 1,), -4.0, dtype=F64), -1)
    S = S + torch.diag(torch.ones(n - 2, dtype=F64), 2) + torch.diag(torch.ones(n - 2, dtype=F64), -2)
    ev = (2 - 2 * torch.cos(torch.arange(1, n + 1, dtype=F64) * math.pi / (n + 1))) ** 2
    return S, ev


def test_scipy_sakurai():
    n, m = 50, 3
    S, ev = sakurai(n)
    tol = 100 * n ** 3 * torch.finfo(F64).eps                              # scipy's eigenvalue tolerance
    vals, vecs, info = _no_warning_call(S, m, X=torch.randn(n, m, generator=gen(17), dtype=F64), maxiter=5000)
    torch.testing.assert_close(vals, ev[:m], rtol=0, atol=tol)


def test_scipy_sakurai_inverse_through_a_callable():
    import scipy.linalg as sla

    n, m = 50, 3
    S, ev = sakurai(n)
    cf = sla.cho_factor(S.numpy())

    def inv(V):
        return torch.from_numpy(sla.cho_solve(cf, V.numpy()))

    vals, vecs, info = _no_warning_call(inv, m, X=torch.randn(n, m, generator=gen(18), dtype=F64), largest=True,
                                        maxiter=80)
    torch.testing.assert_close(vals, 1.0 / ev[:m], rtol=1e-9, atol=0)
    assert int(info["iterations"]) < 80
