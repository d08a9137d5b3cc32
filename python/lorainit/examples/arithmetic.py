"""A generated GSM8K-shaped task: arithmetic word problems, prompt -> numeric answer.

Each problem is a short story with one to three operations on small integers ("Mia has 23
marbles. She buys 14 more and gives 9 to her brother. How many marbles does Mia have now?"),
formatted as ``"Question: ...\\nAnswer:"`` followed by the target ``" 28"`` and the tokenizer's
EOS. The loss is on the answer tokens only (prompt and padding labels are -100); evaluation is
exact match of the first integer in a greedy continuation. Everything is generated from a seed:
nothing is downloaded.

    problems = make_problems(512, seed=0)
    ds = ArithmeticDataset(problems, tokenizer)               # input_ids, labels (answer tokens)
    loader = DataLoader(ds, batch_size=8, collate_fn=Collator(tokenizer))
    accuracy, details = exact_match(model, tokenizer, test_problems)
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

__all__ = ["Problem", "make_problems", "split_problems", "ArithmeticDataset", "Collator", "make_loader",
           "exact_match", "answer_loss", "parse_answer", "PROMPT_FORMAT"]

PROMPT_FORMAT = "Question: {question}\nAnswer:"

_NAMES = ("Mia", "Tom", "Ava", "Leo", "Zoe", "Sam", "Ivy", "Max", "Noah", "Emma", "Liam", "Ella", "Ben", "Lily",
          "Omar", "Nina", "Ravi", "Sara", "Yuki", "Finn")
_ITEMS = ("apples", "marbles", "stickers", "books", "coins", "pencils", "cards", "shells", "cookies", "stamps",
          "balloons", "crayons")
_PRON = {"Mia": "She", "Ava": "She", "Zoe": "She", "Ivy": "She", "Emma": "She", "Ella": "She", "Lily": "She",
         "Nina": "She", "Sara": "She", "Yuki": "She"}


@dataclass(frozen=True)
class Problem:
    question: str
    answer: int

    @property
    def prompt(self) -> str:
        return PROMPT_FORMAT.format(question=self.question)

    @property
    def target(self) -> str:
        return f" {self.answer}"


def _one(rng: random.Random, max_value: int, ops: int) -> Problem:
    name = rng.choice(_NAMES)
    pron = _PRON.get(name, "He")
    item = rng.choice(_ITEMS)
    total = rng.randint(5, max_value)
    parts = [f"{name} has {total} {item}."]
    actions = []
    for k in range(ops):
        kind = rng.choice(("add", "sub", "mul") if k == 0 and total <= 12 else ("add", "sub"))
        if kind == "add":
            v = rng.randint(2, max_value)
            actions.append(rng.choice((f"buys {v} more", f"finds {v} more", f"gets {v} more from a friend")))
            total += v
        elif kind == "sub" and total > 2:
            v = rng.randint(1, total - 1)
            actions.append(rng.choice((f"gives {v} away", f"loses {v}", f"gives {v} to a friend")))
            total -= v
        else:
            v = rng.randint(2, 5)
            actions.append(f"gets {v} times as many in total")
            total *= v
    if len(actions) == 1:
        parts.append(f"{pron} {actions[0]}.")
    else:
        parts.append(f"{pron} {', then '.join(actions)}.")
    parts.append(f"How many {item} does {name} have now?")
    return Problem(" ".join(parts), total)


def make_problems(n: int, *, seed: int = 0, max_value: int = 50, max_ops: int = 2) -> List[Problem]:
    """``n`` problems with 1..``max_ops`` operations on integers up to ``max_value`` (seeded)."""
    if n < 0 or max_ops < 1 or max_value < 5:
        raise ValueError(f"make_problems: need n >= 0, max_ops >= 1, max_value >= 5; got {n}, {max_ops}, {max_value}")
    rng = random.Random(seed)
    return [_one(rng, max_value, rng.randint(1, max_ops)) for _ in range(n)]


def split_problems(n_train: int, n_test: int, *, seed: int = 0, **kwargs) -> Tuple[List[Problem], List[Problem]]:
    """Disjoint train / test problems (test questions never occur in train)."""
    pool = make_problems(int(1.3 * (n_train + n_test)) + 16, seed=seed, **kwargs)
    seen, unique = set(), []
    for p in pool:
        if p.question not in seen:
            seen.add(p.question)
            unique.append(p)
    if len(unique) < n_train + n_test:
        raise ValueError("split_problems: not enough distinct problems; raise max_value or max_ops")
    return unique[:n_train], unique[n_train:n_train + n_test]


class ArithmeticDataset(torch.utils.data.Dataset):
    """Tokenized problems: ``input_ids`` = prompt + target + EOS, ``labels`` = -100 except the target + EOS."""

    def __init__(self, problems: Sequence[Problem], tokenizer, *, max_length: int = 64):
        self.problems = list(problems)
        self.items: List[Dict[str, List[int]]] = []
        eos = tokenizer.eos_token_id
        for p in self.problems:
            prompt = tokenizer(p.prompt, add_special_tokens=False)["input_ids"]
            target = tokenizer(p.target, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
            ids = (prompt + target)[:max_length]
            labels = ([-100] * len(prompt) + target)[:max_length]
            self.items.append({"input_ids": ids, "labels": labels})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Dict[str, List[int]]:
        return self.items[i]


class Collator:
    """Right-pads ``input_ids`` (pad token), ``attention_mask`` and ``labels`` (-100) to the batch's longest."""

    def __init__(self, tokenizer):
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def __call__(self, items: Sequence[Dict[str, List[int]]]) -> Dict[str, torch.Tensor]:
        L = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), L), self.pad, dtype=torch.long)
        mask = torch.zeros((len(items), L), dtype=torch.long)
        labels = torch.full((len(items), L), -100, dtype=torch.long)
        for i, it in enumerate(items):
            n = len(it["input_ids"])
            ids[i, :n] = torch.tensor(it["input_ids"])
            mask[i, :n] = 1
            labels[i, :n] = torch.tensor(it["labels"])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def make_loader(problems: Sequence[Problem], tokenizer, *, batch_size: int = 8, shuffle: bool = False,
                seed: int = 0, max_length: int = 64) -> torch.utils.data.DataLoader:
    """A DataLoader of collated batches (a seeded shuffle when ``shuffle``)."""
    ds = ArithmeticDataset(problems, tokenizer, max_length=max_length)
    gen = torch.Generator().manual_seed(seed) if shuffle else None
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen,
                                       collate_fn=Collator(tokenizer))


_INT = re.compile(r"-?\d+")


def parse_answer(text: str) -> Optional[int]:
    """The first integer in ``text`` (None if there is none)."""
    m = _INT.search(text.replace(",", ""))
    return int(m.group()) if m else None


@torch.no_grad()
def exact_match(model, tokenizer, problems: Sequence[Problem], *, batch_size: int = 32,
                max_new_tokens: int = 6) -> Tuple[float, List[Tuple[str, Optional[int], int]]]:
    """Exact-match accuracy of greedy decoding; returns ``(accuracy, [(generated text, parsed, answer)])``.

    Prompts are left-padded for generation; the model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    out: List[Tuple[str, Optional[int], int]] = []
    try:
        for start in range(0, len(problems), batch_size):
            chunk = problems[start:start + batch_size]
            enc = [tokenizer(p.prompt, add_special_tokens=False)["input_ids"] for p in chunk]
            L = max(len(e) for e in enc)
            ids = torch.full((len(enc), L), pad, dtype=torch.long)
            mask = torch.zeros((len(enc), L), dtype=torch.long)
            for i, e in enumerate(enc):
                ids[i, L - len(e):] = torch.tensor(e)
                mask[i, L - len(e):] = 1
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
            for p, row in zip(chunk, gen[:, L:]):
                text = tokenizer.decode(row, skip_special_tokens=True)
                out.append((text, parse_answer(text), p.answer))
    finally:
        model.train(was_training)
    acc = sum(1 for _, got, want in out if got == want) / max(len(out), 1)
    return acc, out


@torch.no_grad()
def answer_loss(model, batches) -> float:
    """Mean next-token loss over every loss token of ``batches`` (those whose next label is not -100:
    the answer tokens of ``make_loader``'s batches), weighted by tokens, not batches.

    The model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for b in batches:
            n = int((b["labels"][:, 1:] != -100).sum())
            total += float(model(**b).loss) * n
            count += n
    finally:
        model.train(was_training)
    return total / max(count, 1)
