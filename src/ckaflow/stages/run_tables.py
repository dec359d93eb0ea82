"""The `run_tables` stage: per-epoch training metrics, per-layer probes and one row per run,
as tidy tables (`ckaflow.tables.run_tables`)."""

from __future__ import annotations

from pathlib import Path


def run(runs: list[str | Path], out: str | Path) -> list[Path]:
    """`runs`: run folders (model.pt, metrics.parquet, probes.parquet); `out`: the tables'
    folder."""
    from ckaflow.tables import run_tables

    return run_tables(runs, out)
