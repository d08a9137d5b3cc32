"""KFACStats, kfac_update and weighted_gram through the public API, for the reference ("torch") and the
device's fused kernel ("fused": native on the CPU, Triton on CUDA; the Triton interpreter on CPU has its
own file), on every device of the ``device`` fixture (tests/support/devices.py). Every result is checked
against the float64 reference on fresh random inputs."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorainit_kernels import KFACStats, backends, kfac_update, reference, weighted_gram

# "fused": the device's own kernel (native on the CPU, Triton on CUDA), "torch": the reference
BACKENDS = ["torch", "fused"]
FUSED = {"cpu": "native", "cuda": "triton"}
# the dtypes of the statistics' inputs; tolerances (rtol) from tests/support/devices.py per docs/math.md (the fp32
# bound grows like sqrt(T / 1e3))
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def on(backend: str, device: str) -> str:
    """The backend's name on ``device``, or skip where this machine lacks it (extension not built, no Triton)."""
    name = FUSED[device] if backend == "fused" else backend
    reason = backends.device_reason(name, torch.device(device))
    if reason is not None:
        pytest.skip(f"{name} cannot run on {device} here: {reason}")
    return name


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(out).any(), "NaN in output"
    den = ref.norm().item()
    num = (out.double() - ref.double()).norm().item()
    return num / den if den > 0 else num


def fp32_tol(base: float, dtype: torch.dtype, T: int) -> float:
    return base * math.sqrt(max(T, 1000) / 1e3) if dtype == torch.float32 else base


def rand(*shape, seed, dtype=torch.float32, scale=1.0, shift=0.0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale + shift).to(dtype).to(device)


def bools(*shape, seed, keep, device="cpu"):
    """A random mask with about ``keep`` of its entries True."""
    return (torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) < keep).to(device)


def assert_symmetric(a: torch.Tensor, backend: str):
    # the fused kernels compute one triangle and mirror it; plain torch's matmul is symmetric up to rounding
    if backend != "torch":
        assert torch.equal(a, a.T)
    else:
        assert (a - a.T).abs().max() <= 1e-5 * a.abs().max()


def snapshot(stats: KFACStats):
    return [t.clone() for t in stats.sums()], stats.count


def assert_unchanged(stats: KFACStats, snap):
    sums, count = snap
    assert stats.count == count
    for before, after in zip(sums, stats.sums()):
        assert torch.equal(before, after)


# ------------------------------------------------------------------------------------ kfac_update
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,n,m,pad", [(1, 37, 129, 0.0), (257, 37, 129, 0.3), (400, 64, 48, 0.0)])
def test_kfac_update_vs_float64(backend, device, dtype, rtol, T, n, m, pad):
    backend = on(backend, device)
    x = rand(T, n, seed=T + 1, dtype=dtype, shift=0.3, device=device)
    g = rand(T, m, seed=T + 2, dtype=dtype, scale=1e-2, device=device)
    mask = (rand(T, seed=T + 3) > -10).to(device) if pad == 0 else bools(T, seed=T, keep=1 - pad, device=device)
    with backends.use(backend):
        Zs, Gs, ss, count = kfac_update(x, g, mask)
    Zr, Gr, sr = reference.kfac_update(x, g, mask, dtype=torch.float64)
    assert count == int(mask.sum())
    tol = fp32_tol(rtol, dtype, T)
    for out, ref in ((Zs, Zr), (Gs, Gr), (ss, sr)):
        assert out.dtype == torch.float32 and out.shape == ref.shape
        assert rel_err(out, ref) <= tol
    assert_symmetric(Zs, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kfac_update_zero_valid_tokens(backend, device):
    backend = on(backend, device)
    x, g = (rand(5, 7, d, seed=i, dtype=torch.bfloat16, device=device) for i, d in ((1, 37), (2, 129)))
    with backends.use(backend):
        Zs, Gs, ss, count = kfac_update(x, g, torch.zeros(5, 7, dtype=torch.bool, device=device))
    assert count == 0
    assert Zs.shape == (37, 37) and Gs.shape == (129, 37) and ss.shape == (129,)
    assert not Zs.any() and not Gs.any() and not ss.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_kfac_update_4d_noncontiguous(backend, device):
    backend = on(backend, device)
    base = rand(3, 2, 11, 40, seed=3, dtype=torch.bfloat16, device=device)
    x = base.transpose(1, 2)[..., 1:38]  # (3, 11, 2, 37): permuted and sliced
    g = rand(3, 2, 11, 129, seed=4, dtype=torch.float16, device=device).transpose(1, 2)
    mask = bools(3, 11, 2, seed=5, keep=0.7, device=device)
    with backends.use(backend):
        Zs, Gs, ss, count = kfac_update(x, g, mask)
    xr, gr, mr = x.reshape(-1, 37), g.reshape(-1, 129), mask.reshape(-1)
    for out, ref in zip((Zs, Gs, ss), reference.kfac_update(xr, gr, mr, dtype=torch.float64)):
        assert rel_err(out, ref) < 1e-5
    assert count == int(mask.sum())


# ---------------------------------------------------------------------------------- weighted_gram
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_weighted_gram_negative_weights(backend, device, dtype, rtol):
    backend = on(backend, device)
    v = rand(2, 129, 37, seed=7, dtype=dtype, device=device)  # batch of 2
    w = rand(2, 129, seed=8, scale=2.0, device=device)  # both signs
    with backends.use(backend):
        out = weighted_gram(v, w)
        plain = weighted_gram(v[0])
    assert out.shape == (2, 37, 37) and out.dtype == torch.float32
    for i in range(2):
        assert rel_err(out[i], reference.weighted_gram(v[i], w[i], dtype=torch.float64)) <= fp32_tol(rtol, dtype, 129)
        assert_symmetric(out[i], backend)
    assert rel_err(plain, reference.weighted_gram(v[0], None, dtype=torch.float64)) <= fp32_tol(rtol, dtype, 129)


# ------------------------------------------------------------------------------------- KFACStats
@pytest.mark.parametrize("backend", BACKENDS)
def test_stats_means_over_batches(backend, device):
    st_ = KFACStats(37, 129, backend=on(backend, device), device=device)
    xs, gs, ms = [], [], []
    for b in range(3):
        x = rand(4, 9, 37, seed=10 + b, dtype=torch.bfloat16, device=device)
        g = rand(4, 9, 129, seed=20 + b, dtype=torch.bfloat16, scale=3.0, device=device)
        mask = bools(4, 9, seed=30 + b, keep=0.7, device=device)
        st_.update(x, g, mask)
        xs.append(x.reshape(-1, 37)), gs.append(g.reshape(-1, 129)), ms.append(mask.reshape(-1))
    Zr, Gr, sr = reference.kfac_update(torch.cat(xs), torch.cat(gs), torch.cat(ms), dtype=torch.float64)
    T = int(torch.cat(ms).sum())
    assert st_.count == T
    assert rel_err(st_.input_cov(), Zr / T) < 1e-5
    assert rel_err(st_.grad(), Gr / T) < 1e-5
    assert rel_err(st_.grad_sq(), sr / T) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_stats_shared_input_and_grad_only(backend, device):
    backend = on(backend, device)
    x = rand(50, 37, seed=1, device=device)
    g = rand(50, 20, seed=2, device=device)
    z_only = KFACStats(37, backend=backend, device=device)
    g_only = KFACStats(37, 20, track_input_cov=False, backend=backend, device=device)
    z_only.update(x)
    g_only.update(x, g)
    Zr, Gr, sr = reference.kfac_update(x, g, None, dtype=torch.float64)
    assert rel_err(z_only.input_cov(), Zr / 50) < 1e-5 and z_only.g_sum is None
    assert rel_err(g_only.grad(), Gr / 50) < 1e-5 and g_only.z_sum is None
    assert rel_err(g_only.grad_sq(), sr / 50) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_padding_batch_is_noop(backend, device):
    st_ = KFACStats(37, 129, backend=on(backend, device), device=device)
    st_.update(rand(30, 37, seed=1, device=device), rand(30, 129, seed=2, device=device))
    snap = snapshot(st_)
    assert st_.update(rand(2, 5, 37, seed=3, device=device), rand(2, 5, 129, seed=4, device=device),
                      torch.zeros(2, 5, dtype=torch.bool, device=device)) == 0
    assert_unchanged(st_, snap)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("track_input_cov", [True, False])
@pytest.mark.parametrize("where,value", [("x", float("nan")), ("x", float("inf")), ("g", float("nan")),
                                         ("g", float("-inf"))])
def test_nonfinite_valid_token_raises_and_leaves_state(backend, device, track_input_cov, where, value):
    st_ = KFACStats(37, 129, track_input_cov=track_input_cov, backend=on(backend, device), device=device)
    st_.update(rand(3, 8, 37, seed=1, dtype=torch.bfloat16, device=device),
               rand(3, 8, 129, seed=2, dtype=torch.bfloat16, device=device))
    snap = snapshot(st_)
    x, g = (rand(3, 8, d, seed=i, dtype=torch.bfloat16, device=device) for i, d in ((3, 37), (4, 129)))
    mask = torch.ones(3, 8, dtype=torch.bool, device=device)
    mask[0, :4] = False
    (x if where == "x" else g)[1, 2, 5] = value
    with pytest.raises(ValueError, match="non-finite"):
        st_.update(x, g, mask)
    assert_unchanged(st_, snap)
    # the same value in a padding token is never read
    (x if where == "x" else g)[1, 2, 5] = 0.5
    (x if where == "x" else g)[0, 1, 5] = value
    assert st_.update(x, g, mask) == 20


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_raise_and_leave_state(backend):
    st_ = KFACStats(37, 129, backend=on(backend, "cpu"))
    st_.update(rand(10, 37, seed=1), rand(10, 129, seed=2))
    snap = snapshot(st_)
    x, g = rand(4, 6, 37, seed=3), rand(4, 6, 129, seed=4)
    bad = [
        (ValueError, "leading dims", dict(x=x, grad_output=rand(4, 5, 129, seed=5))),
        (ValueError, "in_features=37", dict(x=rand(4, 6, 36, seed=6), grad_output=g)),
        (ValueError, "out_features=129", dict(x=x, grad_output=rand(4, 6, 128, seed=7))),
        (TypeError, "floating", dict(x=torch.randint(0, 5, (4, 6, 37)), grad_output=g)),
        (TypeError, "floating", dict(x=x, grad_output=torch.ones(4, 6, 129, dtype=torch.int32))),
        (ValueError, "mask has shape", dict(x=x, grad_output=g, mask=torch.ones(4, 7, dtype=torch.bool))),
        (TypeError, "torch.bool", dict(x=x, grad_output=g, mask=torch.ones(4, 6, dtype=torch.int64))),
        (ValueError, "grad_output is required", dict(x=x, grad_output=None)),
    ]
    for exc, match, kwargs in bad:
        with pytest.raises(exc, match=match):
            st_.update(**kwargs)
        assert_unchanged(st_, snap)


# ----------------------------------------------------------------------------- hypothesis properties
@st.composite
def batches(draw):
    T1 = draw(st.integers(1, 40))
    T2 = draw(st.integers(1, 40))
    n = draw(st.integers(1, 45))
    m = draw(st.integers(1, 45))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    seed = draw(st.integers(0, 2 ** 16))
    return T1, T2, n, m, dtype, seed


def _backends_available():
    return ["torch", "native"] if backends.has_native() else ["torch"]


@settings(max_examples=12, deadline=None)
@given(batches(), st.sampled_from(_backends_available()))
def test_merge_equals_one_update_on_concatenation(spec, backend):
    T1, T2, n, m, dtype, seed = spec
    x, g = rand(T1 + T2, n, seed=seed, dtype=dtype), rand(T1 + T2, m, seed=seed + 1, dtype=dtype)
    mask = torch.rand(T1 + T2, generator=torch.Generator().manual_seed(seed)) > 0.25
    a, b, whole = (KFACStats(n, m, backend=backend) for _ in range(3))
    a.update(x[:T1], g[:T1], mask[:T1])
    b.update(x[T1:], g[T1:], mask[T1:])
    whole.update(x, g, mask)
    a.merge(b)
    assert a.count == whole.count == int(mask.sum())
    for s1, s2 in zip(a.sums(), whole.sums()):
        scale = max(s2.abs().max().item(), 1e-30)
        assert (s1 - s2).abs().max().item() <= 1e-5 * scale


@settings(max_examples=12, deadline=None)
@given(batches(), st.sampled_from(_backends_available()))
def test_token_order_does_not_matter(spec, backend):
    T1, T2, n, m, dtype, seed = spec
    T = T1 + T2
    x, g = rand(T, n, seed=seed, dtype=dtype), rand(T, m, seed=seed + 1, dtype=dtype)
    mask = torch.rand(T, generator=torch.Generator().manual_seed(seed)) > 0.25
    perm = torch.randperm(T, generator=torch.Generator().manual_seed(seed + 2))
    with backends.use(backend):
        out = kfac_update(x, g, mask)
        outp = kfac_update(x[perm], g[perm], mask[perm])
    assert out[3] == outp[3]
    for s1, s2 in zip(out[:3], outp[:3]):
        scale = max(s2.abs().max().item(), 1e-30)
        assert (s1 - s2).abs().max().item() <= 1e-5 * scale


@pytest.mark.parametrize("backend", ["fused", "torch"])
def test_stats_accumulate_into_given_buffers(backend, device):
    """``buffers``: slices of stacks shared by layers of one shape take the sums in place (no copy), the
    neighbouring slices untouched; bad buffers are named."""
    be = on(backend, device)
    g = torch.Generator().manual_seed(11)
    n, m, T = 13, 7, 29
    Zs, Gs, ss = (torch.zeros(3, *sh, device=device) for sh in ((n, n), (m, n), (m,)))
    st = KFACStats(n, m, device=device, backend=be, buffers=(Zs[1], Gs[1], ss[1]))
    x, gr = torch.randn(T, n, generator=g).to(device), torch.randn(T, m, generator=g).to(device)
    mask = torch.rand(T, generator=g) < 0.7
    st.update(x, gr, mask.to(device))
    ref = KFACStats(n, m, device=device, backend=be)
    ref.update(x, gr, mask.to(device))
    assert st.z_sum.data_ptr() == Zs[1].data_ptr() and torch.equal(Zs[1], ref.z_sum)
    assert torch.equal(Gs[1], ref.g_sum) and torch.equal(ss[1], ref.s_sum)
    assert not Zs[0].any() and not Zs[2].any() and not Gs[2].any() and not ss[0].any()
    with pytest.raises(ValueError, match=r"buffers' g_sum must be a contiguous \(7, 13\)"):
        KFACStats(n, m, device=device, buffers=(torch.zeros(n, n, device=device), Gs[0].t(), ss[0]))
    with pytest.raises(ValueError, match="buffers' z_sum must be zero-filled"):
        KFACStats(n, m, device=device, buffers=(Zs[1], Gs[0], ss[0]))
    with pytest.raises(ValueError, match="buffers' z_sum must be None"):
        KFACStats(n, m, track_input_cov=False, device=device, buffers=(Zs[0], Gs[0], ss[0]))
