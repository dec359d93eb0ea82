"""CKA of pairs of representations from their Gram statistics: values, the block bootstrap's
intervals and the jackknife, each a matrix over layer pairs at once.

Called by the CKA stage (`ckaflow.stages.cka`), `ckaflow.cka.matrix` and `ckaflow.compare`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from ckaflow.cka.grams import GramStats, block_vector, hsic_vector
from ckaflow.devices import resolve_device
from ckaflow.errors import ComparisonError

# ---------------------------------------------------------------------------------------------
# Pairs


def check_comparable(a: GramStats, b: GramStats) -> None:
    """Refuse (ComparisonError, a ValueError) two statistics whose blocks hold different rows."""
    if a.estimator != b.estimator:
        raise ComparisonError(f"{a.name} uses {a.estimator} statistics but {b.name} {b.estimator}")
    if a.partition_key != b.partition_key:
        raise ComparisonError(
            f"{a.name or 'a'} has {a.passes} passes (permutation seed {a.partition_seed}, "
            f"partition {a.digest}) but {b.name or 'b'} has {b.passes} (seed "
            f"{b.partition_seed}, partition {b.digest}): blocks are paired by position, so "
            "both sides need the same passes and seed (cka.passes, data.seed); rerun the gram stage"
        )
    if a.block_rows != b.block_rows:
        raise ComparisonError(
            f"{a.name or 'a'} has {a.n} examples in blocks {list(a.block_rows)}, "
            f"{b.name or 'b'} has {b.n} in {list(b.block_rows)}: compare the same examples"
        )


def cka_from_vectors(a: np.ndarray, b: np.ndarray, device: str = "cpu") -> np.ndarray:
    """CKA for every row of a (layers × d) against every row of b, in float64.

    No clamping: a constant representation (zero self-HSIC) gives NaN, honestly.
    """
    if device != "cpu":
        import torch

        dev = resolve_device(device)
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
    va = _stacked_vectors(stats_a)
    vb = va if stats_b is stats_a else _stacked_vectors(stats_b)
    return cka_from_vectors(va, vb, device)


def _stacked_vectors(stats: list[GramStats]) -> np.ndarray:
    """Every statistic's HSIC vector as a row of one matrix, each block's written in place (no
    per-layer vector and copy: for full-data Grams of 2,000 examples that is 32 MB a layer)."""
    rows = stats[0].block_rows
    out = np.empty((len(stats), sum(m * m for m in rows)))
    for row, s in zip(out, stats, strict=True):
        if "hsic_vector" in s.__dict__:  # already computed and cached
            row[:] = s.hsic_vector
            continue
        offset = 0
        for i, m in enumerate(rows):
            row[offset : offset + m * m] = block_vector(s.grams[i, :m, :m], s.estimator)
            offset += m * m
    return out


def block_terms(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One block's HSIC terms from its stacked block vectors a (La × m²) and b (Lb × m²):
    the (La, Lb) cross terms and the (La,) and (Lb,) self terms."""
    return a @ b.T, np.einsum("ij,ij->i", a, a), np.einsum("ij,ij->i", b, b)


@dataclass(frozen=True)
class BlockHSICs:
    """Per-block HSIC matrices of layers a × layers b: all that the minibatch estimator's value
    (sum over blocks, then normalise) and its block bootstrap need.

    cross: (blocks, La, Lb); self_a: (blocks, La); self_b: (blocks, Lb); the blocks pass-major
    as in `GramStats` (passes equal passes of blocks_per_pass blocks each).
    """

    cross: np.ndarray
    self_a: np.ndarray
    self_b: np.ndarray
    passes: int = 1

    @property
    def blocks_per_pass(self) -> int:
        return len(self.cross) // self.passes

    def cka(self) -> np.ndarray:
        """The minibatch CKA of every pair: HSIC summed over every block of every pass."""
        return _normalise(self.cross.sum(0), self.self_a.sum(0), self.self_b.sum(0))

    def jackknife(self) -> np.ndarray:
        """Delete-one-block replicates of every pair's CKA, (blocks of pass 0, La, Lb): block g
        of pass 0 left out in turn, shifted onto the k-pass estimate when passes > 1 (as in
        `interval`). The same block is left out of every layer, run and view, so an effect built
        from many CKA values has its own replicates and its image-sampling variance
        (G − 1)/G · Σ_g (T_g − T̄)² keeps the values' correlations. One block: NaN."""
        n_blocks = self.blocks_per_pass
        cross, self_a, self_b = (x[:n_blocks] for x in (self.cross, self.self_a, self.self_b))
        totals = cross.sum(0), self_a.sum(0), self_b.sum(0)
        out = np.full((n_blocks, *cross.shape[1:]), np.nan)
        if n_blocks < 2:
            return out
        for g in range(n_blocks):
            out[g] = _normalise(totals[0] - cross[g], totals[1] - self_a[g], totals[2] - self_b[g])
        if self.passes > 1:
            out += self.cka() - _normalise(*totals)
        return out

    def interval(
        self, *, bootstrap: int, seed: int = 0, level: float = 0.95
    ) -> tuple[np.ndarray, np.ndarray]:
        """The block bootstrap of `cka_interval` (minibatch): pass 0's blocks resampled, the
        interval shifted onto the k-pass estimate when passes > 1."""
        if bootstrap < 1:
            raise ValueError(f"bootstrap needs >= 1 replicate, got {bootstrap}")
        cross, self_a, self_b = self.cross, self.self_a, self.self_b
        rng = np.random.default_rng(seed)
        draws = np.empty((bootstrap, *cross.shape[1:]))
        n_blocks = self.blocks_per_pass  # pass 0's blocks
        for r in range(bootstrap):
            counts = np.bincount(rng.integers(0, n_blocks, n_blocks), minlength=n_blocks)
            draws[r] = _normalise(
                np.tensordot(counts, cross[:n_blocks], axes=1),
                counts @ self_a[:n_blocks],
                counts @ self_b[:n_blocks],
            )
        if self.passes > 1:
            first = BlockHSICs(cross[:n_blocks], self_a[:n_blocks], self_b[:n_blocks])
            draws += self.cka() - first.cka()
        return _percentiles(draws, level)


def block_hsics(stats: list[GramStats], other: list[GramStats]) -> BlockHSICs:
    """Per-block HSIC matrices of in-memory statistics (checked comparable by the caller)."""
    offsets = np.cumsum([0, *(m * m for m in stats[0].block_rows)])
    va = [s.hsic_vector for s in stats]  # stacked one block at a time: no copy of all blocks
    vb = [s.hsic_vector for s in other]
    cross, self_a, self_b = [], [], []
    for lo, hi in zip(offsets[:-1], offsets[1:], strict=True):
        terms = block_terms(np.stack([v[lo:hi] for v in va]), np.stack([v[lo:hi] for v in vb]))
        cross.append(terms[0])
        self_a.append(terms[1])
        self_b.append(terms[2])
    return BlockHSICs(np.stack(cross), np.stack(self_a), np.stack(self_b), stats[0].passes)


def _percentiles(draws: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """The two-sided `level` percentile interval of each pair's replicates (axis 0), NaN
    replicates left out. numpy's nanpercentile loops in Python over every pair, so only the
    pairs that have a NaN replicate (a constant layer) take it; the others take percentile,
    which gives the same numbers for rows without NaN."""
    tail = (1 - level) / 2 * 100
    q = [tail, 100 - tail]
    out = np.percentile(draws, q, axis=0)
    nan = np.isnan(draws).any(axis=0)
    if nan.any():
        with warnings.catch_warnings():  # an all-NaN pair stays NaN, without a warning
            warnings.simplefilter("ignore", RuntimeWarning)
            out[:, nan] = np.nanpercentile(draws[:, nan], q, axis=0)
    return out[0], out[1]


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

    minibatch with passes > 1: the blocks of different passes share examples, so resampling all
    passes × blocks as independent would give intervals too narrow by up to √passes. Only the
    blocks of pass 0 are resampled (a block bootstrap of the one-pass estimate), and the interval
    is shifted by (k-pass estimate − pass-0 estimate) to centre on the k-pass estimate. This is
    conservative: the k-pass estimate is an average over partitions of the same data, so its
    variance is at most that of a single pass (equal in the limit where the sampling of the
    examples, not their partition, dominates). With one pass it is exactly the plain block
    bootstrap.
    """
    if bootstrap < 1:
        raise ValueError(f"bootstrap needs >= 1 replicate, got {bootstrap}")
    for other in [*stats_a[1:], *stats_b]:
        check_comparable(stats_a[0], other)
    estimator = stats_a[0].estimator
    if estimator == "minibatch":
        return block_hsics(stats_a, stats_b).interval(bootstrap=bootstrap, seed=seed, level=level)
    rng = np.random.default_rng(seed)
    draws = np.empty((bootstrap, len(stats_a), len(stats_b)))
    if estimator in ("linear", "rbf"):
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
    return _percentiles(draws, level)


# Full-data estimators have one block; their jackknife leaves out one of this many consecutive
# groups of examples (in stored order) at a time.
FULL_DATA_GROUPS = 10


def cka_jackknife(stats_a: list[GramStats], stats_b: list[GramStats]) -> np.ndarray:
    """Delete-one-group replicates (groups, La, Lb) of every pair's CKA for the full-data
    estimators (`linear`, `debiased`, `rbf`): the examples cut into `FULL_DATA_GROUPS`
    consecutive groups, each left out of every layer in turn (its rows and columns of the n × n
    Gram; an RBF kernel keeps the bandwidth of all examples). For the minibatch estimator see
    `BlockHSICs.jackknife`. Memory: La + 1 centred Grams at a time."""
    for other in [*stats_a[1:], *stats_b]:
        check_comparable(stats_a[0], other)
    estimator, n = stats_a[0].estimator, stats_a[0].n
    if estimator == "minibatch":
        return block_hsics(stats_a, stats_b).jackknife()
    edges = np.linspace(0, n, FULL_DATA_GROUPS + 1).astype(int)
    out = np.empty((FULL_DATA_GROUPS, len(stats_a), len(stats_b)))
    for g in range(FULL_DATA_GROUPS):
        keep = np.r_[0 : edges[g], edges[g + 1] : n]

        def vector(stats: GramStats, keep=keep) -> np.ndarray:
            k = stats.grams[0][np.ix_(keep, keep)]
            return hsic_vector(k[None], (len(keep),), estimator)

        va = np.stack([vector(s) for s in stats_a])
        self_a = np.einsum("ij,ij->i", va, va)
        cross, self_b = np.empty((len(stats_a), len(stats_b))), np.empty(len(stats_b))
        same = {id(s): i for i, s in enumerate(stats_a)}  # a layer on both sides: once
        for j, s in enumerate(stats_b):
            vb = va[same[id(s)]] if id(s) in same else vector(s)
            cross[:, j], self_b[j] = va @ vb, vb @ vb
        out[g] = _normalise(cross, self_a, self_b)
    return out
