"""sigma_max(dW) of LoRA-DA's step normalization: the subspace iteration started from ``A`` (now) against the
exact fp64 value and against the full-tolerance LOBPCG per layer it replaced (issue 27).

Rows: SmolLM2-like synthetic statistics (``bench.spectra.kfac_stats``), unstructured random statistics and
the real K-FAC statistics of two SmolLM2-135M layers (14 targets). ``step_change`` is the relative change of
the step ``eta dW A A^T / sigma`` against the exact sigma_max (required < 1e-2). The table is computed by
``bench.bench_lobpcg.step_norm_table``.

``python -m bench.run step_norm`` writes ``bench/results/step_norm.{json,md}``.
"""
from __future__ import annotations

from bench.bench_lobpcg import step_norm_table


def run(quick: bool = False) -> dict:
    return step_norm_table(quick, real=not quick)
