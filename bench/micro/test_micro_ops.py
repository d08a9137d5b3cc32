"""Microbenchmarks on pytest-benchmark: each op's providers ("lorainit", "torch", "scipy") in one group.

``make bench`` runs ``pytest bench/micro --benchmark-only --benchmark-json bench/results/micro_raw.json``
and :mod:`bench.micro_tables` turns the JSON into ``bench/results/micro.{json,md}``: per group the
median of every provider and its ratio to lorainit's (same run, same machine). Not part of
``make test`` (``testpaths`` is ``tests``). The sizes are small enough for a 2-core CPU; the longer
sweeps with their own tables stay in ``bench/bench_*.py``.
"""
import pytest
import torch

import lorainit_kernels as lk
from lorainit_kernels import reference
from bench import spectra

ROUNDS = dict(rounds=7, warmup_rounds=1, iterations=1)


def _kfac_inputs(T=4096, n=512, m=512, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, n, generator=g).to(dtype)
    grad = torch.randn(T, m, generator=g).to(dtype)
    mask = torch.rand(T, generator=g) < 0.8
    return x, grad, mask


@pytest.mark.benchmark(group="kfac_update bf16 T=4096 n=m=512 (80% valid tokens)")
@pytest.mark.parametrize("provider", ["lorainit", "torch"])
def test_kfac_update(benchmark, provider):
    x, grad, mask = _kfac_inputs()
    if provider == "lorainit":
        fn = lambda: lk.kfac_update(x, grad, mask)  # noqa: E731
    else:  # the composition users would write: compact, upcast, two GEMMs and a reduction
        fn = lambda: reference.kfac_update(x, grad, mask)  # noqa: E731
    benchmark.pedantic(fn, **ROUNDS)


@pytest.mark.benchmark(group="sym_matmul fp32 batch 8, n=1024, p=16")
@pytest.mark.parametrize("provider", ["lorainit", "torch"])
def test_sym_matmul(benchmark, provider):
    g = torch.Generator().manual_seed(1)
    A = torch.randn(8, 1024, 1024, generator=g)
    A = A + A.mT
    W = torch.randn(8, 1024, 16, generator=g)
    fn = (lambda: lk.sym_matmul(A, W)) if provider == "lorainit" else (lambda: A @ W)
    benchmark.pedantic(fn, **ROUNDS)


@pytest.mark.benchmark(group="8 smallest eigenpairs of LoRA-DA Omega, fp32, batch 8, n=2048 (each provider's default accuracy)")
@pytest.mark.parametrize("provider", ["lorainit", "torch", "scipy"])
def test_smallest_eigenpairs(benchmark, provider):
    Om, _, _ = spectra.guidance((8,), 2048, seed=3)
    Om32 = Om.float()
    k = 8
    if provider == "lorainit":
        # default tol sqrt(eps): a relative residual that puts the objective within ~2e-6 of the optimum
        # (bench/results/lobpcg.md checks it); tol=1e-5 would ask for a 30x smaller residual
        fn = lambda: lk.lobpcg(Om32, k)  # noqa: E731
    elif provider == "torch":
        fn = lambda: torch.linalg.eigh(Om32)  # noqa: E731  (batched dense: all n pairs)
    else:
        import scipy.linalg

        mats = [Om32[i].numpy() for i in range(Om32.shape[0])]
        fn = lambda: [scipy.linalg.eigh(a, subset_by_index=[0, k - 1], driver="evr") for a in mats]  # noqa: E731
    benchmark.pedantic(fn, rounds=3, warmup_rounds=1, iterations=1)
