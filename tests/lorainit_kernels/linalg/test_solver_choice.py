"""One solver rule (``lorainit_kernels.linalg.choose_solver``) for the guidance-matrix solve, the embedding
variant and the memory plan: moving ``defaults.EIGH_CROSSOVER_N`` moves all three together."""
import types

import pytest
import torch

import lorainit_kernels as lk
from lorainit_kernels import defaults
from lorainit_kernels.linalg import choose_solver
from lorainit.memory import solve_bytes
from lorainit_kernels.methods import lora_da_embedding

from linalg_helpers import kfac_stats


def test_choose_solver_rule_and_errors(monkeypatch):
    monkeypatch.setitem(defaults.EIGH_CROSSOVER_N, "cpu", 100)
    monkeypatch.setitem(defaults.EIGH_CROSSOVER_N, "cuda", 300)
    assert choose_solver(99, 2, "cpu") == "eigh" and choose_solver(100, 2, "cpu") == "lobpcg"
    # lobpcg's own dense rule (n < 5 k) wins over a small crossover
    assert choose_solver(120, 30, "cpu") == "eigh" and choose_solver(150, 30, "cpu") == "lobpcg"
    assert choose_solver(299, 2, "cuda:0") == "eigh" and choose_solver(300, 2, torch.device("cuda")) == "lobpcg"
    assert choose_solver(299, 2, "meta") == "eigh"       # no entry of its own: the "cuda" value
    assert choose_solver(100, 2, torch.zeros(1)) == "lobpcg"
    for bad_n, bad_k in ((0, 1), (10, 0), (True, 1), (10, 2.0)):
        with pytest.raises(ValueError, match="choose_solver"):
            choose_solver(bad_n, bad_k, "cpu")


@pytest.mark.parametrize("cross", [40, 41])
def test_all_three_paths_follow_the_crossover(monkeypatch, cross):
    n, m, r = 40, 12, 3
    want = "eigh" if n < cross else "lobpcg"
    monkeypatch.setitem(defaults.EIGH_CROSSOVER_N, "cpu", cross)
    # the guidance-matrix solve
    Z, G, s = kfac_stats((), m, n, seed=6)
    info = lk.lora_da_factors(Z, G, s, r, n_train=1e3, return_info=True)[3]
    assert info["solver"] == want
    # the embedding variant (n tokens, all seen)
    g = torch.Generator().manual_seed(1)
    z = torch.rand(n, generator=g) + 0.05
    _, einfo = lora_da_embedding(z / z.sum(), torch.randn(m, n, generator=g), torch.rand(m, generator=g) + 0.1,
                                 r, n_train=1e3, scaling=1.0)
    assert einfo["solver"] == want
    # the memory plan prices the same solver: eigh's 5 n^2 words vs LOBPCG's 80 n r
    t = types.SimpleNamespace(m=m, n=n, r=r, device=torch.device("cpu"))
    got = solve_bytes(t)
    assert got == solve_bytes(t, want) and got != solve_bytes(t, "lobpcg" if want == "eigh" else "eigh")


def test_embedding_uses_lobpcgs_dense_rule(monkeypatch):
    """3 k < n_s < 5 k: lobpcg would solve densely, so the embedding variant takes eigh (it used 3 k)."""
    monkeypatch.setitem(defaults.EIGH_CROSSOVER_N, "cpu", 8)
    n, m, r = 40, 12, 10
    g = torch.Generator().manual_seed(2)
    z = torch.rand(n, generator=g) + 0.05
    _, info = lora_da_embedding(z / z.sum(), torch.randn(m, n, generator=g), torch.rand(m, generator=g) + 0.1,
                                r, n_train=1e3, scaling=1.0)
    assert info["solver"] == "eigh" == choose_solver(n, r, "cpu")
