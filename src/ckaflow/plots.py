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


MARKERS = "osd^v<>"


def depth_curves(frame: pd.DataFrame, title: str, ylabel: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 4))
    groups = frame.groupby(["run_a", "view_a", "view_b", "comparison"])
    for i, ((run, view_a, view_b, _), group) in enumerate(groups):
        group = group.sort_values("layer_index_a")
        label = run if view_b == "labels" else f"{run} ({view_a} vs {view_b})"
        style = "-" if view_a != "clean" or view_b == "labels" else "--"
        ax.plot(
            group["layer_index_a"],
            group["value"],
            style,
            marker=MARKERS[i % len(MARKERS)],
            markersize=3,
            label=label,
        )
    ticks, labels = _stage_ticks(frame, "a")
    ax.set_xticks(ticks, labels, rotation=90, fontsize=7)
    ax.set_ylim(-0.05, 1.05)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def cross_diagonal(cross: pd.DataFrame, path: Path) -> None:
    """CKA of each layer with the same layer of the other run, against depth: post-residual
    (even) and residual-branch (odd) layers apart; pairs of seeds of one method as a band."""
    diagonal = cross[cross["layer_a"] == cross["layer_b"]]
    fig, ax = plt.subplots(figsize=(8, 4))
    for kind, style, label in (
        ("out", "-", "even (post-residual)"),
        ("residual", "--", "odd (residual branch)"),
    ):
        part = diagonal[diagonal["layer_kind_a"] == kind]
        methods = part[part["method_a"] != part["method_b"]]
        for _, group in methods.groupby("comparison"):
            group = group.sort_values("layer_index_a")
            runs = f"{group['run_a'].iloc[0]} vs {group['run_b'].iloc[0]}"
            ax.plot(
                group["layer_index_a"],
                group["value"],
                style,
                marker="o",
                markersize=3,
                label=f"{label}: {runs}",
            )
        seeds = part[part["method_a"] == part["method_b"]]
        if len(seeds):
            band = seeds.groupby("layer_index_a")["value"].agg(["min", "max"])
            ax.fill_between(
                band.index,
                band["min"],
                band["max"],
                alpha=0.25,
                label=f"{label}: seed vs seed (same method)",
            )
    ticks, labels = _stage_ticks(diagonal, "a")
    ax.set_xticks(ticks, labels, rotation=90, fontsize=7)
    ax.set_ylim(-0.05, 1.05)
    ax.set_ylabel("CKA(layer, same layer of the other run)")
    ax.set_title("Cross-model CKA along the diagonal")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
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
    cross = frame[frame["kind"] == "cross"]
    for _, group in cross.groupby("comparison"):
        run_a, run_b = group["run_a"].iloc[0], group["run_b"].iloc[0]
        path = out_dir / f"cross-{run_a}-vs-{run_b}.png"
        heatmap(group, f"Cross-model CKA: {run_a} vs {run_b}", path)
        written.append(path)
        for part, kind, what in (
            ("odd", "residual", "residual-branch"),
            ("even", "out", "post-residual"),
        ):
            sub = group[(group["layer_kind_a"] == kind) & (group["layer_kind_b"] == kind)]
            path = out_dir / f"cross-{part}-{run_a}-vs-{run_b}.png"
            heatmap(sub, f"{what} ({part}) layers: {run_a} vs {run_b}", path)
            written.append(path)
    if len(cross):
        path = out_dir / "cross-diagonal.png"
        cross_diagonal(cross, path)
        written.append(path)
    invariance = frame[(frame["kind"] == "invariance") & (frame["layer_a"] == frame["layer_b"])]
    if len(invariance):
        path = out_dir / "invariance.png"
        depth_curves(invariance, "Augmentation invariance per layer", "CKA between views", path)
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
