"""The SLURM backend's talk with the scheduler, against stand-in `squeue`/`sacct`/`sbatch`/
`scancel` on PATH that fail, hang or answer on cue: an unanswered query is never taken for an
ended job, and nothing is submitted while a job's fate is unknown. (The real cluster: test_slurm.)
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from ckaflow import launch
from ckaflow.launch import NO_SUCH_JOB, SlurmSpec, StageFailed, job_state

# Each stand-in answers with the first line of its cue file, dropping that line while more
# follow (the last one repeats): `fail` (a socket time-out, exit 1), `hang`, `invalid` (exit 1:
# no such job id), `empty` (exit 0, no output) or `out:<text>`. Every call is logged.
STAND_IN = r"""#!/usr/bin/env bash
cue="$FAKE_SLURM/$(basename "$0")"
case " $* " in *" --name "*) cue="$cue-name" ;; esac
echo "$(basename "$0") $*" >>"$FAKE_SLURM/calls"
line=$(head -n 1 "$cue" 2>/dev/null || echo empty)
if [ "$(wc -l <"$cue" 2>/dev/null || echo 0)" -gt 1 ]; then sed -i 1d "$cue"; fi
case "$line" in
  fail) echo "slurm_load_jobs error: Socket timed out on send/recv operation" >&2; exit 1 ;;
  hang) exec sleep 30 ;;  # one process, killed by the caller's time-out
  invalid) echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1 ;;
  empty) exit 0 ;;
  out:*) printf '%b\n' "${line#out:}" ;;  # "\n" in a cue: one answer of several lines
esac
"""


@pytest.fixture
def scheduler(tmp_path, monkeypatch):
    """Stand-ins first on PATH; `cue(command, *lines)` sets what they answer; `calls()` lists
    what they were asked."""
    bin_dir, state = tmp_path / "bin", tmp_path / "cues"
    bin_dir.mkdir()
    state.mkdir()
    for name in ("squeue", "sacct", "sbatch", "scancel"):
        script = bin_dir / name
        script.write_text(STAND_IN)
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM", str(state))

    class Scheduler:
        def cue(self, command: str, *lines: str) -> None:
            (state / command).write_text("".join(f"{line}\n" for line in lines))

        def calls(self) -> list[str]:
            path = state / "calls"
            return path.read_text().splitlines() if path.exists() else []

    return Scheduler()


def _spec(**overrides) -> SlurmSpec:
    return SlurmSpec(**{"poll_s": 0.1, "query_timeout_s": 2.0, **overrides})


@pytest.mark.parametrize(
    ("squeue", "sacct", "expected"),
    [
        ("out:RUNNING", "fail", "RUNNING"),  # the controller's word is enough
        ("fail", "out:COMPLETED", "COMPLETED"),  # accounting answers for a busy controller
        ("invalid", "empty", NO_SUCH_JOB),  # both answered: no such job
        ("empty", "empty", NO_SUCH_JOB),
        ("fail", "fail", None),  # a socket time-out on both: no answer
        ("hang", "fail", None),
        ("invalid", "fail", None),  # slurmdbd down: accounting did not answer
        ("fail", "empty", None),  # a silent controller and an accounting that may lag
    ],
)
def test_the_scheduler_answers_a_state_no_such_job_or_nothing(scheduler, squeue, sacct, expected):
    scheduler.cue("squeue", squeue)
    scheduler.cue("sacct", sacct)
    assert job_state("33", timeout=1.0) == expected


def _record(tmp_path: Path, identity: str = "same") -> Path:
    path = tmp_path / "record.json"
    path.write_text(json.dumps({"job_id": "33", "folder": str(tmp_path), "identity": identity}))
    return path


def test_a_silent_scheduler_fails_the_stage_and_submits_nothing(scheduler, tmp_path):
    """The incident of the issue: job 33 running, the restart's squeue/sacct time out. Before,
    the stage logged "ended None; submitting anew"; now it asks again until query_timeout_s
    and fails, naming the job, with no sbatch called."""
    scheduler.cue("squeue", "fail")
    scheduler.cue("sacct", "fail")
    lines: list[str] = []
    with pytest.raises(StageFailed, match=r"SLURM job 33 .*nothing was submitted"):
        launch._reattach(_record(tmp_path), "same", {}, _spec(), lines.append)
    assert not [c for c in scheduler.calls() if c.startswith(("sbatch", "scancel"))]
    asked = [c for c in scheduler.calls() if c.startswith("squeue")]
    assert len(asked) >= 3, asked  # asked again, with backoff, not once
    assert any("no answer from the scheduler" in line for line in lines), lines


def test_a_scheduler_that_answers_late_is_waited_for_and_the_job_reattached(scheduler, tmp_path):
    scheduler.cue("squeue", "fail", "fail", "out:RUNNING")
    scheduler.cue("sacct", "fail")
    lines: list[str] = []
    job = launch._reattach(_record(tmp_path), "same", {}, _spec(), lines.append)
    assert job is not None and job.job_id == "33"
    assert any("reattaching to SLURM job 33 (RUNNING)" in line for line in lines), lines


def test_a_job_of_other_settings_with_an_unknown_fate_is_neither_replaced_nor_left(
    scheduler, tmp_path
):
    """Another identity's job, scheduler silent: before, "was for other settings; submitting
    anew" without a cancel. Now the stage fails and submits nothing."""
    scheduler.cue("squeue", "fail")
    scheduler.cue("sacct", "fail")
    with pytest.raises(StageFailed, match="nothing was submitted"):
        launch._reattach(_record(tmp_path, "other"), "same", {}, _spec(), print)
    assert not [c for c in scheduler.calls() if c.startswith("sbatch")]


def test_a_job_unknown_to_the_scheduler_is_submitted_anew(scheduler, tmp_path):
    scheduler.cue("squeue", "invalid")
    scheduler.cue("sacct", "empty")
    lines: list[str] = []
    assert launch._reattach(_record(tmp_path), "same", {}, _spec(), lines.append) is None
    assert any("unknown to the scheduler; submitting anew" in line for line in lines), lines


def test_an_unrecorded_job_of_this_output_is_adopted_and_one_of_other_settings_cancelled(
    scheduler, tmp_path
):
    name = "ckaflow-train:runs/x"
    jobs = [
        f"41|RUNNING|{launch.COMMENT_PREFIX}other|{name}",  # another computation of it
        f"42|PENDING|{launch.COMMENT_PREFIX}same|{name}",  # this one, never recorded
        f"43|RUNNING|{launch.COMMENT_PREFIX}same|{name}-longer",  # another output's
    ]
    scheduler.cue("squeue-name", "out:" + "\\n".join(jobs))
    scheduler.cue("squeue", "out:RUNNING", "out:CANCELLED")
    scheduler.cue("sacct", "fail")
    lines: list[str] = []
    job = launch._adopt(name, "same", tmp_path, _spec(), lines.append)
    assert job is not None and job.job_id == "42"
    cancelled = {c for c in scheduler.calls() if c.startswith("scancel")}
    assert cancelled == {"scancel 41"}  # asked again while it was still running
    assert any("adopting SLURM job 42" in line for line in lines), lines


def test_no_answer_about_jobs_of_this_name_submits_nothing(scheduler, tmp_path):
    scheduler.cue("squeue-name", "fail")
    with pytest.raises(StageFailed, match=r"jobs named ckaflow-train:x .*nothing was submitted"):
        launch._adopt("ckaflow-train:x", "same", tmp_path, _spec(), print)
    assert not [c for c in scheduler.calls() if c.startswith(("sbatch", "scancel"))]
