"""The Gram stage: each layer's Gram statistics, computed once and stored.

Every CKA pair is later computed from these, never from the activations again. A store at
`results/gram/<run>/<view>.zarr` holds, per layer, the (blocks, b, b) float64 Grams of
`ckaflow.cka.stats.GramStats`, with `block_rows` and the estimator in its attributes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

from ckaflow.activations import open_store
from ckaflow.cka.estimators import one_hot
from ckaflow.cka.stats import GramStats, gram_stats
from ckaflow.errors import StoreError
from ckaflow.layers import label_layer
from ckaflow.provenance import atomic_path, provenance

GRAM_KIND = "ckaflow.gram"


def _stats(values, estimator: str, batch_size: int, device: str, where: str) -> GramStats:
    try:
        return gram_stats(
            values, estimator=estimator, batch_size=batch_size, device=device, name=where
        )
    except ValueError as err:  # non-finite values, too few examples: name the store and layer
        raise StoreError(str(err)) from err


def write_gram_store(out: Path, stats: dict[str, GramStats], attrs: dict) -> Path:
    first = next(iter(stats.values()))
    with atomic_path(out) as scratch:
        group = zarr.open_group(scratch, mode="w", zarr_format=3)
        for name, s in stats.items():
            arr = group.create_array(
                name,
                shape=s.grams.shape,
                chunks=(1, *s.grams.shape[1:]),
                dtype="float64",
                config={"write_empty_chunks": True},  # every chunk on disk: see check_chunks
            )
            arr[...] = s.grams
        group.attrs.update(
            provenance(
                kind=GRAM_KIND,
                estimator=first.estimator,
                block_rows=list(first.block_rows),
                **attrs,
            )
        )
        group.attrs["complete"] = True
    return out


def gram_store(
    activations: str | Path,
    out: str | Path,
    estimator: str,
    batch_size: int,
    device: str = "auto",
) -> Path:
    """Gram statistics of every layer of one activation store, read chunk by chunk."""
    store = open_store(activations)
    stats = {
        layer["name"]: _stats(
            store[layer["name"]],
            estimator,
            batch_size,
            device,
            f"{store.path} layer {layer['name']}",
        )
        for layer in store.layers
    }
    keep = ("run", "run_spec", "view", "layers", "example_ids", "model_spec_hash")
    attrs = {k: store.attrs[k] for k in keep}
    return write_gram_store(Path(out), stats, {**attrs, "source": str(store.path)})


def label_gram_store(
    data_path: str | Path,
    out: str | Path,
    estimator: str,
    batch_size: int,
    examples: int | None = None,
) -> Path:
    """Gram statistics of the one-hot eval labels (class structure as a representation),
    of the first `examples` eval examples (default all), like the activation stores."""
    from ckaflow.data import open_prepared

    data = open_prepared(data_path)
    labels = one_hot(data.eval_labels()[:examples], data.attrs["num_classes"])
    stats = {"labels": _stats(labels, estimator, batch_size, "cpu", f"{data_path} labels")}
    attrs = {
        "run": "labels",
        "run_spec": None,
        "view": "labels",
        "layers": [label_layer().as_dict()],
        "example_ids": data.group["eval/ids"][: len(labels)].tolist(),
        "source": str(data_path),
    }
    return write_gram_store(Path(out), stats, attrs)


def open_gram(path: str | Path):
    return open_store(path, kind=GRAM_KIND)


def load_stats(store, names: list[str]) -> list[GramStats]:
    """GramStats of the named layers of an opened Gram store."""
    attrs = store.attrs
    return [
        GramStats(
            attrs["estimator"],
            np.asarray(store[name][...]),
            tuple(attrs["block_rows"]),
            f"{store.path} layer {name}",
        )
        for name in names
    ]
