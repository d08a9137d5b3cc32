"""HRP's extra cost: preheat steps against ordinary LoRA steps, and ``svd_of_product`` against a dense SVD.

HRP (Chen et al. 2025, arXiv 2502.07739) costs ``S`` preheat steps of a rank-``R`` asymmetric LoRA
(A frozen, B trained) plus one factored SVD per layer. Part 1 times one preheat step as
``initialize_lora(method="hrp")`` runs it (forward + backward + AdamW on the trained factors, the
preheat branch added by a forward hook on each LoRA layer; ``timings["preheat"] / steps``) against
one ordinary training step (forward + backward + AdamW over all LoRA parameters) of the final rank
``r`` and of rank ``R`` on a tiny random-weight Llama, same batch, same run. Part 2 times
``lorainit_kernels.linalg.svd_of_product(B, A, k)`` (QR of each factor + R x R core SVD) against
forming ``B @ A`` and calling ``torch.linalg.svd``; ``angle`` is the largest principal angle between
the two top-k right singular subspaces (k = 16), ``S err`` the relative error of the top-k values.
"""
from __future__ import annotations

import os
import warnings

import torch

from bench.common import timeit
from lorainit.models import LLAMA_PROJECTIONS



def _llama(hidden: int, layers: int, r: int, seed: int = 0):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
                      max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=r, lora_alpha=2 * r, target_modules=LLAMA_PROJECTIONS,
                                                           lora_dropout=0.0))


def _batch(bs: int, seq: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 512, (bs, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _lora_step_time(model, batch, repeats: int) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        opt.step()

    return timeit(step, repeats=repeats, warmup=1)["median"]


def _preheat_step_time(hidden, layers, r, R, batch, steps: int) -> float:
    from lorainit.methods.hrp import HRPConfig
    from lorainit.init import initialize_lora

    model = _llama(hidden, layers, r)
    data = [batch] * steps
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        initialize_lora(model, data[:2], method="hrp", config=HRPConfig(rank=R, steps=2, lr=1e-4), progress=False)
        rep = initialize_lora(model, data, method="hrp", config=HRPConfig(rank=R, steps=steps, lr=1e-4),
                              progress=False)
    return rep.timings["preheat"] / steps, rep.timings.get("svd", 0.0)


def _angle(X, Y) -> float:
    s = torch.linalg.svdvals(X.double().mT @ Y.double()).min().clamp(max=1.0)
    return float(torch.acos(s))


def run(quick: bool = False) -> dict:
    from lorainit_kernels.linalg import svd_of_product

    rows = []
    if quick:
        hidden, layers, bs, seq, r, Rs, steps, reps = 64, 2, 4, 32, 8, (32, 64), 8, 5
        shapes = [(256, 256, 32), (256, 1024, 64)]
    else:
        hidden, layers, bs, seq, r, Rs, steps, reps = 256, 4, 8, 128, 8, (64, 128, 256), 10, 5
        shapes = [(1024, 1024, 128), (1024, 4096, 128), (4096, 1024, 256), (4096, 4096, 256)]
    batch = _batch(bs, seq)
    _lora_step_time(_llama(hidden, layers, r), batch, 2)  # process warm-up (first forward/backward is slow)
    for R in Rs:
        t_r = _lora_step_time(_llama(hidden, layers, r), batch, reps)  # re-measured next to each R (load drift)
        rows.append({"part": "train step", "case": f"LoRA step, rank r={r} (reference for R={R})", "time_s": t_r,
                     "ratio": 1.0, "angle": "-", "S err": "-"})
        t_pre, t_svd = _preheat_step_time(hidden, layers, r, R, batch, steps)
        rows.append({"part": "train step", "case": f"HRP preheat step, R={R}", "time_s": t_pre,
                     "ratio": t_pre / t_r, "angle": "-", "S err": "-"})
        t_R = _lora_step_time(_llama(hidden, layers, R), batch, reps)
        rows.append({"part": "train step", "case": f"LoRA step, rank {R}", "time_s": t_R, "ratio": t_R / t_r,
                     "angle": "-", "S err": "-"})
        rows.append({"part": "train step", "case": f"HRP svd_of_product, all layers, R={R}", "time_s": t_svd,
                     "ratio": t_svd / t_r, "angle": "-", "S err": "-"})
    k = 16
    for m, n, R in shapes:
        g = torch.Generator().manual_seed(m + n + R)
        B = torch.randn(m, R, generator=g) / R ** 0.5
        A = torch.linalg.qr(torch.randn(n, R, generator=g)).Q.T.contiguous()
        out = {}
        t_f = timeit(lambda: out.__setitem__("f", svd_of_product(B, A, k)), repeats=5 if m * n <= 1 << 22 else 3)
        dense_reps = 1 if m * n > 1 << 22 else 2
        t_d = timeit(lambda: out.__setitem__("d", torch.linalg.svd(B @ A, full_matrices=False)), repeats=dense_reps,
                     warmup=0 if m * n > 1 << 22 else 1)
        Uf, Sf, Vf = out["f"]
        Ud, Sd, Vhd = out["d"]
        rows.append({"part": "svd", "case": f"{m}x{n}, R={R}: svd_of_product", "time_s": t_f["median"],
                     "ratio": t_f["median"] / t_d["median"], "angle": _angle(Vf, Vhd[:k].mT),
                     "S err": float((Sf - Sd[:k]).norm() / Sd[:k].norm())})
        rows.append({"part": "svd", "case": f"{m}x{n}, R={R}: B@A + torch.linalg.svd", "time_s": t_d["median"],
                     "ratio": 1.0, "angle": 0.0, "S err": 0.0})
    notes = [
        f"CPU, torch threads={torch.get_num_threads()}. Tiny Llama: hidden {hidden}, {layers} layers, 7 LoRA targets "
        f"per layer, batch {bs} x {seq} tokens, fp32, train mode. 'ratio' in the train-step rows is time / "
        f"(LoRA step of rank r={r}, re-measured just before each R); the total HRP overhead is steps x (preheat step) + the svd row.",
        "Preheat step: forward + backward + AdamW on the trained preheat factors, base and user's adapter frozen "
        "(timings['preheat'] / steps of initialize_lora, incl. the tqdm/loss bookkeeping).",
        f"1-minute load average at the end of the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores "
        "(other jobs share the machine: absolute times are noisy, compare ratios within a block).",
        "svd rows: fp32, k=16; 'ratio' = svd_of_product time / dense time; the dense SVD is timed once for the "
        "largest shapes.",
    ]
    return {"title": "HRP: preheat step cost and svd_of_product vs dense SVD",
            "columns": ["part", "case", "time_s", "ratio", "angle", "S err"], "rows": rows, "notes": notes}
