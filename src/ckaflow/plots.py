"""Figures from the tidy CKA table: heatmaps and per-layer curves, readable in greyscale."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no screen on clusters or CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ckaflow.provenance import atomic_path  # noqa: E402


def _stage_ticks(frame: pd.DataFrame, side: str) -> tuple[list[int], list[str]]:
    """Tick at the first layer of each stage (and at the heads), labelled with its name."""
    layers = (
        frame[[f"layer_index_{side}", f"layer_{side}", f"stage_{side}"]]
        .drop_duplicates()
        .sort_values(f"layer_index_{side}")
    )
    first = layers.groupby(f"stage_{side}", sort=False).head(1)
    return first[f"layer_index_{side}"].tolist(), first[f"layer_{side}"].tolist()


def _save(fig, path: Path) -> None:
    with atomic_path(path) as scratch:
        fig.savefig(scratch, dpi=120, bbox_inches="tight", format="png")
    plt.close(fig)


def heatmap(frame: pd.DataFrame, title: str, path: Path) -> None:
    grid = frame.pivot(index="layer_index_a", columns="layer_index_b", values="value")
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    image = ax.imshow(grid.to_numpy(), origin="lower", cmap="magma", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label=f"CKA ({frame['estimator'].iloc[0]})")
    for axis, side in ((ax.set_yticks, "a"), (ax.set_xticks, "b")):
        ticks, labels = _stage_ticks(frame, side)
        axis(ticks, labels, fontsize=7)
    ax.tick_params(axis="x", labelrotation=90)
    ax.set_ylabel(f"{frame['run_a'].iloc[0]} ({frame['view_a'].iloc[0]})")
    ax.set_xlabel(f"{frame['run_b'].iloc[0]} ({frame['view_b'].iloc[0]})")
    ax.set_title(title)
    _save(fig, path)


def depth_curves(frame: pd.DataFrame, title: str, ylabel: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 4))
    for (run, _), group in frame.groupby(["run_a", "comparison"]):
        group = group.sort_values("layer_index_a")
        ax.plot(group["layer_index_a"], group["value"], marker="o", markersize=3, label=run)
    ticks, labels = _stage_ticks(frame, "a")
    ax.set_xticks(ticks, labels, rotation=90, fontsize=7)
    ax.set_ylim(-0.05, 1.05)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_all(table: str | Path, out_dir: str | Path) -> list[Path]:
    """Every figure the table supports; returns their paths."""
    frame = pd.read_parquet(table)
    out_dir = Path(out_dir)
    written = []
    for _, group in frame[frame["kind"] == "within"].groupby("comparison"):
        path = out_dir / f"within-{group['run_a'].iloc[0]}.png"
        heatmap(group, f"Within-model CKA: {group['run_a'].iloc[0]}", path)
        written.append(path)
    for _, group in frame[frame["kind"] == "cross"].groupby("comparison"):
        run_a, run_b = group["run_a"].iloc[0], group["run_b"].iloc[0]
        path = out_dir / f"cross-{run_a}-vs-{run_b}.png"
        heatmap(group, f"Cross-model CKA: {run_a} vs {run_b}", path)
        written.append(path)
    invariance = frame[(frame["kind"] == "invariance") & (frame["layer_a"] == frame["layer_b"])]
    if len(invariance):
        path = out_dir / "invariance.png"
        depth_curves(invariance, "Augmentation invariance per layer", "CKA(aug1, aug2)", path)
        written.append(path)
    classes = frame[frame["kind"] == "class"]
    if len(classes):
        path = out_dir / "class.png"
        depth_curves(classes, "Class structure per layer", "CKA(layer, one-hot labels)", path)
        written.append(path)
    if np.isnan(frame["value"]).any():
        print(
            f"warning: {int(np.isnan(frame['value']).sum())} CKA values are NaN (constant layers)"
        )
    return written
