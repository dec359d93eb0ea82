"""Bytes of artifacts this process read and wrote, counted where ckaflow's stores, checkpoints
and tables are read and written, so that every stage reports them in its log and a test can
hold them against `ckaflow plan`'s prediction.

Zarr arrays count at their logical size (values × item size, before any compression: the
size the plan can predict), files (checkpoints, tables) at their size on disk. Called by the
stores' readers and writers (`ckaflow.data`, `ckaflow.gram_stores`, `ckaflow.stages.gram`,
`ckaflow.activations`), `ckaflow.provenance.atomic_path` for files and the checkpoint reader.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field

PREFIX = "bytes:"


@dataclass
class ByteCount:
    read: int = 0
    written: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # writer threads

    def report(self) -> str:
        """One log line; `parse` reads it back."""
        return f"{PREFIX} read {self.read:,}, wrote {self.written:,}"


COUNT = ByteCount()


def read(nbytes: int) -> None:
    with COUNT.lock:
        COUNT.read += int(nbytes)


def wrote(nbytes: int) -> None:
    with COUNT.lock:
        COUNT.written += int(nbytes)


def read_array(values):
    """Count an array just read (its logical bytes) and hand it back."""
    read(values.nbytes)
    return values


def parse(text: str) -> tuple[int, int]:
    """The (read, written) bytes of every report line in a log, summed (a stage run as a SLURM
    job reports from the job and from the waiting process)."""
    pattern = rf"{PREFIX} read ([\d,]+), wrote ([\d,]+)"
    found = [
        (int(r.replace(",", "")), int(w.replace(",", ""))) for r, w in re.findall(pattern, text)
    ]
    return sum(r for r, _ in found), sum(w for _, w in found)
