"""Tidy tables: the CKA job's pairs as `cka.parquet` (rule merge_tables); per-run training,
probes and runs tables (rule run_tables); the columns `ckaflow.compare` returns too."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ckaflow import bytecount
from ckaflow.errors import TableError
from ckaflow.provenance import atomic_path, code_version

# Integer columns that are absent on the labels side: nullable, so parquet keeps them integers.
NULLABLE_INT = ("seed_a", "seed_b")

SIDE_COLUMNS = (
    "run",
    "method",
    "arch",
    "seed",
    "init",
    "replicate",
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
    "jackknife",
    "source_a",
    "source_b",
    "code_version",
)


def merge_cka(tables: list[str | Path], out: str | Path, config_hash: str) -> pd.DataFrame:
    """Concatenate the CKA jobs' tables, check them, stamp provenance, write parquet and CSV."""
    if not tables:
        raise TableError("no CKA tables to merge")
    frames = []
    for path in tables:
        try:
            frames.append(pd.read_parquet(path))
            bytecount.read(Path(path).stat().st_size)
        except (OSError, ValueError) as err:  # pyarrow raises both for a missing or cut file
            raise TableError(
                f"{path}: not a readable CKA table ({err}); rerun its cka stage"
            ) from err
    table = pd.concat(frames, ignore_index=True)
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise TableError(
            f"CKA tables lack columns {missing} (an older schema?); rerun the cka stages"
        )
    table = table.loc[:, list(COLUMNS)].astype({c: "Int64" for c in NULLABLE_INT})
    duplicated = table.duplicated(["comparison", "layer_a", "layer_b"])
    if duplicated.any():
        raise TableError(f"{int(duplicated.sum())} layer pairs appear in more than one table")
    table = table.sort_values(["comparison", "layer_index_a", "layer_index_b"], ignore_index=True)
    table["config_hash"] = config_hash
    table["merged_by"] = code_version()
    write_both(table, Path(out))
    return table


def _read(path: Path, what: str) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError) as err:
        raise TableError(f"{path}: not a readable {what} table ({err}); rerun its stage") from err


# what the readers of each table rely on (figures, summary); an older table lacks some
PROBE_COLUMNS = ("run", "encoder", "layer", "layer_index", "layer_kind", "stage", "eval_accuracy")


def read_table(path: str | Path, kind: str = "cka") -> pd.DataFrame:
    """A merged table (`cka` or `probes`), refused with the missing columns named when it was
    written by an older ckaflow."""
    table = _read(Path(path), kind)
    expected = COLUMNS if kind == "cka" else PROBE_COLUMNS
    missing = [c for c in expected if c not in table.columns]
    if missing:
        raise TableError(
            f"{path}: a {kind} table without columns {missing} (written by an older ckaflow?); "
            "rerun the workflow to rebuild it"
        )
    return table


# list-valued columns: in the parquet table only (a CSV cell holds one number)
PARQUET_ONLY = ("jackknife",)


def write_both(table: pd.DataFrame, out: Path) -> None:
    """The table as parquet, and as CSV without its list-valued columns."""
    with atomic_path(out) as scratch:
        table.to_parquet(scratch, index=False)
    with atomic_path(out.with_suffix(".csv")) as scratch:
        table.drop(columns=[c for c in PARQUET_ONLY if c in table]).to_csv(scratch, index=False)


def representation_probes(probes: pd.DataFrame) -> pd.DataFrame:
    """One run's probe rows at its representation: the pooled features of a ResNet, the last
    chosen layer of a network imported as a module (which has no `pool`)."""
    pool = probes[probes["layer_kind"] == "pool"]
    return pool if len(pool) else probes[probes["layer_index"] == probes["layer_index"].max()]


def run_summary(run_dir: Path, probes: pd.DataFrame | None) -> dict:
    """One row of runs.parquet: the recipe, the final metrics and the cost of one run."""
    from ckaflow.models import load_network

    _, meta = load_network(run_dir / "model.pt")
    spec = meta["run_spec"]
    recipe = spec["recipe"] or {}  # none for an imported run
    imported = meta.get("imported") or {}
    row = {
        "run": meta["run"],
        "method": spec["method"],
        "arch": spec["model"]["arch"],
        "width": spec["model"]["width"],
        "seed": spec["seed"],
        **{f"recipe_{k}": v for k, v in recipe.items()},
        "imported_from": imported.get("format"),
        "checkpoint_sha256": imported.get("sha256"),
        "knn_accuracy": meta["knn_accuracy"],
        "linear_accuracy": pd.NA,
        "untrained_linear_accuracy": pd.NA,
        "train_seconds": meta.get("train_seconds"),
        "device": meta["device"],
        "processes": meta.get("processes", 1),
        "spec_hash": meta["spec_hash"],
        "code_version": meta["code_version"],
    }
    if probes is not None:
        pool = representation_probes(probes).set_index("encoder")["eval_accuracy"]
        row["linear_accuracy"] = pool.get("trained", pd.NA)
        row["untrained_linear_accuracy"] = pool.get("untrained", pd.NA)
    return row


def run_tables(run_dirs: list[str | Path], out_dir: str | Path) -> list[Path]:
    """training.parquet (per-epoch metrics), probes.parquet (per-layer linear probes) and
    runs.parquet (one row per run) of the given run folders, each also as CSV."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    training, probes, runs = [], [], []
    for run_dir in map(Path, run_dirs):
        probe_path = run_dir / "probes.parquet"
        probe = _read(probe_path, "probes") if probe_path.exists() else None
        if probe is not None:
            probes.append(probe)
        runs.append(run_summary(run_dir, probe))
        if runs[-1]["imported_from"] is None:  # an imported run has no training metrics
            training.append(_read(run_dir / "metrics.parquet", "training metrics"))
    tables = {
        "training": pd.concat(training, ignore_index=True) if training else pd.DataFrame(),
        "runs": pd.DataFrame(runs).astype(
            {"linear_accuracy": "Float64", "untrained_linear_accuracy": "Float64"}
        ),
    }
    if probes:
        tables["probes"] = pd.concat(probes, ignore_index=True)
    written = []
    for name, table in tables.items():
        write_both(table, out_dir / f"{name}.parquet")
        written.append(out_dir / f"{name}.parquet")
    return written
