"""Figures from the tidy CKA table: heatmaps and per-layer curves, readable in greyscale."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no screen on clusters or CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ckaflow.provenance import atomic_path  # noqa: E402
from ckaflow.tables import read_table  # noqa: E402


def _stage_ticks(frame: pd.DataFrame, side: str) -> tuple[list[int], list[str]]:
    """Tick at the first layer of each stage (and at the heads), labelled with its name."""
    layers = (
        frame[[f"layer_index_{side}", f"layer_{side}", f"stage_{side}"]]
        .drop_duplicates()
        .sort_values(f"layer_index_{side}")
    )
    first = layers.groupby(f"stage_{side}", sort=False).head(1)
    return first[f"layer_index_{side}"].tolist(), first[f"layer_{side}"].tolist()


FORMATS = ("png", "pdf")


def _save(fig, path: Path) -> list[Path]:
    """The figure as PNG (for the report and a quick look) and PDF (for papers)."""
    written = []
    for fmt in FORMATS:
        target = path.with_suffix(f".{fmt}")
        with atomic_path(target) as scratch:
            fig.savefig(scratch, bbox_inches="tight", format=fmt)
        written.append(target)
    plt.close(fig)
    return written


def heatmap(frame: pd.DataFrame, title: str, path: Path) -> list[Path]:
    grid = frame.pivot(index="layer_index_a", columns="layer_index_b", values="value")
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    image = ax.imshow(grid.to_numpy(), origin="lower", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label=f"CKA ({frame['estimator'].iloc[0]})")
    for axis, side in ((ax.set_yticks, "a"), (ax.set_xticks, "b")):
        ticks, labels = _stage_ticks(frame, side)
        axis(ticks, labels, fontsize=7)
    ax.tick_params(axis="x", labelrotation=90)
    ax.set_ylabel(f"{frame['run_a'].iloc[0]} ({frame['view_a'].iloc[0]})")
    ax.set_xlabel(f"{frame['run_b'].iloc[0]} ({frame['view_b'].iloc[0]})")
    ax.set_title(title)
    return _save(fig, path)


MARKERS = "osd^v<>"


def depth_curves(frame: pd.DataFrame, title: str, ylabel: str, path: Path) -> list[Path]:
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
    return _save(fig, path)


def cross_diagonal(cross: pd.DataFrame, path: Path) -> list[Path]:
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
    return _save(fig, path)


def probe_curves(probes: pd.DataFrame, path: Path) -> list[Path]:
    """Linear-probe accuracy against depth: each run trained (solid) and untrained (dashed)."""
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, ((run, encoder), group) in enumerate(probes.groupby(["run", "encoder"])):
        group = group.sort_values("layer_index")
        ax.plot(
            group["layer_index"],
            group["eval_accuracy"],
            "-" if encoder == "trained" else ":",
            marker=MARKERS[i % len(MARKERS)],
            markersize=3,
            label=f"{run} ({encoder})",
        )
    first = probes.sort_values("layer_index").groupby("stage").head(1).drop_duplicates("layer")
    ax.set_xticks(first["layer_index"], first["layer"], rotation=90, fontsize=7)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("linear probe accuracy (eval subset)")
    ax.set_title("Linear separability per layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_all(
    table: str | Path,
    out_dir: str | Path,
    probes: str | Path | None = None,
    style: dict | None = None,
) -> list[Path]:
    """Every figure the tables support (PNG and PDF); returns their paths. `style`: the
    config's `plots` section (dpi, cmap)."""
    style = {"dpi": 120, "cmap": "magma", **(style or {})}
    rc = {"savefig.dpi": style["dpi"], "image.cmap": style["cmap"]}
    with matplotlib.rc_context(rc):
        return _plot_all(table, out_dir, probes)


def _plot_all(table, out_dir, probes) -> list[Path]:
    frame = read_table(table)
    out_dir = Path(out_dir)
    written: list[Path] = []
    for _, group in frame[frame["kind"] == "within"].groupby("comparison"):
        run, view = group["run_a"].iloc[0], group["view_a"].iloc[0]
        title = f"Within-model CKA: {run} ({view})"
        written += heatmap(group, title, out_dir / f"within-{run}.{view}.png")
    cross = frame[frame["kind"] == "cross"]
    for _, group in cross.groupby("comparison"):
        run_a, run_b = group["run_a"].iloc[0], group["run_b"].iloc[0]
        title = f"Cross-model CKA: {run_a} vs {run_b}"
        written += heatmap(group, title, out_dir / f"cross-{run_a}-vs-{run_b}.png")
        for part, kind, what in (
            ("odd", "residual", "residual-branch"),
            ("even", "out", "post-residual"),
        ):
            sub = group[(group["layer_kind_a"] == kind) & (group["layer_kind_b"] == kind)]
            title = f"{what} ({part}) layers: {run_a} vs {run_b}"
            written += heatmap(sub, title, out_dir / f"cross-{part}-{run_a}-vs-{run_b}.png")
    if len(cross):
        written += cross_diagonal(cross, out_dir / "cross-diagonal.png")
    invariance = frame[(frame["kind"] == "invariance") & (frame["layer_a"] == frame["layer_b"])]
    if len(invariance):
        title, ylabel = "Augmentation invariance per layer", "CKA between views"
        written += depth_curves(invariance, title, ylabel, out_dir / "invariance.png")
    classes = frame[frame["kind"] == "class"]
    if len(classes):
        title, ylabel = "Class structure per layer", "CKA(layer, one-hot labels)"
        written += depth_curves(classes, title, ylabel, out_dir / "class.png")
    if probes is not None:
        written += probe_curves(read_table(probes, "probes"), out_dir / "probes.png")
    if np.isnan(frame["value"]).any():
        print(
            f"warning: {int(np.isnan(frame['value']).sum())} CKA values are NaN (constant layers)"
        )
    return written
