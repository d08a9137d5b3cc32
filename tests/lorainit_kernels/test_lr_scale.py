"""lorainit_kernels.lr_scale: the weight-space size of one Adam step, against float64 and its own premises."""
import math

import pytest
import torch

from lorainit_kernels.lr_scale import adam_step_norm_sq, lr_scale_from_norms, plain_lora_step_norm_sq


@pytest.mark.parametrize("shape", [(7, 3, 13), (2, 5, 1, 9), (1, 1, 1)])  # (..., m, r, n)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_step_norm_matches_float64_formula(shape, dtype):
    *lead, m, r, n = shape
    g = torch.Generator().manual_seed(sum(shape))
    A = torch.randn(*lead, r, n, generator=g, dtype=torch.float64)
    B = torch.randn(*lead, m, r, generator=g, dtype=torch.float64)
    s = 1.7
    got = adam_step_norm_sq(A.to(dtype), B.to(dtype), s)
    A64, B64 = A.to(dtype).double(), B.to(dtype).double()
    want = s ** 2 * (n * B64.square().sum((-2, -1)) + m * A64.square().sum((-2, -1)))
    assert got.dtype == torch.float64 and got.shape == tuple(lead)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    only_B = adam_step_norm_sq(A.to(dtype), B.to(dtype), s, train_A=False)  # frozen A: dA = 0
    torch.testing.assert_close(only_B, s ** 2 * m * A64.square().sum((-2, -1)), rtol=1e-12, atol=0)
    only_A = adam_step_norm_sq(A.to(dtype), B.to(dtype), s, train_B=False)  # frozen B (MiCA): dB = 0
    torch.testing.assert_close(only_A, s ** 2 * n * B64.square().sum((-2, -1)), rtol=1e-12, atol=0)


def test_step_norm_is_the_expected_norm_of_a_sign_step():
    """E ||s (B dA + dB A)||_F^2 over independent +-1 entries of dA, dB is rho^2 (Monte Carlo, 3 sigma)."""
    g = torch.Generator().manual_seed(5)
    m, r, n, s = 11, 3, 17, 0.8
    A, B = torch.randn(r, n, generator=g, dtype=torch.float64), torch.randn(m, r, generator=g, dtype=torch.float64)
    k = 20000
    dA = torch.randint(0, 2, (k, r, n), generator=g).double() * 2 - 1
    dB = torch.randint(0, 2, (k, m, r), generator=g).double() * 2 - 1
    norms = (s * (B @ dA + dB @ A)).square().sum((-2, -1))
    rho2 = float(adam_step_norm_sq(A, B, s))
    assert abs(float(norms.mean()) - rho2) < 3 * float(norms.std()) / math.sqrt(k)


def test_plain_lora_reference_is_the_expected_norm_of_peft_default_init():
    """PEFT: kaiming_uniform_(a=sqrt(5)) on lora_A (r, n), B = 0: ||A||^2 -> r/3; embeddings: B ~ N(0, 1), A = 0."""
    torch.manual_seed(0)
    m, r, n, s = 40, 8, 300, 2.0
    A = torch.empty(r, n)
    torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    got = float(adam_step_norm_sq(A, torch.zeros(m, r), s))
    assert got == pytest.approx(plain_lora_step_norm_sq(m, n, r, s), rel=0.03)
    m_emb = 800  # ||B||^2 of m*r normal entries: relative spread sqrt(2 / (m r)) = 1.8 %
    got_emb = float(adam_step_norm_sq(torch.zeros(r, n), torch.randn(m_emb, r), s))
    assert got_emb == pytest.approx(plain_lora_step_norm_sq(m_emb, n, r, s, embedding=True), rel=0.08)


def _adam_weight_trajectory(A0, lr, steps=6, seed=0):
    """LoRA-FA (A frozen, B = 0) on a least-squares layer; the weight updates s B A after each Adam step."""
    g = torch.Generator().manual_seed(seed)
    m, n = 6, 10
    X = torch.randn(64, n, generator=g, dtype=torch.float64)
    Y = torch.randn(64, m, generator=g, dtype=torch.float64)
    W = torch.randn(m, n, generator=g, dtype=torch.float64) * 0.1
    s = 2.0
    B = torch.zeros(m, A0.shape[0], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([B], lr=lr, eps=1e-30)
    out = []
    for _ in range(steps):
        loss = ((X @ (W + s * B @ A0).T - Y) ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        out.append((s * B @ A0).detach().clone())
    return out


def test_lr_scale_is_exact_where_the_answer_is_known():
    """Scaling a frozen A by c changes nothing in weight space if the rate is divided by c (Adam is
    invariant to the gradient's scale): the right rate for c*A is lr/c, and lr_scale says exactly that."""
    g = torch.Generator().manual_seed(3)
    A = torch.randn(3, 10, generator=g, dtype=torch.float64) / math.sqrt(10)
    c, lr = 7.0, 1e-2
    ref = _adam_weight_trajectory(A, lr)
    scaled = _adam_weight_trajectory(c * A, lr / c)
    for a, b in zip(ref, scaled):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    B0 = torch.zeros(6, 3, dtype=torch.float64)
    rho_a = float(adam_step_norm_sq(A, B0, 2.0, train_A=False))
    rho_ca = float(adam_step_norm_sq(c * A, B0, 2.0, train_A=False))
    assert lr_scale_from_norms([(rho_a, rho_ca)]) == pytest.approx(1 / c, rel=1e-12)


def test_lr_scale_pools_layers_by_their_squared_norms():
    assert lr_scale_from_norms([(1.0, 4.0), (3.0, 12.0)]) == pytest.approx(0.5)
    assert lr_scale_from_norms([(1.0, 16.0), (3.0, 0.0)]) == pytest.approx(0.5)  # a zero-step layer counts
    # an init whose step is smaller than plain LoRA's gets plain LoRA's rate: Adam's own steps dominate
    assert lr_scale_from_norms([(1.0, 1.0), (1.0, 0.0)]) == 1.0
    assert lr_scale_from_norms([(4.0, 1e-6)]) == 1.0


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="do not form an adapter"):
        adam_step_norm_sq(torch.randn(3, 5), torch.randn(4, 2), 1.0)
    with pytest.raises(ValueError, match="at least 2-D"):
        adam_step_norm_sq(torch.randn(3), torch.randn(4, 3), 1.0)
    with pytest.raises(ValueError, match="scaling"):
        adam_step_norm_sq(torch.randn(3, 5), torch.randn(4, 3), 0.0)
    with pytest.raises(ValueError, match="does not move any weight"):
        lr_scale_from_norms([(1.0, 0.0)])
    with pytest.raises(ValueError, match="non-finite"):
        lr_scale_from_norms([(1.0, float("nan"))])
    with pytest.raises(ValueError, match="m, n, r"):
        plain_lora_step_norm_sq(0, 3, 2, 1.0)
