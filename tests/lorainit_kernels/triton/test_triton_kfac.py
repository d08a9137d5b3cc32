"""The Triton backend of ``kfac_update`` / ``weighted_gram`` against the float64 reference.

Runs on CPU tensors under ``TRITON_INTERPRET=1`` (``make test`` sets it), or on CUDA when present.
Shapes are small and deliberately not multiples of the block sizes: the interpreter is slow.
Tolerances (docs/math.md, tolerances), as ||out - ref|| / ||ref|| against fp64 on the same inputs:
* unweighted sums: every product of two bf16/fp16/fp32 numbers is exact or rounded once and the sum
  is accumulated in fp32, so all dtypes meet the fp32 class ``1e-5 * sqrt(T / 1e3)`` (floored at
  1e-6 for a handful of tokens: one rounding per term on a GPU's 3xTF32 path);
* weighted bf16: ``w * v`` is rounded to bf16 before the product (module docstring): 1e-2.
"""
from __future__ import annotations

import math
import zlib

import pytest
import torch

import lorainit_kernels as lk
from lorainit_kernels import backends, reference

if not lk.has_triton():
    pytest.skip("triton is not installed: the Triton backend cannot run", allow_module_level=True)
if lk.triton_interpreting():
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1 (run `make test`)", allow_module_level=True)

from lorainit_kernels.triton import kfac as tk  # noqa: E402  (imports triton)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def tol32(T: int) -> float:
    return max(1e-5 * math.sqrt(T / 1e3), 1e-6)


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.dtype == torch.float32, out.dtype
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all(), "non-finite output"
    return ((out.double() - ref).norm() / ref.norm()).item()


def rows(T: int, d: int, dtype, gen, pad: int = 0) -> torch.Tensor:
    """(T, d) random rows; with ``pad`` > 0 a column slice of a wider tensor (row stride d + pad)."""
    full = torch.randn(T, d + pad, generator=gen, dtype=torch.float32) * 1.5 + 0.25
    return full.to(dtype=dtype, device=DEVICE)[:, :d]


def make_mask(T: int, kind: str, gen):
    if kind == "none":
        return None
    if kind == "all":
        return torch.ones(T, dtype=torch.bool, device=DEVICE)
    m = torch.rand(T, generator=gen) >= 0.3  # ~30% padding
    m[0] = True  # at least one valid token
    return m.to(DEVICE)


def valid_count(T, mask):
    return T if mask is None else int(mask.sum())


# --------------------------------------------------------------------------------------------
# kfac_update, called directly
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "T,n,m,mask_kind,pad",
    [(53, 37, 129, "pad30", 3), (1, 37, 129, "all", 0), (40, 70, 33, "none", 0), (29, 16, 5, "pad30", 16)],
)
def test_kfac_update_matches_reference(dtype, T, n, m, mask_kind, pad):
    gen = torch.Generator().manual_seed(1000 * T + n + m)
    x = rows(T, n, dtype, gen, pad)
    g = rows(T, m, dtype, gen, pad)
    mask = make_mask(T, mask_kind, gen)
    assert pad == 0 or (x.stride(0) == n + pad and not x.is_contiguous())
    Zs, Gs, ss = tk.kfac_update(x, g, mask, True)
    Zr, Gr, sr = reference.kfac_update(x.cpu(), g.cpu(), None if mask is None else mask.cpu(), True,
                                       dtype=torch.float64)
    tol = tol32(valid_count(T, mask))
    assert rel(Zs.cpu(), Zr) <= tol
    assert rel(Gs.cpu(), Gr) <= tol
    assert rel(ss.cpu(), sr) <= tol
    assert torch.equal(Zs, Zs.T), "Zs must be exactly symmetric (mirrored upper triangle)"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_padding_is_compacted_not_multiplied(dtype):
    # NaN/Inf in padded tokens would poison the sums if padding were multiplied by zero.
    gen = torch.Generator().manual_seed(7)
    T, n, m = 31, 21, 19
    x, g = rows(T, n, dtype, gen), rows(T, m, dtype, gen)
    mask = make_mask(T, "pad30", gen)
    x_bad, g_bad = x.clone(), g.clone()
    x_bad[~mask] = float("nan")
    g_bad[~mask] = float("inf")
    Zs, Gs, ss = tk.kfac_update(x_bad, g_bad, mask, True)
    Zr, Gr, sr = reference.kfac_update(x.cpu(), g.cpu(), mask.cpu(), True, dtype=torch.float64)
    tol = tol32(int(mask.sum()))
    assert rel(Zs.cpu(), Zr) <= tol and rel(Gs.cpu(), Gr) <= tol and rel(ss.cpu(), sr) <= tol


def test_zero_valid_tokens_and_optional_outputs():
    gen = torch.Generator().manual_seed(3)
    T, n, m = 9, 13, 6
    x, g = rows(T, n, torch.bfloat16, gen), rows(T, m, torch.bfloat16, gen)
    none = torch.zeros(T, dtype=torch.bool, device=DEVICE)
    Zs, Gs, ss = tk.kfac_update(x, g, none, True)
    assert Zs.shape == (n, n) and Gs.shape == (m, n) and ss.shape == (m,)
    assert all(t.dtype == torch.float32 and not t.any() for t in (Zs, Gs, ss))
    # No input covariance, and no gradient.
    Zs, Gs, ss = tk.kfac_update(x, g, None, False)
    assert Zs.shape == (0, 0)
    Gr = reference.kfac_update(x.cpu(), g.cpu(), None, False, dtype=torch.float64)[1]
    assert rel(Gs.cpu(), Gr) <= tol32(T)
    Zs, Gs, ss = tk.kfac_update(x, None, None, True)
    assert Gs.shape == (0, n) and ss.shape == (0,)
    assert rel(Zs.cpu(), reference.kfac_update(x.cpu(), None, None, True, dtype=torch.float64)[0]) <= tol32(T)


def test_mixed_input_dtypes():
    # x in bf16 and g in fp32 (both are widened to fp32 in registers).
    gen = torch.Generator().manual_seed(11)
    T, n, m = 45, 23, 17
    x, g = rows(T, n, torch.bfloat16, gen, 5), rows(T, m, torch.float32, gen)
    mask = make_mask(T, "pad30", gen)
    Zs, Gs, ss = tk.kfac_update(x, g, mask, True)
    Zr, Gr, sr = reference.kfac_update(x.cpu(), g.cpu(), mask.cpu(), True, dtype=torch.float64)
    tol = tol32(int(mask.sum()))
    assert rel(Zs.cpu(), Zr) <= tol and rel(Gs.cpu(), Gr) <= tol and rel(ss.cpu(), sr) <= tol


# Every shipped configuration, with and without token splits, plus a tiny tile that gives the
# upper-triangle enumeration many tiles (8 per side, 36 programs per split) to map.
_TINY = tk.BlockConfig(16, 16, 16, num_warps=1, num_stages=1)


@pytest.mark.parametrize("config,split_k", [(c, s) for c in tk.CONFIGS for s in (1, 3)] + [("tiny16", 2)])
def test_block_configs_and_splits(config, split_k):
    cfg = _TINY if config == "tiny16" else tk.CONFIGS[config]
    dtype = torch.float32 if config.startswith("fp32") else torch.bfloat16
    gen = torch.Generator().manual_seed(zlib.crc32(f"{config}-{split_k}".encode()))
    # Two tiles per side for the shipped configs (n > block), several token steps per split.
    n = 150 if config != "tiny16" else 121
    T, m = 3 * cfg.block_k * split_k + 5, cfg.block_m + 9
    x, g = rows(T, n, dtype, gen, 2), rows(T, m, dtype, gen)
    mask = make_mask(T, "pad30", gen)
    Zs, Gs, ss = tk.kfac_update(x, g, mask, True, config=cfg, split_k=split_k)
    Zr, Gr, sr = reference.kfac_update(x.cpu(), g.cpu(), mask.cpu(), True, dtype=torch.float64)
    tol = tol32(int(mask.sum()))
    assert rel(Zs.cpu(), Zr) <= tol and rel(Gs.cpu(), Gr) <= tol and rel(ss.cpu(), sr) <= tol
    assert torch.equal(Zs, Zs.T)
    w = torch.randn(T, generator=gen).to(DEVICE)
    W = tk.weighted_gram(x, w, config=cfg, split_k=split_k)
    wtol = 1e-2 if dtype == torch.bfloat16 else tol32(T)
    assert rel(W.cpu(), reference.weighted_gram(x.cpu(), w.cpu(), dtype=torch.float64)) <= wtol


@pytest.mark.parametrize("config,split_k", [("fp32_64", 1), ("fp32_64", 3), ("tc16_64", 1), ("tiny16", 1), ("tiny16", 2)])
@pytest.mark.parametrize("track", ["all", "z_only", "g_only"])
def test_kfac_update_adds_into_accumulators(config, split_k, track):
    """``out=(Z, G, s)``: the sums are added to non-zero accumulators (in the kernel with one token split,
    after it with several), the same tensors are returned, Z stays bitwise symmetric."""
    cfg = _TINY if config == "tiny16" else tk.CONFIGS[config]
    dtype = torch.float32 if config.startswith("fp32") else torch.bfloat16
    gen = torch.Generator().manual_seed(zlib.crc32(f"acc-{config}-{split_k}-{track}".encode()))
    n, m = 2 * cfg.block_n + 7, cfg.block_m + 5
    T = 2 * cfg.block_k * split_k + 3
    x, g = rows(T, n, dtype, gen, 3), rows(T, m, dtype, gen)
    mask = make_mask(T, "pad30", gen)
    x0, g0 = torch.randn(40, n, generator=gen, dtype=torch.float64), torch.randn(40, m, generator=gen, dtype=torch.float64)
    Z0 = x0.T @ x0
    Z0 = (Z0 + Z0.T) / 2  # bitwise symmetric, like every accumulator the statistics keep
    G0, s0 = g0.T @ x0, (g0 * g0).sum(0)
    Z = Z0.float().to(DEVICE) if track != "g_only" else None
    G = G0.float().to(DEVICE) if track != "z_only" else None
    s = s0.float().to(DEVICE) if track != "z_only" else None
    ptrs = [None if a is None else a.data_ptr() for a in (Z, G, s)]
    res = tk.kfac_update(x, g if G is not None else None, mask, Z is not None, config=cfg, split_k=split_k,
                         out=(Z, G, s))
    assert [None if a is None else a.data_ptr() for a in res] == ptrs
    Zr, Gr, sr = reference.kfac_update(x.cpu(), g.cpu(), mask.cpu(), True, dtype=torch.float64)
    tol = tol32(int(mask.sum()) + 40)
    if Z is not None:
        assert rel(Z.cpu(), Z0.float().double() + Zr) <= tol
        assert torch.equal(Z, Z.T)
    if G is not None:
        assert rel(G.cpu(), G0.float().double() + Gr) <= tol and rel(s.cpu(), s0.float().double() + sr) <= tol


def test_kfac_update_rejects_bad_accumulators():
    gen = torch.Generator().manual_seed(5)
    x, g = rows(9, 6, torch.float32, gen), rows(9, 4, torch.float32, gen)
    f32 = dict(dtype=torch.float32, device=DEVICE)
    with pytest.raises(ValueError, match=r"accumulator Z must be a contiguous fp32 tensor of shape \(6, 6\)"):
        tk.kfac_update(x, g, None, True, out=(torch.zeros(5, 5, **f32), torch.zeros(4, 6, **f32), torch.zeros(4, **f32)))
    with pytest.raises(ValueError, match="accumulator G .*not contiguous"):
        tk.kfac_update(x, g, None, True, out=(None, torch.zeros(6, 4, **f32).T, torch.zeros(4, **f32)))
    with pytest.raises(ValueError, match="accumulator s must be a contiguous fp32"):
        tk.kfac_update(x, g, None, True, out=(None, torch.zeros(4, 6, **f32), torch.zeros(4, dtype=torch.float64, device=DEVICE)))
    with pytest.raises(ValueError, match="G and s go together"):
        tk.kfac_update(x, g, None, True, out=(None, torch.zeros(4, 6, **f32), None))
    with pytest.raises(ValueError, match="out must be a tuple"):
        tk.kfac_update(x, g, None, True, out=torch.zeros(6, 6, **f32))


def test_default_config_choice():
    assert tk.default_config(torch.float32, 4096, 4096) is tk.CONFIGS["fp32_64"]
    assert tk.default_config(torch.bfloat16, 4096, 4096) is tk.CONFIGS["tc16_128"]
    assert tk.default_config(torch.float16, 64, 4096) is tk.CONFIGS["tc16_64"]
    assert tk.default_config(torch.float16, 4096, 4096, upcast=True) is tk.CONFIGS["fp32_64"]
    # the accumulating form: tiles whose epilogue (loading the old sums) compiles without spills
    assert tk.default_config(torch.bfloat16, 4096, 4096, accumulate=True) is tk.CONFIGS["tc16_64"]
    assert tk.default_config(torch.float32, 4096, 4096, accumulate=True) is tk.CONFIGS["fp32_64_w8"]
    for cfg in tk.CONFIGS.values():  # every shipped config can serve a symmetric output
        assert cfg.block_m == cfg.block_n


# --------------------------------------------------------------------------------------------
# weighted_gram, called directly
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,wtol", [(torch.float32, None), (torch.bfloat16, 1e-2), (torch.float16, None)], ids=str)
@pytest.mark.parametrize("T,d", [(1, 37), (67, 37), (50, 90)])
def test_weighted_gram_negative_weights(dtype, wtol, T, d):
    gen = torch.Generator().manual_seed(97 * T + d)
    v = rows(T, d, dtype, gen, 1)
    # Mixed signs and a wide range of magnitudes, like -alpha / s_i^2 next to the positive c Z part.
    w = (torch.randn(T, generator=gen) * torch.logspace(-2, 3, T)[torch.randperm(T, generator=gen)]).to(DEVICE)
    out = tk.weighted_gram(v, w)
    ref = reference.weighted_gram(v.cpu(), w.cpu(), dtype=torch.float64)
    # fp16 is widened to fp32 when weighted (w * v may overflow fp16): fp32 class.
    assert rel(out.cpu(), ref) <= (wtol or tol32(T))
    assert torch.equal(out, out.T)
    unweighted = tk.weighted_gram(v, None)
    assert rel(unweighted.cpu(), reference.weighted_gram(v.cpu(), None, dtype=torch.float64)) <= tol32(T)


def test_weighted_fp16_beyond_fp16_range():
    # w * v ~ 1e6 exceeds fp16's 65504: the widened path must stay finite and accurate.
    gen = torch.Generator().manual_seed(5)
    T, d = 20, 19
    v = rows(T, d, torch.float16, gen)
    w = (torch.rand(T, generator=gen) + 0.5).to(DEVICE) * -1e6
    out = tk.weighted_gram(v, w)
    assert rel(out.cpu(), reference.weighted_gram(v.cpu(), w.cpu(), dtype=torch.float64)) <= tol32(T)


def test_launcher_rejects_bad_arguments():
    x = torch.randn(8, 5, device=DEVICE)
    with pytest.raises(TypeError, match="fp64"):
        tk.kfac_update(x.double(), None, None, True)
    with pytest.raises(ValueError, match="contiguous last dimension"):
        tk.kfac_update(x.T, None, None, True)
    with pytest.raises(ValueError, match="mask"):
        tk.kfac_update(x, None, torch.ones(7, dtype=torch.bool, device=DEVICE), True)
    with pytest.raises(ValueError, match="fp32_precision"):
        tk.weighted_gram(x, None, fp32_precision="fp16")
    with pytest.raises(ValueError, match="block_m == block_n"):
        tk.weighted_gram(x, None, config=tk.BlockConfig(32, 16, 16, 4, 2))


# --------------------------------------------------------------------------------------------
# Through the public API and the custom ops
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_public_kfac_update_and_stats(dtype):
    gen = torch.Generator().manual_seed(21)
    B, S, n, m = 3, 11, 37, 129
    x = (torch.randn(B, S, n, generator=gen)).to(dtype=dtype, device=DEVICE)
    g = (torch.randn(B, S, m, generator=gen) * 0.3).to(dtype=dtype, device=DEVICE)
    mask = (torch.rand(B, S, generator=gen) >= 0.3).to(DEVICE)
    with backends.use("triton"):
        Zs, Gs, ss, count = lk.kfac_update(x, g, mask)
    Zr, Gr, sr = reference.kfac_update(x.reshape(-1, n).cpu(), g.reshape(-1, m).cpu(), mask.reshape(-1).cpu(),
                                       True, dtype=torch.float64)
    assert count == int(mask.sum())
    tol = tol32(count)
    assert rel(Zs.cpu(), Zr) <= tol and rel(Gs.cpu(), Gr) <= tol and rel(ss.cpu(), sr) <= tol

    st = lk.KFACStats(n, m, device=DEVICE, backend="triton")
    x2 = torch.randn(2, 7, n + 4, generator=gen).to(dtype=dtype, device=DEVICE)[..., :n]  # non-contiguous
    g2 = torch.randn(2, 7, m, generator=gen).to(dtype=dtype, device=DEVICE)
    assert st.update(x, g, mask) == count
    assert st.update(x2, g2) == 14
    xa = torch.cat([x.reshape(-1, n)[mask.reshape(-1)], x2.reshape(-1, n)]).cpu()
    ga = torch.cat([g.reshape(-1, m)[mask.reshape(-1)], g2.reshape(-1, m)]).cpu()
    Zr, Gr, sr = reference.kfac_update(xa, ga, None, True, dtype=torch.float64)
    T = xa.shape[0]
    assert st.count == T
    assert rel(st.input_cov().cpu(), Zr / T) <= tol32(T)
    assert rel(st.grad().cpu(), Gr / T) <= tol32(T)
    assert rel(st.grad_sq().cpu(), sr / T) <= tol32(T)


def test_public_zero_valid_tokens():
    x = torch.randn(2, 5, 12, device=DEVICE, dtype=torch.bfloat16)
    g = torch.randn(2, 5, 7, device=DEVICE, dtype=torch.bfloat16)
    with backends.use("triton"):
        Zs, Gs, ss, count = lk.kfac_update(x, g, torch.zeros(2, 5, dtype=torch.bool, device=DEVICE))
    assert count == 0 and not Zs.any() and not Gs.any() and not ss.any()


@pytest.mark.parametrize("dtype,wtol", [(torch.float32, None), (torch.bfloat16, 1e-2)], ids=str)
def test_public_weighted_gram_batched(dtype, wtol):
    gen = torch.Generator().manual_seed(31)
    v = torch.randn(2, 33, 45, generator=gen).to(dtype=dtype, device=DEVICE)
    w = (-torch.rand(2, 33, generator=gen) * 10).to(DEVICE)  # all negative, like -alpha / s^2
    with backends.use("triton"):
        out = lk.weighted_gram(v, w)
    assert out.shape == (2, 45, 45)
    for i in range(2):
        ref = reference.weighted_gram(v[i].cpu(), w[i].cpu(), dtype=torch.float64)
        assert rel(out[i].cpu(), ref) <= (wtol or tol32(33))


def test_opcheck():
    gen = torch.Generator().manual_seed(41)
    x = torch.randn(13, 17, generator=gen).to(dtype=torch.bfloat16, device=DEVICE)
    g = torch.randn(13, 9, generator=gen).to(dtype=torch.bfloat16, device=DEVICE)
    mask = torch.tensor([True, False] * 6 + [True], device=DEVICE)
    with backends.use("triton"):
        torch.library.opcheck(torch.ops.lorainit.kfac_update.default, (x, g, mask, True))
    with backends.use("triton"):
        torch.library.opcheck(torch.ops.lorainit.kfac_update.default, (x, None, None, True))
    w = torch.randn(13, generator=gen).to(DEVICE)
    with backends.use("triton"):
        torch.library.opcheck(torch.ops.lorainit.weighted_gram.default, (x.float(), w))


def test_upper_triangle_tile_enumeration():
    # The kernel's pid -> (i, j) map, checked exhaustively for small p and around every column start
    # up to j = 20000 (fp32 sqrt alone is off by one from p ~ 1e7, j ~ 4608).
    import triton
    import triton.language as tl

    @triton.jit
    def _enumerate_kernel(p_ptr, i_ptr, j_ptr, P, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        p = tl.load(p_ptr + offs, mask=offs < P, other=0)
        i, j = tk._upper_tile(p)
        tl.store(i_ptr + offs, i, mask=offs < P)
        tl.store(j_ptr + offs, j, mask=offs < P)

    cols = torch.arange(1, 20000, dtype=torch.int64)
    starts = cols * (cols + 1) // 2
    p = torch.cat([torch.arange(0, 2000), starts - 1, starts, starts + 1]).to(torch.int32)
    p = p[torch.randperm(p.numel())].to(DEVICE)
    i, j = torch.empty_like(p), torch.empty_like(p)
    _enumerate_kernel[(triton.cdiv(p.numel(), 1024),)](p, i, j, p.numel(), BLOCK=1024)
    p64, i64, j64 = p.long().cpu(), i.long().cpu(), j.long().cpu()
    assert bool(((0 <= i64) & (i64 <= j64)).all())
    assert torch.equal(j64 * (j64 + 1) // 2 + i64, p64)
