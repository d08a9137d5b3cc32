"""Memory: the rollback snapshot on the CPU, statistics in train mode (gradient checkpointing), the memory
model and budget (``lorainit.memory``), the statistics cache."""
from __future__ import annotations

import torch
import pytest

from lorainit import LoRADAConfig, initialize_lora
from lorainit.context import InitContext
from lorainit.targets import find_targets

from helpers import lm_batches, tiny_llama


def _stats(model, batches, **kw):
    ctx = InitContext(model, find_targets(model), batches, num_samples=None, progress=False)
    return ctx.collect_stats(**kw)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_keeps_running_and_gives_identical_statistics(reentrant):
    batches = lm_batches(n=8, bs=4)
    ref = _stats(tiny_llama(seed=3), batches)
    model = tiny_llama(seed=3)
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    calls = []
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert layers
    for layer in layers:  # count the checkpointed forwards
        def spy(*a, _f=layer._gradient_checkpointing_func, **k):
            calls.append(1)
            return _f(*a, **k)
        layer._gradient_checkpointing_func = spy
    got = _stats(model, batches)
    assert len(calls) == len(layers) * len(batches)  # the checkpointed forward ran during the pass
    assert model.training and all(m.training for m in model.modules())  # the user's mode is back
    for name, st in ref.items():
        o = got[name]
        assert o.count == st.count
        for a, b in ((o.Z, st.Z), (o.G, st.G), (o.s, st.s)):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), name
