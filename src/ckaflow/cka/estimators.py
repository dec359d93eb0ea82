"""CKA estimators as small pure functions of arrays, in the papers' notation.

X (n × p), Y (n × q): two representations of the same n examples; K = X Xᵀ, L = Y Yᵀ.
H = I − (1/n) 1 1ᵀ. All arithmetic is float64.
"""

from __future__ import annotations

import numpy as np

# the estimators, one function each below; the config schema offers exactly these
ESTIMATORS = ("minibatch", "linear", "debiased", "rbf")
MIN_BATCH_ROWS = 4  # HSIC₁ divides by n − 3


def as_matrix(x) -> np.ndarray:
    """(n, ...) array-like -> (n, features) float64, one row per example."""
    if hasattr(x, "detach"):  # torch tensor; NumPy has no bfloat16
        x = x.detach().cpu()
        x = (x.double() if x.is_floating_point() else x).numpy()
    x = np.asarray(x)
    return x.reshape(len(x), -1).astype(np.float64, copy=False)


def gram_linear(x) -> np.ndarray:
    """K = X Xᵀ, computed from column-centred X (exactly the same CKA, better conditioned)."""
    x = as_matrix(x)
    x = x - x.mean(axis=0, keepdims=True)
    return x @ x.T


def center_gram(k: np.ndarray) -> np.ndarray:
    """H K H."""
    k = np.asarray(k, dtype=np.float64)
    k = k - k.mean(axis=0, keepdims=True)
    return k - k.mean(axis=1, keepdims=True)


def u_center(k: np.ndarray) -> np.ndarray:
    """U-centring (Székely & Rizzo 2014): zero the diagonal, subtract corrected row/col means."""
    k = np.array(k, dtype=np.float64)
    n = k.shape[0]
    np.fill_diagonal(k, 0)
    means = k.sum(axis=0) / (n - 2)
    means -= means.sum() / (2 * (n - 1))
    k -= means[:, None]
    k -= means[None, :]
    np.fill_diagonal(k, 0)
    return k


def hsic_biased(k: np.ndarray, l: np.ndarray) -> float:
    """HSIC₀(K, L) = tr(K H L H) / (n − 1)²."""
    n = k.shape[0]
    return float(np.sum(center_gram(k) * center_gram(l)) / (n - 1) ** 2)


def hsic_unbiased(k: np.ndarray, l: np.ndarray) -> float:
    """HSIC₁ (Song et al. 2012) with K̃, L̃ = K, L with zeroed diagonals:
    [tr(K̃ L̃) + (1ᵀK̃1)(1ᵀL̃1)/((n−1)(n−2)) − 2/(n−2) 1ᵀK̃L̃1] / (n(n−3))."""
    n = k.shape[0]
    if n < MIN_BATCH_ROWS:
        raise ValueError(f"unbiased HSIC needs n >= {MIN_BATCH_ROWS} examples, got {n}")
    kt = np.array(k, dtype=np.float64)
    lt = np.array(l, dtype=np.float64)
    np.fill_diagonal(kt, 0)
    np.fill_diagonal(lt, 0)
    trace = np.sum(kt * lt)
    totals = kt.sum() * lt.sum() / ((n - 1) * (n - 2))
    cross = 2 / (n - 2) * (kt.sum(axis=1) @ lt.sum(axis=1))
    return float((trace + totals - cross) / (n * (n - 3)))


def _cka(hsic_xy: float, hsic_xx: float, hsic_yy: float) -> float:
    """HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)); NaN (never a clamped number) when a side is
    constant and its HSIC is zero."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(np.float64(hsic_xy) / np.sqrt(np.float64(hsic_xx) * hsic_yy))


def linear_cka(x, y, *, debiased: bool = False) -> float:
    """Linear CKA (Kornblith et al. 2019); `debiased` uses U-centred Grams (unbiased HSIC)."""
    k, l = gram_linear(x), gram_linear(y)
    if len(k) != len(l):
        raise ValueError(f"x has {len(k)} examples but y has {len(l)}")
    if debiased:
        ku, lu = u_center(k), u_center(l)
        return _cka(np.sum(ku * lu), np.sum(ku * ku), np.sum(lu * lu))
    return _cka(hsic_biased(k, l), hsic_biased(k, k), hsic_biased(l, l))


def row_blocks(n: int, batch_size: int) -> list[slice]:
    """Consecutive row blocks of `batch_size`; a final block of fewer than 4 rows is dropped."""
    if batch_size < MIN_BATCH_ROWS:
        raise ValueError(f"batch_size must be >= {MIN_BATCH_ROWS}, got {batch_size}")
    blocks = [slice(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    return [b for b in blocks if b.stop - b.start >= MIN_BATCH_ROWS]


def minibatch_cka(x, y, *, batch_size: int) -> float:
    """Minibatch CKA (Nguyen, Raghu, Kornblith 2021): HSIC₁ summed over row blocks."""
    x, y = as_matrix(x), as_matrix(y)
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} examples but y has {len(y)}")
    xy = xx = yy = 0.0
    for block in row_blocks(len(x), batch_size):
        k, l = gram_linear(x[block]), gram_linear(y[block])
        xy += hsic_unbiased(k, l)
        xx += hsic_unbiased(k, k)
        yy += hsic_unbiased(l, l)
    return _cka(xy, xx, yy)


def one_hot(labels, num_classes: int) -> np.ndarray:
    """Labels as a representation: (n, num_classes) float64 one-hot matrix."""
    labels = np.asarray(labels).astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels must lie in 0..{num_classes - 1}, found {labels.min()}..{labels.max()}"
        )
    out = np.zeros((len(labels), num_classes))
    out[np.arange(len(labels)), labels] = 1
    return out
