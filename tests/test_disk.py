"""A full disk and a read-only results folder: a clear error, nothing corrupted, nothing left.

Both use real small file systems (tmpfs), which needs root (as here and in CI); where mounting
is not allowed the tests are skipped with the reason, never faked by injected errors."""

from __future__ import annotations

import errno
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import zarr

from ckaflow.errors import StoreError
from ckaflow.store import open_store
from tests.conftest import BIN, ENV, stage_spec


def _mount(path: Path, options: str) -> None:
    """Mount a tmpfs at `path`, or skip the test saying why it cannot be."""
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        why = " ".join((result.stderr or result.stdout).split())
        pytest.skip(f"cannot mount a tmpfs ({options}) here (needs root): {why}")


@pytest.fixture
def small_disk(tmp_path):
    """A real 8 MB file system: room for the first chunk row of the extraction below (about
    6 MB), not for the second, so the disk fills with part of the store already done."""
    path = tmp_path / "small"
    _mount(path, "size=8m")
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False)


def _extract(trained, prepared, out: Path) -> subprocess.CompletedProcess:
    cmd = [
        str(BIN / "ckaflow"), "extract", "--spec", stage_spec("extract", chunk_rows=64),
        "--model", str(trained["simclr"]), "--data", str(prepared), "--view", "clean",
        "--out", str(out), "--device", "cpu", "--threads", "1",
    ]  # fmt: skip
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)


def test_a_full_disk_stops_extraction_with_a_clear_error(small_disk, trained, prepared, tmp_path):
    out = small_disk / "clean.zarr"
    result = _extract(trained, prepared, out)
    assert result.returncode == 2, result.stderr[-2000:]
    # the message names the file it could not write, inside the store being written
    assert f"No space left on device writing {small_disk}/" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    with pytest.raises(StoreError, match="does not exist"):
        open_store(out)  # nothing that looks finished
    done = zarr.open_group(small_disk / ".clean.zarr.partial", mode="r").attrs["rows_done"]
    # part of the store is done (160 rows, chunk rows of 64), so a resume differs from a restart
    assert 0 < done < 160, f"rows_done {done}: resize the small disk to fill mid-store"
    # room again (a bigger folder): the same command finishes, resuming the partial store
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    result = _extract(trained, prepared, out)
    assert result.returncode == 0, result.stderr[-2000:]
    logged = result.stdout + result.stderr
    resumed_after = re.findall(r"resuming extraction into .* after row (\d+)", logged)
    assert resumed_after == [str(done)], logged[-2000:]  # not a fresh start
    resumed = open_store(out)
    assert resumed.attrs["complete"]
    assert sorted(p.name for p in small_disk.iterdir()) == ["clean.zarr"]  # no partial left
    # nothing corrupted: every layer as an extraction that never met a full disk wrote it
    whole = _extract(trained, prepared, tmp_path / "whole.zarr")
    assert whole.returncode == 0, whole.stderr[-2000:]
    reference = open_store(tmp_path / "whole.zarr")
    names = [layer["name"] for layer in reference.layers]
    assert names and names == [layer["name"] for layer in resumed.layers]
    for name in names:
        np.testing.assert_array_equal(resumed[name][:], reference[name][:], err_msg=name)


def test_a_read_only_results_folder_gives_a_clear_error(tmp_path, fashion_root):
    # a read-only file system as the results folder, its parent writable: a writer that put
    # its scratch files or leftovers anywhere it could write would leave them there (or in
    # TMPDIR, also writable) for this test to find
    folder, scratch = tmp_path / "ro", tmp_path / "tmp"
    scratch.mkdir()
    _mount(folder, "size=1m,ro")
    try:
        with pytest.raises(OSError) as probe:  # the mount really refuses writes
            (folder / "probe").write_bytes(b"x")
        assert probe.value.errno == errno.EROFS
        spec = (
            '{"data": {"name": "fashion-mnist", "root": "' + str(fashion_root) + '",'
            ' "train_size": 64, "eval_size": 32, "seed": 0}, "augment": {"crop_scale":'
            ' [0.08, 1.0], "flip_p": 0.5, "jitter_strength": 0.5, "jitter_p": 0.8,'
            ' "grayscale_p": 0.2}}'
        )
        out = folder / "d.zarr"
        cmd = [str(BIN / "ckaflow"), "prepare-data", "--spec", spec, "--out", str(out)]
        env = {**ENV, "TMPDIR": str(scratch)}
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        # the storage error's own exit code and message, naming where it could not write
        assert result.returncode == 2, result.stderr[-2000:]
        assert "Traceback" not in result.stderr, result.stderr[-2000:]
        assert result.stderr.startswith(
            "ckaflow prepare-data: error: Read-only file system writing "
        ), result.stderr
        assert f"writing {folder}/" in result.stderr, result.stderr
        assert "choose a writable results folder" in result.stderr
        assert not out.exists()
        # nothing left anywhere it could have written instead
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ro", "tmp"]
        assert list(scratch.iterdir()) == []
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)
