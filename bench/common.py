"""Shared benchmark plumbing: timing with medians and quantiles, machine info, JSON + Markdown output.

Every benchmark script ``bench/bench_<name>.py`` defines ``run(quick: bool) -> dict`` returning
``{"title": str, "columns": [...], "rows": [dict, ...], "notes": [str, ...]}``; ``bench/run.py``
calls them all and writes ``bench/results/<name>.json`` and ``.md``. Ratios are measured in the
same run on the same machine; absolute CPU times are recorded but only ratios are quoted.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

RESULTS = Path(__file__).resolve().parent / "results"


def timeit(fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1, min_time: float = 0.0) -> Dict[str, float]:
    """Run ``fn`` ``warmup`` times, then at least ``repeats`` times (and ``min_time`` seconds).

    Returns median and 25/75% quantiles of the wall time in seconds.
    """
    for _ in range(warmup):
        fn()
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return summarize(times)


def plain_forward_backward(model, batches, weights) -> None:
    """The init-overhead baseline: forward + backward of the summed loss over ``batches`` with only
    ``weights`` (the target layers' base weights) requiring grad, eval mode. Afterwards the model's
    ``requires_grad`` flags and training mode are restored and the weights' gradients dropped."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    was_training = model.training
    model.eval()
    try:
        for b in batches:
            out = model(**b)
            n = int(b["labels"][:, 1:].ne(-100).sum())
            (out.loss * n).backward()
        for w in weights:
            w.grad = None
    finally:
        for p, rg in saved:
            p.requires_grad_(rg)
        model.train(was_training)


def summarize(times: List[float]) -> Dict[str, float]:
    """Median and 25/75% quantiles of a list of times."""
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {"median": statistics.median(times), "q25": q[0], "q75": q[2], "n": len(times)}


# An untimed pause before each timed sample in interleaved rounds: OpenBLAS (scipy) and OpenMP
# worker threads spin for a while after a call and would steal the 2 cores from the next provider.
SETTLE_S = 0.3


def _one_call(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved_times(providers: Dict[str, Callable[[], object]], rounds: int, *,
                      sample: Optional[Callable[[Callable[[], object]], float]] = None,
                      settle_s: float = 0.0) -> Dict[str, List[float]]:
    """Seconds per provider over ``rounds`` rounds, every provider sampled once per round, so that
    machine noise hits all of them alike. ``sample(fn)`` gives one sample (default: one timed call);
    ``settle_s`` is an untimed pause before each sample."""
    times: Dict[str, List[float]] = {name: [] for name in providers}
    for _ in range(rounds):
        for name, fn in providers.items():
            if settle_s:
                time.sleep(settle_s)
            times[name].append((sample or _one_call)(fn))
    return times


def median_ratio(num: List[float], den: List[float]) -> float:
    """Median over rounds of the per-round ratio ``num / den`` (a same-run speedup)."""
    return statistics.median(a / b for a, b in zip(num, den))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> Dict[str, object]:
    import torch

    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d"),
    }
    try:
        import scipy

        info["scipy"] = scipy.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _fmt(v) -> str:
    if isinstance(v, float):
        if v == 0 or 1e-3 <= abs(v) < 1e4:
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.1f}"
        return f"{v:.2e}"
    return str(v)


def to_markdown(result: Dict[str, object], info: Dict[str, object]) -> str:
    cols = result["columns"]
    lines = [f"### {result['title']}", "",
             f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, {info['date']}", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in result["rows"]:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in cols) + " |")
    for note in result.get("notes", []):
        lines += ["", note]
    for table in result.get("tables", []):  # further tables: {"title", "columns", "rows", "notes"}
        tc = table["columns"]
        lines += ["", f"### {table['title']}", "", "| " + " | ".join(tc) + " |", "|" + "---|" * len(tc)]
        lines += ["| " + " | ".join(_fmt(row.get(c, "")) for c in tc) + " |" for row in table["rows"]]
        for note in table.get("notes", []):
            lines += ["", note]
    return "\n".join(lines) + "\n"


def write_results(name: str, result: Dict[str, object]) -> Path:
    """Write ``bench/results/<name>.json`` and ``<name>.md``; returns the Markdown path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    (RESULTS / f"{name}.json").write_text(json.dumps({"machine": info, **result}, indent=2, default=str))
    md = RESULTS / f"{name}.md"
    md.write_text(to_markdown(result, info))
    return md
