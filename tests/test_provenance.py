"""The atomic writer: scratch names, cleanup of a killed writer's scratch, the test pause."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from ckaflow import provenance
from ckaflow.provenance import PAUSE_WRITE, atomic_path


def _dead_pid() -> int:
    """The pid of a process of this host that has ended (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_scratch_is_named_with_host_and_pid(tmp_path):
    with atomic_path(tmp_path / "a.txt") as scratch:
        scratch.write_text("a")
        assert scratch.name == f".a.txt.partial-{socket.gethostname()}-{os.getpid()}"
    assert (tmp_path / "a.txt").read_text() == "a" and not scratch.exists()


def test_a_killed_writers_scratch_is_deleted_by_the_next_write(tmp_path):
    host = socket.gethostname()
    dead_file = tmp_path / f".a.txt.partial-{host}-{_dead_pid()}"
    dead_file.write_text("half")
    dead_folder = tmp_path / f".a.txt.partial-{host}-{_dead_pid()}"
    (dead_folder / "sub").mkdir(parents=True)  # a half-written store
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"]) as live:
        try:
            kept = [
                tmp_path / f".a.txt.partial-{host}-{live.pid}",  # a running writer's
                tmp_path / f".a.txt.partial-{host}-{os.getppid()}",  # alive too
                tmp_path / f".a.txt.partial-other-{host}-{_dead_pid()}",  # another host's
                tmp_path / f".a.txt.partial-{host}-2-{_dead_pid()}",  # host `<this host>-2`'s
                tmp_path / ".a.txt.partial-12345",  # no host: whose, cannot be told
                tmp_path / ".a.txt.partial",  # a resumable store's
                tmp_path / f".b.txt.partial-{host}-{_dead_pid()}",  # another output's
            ]
            for path in kept:
                path.write_text("x")
            with atomic_path(tmp_path / "a.txt") as scratch:
                scratch.write_text("a")
        finally:
            live.kill()
    assert not dead_file.exists() and not dead_folder.exists()
    assert all(path.exists() for path in kept)
    assert (tmp_path / "a.txt").read_text() == "a"


@pytest.mark.skipif(os.name != "posix", reason="pids are checked with os.kill(pid, 0)")
def test_alive():
    assert provenance._alive(os.getpid())
    assert not provenance._alive(_dead_pid())


def test_the_test_pause_is_inert_unless_set(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(PAUSE_WRITE, raising=False)
    with atomic_path(tmp_path / "a.txt") as scratch:
        scratch.write_text("a")
    assert capsys.readouterr().err == ""

    monkeypatch.setenv(PAUSE_WRITE, "0.2")
    started = time.perf_counter()
    with atomic_path(tmp_path / "b.txt") as scratch:
        scratch.write_text("b")
    assert time.perf_counter() - started >= 0.2
    assert capsys.readouterr().err == f"{PAUSE_WRITE}\t{scratch}\t{tmp_path / 'b.txt'}\n"
    assert (tmp_path / "b.txt").read_text() == "b"
