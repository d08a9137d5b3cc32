"""HRP's matrix-sensing theory (Chen et al., 2025, arXiv 2502.07739, sections 3-4) as executable tests.

A single linear layer ``W = B A`` (B (m, r), A (r, n), PEFT layout), a target ``M`` (m, n) with the
decaying spectrum ``sigma_i = 0.7**i`` and the loss ``L = 1/2 |B A - M|_F^2``, trained with plain
torch loops, many seeds at once (the seeds are stacked in a batch dimension; the loss is a sum over
seeds, so every seed's gradient is its own). ``P_X`` is the orthogonal projector onto the row space
of ``X``. Statements checked (derivations in each test):

* Theorem 3.1 (random init, asymmetric LoRA: A random and frozen, B trained from 0): B converges to
  ``M A^T (A A^T)^-1``, the loss to ``1/2 |M (I - P_A)|^2``; over random A, ``E[P_A] = (r/n) I``,
  hence ``E[L_inf] = 1/2 (1 - r/n) |M|_F^2``, far above the best rank-r loss.
* Theorem 3.5 (HRP with a full-rank preheat): the preheated product recovers ``M``, HRP's RSI init
  is ``M``'s top-r right singular subspace, and LoRA (asymmetric or classic) from it converges to
  the best rank-r loss ``1/2 sum_{i>r} sigma_i^2``.
* Theorem 4.1 (preheat rank r <= R <= n): the preheat converges to ``M P_{A_pre}``; HRP's
  subspace is the top-r right singular subspace of ``M P_{A_pre}`` (inside the row space of
  ``A_pre``), so the final loss is ``1/2 (|M|^2 - sum_{i<=r} sigma_i(M P_{A_pre})^2)``. Its
  expectation over a uniformly random R-dim row space decreases with R (nested subspaces), equals
  the random-init value at R = r and the best rank-r value at R = n, and obeys
  ``1/2 sum_{i>r} sigma_i^2 <= E[L] <= 1/2 |M|^2 - 1/2 max((R/n) sum_{i<=r} sigma_i^2, (r/n)|M|^2)``
  (Ky Fan with the fixed left subspace U_r, resp. "top r of R singular values carry at least r/R of
  the energy"). The paper's exact wording of Theorem 4.1 could not be retrieved offline; these are
  the consequences derived here, checked in expectation with a tolerance of 4 standard errors, the
  standard deviation estimated by Monte Carlo over 4000 random subspaces (no training).
"""
import math

import pytest
import torch

from lorainit_kernels import methods as M

F64 = torch.float64
N, R_LORA = 20, 4
SIGMAS = 0.7 ** torch.arange(N, dtype=F64)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These are thousands of tiny ops: intra-op threads only add contention on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _target(seed=123):
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(N, N, generator=g, dtype=F64)).Q
    V = torch.linalg.qr(torch.randn(N, N, generator=g, dtype=F64)).Q
    return (U * SIGMAS) @ V.T, V


def _projector(A):
    """Projector onto the row space of A (..., k, n)."""
    Q = torch.linalg.qr(A.mT).Q
    return Q @ Q.mT


def _top_energy(X, r):
    return (torch.linalg.svdvals(X)[..., :r] ** 2).sum(-1)


def _max_angle(A, V):
    """Largest principal angle between the row space of A (..., r, n) and the columns of V (n, r)."""
    Qa = torch.linalg.qr(A.mT).Q
    resid = V - Qa @ (Qa.mT @ V)
    return torch.asin(torch.linalg.matrix_norm(resid, ord=2).clamp(max=1.0))


def _train(Mt, B, A, *, train_A, steps, lr, adam=False):
    """Plain loop on L = sum_seeds 1/2 |B A - M|^2; returns the trained (B, A) and per-seed losses."""
    B = B.clone().requires_grad_(True)
    A = A.clone().requires_grad_(train_A)
    params = [B, A] if train_A else [B]
    opt = torch.optim.Adam(params, lr=lr) if adam else torch.optim.SGD(params, lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = 0.5 * ((B @ A - Mt) ** 2).sum()
        loss.backward()
        opt.step()
    with torch.no_grad():
        per_seed = 0.5 * ((B @ A - Mt) ** 2).sum((-2, -1))
    return B.detach(), A.detach(), per_seed


def _preheat(Mt, R, seeds, gen_seed):
    """HRP preheat: frozen Haar-orthonormal A_pre (R, n), B from 0, constant-LR Adam (the paper's recipe)."""
    f = M.hrp_preheat_factors(N, N, R, batch_shape=(seeds,), generator=torch.Generator().manual_seed(gen_seed),
                              dtype=F64)
    B, A_pre, _ = _train(Mt, f.lora_B, f.lora_A, train_A=False, steps=300, lr=0.03, adam=True)
    return B, A_pre


def _asymmetric_limit(Mt, A, steps=150):
    """Main asymmetric stage (A frozen, B from 0, SGD lr 0.5: A A^T = I so the error shrinks 2x per step)."""
    B0 = torch.zeros(A.shape[0], N, A.shape[-2], dtype=F64)
    return _train(Mt, B0, A, train_A=False, steps=steps, lr=0.5)[2]


def test_theorem_3_1_random_init_converges_to_the_random_subspace_loss():
    Mt, _ = _target()
    S = 48
    A = M.lora_default(N, N, R_LORA, batch_shape=(S,), generator=torch.Generator().manual_seed(0), dtype=F64).lora_A
    # SGD on B: the error contracts by max|1 - lr*lambda(A A^T)| per step, lambda in ~[0.1, 0.7] here
    _, _, loss = _train(Mt, torch.zeros(S, N, R_LORA, dtype=F64), A, train_A=False, steps=600, lr=1.0)
    eye = torch.eye(N, dtype=F64)
    predicted = 0.5 * ((Mt @ (eye - _projector(A))) ** 2).sum((-2, -1))
    assert torch.allclose(loss, predicted, rtol=1e-8)  # every seed reached its own fixed point

    # expectation over random subspaces: E[P_A] = (r/n) I for i.i.d. sign-symmetric entries
    theory = 0.5 * (1 - R_LORA / N) * float((SIGMAS ** 2).sum())
    A_mc = M.lora_default(N, N, R_LORA, batch_shape=(4000,), generator=torch.Generator().manual_seed(1),
                          dtype=F64).lora_A
    mc = 0.5 * ((Mt @ (eye - _projector(A_mc))) ** 2).sum((-2, -1))
    sd = float(mc.std())
    assert abs(float(mc.mean()) - theory) < 4 * sd / math.sqrt(4000)
    assert abs(float(loss.mean()) - theory) < 4 * sd / math.sqrt(S), (float(loss.mean()), theory, sd)
    best = 0.5 * float((SIGMAS[R_LORA:] ** 2).sum())
    assert float(loss.min()) > best and theory - best > 20 * sd / math.sqrt(S)  # the gap is real


def test_theorem_3_5_full_rank_preheat_reaches_the_best_rank_r_loss():
    Mt, V = _target()
    S = 8
    B_pre, A_pre = _preheat(Mt, N, S, gen_seed=2)
    rsi = M.hrp(B_pre, A_pre, R_LORA)
    angles = _max_angle(rsi.lora_A, V[:, :R_LORA])
    assert float(angles.max()) < 0.03  # top-r subspace recovered to a few hundredths of a radian
    best = 0.5 * float((SIGMAS[R_LORA:] ** 2).sum())
    # asymmetric main stage from RSI (A = V_hat^T frozen): limit 1/2 |M (I - P_Vhat)|^2 ~ best
    loss = _asymmetric_limit(Mt, rsi.lora_A)
    # |loss - best| <= 1/2 |M|^2 sin^2(angle) (first order in the subspace error)
    slack = 0.5 * float((SIGMAS ** 2).sum()) * float(torch.sin(angles.max()) ** 2)
    assert float((loss - best).abs().max()) <= slack + 1e-12 * best
    assert float((loss - best).abs().max()) < 1e-6 * best
    # classic LoRA (both factors trained) from the RSI init, B = 0: the same limit
    _, _, loss_c = _train(Mt, rsi.lora_B, rsi.lora_A, train_A=True, steps=1500, lr=0.3)
    assert float((loss_c - best).abs().max()) < 1e-6 * best
    # LSI (B = U_hat frozen-direction, A = 0) from a side-"B" preheat: transposed problem, same limit
    f = M.hrp_preheat_factors(N, N, N, side="B", batch_shape=(S,), generator=torch.Generator().manual_seed(3),
                              dtype=F64)
    B_fixed, A_tr, _ = _train(Mt.mT, f.lora_A.mT, f.lora_B.mT, train_A=False, steps=300, lr=0.03, adam=True)
    lsi = M.hrp(A_tr.mT, B_fixed.mT, R_LORA, side="B")
    U = torch.linalg.svd(Mt).U
    assert float(_max_angle(lsi.lora_B.mT, U[:, :R_LORA]).max()) < 0.03


@pytest.mark.parametrize("R", [R_LORA, 10, N])
def test_theorem_4_1_expected_loss_vs_preheat_rank(R):
    Mt, _ = _target()
    S = 24
    total = float((SIGMAS ** 2).sum())
    top = float((SIGMAS[:R_LORA] ** 2).sum())
    B_pre, A_pre = _preheat(Mt, R, S, gen_seed=10 + R)
    rsi = M.hrp(B_pre, A_pre, R_LORA)
    loss = _asymmetric_limit(Mt, rsi.lora_A)
    # per seed: the limit is 1/2 (|M|^2 - top-r energy of M P_{A_pre}) (the preheat's Adam error
    # is ~1e-7 rad after 300 steps with an orthonormal frozen factor)
    predicted = 0.5 * (total - _top_energy(Mt @ _projector(A_pre), R_LORA))
    assert torch.allclose(loss, predicted, rtol=1e-6), (loss - predicted).abs().max()

    # expectation over uniformly random R-dim row spaces, by Monte Carlo (no training)
    Am = M.hrp_preheat_factors(N, N, R, batch_shape=(4000,), generator=torch.Generator().manual_seed(99),
                               dtype=F64).lora_A
    mc = 0.5 * (total - _top_energy(Mt @ _projector(Am), R_LORA))
    mean_mc, sd = float(mc.mean()), float(mc.std())
    assert abs(float(loss.mean()) - mean_mc) < 4 * sd / math.sqrt(S) + 1e-6 * mean_mc
    lower = 0.5 * (total - top)
    upper = 0.5 * total - 0.5 * max(R / N * top, R_LORA / N * total)
    tol = 4 * sd / math.sqrt(4000) + 1e-12
    assert lower - tol <= mean_mc <= upper + tol
    if R == R_LORA:  # HRP with R = r is random init: E = 1/2 (1 - r/n) |M|^2 exactly
        assert abs(mean_mc - 0.5 * (1 - R_LORA / N) * total) < tol
    if R == N:  # full rank: the best rank-r loss, without variance
        assert sd < 1e-9 and abs(mean_mc - lower) < 1e-9


def test_theorem_4_1_enhancement_grows_with_preheat_rank():
    """E[L](R) by Monte Carlo on coupled nested subspaces: nonincreasing in R for every draw."""
    Mt, _ = _target()
    total = float((SIGMAS ** 2).sum())
    full = M.hrp_preheat_factors(N, N, N, batch_shape=(2000,), generator=torch.Generator().manual_seed(5),
                                 dtype=F64).lora_A
    ranks = [R_LORA, 6, 10, 15, N]
    losses = torch.stack([0.5 * (total - _top_energy(Mt @ _projector(full[:, :R]), R_LORA)) for R in ranks])
    assert bool((losses[1:] <= losses[:-1] + 1e-10).all())  # nested row spaces: pathwise monotone
    means = losses.mean(1)
    se = losses.std(1) / math.sqrt(2000)
    assert bool((means[:-1] - means[1:] > 4 * se[:-1]).all()), means  # and strictly better on average
