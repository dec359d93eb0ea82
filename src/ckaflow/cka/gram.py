"""The Gram stage: each layer's Gram statistics, computed once and stored.

Every CKA pair is later computed from these, never from the activations again. A store at
`results/gram/<run>/<view>.zarr` holds, per layer, the (blocks, b, b) float64 Grams of
`ckaflow.cka.stats.GramStats`, with `block_rows` and the estimator in its attributes, and
`passes`, `partition_seed` and `partition_digest`: with passes > 1 the blocks are pass-major
(block i belongs to pass i // (len(block_rows) / passes)) and
`ckaflow.cka.stats.partition(len(example_ids), block_rows[0], passes, partition_seed)` gives the
rows of each block (its hash is `partition_digest`; a tile refuses two sides whose digests differ).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import zarr

from ckaflow.activations import open_store
from ckaflow.cka.estimators import one_hot
from ckaflow.cka.stats import GramStats, gram_stats
from ckaflow.errors import ConfigError, StoreError
from ckaflow.layers import label_layer
from ckaflow.provenance import atomic_path, provenance

GRAM_KIND = "ckaflow.gram"


def _stats(
    values, estimator: str, batch_size: int, device: str, where: str, passes: int, seed: int
) -> GramStats:
    try:
        return gram_stats(
            values,
            estimator=estimator,
            batch_size=batch_size,
            passes=passes,
            seed=seed,
            device=device,
            name=where,
        )
    except ValueError as err:  # non-finite values, too few examples: name the store and layer
        raise StoreError(str(err)) from err


def _check_passes(estimator: str, passes: int) -> None:
    """Refused before any data is read (gram_stats would refuse it too, for each layer)."""
    if passes < 1:
        raise ConfigError(f"cka.passes must be >= 1, got {passes}")
    if passes > 1 and estimator != "minibatch":
        raise ConfigError(
            f"cka.passes = {passes} needs the minibatch estimator, not {estimator}: the "
            "full-data estimators already use every pair of examples (set cka.passes to 1)"
        )


def write_gram_store(
    out: Path, stats: Mapping[str, GramStats] | Iterable[tuple[str, GramStats]], attrs: dict
) -> Path:
    """Write the statistics of every layer; `stats` may be a generator of (name, stats) pairs,
    each layer then written (and released) as soon as it is computed."""
    pairs = stats.items() if isinstance(stats, Mapping) else stats
    first = None
    with atomic_path(out) as scratch:
        group = zarr.open_group(scratch, mode="w", zarr_format=3)
        for name, s in pairs:
            if first is None:
                first = s
            arr = group.create_array(
                name,
                shape=s.grams.shape,
                chunks=(1, *s.grams.shape[1:]),
                dtype="float64",
                config={"write_empty_chunks": True},  # every chunk on disk: see check_chunks
            )
            arr[...] = s.grams
        if first is None:
            raise StoreError(f"{out}: no layers to write")
        group.attrs.update(
            provenance(
                kind=GRAM_KIND,
                estimator=first.estimator,
                block_rows=list(first.block_rows),
                passes=first.passes,
                partition_seed=first.partition_seed,
                partition_digest=first.digest,
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
    passes: int = 1,
    seed: int = 0,
) -> Path:
    """Gram statistics of every layer of one activation store, read chunk by chunk; with
    passes > 1, over `passes` partitions of the examples (pass p >= 1 permuted by `seed`)."""
    _check_passes(estimator, passes)
    store = open_store(activations)
    stats = (
        (
            layer["name"],
            _stats(
                store[layer["name"]],
                estimator,
                batch_size,
                device,
                f"{store.path} layer {layer['name']}",
                passes,
                seed,
            ),
        )
        for layer in store.layers
    )
    keep = ("run", "run_spec", "view", "layers", "example_ids", "model_spec_hash")
    attrs = {k: store.attrs[k] for k in keep}
    return write_gram_store(Path(out), stats, {**attrs, "source": str(store.path)})


def label_gram_store(
    data_path: str | Path,
    out: str | Path,
    estimator: str,
    batch_size: int,
    examples: int | None = None,
    passes: int = 1,
    seed: int = 0,
) -> Path:
    """Gram statistics of the one-hot eval labels (class structure as a representation),
    of the first `examples` eval examples (default all), like the activation stores — with the
    same passes and seed, hence the same partitions."""
    from ckaflow.data import open_prepared

    _check_passes(estimator, passes)
    data = open_prepared(data_path)
    labels = one_hot(data.eval_labels()[:examples], data.attrs["num_classes"])
    where = f"{data_path} labels"
    stats = {"labels": _stats(labels, estimator, batch_size, "cpu", where, passes, seed)}
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
    """GramStats of the named layers of an opened Gram store (one that predates passes had
    one pass)."""
    attrs = store.attrs
    passes = int(attrs.get("passes", 1))
    block_rows = tuple(attrs["block_rows"])
    if len(block_rows) % passes:
        raise StoreError(
            f"{store.path}: {len(block_rows)} blocks cannot be {passes} equal passes; "
            "the store is damaged: delete it and rerun the gram stage"
        )
    return [
        GramStats(
            attrs["estimator"],
            np.asarray(store[name][...]),
            block_rows,
            f"{store.path} layer {name}",
            passes=passes,
            partition_seed=attrs.get("partition_seed"),
            digest=attrs.get("partition_digest"),
        )
        for name in names
    ]
