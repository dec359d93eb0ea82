"""Delete-one-block jackknife replicates of CKA values: each equals the CKA of the same data with
that block of examples left out (minibatch: block g of pass 0; full-data estimators: one of
`FULL_DATA_GROUPS` consecutive groups), the same block for every layer, and tiles carry them
into the tidy table (parquet only). Float64 data throughout, so agreement is to rounding."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ckaflow import cka
from ckaflow.cka.grams import gram_stats
from ckaflow.cka.pairs import FULL_DATA_GROUPS, block_hsics, cka_jackknife


def layers(n: int = 256, seed: int = 0) -> list[np.ndarray]:
    """Three related float64 representations of n examples."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n, 12))
    return [
        base @ rng.standard_normal((12, 20)),
        np.tanh(base @ rng.standard_normal((12, 9))) + 0.3 * rng.standard_normal((n, 9)),
        rng.standard_normal((n, 7)),
    ]


def test_minibatch_replicate_g_is_the_cka_without_block_g():
    xs = layers(256)
    stats = [gram_stats(x, estimator="minibatch", batch_size=64, device="cpu") for x in xs]
    jack = block_hsics(stats, stats).jackknife()
    assert jack.shape == (4, 3, 3)
    for g in range(4):
        keep = np.r_[0 : 64 * g, 64 * (g + 1) : 256]  # the other blocks, unchanged
        for i, j in [(0, 1), (1, 2), (0, 2)]:
            want = cka.minibatch_cka(xs[i][keep], xs[j][keep], batch_size=64)
            assert jack[g, i, j] == pytest.approx(want, abs=1e-12)
    # the replicates scatter around the value; a layer with itself is 1 in every replicate
    np.testing.assert_allclose(jack[:, [0, 1, 2], [0, 1, 2]], 1, atol=1e-12)


def test_with_passes_the_replicates_shift_onto_the_k_pass_value():
    xs = layers(256)
    stats = [
        gram_stats(x, estimator="minibatch", batch_size=64, passes=3, seed=5, device="cpu")
        for x in xs
    ]
    terms = block_hsics(stats, stats)
    jack = terms.jackknife()
    assert jack.shape == (4, 3, 3)  # pass 0's blocks only
    first = [gram_stats(x, estimator="minibatch", batch_size=64, device="cpu") for x in xs]
    plain = block_hsics(first, first)
    shift = terms.cka() - plain.cka()
    np.testing.assert_allclose(jack, plain.jackknife() + shift, atol=1e-12)


@pytest.mark.parametrize("estimator", ["linear", "debiased"])
def test_full_data_replicates_leave_out_one_group_of_examples(estimator):
    n = 200
    xs = layers(n, seed=1)
    stats = [gram_stats(x, estimator=estimator, batch_size=64, device="cpu") for x in xs]
    jack = cka_jackknife(stats, stats[1:])
    assert jack.shape == (FULL_DATA_GROUPS, 3, 2)
    edges = np.linspace(0, n, FULL_DATA_GROUPS + 1).astype(int)
    for g in (0, 4, FULL_DATA_GROUPS - 1):
        keep = np.r_[0 : edges[g], edges[g + 1] : n]
        want = cka.linear_cka(xs[0][keep], xs[2][keep], debiased=estimator == "debiased")
        assert jack[g, 0, 1] == pytest.approx(want, abs=1e-12)


def test_one_block_has_no_jackknife():
    xs = layers(64)
    stats = [gram_stats(x, estimator="minibatch", batch_size=64, device="cpu") for x in xs]
    assert np.isnan(block_hsics(stats, stats).jackknife()).all()


def test_the_tidy_table_keeps_the_replicates_in_parquet_not_in_csv(tmp_path):
    from ckaflow.tables import COLUMNS, write_both

    table = pd.DataFrame({c: [0] for c in COLUMNS if c != "jackknife"})
    table["jackknife"] = [[0.5, 0.25]]
    write_both(table, tmp_path / "cka.parquet")
    assert pd.read_parquet(tmp_path / "cka.parquet")["jackknife"].iloc[0].tolist() == [0.5, 0.25]
    assert "jackknife" not in pd.read_csv(tmp_path / "cka.csv").columns


def test_rows_with_replicates_of_different_lengths_are_refused():
    """Tables merged from different eval sets cannot share one image jackknife: a clear error."""
    from ckaflow.claims import replicate_matrix
    from ckaflow.errors import TableError

    table = pd.DataFrame({"value": [0.5, 0.6], "jackknife": [[0.5, 0.4], [0.6, 0.5, 0.7]]})
    with pytest.raises(TableError, match="different lengths"):
        replicate_matrix(table)
    np.testing.assert_array_equal(
        replicate_matrix(table.assign(jackknife=[[0.4, 0.3], [0.5, 0.7]])),
        [[0.5, 0.4, 0.3], [0.6, 0.5, 0.7]],
    )
