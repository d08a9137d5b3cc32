"""``accelerate launch`` of examples/accelerate/train.py (the recipe of docs/qlora-trl-accelerate.md, run as written).

2 processes (gloo on CPU) with ddp.yaml: a short transformers Trainer job with LoRAInitCallback; the
adapters it initializes equal those of one process on the union of the data (``--num-samples`` is
the total). fsdp2.yaml: on GPUs the same comparison with FSDP2 (DTensor) parameters; on CPU
accelerate enables no FSDP, and the script must say so instead of training with DDP.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")
pytest.importorskip("peft")
pytest.importorskip("datasets")
from safetensors.torch import load_file  # noqa: E402
from helpers import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "examples" / "accelerate"
TIMEOUT = 300


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "python"), str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _run(cmd, cwd):
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    return proc.returncode, proc.stdout + proc.stderr


def _train(tmp_path, model_dir, data, save, config=None):
    script = [str(RECIPE / "train.py"), "--model", str(model_dir), "--data", str(data), "--num-samples", "24",
              "--batch-size", "4", "--max-steps", "1", "--save", str(save), "--output-dir", str(tmp_path / "out")]
    if config is None:
        return _run([sys.executable] + script, tmp_path)
    for attempt in range(3):
        # the port was free when free_port() closed its socket; another process may take it before the
        # launcher binds it: only that rendezvous failure is retried, on a fresh port
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(RECIPE / config),
               "--main_process_port", str(free_port())] + script
        rc, out = _run(cmd, tmp_path)
        if rc == 0 or not any(marker in out for marker in _PORT_TAKEN):
            break
    return rc, out


_PORT_TAKEN = ("Address already in use", "EADDRINUSE", "failed to listen", "errno: 98")


def _updates(path):
    f = load_file(str(path))
    return {k: f[k.replace("lora_A", "lora_B")] @ f[k] for k in f if "lora_A" in k}


def _assert_same(got, want):
    assert got.keys() == want.keys() and len(want) == 14  # 7 projections x 2 layers
    for k in want:
        assert torch.linalg.norm(want[k]) > 0, k
        assert torch.allclose(got[k], want[k], rtol=1e-4, atol=1e-4 * want[k].abs().max()), k


@pytest.fixture(scope="module")
def one_process(tiny_lm_dir, tmp_path_factory):
    """The reference: one process on all 24 samples."""
    tmp = tmp_path_factory.mktemp("one")
    data = tmp / "train.jsonl"
    from integration_helpers import sentences

    data.write_text("\n".join(json.dumps({"text": s}) for s in sentences(24)) + "\n")
    rc, out = _train(tmp, tiny_lm_dir, data, tmp / "one.safetensors")
    assert rc == 0, out[-3000:]
    run = json.loads((tmp / "one.json").read_text())
    assert run["report"]["num_samples"] == 24 and "world_size" not in run["report"]
    return data, _updates(tmp / "one.safetensors")


def test_accelerate_launch_ddp_equals_one_process(tiny_lm_dir, one_process, tmp_path):
    data, want = one_process
    rc, out = _train(tmp_path, tiny_lm_dir, data, tmp_path / "ddp.safetensors", config="ddp.yaml")
    assert rc == 0, out[-3000:]
    run = json.loads((tmp_path / "ddp.json").read_text())
    assert run["report"]["world_size"] == 2 and run["report"]["num_samples"] == 24  # the total over both ranks
    assert "MULTI_CPU" in run["distributed_type"] or "MULTI_GPU" in run["distributed_type"]
    _assert_same(_updates(tmp_path / "ddp.safetensors"), want)


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="GPU case below")
def test_accelerate_launch_fsdp2_on_cpu_says_it_cannot(tiny_lm_dir, one_process, tmp_path):
    data, _ = one_process
    rc, out = _train(tmp_path, tiny_lm_dir, data, tmp_path / "fsdp.safetensors", config="fsdp2.yaml")
    assert rc != 0
    assert "asks for FSDP" in out and "enables FSDP only on GPUs" in out
    assert not (tmp_path / "fsdp.safetensors").exists()  # it stopped before training


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP under accelerate needs 2 GPUs (none on CPU)")
def test_accelerate_launch_fsdp2_equals_one_process(tiny_lm_dir, one_process, tmp_path):  # pragma: no cover - GPU
    data, want = one_process
    rc, out = _train(tmp_path, tiny_lm_dir, data, tmp_path / "fsdp.safetensors", config="fsdp2.yaml")
    assert rc == 0, out[-3000:]
    run = json.loads((tmp_path / "fsdp.json").read_text())
    assert "FSDP" in run["distributed_type"] and run["sharded"]
    assert run["report"]["world_size"] == 2 and run["report"]["num_samples"] == 24
    _assert_same(_updates(tmp_path / "fsdp.safetensors"), want)
