"""`cka_matrix`: every pair of two lists of representations, each Gram computed once: the
library entry point on arrays (the workflow and `ckaflow.compare` use `grams` and `pairs`)."""

from __future__ import annotations

import numpy as np

from ckaflow.cka.grams import GramStats, gram_stats
from ckaflow.cka.pairs import cka_between


def _names(reps) -> list[str]:
    if isinstance(reps, dict):
        return list(reps)
    return [f"#{i}" for i in range(len(reps))]


def _values(reps) -> list:
    return list(reps.values()) if isinstance(reps, dict) else list(reps)


def _example_ids(rep):
    attrs = getattr(rep, "attrs", None)
    if attrs is None:
        return None
    ids = attrs.get("example_ids")
    return None if ids is None else list(ids)


def _check_rows(reps, names) -> None:
    """Same n everywhere, and the same example order where Zarr metadata records it."""
    ref_name, ref = names[0], reps[0]
    for name, rep in zip(names[1:], reps[1:], strict=True):
        if rep.shape[0] != ref.shape[0]:
            raise ValueError(
                f"{name} has {rep.shape[0]} examples but {ref_name} has {ref.shape[0]}"
            )
        ids, ref_ids = _example_ids(rep), _example_ids(ref)
        if ids is not None and ref_ids is not None and ids != ref_ids:
            raise ValueError(f"{name} and {ref_name} hold different examples or row order")


def stats_of(reps, *, estimator: str, batch_size: int, device: str = "auto") -> list[GramStats]:
    names, values = _names(reps), _values(reps)
    return [
        gram_stats(v, estimator=estimator, batch_size=batch_size, device=device, name=name)
        for name, v in zip(names, values, strict=True)
    ]


def cka_matrix(
    reps_a,
    reps_b=None,
    *,
    estimator: str = "minibatch",
    batch_size: int = 256,
    device: str = "auto",
) -> np.ndarray:
    """CKA of every representation in reps_a against every one in reps_b (default: reps_a).

    reps: a list or a dict (name -> array) of (n, ...) arrays — NumPy, torch or Zarr (read chunk
    by chunk). Returns a float64 array of shape (len(reps_a), len(reps_b)).
    """
    _check_rows(_values(reps_a) + _values(reps_b or {}), _names(reps_a) + _names(reps_b or {}))
    stats_a = stats_of(reps_a, estimator=estimator, batch_size=batch_size, device=device)
    if reps_b is None:
        return cka_between(stats_a, stats_a, device)
    stats_b = stats_of(reps_b, estimator=estimator, batch_size=batch_size, device=device)
    return cka_between(stats_a, stats_b, device)
