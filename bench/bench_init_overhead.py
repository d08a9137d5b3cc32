"""Init overhead of LoRA-DA: the whole ``initialize_lora`` call against a plain forward+backward.

The baseline is what a gradient-based init (LoRA-GA, LoRA-One) must at least pay: one forward and
backward over the same samples with every target base weight requiring its gradient (all other
parameters frozen, eval mode). Target (issue 4): ratio <= 1.5, goal 1.2, on a CPU tiny Llama
(hidden 256, 4 layers, 256 samples of 128 tokens, batch 8, LoRA r=8 on all seven projections).
The breakdown comes from the report's timings: statistics pass (forward/backward with hooks),
the K-FAC kernels inside it, the batched LoRA-DA solves, the step-size search and the writes.
"""
from __future__ import annotations

import warnings

import torch

from bench.common import plain_forward_backward, timeit
from lorainit.models import LLAMA_PROJECTIONS



def _model(hidden: int, layers: int, vocab: int, seed: int = 0):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 8 * 8,
                      num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                      num_key_value_heads=max(1, hidden // 64), max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=LLAMA_PROJECTIONS, lora_dropout=0.0))


def _batches(n: int, seq: int, bs: int, vocab: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, seq), generator=g)
    am = torch.ones_like(ids)
    lengths = torch.randint(seq // 2, seq + 1, (n,), generator=g)
    for i in range(n):
        am[i, lengths[i]:] = 0
    return [{"input_ids": ids[i:i + bs], "attention_mask": am[i:i + bs],
             "labels": ids[i:i + bs].masked_fill(am[i:i + bs] == 0, -100)} for i in range(0, n, bs)]


def run(quick: bool = False) -> dict:
    from lorainit.methods.lora_da import LoRADAConfig
    from lorainit.init import initialize_lora
    from lorainit.targets import find_targets

    warnings.filterwarnings("ignore")
    if quick:
        hidden, layers, n, seq, bs, vocab, repeats = 64, 2, 32, 32, 8, 256, 2
    else:
        hidden, layers, n, seq, bs, vocab, repeats = 256, 4, 256, 128, 8, 1024, 3
    model = _model(hidden, layers, vocab)
    batches = _batches(n, seq, bs, vocab)
    targets = find_targets(model)
    base = timeit(lambda: plain_forward_backward(model, batches, [t.weight for t in targets.values()]),
                  repeats=repeats, warmup=1)

    rows = []
    configs = {
        "lora_da, step_scale=0.1": LoRADAConfig(step_scale=0.1),
        "lora_da, step_scale=auto (default)": LoRADAConfig(),
    }
    for label, cfg in configs.items():
        reports = []

        def call():
            reports.append(initialize_lora(model, batches, config=cfg, num_samples=n, progress=False))

        t = timeit(call, repeats=repeats, warmup=1)
        rep = reports[-1]
        tm = rep.timings
        rows.append({
            "config": label,
            "ratio": t["median"] / base["median"],
            "init s": t["median"],
            "fwd+bwd s": base["median"],
            "stats pass s": tm.get("stats_pass", 0.0),
            "kernels s": tm.get("stats_kernels", 0.0),
            "solve s": tm.get("solve", 0.0),
            "step search s": tm.get("step_search", 0.0),
            "write s": tm.get("write", 0.0),
        })
    notes = [
        f"Model: Llama hidden {hidden}, {layers} layers, vocab {vocab}, LoRA r=8 on {len(LLAMA_PROJECTIONS)} projections "
        f"({len(targets)} layers); {n} samples x {seq} tokens (right padding), batch {bs}; CPU, "
        f"{torch.get_num_threads()} threads. ratio = initialize_lora / (forward+backward with target weights "
        f"requiring grad). Target <= 1.5, goal 1.2.",
        "stats pass = forward+backward with hooks (parameters frozen, no weight-gradient GEMMs) including the "
        "K-FAC kernels (Z, G, s); the 'auto' step search costs 8 forward passes over the held-out 1/8 of the samples.",
    ]
    return {"title": "LoRA-DA init overhead (CPU)",
            "columns": ["config", "ratio", "init s", "fwd+bwd s", "stats pass s", "kernels s", "solve s",
                        "step search s", "write s"],
            "rows": rows, "notes": notes}
