"""SIGKILL every heavy stage at random points, several times; then rerun it to the end.

Some kills land at random moments of the run, the others inside a write: the atomic writer's
test hook (CKAFLOW_TEST_PAUSE_WRITE, `provenance._test_pause`) holds each finished scratch output
for a moment before its rename, and the kill falls there; that the scratch is still on disk after
the kill proves the kill came before the rename. After each kill, whatever the stage left behind
is read by the stage's own reader: either there is no output yet (the reader refuses with a
clear error) or the output is whole and equal to an uninterrupted run's. After the final rerun
the output equals the uninterrupted run's and no scratch output is left.
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
from ckaflow.killpoints import ANNOUNCE
from ckaflow.provenance import PAUSE_WRITE
from tests.conftest import BIN, ENV, stage_spec, tiny_config

# where each kill run is killed, in turn: inside a write (the first run, whose output folder is
# empty, always reaches the write it aims at), or at a random moment (see crash_and_resume)
KILLS = ("write", "time")
PAUSE_S = 0.4  # how long a write of a "write" kill run holds its finished scratch


def ckaflow(*args: str) -> list[str]:
    return [str(BIN / "ckaflow"), *map(str, args)]


def library_call(function: str, **kwargs) -> list[str]:
    """A process that calls `module:function` of ckaflow with `kwargs` (JSON) after announcing
    `stage:start`, as a stage's command does: for the library functions no rule calls."""
    module, name = function.split(":")
    script = (
        "import json, sys\n"
        "from ckaflow.killpoints import announce\n"
        f"from {module} import {name} as fn\n"
        "announce('stage:start')\n"
        "fn(**json.loads(sys.argv[1]))\n"
    )
    return [str(BIN / "python"), "-c", script, json.dumps(kwargs, default=str)]


def run_to_end(cmd: list[str]) -> str:
    """Run the command to its end; its output (stdout and stderr)."""
    result = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


def launch(cmd: list[str], log: Path | None = None, pause: float | None = None) -> subprocess.Popen:
    """Start the command, its output unbuffered into `log` (so that it can be watched) or
    nowhere; with `pause`, each write announces itself and holds its finished scratch that many
    seconds before the rename (`provenance._test_pause`)."""
    env = {**ENV, "PYTHONUNBUFFERED": "1", ANNOUNCE: "1"}
    env.pop(PAUSE_WRITE, None)
    if pause is not None:
        env[PAUSE_WRITE] = str(pause)
    if log is None:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with log.open("w") as sink:
        return subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT)


def wait_until(proc: subprocess.Popen, ready) -> bool:
    """Poll `ready()` every 2 ms: True once it holds, False if the process ends first."""
    while not ready():
        if proc.poll() is not None:
            return False
        time.sleep(0.002)
    return True


def kill_after(cmd: list[str], seconds: float, working=None, log: Path | None = None) -> bool:
    """Start the command and SIGKILL it `seconds` after it starts working (`working()` holds;
    default: at once); True if it was still running then."""
    proc = launch(cmd, log)
    if working is not None and not wait_until(proc, working):
        return False
    try:
        proc.wait(timeout=seconds)
        return False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return True


def announced_writes(log: Path) -> list[Path]:
    """The finished scratch outputs that the writer announced in `log` before their renames."""
    try:
        lines = log.read_text().split("\n")[:-1]  # whole lines only
    except FileNotFoundError:
        return []
    return [Path(line.split("\t")[1]) for line in lines if line.startswith(f"{PAUSE_WRITE}\t")]


def kill_in_write(cmd: list[str], seconds: float, log: Path, working=None) -> Path | None:
    """Start the command with its writes paused PAUSE_S before their renames (see `launch`);
    `seconds` after it starts working, SIGKILL it inside the write then paused, or else inside
    the next one. The scratch output of the killed write, or None if the command ended first."""
    proc = launch(cmd, log, pause=PAUSE_S)
    if working is not None and not wait_until(proc, working):
        return None
    deadline = time.perf_counter() + seconds
    seen: list[tuple[Path, float]] = []  # each announced scratch, and when it was first seen
    while proc.poll() is None:
        now = time.perf_counter()
        seen += [(scratch, now) for scratch in announced_writes(log)[len(seen) :]]
        # at most half the pause after its announcement: the rename is still far off
        if now >= deadline and seen and now - seen[-1][1] < PAUSE_S / 2 and seen[-1][0].exists():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return seen[-1][0]
        time.sleep(0.002)
    return None


def leftovers(out: Path) -> list[str]:
    """Scratch outputs under `out`: `.name.partial*` (atomic_path's and the resumable stores')
    and `.name.old-*` (replace_into_place's)."""
    return sorted(
        str(p.relative_to(out))
        for p in out.rglob(".*")
        if ".partial" in p.name or ".old-" in p.name
    )


def read_or_refuse(read, out: Path):
    """What a reader makes of the output: its content, or None when it refuses cleanly."""
    try:
        return read(out)
    except (CkaflowError, FileNotFoundError):
        return None


def _stage_started(out: Path, log: Path):
    """When the stage (the CLI command, its imports done) starts working: it announces
    `stage:start` (`ckaflow.killpoints.announce`)."""
    return lambda: log.exists() and "ckaflow point: stage:start" in log.read_text()


def crash_and_resume(name: str, make_cmd, read, same, tmp_path: Path, working=None, span=None):
    """Reference run; then one kill run for each of KILLS, each followed by a reader check;
    then a run to the end, compared, and checked for leftover scratch. Returns the final run's
    output (its log).

    Kill times are drawn (seeded) as fractions of the reference run's times. A "time" kill falls
    that long after the start of the process, between 30 % and 97 % of the reference run's
    duration; or, with `working`, after the moment the stage starts its work, within `span`
    (default 2 % to 97 %) of the reference run's time from then to its end. A "write" kill
    falls inside the first write that is paused (see `kill_in_write`) that long or more after
    the start (or the stage's start of work), between `span`'s lower end and 95 % of the
    reference run's time to its last write; the scratch output that the write was about to
    rename must still be there after the kill. `working(out, log)` is called just before each
    start, with the output folder and the file that gets the process's output, and returns the
    test `ready()` of that start.
    """
    if working is None:
        working = _stage_started
    span = span or (0.02, 0.97)
    tmp_path.mkdir(parents=True, exist_ok=True)
    reference = tmp_path / "reference"
    log = tmp_path / "reference.log"
    ready = working(reference, log)
    proc = launch(make_cmd(reference), log, pause=0)  # its writes announced, not paused
    assert wait_until(proc, ready), f"{name}: the reference run ended before it started working"
    started = time.perf_counter()
    writes, last_write = 0, None
    while proc.poll() is None:  # when was the last write announced
        if len(announced_writes(log)) > writes:
            writes, last_write = len(announced_writes(log)), time.perf_counter() - started
        time.sleep(0.002)
    duration = time.perf_counter() - started
    assert proc.returncode == 0, log.read_text()[-3000:]
    assert announced_writes(log), f"{name}: the stage wrote nothing through the atomic writer"
    if len(announced_writes(log)) > writes:  # announced as it ended
        last_write = duration
    expected = read(reference)
    assert leftovers(reference) == [], f"{name}: an uninterrupted run left scratch outputs"
    out = tmp_path / "crashed"
    rng = random.Random(f"crash-{name}")  # seeded: the same kill points on every run
    killed, in_write = 0, 0
    for i, kind in enumerate(KILLS):
        log = tmp_path / f"crashed-{i}.log"
        ready = working(out, log)
        if kind == "write":
            scratch = kill_in_write(
                make_cmd(out), rng.uniform(span[0], 0.95) * last_write, log, ready
            )
            if scratch is not None:
                assert scratch.exists(), f"{name}: the kill missed the write of {scratch}"
                in_write += 1
            killed += scratch is not None
        else:
            killed += kill_after(make_cmd(out), rng.uniform(*span) * duration, ready, log)
        seen = read_or_refuse(read, out)
        assert seen is None or same(seen, expected), f"{name}: a half-written output was read"
    assert killed, f"{name}: no kill landed inside the stage; widen its time span"
    assert in_write, f"{name}: no kill landed inside a write"
    final = run_to_end(make_cmd(out))
    assert same(read(out), expected), f"{name}: resumed output differs"
    assert leftovers(out) == [], f"{name}: the final rerun left scratch outputs"
    return final


def _model_state(run_dir: Path):
    from ckaflow.models import load_network

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


# -- the stages' commands, shared with tests/test_kill_points.py ------------------------------


def train_command(method: str, recipe: dict, prepared: Path):
    """`ckaflow train` of the tiny study's run of `method` with `recipe`, checkpointing every
    two steps: out -> command."""
    cfg = tiny_config(recipes={method: recipe})
    run = next(r for r in config.run_specs(cfg) if r.method == method)
    spec = json.dumps(
        {"run": config.to_jsonable(run), "augment": config.to_jsonable(config.augment_spec(cfg))}
    )

    def cmd(out):
        return ckaflow(
            "train", "--spec", spec, "--data", prepared, "--out", out, "--device", "cpu",
            "--threads", 1, "--checkpoint", json.dumps({"every_steps": 2}),
        )  # fmt: skip

    return cmd


def extract_command(trained, prepared):
    """`ckaflow extract` of the supervised run's aug1 view into out/aug1.zarr, in 32-row
    chunks: out -> command."""

    def cmd(out):
        return ckaflow(
            "extract", "--spec", stage_spec("extract", batch_size=16, chunk_rows=32),
            "--model", trained["supervised"],
            "--data", prepared, "--view", "aug1", "--out", out / "aug1.zarr", "--device", "cpu",
            "--threads", 1,
        )  # fmt: skip

    return cmd


def fused_gram_command(trained, prepared):
    """The fused Gram stage of the SimCLR run (2 passes of 64-row blocks: 6 blocks), flushing
    after every block, into out/g.zarr: out -> command."""

    def cmd(out):
        spec = stage_spec("gram", batch_size=64, passes=2, seed=7)
        return ckaflow(
            "gram", "--spec", spec, "--model", trained["simclr"],
            "--data", prepared, "--view", "clean", "--out", out / "g.zarr", "--flush-s", 0,
            "--device", "cpu", "--threads", 1, "--backend", "local",
        )  # fmt: skip

    return cmd


@pytest.mark.crash
def test_training_killed_at_random_points(prepared, tmp_path):
    recipe = {"epochs": 3, "batch_size": 32, "optimizer": "lars", "lr": 0.5}
    cmd = train_command("simclr", recipe, prepared)
    crash_and_resume("train", cmd, _model_state, _same_model, tmp_path)


@pytest.mark.crash
def test_extraction_killed_at_random_points(trained, prepared, tmp_path):
    from ckaflow.store import open_store

    def read(out):
        return _store_arrays(out / "aug1.zarr", open_store)

    crash_and_resume("extract", extract_command(trained, prepared), read, _same_arrays, tmp_path)


@pytest.mark.crash
def test_gram_killed_at_random_points(activations, tmp_path):
    from ckaflow.gram_stores import open_gram

    def cmd(out):
        return library_call(
            "ckaflow.stages.gram:gram_store", activations=activations[("simclr", "clean")],
            out=out / "g.zarr", estimator="rbf", batch_size=256, device="cpu",
        )  # fmt: skip

    def read(out):
        return _store_arrays(out / "g.zarr", open_gram)

    def working(out, log):  # kill times count from the first layer written into the scratch
        return _new_scratch(out, "g.zarr")

    crash_and_resume("gram", cmd, read, _same_arrays, tmp_path, working=working)


def _partial(out: Path) -> Path:
    """The scratch folder the fused Gram stage builds `out` in."""
    return out.with_name(f".{out.name}.partial")


def _units_done(partial: Path) -> int:
    """`units_done` of a partial Gram store (0 while there is none, or none readable)."""
    try:
        return int(json.loads((partial / "zarr.json").read_text())["attributes"]["units_done"])
    except (OSError, ValueError, KeyError):
        return 0


def _fused_working(out: Path, log: Path):
    """When a fused Gram stage started on `out` has started working: a fresh start when its
    partial store appears, a resumed start when it says it resumes (its partial store is there
    before it starts)."""
    partial = _partial(out / "g.zarr")
    if not partial.exists():
        return partial.exists
    return lambda: "resuming the Gram stage" in log.read_text()


@pytest.mark.crash
def test_fused_gram_killed_at_random_points(trained, prepared, tmp_path):
    """The fused stage (network to Gram store, 2 passes: 6 blocks), flushing every block, killed
    at random points of its work; then once right after a flush, which the rerun must resume
    from (and not start over), to the same bits as an uninterrupted run."""
    from ckaflow.gram_stores import open_gram

    cmd = fused_gram_command(trained, prepared)

    def read(out):
        return _store_arrays(out / "g.zarr", open_gram)

    crash_and_resume("fused-gram", cmd, read, _same_arrays, tmp_path, working=_fused_working)
    expected = read(tmp_path / "reference")
    blocks = len(open_gram(tmp_path / "reference" / "g.zarr").attrs["block_rows"])
    assert blocks == 6

    # the resume path for certain: a kill as soon as the first block is on disk
    out = tmp_path / "flushed"
    partial = _partial(out / "g.zarr")
    proc = launch(cmd(out))
    flushed = wait_until(proc, lambda: _units_done(partial) >= 1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert flushed, "fused-gram: the stage ended before its first flush was seen"
    done = _units_done(partial)
    assert 1 <= done < blocks, f"fused-gram: the kill left {done} of {blocks} blocks"
    assert read_or_refuse(read, out) is None, "fused-gram: a partial store was taken as finished"
    log = run_to_end(cmd(out))
    assert f"resuming the Gram stage in {partial} after {done} units" in log, log[-3000:]
    assert _same_arrays(read(out), expected), "fused-gram: output resumed after a flush differs"

    for folder in ("reference", "crashed", "flushed"):
        assert [p.name for p in (tmp_path / folder).iterdir()] == ["g.zarr"], folder


@pytest.mark.crash
def test_cka_and_merge_killed_at_random_points(grams, tmp_path):
    def tile_cmd(out, rows="0:28", cols="0:27"):
        pair = {"id": "cross-x", "kind": "cross", "a": str(grams["simclr"])}
        pair |= {"b": str(grams["supervised"]), "rows": _range(rows), "cols": _range(cols)}
        spec = {"comparisons": [pair], "estimator": "minibatch", "bootstrap": 2000, "seed": 0}
        spec |= {"tile_layers": 16, "cache": None}
        return ckaflow("cka", "--spec", json.dumps(spec), "--out", out / f"{rows}.parquet")

    def read_tile(out):
        return pd.read_parquet(out / "0:28.parquet") if (out / "0:28.parquet").exists() else None

    crash_and_resume("cka", tile_cmd, read_tile, _same_table, tmp_path / "t")

    tiles = tmp_path / "tiles"
    for rows in ("0:14", "14:28"):
        run_to_end(tile_cmd(tiles, rows=rows))

    def merge_cmd(out):
        parts = sorted(tiles.glob("*.parquet"))
        spec = json.dumps({"config_hash": "h"})
        return ckaflow(
            "merge-tables", "--spec", spec, "--tables", *parts, "--out", out / "cka.parquet"
        )

    def read_merged(out):
        path = out / "cka.parquet"
        return pd.read_parquet(path) if path.exists() else None

    crash_and_resume("merge", merge_cmd, read_merged, _same_table, tmp_path / "m")
    assert len(read_merged(tmp_path / "m" / "crashed")) == 28 * 27


def _range(text: str) -> list[int]:
    start, stop = text.split(":")
    return [int(start), int(stop)]


def _new_scratch(out: Path, name: str):
    """When a stage started on `out` has started writing `name`: a scratch of it appears that
    was not there before the start (a killed run's scratch is there until the rerun's writer
    deletes it)."""
    before = set(out.glob(f".{name}.partial-*"))
    return lambda: bool(set(out.glob(f".{name}.partial-*")) - before)


def test_kill_in_write_kills_between_write_and_rename(tmp_path):
    """A writer of three files, killed inside the second: its scratch is left, the first file
    is whole, the second and third are not there; a second writer deletes the scratch."""
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from ckaflow.provenance import atomic_path\n"
        "for i in range(3):\n"
        "    with atomic_path(Path(sys.argv[1]) / f'{i}.txt') as scratch:\n"
        "        scratch.write_text(str(i))\n"
        "    time.sleep(0.3)\n"
    )
    cmd = [str(BIN / "python"), "-c", script, str(tmp_path)]
    log = tmp_path / "log"
    scratch = kill_in_write(cmd, 0.15, log, lambda: (tmp_path / "0.txt").exists())
    assert scratch is not None and scratch.exists(), log.read_text()
    assert scratch.name.startswith(".1.txt.partial-") and scratch.read_text() == "1"
    assert sorted(p.name for p in tmp_path.glob("*.txt")) == ["0.txt"]
    run_to_end(cmd)
    assert leftovers(tmp_path) == []
    assert [(tmp_path / f"{i}.txt").read_text() for i in range(3)] == ["0", "1", "2"]


def test_kill_after_reports_whether_it_killed():
    assert kill_after(["sleep", "5"], 0.2) is True
    assert kill_after(["true"], 2.0) is False
