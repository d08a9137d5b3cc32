"""The PEFT-known methods through the generic front ends: `lorainit init --method eva|corda ...`,
`lorainit methods` (at least 14 methods, each with its paper) and LoRAInitCallback under transformers.Trainer."""
import json

import torch

from lorainit.cli import main

from integration_helpers import build_tokenizer, sentences


def test_cli_init_eva_and_corda(tiny_lm_dir, jsonl_file, tmp_path):
    from peft import AutoPeftModelForCausalLM, PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "eva"
    assert main(["init", "--model", str(tiny_lm_dir), "--data", str(jsonl_file), "--method", "eva", "--set", "rho=1",
                 "--set", "token_mask=attention", "--rank", "2", "--target-modules", "q_proj,v_proj,down_proj",
                 "--num-samples", "16", "--batch-size", "4", "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "lorainit_report.json").read_text())
    assert report["method"] == "eva" and report["config"]["token_mask"] == "attention"
    saved = load_file(out / "adapter_model.safetensors")
    for k, v in saved.items():  # EVA: orthonormal principal directions in A, B = 0
        if "lora_A" in k:
            assert torch.allclose(v.double() @ v.double().T, torch.eye(2, dtype=torch.float64), atol=1e-4)
        else:
            assert not bool(v.any())
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lm_dir), out)
    assert sum("lora_A" in k for k in loaded.state_dict()) == 6

    out = tmp_path / "corda"  # a method that rewrites W: the residual base is saved beside the adapter
    assert main(["init", "--model", str(tiny_lm_dir), "--data", str(jsonl_file), "--method", "corda", "--set",
                 "mode=kpm", "--rank", "2", "--target-modules", "v_proj", "--num-samples", "16", "--batch-size", "4",
                 "--out", str(out), "--quiet"]) == 0
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()(ids).logits
        got = AutoPeftModelForCausalLM.from_pretrained(out).eval()(ids).logits
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_cli_rejects_a_bad_option_of_a_new_method(tiny_lm_dir, jsonl_file, tmp_path, capsys):
    code = main(["init", "--model", str(tiny_lm_dir), "--data", str(jsonl_file), "--method", "astra", "--set",
                 "mode=tail", "--rank", "2", "--target-modules", "v_proj", "--out", str(tmp_path / "x"), "--quiet"])
    assert code == 2 and "mode" in capsys.readouterr().err


def test_methods_lists_at_least_14_with_papers(capsys):
    assert main(["methods"]) == 0
    text = capsys.readouterr().out
    for name, paper in (("eva", "2410.07170"), ("corda", "2406.05223"), ("astra", "2602.19111"),
                        ("olora", "2406.01775"), ("mica", "2604.01694")):
        assert name in text and paper in text, name
    from lorainit.registry import BUILTIN, methods

    builtin = [m for m in methods() if m["name"] in BUILTIN]  # other tests may have registered their own
    assert len(builtin) >= 14 and all(m["paper"] for m in builtin)


def test_trainer_callback_runs_eva_before_the_first_step(tiny_lm_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from lorainit import EVAConfig, LoRAInitCallback, initialize_lora

    tok = build_tokenizer()
    rows = []
    for text in sentences(16, seed=3):
        enc = tok(text, truncation=True, max_length=16)
        rows.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    collator = DataCollatorForLanguageModeling(tok, mlm=False)

    def model():
        torch.manual_seed(0)
        return get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_lm_dir),
                              LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))

    config = EVAConfig(solver="eigh")
    trained = model()
    seen = {}

    from transformers import TrainerCallback

    class Grab(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kw):
            seen.setdefault("A", {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_A" in k})

    cb = LoRAInitCallback(method="eva", config=config, num_samples=len(rows), progress=False)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, report_to=[],
                             use_cpu=True, save_strategy="no", learning_rate=1e-3, seed=0)
    Trainer(model=trained, args=args, train_dataset=rows, data_collator=collator, callbacks=[cb, Grab()]).train()
    assert cb.report is not None and cb.report.method == "eva"
    reference = model()
    batches = [collator(rows[i:i + 4]) for i in range(0, len(rows), 4)]
    initialize_lora(reference, batches, method="eva", config=config, num_samples=len(rows), progress=False)
    for k, v in reference.state_dict().items():
        if "lora_A" in k:  # the same subspace (the batch order does not change the statistics)
            P, Q = v.double().T, seen["A"][k].double().T
            assert torch.allclose(P @ P.T, Q @ Q.T, atol=1e-4), k
