"""A full disk and a read-only results folder: a clear error, nothing corrupted.

Uses a small tmpfs where the machine allows mounting one (root); otherwise the same OS errors
are injected."""

from __future__ import annotations

import errno
import subprocess
from pathlib import Path

import pytest

from ckaflow.errors import StoreError
from ckaflow.store import open_store
from tests.conftest import BIN, ENV


def _mount(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True
    )
    return result.returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB file system, or None where mounting is not allowed."""
    path = tmp_path / "small"
    if not _mount(path, "size=2m"):
        yield None
        return
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False)


def _extract(trained, prepared, out: Path) -> subprocess.CompletedProcess:
    cmd = [
        str(BIN / "ckaflow"), "extract", "--model", str(trained["simclr"]), "--data",
        str(prepared), "--view", "clean", "--out", str(out), "--chunk-rows", "64",
        "--device", "cpu", "--threads", "1",
    ]  # fmt: skip
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)


def test_a_full_disk_stops_extraction_with_a_clear_error(
    small_disk, trained, prepared, tmp_path, monkeypatch
):
    if small_disk is None:  # inject the same error the writer would meet
        from ckaflow import activations

        def full(self, name, buffer, rows):
            raise OSError(errno.ENOSPC, "No space left on device", "layer/c/0/0")

        monkeypatch.setattr(activations._Writer, "_write", full)
        with pytest.raises(OSError, match="No space left"):
            activations.extract(trained["simclr"], prepared, "clean", tmp_path / "s.zarr")
        return
    out = small_disk / "clean.zarr"
    result = _extract(trained, prepared, out)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "No space left on device writing" in result.stderr
    assert "Traceback" not in result.stderr
    with pytest.raises(StoreError, match="does not exist"):
        open_store(out)  # nothing that looks finished
    # room again (a bigger folder): the same command finishes, resuming the partial store
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    result = _extract(trained, prepared, out)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resuming extraction" in result.stdout + result.stderr
    assert open_store(out).attrs["complete"]


def test_a_read_only_results_folder_gives_a_clear_error(tmp_path, prepared):
    folder = tmp_path / "ro"
    if not _mount(folder, "size=1m,ro"):
        pytest.skip("cannot mount a read-only file system here (not root)")
    try:
        spec = (
            '{"data": {"name": "fashion-mnist", "root": "/usr/share/datasets/fashion-mnist",'
            ' "train_size": 64, "eval_size": 32, "seed": 0}, "augment": {"crop_scale":'
            ' [0.08, 1.0], "flip_p": 0.5, "jitter_strength": 0.5, "jitter_p": 0.8,'
            ' "grayscale_p": 0.2}, "chunk_rows": 16}'
        )
        cmd = [str(BIN / "ckaflow"), "prepare", "--spec", spec, "--out", str(folder / "d.zarr")]
        result = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
        assert result.returncode == 2, result.stderr[-2000:]
        assert "Read-only file system" in result.stderr and "Traceback" not in result.stderr
        assert not any(folder.iterdir())
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)
