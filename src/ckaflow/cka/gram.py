"""The Gram stage: each layer's per-block Gram matrices, computed once and stored.

Every CKA pair is later computed from these, never from the activations again. A store at
`results/gram/<run>/<view>.zarr` holds, per layer, an array (blocks, b, b) of float64 Gram
matrices K = X Xᵀ of consecutive row blocks (X centred per block, which changes no estimator);
a shorter last block is zero-padded and its true size kept in `block_rows`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

from ckaflow.activations import check_finite, open_store
from ckaflow.cka.estimators import MIN_BATCH_ROWS, gram_linear, one_hot, row_blocks
from ckaflow.errors import StoreError
from ckaflow.layers import label_layer
from ckaflow.provenance import atomic_path, provenance

GRAM_KIND = "ckaflow.gram"


def block_size_for(estimator: str, batch_size: int, n: int) -> int:
    """Minibatch CKA uses blocks of `batch_size`; the full-data estimators one block of n."""
    return batch_size if estimator == "minibatch" else n


def layer_grams(read_rows, n: int, block: int, where: str) -> np.ndarray:
    """(blocks, block, block) float64 Gram matrices from `read_rows(slice) -> (rows, features)`."""
    blocks = row_blocks(n, block)
    if not blocks:
        raise StoreError(f"{where}: {n} examples is too few for CKA (need >= {MIN_BATCH_ROWS})")
    out = np.zeros((len(blocks), block, block))
    for i, rows in enumerate(blocks):
        values = np.asarray(read_rows(rows))
        check_finite(values, where)
        m = rows.stop - rows.start
        out[i, :m, :m] = gram_linear(values)
    return out


def _write(out: Path, grams: dict[str, np.ndarray], block_rows: list[int], attrs: dict) -> Path:
    with atomic_path(out) as scratch:
        group = zarr.open_group(scratch, mode="w", zarr_format=3)
        for name, values in grams.items():
            arr = group.create_array(
                name, shape=values.shape, chunks=(1, *values.shape[1:]), dtype="float64"
            )
            arr[...] = values
        group.attrs.update(provenance(kind=GRAM_KIND, block_rows=block_rows, **attrs))
        group.attrs["complete"] = True
    return out


def gram_store(activations: str | Path, out: str | Path, estimator: str, batch_size: int) -> Path:
    """Gram statistics of every layer of one activation store."""
    store = open_store(activations)
    n = store.attrs["n_examples"]
    block = block_size_for(estimator, batch_size, n)
    grams = {}
    for layer in store.layers:
        arr = store[layer["name"]]
        where = f"{store.path} layer {layer['name']}"
        grams[layer["name"]] = layer_grams(lambda rows, a=arr: a[rows], n, block, where)
    keep = ("run", "run_spec", "view", "layers", "example_ids", "model_spec_hash")
    attrs = {k: store.attrs[k] for k in keep}
    return _write(
        Path(out),
        grams,
        [r.stop - r.start for r in row_blocks(n, block)],
        {**attrs, "estimator_block": block, "source": str(store.path)},
    )


def label_gram_store(
    data_path: str | Path, out: str | Path, estimator: str, batch_size: int
) -> Path:
    """Gram statistics of the one-hot eval labels (class structure as a representation)."""
    from ckaflow.data import open_prepared

    data = open_prepared(data_path)
    labels = one_hot(data.eval_labels(), data.attrs["num_classes"])
    n = len(labels)
    block = block_size_for(estimator, batch_size, n)
    grams = {"labels": layer_grams(lambda rows: labels[rows], n, block, f"{data_path} labels")}
    attrs = {
        "run": "labels",
        "run_spec": None,
        "view": "labels",
        "layers": [label_layer().as_dict()],
        "example_ids": data.group["eval/ids"][...].tolist(),
        "estimator_block": block,
        "source": str(data_path),
    }
    return _write(Path(out), grams, [r.stop - r.start for r in row_blocks(n, block)], attrs)


def open_gram(path: str | Path):
    return open_store(path, kind=GRAM_KIND)
