"""lorainit.passes.grads: full weight gradients against float64 autograd, embeddings, and named errors."""
import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import mlp_batches, mlp_loss, rel, tiny_mlp
from torch import nn

from lorainit import LoRAInitError
from lorainit.passes.grads import weight_grads
from lorainit.passes.loss import LossRunner
from lorainit.targets import find_targets


def _autograd_reference(model, batches, loss_fn):
    """{target: W.grad (torch orientation, float64)} of the summed loss over ``batches``, LoRA off."""
    m64 = copy.deepcopy(model).double()
    targets = find_targets(m64)
    for p in m64.parameters():
        p.requires_grad_(False)
    for t in targets.values():
        t.weight.requires_grad_(True)
    with m64.disable_adapter():
        for b in batches:
            loss_fn(m64, tuple(v.double() if v.is_floating_point() else v for v in b)).backward()
    return {n: t.weight.grad for n, t in targets.items()}


def test_weight_grads_match_float64_autograd_and_leave_grad_fields_alone():
    model = tiny_mlp(seed=4)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            nn.init.normal_(p)  # LoRA must be off in the pass: a non-zero adapter would change the gradients
    batches = mlp_batches(n=27, bs=8, seed=3)  # a short last batch
    targets = find_targets(model)
    marker = torch.full_like(targets[next(iter(targets))].weight, 7.0)
    first = next(iter(targets))
    targets[first].weight.grad = marker
    flags = [p.requires_grad for p in model.parameters()]
    grads, T, per_layer, masks = weight_grads(model, targets, list(targets), batches, LossRunner(model, mlp_loss))
    assert T == 27 and per_layer == {n: 27 for n in targets}
    ref = _autograd_reference(model, batches, mlp_loss)
    for n in targets:
        assert grads[n].dtype == torch.float32 and grads[n].shape == (targets[n].m, targets[n].n)
        assert rel(grads[n].double(), ref[n] / 27) < 1e-5, n
    assert targets[first].weight.grad is marker and [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters() if p is not targets[first].weight)


class _Bag(nn.Module):
    """Mean of token embeddings (padding id 0) -> a linear head."""

    def __init__(self, vocab=23, d=6, classes=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.head = nn.Linear(d, classes)

    def forward(self, ids):
        return self.head(self.emb(ids).mean(1))


def _bag_loss(model, batch):
    ids, y = batch
    return F.cross_entropy(model(ids), y, reduction="sum")


def test_embedding_gradient_is_a_column_scatter_without_the_padding_row():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(5)
    model = get_peft_model(_Bag(), LoraConfig(r=2, lora_alpha=4, target_modules=["emb", "head"]))
    g = torch.Generator().manual_seed(6)
    batches = []
    for bs in (3, 5):
        ids = torch.randint(1, 23, (bs, 7), generator=g)
        ids[0, -3:] = 0  # padding tokens, and token 5 repeated within a row
        ids[1, :4] = 5
        batches.append((ids, torch.randint(0, 4, (bs,), generator=g)))
    targets = find_targets(model)
    emb = next(n for n, t in targets.items() if t.kind == "embedding")
    grads, T, per_layer, _ = weight_grads(model, targets, list(targets), batches, LossRunner(model, _bag_loss))
    ref = _autograd_reference(model, batches, _bag_loss)
    assert per_layer[emb] == 8 * 7  # every position of the embedding's input
    assert grads[emb].shape == (6, 23) and torch.equal(grads[emb][:, 0], torch.zeros(6))
    assert rel(grads[emb].double(), ref[emb].t() / per_layer[emb]) < 1e-5
    head = next(n for n in targets if n != emb)
    assert rel(grads[head].double(), ref[head] / per_layer[head]) < 1e-5


class _Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(4, 3)
        self.unused = nn.Linear(4, 3)

    def forward(self, x):
        return self.used(x)


def _branchy():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    return get_peft_model(_Branchy(), LoraConfig(r=2, lora_alpha=4, target_modules=["used", "unused"]))


def _sum_loss(model, batch):
    return model(batch[0]).square().sum()


def test_a_target_that_never_runs_is_named():
    model = _branchy()
    targets = find_targets(model)
    batches = [(torch.randn(5, 4),)]
    with pytest.raises(LoRAInitError, match=r"module '.*unused': no gradient reached its weight in any batch"):
        weight_grads(model, targets, list(targets), batches, LossRunner(model, _sum_loss))


def test_a_loss_that_does_not_depend_on_the_targets_is_refused():
    model = _branchy()
    targets = find_targets(model)
    with pytest.raises(LoRAInitError, match="batch 0: the loss does not depend on any LoRA target weight"):
        weight_grads(model, targets, list(targets), [(torch.randn(5, 4),)],
                     LossRunner(model, lambda m, b: b[0].sum(), loss_reduction="sum"))


def _nan_grad_loss(model, batch):
    """A finite loss; on a batch marked ``bad`` its gradient is NaN (sqrt at 0 times 0)."""
    x, bad = batch
    out = model(x)
    return torch.sqrt(out.square() * 0.0).sum() if bad else out.square().sum()


def test_a_nan_gradient_names_the_module_and_batch_and_leaves_the_model_as_it_was():
    model = tiny_mlp(seed=1)
    targets = find_targets(model)
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(4, 12, generator=g), False), (torch.randn(4, 12, generator=g), True)]
    before = {n: (p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()}
    with pytest.raises(LoRAInitError, match=r"module '.*head', batch 1: NaN/Inf in the weight gradient"):
        weight_grads(model, targets, list(targets), batches, LossRunner(model, _nan_grad_loss, loss_reduction="sum"))
    for n, p in model.named_parameters():
        assert p.requires_grad == before[n][0] and torch.equal(p, before[n][1]) and p.grad is None, n
