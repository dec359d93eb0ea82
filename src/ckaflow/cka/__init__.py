"""Centered Kernel Alignment: the math, on NumPy arrays and torch tensors, free of the workflow.

Plain estimators (`linear_cka`, `minibatch_cka`) are small functions in the papers' notation
(`estimators`; docs/design.md's Numerics section says which paper each comes from). `cka_matrix`
and the workflow compute each representation's Gram statistics once (`grams.gram_stats`,
optionally over several partitions of the examples: `partitions`) and every pair from them
(`pairs`: values, bootstrap intervals, jackknife). Used by the Gram and CKA stages
(`ckaflow.stages`), `ckaflow.compare` and any user code.
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
