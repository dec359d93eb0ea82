"""CKA estimators against independent float64 implementations of shared/docs/cka-formulas.md."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckaflow import cka
from ckaflow.cka.grams import hsic_vector
from ckaflow.cka.pairs import cka_from_vectors


def _rng(seed=0):
    return np.random.default_rng(seed)


def _pair(n=40, p=30, q=20, seed=0):
    r = _rng(seed)
    x = r.normal(size=(n, p))
    y = np.tanh(x @ r.normal(size=(p, q))) + 0.5 * r.normal(size=(n, q))
    return x, y


# -- reference implementations, written from the formulas, independent of ckaflow ----------------


def ref_biased_cka(x, y):
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    k, l_ = x @ x.T, y @ y.T

    def hsic(a, b):
        return np.trace(a @ h @ b @ h) / (n - 1) ** 2

    return hsic(k, l_) / np.sqrt(hsic(k, k) * hsic(l_, l_))


def ref_feature_space_cka(x, y):
    x = x - x.mean(0)
    y = y - y.mean(0)
    return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def ref_hsic1(k, l_):
    n = len(k)
    kt, lt = k.copy(), l_.copy()
    np.fill_diagonal(kt, 0)
    np.fill_diagonal(lt, 0)
    one = np.ones(n)
    return (
        np.trace(kt @ lt)
        + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
        - 2 / (n - 2) * one @ kt @ lt @ one
    ) / (n * (n - 3))


def ref_minibatch_cka(x, y, b):
    xy = xx = yy = 0.0
    for s in range(0, len(x), b):
        xs, ys = x[s : s + b], y[s : s + b]
        if len(xs) < 4:
            continue
        k, l_ = xs @ xs.T, ys @ ys.T
        xy += ref_hsic1(k, l_)
        xx += ref_hsic1(k, k)
        yy += ref_hsic1(l_, l_)
    return xy / np.sqrt(xx * yy)


def ref_debiased_cka(x, y):
    k, l_ = x @ x.T, y @ y.T
    return ref_hsic1(k, l_) / np.sqrt(ref_hsic1(k, k) * ref_hsic1(l_, l_))


# -- agreement ------------------------------------------------------------------------------------


def test_linear_cka_matches_both_reference_forms():
    x, y = _pair()
    assert cka.linear_cka(x, y) == pytest.approx(ref_biased_cka(x, y), abs=1e-8)
    assert cka.linear_cka(x, y) == pytest.approx(ref_feature_space_cka(x, y), abs=1e-8)


def test_debiased_cka_matches_unbiased_hsic_reference():
    x, y = _pair()
    assert cka.linear_cka(x, y, debiased=True) == pytest.approx(ref_debiased_cka(x, y), abs=1e-8)


def test_u_centring_inner_product_is_the_unbiased_hsic():
    x, y = _pair()
    k, l_ = x @ x.T, y @ y.T
    n = len(k)
    via_u = np.sum(cka.u_center(k) * cka.u_center(l_)) / (n * (n - 3))
    assert via_u == pytest.approx(ref_hsic1(k, l_), rel=1e-10)
    assert cka.hsic_unbiased(k, l_) == pytest.approx(ref_hsic1(k, l_), rel=1e-10)


def test_minibatch_cka_matches_reference_with_ragged_last_block():
    x, y = _pair(n=103)
    expected = ref_minibatch_cka(x, y, 25)  # blocks of 25, 25, 25, 25 and a dropped 3
    assert cka.minibatch_cka(x, y, batch_size=25) == pytest.approx(expected, abs=1e-8)


def test_minibatch_with_one_batch_equals_debiased_cka():
    x, y = _pair(n=50)
    assert cka.minibatch_cka(x, y, batch_size=50) == pytest.approx(
        cka.linear_cka(x, y, debiased=True), abs=1e-10
    )


def test_float32_input_with_large_offset_stays_accurate():
    x, y = _pair(n=64)
    exact = ref_minibatch_cka(x - x.mean(0), y - y.mean(0), 32)
    x32 = (x + 1000).astype(np.float32)
    y32 = (y + 1000).astype(np.float32)
    got = cka.minibatch_cka(x32, y32, batch_size=32)
    exact32 = ref_minibatch_cka(
        x32.astype(np.float64) - x32.astype(np.float64).mean(0),
        y32.astype(np.float64) - y32.astype(np.float64).mean(0),
        32,
    )
    assert got == pytest.approx(exact32, abs=1e-6)
    assert got == pytest.approx(exact, abs=1e-3)  # float32 storage itself costs ~1e-4 here


def test_tile_math_equals_the_plain_estimators():
    """The fast path (one transformed Gram vector per layer, a matrix product per tile) gives
    the same numbers as the plain functions, for every estimator."""
    r = _rng(3)
    reps = [r.normal(size=(90, d)) for d in (5, 12, 30)]
    reps.append(np.maximum(reps[2] @ r.normal(size=(30, 8)), 0))
    cases = {
        "minibatch": (30, lambda a, b: cka.minibatch_cka(a, b, batch_size=30)),
        "debiased": (90, lambda a, b: cka.linear_cka(a, b, debiased=True)),
        "linear": (90, lambda a, b: cka.linear_cka(a, b)),
    }
    for estimator, (block, plain) in cases.items():
        blocks = cka.estimators.row_blocks(90, block)
        sizes = [b.stop - b.start for b in blocks]
        vectors = []
        for rep in reps:
            grams = np.stack([cka.gram_linear(rep[b]) for b in blocks])
            vectors.append(hsic_vector(grams, sizes, estimator))
        matrix = cka_from_vectors(np.stack(vectors), np.stack(vectors))
        expected = np.array([[plain(a, b) for b in reps] for a in reps])
        np.testing.assert_allclose(matrix, expected, atol=1e-8, err_msg=estimator)


def test_constant_representation_gives_nan_not_a_clamped_number():
    x = np.ones((20, 3))
    y = _rng().normal(size=(20, 4))
    assert np.isnan(cka.linear_cka(x, y))


def test_bad_batch_size_and_mismatched_rows_are_refused():
    x, y = _pair()
    with pytest.raises(ValueError, match="batch_size must be >= 4"):
        cka.minibatch_cka(x, y, batch_size=3)
    with pytest.raises(ValueError, match="examples"):
        cka.minibatch_cka(x, y[:-1], batch_size=10)


def test_one_hot_labels():
    assert cka.one_hot([2, 0], 3).tolist() == [[0, 0, 1], [1, 0, 0]]
    with pytest.raises(ValueError, match="labels must lie in 0..2"):
        cka.one_hot([3], 3)


# -- properties -----------------------------------------------------------------------------------

shapes = st.tuples(st.integers(8, 30), st.integers(2, 12), st.integers(2, 12))


@settings(max_examples=25, deadline=None)
@given(shapes, st.integers(0, 2**31 - 1), st.floats(0.1, 50))
def test_cka_properties(shape, seed, scale):
    n, p, q = shape
    r = _rng(seed)
    x = r.normal(size=(n, p))
    y = x[:, :1] * r.normal(size=(1, q)) + r.normal(size=(n, q))
    q_mat, _ = np.linalg.qr(r.normal(size=(p, p)))
    for debiased in (False, True):
        value = cka.linear_cka(x, y, debiased=debiased)
        assert cka.linear_cka(x, x, debiased=debiased) == pytest.approx(1, abs=1e-9)
        assert cka.linear_cka(y, x, debiased=debiased) == pytest.approx(value, abs=1e-9)
        assert cka.linear_cka(scale * x @ q_mat, y, debiased=debiased) == pytest.approx(
            value, abs=1e-8
        )
    biased = cka.linear_cka(x, y)
    assert -1e-12 <= biased <= 1 + 1e-12
