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

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ckaflow.config import schema_defaults, stable_hash
from ckaflow.errors import CkaflowError
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
# they are left out of a job's identity (training's checkpoint policy, the Gram stage's flush
# interval), so changing them never makes a second job for one output.
EXECUTION_KWARGS = ("policy", "flush_s", "device")
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

        if submitit.JobEnvironment().num_tasks > 1:  # torch.distributed's env:// variables
            submitit.helpers.TorchDistributedEnvironment().export()
        result = self.fn(**kwargs)
        print(f"SLURM job: {COUNT.report()}", flush=True)  # the stage's log: what it moved
        return result

    def checkpoint(self, kwargs: dict):
        import submitit

        return submitit.helpers.DelayedSubmission(StageJob(self.fn, self.threads), kwargs)


def _record_path(records: Path, key: str) -> Path:
    return records / "records" / f"{key.strip('/').replace('/', '__')}.json"


def _query(cmd: list[str], timeout: float) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)
    except (subprocess.SubprocessError, OSError):
        return None
    return out.stdout.strip()


def job_state(job_id: str, timeout: float) -> str | None:
    """The job's state, live from the controller (`squeue`) while it knows the job, else from
    accounting (`sacct`, which may lag a little behind); None if neither answers."""
    out = _query(["squeue", "-j", job_id, "-h", "-o", "%T"], timeout)
    if out:
        return out.splitlines()[0].strip()
    out = _query(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State"], timeout)
    return out.splitlines()[-1].split()[0] if out else None


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
    if running_in_slurm_job():
        raise StageFailed(
            f"already inside SLURM job {os.environ['SLURM_JOB_ID']}: a job must not submit jobs. "
            "Run Snakemake on the login node with the local executor (profiles/slurm) and "
            "backend: slurm, not under Snakemake's SLURM executor."
        )
    import submitit

    spec = slurm or SlurmSpec()
    result_kwargs = {k: v for k, v in kwargs.items() if k not in EXECUTION_KWARGS}
    identity = stable_hash([stage, fn.__module__, fn.__qualname__, result_kwargs])
    execution = json.loads(
        json.dumps(
            {"slurm": asdict(spec), **{k: kwargs[k] for k in EXECUTION_KWARGS if k in kwargs}},
            default=lambda v: asdict(v) if hasattr(v, "__dataclass_fields__") else str(v),
        )
    )
    record_path = _record_path(records, key)
    job = _reattach(record_path, identity, execution, spec, log)
    if job is None:
        folder = records / "jobs" / stage
        executor = submitit.AutoExecutor(
            folder=folder, cluster="slurm", slurm_max_num_timeout=spec.max_requeues
        )
        name = f"ckaflow-{stage}:{key.removeprefix(f'{RESULTS}/')}"
        executor.update_parameters(**spec.executor_parameters(name))
        job = executor.submit(StageJob(fn, spec.cpus), kwargs)
        record = {
            "job_id": job.job_id,
            "folder": str(folder),
            "stage": stage,
            "key": key,
            "identity": identity,
            "execution": execution,
            "submitted": time.time(),
        }
        with atomic_path(record_path) as scratch:
            scratch.write_text(json.dumps(record, indent=2))
        log(f"submitted SLURM job {job.job_id} for {stage} ({key}); log: {job.paths.stdout}")
    return _wait(job, spec, log)


def _reattach(record_path: Path, identity: str, execution: dict, spec: SlurmSpec, log):
    """The recorded job to wait on instead of submitting, or None (after cancelling a job of
    another identity that is still active: never two jobs writing one output)."""
    import submitit

    if not record_path.exists():
        return None
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        return None
    job_id = record.get("job_id")
    state = job_state(job_id, spec.query_timeout_s) if job_id else None
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
    log(f"SLURM job {job_id} ended {state}; submitting anew")
    return None


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
    """scancel the job, then wait until the scheduler reports it ended."""
    subprocess.run(["scancel", job_id], capture_output=True, text=True, timeout=60)
    deadline = time.monotonic() + CANCEL_WAIT_S
    while time.monotonic() < deadline:
        state = job_state(job_id, spec.query_timeout_s)
        if state is not None and state not in ACTIVE:
            log(f"SLURM job {job_id} ended {state}")
            return
        time.sleep(spec.poll_s)
    raise StageFailed(
        f"SLURM job {job_id} was cancelled but has not ended after {CANCEL_WAIT_S:.0f}s; "
        "a new job for the same output is not submitted while it may still write"
    )


def _wait(job, spec: SlurmSpec, log) -> Any:
    from submitit.core.utils import pickle_load

    tail = _LogTail([(Path(job.paths.stdout), sys.stdout), (Path(job.paths.stderr), sys.stderr)])
    unknown_since = None
    while True:
        state = job_state(job.job_id, spec.query_timeout_s)
        tail.pump()
        if state is None:
            unknown_since = unknown_since or time.monotonic()
            if time.monotonic() - unknown_since > spec.query_timeout_s:
                raise StageFailed(
                    f"the scheduler has not reported on job {job.job_id} for "
                    f"{spec.query_timeout_s:.0f}s (sacct/squeue); is slurmdbd up?"
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


def running_in_slurm_job() -> bool:
    return "SLURM_JOB_ID" in os.environ
