"""Run every benchmark (``make bench``): ``python -m bench.run [--quick] [name ...]``.

Writes JSON and a Markdown table per benchmark under ``bench/results/``.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from pathlib import Path

from bench.common import write_results


def available() -> list:
    here = Path(__file__).resolve().parent
    return sorted(m.name[len("bench_"):] for m in pkgutil.iter_modules([str(here)]) if m.name.startswith("bench_"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default: all of {available()})")
    parser.add_argument("--quick", action="store_true", help="small sizes, for checking that they run")
    args = parser.parse_args(argv)
    names = args.names or available()
    unknown = sorted(set(names) - set(available()))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; available: {available()}")
    for name in names:
        module = importlib.import_module(f"bench.bench_{name}")
        print(f"== {name}", flush=True)
        result = module.run(quick=args.quick)
        md = write_results(name if not args.quick else f"{name}_quick", result)
        print(md.read_text(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
