"""Tiny models (random weights, built from configs) and float64 brute-force references for the tests."""
from __future__ import annotations

import copy
import socket
import warnings
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from lorainit.models import LLAMA_PROJECTIONS

warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
warnings.filterwarnings("ignore", message=".*bos_token_id.*|.*eos_token_id.*")

VOCAB, SEQ = 97, 16
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]


def tiny_llama(seed: int = 0, r: int = 4, alpha: float = 8, rslora: bool = False, dtype=torch.float32, **lora_kw):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg).to(dtype)
    lc = LoraConfig(r=r, lora_alpha=alpha, target_modules=LLAMA_PROJECTIONS, use_rslora=rslora, lora_dropout=0.1, **lora_kw)
    return get_peft_model(model, lc)


def tiny_gpt2(seed: int = 0, r: int = 4, alpha: float = 8, rslora: bool = False):
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
                     eos_token_id=2, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    model = GPT2LMHeadModel(cfg)
    lc = LoraConfig(r=r, lora_alpha=alpha, target_modules=GPT2_TARGETS, use_rslora=rslora, fan_in_fan_out=True)
    return get_peft_model(model, lc)


class MLP(nn.Module):
    def __init__(self, d_in=12, hidden=24, d_out=5):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def tiny_mlp(seed: int = 0, r: int = 3, alpha: float = 6):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(MLP(), LoraConfig(r=r, lora_alpha=alpha, target_modules=["fc1", "fc2", "head"]))


def mlp_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="sum")


def mlp_batches(n=48, bs=8, seed=1, d_in=12, d_out=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    y = torch.randint(0, d_out, (n,), generator=g)
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, n, bs)]


def lm_batches(n=24, bs=4, seed=1, pad_every=2, labels=False):
    """Batches of random tokens with right padding in every ``pad_every``-th row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, SEQ), generator=g)
    am = torch.ones_like(ids)
    lengths = torch.randint(SEQ // 2, SEQ, (n,), generator=g)
    for i in range(0, n, pad_every):
        am[i, lengths[i]:] = 0
    ids = ids.masked_fill(am == 0, 0)
    out = []
    for i in range(0, n, bs):
        b = {"input_ids": ids[i:i + bs], "attention_mask": am[i:i + bs]}
        if labels:
            b["labels"] = ids[i:i + bs].masked_fill(am[i:i + bs] == 0, -100)
        out.append(b)
    return out


def brute_stats(model, batches, *, kind="lm", mask_mode="attention", loss_fn=None) -> Dict[str, dict]:
    """Per-token float64 statistics of every LoRA target, computed the slow, obvious way.

    A float64 copy of the model with the adapters disabled; the summed loss written out by hand
    (causal-LM cross-entropy over shifted labels != -100, summed); per-token inputs and output
    gradients (``retain_grad``) gathered and masked; then Z = X^T X / T, G = Gr^T X / T, s = mean g^2.
    """
    from peft.tuners.lora import LoraLayer

    m64 = copy.deepcopy(model).double().eval()
    for p in m64.parameters():
        p.requires_grad_(True)
    layers = {n: mod for n, mod in m64.named_modules() if isinstance(mod, LoraLayer)}
    for mod in layers.values():
        mod._disable_adapters = True
    calls: Dict[str, List] = {n: [] for n in layers}
    handles = []
    for n, mod in layers.items():
        def hook(module, inp, out, n=n):
            out.retain_grad()
            calls[n].append((inp[0], out))
        handles.append(mod.get_base_layer().register_forward_hook(hook))
    rows = {n: ([], []) for n in layers}
    for batch in batches:
        for c in calls.values():
            c.clear()
        if kind == "lm":
            ids, am = batch["input_ids"], batch["attention_mask"]
            labels = batch.get("labels", ids.masked_fill(am == 0, -100))
            logits = m64(input_ids=ids, attention_mask=am).logits
            tgt = labels[:, 1:]
            lp = torch.log_softmax(logits[:, :-1], -1)
            keep = tgt != -100
            loss = -(lp.gather(-1, tgt.clamp_min(0)[..., None])[..., 0] * keep).sum()
            if mask_mode == "attention":
                mask = am.bool()
            else:
                mask = torch.zeros_like(am, dtype=torch.bool)
                mask[:, :-1] = keep
        else:
            x64 = (batch[0].double(), batch[1])
            loss = loss_fn(m64, x64)
            mask = None
        loss.backward()
        for n, cs in calls.items():
            for x, y in cs:
                xs, gs = x.detach(), y.grad.detach()
                if mask is not None:
                    xs, gs = xs[mask], gs[mask]
                rows[n][0].append(xs.reshape(-1, xs.shape[-1]))
                rows[n][1].append(gs.reshape(-1, gs.shape[-1]))
    for h in handles:
        h.remove()
    out = {}
    for n, (xs, gs) in rows.items():
        X, Gr = torch.cat(xs), torch.cat(gs)
        T = X.shape[0]
        out[n] = {"Z": X.T @ X / T, "G": Gr.T @ X / T, "s": (Gr * Gr).sum(0) / T, "count": T}
    return out


def model_state(model):
    """Everything an error must leave untouched: values, requires_grad, grads, modes, hooks."""
    hooks = []
    for mod in model.modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                     "_forward_hooks_with_kwargs"):
            hooks.append(tuple(getattr(mod, attr, {}).keys()))
    return {
        "values": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "modes": [m.training for m in model.modules()],
        "hooks": hooks,
        "disabled": [getattr(m, "_disable_adapters", None) for m in model.modules()],
    }


def assert_same_state(a, b):
    assert a["values"].keys() == b["values"].keys()
    for k in a["values"]:
        assert torch.equal(a["values"][k], b["values"][k]), f"value of {k} changed"
    assert a["requires_grad"] == b["requires_grad"]
    for k in a["grads"]:
        ga, gb = a["grads"][k], b["grads"][k]
        assert (ga is None) == (gb is None) and (ga is None or torch.equal(ga, gb)), f"grad of {k} changed"
    assert a["modes"] == b["modes"]
    assert a["hooks"] == b["hooks"]
    assert a["disabled"] == b["disabled"]


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
