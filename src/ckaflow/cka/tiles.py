"""CKA tiles: all layer pairs of a block of rows × a block of columns, from stored Grams.

Per layer, each block's Gram is transformed once (U-centred for the unbiased HSIC, double-centred
for the biased one) and flattened with the HSIC normalisation folded in; then every pair's HSIC
is one inner product, and a whole tile is one float64 matrix product.
"""

from __future__ import annotations

import numpy as np

from ckaflow.cka.estimators import center_gram, u_center
from ckaflow.errors import TileError


def hsic_vectors(grams: np.ndarray, block_rows: list[int], estimator: str) -> np.ndarray:
    """One layer's (blocks, b, b) Grams -> a vector v with HSIC(K, L) = v_K · v_L."""
    parts = []
    for i, m in enumerate(block_rows):
        k = grams[i, :m, :m]
        if estimator == "linear":
            parts.append(center_gram(k).ravel() / (m - 1))  # HSIC₀ = ⟨HKH, HLH⟩/(m−1)²
        else:  # minibatch and debiased: HSIC₁ = ⟨U(K), U(L)⟩ / (m(m−3))
            parts.append(u_center(k).ravel() / np.sqrt(m * (m - 3)))
    return np.concatenate(parts)


def cka_from_vectors(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """CKA for every row of a (layers × d) against every row of b, in float64.

    No clamping: a layer with zero HSIC (a constant representation) gives NaN, honestly.
    """
    cross = a @ b.T
    self_a = np.einsum("ij,ij->i", a, a)
    self_b = np.einsum("ij,ij->i", b, b)
    with np.errstate(invalid="ignore", divide="ignore"):
        return cross / np.sqrt(np.outer(self_a, self_b))


# ---------------------------------------------------------------------------------------------
# The tile stage


def _side_columns(attrs: dict, layer: dict, suffix: str) -> dict:
    run = attrs.get("run_spec") or {}
    model = run.get("model") or {}
    return {
        f"run_{suffix}": attrs["run"],
        f"method_{suffix}": run.get("method"),
        f"arch_{suffix}": model.get("arch"),
        f"seed_{suffix}": run.get("seed"),
        f"view_{suffix}": attrs["view"],
        f"layer_{suffix}": layer["name"],
        f"layer_index_{suffix}": layer["index"],
        f"layer_kind_{suffix}": layer["kind"],
        f"stage_{suffix}": layer["stage"],
        f"block_{suffix}": layer["block"],
    }


def _check_alignment(a, b) -> None:
    if a.attrs["example_ids"] != b.attrs["example_ids"]:
        raise TileError(
            f"{a.path} and {b.path} hold different examples or a different row order; "
            "CKA needs the same examples in the same order on both sides"
        )
    if a.attrs["block_rows"] != b.attrs["block_rows"]:
        raise TileError(
            f"{a.path} has row blocks {a.attrs['block_rows']} but {b.path} has "
            f"{b.attrs['block_rows']}; recompute both with the same estimator and batch size"
        )


def compute_tile(
    comparison: str,
    kind: str,
    gram_a: str,
    gram_b: str,
    rows: range,
    cols: range,
    estimator: str,
    out: str,
) -> None:
    """CKA of layers `rows` of side a against layers `cols` of side b, as a tidy parquet."""
    import pandas as pd

    from ckaflow.cka.gram import open_gram
    from ckaflow.provenance import atomic_path, code_version

    a, b = open_gram(gram_a), open_gram(gram_b)
    _check_alignment(a, b)
    block_rows = a.attrs["block_rows"]
    layers_a = [a.layers[i] for i in rows]
    layers_b = [b.layers[j] for j in cols]
    vec_a = np.stack([hsic_vectors(a[la["name"]][...], block_rows, estimator) for la in layers_a])
    vec_b = np.stack([hsic_vectors(b[lb["name"]][...], block_rows, estimator) for lb in layers_b])
    values = cka_from_vectors(vec_a, vec_b)
    records = []
    for i, la in enumerate(layers_a):
        for j, lb in enumerate(layers_b):
            records.append(
                {
                    "comparison": comparison,
                    "kind": kind,
                    **_side_columns(a.attrs, la, "a"),
                    **_side_columns(b.attrs, lb, "b"),
                    "estimator": estimator,
                    "batch_size": a.attrs["estimator_block"],
                    "n": int(sum(block_rows)),
                    "value": float(values[i, j]),
                }
            )
    frame = pd.DataFrame.from_records(records).assign(
        source_a=str(gram_a), source_b=str(gram_b), code_version=code_version()
    )
    with atomic_path(out) as scratch:
        frame.to_parquet(scratch, index=False)
