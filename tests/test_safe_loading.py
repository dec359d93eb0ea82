"""Loading a file never runs code from it: every `.pt` reader refuses a pickle that would."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from ckaflow import config
from tests.conftest import BIN, ENV, stage_spec, tiny_config


class Booby:
    """Unpickling this calls open(marker, "w"): a file appears if the loader runs the pickle."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def booby_trapped(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "meta": Booby(marker)}, path)
    return path, marker


def _refused(cmd: list[str], marker) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert "refused" in result.stderr and "could run code" in result.stderr
    assert not marker.exists()
    return result.stderr


def test_the_trap_is_real(booby_trapped):
    """The file does run code when unpickled without the guard (what the test protects from)."""
    path, marker = booby_trapped
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_inspect_refuses_it(booby_trapped):
    path, marker = booby_trapped
    err = _refused([str(BIN / "ckaflow"), "inspect", str(path)], marker)
    assert str(path) in err


@pytest.mark.parametrize("stage", ["extract", "gram", "evaluate"])
def test_model_stages_refuse_it(booby_trapped, prepared, tmp_path, stage):
    path, marker = booby_trapped
    cmd = [
        *(str(BIN / "ckaflow"), stage, "--model", str(path), "--data", str(prepared)),
        *("--out", str(tmp_path / "out"), "--device", "cpu", "--backend", "local"),
        *("--spec", stage_spec(stage)),
    ]
    if stage != "evaluate":
        cmd += ["--view", "clean"]
    _refused(cmd, marker)
    assert not (tmp_path / "out").exists()


def test_training_refuses_to_resume_from_it(booby_trapped, prepared, tmp_path):
    """A foreign pickle where the run's checkpoint belongs stops the stage (it is not damage to
    retrain over silently), and nothing of it runs."""
    path, marker = booby_trapped
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    path.rename(run_dir / "checkpoint.pt")
    cfg = tiny_config()
    run = config.run_specs(cfg)[1]
    spec = {"run": config.to_jsonable(run), "augment": config.to_jsonable(config.augment_spec(cfg))}
    cmd = [
        *(str(BIN / "ckaflow"), "train", "--spec", json.dumps(spec), "--data", str(prepared)),
        *("--out", str(run_dir), "--device", "cpu", "--backend", "local"),
    ]
    _refused(cmd, marker)
    assert not (run_dir / "model.pt").exists()


def test_a_damaged_file_is_damage_not_a_threat(tmp_path):
    """Bytes that are no pickle at all: "not a readable checkpoint", not "refused"."""
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not a checkpoint")
    result = subprocess.run(
        [str(BIN / "ckaflow"), "inspect", str(bad)], capture_output=True, text=True, env=ENV
    )
    assert result.returncode == 2
    assert "not a readable checkpoint" in result.stderr and "refused" not in result.stderr
