"""Every resumable stage SIGKILLed at named points (`ckaflow.killpoints`), not at chance moments.

For each stage and each point where a crash is hardest to survive (a chunk written and its
progress not yet recorded, the store's metadata torn in the middle of its write, a finished
scratch not yet renamed, a store renamed and the old one not yet deleted, a checkpoint on disk
and the next not yet begun): the killed run dies there (exit by SIGKILL, having announced the
point), a plain rerun finishes, its output equals an uninterrupted run's bit for bit, and no
scratch is left behind.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from ckaflow.killpoints import ENV as KILL_AT
from tests.conftest import ENV
from tests.test_crash import (
    _model_state,
    _same_arrays,
    _same_model,
    _same_table,
    _store_arrays,
    ckaflow,
    extract_command,
    fused_gram_command,
    leftovers,
    run_to_end,
    train_command,
)

pytestmark = pytest.mark.crash


def killed_at(point: str, cmd: list[str]) -> str:
    """Run `cmd` with the kill point armed; it must die by SIGKILL at that point."""
    env = {**ENV, KILL_AT: point}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == -signal.SIGKILL, f"{point}: not killed there\n{output[-3000:]}"
    assert f"kill point {point}: SIGKILL" in output, output[-3000:]
    return output


def kill_then_rerun(points, make_cmd, read, same, tmp_path: Path, before=None) -> dict[str, str]:
    """An uninterrupted reference; then, for each point, a fresh output folder (`before(out)`
    fills it first, e.g. with an older output to be replaced), a run killed at the point and a
    plain rerun, compared with the reference. The reruns' logs, by point."""
    reference = tmp_path / "reference"
    if before:
        before(reference)
    run_to_end(make_cmd(reference))
    expected = read(reference)
    logs = {}
    for point in points:
        out = tmp_path / point.replace(":", "-").replace("@", "-")
        if before:
            before(out)
        killed_at(point, make_cmd(out))
        logs[point] = run_to_end(make_cmd(out))
        assert same(read(out), expected), f"{point}: the rerun's output differs"
        assert leftovers(out) == [], f"{point}: scratch left behind"
    return logs


def test_training_killed_at_each_checkpoint_write(prepared, tmp_path):
    cmd = train_command("supervised", {"epochs": 2, "batch_size": 32, "lr": 0.05}, prepared)
    writes = _atomic_writes(cmd(tmp_path / "count"))  # checkpoints, then metrics and model
    # a checkpoint finished and not renamed; one renamed; the metrics written, the model not
    points = ("write:scratch@2", "write:renamed@3", f"write:scratch@{writes}")
    logs = kill_then_rerun(points, cmd, _model_state, _same_model, tmp_path)
    assert "resum" in logs["write:renamed@3"].lower(), logs["write:renamed@3"][-2000:]


def _atomic_writes(cmd: list[str]) -> int:
    """How many atomic writes an uninterrupted run of `cmd` makes (each one announced by the
    writer's test hook, `provenance._test_pause`, with no pause)."""
    from ckaflow.provenance import PAUSE_WRITE

    done = subprocess.run(
        cmd, env={**ENV, PAUSE_WRITE: "0"}, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr.count(f"{PAUSE_WRITE}\t")


def test_extraction_killed_between_a_chunk_and_its_progress_and_in_its_metadata(
    trained, prepared, tmp_path
):
    from ckaflow.store import open_store

    cmd = extract_command(trained, prepared)

    def read(out):
        return _store_arrays(out / "aug1.zarr", open_store)

    points = ("chunk:written@2", "meta:torn@2", "write:scratch", "write:aside", "write:renamed")
    logs = kill_then_rerun(points, cmd, read, _same_arrays, tmp_path, before=_older(cmd))
    assert "after row 32" in logs["chunk:written@2"], logs["chunk:written@2"][-2000:]


def _older(cmd):
    """Fill `out` with an older output of the same command, so that its store is replaced (the
    rename-aside path of `replace_into_place`): a copy made once, by one uninterrupted run."""
    made: dict[str, Path] = {}

    def before(out: Path) -> None:
        if "first" not in made:
            run_to_end(cmd(out))
            made["first"] = out
        elif out != made["first"]:
            shutil.copytree(made["first"], out)

    return before


def test_fused_gram_killed_between_a_flush_and_its_progress_and_in_its_metadata(
    trained, prepared, tmp_path
):
    from ckaflow.gram_stores import open_gram

    cmd = fused_gram_command(trained, prepared)

    def read(out):
        return _store_arrays(out / "g.zarr", open_gram)

    points = ("chunk:written@3", "meta:torn@3", "write:scratch", "write:renamed")
    logs = kill_then_rerun(points, cmd, read, _same_arrays, tmp_path)
    assert "after 2 units" in logs["chunk:written@3"], logs["chunk:written@3"][-2000:]


def test_the_cka_job_and_the_merge_killed_at_each_write(grams, tmp_path):
    def spec(out):
        pairs = [
            {"id": "cross", "kind": "cross", "a": grams["simclr"], "b": grams["supervised"]},
            {"id": "within", "kind": "within", "a": grams["simclr"], "b": grams["simclr"]},
        ]
        return {
            "comparisons": [{k: str(v) for k, v in p.items()} for p in pairs],
            "estimator": "minibatch",
            "bootstrap": 200,
            "seed": 0,
            "tile_layers": 32,
            "cache": str(out / "cache"),
        }

    def cka_cmd(out):
        return ckaflow("cka", "--spec", json.dumps(spec(out)), "--out", out / "pairs.parquet")

    def read_pairs(out):
        return pd.read_parquet(out / "pairs.parquet")

    # the first comparison's table kept, the second's not yet; the job's own table
    points = ("write:renamed@1", "write:scratch@2", "write:scratch@3")
    logs = kill_then_rerun(points, cka_cmd, read_pairs, _same_table, tmp_path / "cka")
    assert "(1 computed, 1 unchanged)" in logs["write:renamed@1"], logs["write:renamed@1"]

    pairs = tmp_path / "cka" / "reference" / "pairs.parquet"

    def merge_cmd(out):
        spec = json.dumps({"config_hash": "h"})
        return ckaflow(
            "merge-tables", "--spec", spec, "--tables", pairs, "--out", out / "cka.parquet"
        )

    def read_merged(out):
        return pd.read_parquet(out / "cka.parquet")

    kill_then_rerun(("write:scratch",), merge_cmd, read_merged, _same_table, tmp_path / "merge")
