"""`ckaflow inspect PATH`: a look inside any artifact (stores, checkpoints of any origin, tables),
or what a results folder holds and lacks; called by the command line only."""

from __future__ import annotations

import shutil
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


def _fed(meta: dict) -> str:
    """How the model.pt's network is fed the stored images (its run's `input`)."""
    from ckaflow.config import describe_input, run_spec_from_dict

    run = run_spec_from_dict(meta["run_spec"])
    return describe_input(run.input, meta["data_attrs"]["image_shape"])


CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")


def describe_checkpoint(path: Path) -> str:
    from ckaflow.checkpoint import read_state

    state = read_state(path)  # weights only: inspecting a file never runs code from it
    lines = [f"{path}: PyTorch checkpoint, {_human(_size(path))}"]
    meta = state.get("meta") if isinstance(state, dict) else None
    imported = (meta or {}).get("imported")
    if imported:
        lines += [
            f"  run: {meta.get('run')} (imported, not trained by ckaflow)",
            f"  from: {imported['format']} checkpoint {imported['checkpoint']}",
            f"  source SHA-256: {imported['sha256']}; heads left out: {imported['dropped']}",
            f"  fed: {_fed(meta)}",
            f"  code version: {meta.get('code_version')}, created {meta.get('created')}",
            f"  spec hash: {meta.get('spec_hash')}",
        ]
    elif meta:
        lines += [
            f"  run: {meta.get('run')}",
            f"  epochs: {meta.get('epochs')}",
            f"  kNN accuracy: {meta.get('knn_accuracy')}",
            f"  fed: {_fed(meta)}",
            f"  code version: {meta.get('code_version')}, created {meta.get('created')}",
            f"  spec hash: {meta.get('spec_hash')}",
        ]
    if isinstance(state, dict) and {"epoch", "model", "metrics"} <= set(state):
        lines.append(f"  training state after epoch {state['epoch']} (resumable)")
        for row in state.get("metrics", [])[-3:]:
            lines.append(f"    epoch {row['epoch']}: loss {row['loss']:.4f}")
    if isinstance(state, dict) and "model" in state:
        params = sum(v.numel() for v in state["model"].values() if hasattr(v, "numel"))
        lines.append(f"  model tensors: {len(state['model'])}, {params:,} values")
    if not meta:  # a checkpoint from elsewhere: what it holds, and how it could be imported
        lines += describe_foreign_state(state, path)
    return "\n".join(lines)


SHOWN_TENSORS = 12  # the first and last of a state_dict's tensors shown; the rest counted


def describe_foreign_state(state, path: Path) -> list[str]:
    """The container, the tensors (name, shape, dtype) and the import formats whose key layout
    the tensors match, of a PyTorch file ckaflow did not write."""
    import torch

    from ckaflow.imports import PARTS, CheckpointError, split_parts

    lines = []
    if isinstance(state, dict) and not all(isinstance(v, torch.Tensor) for v in state.values()):
        lines.append(f"  top-level keys: {', '.join(map(str, list(state)[:10]))}")
    weights = state
    for container in ("state_dict", "model"):  # Lightning / timm train.py
        if isinstance(state, dict) and isinstance(state.get(container), dict):
            weights = state[container]
            lines.append(f"  tensors under {container!r}")
            break
    if not isinstance(weights, dict):
        return [*lines, f"  holds a {type(weights).__name__}, not a state_dict"]
    tensors = {k: v for k, v in weights.items() if isinstance(v, torch.Tensor)}
    values = sum(v.numel() for v in tensors.values())
    lines.append(f"  tensors: {len(tensors)}, {values:,} values")
    names = list(tensors)
    half = SHOWN_TENSORS // 2
    shown = names if len(names) <= SHOWN_TENSORS else [*names[:half], None, *names[-half:]]
    for name in shown:
        if name is None:
            lines.append(f"    ... {len(names) - SHOWN_TENSORS} more")
            continue
        value = tensors[name]
        lines.append(f"    {name:<48} {str(tuple(value.shape)):<20} {str(value.dtype)[6:]}")
    stripped = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in tensors.items()}
    matches = []
    for fmt in PARTS:
        try:
            encoder = split_parts(stripped, fmt, path)["encoder"]
        except CheckpointError:
            continue
        if "conv1.weight" in encoder and any(k.startswith("layer1.") for k in encoder):
            matches.append(fmt)
    if matches:
        lines.append(f"  its keys fit import format: {', '.join(matches)} (a ResNet)")
    else:
        lines.append("  its keys fit no ResNet import format: import it with format: module")
    return lines


def describe_table(path: Path) -> str:
    import pandas as pd

    table = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    lines = [
        f"{path}: table, {len(table):,} rows × {table.shape[1]} columns, {_human(_size(path))}"
    ]
    lines += [f"  {name}: {dtype}" for name, dtype in table.dtypes.items()]
    from ckaflow.tables import PARQUET_ONLY

    head = table.head().drop(columns=[c for c in PARQUET_ONLY if c in table])  # lists
    # the first rows, wrapped to the terminal's width, long values cut
    width = shutil.get_terminal_size((100, 24)).columns
    lines.append(head.to_string(line_width=width, max_colwidth=min(40, width - 10)))
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
    if path.suffix in CHECKPOINT_SUFFIXES:
        return describe_checkpoint(path)
    if path.suffix in (".parquet", ".csv"):
        return describe_table(path)
    if path.is_dir():
        return describe_results(path, config_path)
    raise CkaflowError(
        f"{path}: not an artifact ckaflow knows (a .zarr store, a .pt, .pth or .ckpt "
        "checkpoint, a .parquet or .csv table, or a results folder)"
    )
