"""Figures show the table's numbers: every curve's points and error-bar ends are the table rows
of the layers its ticks name, every heatmap cell the row of its two layers (rows: side a), and
each file holds the figure its name says (cross-odd: `.residual` layers only, cross-even:
`.out` only). NaN values (a constant layer) are marked with ×, never left as silent gaps.

The table has a distinct value and distinct interval ends in every row, so a curve drawn
backwards, a run's or a layer kind's rows drawn in another's place, or a heatmap transposed
shows up as a wrong number."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import LineCollection, PolyCollection

from ckaflow.config import method_name
from ckaflow.plots import (
    CURVE_UNDEFINED,
    HEATMAP_UNDEFINED,
    INTERVAL,
    UNDEFINED,
    draw_all,
    draw_cross_diagonal,
    draw_depth_curves,
    draw_heatmap,
    draw_probe_curves,
)
from tests.test_plots import make_study, synthetic_probes, synthetic_table, tick_labels

# constant layers (self-HSIC zero: every CKA with them NaN), one odd and one even
CONSTANT = (
    ("simclr-resnet18-w4-s0", "layer2.1.residual"),
    ("supervised-resnet18-w4-s1", "layer3.0.out"),
)
CONSTANT_PROBE = ("supervised-resnet18-w4-s0", "untrained", "layer1.0.out")


def valued_table(constant: bool = False, seeds=(0, 1)) -> pd.DataFrame:
    """The synthetic study's table with a distinct value in every row (the plausible value plus
    a row number's millionths) and asymmetric, depth-dependent intervals; with `constant`, the
    CONSTANT layers' rows NaN."""
    table = synthetic_table(seeds=seeds).reset_index(drop=True)
    depth = table["layer_index_a"].to_numpy(dtype=float) / 27
    table["value"] = table["value"].clip(0.01, 0.97) + 1e-6 * np.arange(len(table))
    table["ci_low"] = table["value"] - 0.02 - 0.02 * depth
    table["ci_high"] = table["value"] + 0.03 + 0.01 * depth
    if constant:
        for run, layer in CONSTANT:
            hit = ((table["run_a"] == run) & (table["layer_a"] == layer)) | (
                (table["run_b"] == run) & (table["layer_b"] == layer)
            )
            table.loc[hit, ["value", "ci_low", "ci_high"]] = np.nan
    return table


def valued_probes(constant: bool = False) -> pd.DataFrame:
    probes = synthetic_probes()
    probes["eval_accuracy"] += 1e-6 * np.arange(len(probes))
    if constant:
        run, encoder, layer = CONSTANT_PROBE
        hit = (probes["run"] == run) & (probes["encoder"] == encoder) & (probes["layer"] == layer)
        probes.loc[hit, "eval_accuracy"] = np.nan
    return probes


@pytest.fixture(scope="module", params=[False, True], ids=["finite", "constant-layers"])
def constant(request) -> bool:
    return request.param


@pytest.fixture(scope="module")
def table(constant) -> pd.DataFrame:
    return valued_table(constant)


@pytest.fixture(scope="module")
def probes(constant) -> pd.DataFrame:
    return valued_probes(constant)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


# -- what the table says a figure should show ----------------------------------------------------


def in_order(frame: pd.DataFrame, side: str = "a") -> list[str]:
    """The layers of one side, in forward order (registry index, then name)."""
    suffix = f"_{side}" if side else ""
    layers = frame.drop_duplicates(f"layer{suffix}")
    return layers.sort_values([f"layer_index{suffix}", f"layer{suffix}"])[f"layer{suffix}"].tolist()


def points(frame: pd.DataFrame, side: str = "a", column: str = "value") -> pd.DataFrame:
    """One row per layer of `side` (forward order), indexed by layer: value, ci_low, ci_high."""
    suffix = f"_{side}" if side else ""
    rows = frame.set_index(f"layer{suffix}").loc[in_order(frame, side)]
    assert rows.index.is_unique, "a curve of more than one row per layer"
    out = pd.DataFrame({"value": rows[column].astype(float)})
    for end in ("ci_low", "ci_high"):
        if end in rows:
            out[end] = rows[end].astype(float)
    return out


# -- what a figure draws --------------------------------------------------------------------------


def _named_ticks(ax) -> dict[float, str]:
    ticks, labels = tick_labels(ax, "x")
    return {float(t): label for t, label in zip(ticks, labels, strict=True)}


def check_curve(ax, gid: str, expected: pd.DataFrame, undefined=None) -> None:
    """The line `gid` draws one point per expected layer, in forward order, at the value of
    that layer's row; where a tick names the point's layer, the value is that layer's row; its
    error bars span the rows' ci_low..ci_high; × marks under exactly its NaN points (or the
    `undefined` layers)."""
    (line,) = [line for line in ax.lines if line.get_gid() == gid]
    x = np.asarray(line.get_xdata(), dtype=float)
    y = np.asarray(line.get_ydata(), dtype=float)
    assert len(x) == len(expected) and (np.diff(x) > 0).all(), f"{gid}: points"
    np.testing.assert_allclose(y, expected["value"].to_numpy(), err_msg=f"{gid}: values")
    named = _named_ticks(ax)
    ticked = [(xi, yi) for xi, yi in zip(x, y, strict=True) if xi in named]
    assert ticked, f"{gid}: no point of the line has a tick"
    for xi, yi in ticked:  # the value read off at a tick is the named layer's row
        assert named[xi] in expected.index, f"{gid}: tick {named[xi]!r} names no layer it draws"
        np.testing.assert_allclose(yi, expected.loc[named[xi], "value"], err_msg=named[xi])
    layer_at = dict(zip(x, expected.index, strict=True))
    check_intervals(ax, gid, expected, layer_at)
    marks = [
        m for m in ax.lines if m.get_gid() == UNDEFINED and m.get_label() == f"_{UNDEFINED}:{gid}"
    ]
    if undefined is None:
        undefined = expected.index[expected["value"].isna()]
    undefined = sorted(xi for xi, layer in layer_at.items() if layer in set(undefined))
    drawn = sorted(float(v) for m in marks for v in m.get_xdata())
    assert drawn == undefined, f"{gid}: × marks at {drawn}, NaN values at {undefined}"


def check_intervals(ax, gid: str, expected: pd.DataFrame, layer_at: dict[float, str]) -> None:
    bars = [
        c
        for c in ax.collections
        if isinstance(c, LineCollection)
        and c.get_gid() == INTERVAL
        and c.get_label() == f"_{INTERVAL}:{gid}"
    ]
    known = expected.dropna(subset=["ci_low", "ci_high"]) if "ci_low" in expected else expected[:0]
    if not len(known):
        assert not bars, f"{gid}: error bars without intervals in the table"
        return
    (bar,) = bars
    ends = {}
    for segment in bar.get_segments():
        (x0, y0), (x1, y1) = segment
        assert x0 == x1, "an error bar not vertical"
        ends[layer_at[float(x0)]] = (min(y0, y1), max(y0, y1))
    assert sorted(ends) == sorted(known.index), f"{gid}: error bars at other layers"
    for layer, (low, high) in ends.items():
        np.testing.assert_allclose(
            [low, high],
            known.loc[layer, ["ci_low", "ci_high"]].to_numpy(dtype=float),
            err_msg=f"{gid} {layer}",
        )


def check_legend_notes_nan(fig, any_nan: bool, note: str = CURVE_UNDEFINED) -> None:
    """The legend explains the × marks when there are NaN values, and only then."""
    texts = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    assert (note in texts) == any_nan, texts
    assert any("NaN" in t for t in texts) == any_nan, texts


def check_heatmap(fig, rows: pd.DataFrame) -> None:
    """Cell (i, j) of the image is the row of the i-th layer of side a and the j-th of side
    b, row 0 at the bottom where y tick 0 names it; the axis labels name the runs; × on
    exactly the NaN cells, and a title that says so."""
    ax = fig.axes[0]
    image = ax.images[0]
    names_a, names_b = in_order(rows, "a"), in_order(rows, "b")
    grid = np.ma.filled(np.ma.asarray(image.get_array(), dtype=float), np.nan)
    expected = rows.pivot(index="layer_a", columns="layer_b", values="value").loc[names_a, names_b]
    np.testing.assert_allclose(grid, expected.to_numpy(dtype=float))
    left, right, bottom, top = image.get_extent()
    assert (left, bottom) == (-0.5, -0.5) and (right, top) == (
        len(names_b) - 0.5,
        len(names_a) - 0.5,
    )
    for which, names in (("y", names_a), ("x", names_b)):
        ticks, labels = tick_labels(ax, which)
        assert len(ticks)
        for tick, label in zip(ticks, labels, strict=True):
            assert label == names[int(tick)] and float(tick).is_integer(), (which, tick, label)
    assert ax.get_ylabel().startswith(
        f"layer of {rows['run_a'].iloc[0]} ({rows['view_a'].iloc[0]})"
    )
    assert ax.get_xlabel().startswith(
        f"layer of {rows['run_b'].iloc[0]} ({rows['view_b'].iloc[0]})"
    )
    nan_cells = sorted(zip(*np.nonzero(np.isnan(expected.to_numpy(dtype=float))), strict=True))
    marks = [line for line in ax.lines if line.get_gid() == UNDEFINED]
    crossed = sorted(
        (int(y), int(x)) for m in marks for x, y in zip(m.get_xdata(), m.get_ydata(), strict=True)
    )
    assert crossed == [(int(i), int(j)) for i, j in nan_cells]
    assert (HEATMAP_UNDEFINED in ax.get_title()) == bool(nan_cells)


def check_subset_heatmap(fig, rows: pd.DataFrame, kind: str) -> None:
    """A cross-odd/even heatmap: the layers of `kind` (`.residual` or `.out`), all of them."""
    ax = fig.axes[0]
    for which in ("y", "x"):
        _, labels = tick_labels(ax, which)
        assert all(label.endswith(f".{kind}") for label in labels), f"not all .{kind}: {labels}"
        assert labels == [f"layer{s}.{b}.{kind}" for s in range(1, 5) for b in range(2)]
    check_heatmap(fig, rows)


def check_depth_curves(fig, frame: pd.DataFrame) -> None:
    """A panel per view pair (titled so when there are several), a line per run: the run's rows."""
    axes = [ax for ax in fig.axes if ax.lines]
    pairs = frame.groupby(["view_a", "view_b"])
    if len(pairs) > 1:
        assert len(axes) == len(pairs)
        by_title = {ax.get_title(): ax for ax in axes}
    else:
        (ax,) = axes
    for (view_a, view_b), part in pairs:
        if len(pairs) > 1:
            ax = by_title[f"{view_a} vs {view_b}"]
        runs = {line.get_gid() for line in ax.lines} & set(frame["run_a"])
        assert runs == set(part["run_a"])
        for run, rows in part.groupby("run_a"):
            check_curve(ax, run, points(rows))
    check_legend_notes_nan(fig, bool(frame["value"].isna().any()))


def check_cross_diagonal(fig, cross: pd.DataFrame) -> None:
    """Even (.out) layers in the panel titled so, odd (.residual) in the other; each
    cross-method pair's line its comparison's diagonal rows; each method's seed band spans its
    seed pairs' values and intervals, its middle line their mean."""
    diagonal = cross[cross["layer_a"] == cross["layer_b"]]
    axes = [ax for ax in fig.axes if ax.lines]
    kinds = [
        "out"
        if ax.get_title().startswith("even layers")
        else "residual"
        if ax.get_title().startswith("odd layers")
        else None
        for ax in axes
    ]
    assert kinds == ["out", "residual"], [ax.get_title() for ax in axes]
    for ax, kind in zip(axes, kinds, strict=True):
        part = diagonal[diagonal["layer_kind_a"] == kind]
        _, labels = tick_labels(ax, "x")
        assert labels == [f"layer{s}.{b}.{kind}" for s in range(1, 5) for b in range(2)]
        between = part[part["method_a"] != part["method_b"]]
        for comparison, rows in between.groupby("comparison"):
            check_curve(ax, comparison, points(rows))
        seeds = part[part["method_a"] == part["method_b"]]
        for method, rows in seeds.groupby("method_a"):
            layers = in_order(rows)
            by_layer = rows.groupby("layer_a")
            mean = pd.DataFrame({"value": by_layer["value"].mean().loc[layers]})
            some_nan = set(rows.loc[rows["value"].isna(), "layer_a"])  # × where any pair is NaN
            check_curve(ax, f"seeds-{method}", mean, undefined=some_nan)
            low = np.fmin(rows["value"], rows["ci_low"]).groupby(rows["layer_a"]).min().loc[layers]
            high = (
                np.fmax(rows["value"], rows["ci_high"]).groupby(rows["layer_a"]).max().loc[layers]
            )
            (band,) = [
                c
                for c in ax.collections
                if isinstance(c, PolyCollection)
                and c.get_label().startswith(f"{method_name(method)} seed vs seed")
            ]
            vertices = np.concatenate([p.vertices for p in band.get_paths()])
            (line,) = [line for line in ax.lines if line.get_gid() == f"seeds-{method}"]
            for x, layer in zip(line.get_xdata(), layers, strict=True):
                ys = vertices[np.isclose(vertices[:, 0], x), 1]
                if np.isnan(low[layer]):
                    assert not len(ys), f"a band drawn at the undefined {layer}"
                else:
                    np.testing.assert_allclose([ys.min(), ys.max()], [low[layer], high[layer]])
    check_legend_notes_nan(fig, bool(diagonal["value"].isna().any()))


def check_probe_curves(fig, probes: pd.DataFrame) -> None:
    (ax,) = [ax for ax in fig.axes if ax.lines]
    for (run, encoder), rows in probes.groupby(["run", "encoder"]):
        check_curve(ax, f"{run}.{encoder}", points(rows, side="", column="eval_accuracy"))
    check_legend_notes_nan(
        fig, bool(probes["eval_accuracy"].isna().any()), note="× at the foot: no accuracy (NaN)"
    )


# -- each figure family ---------------------------------------------------------------------------


def test_heatmaps_hold_the_table_rows_of_their_layers(table):
    within = table[
        table["comparison"] == "within-simclr-resnet18-w4-s0.aug1-vs-simclr-resnet18-w4-s0.aug1"
    ]
    check_heatmap(draw_heatmap(within, "within"), within)
    cross = table[
        table["comparison"]
        == "cross-simclr-resnet18-w4-s0.clean-vs-supervised-resnet18-w4-s1.clean"
    ]
    check_heatmap(draw_heatmap(cross, "cross"), cross)  # 28 × 27: not square
    for kind in ("residual", "out"):
        sub = cross[(cross["layer_kind_a"] == kind) & (cross["layer_kind_b"] == kind)]
        check_subset_heatmap(draw_heatmap(sub, kind), sub, kind)


def test_cross_diagonal_curves_and_bands_hold_their_rows(table):
    cross = table[table["kind"] == "cross"]
    check_cross_diagonal(draw_cross_diagonal(cross), cross)


def test_seed_bands_span_every_seed_pair_and_draw_their_mean(constant):
    """Three seeds: three seed pairs per method, so a band's middle line is a mean of several
    rows (with a constant layer, of the pairs that have a value, and × under it)."""
    table = valued_table(constant, seeds=(0, 1, 2))
    cross = table[table["kind"] == "cross"]
    check_cross_diagonal(draw_cross_diagonal(cross), cross)


def test_invariance_and_class_curves_hold_their_rows(table):
    invariance = table[(table["kind"] == "invariance") & (table["layer_a"] == table["layer_b"])]
    check_depth_curves(draw_depth_curves(invariance, "invariance", "CKA"), invariance)
    classes = table[table["kind"] == "class"]
    check_depth_curves(draw_depth_curves(classes, "class", "CKA"), classes)


def test_probe_curves_hold_their_rows(probes):
    check_probe_curves(draw_probe_curves(probes), probes)


# -- each file holds the figure its name says -------------------------------------------------


def expected_figures(table: pd.DataFrame, probes: pd.DataFrame) -> dict:
    """File name -> the check of its figure against the table rows it must show; names spelled
    here, not taken from ckaflow."""
    checks = {}
    for _, rows in table[table["kind"] == "within"].groupby("comparison"):
        name = f"within-{rows['run_a'].iloc[0]}.{rows['view_a'].iloc[0]}"
        checks[name] = (check_heatmap, rows)
    cross = table[table["kind"] == "cross"]
    for _, rows in cross.groupby("comparison"):
        run_a, run_b = rows["run_a"].iloc[0], rows["run_b"].iloc[0]
        checks[f"cross-{run_a}-vs-{run_b}"] = (check_heatmap, rows)
        for part, kind in (("odd", "residual"), ("even", "out")):
            sub = rows[(rows["layer_kind_a"] == kind) & (rows["layer_kind_b"] == kind)]
            checks[f"cross-{part}-{run_a}-vs-{run_b}"] = (
                lambda fig, sub, kind=kind: check_subset_heatmap(fig, sub, kind),
                sub,
            )
    checks["cross-diagonal"] = (check_cross_diagonal, cross)
    invariance = table[(table["kind"] == "invariance") & (table["layer_a"] == table["layer_b"])]
    checks["invariance"] = (check_depth_curves, invariance)
    checks["class"] = (check_depth_curves, table[table["kind"] == "class"])
    checks["probes"] = (check_probe_curves, probes)
    return checks


def test_each_file_holds_the_figure_its_name_says(table, probes):
    checks = expected_figures(table, probes)
    assert set(checks) == {Path(p).stem for p in make_study().figures()}
    drawn = []
    for name, fig in draw_all(table, probes):
        check, rows = checks[name]
        try:
            check(fig, rows)
        except AssertionError as err:
            raise AssertionError(f"figure {name}: {err}") from err
        plt.close(fig)
        drawn.append(name)
    assert sorted(drawn) == sorted(checks)


def test_seed_bands_hold_seed_replicates_only():
    """A run of the method that is not a seed replicate (another recipe, or an import without a
    seed) takes no part in its method's band: the band is drawn from the replicates' pairs."""
    table = valued_table(seeds=(0, 1, 2))
    cross = table[table["kind"] == "cross"]
    outsider = "supervised-resnet18-w4-s2"
    alone = cross.copy()
    for side in ("a", "b"):
        alone.loc[alone[f"run_{side}"] == outsider, f"replicate_{side}"] = None
    without = cross[(cross["run_a"] != outsider) & (cross["run_b"] != outsider)]

    def band(frame):
        fig = draw_cross_diagonal(frame)
        lines = [
            ln for ax in fig.axes for ln in ax.get_lines() if ln.get_gid() == "seeds-supervised"
        ]
        return [np.asarray(ln.get_ydata(), dtype=float) for ln in lines]

    got, want = band(alone), band(without)
    assert got and len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)
    # and it differs from the band that counted the outsider's pairs
    assert any(not np.array_equal(g, a) for g, a in zip(got, band(cross), strict=True))


def test_many_pairs_are_drawn_as_bands_of_every_pair():
    """Five seeds per method make 25 cross-method pairs, more than there are markers: each
    pair of methods and starting point becomes one band whose middle line is the mean over
    all its pairs (none dropped), and its label counts them."""
    table = valued_table(seeds=(0, 1, 2, 3, 4))
    cross = table[(table["kind"] == "cross") & (table["view_a"] == "clean")]
    fig = draw_cross_diagonal(cross)
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "SimCLR vs supervised, different initial weights (20 pairs: range and mean)" in labels
    assert "SimCLR vs supervised, same initial weights (5 pairs: range and mean)" in labels
    diagonal = cross[
        (cross["layer_a"] == cross["layer_b"]) & (cross["method_a"] != cross["method_b"])
    ]
    different = diagonal[diagonal["init_a"] != diagonal["init_b"]]
    for ax in fig.axes:
        (line,) = [
            ln for ln in ax.get_lines() if ln.get_gid() == "pairs-simclr-supervised-different"
        ]
        ticks = _named_ticks(ax)
        names = [ticks[float(x)] for x in line.get_xdata()]
        want = different.groupby("layer_a")["value"].mean().loc[names].to_numpy()
        np.testing.assert_allclose(np.asarray(line.get_ydata(), dtype=float), want, rtol=0, atol=0)
