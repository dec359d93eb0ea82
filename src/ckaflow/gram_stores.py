"""Gram stores: each layer's Gram statistics as a Zarr store, the one thing CKA reads.

Written by the Gram stages (`ckaflow.stages.gram`, `ckaflow.stages.gram_labels`), read by the
CKA stage (`ckaflow.stages.cka`). A store at `results/gram/<run>/<view>.zarr` holds, per layer,
the (blocks, b, b) float64 Grams of `ckaflow.cka.grams.GramStats`, with `block_rows` and the
estimator in its attributes, and `passes`, `partition_seed` and `partition_digest`: with
passes > 1 the blocks are pass-major (block i belongs to pass i // (len(block_rows) / passes))
and `ckaflow.cka.partitions.partition(len(example_ids), block_rows[0], passes,
partition_seed)` gives the rows of each block (its hash is `partition_digest`; the CKA stage
refuses two sides whose digests differ).

Layout (`gram_format: upper-triangle`): each block's Gram is symmetric, so chunk i of a layer's
(blocks, b(b+1)/2) array holds the upper triangle of block i, row by row (`numpy.triu_indices`),
zero-padded for a shorter last block; float32 where every value is a float32 product (the
minibatch, linear and debiased estimators on float32 activations: exact), float64 otherwise
(rbf, float64 input). A quarter of the full float64 matrix, and the same numbers. A store
without `gram_format` ((blocks, b, b) float64 arrays) is read as it is.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path

import numpy as np
import zarr

from ckaflow import bytecount
from ckaflow.cka.grams import GramStats, block_vector, gram_stats
from ckaflow.cka.pairs import BlockHSICs, block_terms
from ckaflow.cka.partitions import check_passes
from ckaflow.errors import ConfigError, StoreError
from ckaflow.provenance import atomic_path, provenance
from ckaflow.store import ChunkPaths, open_store

GRAM_KIND = "ckaflow.gram"
GRAM_FORMAT = "upper-triangle"


def packed_length(size: int) -> int:
    """Values in the upper triangle (diagonal included) of a size × size matrix."""
    return size * (size + 1) // 2


@lru_cache(maxsize=8)
def _triangle(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices of the upper triangle, row by row, and of the same entries mirrored."""
    rows, cols = np.triu_indices(size)
    return rows * size + cols, cols * size + rows


def pack_upper(k: np.ndarray) -> np.ndarray:
    """The upper triangle of each trailing size × size matrix of k, row by row."""
    size = k.shape[-1]
    return k.reshape(*k.shape[:-2], size * size)[..., _triangle(size)[0]]


def unpack_upper(packed: np.ndarray, size: int) -> np.ndarray:
    """The symmetric float64 matrices whose upper triangles `pack_upper` gave."""
    upper, lower = _triangle(size)
    out = np.empty((*packed.shape[:-1], size * size))
    out[..., upper] = packed
    out[..., lower] = packed
    return out.reshape(*packed.shape[:-1], size, size)


def storage_dtype(grams: np.ndarray, estimator: str) -> str:
    """float32 when every value is one exactly (float32 products), else float64: never a bit
    lost. The RBF kernel is computed in float64."""
    if estimator == "rbf":
        return "float64"
    return "float32" if np.array_equal(grams.astype(np.float32), grams) else "float64"


def create_gram_array(group: zarr.Group, name: str, blocks: int, size: int, dtype: str):
    """A layer's array: one chunk per block, raw (zstd only halved them; the fused stage writes
    the chunk files itself, `ckaflow.stages.gram`), every chunk on disk (see check_chunks)."""
    return group.create_array(
        name,
        shape=(blocks, packed_length(size)),
        chunks=(1, packed_length(size)),
        dtype=dtype,
        compressors=None,
        config={"write_empty_chunks": True},
    )


class BlockReader:
    """`BlockReader(array)(i)`: block i of a stored layer as its full float64 Gram (either
    layout). ckaflow writes each chunk raw (no codec), so a chunk on the local file system is
    read straight from its file: Zarr's own path per call cost 0.6 ms a chunk, twenty times
    the read, with hundreds of thousands of chunks in a study. Any other array goes through
    Zarr."""

    def __init__(self, array):
        self.array = array
        self.paths = None
        codecs = getattr(array.metadata, "codecs", ())
        raw = len(codecs) == 1 and isinstance(codecs[0], zarr.codecs.BytesCodec)
        if raw and array.dtype.itemsize > 1:
            raw = codecs[0].endian is not None and codecs[0].endian.value == "little"
        if raw and array.chunks[0] == 1:
            try:
                self.paths = ChunkPaths(array)
            except (AttributeError, TypeError):  # not a local store: read through Zarr
                self.paths = None
        self.dtype = np.dtype(array.dtype).newbyteorder("<")
        self.shape = tuple(array.shape[1:])

    def __call__(self, i: int) -> np.ndarray:
        if self.paths is not None:
            chunk = np.fromfile(self.paths(i), dtype=self.dtype)
            if chunk.size != int(np.prod(self.shape)):
                raise StoreError(
                    f"{self.paths(i)}: a chunk of {chunk.size} values, not {self.shape}"
                )
            chunk = chunk.reshape(self.shape)
        else:
            chunk = np.asarray(self.array[i])
        bytecount.read_array(chunk)
        if chunk.ndim == 2:  # the full-matrix layout of older stores
            return chunk.astype(np.float64, copy=False)
        return unpack_upper(chunk, _size(chunk.shape[-1]))


def _size(length: int) -> int:
    size = int((np.sqrt(8 * length + 1) - 1) / 2)
    if packed_length(size) != length:
        raise StoreError(f"{length} stored values are no upper triangle of a square matrix")
    return size


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
            blocks, size = s.grams.shape[:2]
            dtype = storage_dtype(s.grams, s.estimator)
            arr = create_gram_array(group, name, blocks, size, dtype)
            arr[...] = packed = pack_upper(s.grams).astype(dtype)
            bytecount.wrote(packed.nbytes)
        if first is None:
            raise StoreError(f"{out}: no layers to write")
        group.attrs.update(
            provenance(
                kind=GRAM_KIND,
                gram_format=GRAM_FORMAT,
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


def _check_shape(store, name: str, block_rows: tuple[int, ...]) -> zarr.Array:
    """A layer's array, refused unless it holds one b × b Gram per block (either layout)."""
    array = store[name]
    size = max(block_rows)
    shapes = {(len(block_rows), packed_length(size)), (len(block_rows), size, size)}
    if tuple(array.shape) not in shapes:
        raise StoreError(
            f"{store.path}: layer {name} has shape {tuple(array.shape)}, not that of "
            f"{len(block_rows)} blocks of {size} rows; the store is damaged: delete it and rerun "
            "the gram stage"
        )
    return array


def _all_blocks(store, name: str, block_rows: tuple[int, ...]) -> np.ndarray:
    stored = bytecount.read_array(np.asarray(_check_shape(store, name, block_rows)[...]))
    if stored.ndim == 3:  # the full-matrix layout of older stores
        return stored.astype(np.float64, copy=False)
    return unpack_upper(stored, max(block_rows))


def load_stats(store, names: list[str]) -> list[GramStats]:
    """GramStats of the named layers of an opened Gram store (one that predates passes had
    one pass)."""
    attrs = store.attrs
    block_rows, passes = _layout(store)
    return [
        GramStats(
            attrs["estimator"],
            _all_blocks(store, name, block_rows),
            block_rows,
            f"{store.path} layer {name}",
            passes=passes,
            partition_seed=attrs.get("partition_seed"),
            digest=attrs.get("partition_digest"),
        )
        for name in names
    ]


def _key(store, name: str) -> tuple[str, str]:
    return (str(Path(store.path).resolve()), name)


def _positions(indices: list[int]):
    """A slice where the indices are consecutive (a view, no copy), else the list."""
    if indices and indices == list(range(indices[0], indices[0] + len(indices))):
        return slice(indices[0], indices[0] + len(indices))
    return indices


def stream_block_hsics(pairs: list[tuple]) -> list[BlockHSICs]:
    """Per-block HSIC matrices of each (store_a, names_a, store_b, names_b) in `pairs`, read
    block by block: for block i, chunk i of every layer that any pair names (one b × b Gram
    each) is read and U-centred into its block vector once, and each pair's terms formed from
    them (`block_terms`). So each store is read once whatever the number of pairs it is in, and
    memory is one block of every layer, (layers) · b² · 8 bytes, plus the (blocks, La, Lb)
    results — never a layer's (blocks, b, b) statistics.

    For the minibatch (unbiased, blocked) statistics; the caller checks that all the stores hold
    the same rows in the same blocks (`ckaflow.stages.cka`). The numbers are those of
    `ckaflow.cka.pairs.block_hsics` on `load_stats` of the same layers.
    """
    block_rows, passes = _layout(pairs[0][0])
    estimator = pairs[0][0].attrs["estimator"]
    arrays: dict[tuple[str, str], object] = {}  # every layer named, in order of first mention
    for store_a, names_a, store_b, names_b in pairs:
        for store, names in ((store_a, names_a), (store_b, names_b)):
            for name in names:
                if _key(store, name) not in arrays:
                    arrays[_key(store, name)] = BlockReader(_check_shape(store, name, block_rows))
    row = {key: i for i, key in enumerate(arrays)}
    sides = [
        (
            _positions([row[_key(store_a, n)] for n in names_a]),
            _positions([row[_key(store_b, n)] for n in names_b]),
        )
        for store_a, names_a, store_b, names_b in pairs
    ]
    blocks = len(block_rows)
    terms = [
        (
            np.empty((blocks, len(names_a), len(names_b))),
            np.empty((blocks, len(names_a))),
            np.empty((blocks, len(names_b))),
        )
        for _, names_a, _, names_b in pairs
    ]

    def vector(key, i: int, m: int) -> np.ndarray:
        k = arrays[key](i)[:m, :m]  # chunk i: one block's Gram
        if not np.isfinite(k).all():
            raise StoreError(
                f"{key[0]}: layer {key[1]} has non-finite values in block {i}; the store is "
                "damaged: delete it and rerun the gram stage"
            )
        return block_vector(k, estimator)

    for i, m in enumerate(block_rows):
        vectors = np.empty((len(arrays), m * m))
        for key, j in row.items():
            vectors[j] = vector(key, i, m)
        for (a, b), (cross, self_a, self_b) in zip(sides, terms, strict=True):
            cross[i], self_a[i], self_b[i] = block_terms(vectors[a], vectors[b])
        del vectors
    return [BlockHSICs(cross, self_a, self_b, passes) for cross, self_a, self_b in terms]
