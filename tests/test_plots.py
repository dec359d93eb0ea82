"""Figures label what they show: every tick of a heatmap or curve sits on a drawn row, column or
point and names that layer, whatever subset of layers is drawn; seed bands per method; pairs
with shared initial weights told apart; bootstrap intervals drawn where the table has them."""

from __future__ import annotations

import math
import re
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import LineCollection, PolyCollection

from ckaflow import config
from ckaflow.layers import layer_registry
from ckaflow.study import Side, Study
from ckaflow.tables import COLUMNS, NULLABLE_INT

BLOCK = re.compile(r"^(layer\d+\.\d+)\.")


# -- a realistic synthetic study: resnet18, SimCLR and supervised, seeds 0 and 1 ----------------


def make_study(seeds=(0, 1)) -> Study:
    return Study(
        config.validate(
            {
                "study": "plots",
                "data": {"root": "/nonexistent"},
                "model": {"arch": "resnet18", "width": 4},
                "seeds": list(seeds),
            }
        )
    )


def _side(study: Study, side: Side, layer, suffix: str) -> dict:
    run = None if side.is_labels else study.runs[side.run]
    return {
        f"run_{suffix}": side.run,
        f"method_{suffix}": run.method if run else None,
        f"arch_{suffix}": run.model.arch if run else None,
        f"seed_{suffix}": run.seed if run else None,
        f"init_{suffix}": run.init_id if run else None,
        f"replicate_{suffix}": run.replicate_of if run else None,
        f"view_{suffix}": side.view,
        f"layer_{suffix}": layer.name,
        f"layer_index_{suffix}": layer.index,
        f"layer_kind_{suffix}": layer.kind,
        f"stage_{suffix}": layer.stage,
        f"block_{suffix}": layer.block,
    }


def _value(study: Study, comparison, la, lb) -> float:
    """A plausible CKA: high near the diagonal, seeds of one method closer than two methods,
    invariance and class structure growing with depth, a little noise per seed."""
    a = study.runs.get(comparison.a.run)
    depth = la.index / 27
    wiggle = 0.03 * math.sin(3 * la.index + 7 * lb.index + (a.seed if a else 0))
    if comparison.kind in ("within", "cross"):
        value = math.exp(-abs(la.index - lb.index) / 5)
        if comparison.kind == "cross":
            b = study.runs[comparison.b.run]
            same_method = a.method == b.method
            spread = {"simclr": 0.3, "supervised": 0.1}[a.method] if same_method else 0.5
            value *= 0.95 - spread * depth
            value *= 0.8 if la.kind == "residual" and not same_method else 1.0
            value += 0.05 if a.init_id == b.init_id else 0.0
    elif comparison.kind == "invariance":
        value = 0.3 + (0.6 if a.method == "simclr" else 0.25) * depth
        value += 0.1 if comparison.a.view == "clean" else 0.0
    else:  # class
        value = 0.1 + (0.55 if a.method == "supervised" else 0.35) * depth
    return float(np.clip(value + wiggle, 0.0, 1.0))


def synthetic_table(intervals: bool = True, seeds=(0, 1)) -> pd.DataFrame:
    """The merged CKA table of a full study (all comparisons, all layers)."""
    study = make_study(seeds)
    records = []
    for comparison in study.comparisons.values():
        for la in study.layers(comparison.a):
            for lb in study.layers(comparison.b):
                value = _value(study, comparison, la, lb)
                half = 0.02 + 0.04 * la.index / 27
                records.append(
                    {
                        "comparison": comparison.id,
                        "kind": comparison.kind,
                        **_side(study, comparison.a, la, "a"),
                        **_side(study, comparison.b, lb, "b"),
                        "estimator": "minibatch",
                        "batch_size": 256,
                        "n": 2000,
                        "value": value,
                        "ci_low": max(value - half, 0.0) if intervals else np.nan,
                        "ci_high": min(value + half, 1.0) if intervals else np.nan,
                        "bootstrap": 200 if intervals else 0,
                        "source_a": "gram/a.zarr",
                        "source_b": "gram/b.zarr",
                        "code_version": "test",
                    }
                )
    # columns the figures do not read (e.g. jackknife values) left empty
    table = pd.DataFrame.from_records(records).reindex(columns=list(COLUMNS))
    table = table.astype({c: "Int64" for c in NULLABLE_INT})
    table["config_hash"] = "h"
    table["merged_by"] = "test"
    return table


def synthetic_probes(seeds=(0, 1)) -> pd.DataFrame:
    study = make_study(seeds)
    records = []
    for run_id in study.runs:
        for encoder in ("trained", "untrained"):
            for layer in study.layers(Side(run_id, "clean")):
                depth = layer.index / 27
                gain = 0.1 if encoder == "untrained" else 0.3 + 0.1 * run_id.startswith("sup")
                accuracy = 0.55 + gain * depth
                records.append(
                    {
                        "run": run_id,
                        "encoder": encoder,
                        "layer": layer.name,
                        "layer_index": layer.index,
                        "layer_kind": layer.kind,
                        "stage": layer.stage,
                        "eval_accuracy": accuracy + 0.01 * math.sin(layer.index),
                    }
                )
    return pd.DataFrame.from_records(records)


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return synthetic_table()


@pytest.fixture(scope="module")
def table_without_intervals() -> pd.DataFrame:
    return synthetic_table(intervals=False)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


# -- checks on what a drawn figure shows ----------------------------------------------------------


def layers_in_order(frame: pd.DataFrame, side: str = "a") -> list[str]:
    suffix = f"_{side}" if side else ""
    layers = frame.drop_duplicates(f"layer{suffix}").sort_values(f"layer_index{suffix}")
    return layers[f"layer{suffix}"].tolist()


def blocks(names) -> set[str]:
    return {m.group(1) for name in names if (m := BLOCK.match(name))}


def tick_labels(ax, which: str) -> tuple[np.ndarray, list[str]]:
    axis = ax.xaxis if which == "x" else ax.yaxis
    return np.asarray(axis.get_ticklocs()), [t.get_text() for t in axis.get_ticklabels()]


def assert_labels_do_not_overlap(fig, ax) -> None:
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for which in ("x", "y"):
        labels = ax.xaxis.get_ticklabels() if which == "x" else ax.yaxis.get_ticklabels()
        boxes = [t.get_window_extent(renderer) for t in labels if t.get_text()]
        for first, second in zip(boxes, boxes[1:], strict=False):
            assert not first.overlaps(second), f"{which} tick labels overlap"


def assert_legend_outside_axes(fig) -> None:
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend())]
    assert legends, "the figure has no legend"
    for legend in legends:
        box = legend.get_window_extent(renderer)
        for ax in fig.axes:
            assert not box.overlaps(ax.get_window_extent(renderer)), "legend covers an axes"


def check_heatmap(fig, frame: pd.DataFrame, every_block: bool = False) -> None:
    """Each tick on an integer row/column position of the image, naming that row's layer;
    the image's cells hold the values of the layer pairs its ticks name."""
    ax = fig.axes[0]
    grid = ax.images[0].get_array()
    rows, cols = layers_in_order(frame, "a"), layers_in_order(frame, "b")
    assert grid.shape == (len(rows), len(cols))
    values = frame.pivot(index="layer_a", columns="layer_b", values="value")
    np.testing.assert_allclose(np.asarray(grid), values.loc[rows, cols].to_numpy())
    for which, names in (("y", rows), ("x", cols)):
        ticks, labels = tick_labels(ax, which)
        assert len(ticks), f"no {which} ticks"
        for tick, label in zip(ticks, labels, strict=True):
            assert float(tick).is_integer() and 0 <= tick < len(names), (
                f"{which} tick {label!r} at {tick} lies off the {len(names)} drawn layers"
            )
            assert label == names[int(tick)], (
                f"{which} tick at row {int(tick)} says {label!r}, the row is {names[int(tick)]!r}"
            )
        if len(names) <= 20:
            assert labels == names, f"not every one of {len(names)} {which} layers is labelled"
        if every_block:
            assert blocks(labels) == blocks(names), f"a block without a {which} tick"
    assert_labels_do_not_overlap(fig, ax)


def check_stage_lines(ax, frame: pd.DataFrame, side: str, which: str) -> None:
    from ckaflow.plots import STAGE_LINE

    order = frame.drop_duplicates(f"layer_{side}").sort_values(f"layer_index_{side}")
    stages = order[f"stage_{side}"].to_numpy()
    expected = [i - 0.5 for i in range(1, len(stages)) if stages[i] != stages[i - 1]]
    data = (lambda line: line.get_xdata()) if which == "x" else (lambda line: line.get_ydata())
    lines = [line for line in ax.lines if line.get_gid() == STAGE_LINE]
    drawn = sorted({float(data(line)[0]) for line in lines if len(set(data(line))) == 1})
    assert drawn == expected


def check_curves(ax, expected: dict[str, list[str]], every_block: bool = False) -> None:
    """Each data line (gid -> its layers in forward order) drawn; each x tick at the x of a
    drawn point, naming the layer drawn there."""
    at: dict[float, set[str]] = {}
    drawn = set()
    for line in ax.lines:
        gid = line.get_gid()
        if gid not in expected:
            continue
        drawn.add(gid)
        xs = np.asarray(line.get_xdata(), dtype=float)
        assert len(xs) == len(expected[gid]) and (np.diff(xs) > 0).all()
        for x, name in zip(xs, expected[gid], strict=True):
            at.setdefault(float(x), set()).add(name)
    assert drawn == set(expected), f"lines missing: {set(expected) - drawn}"
    assert all(len(names) == 1 for names in at.values()), "two layers drawn at one x"
    ticks, labels = tick_labels(ax, "x")
    assert len(ticks)
    low, high = ax.get_xlim()
    for tick, label in zip(ticks, labels, strict=True):
        assert low <= tick <= high
        assert float(tick) in at, f"x tick {label!r} at {tick} is at no drawn point"
        assert at[float(tick)] == {label}, f"x tick at {tick} says {label!r}, not {at[tick]}"
    if every_block:
        assert blocks(labels) == blocks(n for names in at.values() for n in names)


def intervals_drawn(ax) -> list:
    from ckaflow.plots import INTERVAL

    return [c for c in ax.collections if isinstance(c, LineCollection) and c.get_gid() == INTERVAL]


# -- layer axes -----------------------------------------------------------------------------------


def test_tick_rule_every_block_for_all_layers_every_layer_for_a_subset(table):
    from ckaflow.plots import LayerAxis

    within = table[
        table["comparison"] == "within-simclr-resnet18-w4-s0.clean-vs-simclr-resnet18-w4-s0.clean"
    ]
    axis = LayerAxis.of(within, "a")
    assert list(axis.names) == [layer.name for layer in layer_registry("resnet18", "simclr")]
    _, labels = axis.ticks(length_in=4.2)
    assert labels == [
        "stem",
        *(f"layer{s}.{b}.out" for s in range(1, 5) for b in range(2)),
        "pool",
        "head.0",
        "head.1",
    ]
    odd = within[(within["layer_kind_a"] == "residual")]
    ticks, labels = LayerAxis.of(odd, "a").ticks(length_in=4.2)
    assert ticks == list(range(8))
    assert labels == [f"layer{s}.{b}.residual" for s in range(1, 5) for b in range(2)]
    assert LayerAxis.of(odd, "a").stage_boundaries() == [1.5, 3.5, 5.5]
    # too little room: ticks thinned, never closer than the gap, the axis ends kept
    ticks, _ = axis.ticks(length_in=1.0)
    assert ticks[0] == 0 and ticks[-1] == 27 and min(np.diff(ticks)) >= 0.13 * 28 / 1.0


# -- heatmaps ---------------------------------------------------------------------------------


def _cross(table, kind=None):
    comparison = "cross-simclr-resnet18-w4-s0.clean-vs-supervised-resnet18-w4-s1.clean"
    group = table[table["comparison"] == comparison]
    if kind:
        group = group[(group["layer_kind_a"] == kind) & (group["layer_kind_b"] == kind)]
    return group


def test_within_heatmap_of_all_layers_labels_every_block(table):
    from ckaflow.plots import draw_heatmap

    comparison = "within-supervised-resnet18-w4-s1.aug2-vs-supervised-resnet18-w4-s1.aug2"
    frame = table[table["comparison"] == comparison]
    fig = draw_heatmap(frame, "within")
    check_heatmap(fig, frame, every_block=True)
    check_stage_lines(fig.axes[0], frame, "a", "y")
    check_stage_lines(fig.axes[0], frame, "b", "x")


def test_cross_heatmap_labels_each_run_with_its_own_layers(table):
    from ckaflow.plots import draw_heatmap

    frame = _cross(table)  # 28 SimCLR layers (two head layers) × 27 supervised layers (fc)
    fig = draw_heatmap(frame, "cross")
    check_heatmap(fig, frame, every_block=True)
    _, labels = tick_labels(fig.axes[0], "x")
    assert "fc" in labels and "head.1" not in labels


@pytest.mark.parametrize("kind", ["residual", "out"])
def test_subset_heatmaps_label_the_drawn_rows_not_registry_indices(table, kind):
    """The cross-odd (.residual) and cross-even (.out) heatmaps draw 8 × 8 of 28 layers: the
    ticks must sit at rows 0..7 and name those rows' layers."""
    from ckaflow.plots import draw_heatmap

    frame = _cross(table, kind)
    assert len(frame) == 64
    fig = draw_heatmap(frame, kind)
    check_heatmap(fig, frame)
    check_stage_lines(fig.axes[0], frame, "a", "y")
    check_stage_lines(fig.axes[0], frame, "b", "x")


# -- curves -----------------------------------------------------------------------------------


def _diagonal_expectations(cross: pd.DataFrame, kind: str) -> dict[str, list[str]]:
    part = cross[(cross["layer_a"] == cross["layer_b"]) & (cross["layer_kind_a"] == kind)]
    expected = {}
    for comparison, group in part.groupby("comparison"):
        method_a, method_b = group["method_a"].iloc[0], group["method_b"].iloc[0]
        key = f"seeds-{method_a}" if method_a == method_b else comparison
        expected[key] = layers_in_order(group)
    return expected


def test_cross_diagonal_bands_per_method_and_shared_init_pairs_apart(table):
    from ckaflow.plots import draw_cross_diagonal

    cross = table[table["kind"] == "cross"]
    fig = draw_cross_diagonal(cross)
    axes = [ax for ax in fig.axes if ax.lines]
    assert len(axes) == 2, "even and odd layers in two panels"
    for ax, kind in zip(axes, ("out", "residual"), strict=True):
        check_curves(ax, _diagonal_expectations(cross, kind))
        _, labels = tick_labels(ax, "x")
        assert labels == [f"layer{s}.{b}.{kind}" for s in range(1, 5) for b in range(2)]
        # one band per method, spanning its seed pair's values and bootstrap intervals
        bands = {c.get_label(): c for c in ax.collections if isinstance(c, PolyCollection)}
        assert len(bands) == 2
        for method, name in (("simclr", "SimCLR"), ("supervised", "supervised")):
            (label,) = [label for label in bands if label.startswith(f"{name} seed vs seed")]
            seeds = cross[
                (cross["method_a"] == method)
                & (cross["method_b"] == method)
                & (cross["layer_a"] == cross["layer_b"])
                & (cross["layer_kind_a"] == kind)
            ]
            ys = bands[label].get_paths()[0].vertices[:, 1]
            assert ys.min() == pytest.approx(seeds["ci_low"].min())
            assert ys.max() == pytest.approx(seeds["ci_high"].max())
        # cross-method pairs from the same initial weights: thin dotted, labelled so
        pairs = cross[cross["method_a"] != cross["method_b"]].drop_duplicates("comparison")
        shared = set(pairs.loc[pairs["init_a"] == pairs["init_b"], "comparison"])
        assert len(shared) == 2 and len(pairs) == 4
        for line in ax.lines:
            if line.get_gid() in set(pairs["comparison"]):
                is_shared = line.get_gid() in shared
                assert ("same initial weights" in line.get_label()) == is_shared
                assert (line.get_linestyle() == ":") == is_shared
        assert len(intervals_drawn(ax)) == 4  # each cross-method pair's error bars
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert sum("same initial weights" in t for t in legend) == 2
    assert sum("seed vs seed" in t for t in legend) == 2
    assert_legend_outside_axes(fig)
    for ax in axes:
        assert_labels_do_not_overlap(fig, ax)


def test_cross_diagonal_without_intervals_draws_no_error_bars(table_without_intervals):
    from ckaflow.plots import draw_cross_diagonal

    cross = table_without_intervals[table_without_intervals["kind"] == "cross"]
    fig = draw_cross_diagonal(cross)
    for ax in fig.axes:
        assert not intervals_drawn(ax)
        assert all("95%" not in c.get_label() for c in ax.collections)
    assert all("95%" not in t.get_text() for t in fig.legends[0].get_texts())


def _invariance(table):
    return table[(table["kind"] == "invariance") & (table["layer_a"] == table["layer_b"])]


def _per_run(frame: pd.DataFrame) -> dict[str, list[str]]:
    return {run: layers_in_order(group) for run, group in frame.groupby("run_a")}


def test_invariance_curves_one_panel_per_view_pair_with_error_bars(table, table_without_intervals):
    from ckaflow.plots import draw_depth_curves

    frame = _invariance(table)
    fig = draw_depth_curves(frame, "Augmentation invariance per layer", "CKA between views")
    axes = [ax for ax in fig.axes if ax.lines]
    assert [ax.get_title() for ax in axes] == ["aug1 vs aug2", "clean vs aug1"]
    for ax, views in zip(axes, (("aug1", "aug2"), ("clean", "aug1")), strict=True):
        part = frame[(frame["view_a"] == views[0]) & (frame["view_b"] == views[1])]
        check_curves(ax, _per_run(part), every_block=True)
        assert len(intervals_drawn(ax)) == 4  # one set of error bars per run
        assert_labels_do_not_overlap(fig, ax)
    assert_legend_outside_axes(fig)
    # runs told apart by marker and line style, not only colour (greyscale)
    lines = [line for line in axes[0].lines if line.get_gid() in set(frame["run_a"])]
    assert len({(line.get_marker(), line.get_linestyle()) for line in lines}) == 4

    fig = draw_depth_curves(_invariance(table_without_intervals), "invariance", "CKA")
    assert not any(intervals_drawn(ax) for ax in fig.axes)


def test_class_curves_label_each_point_with_its_layer(table, table_without_intervals):
    from ckaflow.plots import draw_depth_curves

    frame = table[table["kind"] == "class"]
    fig = draw_depth_curves(frame, "Class structure per layer", "CKA(layer, one-hot labels)")
    (ax,) = [ax for ax in fig.axes if ax.lines]
    check_curves(ax, _per_run(frame), every_block=True)
    # SimCLR's head.0/head.1 and supervised's fc share registry indices: apart on the axis
    _, labels = tick_labels(ax, "x")
    assert {"pool", "fc", "head.0", "head.1"} <= set(labels)
    assert len(intervals_drawn(ax)) == 4
    assert_legend_outside_axes(fig)
    assert_labels_do_not_overlap(fig, ax)

    frame = table_without_intervals[table_without_intervals["kind"] == "class"]
    fig = draw_depth_curves(frame, "class", "CKA")
    assert not any(intervals_drawn(ax) for ax in fig.axes)


def test_probe_curves_label_each_point_with_its_layer():
    from ckaflow.plots import draw_probe_curves

    probes = synthetic_probes()
    fig = draw_probe_curves(probes)
    (ax,) = [ax for ax in fig.axes if ax.lines]
    expected = {
        f"{run}.{encoder}": layers_in_order(group, side="")
        for (run, encoder), group in probes.groupby(["run", "encoder"])
    }
    check_curves(ax, expected, every_block=True)
    assert not intervals_drawn(ax)  # probes have no intervals
    for line in ax.lines:
        if line.get_gid() in expected:
            trained = line.get_gid().endswith(".trained")
            assert (line.get_linestyle() == "-") == trained
    assert_legend_outside_axes(fig)
    assert_labels_do_not_overlap(fig, ax)


# -- all figures ------------------------------------------------------------------------------


def test_plot_all_writes_exactly_the_figures_the_study_lists(tmp_path, capsys):
    """Every figure, also with a constant layer (its CKA NaN), which plot_all warns of."""
    from ckaflow.plots import plot_all

    study = make_study((0, 1))
    assert len(study.runs) == 4
    table_path, probes_path = tmp_path / "cka.parquet", tmp_path / "probes.parquet"
    table = synthetic_table()
    constant = (table["run_a"] == "simclr-resnet18-w4-s0") & (table["layer_a"] == "layer2.1.out")
    table.loc[constant, ["value", "ci_low", "ci_high"]] = np.nan
    table.to_parquet(table_path, index=False)
    synthetic_probes().to_parquet(probes_path, index=False)
    out = tmp_path / "figures"
    written = plot_all(table_path, out, probes=probes_path, style={"dpi": 50})
    expected = {Path(p).name for p in study.figures()}
    assert {p.name for p in written} == expected
    assert {p.name for p in out.iterdir()} == expected
    assert len(written) == len(expected)
    assert f"warning: {int(constant.sum())} CKA values are NaN" in capsys.readouterr().out


def _with_module_run(frame: pd.DataFrame, run_col: str, layer_col: str, kind_col: str):
    """The frame plus a run imported as a module: the first run's rows renamed, its layers
    `blocks.<i>` of kind "module" (no name shared with a ResNet)."""
    first = frame[run_col].iloc[0]
    alien = frame[frame[run_col] == first].copy()
    alien[run_col] = "mobilenet"
    alien[layer_col] = "blocks." + alien[layer_col].factorize()[0].astype(str)
    alien[kind_col] = "module"
    return pd.concat([frame, alien], ignore_index=True)


def test_a_module_run_gets_its_own_row_of_curves_labelled_with_its_layers(table):
    """A network imported as a module has layers of its own: on the ResNets' axis its points
    would sit under ResNet layer names. It gets its own row, ticks its own layer names."""
    from ckaflow.plots import draw_depth_curves, draw_probe_curves

    frame = _with_module_run(_invariance(table), "run_a", "layer_a", "layer_kind_a")
    frame["layer_b"] = frame["layer_a"]
    fig = draw_depth_curves(frame, "Augmentation invariance per layer", "CKA between views")
    axes = [ax for ax in fig.axes if ax.lines]
    assert len(axes) == 4  # two view pairs x (ResNets, the module)
    module_labels = set(frame.loc[frame["run_a"] == "mobilenet", "layer_a"])
    for ax in axes[:2]:
        assert "mobilenet" not in {line.get_gid() for line in ax.lines}
        assert not module_labels & set(tick_labels(ax, "x")[1])
    for ax in axes[2:]:
        assert {line.get_gid() for line in ax.lines} & set(frame["run_a"]) == {"mobilenet"}
        assert set(tick_labels(ax, "x")[1]) <= module_labels
    probes = _with_module_run(synthetic_probes(), "run", "layer", "layer_kind")
    axes = [ax for ax in draw_probe_curves(probes).axes if ax.lines]
    assert len(axes) == 2 and set(tick_labels(axes[1], "x")[1]) <= set(
        probes.loc[probes["run"] == "mobilenet", "layer"]
    )
