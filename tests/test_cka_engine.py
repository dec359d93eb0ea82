"""`cka_matrix`, Gram statistics, streaming, bootstrap and errors (the engine behind the tiles)."""

import numpy as np
import pytest
import torch
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from ckaflow import cka
from ckaflow.cka.grams import gram_stats
from ckaflow.cka.partitions import partition
from tests.test_cka import ref_biased_cka, ref_debiased_cka, ref_minibatch_cka
from tests.tolerances import cka_atol


def _layers(n=120, seed=0):
    """Post-ReLU layers of a random deep net, so neighbours are correlated like real layers."""
    r = np.random.default_rng(seed)
    h = r.normal(size=(n, 16))
    out = {}
    for i, width in enumerate((24, 40, 12, 64)):
        h = np.maximum(h @ r.normal(size=(h.shape[1], width)) / np.sqrt(h.shape[1]), 0)
        out[f"layer{i}"] = h
    return out


def ref_rbf_cka(x, y, fraction=0.8):
    def rbf(z):
        sq = ((z[:, None, :] - z[None, :, :]) ** 2).sum(-1)
        sigma = fraction * np.sqrt(np.median(sq))
        return np.exp(-sq / (2 * sigma**2))

    k, l_ = rbf(x), rbf(y)
    n = len(x)
    h = np.eye(n) - 1 / n

    def hsic(a, b):
        return np.trace(a @ h @ b @ h)

    return hsic(k, l_) / np.sqrt(hsic(k, k) * hsic(l_, l_))


REFERENCES = {
    "minibatch": lambda x, y: ref_minibatch_cka(x, y, 32),
    "linear": ref_biased_cka,
    "debiased": ref_debiased_cka,
    "rbf": ref_rbf_cka,
}


@pytest.mark.parametrize("estimator", cka.ESTIMATORS)
def test_cka_matrix_agrees_with_the_reference_formulas(estimator):
    layers = _layers()
    got = cka.cka_matrix(layers, estimator=estimator, batch_size=32, device="cpu")
    ref = REFERENCES[estimator]
    expected = np.array([[ref(a, b) for b in layers.values()] for a in layers.values()])
    np.testing.assert_allclose(got, expected, atol=1e-8, rtol=0)
    np.testing.assert_allclose(np.diag(got), 1, atol=1e-12)


def test_two_lists_give_a_rectangular_matrix():
    layers = list(_layers().values())
    labels = cka.one_hot(np.arange(120) % 5, 5)
    got = cka.cka_matrix(layers, [labels], batch_size=40, device="cpu")
    assert got.shape == (4, 1)
    assert got[2, 0] == pytest.approx(cka.minibatch_cka(layers[2], labels, batch_size=40), 1e-10)


def test_float32_with_large_offset_matches_float64_within_1e6():
    layers = _layers(n=256)
    f32 = {k: (v + 1000).astype(np.float32) for k, v in layers.items()}
    as64 = {k: v.astype(np.float64) for k, v in f32.items()}  # the same stored values
    for estimator in ("minibatch", "linear"):
        got = cka.cka_matrix(f32, estimator=estimator, batch_size=64, device="cpu")
        expected = cka.cka_matrix(as64, estimator=estimator, batch_size=64, device="cpu")
        # float32 GEMMs (centred first: the offset costs nothing) against float64 ones
        blocks = partition(256, 64) if estimator == "minibatch" else [slice(0, 256)]
        bound = _bounds(f32, estimator, blocks) + _bounds(as64, estimator, blocks)
        assert (np.abs(got - expected) <= bound).all(), (estimator, got - expected, bound)


def _bounds(layers: dict, estimator: str, blocks) -> np.ndarray:
    """`cka_atol` of every pair: one path's distance from the exact CKA, in its precision."""
    values = list(layers.values())
    return np.array([[cka_atol(a, b, blocks, estimator) for b in values] for a in values])


def test_bfloat16_torch_input_is_accepted():
    x = torch.randn(64, 3, 4, 4).to(torch.bfloat16)
    got = cka.cka_matrix([x, 2 * x], batch_size=32, device="cpu")
    assert got[0, 1] == pytest.approx(1, abs=1e-6)


def test_single_batch_minibatch_equals_debiased():
    layers = _layers(n=64)
    mb = cka.cka_matrix(layers, estimator="minibatch", batch_size=64, device="cpu")
    db = cka.cka_matrix(layers, estimator="debiased", batch_size=64, device="cpu")
    np.testing.assert_allclose(mb, db, atol=1e-12)


class CountingRows:
    """A Zarr array that records the largest row span of any single read."""

    def __init__(self, arr):
        self.arr, self.shape, self.attrs, self.widest = arr, arr.shape, arr.attrs, 0

    def __getitem__(self, rows):
        self.widest = max(self.widest, rows.stop - rows.start)
        return self.arr[rows]


@pytest.mark.parametrize("estimator", ["minibatch", "linear"])
def test_streaming_from_zarr_equals_in_memory_and_reads_chunk_by_chunk(tmp_path, estimator):
    layers = _layers(n=150)
    group = zarr.open_group(tmp_path / "acts.zarr", mode="w")
    stored = {}
    for name, values in layers.items():
        arr = group.create_array(
            name, shape=values.shape, chunks=(32, values.shape[1]), dtype="float64"
        )
        arr[...] = values
        stored[name] = CountingRows(arr)
    streamed = cka.cka_matrix(stored, estimator=estimator, batch_size=32, device="cpu")
    in_memory = cka.cka_matrix(layers, estimator=estimator, batch_size=32, device="cpu")
    np.testing.assert_allclose(streamed, in_memory, atol=1e-12)
    assert max(s.widest for s in stored.values()) == 32  # never more than one chunk at once


def test_gram_stats_reload_exactly_through_the_pipeline_store(tmp_path):
    from ckaflow.gram_stores import load_stats, open_gram, write_gram_store

    layers = _layers()
    stats = {k: gram_stats(v, batch_size=32, device="cpu", name=k) for k, v in layers.items()}
    path = write_gram_store(tmp_path / "g.zarr", stats, {"example_ids": list(range(120))})
    loaded = load_stats(open_gram(path), list(layers))
    for before, after in zip(stats.values(), loaded, strict=True):
        np.testing.assert_array_equal(before.grams, after.grams)
        assert before.block_rows == after.block_rows == (32, 32, 32, 24)
        assert after.estimator == "minibatch"


@pytest.mark.parametrize("estimator", ["minibatch", "linear", "rbf"])
def test_bootstrap_is_seeded_and_brackets_the_estimate(estimator):
    layers = _layers(n=480)
    stats = [
        gram_stats(v, estimator=estimator, batch_size=32, device="cpu") for v in layers.values()
    ]
    low, high = cka.cka_interval(stats, stats, bootstrap=60, seed=1)
    low2, high2 = cka.cka_interval(stats, stats, bootstrap=60, seed=1)
    np.testing.assert_array_equal(low, low2)
    np.testing.assert_array_equal(high, high2)
    values = cka.cka_between(stats, stats)
    off = ~np.eye(4, dtype=bool)
    assert np.all(low[off] < values[off]) and np.all(values[off] < high[off])
    assert np.all(high[off] - low[off] < 0.3)
    np.testing.assert_allclose(np.diag(low), 1, atol=1e-9)  # a layer with itself: always 1
    assert not np.array_equal(low, cka.cka_interval(stats, stats, bootstrap=60, seed=2)[0])


def test_bootstrap_interval_narrows_with_more_examples():
    widths = []
    for n in (160, 1280):
        layers = list(_layers(n=n, seed=4).values())[:2]
        stats = [gram_stats(v, batch_size=32, device="cpu") for v in layers]
        low, high = cka.cka_interval(stats[:1], stats[1:], bootstrap=100, seed=0)
        widths.append(float(high[0, 0] - low[0, 0]))
    assert widths[1] < widths[0] / 1.8  # about 1/sqrt(8) in theory


def test_debiased_bootstrap_is_refused():
    stats = [gram_stats(v, estimator="debiased", device="cpu") for v in _layers().values()]
    with pytest.raises(ValueError, match="not defined for the debiased estimator"):
        cka.cka_interval(stats, stats, bootstrap=10)


def test_errors_name_what_is_wrong(tmp_path):
    layers = _layers()
    with pytest.raises(ValueError, match="layer1 has 119 examples but layer0 has 120"):
        cka.cka_matrix({"layer0": layers["layer0"], "layer1": layers["layer1"][:-1]})
    bad = layers["layer2"].copy()
    bad[3, 3] = np.inf
    with pytest.raises(ValueError, match="layer2: 1 non-finite"):
        cka.cka_matrix({"layer0": layers["layer0"], "layer2": bad}, device="cpu")
    with pytest.raises(ValueError, match="batch_size must be >= 4"):
        cka.cka_matrix(layers, batch_size=3)
    with pytest.raises(ValueError, match="too few for the debiased estimator"):
        cka.cka_matrix([np.ones((3, 2)), np.ones((3, 2))], estimator="debiased")
    group = zarr.open_group(tmp_path / "z.zarr", mode="w")
    for name, ids in (("a", [0, 1, 2, 3, 4, 5]), ("b", [0, 1, 2, 3, 5, 4])):
        arr = group.create_array(name, shape=(6, 2), dtype="float64")
        arr[...] = np.arange(12.0).reshape(6, 2) ** 2
        arr.attrs["example_ids"] = ids
    with pytest.raises(ValueError, match="different examples or row order"):
        cka.cka_matrix({"a": group["a"], "b": group["b"]}, batch_size=4)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0.01, 100), st.sampled_from(cka.ESTIMATORS))
def test_matrix_properties(seed, scale, estimator):
    r = np.random.default_rng(seed)
    x = r.normal(size=(40, 6))
    y = x @ r.normal(size=(6, 5)) + r.normal(size=(40, 5))
    q, _ = np.linalg.qr(r.normal(size=(6, 6)))
    m = cka.cka_matrix([x, y, scale * x @ q], estimator=estimator, batch_size=20, device="cpu")
    np.testing.assert_allclose(m, m.T, atol=1e-10)  # symmetric
    np.testing.assert_allclose(np.diag(m), 1, atol=1e-9)
    if estimator != "rbf":  # linear kernels: invariant to orthogonal maps and isotropic scaling
        assert m[0, 2] == pytest.approx(1, abs=1e-8)
        assert m[1, 2] == pytest.approx(m[1, 0], abs=1e-8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_gives_the_cpu_numbers():
    layers = {k: v.astype(np.float32) for k, v in _layers(n=512).items()}
    for estimator in cka.ESTIMATORS:
        cpu = cka.cka_matrix(layers, estimator=estimator, batch_size=128, device="cpu")
        gpu = cka.cka_matrix(layers, estimator=estimator, batch_size=128, device="cuda")
        # two float32 GEMM kernels, each within its bound of the exact CKA
        blocks = partition(512, 128) if estimator == "minibatch" else [slice(0, 512)]
        bound = 2 * _bounds(layers, estimator, blocks)
        assert (np.abs(gpu - cpu) <= bound).all(), (estimator, gpu - cpu, bound)


def test_bootstrap_percentiles_skip_nan_replicates_as_nanpercentile_does():
    """Only pairs with a NaN replicate take numpy's slow nanpercentile; the rest take
    percentile: the same numbers, bit for bit."""
    import warnings

    from ckaflow.cka.pairs import _percentiles

    draws = np.random.default_rng(0).random((200, 6, 7))
    draws[5, 3, 4] = np.nan  # one NaN replicate
    draws[:, 1, 2] = np.nan  # a constant layer: every replicate NaN
    low, high = _percentiles(draws, 0.95)
    tail = (1 - 0.95) / 2 * 100
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        want = np.nanpercentile(draws, tail, axis=0), np.nanpercentile(draws, 100 - tail, axis=0)
    np.testing.assert_array_equal(low, want[0])
    np.testing.assert_array_equal(high, want[1])
    assert np.isnan(low[1, 2]) and np.isfinite(low[3, 4])
