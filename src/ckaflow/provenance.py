"""What every artifact records about its origin, and writes that never leave a half-file."""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path

from ckaflow import __version__


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


def _scratch_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial-{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a scratch path to write a file or folder into; rename it onto `path` on success.

    A crash leaves only a hidden `.name.partial-<pid>`, never something at `path` that looks whole.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = _scratch_path(path)
    _remove(scratch)
    try:
        yield scratch
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
    for stale in path.parent.glob(f".{path.name}.old-*"):  # left by a kill between renames
        _remove(stale)
    if path.is_dir() and not path.is_symlink():
        aside = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, aside)
        os.replace(finished, path)
        _remove(aside)
    else:
        os.replace(finished, path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
