"""Errors where the user looks: a failed stage's own message in the terminal under its rule's
name, a misspelt config key named with the nearest valid one in a few lines (from Snakemake
and from `ckaflow plan`), any PyTorch checkpoint inspected without running code, and a table
view that fits the terminal."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from tests.conftest import BIN, ENV, REPO, snakemake_cmd

TINY = REPO / "tests" / "configs" / "tiny.yaml"


def _study(tmp_path: Path, **changes) -> Path:
    cfg = yaml.safe_load(TINY.read_text())
    for key, value in changes.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(cmd: list[str], cwd: Path, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env or ENV, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("tool", ["snakemake", "plan"])
def test_a_misspelt_key_is_named_with_the_nearest_valid_one_in_a_few_lines(tmp_path, tool):
    study = _study(tmp_path, cka={"bootstrp": 200})
    if tool == "snakemake":
        done = _run(snakemake_cmd(tmp_path, study, "-n"), tmp_path)
    else:
        done = _run([str(BIN / "ckaflow"), "plan", str(study)], tmp_path)
    said = done.stdout + done.stderr
    assert done.returncode != 0
    assert "cka.bootstrp: unknown key; did you mean `bootstrap`?" in said, said
    assert len(said.strip().splitlines()) <= 6, said  # not the schema, not a traceback
    assert "Traceback" not in said


def test_a_failed_stage_shows_its_own_message_under_its_rule(tmp_path):
    """A damaged checkpoint to import: the terminal shows the import stage's own message (which
    used to be only in the rule's log file), under the rule's name."""
    damaged = tmp_path / "resnet18.pth"
    damaged.write_bytes(b"PK\x03\x04 not a whole zip archive")
    imports = [{"name": "tv", "checkpoint": str(damaged), "format": "torchvision",
                "arch": "resnet18", "head": "encoder", "method": "supervised"}]  # fmt: skip
    study = _study(tmp_path, imports=imports, data={"train_size": 64, "eval_size": 32})
    done = _run(snakemake_cmd(tmp_path, study, "--", "results/runs/tv/model.pt"), tmp_path)
    assert done.returncode != 0
    said = done.stdout + done.stderr
    shown = said.split("ckaflow: a stage failed; the end of results/logs/import_run/tv.log:", 1)
    assert len(shown) == 2, said[-3000:]
    assert f"ckaflow import-run: error: {damaged}: not a readable checkpoint" in shown[1], said


def _resnet18_state() -> dict:
    import torchvision

    return torchvision.models.resnet18(num_classes=10).state_dict()


@pytest.mark.parametrize(
    ("name", "content", "fits"),
    [
        ("tv.pth", lambda s: s, "torchvision, timm"),
        (
            "solo.ckpt",
            lambda s: {
                "state_dict": {f"backbone.{k}": v for k, v in s.items() if not k.startswith("fc.")},
                "epoch": 3,
            },
            "lightly, solo-learn",
        ),  # fmt: skip
        ("other.pt", lambda s: {"w": torch.zeros(2, 3, dtype=torch.float16)}, None),
    ],
)
def test_inspect_lists_any_checkpoints_tensors_and_the_formats_it_fits(tmp_path, name, content,
                                                                       fits):  # fmt: skip
    path = tmp_path / name
    torch.save(content(_resnet18_state()), path)
    done = _run([str(BIN / "ckaflow"), "inspect", str(path)], tmp_path)
    assert done.returncode == 0, done.stderr
    said = done.stdout
    assert f"{path}: PyTorch checkpoint" in said
    if fits:
        assert "conv1.weight" in said and "(64, 3, 7, 7)" in said and "float32" in said
        assert f"its keys fit import format: {fits}" in said, said
    else:
        assert "w " in said and "(2, 3)" in said and "float16" in said
        assert "fit no ResNet import format: import it with format: module" in said


def test_inspect_of_a_pth_that_would_run_code_refuses_it(tmp_path):
    import pickle

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "trap.pth"
    torch.save({"conv1.weight": torch.zeros(1), "x": Payload()}, path, pickle_module=pickle)
    done = _run([str(BIN / "ckaflow"), "inspect", str(path)], tmp_path)
    assert done.returncode == 2 and "refused" in done.stderr, done.stderr
    assert not marker.exists()


def test_the_table_view_fits_the_terminal(tmp_path):
    rng = np.random.default_rng(0)
    n = 8
    table = pd.DataFrame(
        {
            "comparison": ["cross-simclr-resnet18-w8-s0-vs-supervised-resnet18-w8-s0"] * n,
            "kind": ["cross"] * n,
            "layer_a": [f"layer{i}.0.residual" for i in range(n)],
            "layer_b": [f"layer{i}.1.out" for i in range(n)],
            "value": rng.random(n),
            "ci_low": rng.random(n),
            "ci_high": rng.random(n),
            "source_a": ["results/gram/simclr-resnet18-w8-s0/clean.zarr"] * n,
            "source_b": ["results/gram/supervised-resnet18-w8-s0/clean.zarr"] * n,
            "estimator": ["minibatch"] * n,
            "config_hash": ["0123456789abcdef"] * n,
        }
    )
    path = tmp_path / "cka.parquet"
    table.to_parquet(path)
    done = _run([str(BIN / "ckaflow"), "inspect", str(path)], tmp_path,
                env={**ENV, "COLUMNS": "80", "LINES": "40"})  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()[1:]  # after the line naming the file
    assert max(map(len, lines)) <= 80, "\n".join(lines)
    assert any("layer0.0.residual" in line for line in lines)
