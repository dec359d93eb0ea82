"""ckaflow on a real one-node SLURM cluster with accounting (tests/slurm/cluster.sh).

Every test waits on SLURM under a hard time limit, so a hung scheduler fails the test, not CI.
Deselect with `-m "not slurm"` on a machine without root.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from ckaflow import config, data
from ckaflow.launch import ACTIVE, SlurmSpec, StageFailed, job_state, run_stage
from ckaflow.train.loop import train_run
from tests import slurm_jobs
from tests.conftest import ENV, REPO, snakemake_cmd, tiny_config
from tests.test_determinism import MAY_DIFFER, TABLES, assert_bit_identical

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="session")
def cluster() -> str:
    up = subprocess.run(
        ["bash", str(REPO / "tests" / "slurm" / "cluster.sh"), "up"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert up.returncode == 0, up.stdout + up.stderr
    return "debug"


def _spec(**overrides) -> SlurmSpec:
    base = dict(
        partition="debug",
        gpus=0,
        cpus=1,
        mem_gb=2,
        time_min=10,
        poll_s=0.5,
        query_timeout_s=30,
        signal_delay_s=30,
    )
    return SlurmSpec(**{**base, **overrides})


def _since() -> str:
    return (dt.datetime.now() - dt.timedelta(seconds=2)).strftime("%Y-%m-%dT%H:%M:%S")


def sacct_jobs(since: str, ready=lambda jobs: True, timeout: float = 30) -> pd.DataFrame:
    """Jobs known to accounting since `since`; waits up to `timeout` for `ready(jobs)`, since
    slurmctld hands job records to slurmdbd asynchronously (a lag right after start-up)."""
    deadline = time.monotonic() + timeout
    while True:
        jobs = _sacct(since, "JobIDRaw,JobName%300,State", ["id", "name", "state"])
        if ready(jobs) or time.monotonic() > deadline:
            return jobs
        time.sleep(0.5)


def _sacct(since: str, fields: str, columns: list[str], *args: str) -> pd.DataFrame:
    """One `sacct` query of the jobs since `since`: `fields`, as a frame with `columns`."""
    out = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-S", since, "-o", fields, *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    rows = [line.split("|") for line in out.splitlines() if line]
    return pd.DataFrame(rows, columns=columns)


def _named(name: str):
    return lambda jobs: (jobs["name"] == name).any()


@pytest.fixture(scope="module")
def slow_data(tmp_path_factory, fashion_root) -> Path:
    """Enough real images that a training run lasts long enough to be interrupted."""
    cfg = tiny_config(data={"train_size": 2048, "eval_size": 64})
    out = tmp_path_factory.mktemp("slow") / "fashion-mnist.zarr"
    return data.prepare(config.data_spec(cfg), config.augment_spec(cfg), out, chunk_rows=32)


def _supervised(epochs: int):
    cfg = tiny_config(
        data={"train_size": 2048, "eval_size": 64},
        recipes={"supervised": {"epochs": epochs, "batch_size": 64, "lr": 0.05}},
    )
    run = next(r for r in config.run_specs(cfg) if r.method == "supervised")
    return run, config.augment_spec(cfg)


def _train_in_thread(run, aug, slow_data, out_dir, records, spec, lines):
    box: dict = {}

    def target():
        try:
            box["result"] = run_stage(
                "train",
                train_run,
                {
                    "run": run,
                    "aug": aug,
                    "data_path": slow_data,
                    "out_dir": out_dir,
                    "device": "cpu",
                },
                backend="slurm",
                key=str(out_dir),
                slurm=spec,
                log=lines.append,
                records=records,
            )
        except Exception as err:  # reported by the test
            box["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def _record(records: Path) -> dict:
    paths = list((records / "records").glob("*.json"))
    return json.loads(paths[0].read_text()) if paths else {}


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _wait_until_running(record: Path, timeout: float, what: str) -> None:
    """Until the job that the stage's record names is RUNNING."""

    def running() -> bool:
        return record.exists() and job_state(json.loads(record.read_text())["job_id"], 10) == (
            "RUNNING"
        )

    _wait_for(running, timeout, f"{what} to run")


def _checkpoint_epoch(out_dir: Path) -> int:
    try:
        return torch.load(out_dir / "checkpoint.pt", weights_only=False)["epoch"]
    except Exception:
        return 0


def _weights(path: Path) -> dict:
    return torch.load(path, weights_only=False)["model"]


def _local_reference(run, aug, slow_data, out_dir: Path) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the jobs run with cpus=1 threads: same sums, same bits
    try:
        return train_run(run, aug, slow_data, out_dir, device="cpu", log=lambda _: None)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.timeout(120)
def test_a_job_result_comes_back_and_a_rerun_takes_it_instead_of_resubmitting(cluster, tmp_path):
    since = _since()
    lines: list[str] = []
    spec = _spec()
    first, again = (
        run_stage(
            "demo",
            slurm_jobs.add,
            {"a": 2, "b": 3},
            backend="slurm",
            key="k/add",
            slurm=spec,
            records=tmp_path,
            log=lines.append,
        )
        for _ in range(2)
    )
    assert first == again == 5
    assert any("taking the result of SLURM job" in line for line in lines)
    jobs = sacct_jobs(since, _named("ckaflow-demo:k/add"))
    assert len(jobs.query("name == 'ckaflow-demo:k/add'")) == 1


@pytest.mark.timeout(120)
def test_a_stage_that_raises_fails_with_its_traceback(cluster, tmp_path):
    """The rule's command (`ckaflow extract --backend slurm`) on a broken checkpoint."""
    from tests.conftest import stage_spec

    since = _since()
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not a checkpoint")
    slurm = json.dumps(
        {
            "partition": "debug",
            "poll_s": 0.5,
            "query_timeout_s": 30,
            "extract": {"gpus": 0, "cpus": 1, "mem_gb": 2, "time_min": 5},
        }
    )
    result = subprocess.run(
        [
            "ckaflow",
            "extract",
            "--spec",
            stage_spec("extract"),
            "--model",
            str(bad),
            "--data",
            str(tmp_path / "data.zarr"),
            "--view",
            "clean",
            "--out",
            "results/activations/x/clean.zarr",
            "--device",
            "cpu",
            "--backend",
            "slurm",
            "--slurm",
            slurm,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=ENV,
        timeout=110,
    )
    assert result.returncode != 0
    assert "Traceback (most recent call last)" in result.stderr
    assert "CheckpointError" in result.stderr and "not a readable checkpoint" in result.stderr
    name = "ckaflow-extract:activations/x/clean.zarr"
    jobs = sacct_jobs(since, _named(name)).query(f"name == '{name}'")
    assert len(jobs) == 1 and jobs["state"].iloc[0] == "FAILED"


@pytest.mark.timeout(120)
def test_a_cancelled_job_fails_the_stage_clearly(cluster, tmp_path):
    lines: list[str] = []
    box: dict = {}

    def target():
        try:
            run_stage(
                "demo",
                slurm_jobs.sleep_then,
                {"seconds": 60, "value": "late"},
                backend="slurm",
                key="k/sleep",
                slurm=_spec(),
                records=tmp_path,
                log=lines.append,
            )
        except StageFailed as err:
            box["error"] = str(err)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    _wait_for(
        lambda: job_state(_record(tmp_path).get("job_id", "0"), 10) == "RUNNING",
        60,
        "the job to run",
    )
    subprocess.run(["scancel", _record(tmp_path)["job_id"]], check=True, timeout=30)
    thread.join(60)
    assert "was cancelled" in box.get("error", "")


@pytest.mark.timeout(300)
def test_preempted_training_resumes_to_the_uninterrupted_weights(cluster, slow_data, tmp_path):
    import re

    run, aug = _supervised(epochs=12)
    reference = _local_reference(run, aug, slow_data, tmp_path / "reference")
    out_dir, records, lines = tmp_path / "preempted", tmp_path / "records", []
    thread, box = _train_in_thread(run, aug, slow_data, out_dir, records, _spec(), lines)
    _wait_for(lambda: _checkpoint_epoch(out_dir) >= 2, 120, "two epochs on SLURM")
    record = _record(records)
    before = _checkpoint_epoch(out_dir)  # a checkpoint the job had written before the signals
    # what a preemption sends, as submitit's SlurmJob._interrupt does, but with a pause: sent
    # back to back, a late SIGTERM can hit the `scontrol requeue` that USR2 starts (seen in CI)
    for sig in ("SIGTERM", "USR2"):
        subprocess.run(["scancel", "--signal", sig, record["job_id"]], check=True, timeout=30)
        time.sleep(2)
    thread.join(240)
    assert "error" not in box, box.get("error")
    log = (
        out_dir.parent / "records" / "jobs" / "train" / f"{record['job_id']}_0_log.out"
    ).read_text()
    # The job's story, in order: each finished epoch's line (logged right after that epoch's
    # checkpoint is written) and the resume line of the requeued job. It resumed from the last
    # checkpoint the preempted job wrote: after epoch 0, at least the one seen before the
    # signals, none of its epochs trained twice and none skipped.
    story = []
    for line in log.splitlines():
        if found := re.search(rf"resumed {run.run_id} from epoch (\d+) step (\d+)/\d+", line):
            story.append(("resumed", int(found[1]), int(found[2])))
        elif found := re.search(rf"{run.run_id} epoch (\d+)/12 loss ", line):
            story.append(("epoch", int(found[1])))
    resumes = [i for i, event in enumerate(story) if event[0] == "resumed"]
    assert len(resumes) == 1, log[-4000:]  # one preemption, one resume
    _, epoch, step = story[resumes[0]]
    assert 2 <= before <= epoch and step == 0, (before, epoch, step)  # an epoch's end checkpoint
    assert story[: resumes[0]] == [("epoch", k) for k in range(1, epoch + 1)], log[-4000:]
    assert story[resumes[0] + 1 :] == [("epoch", k) for k in range(epoch + 1, 13)], log[-4000:]
    metrics = pd.read_parquet(out_dir / "metrics.parquet")
    assert metrics["epoch"].tolist() == list(range(1, 13))
    a, b = _weights(reference), _weights(out_dir / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.timeout(420)
def test_a_job_past_its_time_limit_is_requeued_and_completes(cluster, slow_data, tmp_path):
    since = _since()
    # SLURM may send the warning signal up to 60 s before the time asked for ("resolution of
    # event handling", sbatch --signal); a signal before submitit's handler is installed (while
    # the job still imports torch) kills the job. With 2 min and 30 s the signal comes 30-90 s
    # in, so training must outlast 90 s: 60 epochs of ~1.8 s on the test node.
    run, aug = _supervised(epochs=60)
    out_dir, records, lines = tmp_path / "timeout", tmp_path / "records", []
    spec = _spec(time_min=2, signal_delay_s=30, max_requeues=4)
    thread, box = _train_in_thread(run, aug, slow_data, out_dir, records, spec, lines)
    thread.join(400)
    assert "error" not in box, box.get("error")
    record = _record(records)
    log = (records / "jobs" / "train" / f"{record['job_id']}_0_log.out").read_text()
    assert "timed-out" in log and "resumed" in log
    assert (out_dir / "model.pt").exists()
    jobs = sacct_jobs(
        since, lambda j: (j["state"][j["id"] == record["job_id"]] == "COMPLETED").any()
    )
    assert jobs.query(f"id == '{record['job_id']}'")["state"].tolist() == ["COMPLETED"]


def _snakemake(workdir: Path, configfile: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        snakemake_cmd(workdir, configfile, "--rerun-incomplete", *args, cores=4),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ENV,
        start_new_session=True,  # its own process group, to be killed whole
    )


@pytest.fixture(scope="module")
def fault_free(cluster, tmp_path_factory) -> tuple[Path, str]:
    """The tiny study run on the cluster without faults: its folder, and when it started."""
    workdir = tmp_path_factory.mktemp("fault-free")
    since = _since()
    proc = _snakemake(workdir, REPO / "tests" / "configs" / "tiny-slurm.yaml")
    out, _ = proc.communicate(timeout=380)
    assert proc.returncode == 0, out[-5000:]
    return workdir, since


@pytest.mark.timeout(400)
def test_tiny_pipeline_on_slurm_end_to_end(fault_free):
    tmp_path, since = fault_free
    table = pd.read_parquet(tmp_path / "results" / "tables" / "cka.parquet")
    assert set(table["kind"]) == {"within", "cross", "invariance", "class"}
    runs = ["simclr-resnet18-w4-s0", "supervised-resnet18-w4-s0"]
    expected = [f"ckaflow-train:runs/{run}" for run in runs]
    expected += [f"ckaflow-evaluate:runs/{run}/probes.parquet" for run in runs]
    for run in runs:
        for view in ("clean", "aug1", "aug2"):
            expected.append(f"ckaflow-extract:activations/{run}/{view}.zarr")
            expected.append(f"ckaflow-gram:gram/{run}/{view}.zarr")
    expected.append("ckaflow-cka:cka/pairs.parquet")  # CKA on a compute node too
    jobs = sacct_jobs(since, lambda j: j["name"].isin(expected).sum() >= len(expected))
    mine = jobs[jobs["name"].isin(expected)]
    assert sorted(mine["name"]) == sorted(expected), jobs  # every heavy stage: one job each
    assert set(mine["state"]) == {"COMPLETED"}


@pytest.mark.timeout(400)
def test_killed_workflow_reattaches_to_its_running_job(cluster, tmp_path):
    cfg = yaml.safe_load((REPO / "tests" / "configs" / "tiny-slurm.yaml").read_text())
    cfg.update(methods=["supervised"], seeds=[7])
    cfg["data"]["train_size"] = 2048
    cfg["recipes"]["supervised"]["epochs"] = 10
    cfg["cka"]["comparisons"] = ["within"]
    configfile = tmp_path / "study.yaml"
    configfile.write_text(yaml.safe_dump(cfg))
    workdir = tmp_path / "work"
    workdir.mkdir()
    since = _since()
    record = (
        workdir / "results" / ".slurm" / "records" / "results__runs__supervised-resnet18-w4-s7.json"
    )

    first = _snakemake(workdir, configfile)
    _wait_until_running(record, 180, "the training job")
    os.killpg(first.pid, signal.SIGKILL)  # the login node's Snakemake dies, the job goes on
    first.wait(30)
    job_id = json.loads(record.read_text())["job_id"]
    assert job_state(job_id, 10) in ACTIVE  # still queued or running: nothing cancelled it

    subprocess.run(  # a SIGKILLed Snakemake leaves its lock behind
        snakemake_cmd(workdir, configfile, "--unlock"),
        env=ENV,
        check=True,
        capture_output=True,
        timeout=60,
    )
    second = _snakemake(workdir, configfile)
    out, _ = second.communicate(timeout=300)
    assert second.returncode == 0, out[-5000:]
    log = (workdir / "results" / "logs" / "train" / "supervised-resnet18-w4-s7.log").read_text()
    assert f"reattaching to SLURM job {job_id}" in log
    name = "ckaflow-train:runs/supervised-resnet18-w4-s7"
    trains = sacct_jobs(since, _named(name)).query(f"name == '{name}'")
    assert trains["id"].tolist() == [job_id]
    assert (workdir / "results" / "tables" / "cka.parquet").exists()


def _sacct_times(since: str, name: str) -> pd.DataFrame:
    """id, state, start and end of the jobs called `name` since `since`, from accounting."""
    columns = ["id", "state", "start", "end"]
    return _sacct(since, "JobIDRaw,State,Start,End", columns, "--name", name)


@pytest.mark.timeout(300)
def test_a_restart_with_other_execution_settings_reattaches(cluster, slow_data, tmp_path):
    """Snakemake restarted mid-training with a longer time limit and another checkpoint policy:
    the running job is the same computation, so it is reattached to (the change is logged and
    applies to the next submission), and there is one job for the run in accounting."""
    from ckaflow.train.loop import CheckpointPolicy

    since = _since()
    run, aug = _supervised(epochs=6)
    out_dir, records, first_lines = tmp_path / "run", tmp_path / "records", []
    first, _ = _train_in_thread(run, aug, slow_data, out_dir, records, _spec(), first_lines)
    _wait_for(lambda: _checkpoint_epoch(out_dir) >= 1, 120, "an epoch on SLURM")
    job_id = _record(records)["job_id"]
    lines: list[str] = []
    path = run_stage(  # the restarted workflow: other time limit, other checkpoint policy
        "train",
        train_run,
        {
            **{"run": run, "aug": aug, "data_path": slow_data, "out_dir": out_dir},
            **{"device": "cpu", "policy": CheckpointPolicy(every_steps=5)},
        },
        backend="slurm",
        key=str(out_dir),
        slurm=_spec(time_min=20),
        log=lines.append,
        records=records,
    )
    first.join(60)
    assert any(f"reattaching to SLURM job {job_id}" in line for line in lines), lines
    changed = next(line for line in lines if "execution settings changed" in line)
    assert "slurm.time_min: 10 -> 20" in changed and "'every_steps': 5" in changed
    name = f"ckaflow-train:{out_dir}"
    jobs = _sacct_times(since, name)
    assert jobs["id"].tolist() == [job_id], jobs
    assert pd.read_parquet(out_dir / "metrics.parquet")["epoch"].tolist() == list(range(1, 7))
    assert path == out_dir / "model.pt"


@pytest.mark.timeout(420)
def test_a_restart_with_another_recipe_cancels_the_old_job_first(cluster, slow_data, tmp_path):
    """Snakemake restarted mid-training after a recipe change: the old job computes the same
    output for other settings, so it is cancelled, and ends, before the new job starts (accounting
    times); the final model is the new recipe's."""
    since = _since()
    run, aug = _supervised(epochs=8)
    new_run, _ = _supervised(epochs=3)
    out_dir, records, first_lines = tmp_path / "run", tmp_path / "records", []
    first, first_box = _train_in_thread(run, aug, slow_data, out_dir, records, _spec(), first_lines)
    _wait_for(lambda: _checkpoint_epoch(out_dir) >= 1, 120, "an epoch on SLURM")
    old_id = _record(records)["job_id"]
    lines: list[str] = []
    run_stage(
        "train",
        train_run,
        {"run": new_run, "aug": aug, "data_path": slow_data, "out_dir": out_dir, "device": "cpu"},
        backend="slurm",
        key=str(out_dir),
        slurm=_spec(),
        log=lines.append,
        records=records,
    )
    first.join(60)
    assert isinstance(first_box.get("error"), StageFailed)  # the old workflow's wait: cancelled
    assert any(f"SLURM job {old_id}" in line and "cancelling it" in line for line in lines)
    new_id = _record(records)["job_id"]
    assert new_id != old_id
    name = f"ckaflow-train:{out_dir}"
    jobs = _sacct_times(since, name).set_index("id")
    assert set(jobs.index) == {old_id, new_id}, jobs
    assert jobs.loc[old_id, "state"].startswith("CANCELLED")
    assert jobs.loc[new_id, "state"] == "COMPLETED"
    # the order from the clocks of the waiter (the old job seen ended) and of the new job (its
    # first line), to the microsecond: sacct's whole seconds cannot order events in a second
    ended = next(line for line in lines if line.startswith(f"SLURM job {old_id} ended"))
    log = Path(records / "jobs" / "train" / f"{new_id}_0_log.out").read_text()
    started = re.search(rf"SLURM job {new_id} started at (\S+)", log)
    assert started, log[-2000:]
    seen = re.search(r"seen at (\S+)\)", ended).group(1)
    assert dt.datetime.fromisoformat(seen) < dt.datetime.fromisoformat(started.group(1))
    meta = torch.load(out_dir / "model.pt", weights_only=True)["meta"]
    assert meta["run_spec"]["recipe"]["epochs"] == 3
    assert pd.read_parquet(out_dir / "metrics.parquet")["epoch"].tolist() == [1, 2, 3]


# -- the CKA job -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cka_stores(activations, tmp_path_factory) -> dict[str, str]:
    from ckaflow.stages.gram import gram_store

    root = tmp_path_factory.mktemp("cka-stores")
    return {
        m: str(gram_store(activations[(m, "clean")], root / f"{m}.zarr", "minibatch", 64))
        for m in ("simclr", "supervised")
    }


def _cka_command(stores: dict[str, str], copies: int, query_timeout_s: float = 30) -> list[str]:
    """`ckaflow cka` as the workflow calls it, on the SLURM backend: `copies` comparisons of
    the two stores, each with 20,000 bootstrap replicates, so that the job runs for a while."""
    comparisons = [
        {"id": f"cross-{i}", "kind": "cross", "a": stores["simclr"], "b": stores["supervised"]}
        for i in range(copies)
    ]
    spec = {"comparisons": comparisons, "estimator": "minibatch", "bootstrap": 20_000}
    spec |= {"seed": 0, "tile_layers": 16, "cache": "results/cka/comparisons"}
    slurm = {
        "partition": "debug",
        "poll_s": 0.5,
        "query_timeout_s": query_timeout_s,
        "cka": {"gpus": 0, "cpus": 1, "mem_gb": 2, "time_min": 10},
    }
    return [
        str(REPO / ".venv" / "bin" / "ckaflow"),
        *("cka", "--backend", "slurm", "--slurm", json.dumps(slurm)),
        *("--spec", json.dumps(spec), "--out", "results/cka/pairs.parquet"),
    ]


def _start(cmd: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


@pytest.mark.timeout(400)
def test_the_cka_job_reattaches_after_its_waiter_dies_and_reruns_after_a_kill(
    cluster, cka_stores, tmp_path
):
    """The CKA stage is a SLURM job like the heavy stages: a restart reattaches to the running
    job (one job in `sacct`); a job killed by the scheduler fails the stage, naming the job, and
    the rerun submits anew and finishes, keeping the comparisons the killed job completed."""
    since = _since()
    record = tmp_path / "results" / ".slurm" / "records" / "results__cka__pairs.parquet.json"
    name = "ckaflow-cka:cka/pairs.parquet"
    cmd = _cka_command(cka_stores, copies=40)

    first = _start(cmd, tmp_path)
    _wait_until_running(record, 120, "the CKA job")
    first.kill()  # the waiter (Snakemake's shell) dies; the job goes on
    first.wait(30)
    job_id = json.loads(record.read_text())["job_id"]
    second = _start(cmd, tmp_path)
    out, _ = second.communicate(timeout=300)
    assert second.returncode == 0, out[-3000:]
    assert f"SLURM job {job_id} (" in out and "instead of submitting a new one" in out, out
    jobs = sacct_jobs(since, _named(name)).query(f"name == '{name}'")
    assert jobs["id"].tolist() == [job_id]
    done = pd.read_parquet(tmp_path / "results" / "cka" / "pairs.parquet")
    assert len(done) == 40 * 28 * 27 and set(done["bootstrap"]) == {20_000}  # 28 x 27 layers

    # killed by the scheduler: the stage fails clearly; the rerun completes the rest
    shutil.rmtree(tmp_path / "results")
    third = _start(cmd, tmp_path)
    _wait_for(
        lambda: any((tmp_path / "results" / "cka" / "comparisons").glob("*/*.parquet")),
        240,
        "the CKA job to finish a comparison",
    )
    killed = json.loads(record.read_text())["job_id"]
    subprocess.run(["scancel", "--signal=KILL", killed], check=True, timeout=30)
    out, _ = third.communicate(timeout=120)
    assert third.returncode != 0 and killed in out, out[-3000:]
    kept = len(list((tmp_path / "results" / "cka" / "comparisons").glob("*/*.parquet")))
    assert 1 <= kept < 40
    fourth = _start(cmd, tmp_path)
    out, _ = fourth.communicate(timeout=300)
    assert fourth.returncode == 0, out[-3000:]
    assert f"40 comparisons ({40 - kept} computed, {kept} unchanged)" in out, out[-3000:]
    again = pd.read_parquet(tmp_path / "results" / "cka" / "pairs.parquet")
    key = ["comparison", "layer_a", "layer_b"]
    pd.testing.assert_frame_equal(
        again.sort_values(key, ignore_index=True).drop(columns="code_version"),
        done.sort_values(key, ignore_index=True).drop(columns="code_version"),
    )


# -- faults: a waiter killed after sbatch, a scheduler that stops answering ---------------------

SLURM_ROOT = Path(os.environ.get("CKAFLOW_SLURM_ROOT", "/var/tmp/ckaflow-slurm"))


def _stop_daemon(name: str) -> None:
    """SIGTERM a daemon of the test cluster (by its PID file) and wait until it is gone."""
    pid = int((SLURM_ROOT / "pids" / f"{name}.pid").read_text())
    os.kill(pid, signal.SIGTERM)
    _wait_for(lambda: not Path(f"/proc/{pid}").exists(), 60, f"{name} to stop")


def _start_daemon(name: str, ready: list[str]) -> None:
    subprocess.run([name], check=True, timeout=60)
    ok = lambda: subprocess.run(ready, capture_output=True, timeout=30).returncode == 0  # noqa: E731
    _wait_for(ok, 60, f"{name} to answer")


@pytest.mark.timeout(400)
def test_a_waiter_killed_right_after_sbatch_is_adopted_by_the_restart(
    cluster, cka_stores, tmp_path
):
    """Killed between `sbatch` and the record (the kill point `launch:submitted`, not a
    sleep): no record names the job, yet the restart finds it by its name and identity and
    adopts it; `sacct` lists one job."""
    since = _since()
    name = "ckaflow-cka:cka/pairs.parquet"
    cmd = _cka_command(cka_stores, copies=6)
    earlier = set(sacct_jobs(since)["id"])
    killed = subprocess.run(
        cmd, cwd=tmp_path, env={**ENV, "CKAFLOW_KILL_AT": "launch:submitted"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not list((tmp_path / "results" / ".slurm" / "records").glob("*.json"))
    restart = _start(cmd, tmp_path)
    out, _ = restart.communicate(timeout=300)
    assert restart.returncode == 0, out[-3000:]
    adopted = re.search(r"adopting SLURM job (\d+)", out)
    assert adopted, out[-3000:]
    jobs = sacct_jobs(since, _named(name)).query(f"name == '{name}'")
    assert sorted(set(jobs["id"]) - earlier) == [adopted.group(1)], jobs


@pytest.mark.timeout(500)
def test_a_restart_while_the_scheduler_is_down_waits_and_reattaches(cluster, cka_stores, tmp_path):
    """The incident of issue 23: a job running, its waiter killed, and the restart made while
    slurmctld and slurmdbd are stopped. The restart asks again with backoff (it used to read
    the silence as "ended" and submit a second job), the daemons come back, it reattaches:
    one job in `sacct`, the stage completes."""
    since = _since()
    record = tmp_path / "results" / ".slurm" / "records" / "results__cka__pairs.parquet.json"
    name = "ckaflow-cka:cka/pairs.parquet"
    cmd = _cka_command(cka_stores, copies=6, query_timeout_s=90)
    earlier = set(sacct_jobs(since)["id"])  # a job of the test before may end within `since`
    first = _start(cmd, tmp_path)
    _wait_until_running(record, 120, "the CKA job")
    first.kill()
    first.wait(30)
    job_id = json.loads(record.read_text())["job_id"]
    try:
        _stop_daemon("slurmctld")
        _stop_daemon("slurmdbd")
        log = tmp_path / "restart.log"
        with log.open("w") as sink:
            restart = subprocess.Popen(
                cmd, cwd=tmp_path, env=ENV, stdout=sink, stderr=subprocess.STDOUT, text=True
            )
        asking = f"no answer from the scheduler about SLURM job {job_id}"
        _wait_for(lambda: asking in log.read_text() or restart.poll() is not None, 120, asking)
        assert restart.poll() is None, log.read_text()[-3000:]  # still asking, not submitting
    finally:
        _start_daemon("slurmdbd", ["sacctmgr", "-n", "list", "cluster"])
        _start_daemon("slurmctld", ["scontrol", "ping"])
    restart.wait(timeout=300)
    out = log.read_text()
    assert restart.returncode == 0, out[-3000:]
    assert f"reattaching to SLURM job {job_id}" in out, out[-3000:]
    jobs = sacct_jobs(since, _named(name)).query(f"name == '{name}'")
    assert sorted(set(jobs["id"]) - earlier) == [job_id], jobs


# -- a soak under faults -----------------------------------------------------------------------


def _jobs_named(prefix: str) -> list[tuple[str, str, str]]:
    out = subprocess.run(
        ["squeue", "-h", "-o", "%i|%T|%j"], capture_output=True, text=True, timeout=30
    ).stdout
    rows = [line.split("|", 2) for line in out.splitlines() if line.count("|") >= 2]
    return [(i, state, name) for i, state, name in rows if name.startswith(prefix)]


def _job_in(prefix: str, states: set[str], timeout: float) -> str | None:
    """The id of a job in one of `states` whose name starts with `prefix`, once there is one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [i for i, state, _ in _jobs_named(prefix) if state in states]
        if found:
            return found[0]
        time.sleep(0.2)
    return None


def _scancel(*args: str) -> bool:
    return subprocess.run(["scancel", *args], capture_output=True, timeout=30).returncode == 0


def _inject_faults(results: Path, injected: list[str]) -> None:
    """The fault script, each step bounded in time: a training job preempted (USR2: submitit
    checkpoints and requeues it), an extract job cancelled, slurmctld stopped for 5 s, and the
    results disk filled for 3 s."""
    job = _job_in("ckaflow-train:", {"RUNNING"}, 180)
    if job and _scancel("--signal", "USR2", job):
        injected.append(f"requeued training job {job}")
    job = _job_in("ckaflow-extract:", {"PENDING", "RUNNING"}, 240)
    if job and _scancel(job):
        injected.append(f"cancelled extract job {job}")
    _stop_daemon("slurmctld")
    time.sleep(5)
    _start_daemon("slurmctld", ["scontrol", "ping"])
    injected.append("stopped slurmctld for 5 s")
    _job_in("ckaflow-", {"PENDING", "RUNNING"}, 120)  # while some stage still writes
    filler = results / "filler"
    try:
        with filler.open("wb") as sink:
            while True:
                sink.write(bytes(8 << 20))
    except OSError:  # no space left: the disk is full
        injected.append("filled the results disk for 3 s")
        time.sleep(3)
    finally:
        filler.unlink(missing_ok=True)


def _overlaps(jobs: pd.DataFrame) -> list[tuple[str, str, str]]:
    """Pairs of jobs of one name (one output) whose run times overlap."""
    ran = jobs[(jobs["start"] != "Unknown") & (jobs["start"] != "None")]
    pairs = []
    for name, group in ran.groupby("name"):
        spans = sorted(zip(group["start"], group["end"], group["id"], strict=True))
        pairs += [(name, a[2], b[2]) for a, b in itertools.pairwise(spans) if b[0] < a[1]]
    return pairs


@pytest.mark.timeout(900)
def test_a_study_under_faults_ends_equal_to_a_fault_free_one(fault_free, tmp_path):
    """The tiny study on the cluster while a fault script preempts a training job, cancels an
    extract job, stops and starts slurmctld and fills the results disk; then one plain rerun.
    Every table equals the fault-free run's, and no two jobs of one output ran at once."""
    reference, _ = fault_free
    results = tmp_path / "results"
    results.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1g", "tmpfs", str(results)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr!r}")
    try:
        since = _since()
        configfile = REPO / "tests" / "configs" / "tiny-slurm.yaml"
        injected: list[str] = []
        faults = threading.Thread(target=_inject_faults, args=(results, injected), daemon=True)
        first = _snakemake(tmp_path, configfile, "--keep-going")
        faults.start()
        first_out, _ = first.communicate(timeout=500)
        faults.join(60)
        assert len(injected) == 4, (injected, first_out[-5000:])
        rerun = _snakemake(tmp_path, configfile)
        out, _ = rerun.communicate(timeout=300)
        assert rerun.returncode == 0, out[-5000:]
        for name in TABLES:  # the result tables, bit for bit (the others hold timings)
            ours, theirs = (
                pd.read_parquet(folder / "tables" / f"{name}.parquet")
                for folder in (results, reference / "results")
            )
            assert_bit_identical(name, ours, theirs, MAY_DIFFER[name])
        jobs = _sacct(since, "JobIDRaw,JobName%300,Start,End", ["id", "name", "start", "end"])
        jobs = jobs[jobs["name"].str.startswith("ckaflow-")]
        assert _overlaps(jobs) == [], jobs
        print(f"soak: {'; '.join(injected)}; {len(jobs)} jobs; first run exit {first.returncode}")
    finally:
        subprocess.run(["umount", "-l", str(results)], check=False)
