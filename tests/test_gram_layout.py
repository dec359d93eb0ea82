"""Gram stores keep each block's upper triangle in float32: a quarter of the full float64
matrices, and the same numbers. A store in the older full float64 layout is still read."""

import shutil

import numpy as np
import pandas as pd
import pytest
import zarr

from ckaflow.cka import grams
from ckaflow.gram_stores import load_stats, open_gram, pack_upper, unpack_upper, write_gram_store
from ckaflow.stages.gram import gram_store
from tests.cka_stage import compute_tile


@pytest.fixture(scope="module")
def stores(activations, tmp_path_factory):
    root = tmp_path_factory.mktemp("layout")
    return {
        run: gram_store(activations[(run, "clean")], root / f"{run}.zarr", "minibatch", 64)
        for run in ("simclr", "supervised")
    }


def _chunk_bytes(store) -> int:
    return sum(f.stat().st_size for f in store.rglob("*") if f.is_file() and f.name != "zarr.json")


def full_float64_copy(store, out):
    """The same statistics in the layout of stores written before the packed one: (blocks, b, b)
    float64 arrays and no `gram_format` attribute."""
    group = open_gram(store)
    names = [layer["name"] for layer in group.layers]
    stats = load_stats(group, names)
    legacy = zarr.open_group(out, mode="w", zarr_format=3)
    for name, s in zip(names, stats, strict=True):
        array = legacy.create_array(
            name,
            shape=s.grams.shape,
            chunks=(1, *s.grams.shape[1:]),
            dtype="float64",
            compressors=None,
        )
        array[...] = s.grams
    legacy.attrs.update({k: v for k, v in group.attrs.items() if k != "gram_format"})
    return out


def _tile(a, b, out) -> pd.DataFrame:
    compute_tile("x", "cross", str(a), str(b), range(0, 9), range(0, 9), "minibatch", str(out), 50)
    return pd.read_parquet(out)


def test_packed_float32_is_a_quarter_and_gives_the_same_bits(stores, tmp_path):
    legacy = {
        run: full_float64_copy(path, tmp_path / f"{run}.zarr") for run, path in stores.items()
    }
    new = _tile(stores["simclr"], stores["supervised"], tmp_path / "new.parquet")
    old = _tile(legacy["simclr"], legacy["supervised"], tmp_path / "old.parquet")
    for column in ("value", "ci_low", "ci_high"):
        np.testing.assert_array_equal(new[column].to_numpy(), old[column].to_numpy())
    np.testing.assert_array_equal(np.stack(new["jackknife"]), np.stack(old["jackknife"]))
    # b(b+1)/2 float32 values per block instead of b² float64: (b + 1) / (4b) of the bytes
    ratio = _chunk_bytes(stores["simclr"]) / _chunk_bytes(legacy["simclr"])
    assert ratio == pytest.approx(65 / 256, rel=1e-6)


def test_pack_and_unpack_are_inverse_on_symmetric_blocks():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 5))
    k = x + x.transpose(0, 2, 1)
    packed = pack_upper(k)
    assert packed.shape == (2, 15)
    np.testing.assert_array_equal(unpack_upper(packed, 5), k)


def test_values_that_float32_cannot_hold_are_stored_in_float64(activations, tmp_path):
    """The RBF kernel and float64 input are not float32 products: no bit is dropped."""
    rbf = gram_store(activations[("simclr", "clean")], tmp_path / "rbf.zarr", "rbf", 64)
    store = open_gram(rbf)
    name = store.layers[0]["name"]
    assert store[name].dtype == np.float64
    x = np.random.default_rng(1).normal(size=(96, 7))  # float64 values: a float64 GEMM
    stats = grams.gram_stats(x, batch_size=32, device="cpu")
    out = write_gram_store(tmp_path / "wide.zarr", {"x": stats}, {"run": "x", "view": "x"})
    stored = open_gram(out)
    assert stored["x"].dtype == np.float64
    np.testing.assert_array_equal(load_stats(stored, ["x"])[0].grams, stats.grams)


def test_a_legacy_store_is_read_as_it_was(stores, tmp_path):
    legacy = full_float64_copy(stores["simclr"], tmp_path / "legacy.zarr")
    names = [layer["name"] for layer in open_gram(legacy).layers]
    olds = load_stats(open_gram(legacy), names)
    news = load_stats(open_gram(stores["simclr"]), names)
    for old, new in zip(olds, news, strict=True):
        np.testing.assert_array_equal(old.grams, new.grams)
    shutil.rmtree(legacy)
