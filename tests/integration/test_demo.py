"""`make demo` / `lorainit demo` end to end on a short budget, and the digits task's bookkeeping."""
import torch

from lorainit.examples import digits, digits_demo as demo


def test_demo_writes_table_and_plot(tmp_path, capsys):
    code = demo.main(["--methods", "lora,lora_da", "--seeds", "1", "--steps", "12", "--out", str(tmp_path)])
    assert code == 0
    table = (tmp_path / "digits.md").read_text()
    assert "| lora |" in table and "| lora_da |" in table
    assert (tmp_path / "digits_loss.png").stat().st_size > 1000
    assert "pretrained on odd digits" in capsys.readouterr().out


def test_demo_rejects_unknown_methods(tmp_path, capsys):
    assert demo.main(["--methods", "lora,magic", "--out", str(tmp_path)]) == 2
    assert "magic" in capsys.readouterr().err


def test_finetune_records_losses_at_the_right_steps():
    task = digits.load_task()
    base = digits.pretrain(task, steps=20)
    run = digits.finetune(base, task, "lora", steps=10, eval_every=4, seed=0)
    assert run.loss_steps == [0, 4, 8, 10]
    assert run.loss_at(5) == run.losses[1] and run.loss_at(10) == run.losses[-1]
    n_test = len(task.test_y)
    assert abs(run.test_accuracy * n_test - round(run.test_accuracy * n_test)) < 1e-3  # a count over the test split
    # the base knows only odd digits (its test accuracy on even ones is 0); 80 steps teach the even digits well
    # above chance among the five (0.62 to 0.75 over seeds 0-2 on this split), 10 steps do not
    trained = digits.finetune(base, task, "lora", steps=80, eval_every=80, seed=0)
    assert trained.test_accuracy > 0.4 and trained.test_accuracy > run.test_accuracy + 0.2
    # the task split: pretraining on odd digits only, fine-tuning on even digits only
    assert set(task.pre_y.tolist()) == set(digits.ODD) and set(task.train_y.tolist()) == set(digits.EVEN)
    assert torch.isfinite(torch.tensor(run.losses)).all()
