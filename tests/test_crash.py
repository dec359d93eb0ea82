"""SIGKILL every heavy stage at random points, several times; then rerun it to the end.

After each kill, whatever the stage left behind is read by the stage's own reader: either there
is no output yet (the reader refuses with a clear error) or the output is whole and equal to an
uninterrupted run's. After the final rerun the output equals the uninterrupted run's.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from ckaflow import config
from ckaflow.errors import CkaflowError
from tests.conftest import BIN, ENV, tiny_config

KILLS = 3


def ckaflow(*args: str) -> list[str]:
    return [str(BIN / "ckaflow"), *map(str, args)]


def run_to_end(cmd: list[str]) -> None:
    result = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def kill_after(cmd: list[str], seconds: float) -> bool:
    """Start the command and SIGKILL it after `seconds`; True if it was still running."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=seconds)
        return False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return True


def read_or_refuse(read, out: Path):
    """What a reader makes of the output: its content, or None when it refuses cleanly."""
    try:
        return read(out)
    except (CkaflowError, FileNotFoundError):
        return None


def crash_and_resume(name: str, make_cmd, read, same, tmp_path: Path):
    """Reference run; then KILLS kills at seeded random points between 30 % and 97 % of the
    reference run's duration, each followed by a reader check; then a run to the end, compared."""
    reference = tmp_path / "reference"
    started = time.perf_counter()
    run_to_end(make_cmd(reference))
    duration = time.perf_counter() - started
    span = (0.3 * duration, 0.97 * duration)
    expected = read(reference)
    out = tmp_path / "crashed"
    rng = random.Random(f"crash-{name}")  # seeded: the same kill points on every run
    killed = 0
    for _ in range(KILLS):
        killed += kill_after(make_cmd(out), rng.uniform(*span))
        seen = read_or_refuse(read, out)
        assert seen is None or same(seen, expected), f"{name}: a half-written output was read"
    assert killed, f"{name}: no kill landed inside the stage; widen its time span"
    run_to_end(make_cmd(out))
    assert same(read(out), expected), f"{name}: resumed output differs"


def _model_state(run_dir: Path):
    from ckaflow.train.loop import load_network

    net, _ = load_network(run_dir / "model.pt")
    losses = pd.read_parquet(run_dir / "metrics.parquet")["loss"].tolist()
    return net.state_dict(), losses


def _same_model(a, b) -> bool:
    return all(torch.equal(a[0][k], b[0][k]) for k in a[0]) and a[1] == b[1]


def _store_arrays(path: Path, opener) -> dict[str, np.ndarray]:
    store = opener(path)
    return {layer["name"]: np.asarray(store[layer["name"]][:]) for layer in store.layers}


def _same_arrays(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _same_table(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    drop = [c for c in ("code_version", "merged_by") if c in a.columns]
    return a.drop(columns=drop).equals(b.drop(columns=drop))


@pytest.mark.crash
def test_training_killed_at_random_points(prepared, tmp_path):
    cfg = tiny_config(
        recipes={"simclr": {"epochs": 3, "batch_size": 32, "optimizer": "lars", "lr": 0.5}}
    )
    run = next(r for r in config.run_specs(cfg) if r.method == "simclr")
    spec = json.dumps(
        {"run": config.to_jsonable(run), "augment": config.to_jsonable(config.augment_spec(cfg))}
    )

    def cmd(out):
        return ckaflow(
            "train", "--spec", spec, "--data", prepared, "--out-dir", out, "--device", "cpu",
            "--threads", 1, "--checkpoint", json.dumps({"every_steps": 2}),
        )  # fmt: skip

    crash_and_resume("train", cmd, _model_state, _same_model, tmp_path)


@pytest.mark.crash
def test_extraction_killed_at_random_points(trained, prepared, tmp_path):
    from ckaflow.activations import open_store

    def cmd(out):
        return ckaflow(
            "extract", "--model", trained["supervised"], "--data", prepared, "--view", "aug1",
            "--out", out / "aug1.zarr", "--batch-size", 16, "--chunk-rows", 32, "--device", "cpu",
            "--threads", 1,
        )  # fmt: skip

    def read(out):
        return _store_arrays(out / "aug1.zarr", open_store)

    crash_and_resume("extract", cmd, read, _same_arrays, tmp_path)


@pytest.mark.crash
def test_gram_killed_at_random_points(activations, tmp_path):
    from ckaflow.cka.gram import open_gram

    def cmd(out):
        return ckaflow(
            "gram", "--source", activations[("simclr", "clean")], "--out", out / "g.zarr",
            "--estimator", "rbf", "--device", "cpu",
        )  # fmt: skip

    def read(out):
        return _store_arrays(out / "g.zarr", open_gram)

    crash_and_resume("gram", cmd, read, _same_arrays, tmp_path)


@pytest.fixture(scope="module")
def grams(activations, tmp_path_factory) -> dict[str, Path]:
    from ckaflow.cka.gram import gram_store

    root = tmp_path_factory.mktemp("grams")
    return {
        method: gram_store(activations[(method, "clean")], root / f"{method}.zarr", "minibatch", 64)
        for method in ("simclr", "supervised")
    }


@pytest.mark.crash
def test_tile_and_merge_killed_at_random_points(grams, tmp_path):
    def tile_cmd(out, rows="0:28", cols="0:27"):
        return ckaflow(
            "tile", "--comparison", "cross-x", "--kind", "cross", "--a", grams["simclr"],
            "--b", grams["supervised"], "--rows", rows, "--cols", cols,
            "--estimator", "minibatch", "--bootstrap", 2000, "--out", out / f"{rows}.parquet",
        )  # fmt: skip

    def read_tile(out):
        return pd.read_parquet(out / "0:28.parquet") if (out / "0:28.parquet").exists() else None

    crash_and_resume("tile", tile_cmd, read_tile, _same_table, tmp_path / "t")

    tiles = tmp_path / "tiles"
    for rows in ("0:14", "14:28"):
        run_to_end(tile_cmd(tiles, rows=rows))

    def merge_cmd(out):
        parts = sorted(tiles.glob("*.parquet"))
        return ckaflow("merge", "--out", out / "cka.parquet", "--config-hash", "h", *parts)

    def read_merged(out):
        path = out / "cka.parquet"
        return pd.read_parquet(path) if path.exists() else None

    crash_and_resume("merge", merge_cmd, read_merged, _same_table, tmp_path / "m")
    assert len(read_merged(tmp_path / "m" / "crashed")) == 28 * 27


def test_kill_after_reports_whether_it_killed():
    assert kill_after(["sleep", "5"], 0.2) is True
    assert kill_after(["true"], 2.0) is False
