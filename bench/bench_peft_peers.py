"""The whole init of EVA, LoRA-GA and CorDA on SmolLM2-135M: lorainit against PEFT's own implementations.

Same run, same machine, same base weights and samples: LoRA r=8 (alpha 16) on the 7 Llama
projections of every layer (``--layers`` restricts them), ``samples`` sequences of ``seq`` tokens
(arithmetic problems concatenated, loss on every token), fp32, CPU. Each provider starts from a
fresh copy of the base model; the timed region is everything a user runs to get the initialized
model, after the base is loaded:

* EVA, rho = 1: PEFT ``get_peft_model(init_lora_weights="eva")`` + ``initialize_lora_eva_weights``
  (incremental PCA, cycling the dataloader until every layer's components converge, ``tau`` = 0.99),
  batches of 8; lorainit ``get_peft_model`` + ``initialize_lora(method="eva")`` (one statistics pass).
  PEFT's run is capped at ``--peft-max-passes`` passes over the data; a capped run is reported as a
  lower bound (``>``).
* LoRA-GA: PEFT ``preprocess_loraga`` (gradients of the mean loss, batches of 8) + ``get_peft_model
  (init_lora_weights="lora_ga")``; lorainit ``get_peft_model`` + ``initialize_lora(method="lora_ga")``.
* CorDA, IPM: PEFT ``preprocess_corda`` (its hook takes one sequence per forward) + ``get_peft_model
  (init_lora_weights="corda")``; lorainit ``get_peft_model`` + ``initialize_lora(method="corda")``, batches of 8.

``python -m bench.bench_peft_peers [--quick] [--samples 256] [--seq 64] [--layers 0,1] [--peft-max-passes 20]``
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings

import torch

from lorainit.models import LLAMA_PROJECTIONS


class _Capped:
    """A dataloader (list of batches) that raises after ``limit`` batches: bounds PEFT's EVA cycling."""

    class Stop(Exception):
        pass

    def __init__(self, batches, limit):
        self.batches, self.limit, self.seen = batches, limit, 0

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for b in self.batches:
            self.seen += 1
            if self.seen > self.limit:
                raise _Capped.Stop()
            yield b


def _batches(tok, n, seq, bs):
    from bench.bench_init_overhead_smollm2 import _batches as make

    return make(tok, n, seq, bs)


def _load_note(load_start: float) -> str:
    """The 1-minute load average at the start and end of the run, and what it says about other jobs."""
    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    cores = os.cpu_count() or 1
    # the run itself keeps about its torch thread count busy: well above that, other jobs shared the cores
    shared = max(load_start, load_end) > max(cores, torch.get_num_threads()) + 0.5
    return (f"1-minute load average at the start / end of the run: {load_start:.1f} / {load_end:.1f} on {cores} cores "
            + ("(well above the run's own threads: other jobs shared the CPU)." if shared else "(about the run's "
               "own threads: it had the CPU to itself)."))


def run(quick: bool = False, samples: int = 256, seq: int = 64, layers=None, peft_max_passes: int = 20) -> dict:
    from peft import EvaConfig, LoraConfig, get_peft_model
    from peft.tuners.lora import LoraGAConfig, initialize_lora_eva_weights, preprocess_loraga
    from peft.tuners.lora.config import CordaConfig

    from lorainit import CorDAConfig, EVAConfig, LoRAGAConfig, initialize_lora
    from lorainit.models import load_smollm2

    warnings.filterwarnings("ignore")
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    if quick:
        samples, seq, layers = min(samples, 16), min(seq, 32), layers or [0]
    base, tok = load_smollm2(torch.float32)
    base.eval()
    batches = _batches(tok, samples, seq, 8)
    lora = dict(r=8, lora_alpha=16, target_modules=LLAMA_PROJECTIONS, lora_dropout=0.0)
    if layers:
        lora.update(layers_to_transform=list(layers), layers_pattern="layers")
    torch.manual_seed(0)
    # process warm-up (thread pools, allocator, first-call dispatch) outside every timed region: the
    # provider timed first would pay it alone
    warm = copy.deepcopy(base)
    warm(**batches[0]).loss.backward()
    del warm

    def ours(method, config):
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        pm = get_peft_model(model, LoraConfig(**lora))
        initialize_lora(pm, batches, method=method, config=config, num_samples=None, progress=False)
        return time.perf_counter() - t0, ""

    def peft_eva():
        model = copy.deepcopy(base)
        loader = _Capped(batches, peft_max_passes * len(batches))
        t0 = time.perf_counter()
        pm = get_peft_model(model, LoraConfig(**lora, init_lora_weights="eva", eva_config=EvaConfig(rho=1.0)))
        try:
            initialize_lora_eva_weights(pm, loader, show_progress_bar=False)
            note = f"{loader.seen} batches ({loader.seen / len(batches):.1f} passes)"
            return time.perf_counter() - t0, note
        except _Capped.Stop:
            return -(time.perf_counter() - t0), f"not converged after {peft_max_passes} passes (lower bound)"

    def peft_loraga():
        model = copy.deepcopy(base)
        cfg = LoraConfig(**lora, init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig())
        t0 = time.perf_counter()

        def step():
            for b in batches:
                model(**b).loss.backward()
        preprocess_loraga(model, cfg, step)
        get_peft_model(model, cfg)
        return time.perf_counter() - t0, ""

    def peft_corda():
        from peft.tuners.lora.corda import preprocess_corda

        model = copy.deepcopy(base)
        cfg = LoraConfig(**lora, init_lora_weights="corda", corda_config=CordaConfig(corda_method="ipm"))
        t0 = time.perf_counter()

        def run_model():
            with torch.no_grad():
                for b in batches:
                    for i in range(b["input_ids"].shape[0]):  # PEFT's hook takes one sequence per forward
                        model(input_ids=b["input_ids"][i:i + 1])
        preprocess_corda(model, cfg, run_model=run_model)
        get_peft_model(model, cfg)
        return time.perf_counter() - t0, ""

    pairs = [("EVA (rho=1)", lambda: ours("eva", EVAConfig(token_mask="attention")), peft_eva),
             ("LoRA-GA", lambda: ours("lora_ga", LoRAGAConfig()), peft_loraga),
             ("CorDA (IPM)", lambda: ours("corda", CorDAConfig()), peft_corda)]
    rows = []
    for name, mine, theirs in pairs:
        t_ours, _ = mine()
        try:
            t_peft, note = theirs()
        except Exception as err:  # a peer that fails is a result too
            rows.append({"method": name, "lorainit s": t_ours, "PEFT s": "failed", "speedup": "",
                         "PEFT note": f"{type(err).__name__}: {str(err)[:80]}"})
            continue
        lower = t_peft < 0
        t_peft = abs(t_peft)
        rows.append({"method": name, "lorainit s": t_ours, "PEFT s": (">" if lower else "") + f"{t_peft:.1f}",
                     "speedup": (">" if lower else "") + f"{t_peft / t_ours:.2f}x", "PEFT note": note})
    n_layers = len(layers) if layers else base.config.num_hidden_layers
    return {
        "title": f"Whole init on SmolLM2-135M, lorainit vs PEFT {__import__('peft').__version__} "
                 f"({samples} x {seq} tokens, r=8, 7 projections x {n_layers} layers, fp32, CPU)",
        "columns": ["method", "lorainit s", "PEFT s", "speedup", "PEFT note"],
        "rows": rows,
        "notes": [
            "Same run, same base weights and samples; each provider starts from a fresh copy of the loaded base, after an untimed warm-up forward+backward of the process. "
            "Timed: get_peft_model + the method's own calls (PEFT: initialize_lora_eva_weights, preprocess_loraga, "
            "preprocess_corda with one sequence per forward as its hook requires; lorainit: initialize_lora).",
            "speedup = PEFT s / lorainit s. Absolute CPU seconds only mean something on this machine; the "
            "ratio is the result.",
            _load_note(load_start),
        ],
        "config": {"samples": samples, "seq": seq, "layers": layers, "peft_max_passes": peft_max_passes},
    }


def main(argv=None) -> int:
    from bench.common import write_results

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--layers", default=None, help="comma-separated decoder layers (default: all 30)")
    p.add_argument("--peft-max-passes", type=int, default=20)
    p.add_argument("--name", default="peft_peers", help="results file name under bench/results/")
    a = p.parse_args(argv)
    layers = [int(x) for x in a.layers.split(",")] if a.layers else None
    res = run(quick=a.quick, samples=a.samples, seq=a.seq, layers=layers, peft_max_passes=a.peft_max_passes)
    print(write_results(a.name, res).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
