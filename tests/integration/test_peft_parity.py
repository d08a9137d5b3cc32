"""lorainit's eva, lora_ga, olora, mica, corda against PEFT's own implementations on one tiny Llama and data.

Each agreement is a test; each disagreement is pinned to a convention and checked against a float64
reference (docs/methods-peft.md, "Parity with PEFT"):

* EVA (``get_eva_state_dict``, rho=1): the same subspaces up to PEFT's incremental-PCA accuracy
  (its components converge to cosine ``tau``); ours equals the float64 PCA of the centered inputs.
* LoRA-GA (``preprocess_loraga`` + ``init_lora_weights="lora_ga"``): the same A and B subspaces;
  PEFT 0.21 multiplies ``B`` by the singular values and scales only ``B``, lorainit follows the
  paper's reference code (orthonormal directions, both scaled): checked against the float64 SVD
  of the gradient PEFT estimated.
* OLoRA, MiCA (``init_lora_weights="olora"/"mica"``): the same factors (MiCA's up to column signs),
  the same residual base, MiCA's ``lora_B`` frozen in both.
* CorDA (``preprocess_corda``, IPM and KPM): PEFT's hook squeezes the batch axis, so it runs on
  batches of one sequence and fails on larger ones (checked); on one sequence its per-batch
  normalization is a scalar, and the adapters (``sigma B A``) and residual bases agree.
"""
import copy
import warnings

import pytest
import torch

from lorainit import CorDAConfig, EVAConfig, LoRAGAConfig, initialize_lora
from lorainit.targets import find_targets

from helpers import rel
from linalg_helpers import sin_max

torch.set_num_threads(1)
warnings.filterwarnings("ignore")

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB, SEQ = 97, 24


def _base(seed=0, hidden=32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def _planted(seed=0, hidden=32):
    """A base whose token embeddings have a planted spectrum (a clear gap after 4 directions): the
    layer inputs of the first projections then have well-separated principal subspaces."""
    base = _base(seed, hidden)
    g = torch.Generator().manual_seed(seed + 100)
    E = base.get_input_embeddings().weight
    U, _ = torch.linalg.qr(torch.randn(E.shape[0], hidden, generator=g))
    V, _ = torch.linalg.qr(torch.randn(hidden, hidden, generator=g))
    spectrum = torch.cat([torch.tensor([12.0, 9.0, 7.0, 5.5]), torch.full((hidden - 4,), 0.6)])
    with torch.no_grad():
        E.copy_((U * spectrum) @ V.T)
    return base


def _peft_layers(peft_model):
    """{name: (lora_A, lora_B, base weight, lora_B.requires_grad)} read from PEFT's LoRA layers directly
    (lorainit does not take PEFT's MiCA variant layers as targets)."""
    from peft.tuners.lora import LoraLayer

    return {n: (m.lora_A["default"].weight.detach(), m.lora_B["default"].weight.detach(),
                m.get_base_layer().weight.detach(), m.lora_B["default"].weight.requires_grad)
            for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


def _peft(base, **kw):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=PROJ, **kw))


def _batches(n=16, bs=4, seed=1):
    """Full-length sequences (no padding): every token counts in PEFT's and lorainit's statistics alike."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, SEQ), generator=g)
    return [{"input_ids": ids[i:i + bs], "attention_mask": torch.ones_like(ids[i:i + bs]), "labels": ids[i:i + bs]}
            for i in range(0, n, bs)]


def _short(name):
    return name.replace("base_model.model.", "")


def _inputs64(base, batches):
    """float64 layer inputs of every target (all tokens), from a float64 copy of the base model."""
    m = copy.deepcopy(base).double()
    xs, hs = {}, []
    for name, mod in m.named_modules():
        if name.split(".")[-1] in PROJ:
            hs.append(mod.register_forward_hook(lambda mod, i, o, name=name: xs.setdefault(name, []).append(
                i[0].reshape(-1, i[0].shape[-1]))))
    with torch.no_grad():
        for b in batches:
            m(input_ids=b["input_ids"])
    for h in hs:
        h.remove()
    return {k: torch.cat(v) for k, v in xs.items()}


# ------------------------------------------------------------------------------------------ EVA
def test_eva_spans_the_same_subspaces_as_peft():
    from peft import EvaConfig
    from peft.tuners.lora import get_eva_state_dict

    base, batches = _planted(), _batches(n=8)
    peft_model = _peft(base, init_lora_weights="eva", eva_config=EvaConfig(rho=1.0))
    peft_sd = get_eva_state_dict(peft_model, batches, show_progress_bar=False)
    ours = _peft(base)
    initialize_lora(ours, batches, method="eva", config=EVAConfig(token_mask="attention"), num_samples=None,
                    progress=False)
    X = _inputs64(base, batches)
    clear = 0
    for name, t in find_targets(ours).items():
        key = next(k for k in peft_sd if _short(name).endswith(k.replace("base_model.model.", "")))
        x = X[_short(name)]
        xc = x - x.mean(0)  # PEFT's incremental PCA centers; the float64 reference does too
        C = xc.T @ xc / x.shape[0]
        ev, vecs = torch.linalg.eigh(C)
        ref = vecs[:, -t.r:]
        A, Ap = t.lora_A.detach().double(), peft_sd[key].double()
        assert sin_max(A.T, ref) < 1e-3, name  # lorainit: the exact PCA of the statistics samples
        # the objective both maximize, the variance captured: ours is the optimum, PEFT's within 5 %
        best = float(ev[-t.r:].sum())
        assert abs(float(torch.trace(A @ C @ A.T)) - best) <= 1e-4 * best, name
        assert float(torch.trace(Ap @ C @ Ap.T)) >= 0.95 * best, name
        if float(ev[-t.r]) > 2 * float(ev[-t.r - 1]):  # a clear gap: the subspaces themselves agree
            clear += 1
            assert sin_max(A.T, Ap.T) < 0.1, name
    assert clear >= 4  # at least the first layer's q/k/v and gate/up inputs have the planted gap


# ------------------------------------------------------------------------------------------ LoRA-GA
def test_lora_ga_subspaces_match_peft_and_the_magnitudes_follow_peft_convention():
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraGAConfig, preprocess_loraga

    base, batches = _base(seed=2), _batches(seed=3)
    model = copy.deepcopy(base)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=PROJ, init_lora_weights="lora_ga",
                        lora_ga_config=LoraGAConfig())

    def train_step():
        for b in batches:
            model(**b).loss.backward()

    preprocess_loraga(model, config, train_step)
    grads = {n: m._peft_loraga_grad.clone() for n, m in model.named_modules() if hasattr(m, "_peft_loraga_grad")}
    peft_model = get_peft_model(model, config)
    ours = _peft(base)
    initialize_lora(ours, batches, method="lora_ga", config=LoRAGAConfig(niter=None), num_samples=None, progress=False)
    peft_t = find_targets(peft_model)
    c = None
    for name, t in find_targets(ours).items():
        p = peft_t[name]
        G = grads[_short(name)].double()
        U, S, Vh = torch.linalg.svd(G, full_matrices=False)
        r = t.r
        # the same subspaces: A from the top r right vectors, B from the next r left vectors
        # PEFT's randomized SVD (q = 4r, niter = 4) against lorainit's exact one (niter=None)
        assert sin_max(t.lora_A.detach().T, p.lora_A.detach().T) < 5e-2, name
        assert sin_max(t.lora_B.detach(), p.lora_B.detach()) < 5e-2, name
        assert sin_max(t.lora_A.detach().T, Vh[:r].T) < 1e-3, name
        # PEFT's convention: B = U[:, r:2r] diag(S[r:2r]) m^(1/4)/sqrt(gamma), A unscaled (float64 reference)
        c = t.m ** 0.25 / 16 ** 0.5
        assert rel(p.lora_B.detach().norm(dim=0).sort().values, (S[r:2 * r] * c).sort().values) < 2e-2, name
        assert rel(p.lora_A.detach().norm(dim=1), torch.ones(r)) < 1e-4
        # lorainit's (the paper's reference code): orthonormal directions, both scaled by c
        assert rel(t.lora_B.detach().norm(dim=0), torch.full((r,), c)) < 1e-4
        assert rel(t.lora_A.detach().norm(dim=1), torch.full((r,), c)) < 1e-4


# ------------------------------------------------------------------------------------------ OLoRA, MiCA
def test_olora_factors_and_residual_equal_peft():
    base = _base(seed=4)
    peft_model = _peft(base, init_lora_weights="olora")
    ours = _peft(base)
    initialize_lora(ours, None, method="olora", progress=False)
    peft_t = find_targets(peft_model)
    for name, t in find_targets(ours).items():
        p = peft_t[name]
        assert rel(t.lora_A.detach(), p.lora_A.detach()) < 1e-6, name
        assert rel(t.lora_B.detach(), p.lora_B.detach()) < 1e-6, name
        assert rel(t.read_weight(), p.read_weight()) < 1e-6, name


def test_mica_factors_equal_peft_up_to_signs_and_b_is_frozen_in_both():
    base = _base(seed=5)
    peft_layers = _peft_layers(_peft(base, init_lora_weights="mica"))
    ours = _peft(base)
    initialize_lora(ours, None, method="mica", progress=False)
    for name, t in find_targets(ours).items():
        Ap, Bp, Wp, grad_Bp = peft_layers[name]
        B = t.lora_B.detach()
        signs = torch.sign((B * Bp).sum(0))
        assert rel(B * signs, Bp) < 1e-5, name
        assert not bool(t.lora_A.any()) and not bool(Ap.any())
        assert not t.lora_B.requires_grad and not grad_Bp
        assert torch.equal(t.read_weight(), Wp)


# ------------------------------------------------------------------------------------------ CorDA
def _peft_corda(base, batches, mode):
    pytest.importorskip("attr", reason="PEFT's corda.py imports attrs, which PEFT does not declare")
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    model = copy.deepcopy(base)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=PROJ, init_lora_weights="corda",
                        corda_config=CordaConfig(corda_method=mode))

    def run_model():
        for b in batches:
            model(input_ids=b["input_ids"])

    preprocess_corda(model, config, run_model=run_model)
    return get_peft_model(model, config)


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_corda_equals_peft_on_one_sequence(mode):
    base = _base(seed=6)
    one = [{k: v[:1] for k, v in _batches(n=1, bs=1, seed=7)[0].items()}]
    one[0]["input_ids"] = torch.randint(3, VOCAB, (1, 64), generator=torch.Generator().manual_seed(8))
    one[0]["attention_mask"] = torch.ones_like(one[0]["input_ids"])
    one[0]["labels"] = one[0]["input_ids"]
    peft_model = _peft_corda(base, one, mode)
    ours = _peft(base)
    initialize_lora(ours, one, method="corda", config=CorDAConfig(mode=mode), num_samples=None, progress=False)
    peft_t = find_targets(peft_model)
    for name, t in find_targets(ours).items():
        p = peft_t[name]
        mine = t.scaling * t.lora_B.detach().double() @ t.lora_A.detach().double()
        theirs = p.scaling * p.lora_B.detach().double() @ p.lora_A.detach().double()
        assert rel(mine, theirs) < 1e-3, name  # PEFT inverts C_d explicitly; lorainit solves by Cholesky
        assert rel(t.read_weight(), p.read_weight()) < 1e-4, name


def test_peft_corda_fails_on_batches_of_several_sequences_lorainit_does_not():
    base = _base(seed=6)
    batches = _batches(n=4, bs=2)
    with pytest.raises(RuntimeError, match=r"t\(\) expects a tensor with <= 2 dimensions"):
        _peft_corda(base, batches, "ipm")
    ours = _peft(base)
    initialize_lora(ours, batches, method="corda", num_samples=None, progress=False)
    assert all(bool(torch.isfinite(t.lora_A).all()) for t in find_targets(ours).values())
