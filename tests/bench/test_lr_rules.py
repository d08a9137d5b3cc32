"""bench.experiments.lr_rules: the candidate learning-rate statistics, on cases whose values are known."""
import math

import torch

from bench.experiments import lr_rules


def _factors(seed, r=3, n=11, m=7):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, n, generator=g, dtype=torch.float64)
    B = torch.randn(m, r, generator=g, dtype=torch.float64)
    return A, B


def test_fisher_terms_reduce_to_the_weight_terms_for_white_statistics():
    A, B = _factors(0)
    r, n = A.shape
    m = B.shape[0]
    t = lr_rules.layer_terms(A, B, 1.7, torch.eye(n, dtype=torch.float64), torch.randn(m, n, dtype=torch.float64),
                             torch.ones(m, dtype=torch.float64), torch.rand(r, n, dtype=torch.float64))
    for f, w in (("f_A", "w_A"), ("f_B", "w_B"), ("f_ref", "w_ref")):
        assert math.isclose(t[f], t[w], rel_tol=1e-12), (f, t[f], t[w])
    assert math.isclose(t["w_ref"], 1.7 ** 2 * m * r / 3, rel_tol=1e-12)
    assert math.isclose(t["w_A"], 1.7 ** 2 * n * float(B.square().sum()), rel_tol=1e-12)


def test_fisher_terms_against_a_direct_computation():
    A, B = _factors(1)
    r, n = A.shape
    m = B.shape[0]
    X = torch.randn(50, n, dtype=torch.float64)
    Z = X.T @ X / 50
    s = torch.rand(m, dtype=torch.float64) + 0.1
    G = torch.randn(m, n, dtype=torch.float64)
    t = lr_rules.layer_terms(A, B, 0.5, Z, G, s, A)
    # the definition: E tr(diag(s) dW Z dW^T), dW = 0.5 (B dA + dB A), dA and dB with independent +-1 entries
    gen = torch.Generator().manual_seed(7)
    N = 20000
    dA = torch.randint(0, 2, (N, r, n), generator=gen, dtype=torch.float64) * 2 - 1
    dB = torch.randint(0, 2, (N, m, r), generator=gen, dtype=torch.float64) * 2 - 1
    dW = 0.5 * (B @ dA + dB @ A)
    mc = torch.einsum("i,kij,jl,kil->k", s, dW, Z, dW).mean()
    assert math.isclose(t["f_A"] + t["f_B"], float(mc), rel_tol=0.03)
    mc_A = torch.einsum("i,kij,jl,kil->k", s, 0.5 * B @ dA, Z, 0.5 * B @ dA).mean()
    assert math.isclose(t["f_A"], float(mc_A), rel_tol=0.03)
    assert math.isclose(t["g"], 0.5 * (float((G @ A.T).abs().sum()) + float((B.T @ G).abs().sum())), rel_tol=1e-12)
    assert math.isclose(t["g"] - 0.5 * float((B.T @ G).abs().sum()), t["g_ref"], rel_tol=1e-12)  # A_ref = A here


def test_scales_are_ratios_capped_at_one():
    base = {"w_A": 0.0, "w_B": 4.0, "w_ref": 1.0, "f_A": 0.0, "f_B": 9.0, "f_ref": 1.0, "g": 2.0, "g_ref": 1.0}
    sc = lr_rules.scales(base)
    assert sc["weight"] == 0.5 and sc["Fisher"] == 1 / 3 and sc["gain"] == 0.5
    assert sc["weight, A step"] == 1.0 and sc["Fisher, A step"] == 1.0  # B = 0: no A step, nothing to scale
    small = dict(base, w_B=0.25, f_B=0.01, g=0.1)
    assert all(v == 1.0 for v in lr_rules.scales(small).values())


def test_markdown_counts_the_inits_within_3x():
    res = {"a": {"scales": dict.fromkeys(lr_rules.RULES, 0.5)}, "b": {"scales": dict.fromkeys(lr_rules.RULES, 0.05)},
           "c": {"scales": dict.fromkeys(lr_rules.RULES, 1.0)}}
    md = lr_rules.markdown({"rank": 8, "results": res, "chosen_ratio": {"a": 1.0, "b": 1.0},
                            "env": {"machine": "x", "torch": "t", "date": "d"}})
    assert "| **within 3x** | 2 inits | " + " | ".join(["**1/2**"] * len(lr_rules.RULES)) + " |" in md
    assert "| c |  | 1 | 1 |" in md
