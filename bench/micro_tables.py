"""``python -m bench.micro_tables [RAW]``: pytest-benchmark's JSON -> ``bench/results/micro.{json,md}``.

One row per (group, provider): the median over rounds and its ratio to the ``lorainit`` provider of
the same group (``> 1``: lorainit is faster), so the docs quote same-run ratios, never a lone time.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Dict, List

from bench.common import RESULTS, write_results

RAW = RESULTS / "micro_raw.json"


def rows_from_raw(raw: Dict) -> List[Dict[str, object]]:
    """Rows ``{op, provider, median_ms, provider / lorainit}`` from pytest-benchmark's ``--benchmark-json``."""
    groups: Dict[str, Dict[str, float]] = {}
    for b in raw.get("benchmarks", []):
        provider = b.get("params", {}).get("provider")
        if provider is None:
            raise ValueError(f"benchmark {b.get('name')!r} has no 'provider' parameter")
        groups.setdefault(b["group"], {})[provider] = float(b["stats"]["median"])
    rows = []
    for group, times in groups.items():
        if "lorainit" not in times:
            raise ValueError(f"benchmark group {group!r} has no 'lorainit' provider: {sorted(times)}")
        for provider, t in sorted(times.items(), key=lambda kv: kv[0] != "lorainit"):
            rows.append({"op": group, "provider": provider, "median_ms": 1e3 * t,
                         "time / lorainit's": t / times["lorainit"]})
    return rows


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    raw_path = Path(argv[0]) if argv else RAW
    rows = rows_from_raw(json.loads(raw_path.read_text()))
    md = write_results("micro", {
        "title": "Microbenchmarks (pytest-benchmark): each op's providers, same run",
        "columns": ["op", "provider", "median_ms", "time / lorainit's"], "rows": rows,
        "notes": ["`time / lorainit's` > 1: lorainit is that many times faster than the provider in the same run "
                  "(`pytest bench/micro --benchmark-only`; medians over rounds)."]})
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
