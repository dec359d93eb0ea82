"""Centered Kernel Alignment: plain estimators, Gram statistics computed once per layer, tiles.

Formulas: shared/docs/cka-formulas.md. Everything past the Gram matrix is float64.
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

__all__ = [
    "ESTIMATORS",
    "center_gram",
    "gram_linear",
    "hsic_biased",
    "hsic_unbiased",
    "linear_cka",
    "minibatch_cka",
    "one_hot",
    "u_center",
]
