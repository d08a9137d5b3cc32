"""Issue 23: an adapter whose init rewrote the base weight names its true base, so that
``AutoPeftModelForCausalLM.from_pretrained(out)`` gives the initialized model, from the CLI and the API."""
import json
import os

import pytest
import torch

from lorainit.cli import main

IDS = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11], [1, 12, 13, 14, 15, 16, 17, 18]])


def _auto_logits(out):
    from peft import AutoPeftModelForCausalLM

    model = AutoPeftModelForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("method, extra", [("pissa", []), ("lora_da", ["--set", "preserve_output=true",
                                                                        "--set", "step_scale=0.5"])])
def test_cli_adapter_names_its_residual_base(method, extra, tiny_lm_dir, jsonl_file, tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM

    # a relative --model path, as a user types it; the adapter is loaded from another working directory
    monkeypatch.chdir(tiny_lm_dir.parent)
    out = tmp_path / "op"
    assert main(["init", "--model", tiny_lm_dir.name, "--data", str(jsonl_file), "--method", method, "--rank", "2",
                 "--target-modules", "q_proj,v_proj", "--num-samples", "8", "--batch-size", "4",
                 "--out", str(out), *extra]) == 0
    message = capsys.readouterr().out
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str((out / "base_model").resolve())
    assert os.path.isabs(cfg["base_model_name_or_path"])
    assert "residual base model" in message and "AutoPeftModelForCausalLM" in message
    assert "save_for_original_base" in message and "different model" in message
    monkeypatch.chdir(tmp_path)
    original = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    with torch.no_grad():
        want = original(IDS).logits  # both inits preserve the model's output
    got = _auto_logits(out)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    # the adapter on the original base is another model: the check above can fail
    from peft import PeftModel

    wrong = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lm_dir), str(out)).eval()
    with torch.no_grad():
        assert (wrong(IDS).logits - want).abs().max() > 100 * (got - want).abs().max()


def test_cli_adapter_without_base_change_names_the_model_by_absolute_path(tiny_lm_dir, jsonl_file, tmp_path,
                                                                          monkeypatch):
    monkeypatch.chdir(tiny_lm_dir.parent)
    out = tmp_path / "plain"
    assert main(["init", "--model", tiny_lm_dir.name, "--data", str(jsonl_file), "--method", "lora_da", "--rank", "2",
                 "--target-modules", "v_proj", "--num-samples", "8", "--out", str(out), "--quiet"]) == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_lm_dir.resolve())
    assert not (out / "base_model").exists()


@pytest.mark.parametrize("method", ["pissa", "lora_ga", "lora_one", "corda", "olora"])
def test_api_save_adapter_reloads_the_initialized_model(method, tiny_lm_dir, jsonl_file, tmp_path, monkeypatch):
    """The documented API path (docs/saving.md): initialize_lora, then lorainit.save_adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lorainit import initialize_lora, save_adapter

    from integration_helpers import build_tokenizer, sentences

    tok = build_tokenizer()
    batches = []
    for i in range(0, 8, 4):
        enc = tok(sentences(8)[i:i + 4], return_tensors="pt", padding=True)
        enc["labels"] = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        batches.append(dict(enc))
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_lm_dir),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    report = initialize_lora(model, batches, method=method, num_samples=8, progress=False)
    model.eval()
    with torch.no_grad():
        want = model(IDS).logits
    out = save_adapter(model, tmp_path / "adapter", report, tokenizer=tok)
    assert model.peft_config["default"].base_model_name_or_path == str(tiny_lm_dir)  # the model's own config kept
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == (str((out / "base_model").resolve()) if report.info["base_modified"]
                                              else str(tiny_lm_dir))
    assert json.loads((out / "lorainit_report.json").read_text())["method"] == method
    monkeypatch.chdir(tmp_path)
    got = _auto_logits(out)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_save_adapter_refuses_what_is_not_a_report(tmp_path):
    from lorainit import LoRAInitError, save_adapter

    with pytest.raises(LoRAInitError, match="report"):
        save_adapter(torch.nn.Linear(2, 2), tmp_path, {"base_modified": True})


def test_trained_adapter_converts_to_a_plain_lora_on_the_original_base(tiny_lm_dir, tmp_path, monkeypatch):
    """docs/saving.md: save_adapter right after the init, train, then PEFT's conversion gives a rank-2r adapter
    that AutoPeftModelForCausalLM loads on the original base as the trained model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lorainit import initialize_lora, save_adapter, save_for_original_base

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_lm_dir),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    report = initialize_lora(model, method="pissa", progress=False)
    init_dir = save_adapter(model, tmp_path / "init", report)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        model(IDS, labels=IDS).loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        want = model(IDS).logits
    init_logits = _auto_logits(init_dir)  # the initialized model, before the conversion
    save_for_original_base(model, tmp_path / "final", init_dir)
    cfg = json.loads((tmp_path / "final" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_lm_dir) and cfg["r"] == 4
    got = _auto_logits(tmp_path / "final")
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    original = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    with torch.no_grad():
        assert (original(IDS).logits - want).abs().max() > 100 * (got - want).abs().max()  # training moved it
    # the initial adapter still names its residual base (PEFT rewrote only the copy it read)
    assert json.loads((init_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str((init_dir / "base_model").resolve())
    assert torch.equal(_auto_logits(init_dir), init_logits)


def test_save_for_original_base_needs_the_initial_adapter(tmp_path):
    from lorainit import LoRAInitError, save_for_original_base

    with pytest.raises(LoRAInitError, match="initial_dir"):
        save_for_original_base(None, tmp_path / "final", tmp_path / "nothing")
