"""`ckaflow inspect PATH`: a look inside any artifact, or a summary of a results folder."""

from __future__ import annotations

from pathlib import Path

from ckaflow.errors import CkaflowError
from ckaflow.store import chunk_problems

PROVENANCE_KEYS = (
    "kind",
    "run",
    "view",
    "dataset",
    "estimator",
    "passes",
    "precision",
    "dtype",
    "codec",
    "n_examples",
    "code_version",
    "created",
    "host",
    "spec_hash",
    "model_spec_hash",
    "data_spec_hash",
    "call_hash",
    "rows_done",
    "units_done",
    "source",
    "complete",
)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def describe_zarr(path: Path) -> str:
    import warnings

    import zarr

    with warnings.catch_warnings():  # Snakemake's .snakemake_timestamp inside directory outputs
        warnings.simplefilter("ignore")
        group = zarr.open_group(path, mode="r")
    attrs = dict(group.attrs)
    problems = [
        f"  {name}: {problem}"
        for name, array in _all_arrays(group)
        for problem in chunk_problems(array)
    ]
    state = "complete" if attrs.get("complete") else "INCOMPLETE (no completion flag)"
    if problems:
        state = f"DAMAGED ({len(problems)} chunk problems; delete it and rerun its stage)"
    lines = [f"{path}: Zarr group, {state}, {_human(_size(path))} on disk", *problems]
    lines += [f"  {k}: {attrs[k]}" for k in PROVENANCE_KEYS if k in attrs and k != "complete"]
    if "layers" in attrs:
        lines.append(f"  layers: {len(attrs['layers'])}")
    lines.append(f"  {'array':<28}{'shape':>18}{'dtype':>10}{'chunks':>18}{'on disk':>11}")
    for name, array in sorted(group.arrays(), key=lambda item: _order(attrs, item[0])):
        lines.append(
            f"  {name:<28}{str(array.shape):>18}{str(array.dtype):>10}"
            f"{str(array.chunks):>18}{_human(_size(path / name)):>11}"
        )
    for name, sub in sorted(group.groups()):
        lines.append(f"  {name}/")
        for child, array in sorted(sub.arrays()):
            lines.append(
                f"    {child:<26}{str(array.shape):>18}{str(array.dtype):>10}"
                f"{str(array.chunks):>18}{_human(_size(path / name / child)):>11}"
            )
    return "\n".join(lines)


def _all_arrays(group, prefix: str = ""):
    """(path, array) of every array in the group and its subgroups."""
    for name, array in group.arrays():
        yield f"{prefix}{name}", array
    for name, sub in group.groups():
        yield from _all_arrays(sub, f"{prefix}{name}/")


def _order(attrs: dict, name: str) -> tuple[int, str]:
    index = {layer["name"]: layer["index"] for layer in attrs.get("layers", [])}
    return index.get(name, 10**6), name


def describe_checkpoint(path: Path) -> str:
    from ckaflow.train.checkpoint import read_state

    state = read_state(path)  # weights only: inspecting a file never runs code from it
    lines = [f"{path}: PyTorch checkpoint, {_human(_size(path))}"]
    meta = state.get("meta") if isinstance(state, dict) else None
    imported = (meta or {}).get("imported")
    if imported:
        lines += [
            f"  run: {meta.get('run')} (imported, not trained by ckaflow)",
            f"  from: {imported['format']} checkpoint {imported['checkpoint']}",
            f"  source SHA-256: {imported['sha256']}; heads left out: {imported['dropped']}",
            f"  code version: {meta.get('code_version')}, created {meta.get('created')}",
            f"  spec hash: {meta.get('spec_hash')}",
        ]
    elif meta:
        lines += [
            f"  run: {meta.get('run')}",
            f"  epochs: {meta.get('epochs')}",
            f"  kNN accuracy: {meta.get('knn_accuracy')}",
            f"  code version: {meta.get('code_version')}, created {meta.get('created')}",
            f"  spec hash: {meta.get('spec_hash')}",
        ]
    if isinstance(state, dict) and "epoch" in state:
        lines.append(f"  training state after epoch {state['epoch']} (resumable)")
        for row in state.get("metrics", [])[-3:]:
            lines.append(f"    epoch {row['epoch']}: loss {row['loss']:.4f}")
    if isinstance(state, dict) and "model" in state:
        params = sum(v.numel() for v in state["model"].values() if hasattr(v, "numel"))
        lines.append(f"  model tensors: {len(state['model'])}, {params:,} values")
    return "\n".join(lines)


def describe_table(path: Path) -> str:
    import pandas as pd

    table = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    lines = [
        f"{path}: table, {len(table):,} rows × {table.shape[1]} columns, {_human(_size(path))}"
    ]
    lines += [f"  {name}: {dtype}" for name, dtype in table.dtypes.items()]
    from ckaflow.tables import PARQUET_ONLY

    head = table.head().drop(columns=[c for c in PARQUET_ONLY if c in table])  # lists
    with pd.option_context("display.width", 120, "display.max_columns", 12):
        lines.append(head.to_string())
    return "\n".join(lines)


def describe_results(path: Path, config_path: str | Path | None = None) -> str:
    """What exists under a results folder; with a config, what the study still lacks."""
    lines = [f"{path}: results folder, {_human(_size(path))}"]
    for label, pattern in (
        ("data stores", "data/*.zarr"),
        ("models", "runs/*/model.pt"),
        ("checkpoints", "runs/*/checkpoint.pt"),
        ("probe tables", "runs/*/probes.parquet"),
        ("activation stores", "activations/*/*.zarr"),
        ("Gram stores", "gram/**/*.zarr"),
        ("CKA tables", "cka/*.parquet"),
        ("tables", "tables/*"),
        ("figures", "figures/*.png"),
    ):
        found = sorted(path.glob(pattern))
        lines.append(f"  {label}: {len(found)}")
    partial = sorted(p for p in path.rglob(".*.partial*"))
    if partial:
        lines.append(f"  unfinished (partial) artifacts: {len(partial)}")
        lines += [f"    {p.relative_to(path)}" for p in partial[:10]]
    if config_path is not None:
        from ckaflow import config as cfg
        from ckaflow.study import Study

        study = Study(cfg.load(config_path))
        root = path.parent
        expected = study.artifacts()
        missing = [p for p in expected if not (root / p).exists()]
        lines.append(
            f"  study {config_path}: {len(expected) - len(missing)} of "
            f"{len(expected)} artifacts present"
        )
        lines += [f"    missing: {p}" for p in missing[:20]]
        if len(missing) > 20:
            lines.append(f"    … and {len(missing) - 20} more")
    return "\n".join(lines)


def inspect_path(path: str | Path, config_path: str | Path | None = None) -> str:
    path = Path(path)
    if not path.exists():
        raise CkaflowError(f"{path} does not exist")
    if path.is_dir() and (path / "zarr.json").exists():
        return describe_zarr(path)
    if path.suffix == ".pt":
        return describe_checkpoint(path)
    if path.suffix in (".parquet", ".csv"):
        return describe_table(path)
    if path.is_dir():
        return describe_results(path, config_path)
    raise CkaflowError(
        f"{path}: not an artifact ckaflow knows (a .zarr store, a .pt checkpoint, a .parquet or "
        ".csv table, or a results folder)"
    )
