"""The `merge_tables` stage: the CKA job's table(s) into the tidy table, one row per compared
layer pair, checked and stamped with the config hash (`ckaflow.tables.merge_cka`)."""

from __future__ import annotations

from pathlib import Path

from ckaflow.study import TablesSpec


def run(spec: TablesSpec, tables: list[str | Path], out: str | Path) -> str:
    from ckaflow.tables import merge_cka

    table = merge_cka(tables, out, spec.config_hash)
    return f"{out}: {len(table)} rows from {len(tables)} CKA tables"
