"""Figures from the tidy CKA table: heatmaps and per-layer curves, readable in greyscale.

Every figure is drawn by a `draw_*` function that returns the matplotlib Figure (so that tests
can read its ticks and data back) and saved by a thin wrapper of the same name without `draw_`;
each figure family of `ckaflow.figure_registry` has a generator here (`within_figures`...) that
yields its figures with their file names; `draw_all` runs them all and `plot_all` saves them.

Layer axes: rows, columns and points sit at the position of their layer among the layers the
figure draws (0..k-1, in forward order), never at the layer's index in the full registry, so a
subset (the odd or even layers) is labelled as correctly as the full network. Tick rule
(`LayerAxis.ticks`): every drawn layer when at most `EVERY_LAYER_MAX` are drawn; otherwise the
last drawn layer of each residual block (its `.out` when drawn) and every layer outside a block
(stem, pool, heads, labels); then ticks closer than `TICK_GAP_IN` inches are thinned, keeping
the first and last layer and block ends first. Thin lines mark the boundaries between stages.

Undefined values (NaN: CKA of a constant layer, whose self-HSIC is zero) are not left as silent
gaps: a heatmap draws × on their cells and says so in its title, a curve draws × in its colour at
the foot of the panel under their layers, with a legend entry.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no screen on clusters or CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from ckaflow.config import method_name  # noqa: E402
from ckaflow.figure_registry import (  # noqa: E402
    CROSS_PARTS,
    FAMILIES,
    FIGURE_FORMATS,
    figure_name,
)
from ckaflow.provenance import atomic_path  # noqa: E402
from ckaflow.tables import read_table  # noqa: E402

EVERY_LAYER_MAX = 20  # up to this many drawn layers, every one gets a tick
TICK_GAP_IN = 0.13  # the least distance between two tick labels (7 pt text), in inches
TICK_FONT = 7
BLOCK = re.compile(r"^(layer\d+\.\d+)\.")  # `layer<s>.<b>.<kind>` belongs to block `layer<s>.<b>`
MARKERS = "osD^v<>p*h"
INTERVAL = "interval"  # gid of the error bars of a curve (label `_interval:<curve's gid>`)
UNDEFINED = "undefined"  # gid of the × marks of NaN values (label `_undefined:<curve's gid>`)
UNDEFINED_Y = (0.025, 0.045)  # a curve's × marks: this far up the panel, and the next curve's
# × under the same layer this much higher (axes fractions)
HEATMAP_UNDEFINED = "×: CKA undefined (NaN: a constant layer)"
CURVE_UNDEFINED = "× at the foot: CKA undefined (NaN: a constant layer)"
STAGE_LINE = "stage-boundary"  # gid of the lines between stages


@dataclass(frozen=True)
class LayerAxis:
    """The layers one axis draws, in forward order: layer `names[i]` sits at position i."""

    names: tuple[str, ...]
    stages: tuple[int, ...]

    @classmethod
    def of(cls, frame: pd.DataFrame, side: str = "") -> LayerAxis:
        """The layers of one side (`a`, `b`, or "" for a probes table) of `frame`, ordered by
        registry index (ties, e.g. `fc` and `head.0` of two methods, by name)."""
        suffix = f"_{side}" if side else ""
        layers = (
            frame[[f"layer{suffix}", f"layer_index{suffix}", f"stage{suffix}"]]
            .set_axis(["layer", "index", "stage"], axis=1)
            .drop_duplicates("layer")
            .sort_values(["index", "layer"])
        )
        return cls(tuple(layers["layer"]), tuple(int(s) for s in layers["stage"]))

    def __len__(self) -> int:
        return len(self.names)

    def positions(self, layers) -> np.ndarray:
        where = {name: i for i, name in enumerate(self.names)}
        return np.array([where[name] for name in layers], dtype=float)

    def ticks(self, length_in: float) -> tuple[list[int], list[str]]:
        """Tick positions and labels (the layer names) for an axis `length_in` inches long."""
        k = len(self.names)
        if not k:
            return [], []
        blocks = [m.group(1) if (m := BLOCK.match(name)) else None for name in self.names]
        if k <= EVERY_LAYER_MAX:
            candidates = list(range(k))
        else:  # the last drawn layer of each block, and every layer outside a block
            candidates = [
                i
                for i, block in enumerate(blocks)
                if block is None or i == k - 1 or blocks[i + 1] != block
            ]
        # too close for their labels: thinned, keeping the axis ends, then block ends, first
        block_ends = [i for i in candidates if i + 1 == k or blocks[i] != blocks[i + 1]]
        gap = TICK_GAP_IN * k / max(length_in, 1e-6)  # in positions
        kept: list[int] = []
        for i in dict.fromkeys([0, k - 1, *block_ends, *candidates]):
            if all(abs(i - j) >= gap for j in kept):
                kept.append(i)
        kept.sort()
        return kept, [self.names[i] for i in kept]

    def stage_boundaries(self) -> list[float]:
        return [i - 0.5 for i in range(1, len(self.stages)) if self.stages[i] != self.stages[i - 1]]


def _label_layers(ax, axis: LayerAxis, which: str, length_in: float, line_style: dict) -> None:
    """Ticks at the drawn layers named by `axis`, and a thin line at each stage boundary."""
    ticks, labels = axis.ticks(length_in)
    if which == "x":
        ax.set_xticks(ticks, labels, rotation=90, fontsize=TICK_FONT)
        ax.set_xlim(-0.5, len(axis) - 0.5)
        draw = ax.axvline
    else:
        ax.set_yticks(ticks, labels, fontsize=TICK_FONT)
        ax.set_ylim(-0.5, len(axis) - 0.5)
        draw = ax.axhline
    for boundary in axis.stage_boundaries():
        draw(boundary, gid=STAGE_LINE, **line_style)


# lines between stages: on a heatmap a two-tone dash (visible on dark and light cells alike)
HEATMAP_STAGE_LINE = {"color": "white", "gapcolor": "black", "linewidth": 0.5, "dashes": (3, 3)}
CURVE_STAGE_LINE = {"color": "0.55", "linewidth": 0.6, "zorder": 0}


FORMATS = FIGURE_FORMATS


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


def _colours(n: int, top: float = 0.68) -> list:
    """n colours of the configured (lightness-monotone) colour map, from its dark end up to
    `top` (mid by default): distinct in greyscale, none too light to see on white."""
    cmap = plt.get_cmap(matplotlib.rcParams["image.cmap"])
    return [cmap(x) for x in np.linspace(0.0, top, n)] if n > 1 else [cmap(0.0)]


# -- heatmaps ---------------------------------------------------------------------------------


def draw_heatmap(frame: pd.DataFrame, title: str):
    """CKA of every drawn layer of side a (rows) against every drawn layer of side b."""
    rows, cols = LayerAxis.of(frame, "a"), LayerAxis.of(frame, "b")
    grid = np.full((len(rows), len(cols)), np.nan)
    grid[
        rows.positions(frame["layer_a"]).astype(int), cols.positions(frame["layer_b"]).astype(int)
    ] = frame["value"].to_numpy(dtype=float)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    image = ax.imshow(grid, origin="lower", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(image, ax=ax, label=f"CKA ({frame['estimator'].iloc[0]})", shrink=0.85)
    side = 4.2  # inches the longer axis of the image spans
    scale = side / max(len(rows), len(cols))
    undefined = frame[frame["value"].isna()]
    if len(undefined):  # a NaN cell would be blank, like a light one: crossed out instead
        ax.plot(
            cols.positions(undefined["layer_b"]),
            rows.positions(undefined["layer_a"]),
            linestyle="none",
            marker="x",
            markersize=min(7.0, 0.6 * scale * 72),
            markeredgewidth=1.0,
            color="0.3",
            gid=UNDEFINED,
            label=f"_{UNDEFINED}",
        )
        title = f"{title}\n{HEATMAP_UNDEFINED}"
    _label_layers(ax, rows, "y", len(rows) * scale, HEATMAP_STAGE_LINE)
    _label_layers(ax, cols, "x", len(cols) * scale, HEATMAP_STAGE_LINE)
    ax.set_ylabel(f"layer of {frame['run_a'].iloc[0]} ({frame['view_a'].iloc[0]})")
    ax.set_xlabel(f"layer of {frame['run_b'].iloc[0]} ({frame['view_b'].iloc[0]})")
    ax.set_title(title, fontsize=10)
    return fig


def heatmap(frame: pd.DataFrame, title: str, path: Path) -> list[Path]:
    return _save(draw_heatmap(frame, title), path)


# -- curves -----------------------------------------------------------------------------------


def _curve(ax, x, group: pd.DataFrame, column: str, gid: str, **style) -> Line2D:
    """One line of values against layer position (its `gid` names what it shows), with its
    bootstrap 95% intervals as error bars where the table has them."""
    order = np.argsort(x)
    x, group = np.asarray(x)[order], group.iloc[order]
    y = group[column].to_numpy(dtype=float)
    (line,) = ax.plot(x, y, gid=gid, markersize=3.5, **style)
    _mark_undefined(ax, x[np.isnan(y)], line.get_color(), gid)
    if {"ci_low", "ci_high"} <= set(group.columns):
        low = group["ci_low"].to_numpy(dtype=float)
        high = group["ci_high"].to_numpy(dtype=float)
        known = ~(np.isnan(low) | np.isnan(high))
        if known.any():
            ax.vlines(
                x[known],
                low[known],
                high[known],
                colors=[line.get_color()],
                linewidth=0.9,
                gid=INTERVAL,
                label=f"_{INTERVAL}:{gid}",
            )
    return line


def _mark_undefined(ax, x, colour, gid: str) -> None:
    """× in the curve's colour at the foot of the panel under each layer (at `x`) whose value
    is NaN, where the line has a gap; stacked above the × of curves drawn before."""
    if not len(x):
        return
    taken = [v for m in ax.lines if m.get_gid() == UNDEFINED for v in m.get_xdata()]
    foot, step = UNDEFINED_Y
    ax.plot(
        x,
        [foot + step * taken.count(v) for v in x],
        transform=ax.get_xaxis_transform(),  # x: data, y: fraction of the panel
        linestyle="none",
        marker="x",
        markersize=6,
        markeredgewidth=1.3,
        color=colour,
        clip_on=False,
        gid=UNDEFINED,
        label=f"_{UNDEFINED}:{gid}",
    )


def _has_intervals(frame: pd.DataFrame) -> bool:
    return bool(frame[["ci_low", "ci_high"]].notna().all(axis=1).any())


def _finish_curves(
    fig,
    axes,
    axis_of,
    ylabel: str,
    ylim=(-0.05, 1.05),
    handles=None,
    intervals: bool = False,
    legend: str = "outside right center",
    undefined: str = CURVE_UNDEFINED,
) -> None:
    """Layer ticks, stage lines and x label on each panel; one legend, outside the axes (with
    an entry for the error bars when there are any, and one saying `undefined` for the × marks
    of NaN values when there are any)."""
    for ax, axis in zip(axes, axis_of, strict=True):
        width = fig.get_figwidth() * 0.8 / len(axes)
        _label_layers(ax, axis, "x", width, CURVE_STAGE_LINE)
        ax.set_ylim(*ylim)
        ax.grid(axis="y", alpha=0.3)
        ax.set_xlabel("layer (forward order; grey lines: stage boundaries)", fontsize=8)
    fig.align_xlabels(axes)
    axes[0].set_ylabel(ylabel)
    if handles is None:
        handles, labels = axes[0].get_legend_handles_labels()
    elif handles:
        handles, labels = map(list, zip(*handles, strict=True))
    else:  # nothing labelled (e.g. no pair of runs to draw)
        labels = []
    if intervals:
        bar = Line2D([], [], color="0.3", marker="|", markersize=9, linestyle="none")
        handles, labels = [*handles, bar], [*labels, "bars: 95% bootstrap interval"]
    if any(line.get_gid() == UNDEFINED for ax in axes for line in ax.lines):
        cross = Line2D([], [], color="0.3", marker="x", markeredgewidth=1.3, linestyle="none")
        handles, labels = [*handles, cross], [*labels, undefined]
    ncols = 2 if legend.endswith("center") and "lower" in legend else 1
    fig.legend(handles, labels, loc=legend, fontsize=7, frameon=False, ncols=ncols)


def _title(fig, axes, title: str) -> None:
    """The figure's title: over the single axes, or over all panels."""
    if len(axes) > 1:
        fig.suptitle(title)
    else:
        axes[0].set_title(title)


def _run_styles(frame: pd.DataFrame, side: str = "a") -> dict[str, dict]:
    """Colour and marker per run; line style per method (solid, dashed, ...)."""
    runs = frame[[f"run_{side}", f"method_{side}"]].drop_duplicates(f"run_{side}")
    runs = runs.sort_values([f"method_{side}", f"run_{side}"])
    methods = list(dict.fromkeys(runs[f"method_{side}"]))
    dash = ["-", "--", "-.", ":"]
    return {
        run: {
            "color": colour,
            "marker": MARKERS[i % len(MARKERS)],
            "linestyle": dash[methods.index(method) % len(dash)],
        }
        for i, (run, method, colour) in enumerate(
            zip(runs[f"run_{side}"], runs[f"method_{side}"], _colours(len(runs)), strict=True)
        )
    }


VIEW_PAIRS = {("aug1", "aug2"): 0, ("clean", "aug1"): 1}


def layer_families(frame: pd.DataFrame, side: str = "a") -> list[list[str]]:
    """Runs whose layers can share one depth axis: the ResNets (one registry, heads aside),
    then each network imported as a module (its own layers) alone."""
    suffix = f"_{side}" if side else ""
    run, kind = f"run{suffix}", f"layer_kind{suffix}"
    modules = set(frame.loc[frame[kind] == "module", run])
    resnets = sorted(set(frame[run]) - modules)
    return ([resnets] if resnets else []) + [[r] for r in sorted(modules)]


def _legend_entries(axes) -> list[tuple]:
    """(handle, label) of every labelled line on the panels, each label once."""
    entries = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, handle)
    return [(handle, label) for label, handle in entries.items()]


def draw_depth_curves(frame: pd.DataFrame, title: str, ylabel: str):
    """One value per layer of side a against depth, a line per run (colour, marker; line style
    per method), one panel per pair of views; error bars: bootstrap 95% intervals. Networks
    imported as modules, whose layers are their own, get a row of panels each."""
    pairs = sorted(
        frame.groupby(["view_a", "view_b"]).groups, key=lambda p: (VIEW_PAIRS.get(p, 9), p)
    )
    families = layer_families(frame)
    styles = _run_styles(frame)
    fig, grid = plt.subplots(
        len(families),
        len(pairs),
        figsize=(1.5 + 4.6 * len(pairs) if len(pairs) > 1 else 8.0, 4.2 * len(families)),
        sharey=True,
        squeeze=False,
        layout="constrained",
    )
    axes, axis_of = [], []
    for row, family in zip(grid, families, strict=True):
        rows = frame[frame["run_a"].isin(family)]
        axis = LayerAxis.of(rows, "a")
        for ax, (view_a, view_b) in zip(row, pairs, strict=True):
            part = rows[(rows["view_a"] == view_a) & (rows["view_b"] == view_b)]
            for run, group in sorted(part.groupby("run_a"), key=lambda g: list(styles).index(g[0])):
                x = axis.positions(group["layer_a"])
                _curve(ax, x, group, "value", run, label=run, **styles[run])
            what = (
                f"{view_a} images vs one-hot labels"
                if view_b == "labels"
                else f"{view_a} vs {view_b}"
            )
            if len(pairs) > 1:
                ax.set_title(what, fontsize=9)
            axes.append(ax)
            axis_of.append(axis)
        row[0].set_ylabel(ylabel)
    _title(fig, axes, title if len(axes) > 1 else f"{title}: {what}")
    _finish_curves(
        fig, axes, axis_of, ylabel, handles=_legend_entries(axes), intervals=_has_intervals(frame)
    )
    return fig


def depth_curves(frame: pd.DataFrame, title: str, ylabel: str, path: Path) -> list[Path]:
    return _save(draw_depth_curves(frame, title, ylabel), path)


DIAGONAL_PANELS = (
    ("out", "even layers: block output after the addition (.out)"),
    ("residual", "odd layers: residual branch before the addition (.residual)"),
)
BAND_HATCH = ("////", "\\\\\\\\", "xx", "..")


def seed_replicates(frame: pd.DataFrame) -> pd.Series:
    """Rows comparing two seed replicates (runs that differ only in seed; an import without a
    seed replicates nothing)."""
    if "replicate_a" not in frame:
        return pd.Series(False, frame.index)
    return frame["replicate_a"].notna() & (frame["replicate_a"] == frame["replicate_b"])


def _band(
    ax, axis, rows: pd.DataFrame, colour, hatch: str, label: str, gid: str, style: str = "-."
):
    """A band over the rows' layers spanning their values and intervals, with a line through
    their mean (gid `gid`) and × under layers where a value is NaN; (band, line)."""
    x = axis.positions(rows["layer_a"])
    low = np.fmin(rows["value"], rows["ci_low"].fillna(rows["value"]))
    high = np.fmax(rows["value"], rows["ci_high"].fillna(rows["value"]))
    spread = pd.DataFrame({"x": x, "low": low, "high": high, "value": rows["value"]})
    spread = spread.groupby("x").agg(
        low=("low", "min"), high=("high", "max"), value=("value", "mean")
    )
    poly = ax.fill_between(
        spread.index,
        spread["low"],
        spread["high"],
        facecolor=(*colour[:3], 0.18),
        edgecolor=(*colour[:3], 0.6),
        hatch=hatch,
        linewidth=0.0,
        label=label,
        zorder=1,
    )
    (mid,) = ax.plot(
        spread.index,
        spread["value"],
        color=colour,
        linewidth=0.9,
        linestyle=style,
        zorder=2,
        gid=gid,
    )
    _mark_undefined(ax, np.unique(x[rows["value"].isna().to_numpy()]), colour, gid)
    return poly, mid


def _pair_line(ax, axis, group: pd.DataFrame, colour, marker: str, same_init) -> tuple:
    """One pair of runs' curve: solid, or thin dotted where both started alike; (label, line)."""
    comparison = group["comparison"].iloc[0]
    shared = bool(same_init[comparison])
    label = f"{group['run_a'].iloc[0]} vs {group['run_b'].iloc[0]}"
    style = (
        {"linestyle": ":", "linewidth": 1.0, "markerfacecolor": "white"}
        if shared
        else {"linestyle": "-", "linewidth": 1.5}
    )
    label += " (same initial weights)" if shared else ""
    line = _curve(
        ax,
        axis.positions(group["layer_a"]),
        group,
        "value",
        comparison,
        color=colour,
        marker=marker,
        label=label,
        zorder=3,
        **style,
    )
    return label, line


def draw_cross_diagonal(cross: pd.DataFrame):
    """CKA of each layer with the same layer of the other run, against depth; post-residual
    (even) and residual-branch (odd) layers in two panels. Pairs of runs are lines (thin
    dotted where both runs started from the same initial weights), except the pairs of seed
    replicates of each method, which are a band spanning their values and bootstrap
    intervals."""
    diagonal = cross[cross["layer_a"] == cross["layer_b"]]
    kinds = [(k, t) for k, t in DIAGONAL_PANELS if (diagonal["layer_kind_a"] == k).any()]
    kinds = kinds or [(None, "all layers")]
    replicates = seed_replicates(diagonal)
    between = diagonal[~replicates]  # other methods, or not replicates
    same_init = _same_init(between)
    pairs = sorted(between["comparison"].unique(), key=lambda c: (bool(same_init[c]), c))
    methods = sorted(diagonal.loc[replicates, "method_a"].unique())
    fig, axes = plt.subplots(
        1,
        len(kinds),
        figsize=(2.5 + 4.6 * len(kinds), 5.2),
        sharey=True,
        squeeze=False,
        layout="constrained",
    )
    axes = list(axes[0])
    handles: dict[str, object] = {}  # legend entries by label, in the order first drawn
    axis_of = []
    for ax, (kind, panel_title) in zip(axes, kinds, strict=True):
        part = diagonal if kind is None else diagonal[diagonal["layer_kind_a"] == kind]
        axis = LayerAxis.of(part, "a")
        axis_of.append(axis)
        _seed_bands(ax, axis, part, methods, handles)
        if len(pairs) <= len(MARKERS):  # a line per pair
            _pair_lines(ax, axis, part, pairs, same_init, handles)
        else:  # too many pairs for a line each
            _pair_bands(ax, axis, part, between, same_init, handles)
        ax.set_title(panel_title, fontsize=9)
    _title(fig, axes, "Cross-model CKA along the diagonal")
    _finish_curves(
        fig,
        axes,
        axis_of,
        "CKA(layer, same layer of the other run)",
        handles=[(h, label) for label, h in handles.items()],
        intervals=_has_intervals(between) and len(pairs) <= len(MARKERS),  # bars on lines only
        legend="outside lower center",
    )
    return fig


def _same_init(between: pd.DataFrame) -> pd.Series:
    """Per comparison: whether both runs started from the same initial weights."""
    by_comparison = between.groupby("comparison")
    return by_comparison["init_a"].first().eq(by_comparison["init_b"].first())


def _seed_bands(ax, axis, part: pd.DataFrame, methods: list, handles: dict) -> None:
    """Per method, a band over the pairs of its seed replicates; legend entries into `handles`."""
    method_colours = dict(zip(methods, _colours(len(methods) + 1)[1:], strict=True))
    for i, method in enumerate(methods):
        band = part[seed_replicates(part) & (part["method_a"] == method)]
        if not len(band):
            continue
        what = "range and 95% intervals" if _has_intervals(band) else "range"
        label = f"{method_name(method)} seed vs seed ({what})"
        hatch = BAND_HATCH[i % len(BAND_HATCH)]
        drawn = _band(ax, axis, band, method_colours[method], hatch, label, f"seeds-{method}")
        handles.setdefault(label, drawn)


def _pair_lines(ax, axis, part: pd.DataFrame, pairs: list, same_init, handles: dict) -> None:
    """A line per pair of runs (few enough for a marker each); legend entries into `handles`."""
    for comparison, colour, marker in zip(pairs, _colours(len(pairs)), MARKERS, strict=False):
        group = part[part["comparison"] == comparison]
        if len(group):
            label, line = _pair_line(ax, axis, group, colour, marker, same_init)
            handles.setdefault(label, line)


def _pair_bands(ax, axis, part: pd.DataFrame, between, same_init, handles: dict) -> None:
    """Too many pairs of runs for a line each: per pair of methods and start, a band and its
    mean over all their pairs; legend entries into `handles`."""
    groups = between.assign(shared=between["comparison"].map(same_init))
    keys = groups.drop_duplicates(["method_a", "method_b", "shared"])
    keys = keys.sort_values(["shared", "method_a", "method_b"])
    # the dark end of the colour map (the seed bands take the middle), told apart by hatch and
    # line style
    colours = _colours(len(keys), top=0.15)
    for i, key in enumerate(keys.itertuples()):
        rows = part[
            part["comparison"].isin(
                groups.loc[
                    (groups["method_a"] == key.method_a)
                    & (groups["method_b"] == key.method_b)
                    & (groups["shared"] == key.shared),
                    "comparison",
                ]
            )
        ]
        if not len(rows):
            continue
        start = "same" if key.shared else "different"
        label = (
            f"{method_name(key.method_a)} vs {method_name(key.method_b)}, {start} initial "
            f"weights ({rows['comparison'].nunique()} pairs: range and mean)"
        )
        gid = f"pairs-{key.method_a}-{key.method_b}-{start}"
        hatch, style = ("..", ":") if key.shared else ("||", "-")
        drawn = _band(ax, axis, rows, colours[i], hatch, label, gid, style)
        handles.setdefault(label, drawn)


def cross_diagonal(cross: pd.DataFrame, path: Path) -> list[Path]:
    return _save(draw_cross_diagonal(cross), path)


def draw_probe_curves(probes: pd.DataFrame):
    """Linear-probe accuracy against depth: each run trained (solid) and untrained (dotted);
    a network imported as a module, whose layers are its own, in a panel of its own."""
    runs = sorted(probes["run"].unique())
    colours = dict(zip(runs, _colours(len(runs)), strict=True))
    families = layer_families(probes, "")
    fig, grid = plt.subplots(
        len(families), 1, figsize=(9.5, 4.2 * len(families)), squeeze=False, layout="constrained"
    )
    axes = [row[0] for row in grid]
    axis_of = [LayerAxis.of(probes[probes["run"].isin(family)]) for family in families]
    for ax, axis, family in zip(axes, axis_of, families, strict=True):
        _probe_panel(ax, axis, probes, family, colours, runs)
        ax.set_ylabel("linear probe accuracy (eval subset)")
    axes[0].set_title(
        "Linear separability per layer (dotted: the same network untrained)", fontsize=11
    )
    _finish_curves(
        fig,
        axes,
        axis_of,
        "linear probe accuracy (eval subset)",
        ylim=(0, 1.02),
        handles=_legend_entries(axes),
        undefined="× at the foot: no accuracy (NaN)",
    )
    return fig


def _probe_panel(ax, axis, probes, family, colours, runs) -> None:
    for run in family:
        i = runs.index(run)
        for encoder, style in (
            ("trained", {"linestyle": "-", "linewidth": 1.5}),
            ("untrained", {"linestyle": ":", "linewidth": 1.0, "markerfacecolor": "white"}),
        ):
            group = probes[(probes["run"] == run) & (probes["encoder"] == encoder)]
            if len(group):
                _curve(
                    ax,
                    axis.positions(group["layer"]),
                    group,
                    "eval_accuracy",
                    f"{run}.{encoder}",
                    color=colours[run],
                    marker=MARKERS[i % len(MARKERS)],
                    label=f"{run} ({encoder})",
                    **style,
                )


def probe_curves(probes: pd.DataFrame, path: Path) -> list[Path]:
    return _save(draw_probe_curves(probes), path)


# -- all figures ------------------------------------------------------------------------------


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


# -- one drawing generator per figure family (`ckaflow.figure_registry`) --------------------
# Each takes the tidy CKA table and the probes table (or None) and yields (name, Figure) for
# every figure of its family the tables support.


def within_figures(frame: pd.DataFrame, probes) -> Iterator[tuple]:
    for _, group in frame[frame["kind"] == "within"].groupby("comparison"):
        run, view = group["run_a"].iloc[0], group["view_a"].iloc[0]
        title = f"Within-model CKA: {run} ({view})"
        yield figure_name("within", run, view), draw_heatmap(group, title)


def _cross_groups(frame: pd.DataFrame) -> Iterator[tuple]:
    for _, group in frame[frame["kind"] == "cross"].groupby("comparison"):
        yield group["run_a"].iloc[0], group["run_b"].iloc[0], group


def cross_figures(frame: pd.DataFrame, probes) -> Iterator[tuple]:
    for run_a, run_b, group in _cross_groups(frame):
        title = f"Cross-model CKA: {run_a} vs {run_b}"
        yield figure_name("cross", run_a, run_b, ""), draw_heatmap(group, title)


def cross_part_figures(frame: pd.DataFrame, probes) -> Iterator[tuple]:
    for run_a, run_b, group in _cross_groups(frame):
        for part, kind, what in CROSS_PARTS:
            sub = group[(group["layer_kind_a"] == kind) & (group["layer_kind_b"] == kind)]
            if sub.empty:  # a side without such layers (an imported module): no figure
                continue
            title = f"{what} ({part}) layers: {run_a} vs {run_b}"
            yield figure_name("cross", run_a, run_b, part), draw_heatmap(sub, title)


def cross_diagonal_figures(frame: pd.DataFrame, probes) -> Iterator[tuple]:
    # the diagonal pairs a layer with its namesake: ResNets only (not imported modules)
    cross = frame[frame["kind"] == "cross"]
    resnets = cross[(cross["layer_kind_a"] != "module") & (cross["layer_kind_b"] != "module")]
    if len(resnets):
        yield figure_name("cross-diagonal"), draw_cross_diagonal(resnets)


def invariance_figures(frame: pd.DataFrame, probes) -> Iterator[tuple]:
    invariance = frame[(frame["kind"] == "invariance") & (frame["layer_a"] == frame["layer_b"])]
    if len(invariance):
        title, ylabel = "Augmentation invariance per layer", "CKA between views"
        yield figure_name("invariance"), draw_depth_curves(invariance, title, ylabel)


def class_figures(frame: pd.DataFrame, probes) -> Iterator[tuple]:
    classes = frame[frame["kind"] == "class"]
    if len(classes):
        title, ylabel = "Class structure per layer", "CKA(layer, one-hot labels)"
        yield figure_name("class"), draw_depth_curves(classes, title, ylabel)


def probe_figures(frame: pd.DataFrame, probes) -> Iterator[tuple]:
    if probes is not None:
        yield figure_name("probes"), draw_probe_curves(probes)


def draw_all(frame: pd.DataFrame, probes: pd.DataFrame | None = None) -> Iterator[tuple]:
    """Every figure the tables support, family by family (`figure_registry.FAMILIES`), one at a
    time (a caller saves and closes each before the next is drawn): (its name; the Figure)."""
    for family in FAMILIES:
        yield from globals()[family.draw](frame, probes)


def _plot_all(table, out_dir, probes) -> list[Path]:
    frame = read_table(table)
    probes = None if probes is None else read_table(probes, "probes")
    out_dir = Path(out_dir)
    written: list[Path] = []
    for name, fig in draw_all(frame, probes):  # PNG and PDF, each named by `study.figure_name`
        written += _save(fig, out_dir / f"{name}.png")
    if np.isnan(frame["value"]).any():
        print(
            f"warning: {int(np.isnan(frame['value']).sum())} CKA values are NaN (constant layers)"
        )
    return written
