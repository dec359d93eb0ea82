"""`cka.passes`: minibatch CKA over several partitions of the examples (Nguyen, Raghu & Kornblith
2021 sum HSIC₁ over every minibatch of 10 passes of the shuffled test set), checked against the
theory on real Fashion-MNIST images, in float64.

Notation: x = the images' pixels (784 features), y = their 4 × 4 max-pooled pixels (49), two
real, non-linearly related representations of the same examples.
"""

import itertools
import shutil

import numpy as np
import pandas as pd
import pytest
import zarr

from ckaflow import cka, data
from ckaflow.cka.estimators import gram_linear, hsic_unbiased, linear_cka, row_blocks, u_center
from ckaflow.cka.grams import block_centre, gram_stats, self_gram
from ckaflow.cka.pairs import cka_between, cka_interval
from ckaflow.cka.partitions import partition, partition_digest, pass_permutation
from ckaflow.data import open_prepared
from ckaflow.errors import ComparisonError, ConfigError
from ckaflow.gram_stores import load_stats, open_gram
from ckaflow.stages.gram import gram_store
from ckaflow.stages.gram_labels import label_gram_store
from ckaflow.store import open_store
from tests.cka_stage import compute_tile
from tests.test_cka import ref_hsic1
from tests.tolerances import cka_atol, float32_dot_rtol

N, B, PASSES = 512, 64, 64  # the experiments: 8 blocks per pass, up to 64 passes
SEEDS = range(12)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Thousands of 64-row GEMMs: one thread is fastest, and immune to a busy machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def images(fashion_root) -> np.ndarray:
    return data.read_idx_images(fashion_root / "t10k-images-idx3-ubyte.gz")


def _reps(images, rows) -> tuple[np.ndarray, np.ndarray]:
    """Pixels and 4 × 4 max-pooled pixels of the images at `rows`, float64 in [0, 1]."""
    pixels = images[rows, 0]
    n = len(pixels)
    pooled = pixels.reshape(n, 7, 4, 7, 4).max(axis=(2, 4))
    return pixels.reshape(n, -1) / 255.0, pooled.reshape(n, -1) / 255.0


@pytest.fixture(scope="module")
def pair(images):
    return _reps(images, np.arange(N))


def _block_terms(sx, sy) -> np.ndarray:
    """(blocks, 3): HSIC₁(K, L), HSIC₁(K, K), HSIC₁(L, L) of every stored block, from the
    stored Grams with the plain estimator (independent of the HSIC vectors)."""
    out = []
    for i, m in enumerate(sx.block_rows):
        k, l_ = sx.grams[i, :m, :m], sy.grams[i, :m, :m]
        out.append((hsic_unbiased(k, l_), hsic_unbiased(k, k), hsic_unbiased(l_, l_)))
    return np.array(out)


def _cka_of(terms: np.ndarray) -> float:
    xy, xx, yy = terms.sum(axis=0)
    return xy / np.sqrt(xx * yy)


@pytest.fixture(scope="module")
def experiments(pair):
    """Per seed: the block terms of all PASSES passes; the first k passes are the k-pass
    estimator (a permutation depends on the seed and pass only, so fewer passes are a prefix)."""
    x, y = pair
    blocks = len(row_blocks(N, B))
    out = {}
    for seed in SEEDS:
        sx = gram_stats(x, batch_size=B, passes=PASSES, seed=seed, device="cpu")
        sy = gram_stats(y, batch_size=B, passes=PASSES, seed=seed, device="cpu")
        out[seed] = _block_terms(sx, sy).reshape(PASSES, blocks, 3)
    return out


def _k_pass(experiments, k: int) -> np.ndarray:
    """The k-pass minibatch CKA of every seed."""
    return np.array([_cka_of(terms[:k].reshape(-1, 3)) for terms in experiments.values()])


# -- the partitions --------------------------------------------------------------------------


def test_partitions_depend_on_seed_pass_and_n_only():
    n, b = 203, 32  # 6 blocks of 32, one of 11
    blocks = partition(n, b, passes=4, seed=3)
    consecutive = [np.arange(n)[rows] for rows in row_blocks(n, b)]
    assert [len(r) for r in blocks] == ([32] * 6 + [11]) * 4
    for got, want in zip(blocks[:7], consecutive, strict=True):  # pass 0: the stored order
        np.testing.assert_array_equal(got, want)
    for p in range(1, 4):  # every later pass: a permutation of all n rows
        rows = np.concatenate(blocks[7 * p : 7 * (p + 1)])
        np.testing.assert_array_equal(np.sort(rows), np.arange(n))
        np.testing.assert_array_equal(rows, pass_permutation(3, p, n))
    assert not np.array_equal(pass_permutation(3, 1, n), pass_permutation(3, 2, n))
    assert not np.array_equal(pass_permutation(3, 1, n), pass_permutation(4, 1, n))
    # the same blocks whenever asked: fewer passes are a prefix, more passes extend it
    for a, b_ in zip(partition(n, b, passes=2, seed=3), blocks, strict=False):
        np.testing.assert_array_equal(a, b_)
    # a final block of fewer than 4 rows is dropped in every pass, as in row_blocks
    assert [len(r) for r in partition(66, 32, passes=2, seed=0)] == [32, 32, 32, 32]


def test_every_representation_gets_the_same_partition(pair):
    x, y = pair
    labels = cka.one_hot(np.arange(N) % 10, 10)
    stats = [
        gram_stats(v, batch_size=B, passes=3, seed=5, device="cpu", name=name)
        for name, v in (("x", x), ("y", y), ("labels", labels), ("x32", x.astype(np.float32)))
    ]
    assert len({s.partition_key for s in stats}) == 1
    assert stats[0].passes == 3 and stats[0].partition_seed == 5 and stats[0].blocks_per_pass == 8
    assert stats[0].n == N
    # and the stored blocks are the Grams of exactly those rows, for every representation
    for s, v in zip(stats, (x, y, labels), strict=False):
        for i, rows in enumerate(partition(N, B, passes=3, seed=5)):
            np.testing.assert_allclose(
                u_center(s.grams[i]), u_center(gram_linear(v[rows])), atol=1e-10
            )


def test_a_block_of_the_globally_centred_gram_u_centres_like_the_block_itself(pair):
    """Why the blocks may be cut from column panels centred on the mean of all n rows: HSIC₁
    is invariant to shifting the features by any constant vector."""
    x, _ = pair
    rows = pass_permutation(0, 1, N)[:B]
    global_k = gram_linear(x)[np.ix_(rows, rows)]  # centred on the mean of all N rows
    block_k = gram_linear(x[rows])  # centred on the block's own mean
    raw_k = x[rows] @ x[rows].T  # not centred at all
    assert np.abs(global_k - block_k).max() > 1  # the Grams differ ...
    scale = np.abs(u_center(block_k)).max()
    for k in (global_k, raw_k):  # ... their U-centred forms do not
        np.testing.assert_allclose(u_center(k), u_center(block_k), atol=1e-11 * scale)


def test_column_panels_and_chunked_reads_give_the_in_memory_grams(pair, tmp_path):
    """A Zarr layer is read chunk by chunk, in order, once per column panel."""
    x, _ = pair
    arr = zarr.open_array(
        tmp_path / "x.zarr", mode="w", shape=x.shape, chunks=(B, x.shape[1]), dtype="float64"
    )
    arr[...] = x

    class Reads:
        def __init__(self):
            self.shape, self.rows = arr.shape, []

        def __getitem__(self, rows):
            self.rows.append(rows)
            return arr[rows]

    in_memory = gram_stats(x, batch_size=B, passes=3, seed=1, device="cpu")
    for panel_bytes, panels in ((2**30, 1), (N * 8 * 300, 3)):  # 784 columns: 300 + 300 + 184
        reads = Reads()
        got = gram_stats(
            reads, batch_size=B, passes=3, seed=1, device="cpu", panel_bytes=panel_bytes
        )
        np.testing.assert_allclose(got.grams, in_memory.grams, atol=1e-9, rtol=1e-12)
        assert all(r.stop - r.start == B and r.start % B == 0 for r in reads.rows)
        assert len(reads.rows) == 1 + panels * (N // B - 1)  # the first chunk is kept, not re-read


# -- the theory --------------------------------------------------------------------------------


@pytest.mark.parametrize("m", [4, 6])
def test_mean_block_hsic_over_all_subsets_is_the_full_sample_hsic(images, m):
    """HSIC₁ is a U-statistic: its mean over every subset of m of the n examples is HSIC₁ on
    all n (each 4-tuple of distinct examples lies in the same number of subsets), so a block of
    a random partition is an unbiased estimate of the full-sample HSIC₁. Exact, on n = 9."""
    x, y = _reps(images, np.arange(100, 109))
    k, l_ = gram_linear(x), gram_linear(y)
    full = np.array([ref_hsic1(k, l_), ref_hsic1(k, k), ref_hsic1(l_, l_)])
    subsets = [list(s) for s in itertools.combinations(range(9), m)]
    mean = np.mean(
        [
            [
                hsic_unbiased(gram_linear(x[s]), gram_linear(y[s])),  # each block centred alone
                hsic_unbiased(gram_linear(x[s]), gram_linear(x[s])),
                hsic_unbiased(gram_linear(y[s]), gram_linear(y[s])),
            ]
            for s in subsets
        ],
        axis=0,
    )
    np.testing.assert_allclose(mean, full, rtol=1e-11)


def test_mean_block_hsic_over_random_passes_is_the_full_sample_hsic(pair, experiments):
    """The same through the pipeline: the per-block HSIC₁ terms of the permuted passes average
    to the full-sample HSIC₁ (to within 4 standard errors; the passes are independent)."""
    x, y = pair
    k, l_ = gram_linear(x), gram_linear(y)
    full = np.array([hsic_unbiased(k, l_), hsic_unbiased(k, k), hsic_unbiased(l_, l_)])
    per_pass = np.concatenate([terms[1:].mean(axis=1) for terms in experiments.values()])
    mean = per_pass.mean(axis=0)
    stderr = per_pass.std(axis=0, ddof=1) / np.sqrt(len(per_pass))
    assert np.all(np.abs(mean - full) < 4 * stderr), (mean, full, stderr)
    assert np.all(stderr < 0.01 * np.abs(full))  # and the check is tight


def test_minibatch_cka_converges_to_debiased_cka_as_passes_grow(pair, experiments):
    x, y = pair
    target = linear_cka(x, y, debiased=True)
    rms = {k: np.sqrt(np.mean((_k_pass(experiments, k) - target) ** 2)) for k in (1, 4, 16, 64)}
    print("k, rms |minibatch - debiased|:", rms)
    assert rms[16] < rms[4] and rms[64] < rms[16]
    assert rms[64] < rms[4] / 2.5  # about 1/sqrt(k) for the random passes (3.5 in theory)
    assert rms[64] < 1e-3


def test_spread_over_seeds_falls_like_one_over_sqrt_passes(experiments):
    """Pass 0 is the same for every seed, so the spread is that of k − 1 random passes in a
    total of k: sd ∝ √(k − 1) / k (≈ 1/√k)."""
    sd = {k: _k_pass(experiments, k).std(ddof=1) for k in (1, 2, 8, 32)}
    print("k, sd over seeds:", sd)
    assert sd[1] < 1e-12  # one pass: the stored order, whatever the seed
    law = {k: np.sqrt(k - 1) / k for k in (2, 8, 32)}
    for k in (8, 32):
        ratio = (sd[k] / sd[2]) / (law[k] / law[2])
        assert 0.55 < ratio < 1.8, (k, ratio)


def test_fewer_passes_are_a_prefix_of_more(pair, experiments):
    x, y = pair
    sx = gram_stats(x, batch_size=B, passes=5, seed=2, device="cpu")
    sy = gram_stats(y, batch_size=B, passes=5, seed=2, device="cpu")
    got = cka_between([sx], [sy])[0, 0]
    assert got == pytest.approx(_cka_of(experiments[2][:5].reshape(-1, 3)), abs=1e-12)


def test_one_pass_is_todays_estimator_bit_for_bit(pair):
    """passes = 1: consecutive blocks, each shifted by its own `block_centre`, the block Gram in the
    input's precision: the numbers ckaflow gave before passes existed, whatever the seed."""
    import torch

    x, y = pair
    for values in (x, x.astype(np.float32)):
        default = gram_stats(values, batch_size=B, device="cpu")
        seeded = gram_stats(values, batch_size=B, passes=1, seed=99, device="cpu")
        expected = np.zeros_like(default.grams)
        for i, rows in enumerate(row_blocks(N, B)):
            t = torch.from_numpy(np.ascontiguousarray(values[rows]))
            t = t - block_centre(t)
            expected[i] = self_gram(t).double().numpy()  # the one block Gram of every path
        np.testing.assert_array_equal(default.grams, expected)
        np.testing.assert_array_equal(seeded.grams, expected)
        assert seeded.partition_key == default.partition_key == (1,)
    sx, sy = gram_stats(x, batch_size=B, device="cpu"), gram_stats(y, batch_size=B, device="cpu")
    assert cka_between([sx], [sy])[0, 0] == pytest.approx(
        cka.minibatch_cka(x, y, batch_size=B), abs=1e-12
    )


@pytest.mark.parametrize("rows", [5, 64, 255, 256])
def test_the_block_gram_is_exactly_symmetric_and_each_entry_a_float32_dot_product(rows):
    """`self_gram` forms the upper triangle (two GEMMs over halves of the rows, for blocks of
    `SPLIT_GRAM_ROWS` and more) and mirrors it: every entry within a float32 dot product's
    rounding of the float64 Gram, the lower triangle the upper's bits."""
    import torch

    p = 3000
    t = torch.from_numpy(np.random.default_rng(rows).standard_normal((rows, p)).astype(np.float32))
    g = self_gram(t).double().numpy()
    exact = t.double() @ t.double().T
    scale = t.double().abs() @ t.double().abs().T  # |x|ᵀ|y| of each entry's dot product
    assert np.array_equal(g, g.T)
    assert (np.abs(g - exact.numpy()) <= float32_dot_rtol(p) * scale.numpy()).all()


# -- the bootstrap -----------------------------------------------------------------------------


def _naive_width(sx, sy, replicates=200, seed=0) -> float:
    """The interval if all blocks of all passes were resampled as if independent."""
    terms = _block_terms(sx, sy)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(replicates):
        counts = np.bincount(rng.integers(0, len(terms), len(terms)), minlength=len(terms))
        draws.append(_cka_of(counts[:, None] * terms))
    return float(np.percentile(draws, 97.5) - np.percentile(draws, 2.5))


def test_bootstrap_interval_does_not_shrink_with_passes(pair):
    """The interval is pass 0's block bootstrap, moved to the k-pass estimate."""
    x, y = pair
    widths, naive, offsets = {}, {}, {}
    for k in (1, 4, 16):
        sx = gram_stats(x, batch_size=B, passes=k, seed=0, device="cpu")
        sy = gram_stats(y, batch_size=B, passes=k, seed=0, device="cpu")
        low, high = cka_interval([sx, sy], [sx, sy], bootstrap=200, seed=3)
        value = cka_between([sx, sy], [sx, sy])
        assert low[0, 1] < value[0, 1] < high[0, 1]
        np.testing.assert_allclose(np.diag(low), 1, atol=1e-12)
        widths[k], naive[k] = high[0, 1] - low[0, 1], _naive_width(sx, sy)
        offsets[k] = (low[0, 1] - value[0, 1], high[0, 1] - value[0, 1])
    for k in (4, 16):  # the same interval around each estimate
        np.testing.assert_allclose(offsets[k], offsets[1], atol=1e-12)
    print("k, interval width:", widths, "naive:", naive)
    assert widths[16] > 0.9 * widths[1] and widths[4] > 0.9 * widths[1]
    assert naive[16] < 0.5 * naive[1]  # what resampling every block would claim


def test_bootstrap_interval_covers_the_sampling_spread_of_the_k_pass_estimate(fashion_root):
    """On 40 disjoint samples of 512 real images (the training set's first 20,480): the
    interval's implied standard deviation is at least about the 8-pass estimate's true spread
    across samples; resampling every block as if independent would claim ~1/√8 of it."""
    train = data.read_idx_images(fashion_root / "train-images-idx3-ubyte.gz")
    estimates, implied, naive = [], [], []
    for i in range(40):
        x, y = _reps(train, np.arange(i * 512, (i + 1) * 512))
        sx = gram_stats(x, batch_size=32, passes=8, seed=0, device="cpu")
        sy = gram_stats(y, batch_size=32, passes=8, seed=0, device="cpu")
        estimates.append(cka_between([sx], [sy])[0, 0])
        low, high = cka_interval([sx], [sy], bootstrap=200, seed=i)
        implied.append((high - low)[0, 0] / (2 * 1.96))
        naive.append(_naive_width(sx, sy, seed=i) / (2 * 1.96))
    spread = np.std(estimates, ddof=1)
    print("true sd", spread, "interval sd", np.mean(implied), "naive sd", np.mean(naive))
    assert np.mean(implied) > 0.75 * spread
    assert np.mean(naive) < 0.6 * spread


# -- the pipeline ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pass_grams(activations, prepared, tmp_path_factory):
    root = tmp_path_factory.mktemp("pass-grams")
    out = {
        key: gram_store(path, root / f"{key[0]}.{key[1]}.zarr", "minibatch", 64, "cpu", 3, 7)
        for key, path in activations.items()
        if key[1] == "clean"
    }
    out["labels"] = label_gram_store(
        prepared, root / "labels.zarr", "minibatch", 64, passes=3, seed=7
    )
    out["seed8"] = gram_store(
        activations[("supervised", "clean")], root / "seed8.zarr", "minibatch", 64, "cpu", 3, 8
    )
    out["two"] = gram_store(
        activations[("supervised", "clean")], root / "two.zarr", "minibatch", 64, "cpu", 2, 7
    )
    return out


def test_gram_store_with_passes_records_its_partition(pass_grams, study_config):
    store = open_gram(pass_grams[("simclr", "clean")])
    n = study_config["data"]["eval_size"]  # 160 = 64 + 64 + 32, three times
    assert store.attrs["block_rows"] == [64, 64, 32] * 3
    assert store.attrs["passes"] == 3 and store.attrs["partition_seed"] == 7
    assert store["stem"].shape == (9, 64 * 65 // 2)  # each block's upper triangle
    digest = store.attrs["partition_digest"]
    rows = partition(len(store.attrs["example_ids"]), store.attrs["block_rows"][0], 3, 7)
    assert partition_digest(rows) == digest  # a reader can rebuild every block's rows
    assert open_gram(pass_grams["labels"]).attrs["partition_digest"] == digest
    assert open_gram(pass_grams["seed8"]).attrs["partition_digest"] != digest
    (stats,) = load_stats(store, ["stem"])
    assert (stats.passes, stats.partition_seed, stats.blocks_per_pass, stats.n) == (3, 7, 3, n)


def _tile(pass_grams, a, b, rows, cols, tmp_path, **kwargs) -> pd.DataFrame:
    out = tmp_path / f"{a}-{b}.parquet"
    compute_tile(
        "x",
        "cross",
        str(pass_grams[a]),
        str(pass_grams[b]),
        rows,
        cols,
        "minibatch",
        str(out),
        **kwargs,
    )
    return pd.read_parquet(out)


def test_tile_with_passes_equals_cka_between_in_memory(pass_grams, activations, prepared, tmp_path):
    a = open_store(activations[("simclr", "clean")])
    b = open_store(activations[("supervised", "clean")])
    tile = _tile(
        pass_grams,
        ("simclr", "clean"),
        ("supervised", "clean"),
        range(0, 5),
        range(20, 25),
        tmp_path,
        bootstrap=20,
    )
    names_a, names_b = tile["layer_a"].unique().tolist(), tile["layer_b"].unique().tolist()

    def stats(store, names):
        return [
            gram_stats(store[name][...], batch_size=64, passes=3, seed=7, device="cpu")
            for name in names
        ]

    expected = cka_between(stats(a, names_a), stats(b, names_b))
    got = tile.pivot(index="layer_a", columns="layer_b", values="value").loc[names_a, names_b]
    np.testing.assert_allclose(got.to_numpy(), expected, atol=1e-10, rtol=0)
    assert np.isfinite(tile[["ci_low", "ci_high"]]).all(axis=None)
    assert (tile["ci_low"] < tile["ci_high"]).all()
    # and against the plain estimators on the same blocks, in float64
    blocks = partition(160, 64, passes=3, seed=7)
    row = tile.iloc[7]
    xa32, xb32 = a[row.layer_a][...], b[row.layer_b][...]
    xa, xb = xa32.astype(np.float64), xb32.astype(np.float64)
    terms = np.array(
        [
            (
                hsic_unbiased(gram_linear(xa[r]), gram_linear(xb[r])),
                hsic_unbiased(gram_linear(xa[r]), gram_linear(xa[r])),
                hsic_unbiased(gram_linear(xb[r]), gram_linear(xb[r])),
            )
            for r in blocks
        ]
    )
    # float32 GEMMs of the stored rows against float64 throughout: the two paths' bounds
    bound = cka_atol(xa32, xb32, blocks) + cka_atol(xa, xb, blocks)
    assert abs(row.value - _cka_of(terms)) <= bound

    labels = cka.one_hot(open_prepared(prepared).eval_labels(), 10)
    tile = _tile(pass_grams, ("simclr", "clean"), "labels", range(0, 3), range(0, 1), tmp_path)
    expected = cka_between(
        stats(a, tile["layer_a"].tolist()),
        [gram_stats(labels, batch_size=64, passes=3, seed=7, device="cpu")],
    )
    np.testing.assert_allclose(tile["value"].to_numpy(), expected[:, 0], atol=1e-10, rtol=0)


@pytest.fixture(scope="module")
def one_pass_grams(activations, tmp_path_factory):
    root = tmp_path_factory.mktemp("one-pass-grams")
    return {
        key: gram_store(path, root / f"{key[0]}.{key[1]}.zarr", "minibatch", 64, "cpu")
        for key, path in activations.items()
        if key[1] == "clean"
    }


@pytest.mark.parametrize("passes", [1, 3])
def test_streamed_tile_equals_the_in_memory_route(
    passes, pass_grams, one_pass_grams, prepared, tmp_path
):
    """The tile streams over blocks (stream_block_hsics); its values and bootstrap intervals are
    those of the whole statistics in memory (load_stats, cka_between, cka_interval), on real
    Gram stores: a cross tile, a tile of one store against itself with shared layers, and the
    labels."""
    grams = pass_grams if passes == 3 else one_pass_grams
    if passes == 1:
        grams = {
            **grams,
            "labels": label_gram_store(prepared, tmp_path / "labels.zarr", "minibatch", 64),
        }
    simclr, supervised = ("simclr", "clean"), ("supervised", "clean")
    cases = [
        (simclr, supervised, range(0, 12), range(14, 27), 50, 3),
        (simclr, simclr, range(0, 10), range(5, 15), 40, 0),  # the diagonal's shared layers
        (supervised, "labels", range(20, 27), range(0, 1), 30, 1),
    ]
    for a, b, rows, cols, bootstrap, seed in cases:
        tile = _tile(grams, a, b, rows, cols, tmp_path, bootstrap=bootstrap, seed=seed)
        store_a, store_b = open_gram(grams[a]), open_gram(grams[b])
        assert store_a.attrs["passes"] == passes
        names_a = [store_a.layers[i]["name"] for i in rows]
        names_b = [store_b.layers[j]["name"] for j in cols]
        stats_a, stats_b = load_stats(store_a, names_a), load_stats(store_b, names_b)
        expected = {"value": cka_between(stats_a, stats_b)}
        low, high = cka_interval(stats_a, stats_b, bootstrap=bootstrap, seed=seed)
        expected.update(ci_low=low, ci_high=high)
        assert tile[["layer_a", "layer_b"]].values.tolist() == [
            [x, y] for x in names_a for y in names_b
        ]
        for column, want in expected.items():
            got = tile[column].to_numpy().reshape(len(names_a), len(names_b))
            np.testing.assert_allclose(got, want, atol=1e-12, rtol=0)
        assert np.isfinite(tile[["value", "ci_low", "ci_high"]]).all(axis=None)
        assert (tile["ci_low"] <= tile["value"] + 1e-12).all()


def test_block_hsics_give_cka_between_and_are_the_one_bootstrap(pair):
    """BlockHSICs: the per-block terms carry the value and the interval of the in-memory API."""
    from ckaflow.cka.pairs import block_hsics

    x, y = pair
    for passes in (1, 3):
        stats = [gram_stats(v, batch_size=B, passes=passes, seed=2, device="cpu") for v in pair]
        stats.append(gram_stats(x[:, ::3], batch_size=B, passes=passes, seed=2, device="cpu"))
        terms = block_hsics(stats[:2], stats)
        assert terms.cross.shape == (8 * passes, 2, 3) and terms.self_b.shape == (8 * passes, 3)
        assert (terms.passes, terms.blocks_per_pass) == (passes, 8)
        np.testing.assert_allclose(terms.cka(), cka_between(stats[:2], stats), atol=1e-12, rtol=0)
        for seed in (0, 5):
            got = terms.interval(bootstrap=30, seed=seed)
            want = cka_interval(stats[:2], stats, bootstrap=30, seed=seed)
            for g, w in zip(got, want, strict=True):
                np.testing.assert_array_equal(g, w)
        with pytest.raises(ValueError, match="bootstrap needs >= 1 replicate"):
            terms.interval(bootstrap=0)


# -- errors ------------------------------------------------------------------------------------


def test_passes_with_a_full_data_estimator_is_refused(pair, tmp_path):
    x, _ = pair
    for estimator in ("linear", "debiased", "rbf"):
        with pytest.raises(ValueError, match=f"needs the minibatch estimator, not {estimator}"):
            gram_stats(x, estimator=estimator, passes=2, device="cpu")
    with pytest.raises(ConfigError, match="needs the minibatch estimator, not debiased"):
        gram_store(tmp_path / "missing.zarr", tmp_path / "g.zarr", "debiased", 64, passes=10)
    for passes in (0, -1, 1.5):
        with pytest.raises(ValueError, match="passes must be an integer >= 1"):
            gram_stats(x, passes=passes, device="cpu")
    gram_stats(x, estimator="debiased", passes=1, device="cpu")  # one pass is every estimator's


def test_stores_with_other_passes_or_seed_are_refused_by_the_tile(pass_grams, tmp_path):
    simclr = ("simclr", "clean")
    with pytest.raises(ComparisonError, match="different passes or permutations"):
        _tile(pass_grams, simclr, "seed8", range(0, 1), range(0, 1), tmp_path)
    with pytest.raises(
        ComparisonError, match="different passes or permutations"
    ):  # 2 passes, not 3
        _tile(pass_grams, simclr, "two", range(0, 1), range(0, 1), tmp_path)
    # the same seed but another partition (another NumPy's permutations, say): refused too
    other = tmp_path / "other.zarr"
    shutil.copytree(pass_grams[("supervised", "clean")], other)
    zarr.open_group(other, mode="r+").attrs["partition_digest"] = "0" * 16
    pass_grams = {**pass_grams, "other": other}
    with pytest.raises(ComparisonError, match="different passes or permutations"):
        _tile(pass_grams, simclr, "other", range(0, 1), range(0, 1), tmp_path)
    assert not list(tmp_path.glob("*.parquet"))


def test_in_memory_statistics_of_other_partitions_are_refused(pair):
    x, y = pair
    sx = gram_stats(x, batch_size=B, passes=2, seed=0, device="cpu")
    sy = gram_stats(y, batch_size=B, passes=2, seed=1, device="cpu")
    with pytest.raises(ValueError, match="same passes and seed"):
        cka_between([sx], [sy])
    with pytest.raises(ValueError, match="same passes and seed"):
        cka_interval([sx], [sy], bootstrap=5)


def test_gpu_gives_the_cpu_numbers_with_passes(pair):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    x, y = (v.astype(np.float32) for v in pair)
    got = {}
    for device in ("cpu", "cuda"):
        stats = [gram_stats(v, batch_size=B, passes=4, seed=1, device=device) for v in (x, y)]
        got[device] = cka_between(stats, stats)
    # two float32 GEMM kernels: each within its bound of the exact CKA
    blocks = partition(N, B, passes=4, seed=1)
    bound = np.array([[2 * cka_atol(a, b, blocks) for b in (x, y)] for a in (x, y)])
    assert (np.abs(got["cuda"] - got["cpu"]) <= bound).all(), (got, bound)
