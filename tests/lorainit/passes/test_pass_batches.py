"""lorainit.passes.batches: sizes, padding-free batches, the statistics samples, slicing, devices, bad input."""
from collections import namedtuple

import pytest
import torch
from torch import nn

from lorainit import LoRAInitError
from lorainit.passes import batches as B

Pair = namedtuple("Pair", ["x", "y"])


def _lm(n, seq=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(3, 50, (n, seq), generator=g), "attention_mask": torch.ones(n, seq, dtype=torch.long)}


def _packed(lengths, seed=0):
    """One row of concatenated sequences, position_ids restarting at 0 (TRL padding_free)."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    return {"input_ids": torch.randint(3, 50, pos.shape, generator=g), "position_ids": pos}


def test_leading_size_of_every_batch_shape():
    assert B.leading_size(torch.zeros(5, 3)) == 5
    assert B.leading_size(torch.tensor(3.0)) is None  # a 0-dim tensor has no examples axis
    assert B.leading_size({"scale": torch.tensor(2.0), "x": torch.zeros(4, 2)}) == 4  # first tensor with a dim
    assert B.leading_size((1.5, torch.zeros(6))) == 6 and B.leading_size([None, torch.zeros(2, 9)]) == 2
    assert B.leading_size({"text": ["a", "b"]}) is None and B.leading_size("abc") is None and B.leading_size(7) is None


def test_packed_sequences_counts_restarts_of_position_ids_only_for_padding_free_batches():
    assert B.packed_sequences(_packed([3, 5, 1, 4])) == 4
    batch = _packed([3, 5])
    assert B.packed_sequences({**batch, "attention_mask": torch.ones_like(batch["input_ids"])}) is None
    assert B.packed_sequences({"position_ids": torch.arange(6).view(2, 3)}) is None  # two rows: padded, not packed
    assert B.packed_sequences({"position_ids": torch.arange(2, 8)[None]}) == 1  # a continuation: one sequence
    assert B.packed_sequences((torch.zeros(1, 4),)) is None


def test_take_samples_cuts_the_last_batch_and_keeps_each_batch_type():
    data = [_lm(3, seed=i) for i in range(4)]
    got, n = B.take_samples(data, 7)
    assert n == 7 and [B.leading_size(b) for b in got] == [3, 3, 1]
    assert torch.equal(got[2]["input_ids"], data[2]["input_ids"][:1]) and type(got[2]) is dict
    pairs = [Pair(torch.randn(4, 2), torch.arange(4)) for _ in range(3)]
    got, n = B.take_samples(pairs, 6)
    assert n == 6 and isinstance(got[1], Pair) and got[1].y.tolist() == [0, 1]
    got, n = B.take_samples(data, None)  # all
    assert n == 12 and len(got) == 4 and got[0] is data[0]


def test_take_samples_counts_unknown_batches_as_one_skips_empty_ones_and_keeps_packed_batches_whole():
    got, n = B.take_samples([{"text": "a"}, {"text": "b"}, {"text": "c"}], 2)
    assert n == 2 and [b["text"] for b in got] == ["a", "b"]
    got, n = B.take_samples([torch.zeros(0, 4), torch.ones(2, 4)], 5)
    assert n == 2 and len(got) == 1 and got[0].shape == (2, 4)
    packed = _packed([4, 2, 3])
    got, n = B.take_samples([_lm(2), packed, _lm(2)], 3)
    assert n == 5 and got[1] is packed  # cutting would need new sequence boundaries: kept whole, counted truly


def test_take_samples_reads_no_further_than_needed():
    def endless():
        i = 0
        while True:
            i += 1
            yield torch.full((2, 3), float(i))

    got, n = B.take_samples(endless(), 5)
    assert n == 5 and [b.shape[0] for b in got] == [2, 2, 1] and got[-1][0, 0] == 3


@pytest.mark.parametrize("bad", [0, -3, True, 2.5, "8"])
def test_take_samples_rejects_a_bad_num_samples(bad):
    with pytest.raises(LoRAInitError, match=f"num_samples must be a positive int or None .*got {bad!r}"):
        B.take_samples([torch.zeros(2)], bad)


def test_take_samples_rejects_a_non_iterable_or_empty_dataloader():
    with pytest.raises(LoRAInitError, match="dataloader must be iterable .*got int"):
        B.take_samples(42, 4)
    for empty in ([], [torch.zeros(0, 3)]):
        with pytest.raises(LoRAInitError, match="the dataloader yielded no examples"):
            B.take_samples(empty, 4)


def test_slice_examples_cuts_only_tensors_along_the_examples_axis():
    g = torch.Generator().manual_seed(3)
    batch = {"x": torch.randn(5, 3, generator=g), "w": torch.randn(3, generator=g), "scale": torch.tensor(2.0),
             "tag": "t"}
    part = B.slice_examples(batch, 1, 4)
    assert torch.equal(part["x"], batch["x"][1:4]) and part["w"] is batch["w"] and part["scale"] is batch["scale"]
    assert part["tag"] == "t"
    t = torch.arange(10)
    assert B.slice_examples(t, 7, 99).tolist() == [7, 8, 9]
    p = B.slice_examples(Pair(torch.arange(6), torch.arange(6) * 2), 2, 3)
    assert isinstance(p, Pair) and p.y.tolist() == [4]


def test_has_loss_tokens():
    ids = torch.randint(3, 50, (2, 5))
    assert not B.has_loss_tokens({"input_ids": ids, "labels": torch.full((2, 5), -100)})
    assert B.has_loss_tokens({"input_ids": ids, "labels": torch.full((2, 5), -100).index_fill(1, torch.tensor([3]), 7)})
    assert B.has_loss_tokens({"labels": torch.full((2,), -100.0)})  # float targets (regression): always a loss
    assert not B.has_loss_tokens({"input_ids": ids, "attention_mask": torch.zeros(2, 5, dtype=torch.long)})
    assert B.has_loss_tokens({"attention_mask": torch.zeros(2, 5)})  # no input_ids: the model's labels are unknown
    assert B.has_loss_tokens((ids, ids))


def test_to_device_keeps_the_structure():
    batch = {"a": torch.ones(2), "pair": Pair(torch.zeros(1), "s"), "list": [torch.ones(3), 4], "tup": (torch.ones(1),)}
    out = B.to_device(batch, "meta")
    assert out["a"].is_meta and isinstance(out["pair"], Pair) and out["pair"].x.is_meta and out["pair"].y == "s"
    assert isinstance(out["list"], list) and out["list"][0].is_meta and out["list"][1] == 4
    assert isinstance(out["tup"], tuple) and out["tup"][0].is_meta
    assert not batch["a"].is_meta  # the input is not changed


def test_model_device_count_examples_and_positions():
    assert B.model_device(nn.ReLU()) == torch.device("cpu")
    assert B.model_device(nn.Linear(2, 2, device="meta")) == torch.device("meta")
    assert B.count_examples([_lm(3), {"text": "x"}, _packed([2, 2, 2]), torch.zeros(4, 1)]) == 3 + 1 + 3 + 4
    assert B.count_examples([]) == 0
    assert B.count_positions(_lm(3, seq=5)) == 15
    assert B.count_positions((torch.zeros(6, 2),)) == 6 and B.count_positions({"text": "x"}) == 1
