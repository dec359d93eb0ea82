"""Deterministic crash points, for the crash tests only.

`CKAFLOW_KILL_AT=<point>` (or `<point>@<n>`) makes the process SIGKILL itself the first (n-th)
time it passes `kill_point("<point>")`: right where a crash is hardest to survive (after a
chunk's write and before its progress update, between a store's rename and its completeness
flag, after a job's submission and before its record), instead of wherever a timer happens to
fall. Unset, a kill point costs one environment lookup.

Points: `launch:submitted` (a SLURM job submitted, its record not yet written); `write:scratch`
(an atomic write's finished scratch file or store, before its rename), `write:aside` (an older
store renamed aside, the new one not yet in place), `write:renamed` (renamed, the old one not
yet deleted); `chunk:written` (a resumable store's chunks written, its progress counter not
yet updated); `meta:torn` (the store's metadata file left half written, as by a kill inside
its write, right after a progress update).
"""

from __future__ import annotations

import os
import signal
import sys
from collections import Counter

ENV = "CKAFLOW_KILL_AT"
_passed: Counter = Counter()


def kill_point(name: str) -> None:
    """SIGKILL this process if `CKAFLOW_KILL_AT` names this point and this is its n-th pass."""
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    point, _, nth = wanted.partition("@")
    if point != name:
        return
    _passed[name] += 1
    if _passed[name] == int(nth or 1):
        print(f"kill point {wanted}: SIGKILL", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def torn_write_point(name: str, path) -> None:
    """Like `kill_point`, but first cut the file at `path` to half its bytes: the state a kill
    in the middle of writing it leaves (a metadata write is not atomic)."""
    wanted = os.environ.get(ENV)
    if not wanted or wanted.partition("@")[0] != name:
        return
    nth = int(wanted.partition("@")[2] or 1)
    if _passed[name] + 1 == nth:
        with open(path, "r+b") as f:
            f.truncate(os.fstat(f.fileno()).st_size // 2)
    kill_point(name)


ANNOUNCE = "CKAFLOW_ANNOUNCE_POINTS"


def announce(name: str) -> None:
    """With `CKAFLOW_ANNOUNCE_POINTS` set, say on stderr that this point was reached (the crash
    tests time their kills from a stage's `stage:start`, after its imports, not from process
    start)."""
    if os.environ.get(ANNOUNCE):
        print(f"ckaflow point: {name}", file=sys.stderr, flush=True)
