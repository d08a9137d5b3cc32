"""Models spread over devices, with CPU stand-ins: dtypes for devices in the grouping, the meta device for masks.

Not run on real GPUs (none here): a ``device_map="auto"`` model across CUDA devices. What is checked:
shape groups never mix base-weight or adapter dtypes/devices, a token mask follows each layer's input
to its device, and the bucketed collectives group tensors by device and dtype.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_fsdp import branch_mlp  # noqa: E402


def test_layer_groups_split_same_shapes_by_dtype():
    from lorainit.methods.common import layer_groups
    from lorainit.targets import find_targets

    model = branch_mlp()
    names = {n.split(".")[-1]: n for n in find_targets(model)}
    assert len([g for g in layer_groups(find_targets(model)) if len(g[1]) == 2]) == 1  # fc2 and extra: one shape
    model.base_model.model.extra.base_layer.to(torch.float64)  # a dtype standing in for another device
    groups = layer_groups(find_targets(model))
    assert all(len(g) == 1 for _, g in groups) and len(groups) == 4
    model.base_model.model.extra.base_layer.to(torch.float32)
    model.base_model.model.extra.lora_A["default"].to(torch.bfloat16)  # adapter placement counts too
    groups = layer_groups(find_targets(model))
    assert [names["extra"]] in [g for _, g in groups] and [names["fc2"]] in [g for _, g in groups]


def test_mask_follows_each_input_to_its_device():
    from lorainit.passes.masks import TokenMasks
    from lorainit.passes.stats import StatsCollector
    from lorainit.targets import find_targets

    model = branch_mlp()
    targets = find_targets(model)
    col = StatsCollector(targets, list(targets))
    # the runner puts the batch's mask on the first parameter's device
    col.masks = TokenMasks(encoder=("attention_mask", torch.ones(2, 5, dtype=torch.bool)))
    x = torch.empty(2, 5, 24, device="meta")  # an input on another device
    fc2 = next(n for n in targets if n.endswith("fc2"))
    mask = col._mask_for(fc2, x)
    assert mask.device == x.device and tuple(mask.shape) == (2, 5)
    flat = col._mask_for(fc2, torch.empty(10, 24, device="meta"))  # flattened tokens
    assert flat.device.type == "meta" and tuple(flat.shape) == (10,)


def test_buckets_group_by_device_and_dtype_and_cap_bytes(monkeypatch):
    from lorainit import distributed as dist_utils

    ts = [torch.zeros(4, dtype=dt) for dt in (torch.float32, torch.float64, torch.float32, torch.bfloat16)]
    ts.append(torch.zeros(4, device="meta"))
    buckets = dist_utils._buckets(ts)
    keys = [{(t.device.type, t.dtype) for t in b} for b in buckets]
    assert all(len(k) == 1 for k in keys) and len(buckets) == 4
    assert [len(b) for b in buckets][0] == 2  # the two fp32 CPU tensors share one flat buffer
    monkeypatch.setattr(dist_utils, "BUCKET_BYTES", 20)  # 16 bytes per fp32 tensor: one per bucket
    assert len(dist_utils._buckets(ts)) == 5


def test_num_samples_is_a_total_over_ranks():
    from lorainit.distributed import samples_for_rank

    assert [samples_for_rank(9, r, 4) for r in range(4)] == [3, 2, 2, 2]
    assert [samples_for_rank(2, r, 4) for r in range(4)] == [1, 1, 1, 1]  # at least one example per rank
    assert samples_for_rank(None, 1, 4) is None and samples_for_rank(7, 0, 1) == 7
