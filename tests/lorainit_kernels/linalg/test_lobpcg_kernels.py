"""The native kernels behind LOBPCG on every ISA path this CPU runs: lk.sym_matmul (symmetric block
product reading the upper triangle only) against float64 ``A @ W`` and torch's own fp32 error, and
_native.rr_grams (the Rayleigh-Ritz Grams in fp64 from fp32 parts) against float64 GEMMs."""
from __future__ import annotations

import pytest
import torch

import lorainit_kernels as lk
from lorainit_kernels import backends as _backends
from lorainit_kernels.backends import has_native

if not has_native():
    pytest.skip(f"lorainit_kernels._C is not built ({_backends._load_native()[1]})", allow_module_level=True)

from lorainit_kernels import _native  # noqa: E402

ISAS = _native.isa_levels()


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    monkeypatch.setenv(_native.ISA_ENV, request.param)
    return request.param


def sym(batch, n, gen, dtype=torch.float64):
    A = torch.randn(*batch, n, n, generator=gen, dtype=dtype)
    return A + A.transpose(-1, -2)


def poison_lower(A: torch.Tensor) -> torch.Tensor:
    """A copy with NaN in the strictly lower triangle: a kernel that reads it returns NaN."""
    n = A.shape[-1]
    out = A.clone()
    out[..., torch.ones(n, n, dtype=torch.bool).tril(-1)] = float("nan")
    return out


def rel_err(out, ref):
    assert torch.isfinite(out).all(), "non-finite output"
    return float((out.double() - ref).norm() / ref.norm())


# n around the register block (8 rows on AVX-512, 2 or 4 on AVX2/portable), odd n (the row pairs of the
# AVX-512 8-column kernel) and the thread split; p around the 8-column width (p <= 8 runs unpadded to 16,
# on AVX-512 with two rows per vector) and the 16-lane vectors (padding)
@pytest.mark.parametrize("batch, n, p", [((), 1, 1), ((), 5, 3), ((3,), 17, 16), ((2,), 100, 20), ((4,), 333, 33),
                                         ((), 1031, 7), ((2, 3), 64, 17), ((1,), 9, 48), ((3,), 2, 8),
                                         ((2,), 3, 5), ((), 11, 8), ((5,), 13, 1), ((2,), 258, 8), ((), 301, 9),
                                         ((3,), 19, 2)])
def test_matches_float64_and_never_reads_the_lower_triangle(isa, batch, n, p):
    gen = torch.Generator().manual_seed(n * 131 + p)
    A = sym(batch, n, gen)
    W = torch.randn(*batch, n, p, generator=gen, dtype=torch.float64)
    ref = A @ W
    out = lk.sym_matmul(poison_lower(A.float()), W.float())
    assert out.shape == ref.shape and out.dtype == torch.float32
    e, e_torch = rel_err(out, ref), rel_err(A.float() @ W.float(), ref)
    # fp32 accumulation over n terms: the fp32 class of docs/math.md, and within a few x torch's error
    assert e <= 1e-5 * max(1.0, (n / 1e3) ** 0.5), e
    assert e <= 4 * e_torch + 2.0 ** -23, (e, e_torch)


def test_shared_matrix_strided_slices_and_threads():
    gen = torch.Generator().manual_seed(3)
    big = sym((5,), 300, gen).float()
    W = torch.randn(3, 300, 16, generator=gen)
    # a batch slice (row and batch strides of the parent) and one (n, n) matrix shared by the batch
    assert rel_err(lk.sym_matmul(big[1:4], W), big[1:4].double() @ W.double()) < 1e-5
    out_shared = lk.sym_matmul(big[0], W)
    assert rel_err(out_shared, big[0].double() @ W.double()) < 1e-5
    # a column-sliced view: rows lda = 400 floats apart
    wide = torch.randn(400, 400, generator=gen)
    wide = wide + wide.T
    view = wide[:250, :250]
    assert view.stride() == (400, 1)
    Wv = torch.randn(250, 8, generator=gen)
    assert rel_err(lk.sym_matmul(view, Wv), view.double() @ Wv.double()) < 1e-5
    # one thread and two threads give the same numbers up to summation order
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = lk.sym_matmul(big[:1], W[:1])
        torch.set_num_threads(2)
        two = lk.sym_matmul(big[:1], W[:1])
    finally:
        torch.set_num_threads(prev)
    assert rel_err(two, one.double()) < 1e-6


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_empty_and_transposed_inputs(backend):
    for A, W in [(torch.randn(0, 0), torch.randn(0, 3)), (torch.randn(2, 4, 4), torch.randn(2, 4, 0)),
                 (torch.randn(0, 5, 5), torch.randn(0, 5, 2))]:
        with _backends.use(backend):
            out = lk.sym_matmul(A, W)
        assert out.shape == W.shape and out.dtype == W.dtype
    gen = torch.Generator().manual_seed(8)
    S = sym((3,), 40, gen, torch.float32)
    W = torch.randn(3, 40, 6, generator=gen)
    # a column-major view (A.mT of a symmetric A) and an expanded (stride-0) batch of one matrix
    with _backends.use(backend):
        assert rel_err(lk.sym_matmul(S.mT, W), S.double() @ W.double()) < 1e-5
        assert rel_err(lk.sym_matmul(S[0].expand(3, 40, 40), W), S[0].double() @ W.double()) < 1e-5


def test_backends_agree_and_auto_choice():
    gen = torch.Generator().manual_seed(4)
    A = sym((2,), 70, gen)
    W = torch.randn(2, 70, 5, generator=gen, dtype=torch.float64)
    # fp64 goes to torch under auto; native refuses it by name
    assert torch.equal(lk.sym_matmul(A, W), A @ W)
    with pytest.raises(TypeError, match="native kernel takes float32"), _backends.use("native"):
        lk.sym_matmul(A, W)
    a32, w32 = A.float(), W.float()
    for backend in ("torch", "native"):
        with _backends.use(backend):
            assert rel_err(lk.sym_matmul(a32, w32), A @ W) < 1e-5
    # no Triton kernel for this op (or no Triton here at all): a clear error either way
    with pytest.raises(ValueError, match="no Triton kernel|cannot run here"), _backends.use("triton"):
        lk.sym_matmul(a32, w32)


@pytest.mark.parametrize("args, err, match", [
    ((torch.randn(4, 5), torch.randn(5, 2)), ValueError, r"A must be square .* \(4, 5\)"),
    ((torch.randn(2, 4, 4), torch.randn(3, 4, 2)), ValueError, r"W must have shape \(2,\) \+ \(4, p\)"),
    ((torch.randn(4, 4), torch.randn(5, 2)), ValueError, r"W must have shape"),
    ((torch.randn(4, 4), torch.randn(4, 2, dtype=torch.float64)), ValueError, "must share dtype"),
    ((torch.randn(4, 4).int(), torch.randn(4, 2)), TypeError, "A must be a floating tensor"),
    (("A", torch.randn(4, 2)), TypeError, "must be tensors"),
])
def test_bad_input(args, err, match):
    with pytest.raises(err, match=match):
        lk.sym_matmul(*args)


def test_C_argument_checks():
    C = _backends.native_module()
    A, W, Y = torch.randn(4, 4), torch.zeros(4, 16), torch.empty(4, 16)
    ok = dict(a_ptr=A.data_ptr(), batch=1, n=4, lda=4, a_mat_stride=0, w_ptr=W.data_ptr(), pw=16,
              y_ptr=Y.data_ptr(), isa=-1, num_threads=1)
    assert C.sym_matmul(**ok).startswith("symm_")
    for over, match in [(dict(pw=4), "8 or a multiple of 16"), (dict(lda=3), "lda=3 < n=4"), (dict(y_ptr=0), "output Y"),
                        (dict(a_ptr=A.data_ptr() + 1), "not aligned"), (dict(n=-1), "negative size"),
                        (dict(isa=9), "isa must be")]:
        with pytest.raises(ValueError, match=match):
            C.sym_matmul(**{**ok, **over})


def test_opcheck():
    gen = torch.Generator().manual_seed(6)
    A = sym((2,), 19, gen, torch.float32)
    W = torch.randn(2, 19, 3, generator=gen)
    with _backends.use("native"):
        torch.library.opcheck(torch.ops.lorainit.sym_matmul, (A, W))
    with _backends.use("torch"):
        torch.library.opcheck(torch.ops.lorainit.sym_matmul, (A, W))


# --------------------------------------------------------------------------------------------
# rr_grams: B = S^T S, H = S^T AS in fp64 from fp32 column parts
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("b, n, cols", [(1, 1, [1]), (1, 5, [3, 2]), (3, 17, [7, 4, 2]), (2, 300, [10, 5]),
                                        (1, 1000, [24, 12, 5, 7]), (4, 130, [32, 16])])
def test_rr_grams_match_float64(isa, b, n, cols):
    gen = torch.Generator().manual_seed(n + len(cols))
    S_parts = [torch.randn(b, n, c, generator=gen) for c in cols]
    A_parts = [torch.randn(b, n, c, generator=gen) for c in cols]
    S, AS = torch.cat(S_parts, -1).double(), torch.cat(A_parts, -1).double()
    B, H = _native.rr_grams(S_parts, A_parts)
    B_ref, H_ref = S.mT @ S, S.mT @ AS
    assert B.dtype == H.dtype == torch.float64 and B.shape == H.shape == B_ref.shape
    assert torch.equal(B, B.mT) and torch.equal(H, H.mT)
    # fp64 accumulation of exact fp32 products: fp64 rounding only
    assert (B - B_ref).abs().max() <= 1e-13 * B_ref.abs().max()
    H_upper = torch.triu(H_ref) + torch.triu(H_ref, 1).mT
    assert (H - H_upper).abs().max() <= 1e-13 * H_ref.abs().max()


def test_rr_grams_strided_parts_and_threads():
    gen = torch.Generator().manual_seed(9)
    big = torch.randn(3, 400, 40, generator=gen)
    S_parts = [big[:, :, :16], big[:, :, 20:28]]               # column slices: row stride 40
    A_parts = [big[:, :, 28:36].mT.contiguous().mT, big[:, :, 0:16]]   # a column-major part
    S, AS = torch.cat(S_parts, -1).double(), torch.cat(A_parts, -1).double()
    B_ref, H_ref = S.mT @ S, S.mT @ AS
    H_ref = torch.triu(H_ref) + torch.triu(H_ref, 1).mT
    prev = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            B, H = _native.rr_grams(S_parts, A_parts)
            assert (B - B_ref).abs().max() <= 1e-12 * B_ref.abs().max()
            assert (H - H_ref).abs().max() <= 1e-12 * H_ref.abs().max()
            # one matrix: its tokens are split across the threads
            B1, H1 = _native.rr_grams([p[1:2] for p in S_parts], [p[1:2] for p in A_parts])
            assert (B1 - B_ref[1:2]).abs().max() <= 1e-12 * B_ref.abs().max()
            assert (H1 - H_ref[1:2]).abs().max() <= 1e-12 * H_ref.abs().max()
    finally:
        torch.set_num_threads(prev)


def test_rr_grams_bad_input():
    with pytest.raises(ValueError, match="every part must be"):
        _native.rr_grams([torch.randn(2, 5, 3)], [torch.randn(2, 6, 3)])
    with pytest.raises(ValueError, match="1 to 4 tensors each"):
        _native.rr_grams([], [torch.randn(2, 5, 3)])
    with pytest.raises(ValueError, match=r"\(b, n, c\) tensors, got \(5, 3\)"):
        _native.rr_grams([torch.randn(5, 3)], [torch.randn(2, 5, 3)])
    with pytest.raises(ValueError, match="fp32 CPU tensors"):
        _native.rr_grams([torch.randn(2, 5, 3, dtype=torch.float64)], [torch.randn(2, 5, 3)])
    C = _backends.native_module()
    with pytest.raises(ValueError, match="parts have 3 columns in all, q=4"):
        x = torch.randn(1, 5, 3)
        out = torch.empty(1, 4, 4, dtype=torch.float64)
        C.rr_grams([(x.data_ptr(), 3, 3, 0)], [(x.data_ptr(), 3, 3, 0)], 1, 5, 4, out.data_ptr(), out.data_ptr())
    with pytest.raises(ValueError, match="1 to 4 column parts"):
        C.rr_grams([], [], 1, 5, 0, 0, 0)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_a_matrix_gives_the_same_bits_alone_or_in_a_batch(isa, threads):
    """The thread split of one matrix's sums depends on n and the thread count, never on the batch, so a
    batched LoRA-DA solve equals the per-layer one bit for bit (two matrices and a 2-core machine used
    to split the sums of a lone matrix but not those of a batch)."""
    gen = torch.Generator().manual_seed(21)
    A = sym((5,), 517, gen).float()
    W = torch.randn(5, 517, 19, generator=gen)
    W8 = torch.randn(5, 517, 8, generator=gen)  # the 8-column kernel (two rows per vector on AVX-512)
    S_parts = [torch.randn(5, 517, 12, generator=gen), torch.randn(5, 517, 7, generator=gen)]
    A_parts = [torch.randn(5, 517, 12, generator=gen), torch.randn(5, 517, 7, generator=gen)]
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        Y, Y8 = lk.sym_matmul(A, W), lk.sym_matmul(A, W8)
        B, H = _native.rr_grams(S_parts, A_parts)
        for i in range(5):
            assert torch.equal(Y[i], lk.sym_matmul(A[i:i + 1], W[i:i + 1])[0]), i
            assert torch.equal(Y8[i], lk.sym_matmul(A[i:i + 1], W8[i:i + 1])[0]), i
            B1, H1 = _native.rr_grams([p[i:i + 1] for p in S_parts], [p[i:i + 1] for p in A_parts])
            assert torch.equal(B[i], B1[0]) and torch.equal(H[i], H1[0]), i
    finally:
        torch.set_num_threads(prev)
