"""The Gram stage: each layer's Gram statistics, computed once and stored.

Every CKA pair is later computed from these, never from the activations again. A store at
`results/gram/<run>/<view>.zarr` holds, per layer, the (blocks, b, b) float64 Grams of
`ckaflow.cka.engine.GramStats`, with `block_rows` and the estimator in its attributes, and
`passes`, `partition_seed` and `partition_digest`: with passes > 1 the blocks are pass-major
(block i belongs to pass i // (len(block_rows) / passes)) and
`ckaflow.cka.engine.partition(len(example_ids), block_rows[0], passes, partition_seed)` gives the
rows of each block (its hash is `partition_digest`; a tile refuses two sides whose digests differ).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import zarr

from ckaflow.cka.engine import (
    BlockHSICs,
    GramStats,
    block_terms,
    block_vector,
    check_passes,
    gram_stats,
)
from ckaflow.cka.estimators import one_hot
from ckaflow.errors import ConfigError, StoreError
from ckaflow.layers import label_layer
from ckaflow.provenance import atomic_path, provenance
from ckaflow.store import open_store

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


def check_passes_config(estimator: str, passes: int, seed: int = 0) -> None:
    """Refused before any data is read (gram_stats would refuse it too, for each layer)."""
    try:
        check_passes(passes, seed, estimator=estimator)
    except ValueError as err:
        raise ConfigError(f"cka.{err}") from err


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
                compressors=None,  # as the fused stage writes them (zstd only halved them)
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
    check_passes_config(estimator, passes, seed)
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

    check_passes_config(estimator, passes, seed)
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


def _layout(store) -> tuple[tuple[int, ...], int]:
    """(block_rows, passes) of an opened Gram store (one that predates passes had one pass)."""
    attrs = store.attrs
    passes = int(attrs.get("passes", 1))
    block_rows = tuple(attrs["block_rows"])
    if len(block_rows) % passes:
        raise StoreError(
            f"{store.path}: {len(block_rows)} blocks cannot be {passes} equal passes; "
            "the store is damaged: delete it and rerun the gram stage"
        )
    return block_rows, passes


def load_stats(store, names: list[str]) -> list[GramStats]:
    """GramStats of the named layers of an opened Gram store (one that predates passes had
    one pass)."""
    attrs = store.attrs
    block_rows, passes = _layout(store)
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


def stream_block_hsics(store_a, names_a: list[str], store_b, names_b: list[str]) -> BlockHSICs:
    """Per-block HSIC matrices of layers `names_a` of one Gram store against `names_b` of
    another, read block by block: for block i, chunk i of every layer (one b × b Gram each) is
    U-centred into its block vector and the block's terms formed (`block_terms`), so memory is
    one block of every layer, (La + Lb) · b² · 8 bytes, plus the (blocks, La, Lb) result —
    never a layer's (blocks, b, b) statistics. A layer on both sides (the same store and name)
    is read and U-centred once per block.

    For the minibatch (unbiased, blocked) statistics; the caller checks that the two stores hold
    the same rows in the same blocks (`ckaflow.cka.tiles`). The numbers are those of
    `ckaflow.cka.engine.block_hsics` on `load_stats` of the same layers, bit for bit.
    """
    block_rows, passes = _layout(store_a)
    estimator = store_a.attrs["estimator"]
    size = max(block_rows)
    arrays = {}
    for store, names in ((store_a, names_a), (store_b, names_b)):
        for name in names:
            key = (str(Path(store.path).resolve()), name)
            if key in arrays:
                continue
            array = store[name]
            if tuple(array.shape) != (len(block_rows), size, size):
                raise StoreError(
                    f"{store.path}: layer {name} has shape {tuple(array.shape)}, not "
                    f"{(len(block_rows), size, size)} for its {len(block_rows)} blocks of "
                    f"{size} rows; the store is damaged: delete it and rerun the gram stage"
                )
            arrays[key] = array
    keys_a = [(str(Path(store_a.path).resolve()), name) for name in names_a]
    keys_b = [(str(Path(store_b.path).resolve()), name) for name in names_b]
    cross = np.empty((len(block_rows), len(names_a), len(names_b)))
    self_a = np.empty((len(block_rows), len(names_a)))
    self_b = np.empty((len(block_rows), len(names_b)))
    shared = {key: keys_a.index(key) for key in keys_b if key in keys_a}

    def vector(key, i: int, m: int) -> np.ndarray:
        k = np.asarray(arrays[key][i])[:m, :m]  # chunk i: one block's Gram
        if not np.isfinite(k).all():
            raise StoreError(
                f"{key[0]}: layer {key[1]} has non-finite values in block {i}; the store is "
                "damaged: delete it and rerun the gram stage"
            )
        return block_vector(k, estimator)

    for i, m in enumerate(block_rows):
        a = np.empty((len(keys_a), m * m))
        for j, key in enumerate(keys_a):
            a[j] = vector(key, i, m)
        b = np.empty((len(keys_b), m * m))
        for j, key in enumerate(keys_b):
            b[j] = a[shared[key]] if key in shared else vector(key, i, m)
        cross[i], self_a[i], self_b[i] = block_terms(a, b)
        del a, b
    return BlockHSICs(cross, self_a, self_b, passes)
