"""transformers.Trainer + LoRAInitCallback: the adapters are initialized before the first step."""
import pytest
import torch

from integration_helpers import Recorder, build_tokenizer, sentences


def _model(path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(path)
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                           task_type="CAUSAL_LM"))


def _dataset(n=16):
    tok = build_tokenizer()
    rows = []
    for text in sentences(n, seed=3):
        enc = tok(text, truncation=True, max_length=16)
        rows.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return tok, rows


def test_trainer_initializes_adapters_from_its_dataloader(tiny_lm_dir, tmp_path):
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from lorainit import LoRADAConfig, LoRAInitCallback, initialize_lora

    tok, rows = _dataset()
    collator = DataCollatorForLanguageModeling(tok, mlm=False)
    # fixed step and dense solver: the init must not depend on the batch order (statistics are sums)
    config = LoRADAConfig(step_scale=0.5, solver="eigh")
    model = _model(tiny_lm_dir)
    init_cb = LoRAInitCallback(method="lora_da", config=config, num_samples=len(rows), progress=False)
    rec = Recorder()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, report_to=[],
                             use_cpu=True, logging_steps=1, save_strategy="no", learning_rate=1e-3, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collator,
                      callbacks=[init_cb, rec.callback()])
    trainer.train()
    assert init_cb.report is not None and init_cb.report.method == "lora_da"

    # The same init computed directly on the same samples (statistics are sums: order-free).
    reference = _model(tiny_lm_dir)
    batches = [collator(rows[i:i + 4]) for i in range(0, len(rows), 4)]
    initialize_lora(reference, batches, method="lora_da", config=config, num_samples=len(rows), progress=False)
    want = {k: v for k, v in reference.state_dict().items() if "lora_" in k}
    assert rec.weights.keys() == want.keys()
    for key in [k for k in want if "lora_A" in k]:
        b_key = key.replace("lora_A", "lora_B")
        got_update = rec.weights[b_key] @ rec.weights[key]
        want_update = want[b_key] @ want[key]
        assert torch.linalg.norm(want_update) > 0
        assert torch.allclose(got_update, want_update, rtol=1e-3, atol=1e-4 * want_update.abs().max())
    # and the trainer then trained from there
    trained = {k: v for k, v in model.state_dict().items() if "lora_B" in k}
    assert any(not torch.equal(trained[k], rec.weights[k]) for k in trained)


def test_callback_rejects_unknown_method():
    from lorainit import LoRAInitCallback

    with pytest.raises(ValueError, match="magic"):
        LoRAInitCallback(method="magic")


def test_callback_prints_saves_and_passes_adapter_loss_reduction_stats_cache(tiny_lm_dir, tmp_path, monkeypatch,
                                                                            capsys):
    import lorainit.init
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from lorainit import InitReport, LoRADAConfig, LoRAInitCallback

    calls = []
    real = lorainit.init.initialize_lora

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(lorainit.init, "initialize_lora", spy)

    def mean_loss(model, batch):  # the model's own (mean) loss: loss_reduction="mean" says so
        return model(**batch).loss

    tok, rows = _dataset(8)
    collator = DataCollatorForLanguageModeling(tok, mlm=False)
    cache, saved = tmp_path / "stats.safetensors", tmp_path / "report.json"
    reports = []
    for run in range(2):  # the second run reads the statistics from the cache
        cb = LoRAInitCallback(method="lora_da", config=LoRADAConfig(step_scale=0.1), num_samples=8, progress=False,
                              adapter="default", loss_fn=mean_loss, loss_reduction="mean", stats_cache=cache,
                              report_path=saved)
        args = TrainingArguments(output_dir=str(tmp_path / f"run{run}"), per_device_train_batch_size=4, max_steps=1,
                                 report_to=[], use_cpu=True, save_strategy="no", seed=0)
        Trainer(model=_model(tiny_lm_dir), args=args, train_dataset=rows, data_collator=collator,
                callbacks=[cb]).train()
        reports.append(cb.report)
        assert "lorainit: method=lora_da" in capsys.readouterr().out  # printed on the main process
        assert InitReport.from_json(saved).to_dict() == InitReport.from_json(cb.report.to_json()).to_dict()
    assert [c["adapter"] for c in calls] == ["default", "default"]
    assert [c["loss_reduction"] for c in calls] == ["mean", "mean"]
    assert [r.info["stats_cache"]["hit"] for r in reports] == [False, True]


def test_callback_can_stay_quiet(tiny_lm_dir, tmp_path, capsys):
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from lorainit import LoRAInitCallback

    tok, rows = _dataset(4)
    cb = LoRAInitCallback(method="lora", progress=False, print_report=False)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, report_to=[],
                             use_cpu=True, save_strategy="no", seed=0)
    Trainer(model=_model(tiny_lm_dir), args=args, train_dataset=rows,
            data_collator=DataCollatorForLanguageModeling(tok, mlm=False), callbacks=[cb]).train()
    assert cb.report is not None and "lorainit: method" not in capsys.readouterr().out


class LRRecorder:
    """The optimizer's learning rate at every step (after the scheduler)."""

    def __init__(self):
        self.lrs = []

    def callback(self):
        from transformers import TrainerCallback

        rec = self

        class _Cb(TrainerCallback):
            def on_step_begin(self, args, state, control, optimizer=None, **kw):
                rec.lrs.append(optimizer.param_groups[0]["lr"])

        return _Cb()


@pytest.mark.parametrize("scale_lr", [False, True])
def test_callback_scales_the_learning_rate_on_request(tiny_lm_dir, tmp_path, capsys, scale_lr):
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from lorainit import LoRAInitCallback

    tok, rows = _dataset(8)
    cb = LoRAInitCallback(method="gaussian", progress=False, scale_lr=scale_lr)
    rec = LRRecorder()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, report_to=[],
                             use_cpu=True, save_strategy="no", seed=0, learning_rate=1e-3, lr_scheduler_type="linear",
                             warmup_steps=1)
    Trainer(model=_model(tiny_lm_dir), args=args, train_dataset=rows,
            data_collator=DataCollatorForLanguageModeling(tok, mlm=False), callbacks=[cb, rec.callback()]).train()
    scale = cb.report.lr_scale
    assert scale is not None and 0 < scale < 0.9  # gaussian's A (std 1/r) is larger than kaiming's: a smaller rate
    out = capsys.readouterr().out
    # the same schedule (warmup then linear decay), scaled as a whole: peak at step 2
    peak = max(rec.lrs)
    if scale_lr:
        assert peak == pytest.approx(1e-3 * scale, rel=1e-6)
        assert cb.report.info["lr_scale"]["applied"] == {"from": 1e-3, "to": pytest.approx(1e-3 * scale)}
        assert "learning rate 0.001 ->" in out
    else:
        assert peak == pytest.approx(1e-3, rel=1e-6)
        assert "applied" not in cb.report.info["lr_scale"] and "scale_lr=True" in out
