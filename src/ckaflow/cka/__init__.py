"""Centered Kernel Alignment.

Plain estimators (`linear_cka`, `minibatch_cka`) are small functions in the papers' notation;
`cka_matrix` and the pipeline compute each representation's Gram statistics once
(`gram_stats`, optionally over several partitions of the examples: `passes`, `partition`) and
every pair from them. The formulas, one small function each, are in `ckaflow.cka.estimators`
(the README's CKA section says which paper each comes from).
"""

from ckaflow.cka.estimators import (
    ESTIMATORS,
    center_gram,
    gram_linear,
    hsic_biased,
    hsic_unbiased,
    linear_cka,
    minibatch_cka,
    one_hot,
    u_center,
)
from ckaflow.cka.grams import GramStats, gram_stats
from ckaflow.cka.matrix import cka_matrix
from ckaflow.cka.pairs import cka_between, cka_interval, cka_jackknife
from ckaflow.cka.partitions import partition, pass_permutation

__all__ = [
    "ESTIMATORS",
    "GramStats",
    "center_gram",
    "cka_between",
    "cka_interval",
    "cka_jackknife",
    "cka_matrix",
    "gram_linear",
    "gram_stats",
    "hsic_biased",
    "hsic_unbiased",
    "linear_cka",
    "minibatch_cka",
    "one_hot",
    "partition",
    "pass_permutation",
    "u_center",
]
