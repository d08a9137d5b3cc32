"""`lorainit` CLI: writes a PEFT adapter that PeftModel.from_pretrained loads; bad input exits 2."""
import json

import pytest
import torch

from lorainit.cli import main


def test_init_writes_a_loadable_adapter(tiny_lm_dir, jsonl_file, tmp_path, capsys):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "adapter"
    code = main(["init", "--model", str(tiny_lm_dir), "--data", str(jsonl_file), "--method", "lora_da",
                 "--rank", "4", "--alpha", "8", "--target-modules", "q_proj,v_proj", "--num-samples", "16",
                 "--batch-size", "4", "--out", str(out), "--quiet"])
    assert code == 0
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    saved = load_file(out / "adapter_model.safetensors")
    a_keys = [k for k in saved if "lora_A" in k]
    assert len(a_keys) == 4  # 2 layers x (q_proj, v_proj)
    for k in a_keys:  # LoRA-DA's A has orthonormal rows (eigenvectors of Omega)
        A = saved[k].double()
        assert torch.allclose(A @ A.T, torch.eye(A.shape[0], dtype=A.dtype), atol=1e-4)
    report = json.loads((out / "lorainit_report.json").read_text())
    assert report["method"] == "lora_da"

    base = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    model = PeftModel.from_pretrained(base, out)
    loaded = {k: v for k, v in model.state_dict().items() if "lora_A" in k}
    assert len(loaded) == 4
    for k, v in loaded.items():
        key = next(s for s in saved if s.replace(".weight", "") in k)
        assert torch.equal(v, saved[key])


def test_base_changing_method_saves_the_residual_base(tiny_lm_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "pissa"
    assert main(["init", "--model", str(tiny_lm_dir), "--method", "pissa", "--rank", "2",
                 "--target-modules", "v_proj", "--out", str(out), "--quiet"]) == 0
    base_dir = out / "base_model"
    assert (base_dir / "config.json").is_file()
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    original = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    residual = AutoModelForCausalLM.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(residual, out).eval()
    with torch.no_grad():
        want = original(ids).logits
        with_adapter = (model(ids).logits - want).abs().max()
        assert with_adapter <= 1e-5 * want.abs().max()
        # without the adapter the residual model differs: the init really moved W into the adapter
        with model.disable_adapter():
            without = (model(ids).logits - want).abs().max()
        assert without > 100 * with_adapter


@pytest.mark.parametrize("argv, needle", [
    (["init", "--model", "/nonexistent", "--target-modules", "q_proj", "--out", "x"], "--model"),
    (["init", "--model", "{model}", "--data", "/nonexistent.jsonl", "--target-modules", "q_proj", "--out", "x"], "--data"),
    (["init", "--model", "{model}", "--data", "{bad}", "--target-modules", "q_proj", "--out", "x"], "not valid JSON"),
    (["init", "--model", "{model}", "--data", "{data}", "--target-modules", "nope", "--out", "x"], "--target-modules"),
    (["init", "--model", "{model}", "--data", "{data}", "--method", "magic", "--target-modules", "q_proj", "--out", "x"], "--method"),
    (["init", "--model", "{model}", "--data", "{data}", "--rank", "0", "--target-modules", "q_proj", "--out", "x"], "--rank"),
    (["init", "--model", "{model}", "--method", "lora_da", "--target-modules", "q_proj", "--out", "x"], "--data is required"),
    (["init", "--model", "{model}", "--data", "{data}", "--rank", "64", "--target-modules", "q_proj", "--out", "x"], "rank"),
    (["init", "--rank", "notanint"], "error"),
    (["frobnicate"], "error"),
])
def test_bad_arguments_give_one_line_and_exit_2(argv, needle, tiny_lm_dir, jsonl_file, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{oops\n')
    argv = [a.format(model=tiny_lm_dir, data=jsonl_file, bad=bad) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert needle in err


def test_methods_lists_every_registered_method(capsys):
    from lorainit.registry import methods

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for spec in methods():
        assert spec["name"] in out
    assert "lora_da" in out


def test_help_describes_the_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("init", "methods", "demo"):
        assert command in out
    assert "bench" not in out  # the benchmarks live in the source checkout (make bench), not in the CLI
    assert main(["bench"]) == 2


def test_demo_model_smollm2_goes_to_the_real_model_demo_with_its_own_options():
    from lorainit.cli import _smollm2_demo_argv

    assert _smollm2_demo_argv(["demo", "--model", "smollm2", "--layers", "0,1"]) == ["--layers", "0,1"]
    assert _smollm2_demo_argv(["demo", "--samples", "8", "--model=smollm2"]) == ["--samples", "8"]
    assert _smollm2_demo_argv(["demo", "--model", "digits"]) is None
    assert _smollm2_demo_argv(["init", "--model", "smollm2"]) is None


def test_version_flag(capsys):
    import lorainit

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"lorainit {lorainit.__version__}"


def test_layers_dropout_and_threads_reach_the_adapter(tiny_lm_dir, jsonl_file, tmp_path, monkeypatch):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    calls = []
    load = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):  # transformers logs "torch_dtype is deprecated" once per process
        calls.append(kwargs)
        return load(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    threads = torch.get_num_threads()
    out = tmp_path / "a"
    try:
        assert main(["init", "--model", str(tiny_lm_dir), "--data", str(jsonl_file), "--rank", "2",
                     "--target-modules", "q_proj,v_proj", "--layers", "1", "--lora-dropout", "0.1",
                     "--num-threads", "1", "--num-samples", "8", "--out", str(out), "--quiet"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["layers_to_transform"] == [1] and cfg["lora_dropout"] == 0.1
    keys = [k for k in load_file(out / "adapter_model.safetensors") if "lora_A" in k]
    assert len(keys) == 2 and all(".layers.1." in k for k in keys)
    report = json.loads((out / "lorainit_report.json").read_text())
    assert [r["name"].split("layers.")[1] for r in report["layers"]] == ["1.self_attn.q_proj", "1.self_attn.v_proj"]
    # the CLI's own from_pretrained call passes dtype=, not the deprecated torch_dtype=
    assert len(calls) == 1 and "torch_dtype" not in calls[0] and calls[0]["dtype"] == torch.float32


@pytest.mark.parametrize("flags, needle", [(["--layers", "5"], "--layers"), (["--layers", "a"], "--layers"),
                                           (["--lora-dropout", "1.5"], "--lora-dropout"),
                                           (["--num-threads", "0"], "--num-threads"),
                                           (["--lora-lr", "-1e-3"], "--lora-lr"), (["--lora-lr", "nan"], "--lora-lr")])
def test_bad_layers_dropout_threads_give_one_line(flags, needle, tiny_lm_dir, jsonl_file, tmp_path, capsys):
    assert main(["init", "--model", str(tiny_lm_dir), "--data", str(jsonl_file), "--target-modules", "q_proj",
                 "--out", str(tmp_path / "x"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


def test_smollm2_demo_help_explains_every_option(capsys):
    from lorainit.examples.smollm2_demo import build_parser

    for action in build_parser()._actions:
        assert action.help and action.help.strip(), action.option_strings
    assert main(["demo", "--model", "smollm2", "--help"]) == 0
    assert "on which the loss after init is scored" in " ".join(capsys.readouterr().out.split())


def test_init_tells_the_learning_rate_for_the_init(tiny_lm_dir, jsonl_file, tmp_path, capsys):
    out = tmp_path / "p"
    assert main(["init", "--model", str(tiny_lm_dir), "--data", str(jsonl_file), "--method", "pissa", "--rank", "2",
                 "--target-modules", "q_proj,v_proj", "--out", str(out), "--lora-lr", "2e-4"]) == 0
    text = capsys.readouterr().out
    scale = json.loads((out / "lorainit_report.json").read_text())["info"]["lr_scale"]["value"]
    assert f"learning rate: {2e-4 * scale:.3g} (lr_scale {scale:.3g} x plain LoRA's 0.0002)" in text
