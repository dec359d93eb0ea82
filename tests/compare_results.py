"""Whether two results folders of the same study hold the same results, bit for bit.

    python -m tests.compare_results BEFORE/results AFTER/results

For a change that must change no number (a refactoring): run the study before and after it and
compare. Compared: every table (parquet and CSV) but its provenance and wall-clock columns, every
run's weights, every array of every Gram and activation store, the summary but its code
version, and every PNG's bytes. Exit status 1 and the differing artifacts when they differ.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import zarr

# columns that name the code or measure wall-clock time, not results
UNCOMPARED = ("code_version", "merged_by", "train_seconds", "seconds", "images_per_s")


def _table(path: Path) -> pd.DataFrame:
    frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    return frame.drop(columns=[c for c in UNCOMPARED if c in frame.columns])


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = (torch.load(p, weights_only=True)["model"] for p in (a, b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _differing_arrays(a: Path, b: Path) -> list[str]:
    ga, gb = zarr.open_group(a, mode="r"), zarr.open_group(b, mode="r")
    names = sorted(name for name, _ in ga.arrays())
    if names != sorted(name for name, _ in gb.arrays()):
        return [str(a)]
    return [f"{a}/{n}" for n in names if not np.array_equal(ga[n][...], gb[n][...], equal_nan=True)]


def _summary(path: Path) -> str:
    return re.sub(r"code \S+\+[0-9a-f]+", "code", path.read_text())


def compare(a: Path, b: Path) -> tuple[dict[str, int], list[str]]:
    """(how many artifacts of each kind were compared, the differing ones)."""
    counts = dict.fromkeys(("tables", "models", "stores", "figures"), 0)
    differ: list[str] = []
    for path in sorted((a / "tables").iterdir()):
        counts["tables"] += 1
        if not _table(path).equals(_table(b / path.relative_to(a))):
            differ.append(str(path))
    for path in sorted(a.glob("runs/*/model.pt")):
        counts["models"] += 1
        if not _same_weights(path, b / path.relative_to(a)):
            differ.append(str(path))
    for path in sorted([*a.glob("gram/**/*.zarr"), *a.glob("activations/*/*.zarr")]):
        counts["stores"] += 1
        differ += _differing_arrays(path, b / path.relative_to(a))
    if _summary(a / "summary.md") != _summary(b / "summary.md"):
        differ.append("summary.md")
    for path in sorted((a / "figures").glob("*.png")):
        counts["figures"] += 1
        if path.read_bytes() != (b / path.relative_to(a)).read_bytes():
            differ.append(str(path))
    return counts, differ


if __name__ == "__main__":
    counts, differ = compare(Path(sys.argv[1]), Path(sys.argv[2]))
    print(", ".join(f"{n} {kind}" for kind, n in counts.items()), "compared")
    print("identical" if not differ else "different:\n  " + "\n  ".join(differ))
    sys.exit(1 if differ else 0)
