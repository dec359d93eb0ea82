"""Where heavy stages run: `local` (in this process) or `slurm` (a submitit job, waited on).

With the slurm backend a stage submits itself with submitit, records the job (id and submitit
folder) in `results/.slurm/records/`, outside Snakemake's declared outputs, and waits on it while
streaming the job's log into its own. A restarted workflow finds the record and reattaches to the
job still pending or running, or takes the finished job's result, instead of submitting a second
one. Jobs are checkpointable: on timeout or preemption submitit requeues them (a bounded number
of times) and the stage resumes from its last checkpoint. Scheduler queries have time limits, so
a hung `sacct` fails the stage instead of hanging the workflow.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ckaflow.config import schema_defaults, stable_hash, to_jsonable
from ckaflow.errors import CkaflowError
from ckaflow.killpoints import kill_point
from ckaflow.provenance import atomic_path
from ckaflow.study import RESULTS, Study

ACTIVE = {
    "PENDING",
    "RUNNING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "CONFIGURING",
    "COMPLETING",
    "RESIZING",
    "SUSPENDED",
    "STAGE_OUT",
    "SIGNALING",
}
RECORDS = Path(Study.slurm_records())
# Arguments of a stage that change how it runs, never what it writes: with the SLURM settings
# they are left out of a job's identity (training's checkpoint policy, as the stage's setting
# `checkpoint` or train_run's `policy`; the Gram stage's flush interval), so changing them never
# makes a second job for one output.
EXECUTION_KWARGS = ("policy", "checkpoint", "flush_s", "device")
CANCEL_WAIT_S = 300.0  # how long a cancelled job may take to end before the stage gives up


_SLURM_DEFAULTS = schema_defaults("slurm")
# the heavy stages, each with its resources: train, evaluate, extract, gram
STAGES = tuple(k for k, v in _SLURM_DEFAULTS.items() if isinstance(v, dict))
_STAGE_DEFAULTS = _SLURM_DEFAULTS["train"]  # every stage has the same keys and defaults


class StageFailed(CkaflowError):
    """A SLURM job that failed, was cancelled, or could not be followed."""


@dataclass(frozen=True)
class SlurmSpec:
    """Where and with what a stage's job runs (config keys `slurm.*` and `slurm.<stage>.*`).
    Its defaults are the schema's, the one place they are written."""

    partition: str | None = _SLURM_DEFAULTS["partition"]
    account: str | None = _SLURM_DEFAULTS["account"]
    qos: str | None = _SLURM_DEFAULTS["qos"]
    gpus: int = _STAGE_DEFAULTS["gpus"]
    gres: str | None = _STAGE_DEFAULTS["gres"]
    cpus: int = _STAGE_DEFAULTS["cpus"]
    mem_gb: float = _STAGE_DEFAULTS["mem_gb"]
    time_min: int = _STAGE_DEFAULTS["time_min"]
    constraint: str | None = _STAGE_DEFAULTS["constraint"]
    extra: dict = field(default_factory=lambda: dict(_STAGE_DEFAULTS["extra"]))
    setup: tuple[str, ...] = tuple(_STAGE_DEFAULTS["setup"])
    max_requeues: int = _SLURM_DEFAULTS["max_requeues"]
    signal_delay_s: int = _SLURM_DEFAULTS["signal_delay_s"]
    poll_s: float = _SLURM_DEFAULTS["poll_s"]
    query_timeout_s: float = _SLURM_DEFAULTS["query_timeout_s"]
    data_parallel: bool = False  # one task per GPU (training); other stages use one task

    @classmethod
    def from_config(cls, slurm: dict, stage: str) -> SlurmSpec:
        common = {k: v for k, v in slurm.items() if k not in STAGES}
        merged = {**common, **slurm.get(stage, {})}
        merged["setup"] = tuple(merged.get("setup", ()))
        return cls(**merged, data_parallel=stage == "train")

    def executor_parameters(self, name: str) -> dict[str, Any]:
        params: dict[str, Any] = {
            "name": name,
            "cpus_per_task": self.cpus,
            "mem_gb": self.mem_gb,
            "timeout_min": self.time_min,
            "slurm_signal_delay_s": self.signal_delay_s,
            "slurm_additional_parameters": dict(self.extra),
            "slurm_setup": list(self.setup),
        }
        if self.gpus:
            params["gpus_per_node"] = self.gpus
        if self.data_parallel and self.gpus > 1:  # one process per GPU (train.distributed)
            params["tasks_per_node"] = self.gpus
        optional = {
            "slurm_partition": self.partition,
            "slurm_account": self.account,
            "slurm_qos": self.qos,
            "slurm_gres": self.gres,
            "slurm_constraint": self.constraint,
        }
        params.update({k: v for k, v in optional.items() if v})
        return params


class StageJob:
    """The callable a SLURM job runs: the stage function with its arguments. Checkpointable:
    on timeout or preemption submitit calls `checkpoint`, which resubmits the same call — the
    stage itself resumes from its own checkpoint file."""

    def __init__(self, fn: Callable, threads: int | None):
        self.fn = fn
        self.threads = threads

    def __call__(self, kwargs: dict) -> Any:
        import submitit
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)  # same threads, same floating-point sums
        from ckaflow.bytecount import COUNT

        env = submitit.JobEnvironment()
        if env.global_rank == 0:  # the job's own clock: orders events finer than sacct's seconds
            print(f"SLURM job {env.job_id} started at {_now()}", flush=True)
        if env.num_tasks > 1:  # torch.distributed's env:// variables
            submitit.helpers.TorchDistributedEnvironment().export()
        result = self.fn(**kwargs)
        print(f"SLURM job: {COUNT.report()}", flush=True)  # the stage's log: what it moved
        return result

    def checkpoint(self, kwargs: dict):
        import submitit

        return submitit.helpers.DelayedSubmission(StageJob(self.fn, self.threads), kwargs)


def _record_path(records: Path, key: str) -> Path:
    return records / "records" / f"{key.strip('/').replace('/', '__')}.json"


# `job_state`'s answer when the scheduler answered and knows no such job (neither the
# controller nor accounting); None means it did not answer at all.
NO_SUCH_JOB = "NO SUCH JOB"
COMMENT_PREFIX = "ckaflow:"  # a job's comment: its identity, so an unrecorded job is recognised


@dataclass(frozen=True)
class _Answer:
    ok: bool  # the command ran and exited 0
    out: str
    err: str


def _query(cmd: list[str], timeout: float) -> _Answer:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (subprocess.SubprocessError, OSError) as err:
        return _Answer(False, "", str(err))
    return _Answer(done.returncode == 0, done.stdout.strip(), done.stderr.strip())


def job_state(job_id: str, timeout: float) -> str | None:
    """The job's state, live from the controller (`squeue`) while it knows the job, else from
    accounting (`sacct`, which may lag a little behind); `NO_SUCH_JOB` when both answered and
    neither knows it; None when the scheduler did not answer (a busy or restarting controller
    or slurmdbd): unknown, which is never taken to mean ended."""
    live = _query(["squeue", "-j", job_id, "-h", "-o", "%T"], timeout)
    if live.ok and live.out:
        return live.out.splitlines()[0].strip()
    controller_answered = live.ok or "invalid job id" in live.err.lower()
    acct = _query(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State"], timeout)
    if acct.ok and acct.out:
        return acct.out.splitlines()[-1].split()[0]
    # a job the controller does not know and accounting has no line for; a job accounting has
    # not heard of yet (it lags) is still known to the controller
    return NO_SUCH_JOB if acct.ok and controller_answered else None


def _answered(ask: Callable[[float], Any], what: str, spec: SlurmSpec, log) -> Any:
    """`ask(timeout)` until it is not None, retried with backoff (poll_s, doubling, at most
    30 s apart) for up to `query_timeout_s`; then the stage fails, having submitted nothing."""
    deadline = time.monotonic() + spec.query_timeout_s
    delay = spec.poll_s
    while True:
        answer = ask(max(1.0, min(spec.query_timeout_s, deadline - time.monotonic())))
        if answer is not None:
            return answer
        left = deadline - time.monotonic()
        if left <= 0:
            raise StageFailed(
                f"the scheduler has not answered about {what} for {spec.query_timeout_s:.0f}s "
                "(squeue/sacct); nothing was submitted, so no second job can write this output. "
                "Rerun once slurmctld and slurmdbd answer: the stage reattaches."
            )
        log(f"no answer from the scheduler about {what}; asking again in {min(delay, left):.0f}s")
        time.sleep(min(delay, left))
        delay = min(delay * 2, 30.0)


def _named_jobs(name: str, timeout: float) -> list[tuple[str, str, str]] | None:
    """(job id, state, comment) of the controller's jobs with exactly this name; None if it
    did not answer."""
    got = _query(["squeue", "-h", "--name", name, "-o", "%i|%T|%k|%j"], timeout)
    if not got.ok:
        return None
    rows = [line.split("|", 3) for line in got.out.splitlines() if line.count("|") >= 3]
    return [(i.strip(), st.strip(), comment.strip()) for i, st, comment, n in rows if n == name]


class _LogTail:
    """Copies what a job appends to its stdout/stderr files into ours."""

    def __init__(self, paths: list[tuple[Path, Any]]):
        self.paths = paths
        self.offsets = {p: 0 for p, _ in paths}

    def pump(self) -> None:
        for path, stream in self.paths:
            try:
                with open(path, "rb") as f:
                    f.seek(self.offsets[path])
                    chunk = f.read()
            except OSError:
                continue
            if chunk:
                self.offsets[path] += len(chunk)
                stream.write(chunk.decode(errors="replace"))
                stream.flush()


def run_stage(
    stage: str,
    fn: Callable,
    kwargs: dict,
    *,
    backend: str,
    key: str,
    slurm: SlurmSpec | None = None,
    log: Callable[[str], None] = print,
    records: Path = RECORDS,
) -> Any:
    """Run `fn(**kwargs)` here (local) or as a SLURM job (slurm), returning its result.

    `key` names the stage's output (one record per output), so there is at most one job per
    output. A job's identity is the result-determining part of its call: the stage and its
    arguments without the SLURM settings and `EXECUTION_KWARGS`. On a restart, a recorded job of
    the same identity that is active or completed is reattached to (a change of execution
    settings is logged: it applies to the next submission); one of another identity that is
    still active is cancelled, and its end awaited, before the new job is submitted.
    """
    if backend == "local":
        return fn(**kwargs)
    if backend != "slurm":
        raise ValueError(f"unknown backend {backend!r}; expected 'local' or 'slurm'")
    return _run_slurm(stage, fn, kwargs, key, slurm, log, records)


def _run_slurm(
    stage: str,
    fn: Callable,
    kwargs: dict,
    key: str,
    slurm: SlurmSpec | None,
    log: Callable[[str], None],
    records: Path,
) -> Any:
    """The slurm backend: reattach to or adopt this output's job, else submit one; wait on it."""
    if running_in_slurm_job():
        raise StageFailed(
            f"already inside SLURM job {os.environ['SLURM_JOB_ID']}: a job must not submit jobs. "
            "Run Snakemake on the login node with the local executor (profiles/slurm) and "
            "backend: slurm, not under Snakemake's SLURM executor."
        )
    import submitit

    spec = slurm or SlurmSpec()
    result_kwargs = {k: v for k, v in kwargs.items() if k not in EXECUTION_KWARGS}
    identity = stable_hash([stage, fn.__module__, fn.__qualname__, to_jsonable(result_kwargs)])
    execution = json.loads(
        json.dumps(
            {"slurm": asdict(spec), **{k: kwargs[k] for k in EXECUTION_KWARGS if k in kwargs}},
            default=lambda v: asdict(v) if hasattr(v, "__dataclass_fields__") else str(v),
        )
    )
    record_path = _record_path(records, key)
    name = f"ckaflow-{stage}:{key.removeprefix(f'{RESULTS}/')}"
    folder = records / "jobs" / stage
    job = _reattach(record_path, identity, execution, spec, log)
    if job is None:
        job = _adopt(name, identity, folder, spec, log)
        if job is not None:
            _write_record(record_path, job.job_id, folder, stage, key, identity, execution)
    if job is None:
        executor = submitit.AutoExecutor(
            folder=folder, cluster="slurm", slurm_max_num_timeout=spec.max_requeues
        )
        executor.update_parameters(
            **spec.executor_parameters(name), slurm_comment=COMMENT_PREFIX + identity
        )
        job = executor.submit(StageJob(fn, spec.cpus), kwargs)
        kill_point("launch:submitted")  # the gap a restart closes by the job's name
        _write_record(record_path, job.job_id, folder, stage, key, identity, execution)
        log(f"submitted SLURM job {job.job_id} for {stage} ({key}); log: {job.paths.stdout}")
    return _wait(job, spec, log)


def _write_record(record_path: Path, job_id, folder, stage, key, identity, execution) -> None:
    record = {
        "job_id": job_id,
        "folder": str(folder),
        "stage": stage,
        "key": key,
        "identity": identity,
        "execution": execution,
        "submitted": time.time(),
    }
    with atomic_path(record_path) as scratch:
        scratch.write_text(json.dumps(record, indent=2))


def _reattach(record_path: Path, identity: str, execution: dict, spec: SlurmSpec, log):
    """The recorded job to wait on instead of submitting, or None (after cancelling a job of
    another identity that is still active: never two jobs writing one output). A scheduler
    that does not answer is asked again until `query_timeout_s`, then the stage fails: a job
    whose fate is unknown may still be writing."""
    import submitit

    if not record_path.exists():
        return None
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        return None
    job_id = record.get("job_id")
    if not job_id:
        return None
    what = f"SLURM job {job_id} ({record.get('key')})"
    state = _answered(lambda timeout: job_state(job_id, timeout), what, spec, log)
    if record.get("identity") != identity:  # another computation of the same output
        if state in ACTIVE:
            log(
                f"SLURM job {job_id} ({state}) computes {record.get('key')} for other settings; "
                "cancelling it before submitting anew"
            )
            _cancel_and_wait(job_id, spec, log)
        else:
            log(f"SLURM job {job_id} was for other settings; submitting anew")
        return None
    if state in ACTIVE or state == "COMPLETED":
        verb = "reattaching to" if state in ACTIVE else "taking the result of"
        log(f"{verb} SLURM job {job_id} ({state}) instead of submitting a new one")
        changed = _changed(record.get("execution") or {}, execution)
        if changed and state in ACTIVE:
            log(
                f"execution settings changed since it was submitted ({', '.join(changed)}); "
                "they apply to the next submission, not to this job"
            )
        return submitit.SlurmJob(folder=record["folder"], job_id=job_id)
    ended = "is unknown to the scheduler" if state == NO_SUCH_JOB else f"ended {state}"
    log(f"SLURM job {job_id} {ended}; submitting anew")
    return None


def _adopt(name: str, identity: str, folder: Path, spec: SlurmSpec, log):
    """An active job of this stage's name that no record names (its submitter died before
    writing the record): adopted if its comment carries this identity, else cancelled and
    awaited. None when there is nothing to adopt."""
    import submitit

    jobs = _answered(lambda timeout: _named_jobs(name, timeout), f"jobs named {name}", spec, log)
    adopted = None
    for job_id, state, comment in jobs:
        if state not in ACTIVE:
            continue
        if adopted is None and comment == COMMENT_PREFIX + identity:
            log(f"adopting SLURM job {job_id} ({state}): submitted for this output, never recorded")
            adopted = job_id
        else:
            log(f"SLURM job {job_id} ({state}) named {name} computes other settings; cancelling it")
            _cancel_and_wait(job_id, spec, log)
    return None if adopted is None else submitit.SlurmJob(folder=folder, job_id=adopted)


def _changed(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted names of the leaves that differ between two nested dicts, with old -> new."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a} -> {b}")
    return out


def _cancel_and_wait(job_id: str, spec: SlurmSpec, log) -> None:
    """scancel the job (again while it is still active), then wait until the scheduler
    reports it ended; no answer is not an end."""
    deadline = time.monotonic() + CANCEL_WAIT_S
    state = "PENDING"
    while time.monotonic() < deadline:
        if state in ACTIVE:
            _query(["scancel", job_id], spec.query_timeout_s)
        state = job_state(job_id, spec.query_timeout_s)
        if state is not None and state not in ACTIVE:
            log(f"SLURM job {job_id} ended {state} (seen at {_now()})")
            return
        time.sleep(spec.poll_s)
    raise StageFailed(
        f"SLURM job {job_id} was cancelled but has not been seen to end after "
        f"{CANCEL_WAIT_S:.0f}s; a new job for the same output is not submitted while it may "
        "still write"
    )


def _wait(job, spec: SlurmSpec, log) -> Any:
    from submitit.core.utils import pickle_load

    tail = _LogTail([(Path(job.paths.stdout), sys.stdout), (Path(job.paths.stderr), sys.stderr)])
    unknown_since = None
    while True:
        state = job_state(job.job_id, spec.query_timeout_s)
        tail.pump()
        if state is None or state == NO_SUCH_JOB:
            unknown_since = unknown_since or time.monotonic()
            if time.monotonic() - unknown_since > spec.query_timeout_s:
                why = "not answered" if state is None else "known no such job"
                raise StageFailed(
                    f"the scheduler has {why} about SLURM job {job.job_id} for "
                    f"{spec.query_timeout_s:.0f}s (squeue/sacct); nothing else was submitted. "
                    "The job may still run: rerun once slurmctld and slurmdbd answer, and the "
                    "stage reattaches to it."
                )
        else:
            unknown_since = None
            if state not in ACTIVE:
                break
        time.sleep(spec.poll_s)
    result_path = Path(job.paths.result_pickle)
    for _ in range(int(10 / 0.2)):  # the result file may land just after the state changes
        if result_path.exists():
            break
        time.sleep(0.2)
    tail.pump()
    if state == "COMPLETED" and result_path.exists():
        outcome, value = pickle_load(result_path)
        if outcome == "success":
            return value
        raise StageFailed(f"SLURM job {job.job_id} raised:\n{value}")
    if result_path.exists():
        outcome, value = pickle_load(result_path)
        if outcome == "error":
            raise StageFailed(f"SLURM job {job.job_id} ended {state} and raised:\n{value}")
    if state.startswith("CANCELLED"):
        raise StageFailed(
            f"SLURM job {job.job_id} was cancelled ({state}); rerun the workflow to submit again"
        )
    raise StageFailed(f"SLURM job {job.job_id} ended {state}; see {job.paths.stderr}")


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="microseconds")


def running_in_slurm_job() -> bool:
    return "SLURM_JOB_ID" in os.environ
