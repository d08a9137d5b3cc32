"""bench.legacy: the old LOBPCG from git history is patched exactly or not at all; a missing commit warns."""
import subprocess

import pytest
import torch

from bench import legacy


def _old_like_source():
    return ("import torch\n" + legacy.PATCHES[0][0] + "\n\ndef _kernel(name):\n" + legacy.PATCHES[1][0] + "\n")


def test_every_patch_must_match_exactly_once():
    patched = legacy.patch_source(_old_like_source())
    assert "_backends" not in patched and "getattr(_legacy_native, name)" in patched
    missing = _old_like_source().replace(legacy.PATCHES[1][0], "    return None")
    with pytest.raises(RuntimeError, match="patch 1 .* matches 0 times in here, expected once"):
        legacy.patch_source(missing, "here")
    twice = _old_like_source() + legacy.PATCHES[0][0]
    with pytest.raises(RuntimeError, match="patch 0 .* matches 2 times"):
        legacy.patch_source(twice)


def test_a_checkout_without_the_commit_warns_and_gives_none(monkeypatch):
    def no_commit(*args, **kwargs):
        raise subprocess.CalledProcessError(128, args[0], stderr="fatal: invalid object name '3c4612c'")

    monkeypatch.setattr(legacy.subprocess, "run", no_commit)
    with pytest.warns(RuntimeWarning, match="invalid object name .* row is left out"):
        assert legacy.pre_robustness_lobpcg() is None


def test_the_old_solver_loads_and_solves_when_history_is_there():
    try:
        subprocess.run(["git", "cat-file", "-e", f"{legacy.PRE_ROBUSTNESS_COMMIT}^{{commit}}"], check=True,
                       cwd=legacy.Path(legacy.__file__).resolve().parent.parent, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"commit {legacy.PRE_ROBUSTNESS_COMMIT} is not in this checkout (a shallow clone)")
    mod = legacy.pre_robustness_lobpcg()
    g = torch.Generator().manual_seed(1)
    Q, _ = torch.linalg.qr(torch.randn(2, 61, 61, generator=g, dtype=torch.float64))
    evals = torch.linspace(-3.0, 5.0, 61, dtype=torch.float64)
    M = (Q * evals) @ Q.transpose(-1, -2)
    M = ((M + M.transpose(-1, -2)) / 2).float()
    _, V = mod.lobpcg(M, 3)[:2]
    objective = torch.einsum("bni,bnm,bmi->b", V.double(), M.double(), V.double())
    assert torch.allclose(objective, evals[:3].sum().expand(2), rtol=1e-4)
