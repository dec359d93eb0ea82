import numpy as np
import pytest
import torch
import zarr

from ckaflow.data import open_prepared
from ckaflow.errors import StoreError
from ckaflow.layers import layer_registry
from ckaflow.models import load_network, record_layers
from ckaflow.store import open_store


def test_store_has_one_row_chunked_array_per_layer(activations, study_config):
    store = open_store(activations[("simclr", "clean")])
    names = [layer.name for layer in layer_registry("resnet18", "simclr")]
    assert [layer["name"] for layer in store.layers] == names
    n = study_config["data"]["eval_size"]
    for name in names:
        arr = store[name]
        assert arr.shape[0] == n
        assert arr.chunks == (64, arr.shape[1])  # chunked along rows only, CKA batch high
        assert arr.dtype == np.float32
    assert store["stem"].shape[1] == 4 * 28 * 28
    attrs = store.attrs
    assert attrs["view"] == "clean" and attrs["run"].startswith("simclr-")
    assert attrs["complete"] and attrs["code_version"] and attrs["model_spec_hash"]
    assert len(attrs["example_ids"]) == n


def test_stored_values_equal_a_direct_forward_pass(reference_store, trained, prepared):
    """The store holds exactly what the network computes. The direct pass forwards the
    extraction's first batch (its 40 rows, on the CPU, in this module's threads): the same
    kernels on the same images, so the same float32 bits; a batch of another shape may take
    other kernels and round otherwise, by amounts no simple bound covers after 20 layers."""
    net, _ = load_network(trained["simclr"])
    data = open_prepared(prepared)
    pixels = torch.from_numpy(data.view("clean")[:40])  # _extract: batch_size=40
    with torch.no_grad(), record_layers(net) as cap:
        net(data.normalise(pixels.float() / 255))
    for name in ("stem", "layer2.1.residual", "layer4.1.out", "head.1"):
        np.testing.assert_array_equal(reference_store[name][:40], cap[name].numpy(), name)


def test_store_without_completion_flag_is_refused(tmp_path):
    path = tmp_path / "half.zarr"
    zarr.open_group(path, mode="w").attrs.update({"kind": "ckaflow.activations"})
    with pytest.raises(StoreError, match="incomplete"):
        open_store(path)


def test_missing_or_foreign_store_is_refused(tmp_path, prepared):
    with pytest.raises(StoreError, match="does not exist"):
        open_store(tmp_path / "nothing.zarr")
    with pytest.raises(StoreError, match="expected 'ckaflow.activations'"):
        open_store(prepared)


# -- storage options, selection, resumption -------------------------------------------------------


def _extract(trained, prepared, out, **options):
    """The SimCLR run's clean view, extracted with small batches and 64-row chunks."""
    from ckaflow.activations import extract

    kw = {"batch_size": 40, "chunk_rows": 64, "device": "cpu", **options}
    return open_store(extract(trained["simclr"], prepared, "clean", out, **kw))


@pytest.fixture(scope="module")
def reference_store(trained, prepared, tmp_path_factory):
    return _extract(trained, prepared, tmp_path_factory.mktemp("ref") / "clean.zarr")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_stores_hold_the_rounded_values(
    dtype, reference_store, trained, prepared, tmp_path
):
    from ckaflow.cka import gram_stats

    store = _extract(trained, prepared, tmp_path / "s.zarr", dtype=dtype)
    assert store.attrs["dtype"] == dtype
    for name in ("stem", "layer3.0.residual", "head.1"):
        full = torch.from_numpy(reference_store[name][...])
        rounded = full.to(getattr(torch, dtype)).float().numpy()
        got = store[name][...]
        assert got.dtype == (np.float32 if dtype == "bfloat16" else np.float16)
        np.testing.assert_array_equal(got.astype(np.float32), rounded)
    # Gram statistics are exact to the stored values: streaming equals the decoded array
    layer = store["layer2.1.out"]
    a = gram_stats(layer, batch_size=64, device="cpu")
    b = gram_stats(layer[...].astype(np.float32), batch_size=64, device="cpu")
    np.testing.assert_array_equal(a.grams, b.grams)


@pytest.mark.parametrize("codec", ["lz4", "none"])
def test_codecs_store_identical_values(codec, reference_store, trained, prepared, tmp_path):

    store = _extract(trained, prepared, tmp_path / "s.zarr", codec=codec)
    for name in ("stem", "layer4.1.out"):
        np.testing.assert_array_equal(store[name][...], reference_store[name][...])


def test_layer_selection_and_example_count(trained, prepared, tmp_path, reference_store):
    from ckaflow.layers import select_layers

    chosen = select_layers(layer_registry("resnet18", "simclr"), ["out"], ["layer[34].*"])
    names = [layer.name for layer in chosen]
    assert names == ["layer3.0.out", "layer3.1.out", "layer4.0.out", "layer4.1.out"]
    store = _extract(trained, prepared, tmp_path / "s.zarr", layers=names, examples=100)
    assert [layer["name"] for layer in store.layers] == names
    assert store["layer4.1.out"].shape[0] == 100
    assert len(store.attrs["example_ids"]) == 100
    np.testing.assert_array_equal(store["layer4.1.out"][...], reference_store["layer4.1.out"][:100])
    with pytest.raises(ValueError, match="matches none"):
        select_layers(layer_registry("resnet18", "simclr"), ["fc"], None)


def test_interrupted_extraction_resumes_after_its_last_whole_chunk(
    trained, prepared, tmp_path, reference_store, monkeypatch
):
    from ckaflow import activations

    out = tmp_path / "s.zarr"
    real_submit = activations._Writer.submit
    submitted = []

    def crash_on_third_chunk(self, rows, buffers, ready):
        if len(submitted) == 2:
            raise KeyboardInterrupt  # the process dies between two chunks
        submitted.append(rows)
        real_submit(self, rows, buffers, ready)

    monkeypatch.setattr(activations._Writer, "submit", crash_on_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        activations.extract(
            trained["simclr"], prepared, "clean", out, batch_size=40, chunk_rows=64, device="cpu"
        )
    monkeypatch.setattr(activations._Writer, "submit", real_submit)
    partial = tmp_path / ".s.zarr.partial"
    assert not out.exists() and partial.exists()
    with pytest.raises(StoreError, match="incomplete"):
        open_store(partial)  # a partial store is never read as complete
    lines = []
    activations.extract(
        trained["simclr"],
        prepared,
        "clean",
        out,
        batch_size=40,
        chunk_rows=64,
        device="cpu",
        log=lines.append,
    )
    assert any("after row 128" in line for line in lines)
    store = open_store(out)
    for layer in store.layers:
        np.testing.assert_array_equal(
            store[layer["name"]][...], reference_store[layer["name"]][...]
        )
    assert not partial.exists()


def test_changed_settings_do_not_resume_a_foreign_partial_store(trained, prepared, tmp_path):
    from ckaflow import activations

    partial = tmp_path / ".s.zarr.partial"
    zarr.open_group(partial, mode="w").attrs.update({"call_hash": "other", "rows_done": 64})
    lines = []
    activations.extract(
        trained["simclr"],
        prepared,
        "clean",
        tmp_path / "s.zarr",
        chunk_rows=64,
        device="cpu",
        log=lines.append,
    )
    assert not any("resuming" in line for line in lines)
    assert open_store(tmp_path / "s.zarr").attrs["complete"]


@pytest.mark.parametrize("codec", ["zstd", "lz4", "none"])
def test_chunks_written_directly_read_back_through_zarr(codec, tmp_path):
    """The writer's own encoding: for zstd and no codec the very bytes Zarr writes; for every
    codec the values Zarr reads back, the short last chunk included."""
    from ckaflow.store import ChunkEncoder, ChunkPaths, StoreOptions

    options = StoreOptions(codec=codec, chunk_rows=4)
    values = np.maximum(np.random.default_rng(0).normal(size=(10, 6)), 0).astype("float32")
    ours = zarr.open_group(tmp_path / "ours.zarr", mode="w", zarr_format=3)
    theirs = zarr.open_group(tmp_path / "theirs.zarr", mode="w", zarr_format=3)
    for group in (ours, theirs):
        group.create_array(
            "x", shape=values.shape, chunks=(4, 6), dtype="float32",
            compressors=options.compressors(), config={"write_empty_chunks": True},
        )  # fmt: skip
    theirs["x"][:] = values
    encoder = ChunkEncoder(options)
    for chunk in range(3):
        block = np.zeros((4, 6), dtype="float32")
        rows = values[4 * chunk : 4 * chunk + 4]
        block[: len(rows)] = rows
        path = ChunkPaths(ours["x"])(chunk)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encoder.encode(block))
        if codec != "lz4":  # blosc frames may differ in header details, not in values
            assert path.read_bytes() == ChunkPaths(theirs["x"])(chunk).read_bytes()
    np.testing.assert_array_equal(zarr.open_group(tmp_path / "ours.zarr")["x"][:], values)


def test_a_store_with_a_missing_chunk_or_a_wrong_shape_is_refused(activations, tmp_path):
    import shutil

    from ckaflow.store import ChunkPaths

    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(activations[("simclr", "clean")], damaged)
    group = zarr.open_group(damaged)
    ChunkPaths(group["layer2.0.out"])(1).unlink()
    with pytest.raises(StoreError, match=r"layer2.0.out lacks chunk files \[1\]"):
        open_store(damaged)
    foreign = tmp_path / "foreign.zarr"
    shutil.copytree(activations[("simclr", "clean")], foreign)
    zarr.open_group(foreign).attrs["n_examples"] = 999
    with pytest.raises(StoreError, match="rows where the store has 999 examples"):
        open_store(foreign)


def test_snakemake_s_timestamp_in_a_store_is_no_warning(activations, tmp_path):
    """Snakemake writes `.snakemake_timestamp` into every directory() output; opening the store
    says nothing about it (Zarr warns of any file that is no node of its hierarchy)."""
    import shutil
    import warnings

    marked = tmp_path / "marked.zarr"
    shutil.copytree(activations[("simclr", "clean")], marked)
    (marked / ".snakemake_timestamp").touch()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        open_store(marked)
    assert not [w for w in caught if "snakemake_timestamp" in str(w.message)], caught


@pytest.mark.parametrize(("examples", "chunk_rows"), [(64, 256), (100, 256), (150, 64)])
def test_a_selection_of_any_size_reads_with_plain_zarr(
    trained, prepared, tmp_path, examples, chunk_rows
):
    """Fewer examples than a chunk's rows (64 or 100 of 256) or a ragged last chunk (150 = 64
    + 64 + 22): every array opens and reads with plain zarr, equal to ckaflow's reader. (A
    64-example store once held 256-row chunks: plain zarr failed.)"""
    from ckaflow.activations import extract

    names = ["layer1.0.out", "pool"]
    out = extract(
        trained["simclr"],
        prepared,
        "clean",
        tmp_path / "s.zarr",
        batch_size=40,
        chunk_rows=chunk_rows,
        layers=names,
        examples=examples,
        device="cpu",
    )
    group = zarr.open_group(str(out), mode="r")
    ours = open_store(out)
    for name in names:
        plain = group[name][...]
        assert plain.shape[0] == examples
        np.testing.assert_array_equal(plain, ours[name][...])
