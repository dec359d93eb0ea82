"""What every artifact records about its origin (seeds, config hash, code version, host), and
writes that never leave a half-file; used by every stage that writes an artifact."""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path

from ckaflow import __version__, bytecount
from ckaflow.killpoints import kill_point


@cache
def code_version() -> str:
    """`<package version>+<git describe>` when run from a git checkout, else the version."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return __version__
    return f"{__version__}+{out}" if out else __version__


def provenance(**fields) -> dict:
    """Attributes stored with an artifact: code version, time, host, plus the given fields."""
    return {
        "code_version": code_version(),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        **fields,
    }


def _scratch_prefix(path: Path) -> str:
    """`.name.partial-<host>-`: the scratch names of `path` written on this host."""
    return f".{path.name}.partial-{socket.gethostname().replace(os.sep, '_')}-"


def _scratch_path(path: Path) -> Path:
    return path.with_name(f"{_scratch_prefix(path)}{os.getpid()}")


def _alive(pid: int) -> bool:
    """Whether process `pid` of this host may still run (unsure counts as running)."""
    if os.name != "posix":  # os.kill(pid, 0) would terminate it on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it runs, as another user
        return True
    return True


def _remove_dead_scratch(path: Path) -> None:
    """Delete the scratch of `path` left by writers that were killed.

    A pid means something only on its own host, and a cluster's shared file system holds scratch
    of writers on other hosts, which may be running: so only scratch named with this host and a
    pid that no longer runs here is deleted; another host's scratch is left (a live writer's
    must never vanish under it), for a rerun on its host or `ckaflow inspect` to report. A pid
    reused by an unrelated process keeps its stale scratch, which errs on the safe side too.
    """
    prefix = _scratch_prefix(path)
    with os.scandir(path.parent) as entries:
        stale = [e.name for e in entries if e.name.startswith(prefix)]
    for name in stale:
        pid = name[len(prefix) :]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            with contextlib.suppress(FileNotFoundError):  # another rerun got there first
                _remove(path.with_name(name))


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a scratch path to write a file or folder into; rename it onto `path` on success.

    A crash leaves only a hidden `.name.partial-<host>-<pid>`, never something at `path` that
    looks whole; the next write of `path` on that host deletes it (`_remove_dead_scratch`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_scratch(path)
    scratch = _scratch_path(path)
    _remove(scratch)
    try:
        yield scratch
        if scratch.is_file():  # a store (a folder) is counted by its array writers
            bytecount.wrote(scratch.stat().st_size)
        replace_into_place(scratch, path)
    except OSError as err:
        _remove(scratch)  # also gives the space back on a full disk
        if err.filename is None:  # write() errors name no file: name the artifact
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise
    except BaseException:
        _remove(scratch)
        raise


def replace_into_place(finished: Path, path: Path) -> None:
    """Rename a finished file or folder onto `path`. An older folder at `path` is first renamed
    aside and deleted only after, so a kill at any moment leaves the old artifact whole, or
    nothing (which the stage then remakes), never a half-deleted one that looks finished."""
    _test_pause(finished, path)
    kill_point("write:scratch")
    for stale in path.parent.glob(f".{path.name}.old-*"):  # left by a kill between renames
        _remove(stale)
    if path.is_dir() and not path.is_symlink():
        aside = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, aside)
        kill_point("write:aside")
        os.replace(finished, path)
        kill_point("write:renamed")
        _remove(aside)
    else:
        os.replace(finished, path)
        kill_point("write:renamed")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


PAUSE_WRITE = "CKAFLOW_TEST_PAUSE_WRITE"


def _test_pause(finished: Path, path: Path) -> None:
    """With CKAFLOW_TEST_PAUSE_WRITE=<seconds>: say on stderr which finished scratch is about to
    be renamed onto which path, then wait that long, so that tests/test_crash.py can kill the
    writer inside the write. Unset (always, outside tests) it does nothing."""
    seconds = os.environ.get(PAUSE_WRITE)  # a test hook only: no setting reads it
    if seconds:
        sys.stderr.write(f"{PAUSE_WRITE}\t{finished}\t{path}\n")
        sys.stderr.flush()
        time.sleep(float(seconds))
