"""``python -m bench.experiments [name ...]``: the papers' claims at small scale.

* ``rank_sweep``: LoRA-DA vs baselines over r in {1, 2, 4, 8, 16} on digits (LoRA-DA Fig. 4).
* ``ablations``: LoRA-DA Table 6 rows (w/o bias, w/o var, w/o var and fisher, full) and
  LoRA-DA-FA against LoRA-FA (Table 3's shape).
* ``hrp_sensing``: HRP's matrix-sensing curves (Theorems 3.1, 3.5, 4.1).
* ``hrp_digits``: HRP against random init for classic and asymmetric (frozen-A) LoRA on digits.
* ``smollm2_gsm``: the headline, learning-rate fair: SmolLM2-135M LoRA-fine-tuned on generated
  arithmetic word problems from every registry init, each at its own rate chosen on a validation
  split (+ LoRA-DA's Table 6 ablations, the rank sweep r = 1, 2, 4, 8 and the suggested rates)
  (:mod:`bench.experiments.smollm2_gsm`; resumable; several hours on 2 cores). The digits
  experiments take minutes.

Each writes ``bench/experiments/results/<name>.md`` (and a PNG where a curve says more).
"""
from __future__ import annotations

import argparse
import sys
import time

from . import digits_experiments, hrp_sensing, smollm2_gsm

EXPERIMENTS = {
    "rank_sweep": digits_experiments.rank_sweep,
    "ablations": digits_experiments.ablations,
    "hrp_digits": digits_experiments.hrp_digits,
    "hrp_sensing": hrp_sensing.run,
    "smollm2_gsm": smollm2_gsm.run,
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.experiments", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", choices=[[]] + list(EXPERIMENTS), help="default: all")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args(argv)
    for name in args.names or list(EXPERIMENTS):
        start = time.perf_counter()
        print(f"== {name}", flush=True)
        path = EXPERIMENTS[name](seeds=args.seeds)
        print(path.read_text())
        print(f"({time.perf_counter() - start:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
