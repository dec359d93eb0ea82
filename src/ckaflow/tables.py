"""Merging CKA tiles into the tidy table `results/tables/cka.parquet` (and `.csv`)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ckaflow.errors import TableError
from ckaflow.provenance import atomic_path, code_version

# Integer columns that are absent on the labels side: nullable, so parquet keeps them integers.
NULLABLE_INT = ("seed_a", "seed_b")

SIDE_COLUMNS = (
    "run",
    "method",
    "arch",
    "seed",
    "view",
    "layer",
    "layer_index",
    "layer_kind",
    "stage",
    "block",
)
COLUMNS = (
    "comparison",
    "kind",
    *(f"{c}_a" for c in SIDE_COLUMNS),
    *(f"{c}_b" for c in SIDE_COLUMNS),
    "estimator",
    "batch_size",
    "n",
    "value",
    "ci_low",
    "ci_high",
    "bootstrap",
    "source_a",
    "source_b",
    "code_version",
)


def merge_tiles(tiles: list[str | Path], out: str | Path, config_hash: str) -> pd.DataFrame:
    """Concatenate tile tables, check them, stamp provenance, write parquet and CSV."""
    if not tiles:
        raise TableError("no CKA tiles to merge")
    frames = []
    for path in tiles:
        try:
            frames.append(pd.read_parquet(path))
        except (OSError, ValueError) as err:  # pyarrow raises both for a missing or cut file
            raise TableError(
                f"{path}: not a readable CKA tile ({err}); rerun its cka stage"
            ) from err
    table = pd.concat(frames, ignore_index=True)
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise TableError(
            f"tile tables lack columns {missing} (an older schema?); rerun the cka stages"
        )
    table = table.loc[:, list(COLUMNS)].astype({c: "Int64" for c in NULLABLE_INT})
    duplicated = table.duplicated(["comparison", "layer_a", "layer_b"])
    if duplicated.any():
        raise TableError(f"{int(duplicated.sum())} layer pairs appear in more than one tile")
    table = table.sort_values(["comparison", "layer_index_a", "layer_index_b"], ignore_index=True)
    table["config_hash"] = config_hash
    table["merged_by"] = code_version()
    out = Path(out)
    with atomic_path(out) as scratch:
        table.to_parquet(scratch, index=False)
    with atomic_path(out.with_suffix(".csv")) as scratch:
        table.to_csv(scratch, index=False)
    return table
