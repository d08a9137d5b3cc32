"""The learning-rate-fair protocol's bookkeeping (bench/experiments/smollm2_gsm.py): the rate chosen on the
validation loss, the grid extended beyond an end, the seeds at the chosen rate, the later phases, the
tables. No model is loaded."""
import math

import pytest

from bench.experiments import smollm2_gsm as gsm


def _args(*extra):
    return gsm.parse_args(["--methods", "lora,lora_da,pissa,lora_da:no_bias", "--lrs", "1e-4,1e-3", "--max-extend", "1",
                           "--sweep-ranks", "2", *extra])


def _run(method, lr, val, seed=0, rank=8, acc=0.5, phase="grid", scale=1.0):
    return {"method": method, "rank": rank, "lr": lr, "seed": seed, "phase": phase, "accuracy": acc, "val_loss": val,
            "val_loss_init": 2.0, "diverged": not math.isfinite(val), "lr_scale": scale, "init_s": 1.0,
            "train_s": 2.0, "eval_s": 1.0, "train_losses": [1.0, 0.5]}


def test_the_grid_comes_first_method_by_method():
    todo = gsm.plan([], _args())
    assert [k for k, _ in todo] == [("lora", 8, 1e-4, 0), ("lora", 8, 1e-3, 0), ("lora_da", 8, 1e-4, 0),
                                    ("lora_da", 8, 1e-3, 0), ("pissa", 8, 1e-4, 0), ("pissa", 8, 1e-3, 0)]


def test_the_rate_is_chosen_on_validation_loss_and_diverged_runs_lose():
    runs = [_run("lora", 1e-4, 0.9, acc=0.9), _run("lora", 1e-3, 0.5, acc=0.1), _run("lora", 3e-3, float("nan"))]
    assert gsm.chosen_lr(runs, "lora", 8) == 1e-3  # not the higher test accuracy
    assert gsm.chosen_lr([_run("lora", 1e-3, float("nan"))], "lora", 8) is None


def test_an_end_of_the_grid_is_extended_then_seeds_follow():
    args = _args()
    runs = [_run("lora", 1e-4, 0.4), _run("lora", 1e-3, 0.6)]
    assert gsm.extension(runs, "lora", 8, args.lr_grid, 1) == pytest.approx(3.33e-5)
    runs.append(_run("lora", 3.33e-5, 0.5))  # the best is now inside: no more extension, seeds at 1e-4
    assert gsm.extension(runs, "lora", 8, args.lr_grid, 1) is None
    todo = [k for k, _ in gsm.plan(runs, args)]
    assert ("lora", 8, 1e-4, 1) in todo and ("lora", 8, 1e-4, 2) in todo
    # max_extend bounds the extension: the best at the new end does not extend again
    runs[-1]["val_loss"] = 0.1
    assert gsm.extension(runs, "lora", 8, args.lr_grid, 1) is None
    assert gsm.chosen_lr(runs, "lora", 8) == 3.33e-5


def test_ablations_sweep_and_suggested_rates_follow_the_chosen_rates():
    args = _args()
    runs = [_run("lora", 1e-4, 0.9), _run("lora", 1e-3, 0.5), _run("lora", 3e-3, 0.7),
            _run("lora_da", 1e-4, 0.4, scale=0.5), _run("lora_da", 1e-3, 0.6, scale=0.5),
            _run("lora_da", 3.33e-5, 0.45, scale=0.5)]
    todo = gsm.plan(runs, args)
    keys = [k for k, _ in todo]
    assert ("lora_da:no_bias", 8, 3.33e-5, 0) in keys and ("lora_da:no_bias", 8, 3e-4, 0) in keys
    assert ("lora", 2, 1e-3, 0) in keys and ("lora_da", 2, 1e-4, 0) in keys  # the rank sweep around each rate
    assert (("lora_da", 8, 5e-4, 0), "suggested") in todo  # lora's 1e-3 times lr_scale 0.5
    assert not any(k[0] == "lora" and p == "suggested" for k, p in todo)


def test_suggestion_rows_compare_with_the_chosen_rate():
    runs = [_run("lora", 1e-4, 0.9), _run("lora", 1e-3, 0.5), _run("lora", 3e-3, 0.7),
            _run("pissa", 1e-4, 0.3, acc=0.6, scale=0.1), _run("pissa", 1e-3, 0.9, acc=0.2, scale=0.1),
            _run("pissa", 3.33e-5, 0.4, acc=0.5, scale=0.1)]
    rows = gsm.suggestion_rows(runs, ["lora", "pissa"], 8)
    assert len(rows) == 1 and rows[0]["suggested lr"] == pytest.approx(1e-4) and rows[0]["within 3x"]
    assert rows[0]["fraction of best"] == pytest.approx(1.0)  # the grid run at 1e-4 is the suggested one


def test_best_rate_rows_average_the_seeds_at_the_chosen_rate():
    runs = [_run("lora", 1e-4, 0.9, acc=0.9), _run("lora", 1e-3, 0.5, acc=0.2),
            _run("lora", 1e-3, 0.5, seed=1, acc=0.4), _run("lora", 1e-3, 0.5, seed=2, acc=0.6)]
    row = gsm.best_rate_rows(runs, ["lora"], 8)[0]
    assert row["chosen lr"] == 1e-3 and row["seeds"] == 3
    assert row["exact match"] == pytest.approx(0.4) and row["std"] == pytest.approx(0.2)


def test_markdown_holds_both_headline_tables():
    args = _args()
    payload = {"args": vars(args), "runs": [_run("lora", 1e-4, 0.9), _run("lora", 1e-3, 0.5), _run("pissa", 1e-3, 0.7)],
               "base_accuracy": 0.05, "base_val_loss": 2.3, "remaining": 3,
               "env": {"machine": "x86_64", "torch": "2.13", "threads": 2, "date": "2026-12-07"}}
    md = gsm.markdown(payload)
    assert "## Each init at its own best learning rate" in md
    assert "## Every init at plain LoRA's best learning rate" in md and "incomplete" in md


def test_bad_arguments_are_refused_before_the_model_loads():
    with pytest.raises(SystemExit, match="--lrs"):
        gsm.parse_args(["--lrs", "1e-3"])
    with pytest.raises(SystemExit, match="rank"):
        gsm.parse_args(["--sweep-ranks", "0,2"])


# ---------------------------------------------------------------------------------------------
# the frozen-prefix cache and the tail forward against the whole model (real SmolLM2)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_tail():
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    from lorainit.examples import arithmetic as ar
    from lorainit.models import LLAMA_PROJECTIONS, load_smollm2

    base, tok = load_smollm2(torch.float32)
    torch.manual_seed(0)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_PROJECTIONS,
                                                           layers_to_transform=[28, 29]))
    for name, p in model.named_parameters():  # a non-zero adapter, so the tail's LoRA path counts
        if "lora_B" in name:
            p.data.normal_(0, 0.02)
    problems, _ = ar.split_problems(24, 0, seed=11, max_ops=1, max_value=9)
    return base, model, tok, problems


def test_tail_on_cached_prefix_equals_the_whole_model(smollm2_tail):
    import torch

    from lorainit.examples import arithmetic as ar

    base, model, tok, problems = smollm2_tail
    cache = gsm.PrefixCache(base, tok, problems, 28)
    lm = model.get_base_model()
    idx = [3, 0, 7, 5]  # unequal lengths: right padding
    logits, target, sel = gsm.tail_answer_logits(lm, 28, *cache.batch(idx))
    batch = ar.Collator(tok)([ar.ArithmeticDataset([problems[i] for i in idx], tok)[k] for k in range(4)])
    with torch.no_grad():
        full = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    assert torch.equal(target, batch["labels"][:, 1:][sel])
    torch.testing.assert_close(logits.detach(), full[sel], rtol=1e-4, atol=1e-4)
    loss, _ = gsm.evaluate(lm, cache)
    assert loss == pytest.approx(ar.answer_loss(lm, list(ar.make_loader(problems, tok, batch_size=8))), rel=1e-4)


def test_exact_match_is_the_greedy_verdict(smollm2_tail):
    """evaluate()'s exact match == generate() produces exactly the answer tokens and then EOS."""
    import torch

    from lorainit.examples import arithmetic as ar

    base, _, tok, problems = smollm2_tail
    cache = gsm.PrefixCache(base, tok, problems, 28)
    ds = ar.ArithmeticDataset(problems, tok)
    right = 0
    for i, p in enumerate(problems):
        prompt = tok(p.prompt, add_special_tokens=False)["input_ids"]
        want = ds[i]["input_ids"][len(prompt):]
        with torch.no_grad():
            got = base.generate(input_ids=torch.tensor([prompt]), max_new_tokens=len(want), do_sample=False,
                                pad_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)[0, len(prompt):]
        right += got.tolist() == want
    _, acc = gsm.evaluate(base, cache, batch_size=5)
    assert acc == right / len(problems)


def test_the_protocol_covers_every_registry_method():
    import lorainit
    from lorainit.registry import BUILTIN

    assert set(gsm.MAIN_METHODS) == set(BUILTIN) and len(gsm.MAIN_METHODS) == len(set(gsm.MAIN_METHODS))
    assert {m["name"] for m in lorainit.methods()} >= set(gsm.MAIN_METHODS)


def test_a_rate_is_provisional_until_its_grid_is_done():
    args = _args()
    runs = [_run("lora", 1e-4, 0.9), _run("lora", 1e-3, 0.5)]
    rows = gsm.best_rate_rows(runs, ["lora"], 8, lambda m: (args.lr_grid, 1))
    assert rows[0]["rate"] == "provisional"  # 1e-3 is the best at the grid's end: its extension is pending
    runs.append(_run("lora", 3e-3, 0.7))
    rows = gsm.best_rate_rows(runs, ["lora"], 8, lambda m: (args.lr_grid, 1))
    assert rows[0]["rate"] == "final"
