"""The gram and tile stages on real activation stores, checked against the plain estimators."""

import numpy as np
import pandas as pd
import pytest
import zarr

from ckaflow import cka
from ckaflow.cka.partitions import partition
from ckaflow.data import open_prepared
from ckaflow.errors import ComparisonError, StoreError
from ckaflow.gram_stores import load_stats, open_gram
from ckaflow.stages.gram import gram_store
from ckaflow.stages.gram_labels import label_gram_store
from ckaflow.store import open_store
from ckaflow.tables import COLUMNS
from tests.cka_stage import compute_tile
from tests.tolerances import cka_atol


@pytest.fixture(scope="module")
def grams(activations, prepared, tmp_path_factory):
    root = tmp_path_factory.mktemp("gram")
    out = {
        key: gram_store(path, root / f"{key[0]}.{key[1]}.zarr", "minibatch", 64)
        for key, path in activations.items()
    }
    out["labels"] = label_gram_store(prepared, root / "labels.zarr", "minibatch", 64)
    return out


def test_gram_store_keeps_blocks_and_provenance(grams, study_config):
    store = open_gram(grams[("simclr", "clean")])
    n = study_config["data"]["eval_size"]  # 160 = 64 + 64 + 32
    assert store.attrs["block_rows"] == [64, 64, 32]
    # each block's upper triangle (64 · 65 / 2 values), in float32: the products are float32
    assert store.attrs["gram_format"] == "upper-triangle"
    assert store["stem"].shape == (3, 64 * 65 // 2)
    assert store["stem"].dtype == np.float32
    assert store.attrs["complete"] and store.attrs["code_version"]
    assert sum(store.attrs["block_rows"]) == n


def test_tile_equals_minibatch_cka_on_the_raw_activations(grams, activations, tmp_path):
    out = tmp_path / "tile.parquet"
    compute_tile(
        "cross-test",
        "cross",
        str(grams[("simclr", "clean")]),
        str(grams[("supervised", "clean")]),
        range(0, 6),
        range(3, 9),
        "minibatch",
        str(out),
    )
    tile = pd.read_parquet(out)
    assert list(tile.columns) == [c for c in COLUMNS]
    assert len(tile) == 36
    a = open_store(activations[("simclr", "clean")])
    b = open_store(activations[("supervised", "clean")])
    for row in tile.sample(8, random_state=0).itertuples():
        xa, xb = a[row.layer_a][...], b[row.layer_b][...]
        expected = cka.minibatch_cka(xa, xb, batch_size=64)
        # the tile's Grams are float32 products, the reference is float64 throughout: the sum
        # of the two paths' bounds on their distance from the exact CKA of the stored values
        assert abs(row.value - expected) <= _both_paths(xa, xb), (row.layer_a, row.layer_b)
    assert set(tile["method_a"]) == {"simclr"} and set(tile["method_b"]) == {"supervised"}


def test_class_tile_against_one_hot_labels(grams, activations, prepared, tmp_path):
    out = tmp_path / "class.parquet"
    compute_tile(
        "class-test",
        "class",
        str(grams[("supervised", "clean")]),
        str(grams["labels"]),
        range(24, 27),
        range(0, 1),
        "minibatch",
        str(out),
    )
    tile = pd.read_parquet(out)
    assert tile["layer_b"].tolist() == ["labels"] * 3
    labels = cka.one_hot(open_prepared(prepared).eval_labels(), 10)
    fc = open_store(activations[("supervised", "clean")])["fc"][...]
    value = tile.set_index("layer_a").loc["fc", "value"]
    expected = cka.minibatch_cka(fc, labels, batch_size=64)
    assert abs(value - expected) <= _both_paths(fc, labels)  # labels: float64 on both paths


def _both_paths(x, y) -> float:
    """|tile − reference| bound: the tile's Grams in the stored precision (float32 products of
    C·H·W-long rows), the reference's in float64; blocks of 64, 64 and 32 rows."""
    blocks = partition(len(x), 64)
    f64 = (np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))
    return cka_atol(x, y, blocks) + cka_atol(*f64, blocks)


def _refused_against_edited_copy(grams, tmp_path, edit, match):
    """A copy of one Gram store with its attributes edited: a tile against it is refused."""
    import shutil

    other = tmp_path / "other.zarr"
    shutil.copytree(grams[("simclr", "aug1")], other)
    edit(zarr.open_group(other, mode="r+").attrs)
    with pytest.raises(ComparisonError, match=match):
        compute_tile(
            "x",
            "cross",
            str(grams[("simclr", "clean")]),
            str(other),
            range(0, 1),
            range(0, 1),
            "minibatch",
            str(tmp_path / "t.parquet"),
        )
    assert not (tmp_path / "t.parquet").exists()


def test_sides_with_different_examples_are_refused(grams, tmp_path):
    def reverse_rows(attrs):
        attrs["example_ids"] = list(reversed(attrs["example_ids"]))

    _refused_against_edited_copy(
        grams, tmp_path, reverse_rows, "different examples or a different row order"
    )


def test_nan_activations_are_refused_naming_the_layer(activations, tmp_path):
    import shutil

    broken = tmp_path / "broken.zarr"
    shutil.copytree(activations[("simclr", "clean")], broken)
    arr = zarr.open_array(broken / "layer2.0.out", mode="r+")
    arr[5, 3] = np.nan
    with pytest.raises(StoreError, match=r"layer layer2\.0\.out: 1 non-finite"):
        gram_store(broken, tmp_path / "g.zarr", "minibatch", 64)
    assert not (tmp_path / "g.zarr").exists()


def test_gram_store_of_another_estimator_is_refused(grams, tmp_path):
    def relabel(attrs):
        attrs["estimator"] = "linear"

    _refused_against_edited_copy(
        grams, tmp_path, relabel, "holds linear statistics, but the CKA stage asks for minibatch"
    )


def _copy(grams, tmp_path):
    import shutil

    other = tmp_path / "damaged.zarr"
    shutil.copytree(grams[("simclr", "aug1")], other)
    return other


def _tile_against(grams, other, tmp_path, **kwargs):
    compute_tile(
        "x",
        "cross",
        str(grams[("simclr", "clean")]),
        str(other),
        range(0, 3),
        range(0, 3),
        "minibatch",
        str(tmp_path / "t.parquet"),
        **kwargs,
    )


def test_damaged_gram_chunks_are_refused_by_the_streamed_tile(grams, tmp_path):
    """The tile reads the stores block by block: a non-finite block or a layer of the wrong
    shape is named, not turned into NaN or a wrong number."""
    other = _copy(grams, tmp_path)
    layer = open_gram(other).layers[1]["name"]
    zarr.open_array(other / layer, mode="r+")[2, 70] = np.inf  # block 2, row 1, column 6
    with pytest.raises(StoreError, match=f"layer {layer} has non-finite values in block 2"):
        _tile_against(grams, other, tmp_path, bootstrap=10)
    other = _copy(grams, tmp_path / "shape")
    group = zarr.open_group(other, mode="r+")
    del group[layer]
    group.create_array(layer, shape=(3, 528), chunks=(1, 528), dtype="float32")[...] = 1.0
    with pytest.raises(StoreError, match=rf"layer {layer} has shape \(3, 528\), not that of 3 bl"):
        _tile_against(grams, other, tmp_path)
    assert not (tmp_path / "t.parquet").exists()


def test_full_data_tile_loads_the_layers_and_equals_the_in_memory_route(activations, tmp_path):
    """linear: one n × n Gram per layer, the bootstrap resamples examples: loaded whole."""
    a = gram_store(activations[("simclr", "clean")], tmp_path / "a.zarr", "linear", 64)
    b = gram_store(activations[("supervised", "clean")], tmp_path / "b.zarr", "linear", 64)
    out = tmp_path / "linear.parquet"
    compute_tile("x", "cross", str(a), str(b), range(0, 4), range(24, 27), "linear", str(out), 20)
    tile = pd.read_parquet(out)
    sa = load_stats(open_gram(a), tile["layer_a"].unique().tolist())
    sb = load_stats(open_gram(b), tile["layer_b"].unique().tolist())
    np.testing.assert_array_equal(tile["value"].to_numpy(), cka.cka_between(sa, sb).ravel())
    low, high = cka.cka_interval(sa, sb, bootstrap=20, seed=0)
    np.testing.assert_array_equal(tile["ci_low"].to_numpy(), low.ravel())
    np.testing.assert_array_equal(tile["ci_high"].to_numpy(), high.ravel())
    assert set(tile["n"]) == {160} and set(tile["estimator"]) == {"linear"}
