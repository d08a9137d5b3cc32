"""Each symmetric operator of ``lorainit_kernels.linalg.operators`` against its dense form (float64, awkward
shapes, batches), and ``lobpcg`` on each kind against ``eigh`` of that dense form: the solver never asks
which kind it got."""
import pytest
import torch

import lorainit_kernels as lk
from lorainit_kernels.linalg import (CallableOperator, CholeskyInverse, DenseOperator, DiagonalMinusLowRank,
                                     GuidanceOperator, ShiftInvert, SymmetricOperator)

from linalg_helpers import sin_theta

F64 = torch.float64


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _spd(batch, n, g):
    X = torch.randn(*batch, 2 * n + 3, n, generator=g, dtype=F64)
    return X.mT @ X / X.shape[-2] + 0.1 * torch.eye(n, dtype=F64)


def _kinds(batch, n, m, seed):
    """(operator, its dense matrix) for every kind, batch ``batch``, fresh random data."""
    g = _g(seed)
    A = torch.randn(*batch, n, n, generator=g, dtype=F64)
    A = A + A.mT
    Z = _spd(batch, n, g)
    L = torch.linalg.cholesky(Z)
    dW = torch.randn(*batch, m, n, generator=g, dtype=F64)
    c = torch.rand(batch, generator=g, dtype=F64) + 0.5
    alpha = 0.7
    d = torch.rand(*batch, n, generator=g, dtype=F64) + 0.2
    out = {
        "dense": (DenseOperator(A), A),
        "guidance": (GuidanceOperator(dW, alpha, c, L), c[..., None, None] * torch.cholesky_inverse(L) - alpha * dW.mT @ dW),
        "guidance without variance": (GuidanceOperator(dW, alpha), -alpha * dW.mT @ dW),
        "guidance, shared factor": (GuidanceOperator(dW, alpha, c, L.reshape(-1, n, n)[:1]),
                                    c[..., None, None] * torch.cholesky_inverse(L.reshape(-1, n, n)[0]) - alpha * dW.mT @ dW),
        "diagonal minus low rank": (DiagonalMinusLowRank(d, dW, alpha), torch.diag_embed(d) - alpha * dW.mT @ dW),
        "Cholesky inverse": (CholeskyInverse(L), torch.cholesky_inverse(L)),
        "callable": (CallableOperator(lambda X: A @ X, batch, n, F64, "cpu"), A),
    }
    return out


@pytest.mark.parametrize("batch", [(), (3,), (2, 2)])
def test_each_operator_equals_its_dense_form(batch):
    n, m = 37, 11
    g = _g(5)
    for name, (op, dense) in _kinds(batch, n, m, seed=len(batch) + 17).items():
        assert isinstance(op, SymmetricOperator) and op.shape == batch + (n, n), name
        X = torch.randn(*batch, n, 5, generator=g, dtype=F64)
        ref = dense @ X
        assert ((op @ X - ref).norm() / ref.norm()) < 1e-12, name
        assert torch.allclose(op.to_dense(), dense, rtol=1e-12, atol=1e-12 * float(dense.abs().max())), name
        # a run of the flattened batch (what lobpcg applies to the matrices still iterating)
        b = op.b
        if b > 1:
            Xf = X.reshape(b, n, 5)
            got = op.apply(Xf[1:b], 1, b)
            assert ((got - (dense.reshape(b, n, n)[1:] @ Xf[1:])).norm() / ref.norm()) < 1e-12, name


def test_partly_shared_factor_in_a_2d_batch():
    """Z per input (2, 1, n, n) for a (2, 3) batch of layers: matrix (i, j) reads factor i."""
    n, m, g = 19, 7, _g(8)
    L = torch.linalg.cholesky(_spd((2, 1), n, g))
    dW = torch.randn(2, 3, m, n, generator=g, dtype=F64)
    c = torch.rand(2, 3, generator=g, dtype=F64) + 0.5
    op = GuidanceOperator(dW, 0.3, c, L)
    dense = c[..., None, None] * torch.cholesky_inverse(L) - 0.3 * dW.mT @ dW
    X = torch.randn(6, n, 4, generator=g, dtype=F64)
    assert torch.allclose(op.apply(X[2:5], 2, 5), dense.reshape(6, n, n)[2:5] @ X[2:5], atol=1e-12 * float(dense.abs().max()))


@pytest.mark.parametrize("name", ["dense", "guidance", "guidance without variance", "diagonal minus low rank",
                                  "Cholesky inverse", "callable"])
def test_lobpcg_on_every_kind(name):
    n, m, k = 64, 9, 3
    op, dense = _kinds((2,), n, m, seed=23)[name]
    vals, vecs, info = lk.lobpcg(op, k, tol=1e-9, maxiter=3000, return_info=True)
    ev, V = torch.linalg.eigh(dense)
    assert info["converged"].all(), name
    torch.testing.assert_close(vals, ev[..., :k], rtol=1e-7, atol=1e-7 * float(ev.abs().max()))
    assert sin_theta(vecs, V[..., :k]).max() < 1e-5, name


def test_shift_invert_is_a_cholesky_inverse_and_shapes_are_checked():
    g = _g(3)
    A = _spd((2,), 30, g)
    M = lk.shift_invert_preconditioner(A)
    assert isinstance(M, ShiftInvert) and isinstance(M, CholeskyInverse) and M.shape == (2, 30, 30)
    R = torch.randn(2, 30, 3, generator=g, dtype=F64)
    shifted = A - M.sigma[:, None, None] * torch.eye(30, dtype=F64)
    assert torch.allclose(M(R), torch.linalg.solve(shifted, R), rtol=1e-8, atol=1e-10)
    with pytest.raises(ValueError, match="built for shape"):
        lk.lobpcg(A[:1], 2, M=M)
    op = DenseOperator(A)
    with pytest.raises(ValueError, match="n=31"):
        lk.lobpcg(op, 2, n=31)
    with pytest.raises(ValueError, match="batch"):
        GuidanceOperator(torch.randn(2, 5, 30, dtype=F64), 1.0, torch.ones(2, dtype=F64), torch.eye(29, dtype=F64))
    with pytest.raises(ValueError, match="same batch"):
        DiagonalMinusLowRank(torch.ones(3, 30, dtype=F64), torch.randn(2, 5, 30, dtype=F64), 1.0)
