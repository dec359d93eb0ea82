"""Gram statistics: computed once per representation, then every pair from them.

`gram_stats(x)` reads a representation block by block (a NumPy or torch array, or a Zarr array
read chunk by chunk) and keeps, per block of rows, the kernel Gram matrix in float64. The GEMM
that forms it runs in the input's precision (float32 for float32/bfloat16/float16 input, on a GPU
when one is present) on column-centred rows; every later sum is float64.

Each block's Gram is then transformed once — U-centred for the unbiased HSIC (`minibatch`,
`debiased`), double-centred for the biased one (`linear`, `rbf`) — and flattened with the HSIC
normalisation folded in, so that HSIC(K, L) is one dot product and a whole matrix of pairs one
matrix product.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from ckaflow.cka.estimators import MIN_BATCH_ROWS, center_gram, row_blocks, u_center

ESTIMATORS = ("minibatch", "linear", "debiased", "rbf")
UNBIASED = ("minibatch", "debiased")
RBF_SIGMA_FRACTION = 0.8  # of the median pairwise distance, as in Kornblith et al.'s code


@dataclass(frozen=True)
class GramStats:
    """Per-block Gram matrices of one representation.

    grams: (blocks, b, b) float64, a shorter last block zero-padded; block_rows: its true sizes.
    """

    estimator: str
    grams: np.ndarray
    block_rows: tuple[int, ...]
    name: str = ""
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def n(self) -> int:
        return int(sum(self.block_rows))

    @cached_property
    def hsic_vector(self) -> np.ndarray:
        """v with HSIC(K, L) = v_K · v_L (the estimator's HSIC, summed over blocks)."""
        return hsic_vector(self.grams, self.block_rows, self.estimator)


def block_sizes(estimator: str, n: int, batch_size: int) -> list[slice]:
    """Row blocks: `batch_size` rows for the minibatch estimator, all rows otherwise."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; expected one of {ESTIMATORS}")
    if estimator == "minibatch":
        blocks = row_blocks(n, batch_size)
    else:
        blocks = [slice(0, n)] if n >= MIN_BATCH_ROWS else []
    if not blocks:
        raise ValueError(
            f"{n} examples are too few for the {estimator} estimator "
            f"(it needs at least one block of >= {MIN_BATCH_ROWS} rows)"
        )
    return blocks


def hsic_vector(grams: np.ndarray, block_rows, estimator: str) -> np.ndarray:
    parts = []
    for i, m in enumerate(block_rows):
        k = grams[i, :m, :m]
        if estimator in UNBIASED:  # HSIC₁ = ⟨U(K), U(L)⟩ / (m(m−3))
            parts.append(u_center(k).ravel() / np.sqrt(m * (m - 3)))
        else:  # HSIC₀ = ⟨HKH, HLH⟩ / (m−1)²
            parts.append(center_gram(k).ravel() / (m - 1))
    return np.concatenate(parts)


# ---------------------------------------------------------------------------------------------
# Computing the statistics


def _torch_device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _rows_reader(x) -> tuple[int, Callable[[slice], np.ndarray]]:
    """(n, read(rows) -> array) for NumPy, torch and Zarr arrays alike; Zarr is read lazily."""
    import torch

    if hasattr(x, "detach"):  # torch tensor; NumPy has no bfloat16
        x = x.detach().cpu()
        x = (x.float() if x.dtype in (torch.bfloat16, torch.float16) else x).numpy()
    if not hasattr(x, "shape"):
        x = np.asarray(x)
    return int(x.shape[0]), lambda rows: np.asarray(x[rows])


class _Workspace:
    """Rows centred on the device, in reusable buffers.

    Reusing the buffers matters: a fresh 50 MB tensor per block costs page faults worth a third
    of the GEMM. The centre only has to bring values near zero so that a float32 GEMM keeps its
    precision; any leftover constant shift per column is removed exactly by the centring of the
    Gram (double- or U-centring), so a float32 mean is enough.
    """

    def __init__(self, device):
        self.device = device
        self.buffers: dict = {}

    def centred(self, values: np.ndarray, centre, slot: int = 0):
        import torch

        values = values.reshape(len(values), -1)
        dtype = torch.float64 if values.dtype == np.float64 else torch.float32
        src = torch.from_numpy(np.ascontiguousarray(values)).to(self.device, dtype)
        if centre is None:
            centre = src.mean(0)
        key = (slot, tuple(src.shape), dtype)
        if key not in self.buffers:
            self.buffers[key] = torch.empty_like(src)
        return torch.sub(src, centre.to(self.device, dtype), out=self.buffers[key])


def _gram_block(a, b) -> np.ndarray:
    return (a @ b.T).double().cpu().numpy()


def _check_finite(k: np.ndarray, read, rows: slice, name: str) -> None:
    """A non-finite input value makes its row's Gram diagonal non-finite: check the small Gram,
    and only on failure count the bad values in the data."""
    if np.isfinite(k).all():
        return
    values = np.asarray(read(rows))
    bad = int((~np.isfinite(values)).sum())
    raise ValueError(
        f"{name or 'representation'}: {bad} non-finite values (NaN or Inf) in rows "
        f"{rows.start}..{rows.stop - 1}"
    )


def gram_stats(
    x,
    *,
    estimator: str = "minibatch",
    batch_size: int = 256,
    device: str = "auto",
    name: str = "",
) -> GramStats:
    """Gram statistics of one representation x (n, ...), read block by block.

    For the full-data estimators (`linear`, `debiased`, `rbf`) the n × n Gram is assembled from
    pairs of `batch_size`-row chunks after one pass for the column mean, so peak memory is two
    chunks plus the Gram, whatever the feature count.
    """
    if batch_size < MIN_BATCH_ROWS:
        raise ValueError(f"batch_size must be >= {MIN_BATCH_ROWS}, got {batch_size}")
    n, read = _rows_reader(x)
    blocks = block_sizes(estimator, n, batch_size)
    work = _Workspace(_torch_device(device))
    size = blocks[0].stop - blocks[0].start
    grams = np.zeros((len(blocks), size, size))
    for i, rows in enumerate(blocks):
        if estimator == "minibatch":
            t = work.centred(read(rows), None)
            k = _gram_block(t, t)
        else:
            k = _streamed_gram(read, rows, batch_size, work)
        _check_finite(k, read, rows, name)
        if estimator == "rbf":
            k = rbf_from_linear(k)
        m = rows.stop - rows.start
        grams[i, :m, :m] = k
    return GramStats(estimator, grams, tuple(b.stop - b.start for b in blocks), name)


def _streamed_gram(read, rows: slice, chunk: int, work: _Workspace) -> np.ndarray:
    """K over all rows from pairs of row chunks (chunk j is re-read, never kept), every chunk
    centred on the same column mean."""
    import torch

    chunks = [slice(s, min(s + chunk, rows.stop)) for s in range(rows.start, rows.stop, chunk)]
    total = None
    for c in chunks:
        values = read(c)
        part = values.reshape(len(values), -1).sum(axis=0, dtype=np.float64)
        total = part if total is None else total + part
    centre = torch.from_numpy(total / (rows.stop - rows.start))
    n = rows.stop - rows.start
    k = np.zeros((n, n))
    for i, ci in enumerate(chunks):
        ti = work.centred(read(ci), centre, slot=0)
        for cj in chunks[: i + 1]:
            tj = ti if cj == ci else work.centred(read(cj), centre, slot=1)
            block = _gram_block(ti, tj)
            k[ci, cj] = block
            k[cj, ci] = block.T
    return k


def rbf_from_linear(k: np.ndarray, fraction: float = RBF_SIGMA_FRACTION) -> np.ndarray:
    """RBF Gram exp(−‖xᵢ − xⱼ‖² / (2σ²)) with σ = fraction × median pairwise distance."""
    diag = np.diag(k)
    sq = np.maximum(diag[:, None] + diag[None, :] - 2 * k, 0)
    sigma2 = fraction**2 * np.median(sq)
    if sigma2 <= 0:
        return np.ones_like(k)  # all points equal: a constant kernel, whose HSIC is zero
    return np.exp(-sq / (2 * sigma2))


# ---------------------------------------------------------------------------------------------
# Pairs


def check_comparable(a: GramStats, b: GramStats) -> None:
    if a.estimator != b.estimator:
        raise ValueError(f"{a.name} uses {a.estimator} statistics but {b.name} {b.estimator}")
    if a.block_rows != b.block_rows:
        raise ValueError(
            f"{a.name or 'a'} has {a.n} examples in blocks {list(a.block_rows)}, "
            f"{b.name or 'b'} has {b.n} in {list(b.block_rows)}: compare the same examples"
        )


def cka_from_vectors(a: np.ndarray, b: np.ndarray, device: str = "cpu") -> np.ndarray:
    """CKA for every row of a (layers × d) against every row of b, in float64.

    No clamping: a constant representation (zero self-HSIC) gives NaN, honestly.
    """
    if device != "cpu":
        import torch

        dev = _torch_device(device)
        if dev.type != "cpu":
            ta = torch.from_numpy(a).to(dev)
            tb = torch.from_numpy(b).to(dev)
            cross = (ta @ tb.T).cpu().numpy()
            self_a = (ta * ta).sum(1).cpu().numpy()
            self_b = (tb * tb).sum(1).cpu().numpy()
            return _normalise(cross, self_a, self_b)
    return _normalise(a @ b.T, np.einsum("ij,ij->i", a, a), np.einsum("ij,ij->i", b, b))


def _normalise(cross, self_a, self_b) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return cross / np.sqrt(np.outer(self_a, self_b))


def cka_between(
    stats_a: list[GramStats], stats_b: list[GramStats], device: str = "cpu"
) -> np.ndarray:
    for other in [*stats_a[1:], *stats_b]:
        check_comparable(stats_a[0], other)
    va = np.stack([s.hsic_vector for s in stats_a])
    vb = va if stats_b is stats_a else np.stack([s.hsic_vector for s in stats_b])
    return cka_from_vectors(va, vb, device)


def _block_hsics(stats: list[GramStats], other: list[GramStats]):
    """Per-block HSIC matrices: (blocks, La, Lb) cross terms and (blocks, L) self terms."""
    offsets = np.cumsum([0, *(m * m for m in stats[0].block_rows)])
    va = np.stack([s.hsic_vector for s in stats])
    vb = np.stack([s.hsic_vector for s in other])
    cross, self_a, self_b = [], [], []
    for lo, hi in zip(offsets[:-1], offsets[1:], strict=True):
        a, b = va[:, lo:hi], vb[:, lo:hi]
        cross.append(a @ b.T)
        self_a.append(np.einsum("ij,ij->i", a, a))
        self_b.append(np.einsum("ij,ij->i", b, b))
    return np.stack(cross), np.stack(self_a), np.stack(self_b)


def cka_interval(
    stats_a: list[GramStats],
    stats_b: list[GramStats],
    *,
    bootstrap: int,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval (low, high) of every pair's CKA, from stored statistics.

    minibatch: the row blocks are resampled with replacement — each block's HSIC is an unbiased
    estimate on its own, so the resampled sums keep the estimator's form. linear, rbf: examples
    are resampled with replacement (the biased HSIC is a V-statistic, so repeated examples are
    legitimate). debiased: refused — a resampled U-statistic would pair an example with its own
    copy, which inflates every value.
    """
    if bootstrap < 1:
        raise ValueError(f"bootstrap needs >= 1 replicate, got {bootstrap}")
    for other in [*stats_a[1:], *stats_b]:
        check_comparable(stats_a[0], other)
    estimator = stats_a[0].estimator
    rng = np.random.default_rng(seed)
    draws = np.empty((bootstrap, len(stats_a), len(stats_b)))
    if estimator == "minibatch":
        cross, self_a, self_b = _block_hsics(stats_a, stats_b)
        n_blocks = len(cross)
        for r in range(bootstrap):
            counts = np.bincount(rng.integers(0, n_blocks, n_blocks), minlength=n_blocks)
            draws[r] = _normalise(
                np.tensordot(counts, cross, axes=1), counts @ self_a, counts @ self_b
            )
    elif estimator in ("linear", "rbf"):
        n = stats_a[0].n
        for r in range(bootstrap):
            idx = rng.integers(0, n, n)

            def vector(stats: GramStats, idx=idx) -> np.ndarray:
                k = stats.grams[0][np.ix_(idx, idx)]
                return hsic_vector(k[None], (n,), estimator)

            draws[r] = cka_from_vectors(
                np.stack([vector(s) for s in stats_a]), np.stack([vector(s) for s in stats_b])
            )
    else:
        raise ValueError(
            f"bootstrap intervals are not defined for the {estimator} estimator; "
            "use minibatch (blocks are resampled) or linear/rbf (examples are resampled)"
        )
    tail = (1 - level) / 2 * 100
    return np.nanpercentile(draws, tail, axis=0), np.nanpercentile(draws, 100 - tail, axis=0)
