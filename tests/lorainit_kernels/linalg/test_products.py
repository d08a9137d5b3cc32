"""svd_of_product against torch.linalg.svd of the formed product (float64 reference)."""
import pytest
import torch

import lorainit_kernels as lk
from linalg_helpers import gen, orthogonal, sin_theta


def _factors(batch, m, n, R, g, *, dtype=torch.float64, decay=0.7):
    """B (m, R), A (R, n) whose product has singular values decay^j (distinct, known gaps)."""
    r = min(m, n, R)
    sv = decay ** torch.arange(r, dtype=torch.float64)
    U = orthogonal(batch, m, g)[..., :, :r]
    V = orthogonal(batch, n, g)[..., :, :r]
    M = orthogonal(batch, R, g)
    # B A = U diag(sv) V^T with B = U diag(sv) C^T, A = C V^T, C an (R, r) slice of an invertible mixer
    C = (M[..., :, :r] * torch.logspace(0, 1, r, dtype=torch.float64))  # columns of different scales
    B = (U * sv[..., None, :]) @ torch.linalg.pinv(C)
    A = C @ V.transpose(-1, -2)
    return B.to(dtype), A.to(dtype)


@pytest.mark.parametrize("batch", [(), (3,), (2, 3)])
@pytest.mark.parametrize("shape", [(40, 30, 8), (12, 50, 20), (64, 64, 64)])
def test_matches_svd_of_formed_product_fp64(batch, shape):
    m, n, R = shape
    g = gen(hash((batch, shape)) % 997)
    B = torch.randn(*batch, m, R, generator=g, dtype=torch.float64)
    A = torch.randn(*batch, R, n, generator=g, dtype=torch.float64)
    k = min(m, n, R) // 2
    U, S, V = lk.svd_of_product(B, A, k)
    assert U.shape == batch + (m, k) and S.shape == batch + (k,) and V.shape == batch + (n, k)
    Ur, Sr, Vhr = torch.linalg.svd(B @ A, full_matrices=False)
    torch.testing.assert_close(S, Sr[..., :k], rtol=1e-11, atol=1e-11 * Sr[..., :1].amax().item())
    eye = torch.eye(k, dtype=torch.float64)
    assert (U.transpose(-1, -2) @ U - eye).abs().max() < 1e-12
    assert (V.transpose(-1, -2) @ V - eye).abs().max() < 1e-12
    # principal angles where the k-th gap is clear (random Gaussian factors: check it)
    gap = (Sr[..., k - 1] - Sr[..., k]) / Sr[..., 0]
    ok = gap > 1e-6
    assert ok.any()
    assert (sin_theta(U, Ur[..., :k])[ok] < 1e-8).all()
    assert (sin_theta(V, Vhr[..., :k, :].transpose(-1, -2))[ok] < 1e-8).all()
    # pairing: U_j^T (B A) V_j = S_j
    torch.testing.assert_close((U * ((B @ A) @ V)).sum(-2), S, rtol=1e-10, atol=1e-10 * Sr[..., :1].amax().item())


def test_full_rank_reconstructs_product():
    g = gen(1)
    B, A = _factors((2,), 30, 20, 10, g)
    U, S, V = lk.svd_of_product(B, A, 10)
    torch.testing.assert_close(U @ torch.diag_embed(S) @ V.transpose(-1, -2), B @ A, rtol=1e-10, atol=1e-12)
    sv = 0.7 ** torch.arange(10, dtype=torch.float64)
    torch.testing.assert_close(S, sv.expand(2, 10), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fp32_error_within_plain_svd(dtype):
    g = gen(2)
    B64, A64 = _factors((3,), 96, 80, 32, g)
    P64 = B64 @ A64
    Ur, Sr, Vhr = torch.linalg.svd(P64, full_matrices=False)
    B, A = B64.to(dtype), A64.to(dtype)
    k = 6
    U, S, V = lk.svd_of_product(B, A, k)
    assert U.dtype == S.dtype == V.dtype == dtype
    Up, Sp, Vhp = torch.linalg.svd(B @ A, full_matrices=False)       # plain: form the product
    err = (S.double() - Sr[..., :k]).abs().max()
    err_plain = (Sp[..., :k].double() - Sr[..., :k]).abs().max()
    assert err <= 4 * err_plain + 10 * torch.finfo(dtype).eps * Sr[..., 0].max()
    ang = sin_theta(U, Ur[..., :k]).max()
    ang_plain = sin_theta(Up[..., :k], Ur[..., :k]).max()
    assert ang <= 4 * ang_plain + 100 * torch.finfo(dtype).eps


def test_canonical_signs_and_determinism():
    g = gen(3)
    B = torch.randn(4, 20, 6, generator=g, dtype=torch.float64)
    A = torch.randn(4, 6, 15, generator=g, dtype=torch.float64)
    U, S, V = lk.svd_of_product(B, A, 3)
    U2, S2, V2 = lk.svd_of_product(-B, -A, 3)       # same product, different factors
    torch.testing.assert_close(U, U2)
    torch.testing.assert_close(V, V2)
    idx = U.abs().argmax(-2, keepdim=True)
    assert (torch.gather(U, -2, idx) > 0).all()


def test_bad_input():
    B = torch.randn(2, 10, 4)
    A = torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match=r"k must be .* min\(m, n, R\) = min\(10, 8, 4\) = 4, got 5"):
        lk.svd_of_product(B, A, 5)
    with pytest.raises(ValueError, match="k must be"):
        lk.svd_of_product(B, A, 0)
    with pytest.raises(ValueError, match=r"inner dimensions differ"):
        lk.svd_of_product(B, torch.randn(2, 5, 8), 2)
    with pytest.raises(ValueError, match=r"batch shapes differ"):
        lk.svd_of_product(B, torch.randn(3, 4, 8), 2)
    Bn = B.clone()
    Bn[1, 3, 2] = float("nan")
    with pytest.raises(ValueError, match=r"B .* NaN/Inf .* batch index \(1,\)"):
        lk.svd_of_product(Bn, A, 2)
    with pytest.raises(ValueError, match="at least 2 dims"):
        lk.svd_of_product(torch.randn(4), A, 1)
    with pytest.raises(TypeError, match="floating"):
        lk.svd_of_product(B.long(), A, 1)
