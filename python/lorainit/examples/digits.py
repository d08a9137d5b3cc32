"""The LoRA-DA paper's Appendix E task at small scale, on scikit-learn's bundled digits (8x8).

An MLP is pretrained on the odd digits, then LoRA-fine-tuned on the even digits from each
initialization, with the same seeds, data order and optimizer for every init. Everything ships
with scikit-learn; nothing is downloaded. Used by ``make demo`` (:mod:`lorainit.examples.digits_demo`) and by the
experiments under ``bench/experiments``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

EVEN = (0, 2, 4, 6, 8)
ODD = (1, 3, 5, 7, 9)
TARGET_MODULES = ("fc1", "fc2", "head")


class DigitsMLP(nn.Module):
    """64 -> hidden -> hidden -> 10 classifier with named layers LoRA can target."""

    def __init__(self, hidden: int = 128):
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.gelu(self.fc2(F.gelu(self.fc1(x)))))


@dataclass
class DigitsTask:
    """Standardized features and labels: ``pre_*`` (odd digits), ``train_*``/``test_*`` (even digits)."""

    pre_x: torch.Tensor
    pre_y: torch.Tensor
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def load_task(split_seed: int = 0, test_fraction: float = 0.3) -> DigitsTask:
    """Digits split into an odd-digit pretraining set and an even-digit train/test split (stratified)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    features, labels = load_digits(return_X_y=True)
    x = torch.tensor(features, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1.0)  # +1: some pixels are constant
    y = torch.tensor(labels, dtype=torch.long)
    odd = torch.isin(y, torch.tensor(ODD))
    even_x, even_y = x[~odd].numpy(), y[~odd].numpy()
    tr_x, te_x, tr_y, te_y = train_test_split(even_x, even_y, test_size=test_fraction,
                                              random_state=split_seed, stratify=even_y)
    return DigitsTask(x[odd], y[odd], torch.tensor(tr_x), torch.tensor(tr_y), torch.tensor(te_x), torch.tensor(te_y))


def summed_ce(model: nn.Module, batch) -> torch.Tensor:
    """Summed cross-entropy of one ``(x, y)`` batch: the loss convention of docs/math.md."""
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="sum")


def pretrain(task: DigitsTask, *, hidden: int = 128, steps: int = 400, seed: int = 0) -> DigitsMLP:
    """Pretrain the MLP on the odd digits (Adam, full batch)."""
    torch.manual_seed(seed)
    model = DigitsMLP(hidden)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(task.pre_x), task.pre_y).backward()
        opt.step()
    return model.eval()


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int):
    """A DataLoader over ``(x, y)`` with a seeded shuffle (same order for every init)."""
    gen = torch.Generator().manual_seed(seed)
    ds = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, generator=gen)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(-1) == y).float().mean())


@torch.no_grad()
def mean_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float(F.cross_entropy(model(x), y))


@dataclass
class RunResult:
    method: str
    seed: int
    init_seconds: float
    losses: List[float] = field(default_factory=list)  # full-train-set loss ...
    loss_steps: List[int] = field(default_factory=list)  # ... before these optimizer steps (last: after the end)
    test_accuracy: float = math.nan

    def loss_at(self, step: int) -> float:
        """The recorded loss at the latest recorded step <= ``step``."""
        i = max(j for j, s in enumerate(self.loss_steps) if s <= step) if self.loss_steps[0] <= step else 0
        return self.losses[i]


def finetune(
    base: DigitsMLP,
    task: DigitsTask,
    method: str,
    *,
    rank: int = 4,
    alpha: Optional[float] = None,
    steps: int = 300,
    lr: float = 2e-3,
    batch_size: int = 32,
    seed: int = 0,
    config=None,
    num_samples: int = 256,
    freeze_A: bool = False,
    eval_every: int = 1,
    target_modules: Sequence[str] = TARGET_MODULES,
    train_head: bool = False,
) -> RunResult:
    """LoRA-fine-tune a copy of ``base`` on the even digits after ``initialize_lora(method)``.

    The adapter targets every linear layer (``fc1``, ``fc2``, ``head``); AdamW at a constant
    learning rate; the training loss over the whole even-digit train set is recorded every
    ``eval_every`` steps. ``freeze_A`` trains only ``lora_B`` (LoRA-FA / LoRA-DA-FA).
    ``train_head`` trains the 10-way head fully (PEFT ``modules_to_save``), for ranks above 10 where
    the head cannot take an adapter; pass ``target_modules=("fc1", "fc2")`` with it.
    """
    import copy

    from peft import LoraConfig, get_peft_model

    from ..init import initialize_lora

    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base),
                           LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank,
                                      target_modules=list(target_modules), lora_dropout=0.0,
                                      modules_to_save=["head"] if train_head else None))
    loader = batches(task.train_x, task.train_y, batch_size, seed)
    start = time.perf_counter()
    initialize_lora(model, loader, method=method, config=config, num_samples=num_samples,
                    loss_fn=summed_ce, progress=False)
    init_seconds = time.perf_counter() - start
    if freeze_A:
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    result = RunResult(method, seed, init_seconds)
    gen = torch.Generator().manual_seed(seed + 1)
    model.train()
    step = 0
    while step < steps:
        for x, y in batches(task.train_x, task.train_y, batch_size, int(torch.randint(1 << 30, (1,), generator=gen))):
            if step % eval_every == 0:
                result.losses.append(mean_loss(model, task.train_x, task.train_y))
                result.loss_steps.append(step)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            step += 1
            if step == steps:
                break
    result.losses.append(mean_loss(model, task.train_x, task.train_y))
    result.loss_steps.append(step)
    result.test_accuracy = accuracy(model.eval(), task.test_x, task.test_y)
    return result


def compare(
    methods: Sequence[str],
    *,
    seeds: Sequence[int] = (0, 1, 2),
    rank: int = 4,
    steps: int = 300,
    configs: Optional[Dict[str, object]] = None,
    freeze_A: bool = False,
    progress: bool = True,
    task: Optional[DigitsTask] = None,
    base: Optional[DigitsMLP] = None,
    **finetune_kwargs,
) -> Dict[str, List[RunResult]]:
    """Fine-tune from every init in ``methods`` over ``seeds``; one pretrained base shared by all."""
    from tqdm.auto import tqdm

    task = task or load_task()
    base = base or pretrain(task)
    configs = configs or {}
    runs = [(m, s) for m in methods for s in seeds]
    results: Dict[str, List[RunResult]] = {m: [] for m in methods}
    for method, seed in tqdm(runs, desc="digits fine-tuning", disable=not progress):
        results[method].append(finetune(base, task, method.split(":")[0], rank=rank, steps=steps, seed=seed,
                                        config=configs.get(method), freeze_A=freeze_A, **finetune_kwargs))
        results[method][-1].method = method
    return results


def summarize(results: Dict[str, List[RunResult]], checkpoints: Sequence[int] = (10, 100)) -> List[dict]:
    """One row per method: test accuracy mean/std, loss at the checkpoints and at the end, init time."""
    rows = []
    for method, runs in results.items():
        acc = torch.tensor([r.test_accuracy for r in runs])
        row = {"method": method, "test acc": float(acc.mean()),
               "std": float(acc.std()) if len(runs) > 1 else 0.0,
               "loss@0": float(torch.tensor([r.losses[0] for r in runs]).mean())}
        for c in checkpoints:
            row[f"loss@{c}"] = float(torch.tensor([r.loss_at(c) for r in runs]).mean())
        row["final loss"] = float(torch.tensor([r.losses[-1] for r in runs]).mean())
        row["init s"] = float(torch.tensor([r.init_seconds for r in runs]).mean())
        rows.append(row)
    return rows


def markdown_table(rows: List[dict]) -> str:
    cols = list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    return "\n".join(out)


def plot_losses(results: Dict[str, List[RunResult]], path, title: str = "digits: LoRA fine-tuning from each init") -> None:
    """Mean training-loss curve per method (log scale), saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for method, runs in results.items():
        curves = torch.tensor([r.losses for r in runs])
        mean = curves.mean(0)
        ax.plot(runs[0].loss_steps, mean.numpy(), label=method, lw=1.4)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train loss (even digits)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
