"""Issue 15: `lorainit init` is a thin layer over initialize_lora: same data -> same N -> same adapters."""
import json
import shutil

import pytest
import torch

from lorainit.cli import main


def _records(n=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(4, 10, (1,), generator=g))
        ids = torch.randint(4, 30, (length,), generator=g).tolist()
        rec = {"input_ids": ids}
        if i % 2:
            rec["labels"] = [-100, -100] + ids[2:]  # completion-only labels
        out.append(rec)
    return out


def _collate(records):
    width = max(len(r["input_ids"]) for r in records)
    ids = torch.zeros(len(records), width, dtype=torch.long)
    am = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, r in enumerate(records):
        k = len(r["input_ids"])
        ids[i, :k] = torch.tensor(r["input_ids"])
        am[i, :k] = 1
        labels[i, :k] = torch.tensor(r.get("labels", r["input_ids"]))
    return {"input_ids": ids, "attention_mask": am, "labels": labels}


def test_cli_and_api_give_the_same_adapters_and_n(tiny_lm_dir, tmp_path):
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import load_file
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM

    from lorainit import LoRADAConfig, initialize_lora

    records = _records()
    data = tmp_path / "tok.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    (tmp_path / "opts.json").write_text(json.dumps({"damping": 0.02}))
    out = tmp_path / "adapter"
    assert main(["init", "--model", str(tiny_lm_dir), "--data", str(data), "--method", "lora_da", "--rank", "2",
                 "--alpha", "4", "--target-modules", "all-linear", "--num-samples", "8", "--batch-size", "4",
                 "--config", str(tmp_path / "opts.json"), "--set", "step_scale=0.05", "--device", "cpu",
                 "--dtype", "float32", "--out", str(out), "--quiet"]) == 0
    cli = load_file(out / "adapter_model.safetensors")
    cli_report = json.loads((out / "lorainit_report.json").read_text())

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, torch_dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", lora_dropout=0.0,
                                             task_type="CAUSAL_LM"))
    loader = DataLoader(records, batch_size=4, collate_fn=_collate)
    report = initialize_lora(model, loader, method="lora_da", config=LoRADAConfig(damping=0.02, step_scale=0.05),
                             num_samples=8, progress=False)
    api = get_peft_model_state_dict(model)
    assert set(api) == set(cli) and len(api) == 2 * len(report.layers)
    for k, v in api.items():
        assert torch.allclose(cli[k], v, rtol=1e-5, atol=1e-6), k
    assert cli_report["info"]["n_train"] == report.info["n_train"]
    assert cli_report["info"]["n_train_source"].startswith("len(dataset)")
    assert cli_report["config"]["step_scale"] == 0.05 and cli_report["config"]["damping"] == 0.02


@pytest.mark.parametrize("extra, needle", [
    (["--set", "nope=1"], "has no option nope"),
    (["--set", "step_scale=-1"], "step_scale"),
    (["--set", "step_scale"], "KEY=VALUE"),
    (["--dtype", "int8"], "--dtype"),
])
def test_bad_method_options_give_one_line(extra, needle, tiny_lm_dir, tmp_path, capsys):
    data = tmp_path / "tok.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in _records(4)) + "\n")
    argv = ["init", "--model", str(tiny_lm_dir), "--data", str(data), "--target-modules", "q_proj",
            "--out", str(tmp_path / "x"), "--quiet"] + extra
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


def test_missing_tokenizer_is_one_line_and_pretokenized_data_needs_none(tiny_lm_dir, tmp_path, capsys):
    bare = tmp_path / "bare"
    shutil.copytree(tiny_lm_dir, bare)
    for f in bare.iterdir():
        if "token" in f.name or f.name == "special_tokens_map.json":
            f.unlink()
    text = tmp_path / "text.jsonl"
    text.write_text('{"text": "the cat sat"}\n{"text": "a dog ran"}\n')
    assert main(["init", "--model", str(bare), "--data", str(text), "--method", "lora_ga",
                 "--target-modules", "q_proj", "--out", str(tmp_path / "a"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tokenizer" in err, err
    tok = tmp_path / "tok.jsonl"
    tok.write_text("\n".join(json.dumps(r) for r in _records(6)) + "\n")
    assert main(["init", "--model", str(bare), "--data", str(tok), "--method", "lora_ga", "--rank", "2",
                 "--target-modules", "q_proj", "--out", str(tmp_path / "b"), "--quiet"]) == 0


def test_help_has_no_rst_backticks(capsys):
    for argv in (["--help"], ["init", "--help"], ["methods", "--help"]):
        assert main(argv) == 0
        assert "`" not in capsys.readouterr().out, argv
