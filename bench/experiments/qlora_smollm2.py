"""Every registered init on a 4-bit (nf4, QLoRA) SmolLM2-135M against the same init on the fp32 model.

``python -m bench.experiments.qlora_smollm2 [--layers 0,1,2,3] [--samples 32] [--heldout 32]`` writes
``bench/experiments/results/qlora_smollm2.{json,md}``: per method, the held-out loss right after
init (answer tokens of generated arithmetic problems, :func:`lorainit.examples.arithmetic.answer_loss`)
on the fp32 model and on its nf4 copy (bitsandbytes ``Linear4bit``, block size 64, double
quantization: :func:`lorainit.quant.quantize_linears`, every linear layer but ``lm_head``), and for
inits that rewrite the base weight the residual's re-quantization error (``requant_error``, max and
mean over layers) and how far the effective weight at init is from the original nf4 weight
(``init_weight_error``, max). LoRA r=8 / alpha=16 on the 7 projections of ``--layers``; the
data-aware inits see ``--samples`` problems. The results are written after every method.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import List, Optional

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def _config(name: str):
    from lorainit import HRPConfig

    if name == "hrp":  # a short preheat, as in the SmolLM2 demo
        return HRPConfig(rank=32, steps=8, lr=5e-4, seed=0)
    return None


def run(methods: Optional[List[str]] = None, *, layers=(0, 1, 2, 3), samples: int = 32, heldout: int = 32,
        rank: int = 8, out: Path = RESULTS, quantize: str = "nf4") -> Path:
    from peft import LoraConfig, get_peft_model

    import lorainit
    from lorainit.examples import arithmetic as ar
    from lorainit.models import LLAMA_PROJECTIONS, load_smollm2
    from lorainit.quant import quantize_linears

    fp32, tok = load_smollm2(torch.float32)
    q = quantize_linears(copy.deepcopy(fp32), quantize)
    train, test = ar.split_problems(samples, heldout, seed=11)
    loader = ar.make_loader(train, tok, batch_size=8)
    held = list(ar.make_loader(test, tok, batch_size=16))
    cfg = dict(r=rank, lora_alpha=2 * rank, target_modules=LLAMA_PROJECTIONS, lora_dropout=0.0,
               layers_to_transform=list(layers), layers_pattern="layers")
    names = methods or [m["name"] for m in lorainit.methods()]
    meta = {"model": "SmolLM2-135M-Instruct", "quantize": quantize, "layers": list(layers), "rank": rank,
            "samples": samples, "heldout": heldout, "torch": torch.__version__, "machine": platform.processor() or
            platform.machine(), "threads": torch.get_num_threads(), "started": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                              time.gmtime())}
    import bitsandbytes
    import peft

    meta.update(bitsandbytes=bitsandbytes.__version__, peft=peft.__version__)
    base = {"fp32": ar.answer_loss(get_peft_model(copy.deepcopy(fp32), LoraConfig(**cfg)), held),
            quantize: ar.answer_loss(get_peft_model(copy.deepcopy(q), LoraConfig(**cfg)), held)}
    rows = []
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        row = {"method": name}
        for label, model0 in (("fp32", fp32), (quantize, q)):
            torch.manual_seed(0)
            model = get_peft_model(copy.deepcopy(model0), LoraConfig(**cfg))
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                report = lorainit.initialize_lora(model, loader, method=name, config=_config(name),
                                                  num_samples=samples, progress=False)
            row[f"{label} init s"] = time.perf_counter() - t0
            row[f"{label} loss"] = ar.answer_loss(model, held)
            row["base_modified"] = report.info["base_modified"]
            if label == quantize and report.info["base_modified"]:
                errs = [r["requant_error"] for r in report.layers]
                row["requant_error max"] = max(errs)
                row["requant_error mean"] = sum(errs) / len(errs)
                row["init_weight_error max"] = max(r["init_weight_error"] for r in report.layers)
            del model
        print(f"{name}: fp32 {row['fp32 loss']:.4g}, {quantize} {row[quantize + ' loss']:.4g}", flush=True)
        rows.append(row)
        _write(out, meta, base, rows, quantize)
    return out / "qlora_smollm2.md"


def _write(out: Path, meta: dict, base: dict, rows: list, quantize: str) -> None:
    (out / "qlora_smollm2.json").write_text(json.dumps({"meta": meta, "base_loss": base, "rows": rows}, indent=1))
    lines = [f"SmolLM2-135M-Instruct, LoRA r={meta['rank']} on the 7 projections of layers {meta['layers']}; "
             f"{meta['samples']} statistics samples, held-out loss on {meta['heldout']} other problems "
             f"(answer tokens). {quantize}: bitsandbytes {meta['bitsandbytes']} Linear4bit, block 64, double "
             f"quantization, every linear layer but lm_head. {meta['machine']}, {meta['threads']} threads, "
             f"{meta['started']}.", "",
             f"Base model, no adapter update: fp32 {base['fp32']:.4f}, {quantize} {base[quantize]:.4f}.", "",
             f"| method | fp32 loss | {quantize} loss | {quantize} - fp32 | rewrites W | requant error max | "
             f"requant error mean | init weight error max |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        q = r[f"{quantize} loss"]
        extra = [f"{r[k]:.3f}" if k in r else "" for k in ("requant_error max", "requant_error mean",
                                                           "init_weight_error max")]
        lines.append(f"| {r['method']} | {r['fp32 loss']:.4f} | {q:.4f} | {q - r['fp32 loss']:+.4f} | "
                     f"{'yes' if r['base_modified'] else 'no'} | " + " | ".join(extra) + " |")
    lines += ["", "requant error: ||deq(Q(W_res)) - W_res|| / ||W_res|| of the residual base weight W_res; init "
              "weight error: ||deq(Q(W_res)) + scaling B A - deq(Q)|| / ||deq(Q)||, the effective weight at init "
              "against the original 4-bit weight (0 would be an exactly preserved output)."]
    (out / "qlora_smollm2.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.experiments.qlora_smollm2", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=None, help="comma-separated (default: every registered method)")
    p.add_argument("--layers", default="0,1,2,3", help="decoder layers with LoRA (default: %(default)s)")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--heldout", type=int, default=32)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--quantize", default="nf4", choices=["nf4", "fp4", "int8"])
    a = p.parse_args(argv)
    path = run(a.methods.split(",") if a.methods else None, layers=[int(x) for x in a.layers.split(",")],
               samples=a.samples, heldout=a.heldout, rank=a.rank, quantize=a.quantize)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
