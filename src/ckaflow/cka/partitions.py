"""How the examples are cut into blocks: one pass in stored order, or several passes over
seeded permutations (minibatch only; Nguyen, Raghu & Kornblith 2021 use 10).

Pass 0 cuts the examples into consecutive blocks in their stored order, pass p >= 1 cuts the
seeded permutation `pass_permutation(seed, p, n)` the same way. Blocks are pass-major; a
permutation depends on (seed, pass, n) only, so every layer, run, view and the labels share the
same partitions and CKA can pair blocks by position. Used by `ckaflow.cka.grams` and the Gram
stages.
"""

from __future__ import annotations

import hashlib

import numpy as np

from ckaflow.cka.estimators import ESTIMATORS, MIN_BATCH_ROWS, row_blocks


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


def pass_permutation(seed: int, pass_index: int, n: int) -> np.ndarray:
    """The order of the n examples in pass `pass_index`: the stored order for pass 0, else a
    permutation that depends on (seed, pass_index, n) only."""
    if pass_index == 0:
        return np.arange(n)
    return np.random.default_rng([int(seed), int(pass_index)]).permutation(n)


def partition(n: int, batch_size: int, passes: int = 1, seed: int = 0) -> list[np.ndarray]:
    """Row indices of every block of every pass, pass-major: each pass's order (see
    `pass_permutation`) cut like `row_blocks` — `batch_size` rows, a shorter last block, one of
    fewer than 4 rows dropped — so every pass has the same block sizes."""
    check_passes(passes, seed)
    blocks = row_blocks(n, batch_size)
    out = []
    for p in range(passes):
        order = pass_permutation(seed, p, n)
        out += [order[rows] for rows in blocks]
    return out


def partition_digest(blocks: list[np.ndarray]) -> str:
    """A short hash of the rows of every block, in order."""
    h = hashlib.sha256()
    for rows in blocks:
        h.update(np.asarray(rows, dtype="<i8").tobytes())
        h.update(b"|")
    return h.hexdigest()[:16]


def check_passes(passes: int, seed=0, estimator: str = "minibatch") -> None:
    """ValueError unless `passes` partitions with permutation `seed` suit the estimator."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator: unknown {estimator!r}; expected one of {ESTIMATORS}")
    if isinstance(passes, bool) or not isinstance(passes, (int, np.integer)) or passes < 1:
        raise ValueError(f"passes must be an integer >= 1, got {passes!r}")
    if passes > 1 and (not isinstance(seed, (int, np.integer)) or seed < 0):
        raise ValueError(f"the permutation seed must be an integer >= 0, got {seed!r}")
    if passes > 1 and estimator != "minibatch":
        raise ValueError(
            f"passes = {passes} needs the minibatch estimator, not {estimator}: the full-data "
            "estimators already use every pair of examples (set cka.passes to 1)"
        )
