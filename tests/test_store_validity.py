"""Every Zarr store ckaflow writes is valid Zarr: plain `zarr` opens it and reads every array
whole, to the values ckaflow's own readers give, for every store kind, size of selection, dtype
and codec; and `ckaflow inspect` refuses to call a store complete when a chunk has the wrong
size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from ckaflow.inspect import describe_zarr
from ckaflow.store import chunk_problems

# eval examples in the tiny study: 160. Selections smaller than one chunk, one chunk and a bit,
# and all of them, with each dtype and codec; chunk_rows 256 exceeds every one of them.
SELECTIONS = [
    {"examples": 64, "dtype": "float32", "codec": "zstd"},
    {"examples": 100, "dtype": "float16", "codec": "none"},
    {"examples": None, "dtype": "bfloat16", "codec": "lz4"},
    {"examples": 64, "dtype": "bfloat16", "codec": "none"},
]


def _read_everything(path: Path) -> dict[str, np.ndarray]:
    """Every array of the store through plain Zarr, whole (any malformed chunk raises)."""
    out = {}

    def walk(group, prefix=""):
        for name, array in group.arrays():
            out[prefix + name] = np.asarray(array[...])
        for name, sub in group.groups():
            walk(sub, f"{prefix}{name}/")

    walk(zarr.open_group(path, mode="r"))
    assert out, f"{path}: no arrays"
    return out


def _check(path: Path) -> dict[str, np.ndarray]:
    arrays = _read_everything(path)
    assert "complete," in describe_zarr(path).splitlines()[0]
    group = zarr.open_group(path, mode="r")
    for name in arrays:
        assert chunk_problems(group[name]) == [], name
    return arrays


@pytest.mark.parametrize("selection", SELECTIONS, ids=lambda s: "-".join(map(str, s.values())))
@pytest.mark.parametrize("chunk_rows", [256, 48])
def test_activation_stores_of_any_selection_read_with_plain_zarr(
    trained, prepared, tmp_path, selection, chunk_rows
):
    from ckaflow.activations import extract
    from ckaflow.store import open_store

    out = extract(
        trained["supervised"], prepared, "clean", tmp_path / "a.zarr", batch_size=40,
        chunk_rows=chunk_rows, layers=["layer1.0.out", "pool"], **selection,
    )  # fmt: skip
    arrays = _check(out)
    store = open_store(out)
    for layer in store.layers:
        plain = arrays[layer["name"]]
        ours = store[layer["name"]][:]
        assert plain.shape[0] == (selection["examples"] or 160)
        if selection["dtype"] == "bfloat16":  # stored as its 16 raw bits
            plain = (plain.astype(np.uint32) << 16).view(np.float32)
        np.testing.assert_array_equal(plain.astype(np.float32), ours)


def test_data_gram_and_label_stores_read_with_plain_zarr(prepared, activations, trained, tmp_path):
    from ckaflow.gram_stores import open_gram
    from ckaflow.stages.gram import fused_gram_store, gram_store
    from ckaflow.stages.gram_labels import label_gram_store

    _check(prepared)
    stores = [
        gram_store(activations[("simclr", "clean")], tmp_path / "mb.zarr", "minibatch", 64),
        gram_store(activations[("simclr", "clean")], tmp_path / "rbf.zarr", "rbf", 64),
        label_gram_store(prepared, tmp_path / "labels.zarr", "minibatch", 64, examples=100),
        fused_gram_store(
            trained["simclr"], prepared, "clean", tmp_path / "fused.zarr", batch_size=64,
            passes=2, seed=3, examples=100, device="cpu",
        ),
    ]  # fmt: skip
    for path in stores:
        arrays = _check(path)
        store = open_gram(path)
        layer = store.layers[0]["name"]
        assert arrays[layer].shape[0] == len(store.attrs["block_rows"]), path


def test_inspect_and_the_reader_find_a_chunk_of_the_wrong_size(activations, one_gram, tmp_path):
    """The damage of the issue, made by hand: a last chunk holding more rows than its array
    (compressed: found by decoding it), and a Gram block cut short (uncompressed: found from
    its size). A store with either is not called complete, and the reader refuses it."""
    import shutil

    from ckaflow.errors import StoreError
    from ckaflow.gram_stores import open_gram
    from ckaflow.store import ChunkPaths, open_store

    for source, layer, damage, opener in (
        (activations[("simclr", "clean")], "pool", lambda b: b + b, open_store),
        (one_gram, "layer1.0.out", lambda b: b[:-4], open_gram),
    ):
        damaged = tmp_path / Path(source).name
        shutil.copytree(source, damaged)
        array = zarr.open_group(damaged, mode="r")[layer]
        last = ChunkPaths(array)(-(-array.shape[0] // array.chunks[0]) - 1)
        last.write_bytes(damage(last.read_bytes()))
        text = describe_zarr(damaged)
        assert "DAMAGED" in text.splitlines()[0], text
        assert f"{layer}: " in text, text
        if opener is open_gram:  # sizes are checked on every open; decoding only by inspect
            with pytest.raises(StoreError, match=f"{layer}: chunk"):
                opener(damaged)


@pytest.fixture
def one_gram(activations, tmp_path) -> Path:
    from ckaflow.stages.gram import gram_store

    return gram_store(activations[("simclr", "clean")], tmp_path / "g" / "g.zarr", "minibatch", 64)
