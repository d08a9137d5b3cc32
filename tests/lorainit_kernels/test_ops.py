"""The op declarations of ``lorainit_kernels.ops``: opcheck of every op on every backend that runs here
(forced with ``backends.use``), every backend against the float64 reference (within a small multiple
of plain torch's error in the same dtype), the automatic choice, the switch, and what a forced backend
that cannot run says. Numerical tests take the ``device`` fixture (tests/support/devices.py): CPU, and CUDA
when present."""
from __future__ import annotations

import pytest
import torch

import lorainit_kernels as lk
from lorainit_kernels import backends, ops, reference
from lorainit_kernels.backends import BackendNotSupported

FP32_ULP = 2.0 ** -24


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(out).any(), "NaN in output"
    den = ref.double().norm().item()
    num = (out.double() - ref.double()).norm().item()
    return num / den if den > 0 else num


def sym(b: int, n: int, gen: torch.Generator) -> torch.Tensor:
    a = torch.randn(b, n, n, generator=gen, dtype=torch.float64)
    return a + a.mT


def on(args, device):
    """The op's arguments with every tensor (also inside lists) moved to ``device``."""
    return tuple([t.to(device) for t in a] if isinstance(a, list) else a.to(device) if isinstance(a, torch.Tensor)
                 else a for a in args)


# Each op's inputs (fresh random, awkward shapes) in one dtype: the op's arguments
def kfac_args(dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(37, 13, generator=gen) + 0.3).to(dtype)
    g = (torch.randn(37, 9, generator=gen) * 1e-2).to(dtype)
    return x, g, torch.rand(37, generator=gen) > 0.3, True


def gram_args(dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(29, 11, generator=gen).to(dtype)
    return v, -torch.rand(29, generator=gen, dtype=reference.accumulation_dtype(v)) - 0.1


def symm_args(dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return sym(2, 19, gen).to(dtype), torch.randn(2, 19, 5, generator=gen).to(dtype)


def rr_args(dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    S = [torch.randn(2, 23, c, generator=gen).to(dtype) for c in (3, 2)]
    AS = [torch.randn(2, 23, c, generator=gen).to(dtype) for c in (4, 1)]
    return S, AS


MAKE = {"kfac_update": kfac_args, "weighted_gram": gram_args, "sym_matmul": symm_args, "rr_grams": rr_args}
DTYPES = {"kfac_update": (torch.float32, torch.bfloat16, torch.float16, torch.float64),
          "weighted_gram": (torch.float32, torch.bfloat16, torch.float16, torch.float64),
          "sym_matmul": (torch.float32, torch.float64),
          "rr_grams": (torch.float32, torch.float64)}
# every (op, dtype, backend) a registered kernel takes; the others are the forced-backend errors below
CASES = [(op, dt, b) for op in ops.OPS for dt in DTYPES[op] for b, k in backends.kernels(op).items()
         if k.dtypes is None or dt in k.dtypes]


def runnable(op, backend, args):
    """Skip when this machine lacks the backend on the arguments' device (extension not built, native off the
    CPU, no Triton, the Triton interpreter off)."""
    reason = backends.not_supported_reasons(op, *args)[backend]
    if reason is not None:
        pytest.skip(f"{backend} cannot run {op} here: {reason}")


@pytest.mark.parametrize("op, dtype, backend", CASES, ids=str)
def test_opcheck(op, dtype, backend, device):
    """Schema, fake tensors (meta shapes and dtypes), autograd registration and AOT dispatch of each op, on each
    backend it can run on this device."""
    args = on(MAKE[op](dtype, seed=len(CASES)), device)
    runnable(op, backend, args)
    with backends.use(backend):
        torch.library.opcheck(getattr(torch.ops.lorainit, op).default, args)


def optional_args(op, dtype, seed):
    """Each op on the awkward corners of its arguments: no ``g``, no mask, no Z, a single row, a single part."""
    gen = torch.Generator().manual_seed(seed)
    if op == "kfac_update":
        return [(torch.randn(1, 7, generator=gen).to(dtype), None, None, True),
                (torch.randn(19, 5, generator=gen).to(dtype), torch.randn(19, 3, generator=gen).to(dtype), None, False),
                (torch.randn(11, 6, generator=gen).to(dtype), None, torch.rand(11, generator=gen) > 0.5, False)]
    if op == "weighted_gram":
        return [(torch.randn(1, 9, generator=gen).to(dtype), None), (torch.randn(31, 1, generator=gen).to(dtype), None)]
    if op == "sym_matmul":
        return [(sym(1, 1, gen).to(dtype), torch.randn(1, 1, 4, generator=gen).to(dtype)),
                (sym(3, 17, gen).to(dtype), torch.randn(3, 17, 1, generator=gen).to(dtype))]
    return [([torch.randn(1, 13, 1, generator=gen).to(dtype)], [torch.randn(1, 13, 1, generator=gen).to(dtype)]),
            ([torch.randn(2, 6, c, generator=gen).to(dtype) for c in (1, 2, 1, 3)],
             [torch.randn(2, 6, 7, generator=gen).to(dtype)])]


@pytest.mark.parametrize("op", ops.OPS)
def test_opcheck_awkward_arguments(op, device):
    """opcheck on optional arguments left out and one-row/one-column shapes, under the automatic choice."""
    for args in optional_args(op, torch.float32, seed=13):
        torch.library.opcheck(getattr(torch.ops.lorainit, op).default, on(args, device))


@pytest.mark.parametrize("op", ops.OPS)
def test_declarations_take_no_backend_and_have_device_kernels(op):
    schema = str(getattr(torch.ops.lorainit, op).default._schema)
    assert "backend" not in schema and "str" not in schema, schema
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lorainit::{op}", key), (op, key)


@pytest.mark.parametrize("op", ops.OPS)
def test_fake_tensors_give_the_output_shapes(op):
    """Under FakeTensorMode (torch.compile's tracing) the ops give their outputs' shapes and dtypes without data."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = MAKE[op](torch.float32, seed=4)
    real = getattr(torch.ops.lorainit, op)(*args)
    with FakeTensorMode() as mode:
        fake_args = tuple([mode.from_tensor(t) for t in a] if isinstance(a, list) else
                          mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
        fake = getattr(torch.ops.lorainit, op)(*fake_args)
    real = real if isinstance(real, tuple) else (real,)
    fake = fake if isinstance(fake, tuple) else (fake,)
    assert [(t.shape, t.dtype) for t in fake] == [(t.shape, t.dtype) for t in real]


# ------------------------------------------------------------------------ against float64
def public(op, args, backend):
    """The public function of ``op`` on the op's 2-D/3-D arguments, inside ``backends.use(backend)``."""
    with backends.use(backend):
        if op == "kfac_update":
            x, g, mask, _ = args
            return lk.kfac_update(x, g, mask)[:3]
        if op == "weighted_gram":
            return (lk.weighted_gram(*args),)
        if op == "sym_matmul":
            return (lk.sym_matmul(*args),)
        return ops.rr_grams(*args)


def plain_torch(op, args, dtype):
    """What plain torch computes in ``dtype`` (the error yardstick); fp64 is the ground truth."""
    if op == "kfac_update":
        x, g, mask, cov = args
        return reference.kfac_update(x, g, mask, cov, dtype=dtype)
    if op == "weighted_gram":
        return (reference.weighted_gram(*args, dtype=dtype),)
    if op == "sym_matmul":
        return (reference.sym_matmul(*args, dtype=dtype),)
    S, AS = (torch.cat([t.to(dtype) for t in parts], -1) for parts in args)
    return reference.mirror_upper(S.mT @ S), reference.mirror_upper(S.mT @ AS)  # the op's output contract


@pytest.mark.parametrize("op, dtype, backend", [c for c in CASES if c[1] != torch.float64], ids=str)
def test_backend_matches_float64_reference(op, dtype, backend, device):
    args = on(MAKE[op](dtype, seed=7), device)
    runnable(op, backend, args)
    outs = public(op, args, backend)
    refs = plain_torch(op, args, torch.float64)
    torch_outs = plain_torch(op, args, dtype)  # plain torch in the inputs' dtype (bf16 rounds every output)
    for out, ref, tout in zip(outs, refs, torch_outs):
        assert out.shape == ref.shape
        e, et = rel_err(out, ref), rel_err(tout, ref)
        if op == "rr_grams":
            # fp64 accumulation of exact fp32 products: far inside plain fp32 torch's error
            assert out.dtype == torch.float64 and e <= 1e-13, e
        else:
            assert out.dtype == torch.float32
            assert e <= 2 * et + 2 * FP32_ULP, f"{backend} {op}: rel err {e:.3g} > 2 x torch's {et:.3g}"


@pytest.mark.parametrize("op", ops.OPS)
def test_float64_inputs_run_on_torch_in_float64(op, device):
    args = on(MAKE[op](torch.float64, seed=3), device)
    assert ops.backend_for(op, *args) == "torch"
    for out, ref in zip(public(op, args, "auto"), plain_torch(op, args, torch.float64)):
        assert out.dtype == torch.float64
        assert rel_err(out, ref) <= 1e-13


@pytest.mark.parametrize("op", ["weighted_gram", "rr_grams"])
def test_symmetric_outputs_are_exactly_symmetric(op, device):
    for backend in backends.BACKENDS:
        args = on(MAKE[op](torch.float32, seed=11), device)
        if backends.not_supported_reasons(op, *args)[backend] is None:
            for out in public(op, args, backend):
                assert torch.equal(out, out.mT), backend


# ------------------------------------------------------------------------ the automatic choice
def test_auto_choice_per_op_and_dtype(monkeypatch, device):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter never runs unless forced
    if device == "cpu":  # native where it is built and not slower here (kfac_update on a CPU without AVX2)
        fused = {op: "native" if lk.has_native() and backends.auto_reasons(op, torch.randn(3, 4), full=False)["native"] is None
                 else "torch" for op in ops.OPS}
    else:  # Triton where installed and it has a kernel, else the reference (cuBLAS)
        fused = {op: "triton" if backends.has_triton() and op in ("kfac_update", "weighted_gram") else "torch"
                 for op in ops.OPS}
    for op in ops.OPS:
        assert ops.backend_for(op, torch.randn(2, 3, 4, device=device)) == fused[op]
        assert ops.backend_for(op, torch.randn(2, 3, 4, dtype=torch.float64, device=device)) == "torch"
    for op in ("kfac_update", "weighted_gram"):
        assert ops.backend_for(op, torch.randn(3, 4, dtype=torch.bfloat16, device=device)) == fused[op]
    for op in ("sym_matmul", "rr_grams"):
        assert ops.backend_for(op, torch.randn(3, 4, dtype=torch.bfloat16, device=device)) == "torch"
    # meta tensors (no data): only the reference can take them
    assert ops.backend_for("kfac_update", torch.empty(3, 4, device="meta")) == "torch"


def test_backend_for_lists_and_unknown_ops():
    S = [torch.randn(2, 5, 3), torch.randn(2, 5, 2)]
    assert ops.backend_for("rr_grams", S, S) == ops.backend_for("rr_grams", S[0])
    with pytest.raises(ValueError, match="op must be one of"):
        ops.backend_for("svd", S[0])
    with pytest.raises(ValueError, match="backend='gpu' is not one of"):
        ops.backend_for("rr_grams", S[0], backend="gpu")


@pytest.mark.skipif(not lk.has_native(), reason="lorainit_kernels._C is not built")
def test_rr_grams_beyond_four_parts_runs_on_torch():
    gen = torch.Generator().manual_seed(2)
    S = [torch.randn(1, 9, 1, generator=gen) for _ in range(5)]
    AS = [torch.randn(1, 9, 1, generator=gen) for _ in range(5)]
    B, H = ops.rr_grams(S, AS)
    B_ref, H_ref = reference.rr_grams(S, AS)
    assert torch.equal(B, B_ref) and torch.equal(H, H_ref)
    with pytest.raises(ValueError, match="1 to 4 column parts"), backends.use("native"):
        ops.rr_grams(S, AS)


# ------------------------------------------------------------------------ forced backends that decline
@pytest.mark.skipif(not lk.has_native(), reason="lorainit_kernels._C is not built")
@pytest.mark.parametrize("op", ops.OPS)
def test_forced_native_refuses_float64(op):
    args = MAKE[op](torch.float64, seed=5)
    with pytest.raises(BackendNotSupported) as err:
        public(op, args, "native")
    msg = str(err.value)
    assert f"{op}: backend='native' cannot run here" in msg and "got torch.float64" in msg
    assert "torch: available" in msg
    for name in backends.BACKENDS:
        assert f"{name}:" in msg
    # a dtype reason is both a ValueError and a TypeError
    assert isinstance(err.value, ValueError) and isinstance(err.value, TypeError)
    # the op itself refuses too: no backend hands a call to another
    with pytest.raises(BackendNotSupported, match="native kernel takes"), backends.use("native"):
        getattr(torch.ops.lorainit, op)(*args)


@pytest.mark.parametrize("op", ops.OPS)
def test_forced_triton_says_why(op, monkeypatch):
    args = MAKE[op](torch.float32, seed=6)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if op in ("sym_matmul", "rr_grams"):
        expected = f"there is no Triton kernel for {op}"
    elif backends.has_triton():
        expected = "TRITON_INTERPRET=1"
    else:
        expected = "triton is not installed"
    with pytest.raises(BackendNotSupported, match=expected):
        public(op, args, "triton")
    with pytest.raises(BackendNotSupported, match=expected), backends.use("triton"):
        getattr(torch.ops.lorainit, op)(*args)


def test_forced_triton_without_the_package(monkeypatch):
    monkeypatch.setattr(backends, "has_triton", lambda: False)
    with pytest.raises(BackendNotSupported, match="triton is not installed"), backends.use("triton"):
        lk.weighted_gram(torch.randn(6, 4))


def test_forced_native_off_the_cpu():
    reasons = backends.not_supported_reasons("sym_matmul", torch.empty(2, 3, 3, device="meta"))
    assert "CPU tensors only" in reasons["native"] and reasons["torch"] is None
    with pytest.raises(BackendNotSupported, match="CPU tensors only"):
        backends.select("sym_matmul", "native", torch.empty(2, 3, 3, device="meta"))
    # a device without a registered kernel runs the op's body, the reference: a forced native refuses there too
    with pytest.raises(BackendNotSupported, match="CPU tensors only"), backends.use("native"):
        ops._reference_only("sym_matmul", torch.empty(2, 3, 3, device="meta"))
    with backends.use("torch"):
        ops._reference_only("sym_matmul", torch.empty(2, 3, 3, device="meta"))


def test_forced_native_without_the_extension(monkeypatch):
    monkeypatch.setattr(backends, "_load_native", lambda: (None, "lorainit_kernels._C is not built (test)"))
    x = torch.randn(5, 4)
    assert ops.backend_for("kfac_update", x) == "torch"
    with pytest.raises(BackendNotSupported, match="backend='native' cannot run here.*not built"):
        ops.backend_for("rr_grams", x, backend="native")


def test_unknown_backend_in_the_switch():
    with pytest.raises(ValueError, match="backend='cuda-magic' is not one of"):
        with backends.use("cuda-magic"):
            pass
    assert "unknown backend 'cuda-magic'" in backends.device_reason("cuda-magic", torch.device("cpu"))


# ------------------------------------------------------------------------ the switch
def test_use_forces_nests_and_restores():
    x = torch.randn(5, 4)
    auto = ops.backend_for("kfac_update", x)
    assert backends.forced() is None
    with backends.use("torch"):
        assert backends.forced() == "torch" and ops.backend_for("kfac_update", x) == "torch"
        with backends.use("auto"):
            assert ops.backend_for("kfac_update", x) == auto
        with backends.use_configured("auto"):  # a configured "auto" keeps the enclosing choice
            assert ops.backend_for("kfac_update", x) == "torch"
        assert backends.forced() == "torch"
        assert ops.backend_for("kfac_update", x, backend="auto") == auto
    assert backends.forced() is None
    with pytest.raises(RuntimeError), backends.use("torch"):
        raise RuntimeError("restored on error too")
    assert backends.forced() is None


def test_use_is_per_thread_and_a_decorator():
    import threading

    seen = []
    with backends.use("torch"):
        t = threading.Thread(target=lambda: seen.append(backends.forced()))
        t.start()
        t.join()
    assert seen == [None]

    @backends.use("torch")
    def inside():
        return backends.forced()

    assert inside() == "torch" and backends.forced() is None


@pytest.mark.parametrize("op", ops.OPS)
def test_backend_keyword_is_a_deprecated_alias(op):
    args = MAKE[op](torch.float32, seed=8)
    with backends.use("torch"):
        expected = public(op, args, "torch")
    fn = {"kfac_update": lambda **kw: lk.kfac_update(args[0], args[1], args[2], **kw)[:3],
          "weighted_gram": lambda **kw: (lk.weighted_gram(*args, **kw),),
          "sym_matmul": lambda **kw: (lk.sym_matmul(*args, **kw),),
          "rr_grams": lambda **kw: ops.rr_grams(*args, **kw)}[op]
    with pytest.warns(DeprecationWarning, match=r"backends.use\('torch'\)"):
        got = fn(backend="torch")
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="backend='cuda-magic'"):
        fn(backend="cuda-magic")


# ------------------------------------------------------------------------ rr_grams arguments
@pytest.mark.parametrize("S, AS, match", [
    ([], [torch.randn(2, 5, 3)], "at least one tensor each"),
    ([torch.randn(5, 3)], [torch.randn(5, 3)], r"\(b, n, c\) tensors, got \(5, 3\)"),
    ([torch.randn(2, 5, 3)], [torch.randn(2, 6, 3)], r"every part must be \(2, 5, c\)"),
    ([torch.randn(2, 5, 3)], [torch.randn(2, 5, 2)], "3 columns in all but AS_parts 2"),
    ([torch.randn(2, 5, 3).int()], [torch.randn(2, 5, 3)], "must be a floating tensor"),
])
def test_rr_grams_bad_arguments(S, AS, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ops.rr_grams(S, AS)


# ----------------------------------------------------------------------------- accumulating into existing sums
ACC_BACKENDS = ["torch"] + (["native"] if backends.has_native() else [])


@pytest.mark.parametrize("backend", ACC_BACKENDS + ["triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_z", [True, False])
def test_kfac_accumulate_adds_to_existing_sums_in_place(backend, dtype, with_z, device, rtol):
    """Z, G, s += one batch's sums (the native kernel in place: same storage, no temporary), against fp64."""
    gen = torch.Generator().manual_seed(11)
    n, m = 70, 45
    x0, g0 = torch.randn(50, n, generator=gen).to(device), torch.randn(50, m, generator=gen).to(device)
    x = torch.randn(3, 17, n, generator=gen).to(dtype).to(device)
    g = torch.randn(3, 17, m, generator=gen).to(dtype).to(device)
    mask = (torch.rand(3, 17, generator=gen) > 0.25).to(device)
    runnable("kfac_update", backend, (x, g))
    Z = (x0.T @ x0) if with_z else None
    G, s = g0.T @ x0, (g0 * g0).sum(0)
    ptrs = [t.data_ptr() for t in (Z, G, s) if t is not None]
    Zr, Gr, sr = reference.kfac_update(x.reshape(-1, n)[mask.reshape(-1)].double(), g.reshape(-1, m)[mask.reshape(-1)].double(),
                                       None, with_z, dtype=torch.float64)
    Z_ref = None if Z is None else Z.double() + Zr
    G_ref, s_ref = G.double() + Gr, s.double() + sr
    with backends.use(backend):
        count = ops.kfac_accumulate_(Z, G, s, x, g, mask)
    assert count == int(mask.sum())
    assert [t.data_ptr() for t in (Z, G, s) if t is not None] == ptrs
    assert rel_err(G, G_ref) < rtol and rel_err(s, s_ref) < rtol
    if with_z:
        assert rel_err(Z, Z_ref) < rtol and torch.equal(Z, Z.T)


@pytest.mark.parametrize("backend", ACC_BACKENDS + ["triton"])
@pytest.mark.parametrize("dtype", [torch.float32])
def test_weighted_gram_out_accumulates(backend, device, dtype, atol, rtol):
    gen = torch.Generator().manual_seed(3)
    v = torch.randn(2, 40, 33, generator=gen).to(device, dtype)
    w = torch.randn(2, 40, generator=gen).to(device, dtype)
    runnable("weighted_gram", backend, (v, w))
    base = sym(2, 33, gen).float().to(device)
    out = base.clone()
    ptr = out.data_ptr()
    with backends.use(backend):
        res = ops.weighted_gram(v, w, out=out)
    ref = base.double() + torch.einsum("btd,bt,bte->bde", v.double(), w.double(), v.double())
    assert res.data_ptr() == ptr and torch.equal(out, out.mT)
    torch.testing.assert_close(out.double(), ref, atol=atol * ref.abs().max().item(), rtol=rtol)
    with pytest.raises(ValueError, match="contiguous"), backends.use(backend):
        ops.weighted_gram(v, w, out=out.mT)
