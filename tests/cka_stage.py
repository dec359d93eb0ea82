"""One comparison through the CKA stage (`ckaflow.stages.cka`), as the tests call it."""

from ckaflow.stages.cka import Pair, compute_comparisons


def compute_tile(comparison, kind, a, b, rows, cols, estimator, out, bootstrap=0, seed=0):
    """Layers `rows` of Gram store a against `cols` of store b, as a tidy parquet at `out`."""
    pair = Pair(comparison, kind, str(a), str(b), rows, cols)
    return compute_comparisons([pair], str(out), estimator, bootstrap, seed, log=lambda _: None)
