"""Chunked Zarr v3 stores as ckaflow writes them, activations and Gram statistics alike: how a
chunk is encoded and where its file lives, the partial store an interrupted stage resumes, and the
reader that refuses a missing, partial, foreign or damaged store.

Every chunk is always written (none is skipped as "empty"), so a missing chunk file is damage,
which Zarr would otherwise read silently as zeros. bfloat16 is stored as its raw 16 bits (`uint16`
on disk) and decoded to float32 on read.
"""

from __future__ import annotations

import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from ckaflow.config import schema_enum
from ckaflow.errors import StoreError

DTYPES = schema_enum("activations.dtype")  # float32, float16, bfloat16
CODECS = schema_enum("activations.codec")


@dataclass(frozen=True)
class StoreOptions:
    dtype: str = "float32"
    codec: str = "zstd"
    level: int = 1
    chunk_rows: int = 256

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {DTYPES}")
        if self.codec not in CODECS:
            raise ValueError(f"codec {self.codec!r} is not one of {CODECS}")

    def compressors(self):
        if self.codec == "zstd":
            return [zarr.codecs.ZstdCodec(level=self.level)]
        if self.codec == "lz4":
            return [zarr.codecs.BloscCodec(cname="lz4", clevel=self.level, shuffle="shuffle")]
        return None

    @property
    def disk_dtype(self) -> str:
        return "uint16" if self.dtype == "bfloat16" else self.dtype


def decode_bfloat16(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


class ChunkEncoder:
    """Encodes a chunk into the very bytes Zarr would store for the array's codec (a test checks
    this), so the writer can put them straight into the chunk's file. Zarr's own per-call write
    path costs more than the compression itself, and numcodecs releases the GIL, so the layers
    of a chunk row are encoded and written by a pool of threads."""

    def __init__(self, options: StoreOptions):
        import numcodecs

        self.codec = None
        if options.codec == "zstd":
            self.codec = numcodecs.Zstd(level=options.level)
        elif options.codec == "lz4":
            self.codec = numcodecs.Blosc(
                cname="lz4", clevel=options.level, shuffle=numcodecs.Blosc.SHUFFLE
            )

    def encode(self, values: np.ndarray) -> bytes:
        values = np.ascontiguousarray(values)
        if self.codec is None:
            return values.astype(values.dtype.newbyteorder("<"), copy=False).tobytes()
        return bytes(self.codec.encode(values))


class ChunkPaths:
    """`ChunkPaths(array)(i)`: the file of row chunk i of an array in a store on the local file
    system; the array's metadata is read once (opening an array costs more than writing a
    small chunk)."""

    def __init__(self, array: zarr.Array):
        self.root = Path(array.store_path.store.root) / array.path
        self.metadata = array.metadata
        self.trailing = (0,) * (array.ndim - 1)

    def __call__(self, chunk: int) -> Path:
        return self.root / self.metadata.encode_chunk_key((chunk, *self.trailing))


def check_chunks(path: Path, group: zarr.Group) -> None:
    """Every listed layer has its array, the store's row count and every chunk file. ckaflow
    writes every chunk (empty ones too), so a missing file is damage, which Zarr would
    otherwise read silently as zeros."""
    n = group.attrs.get("n_examples")
    with warnings.catch_warnings():
        # Snakemake marks a directory() output with this file, which is no Zarr node
        warnings.filterwarnings("ignore", message=r"Object at \.snakemake_timestamp ")
        arrays = dict(group.arrays())
    for layer in group.attrs.get("layers", []):
        name = layer["name"]
        if name not in arrays:
            raise StoreError(f"{path}: layer {name} is listed but has no array; rerun its stage")
        array = arrays[name]
        if n is not None and array.shape[0] != n:
            raise StoreError(
                f"{path}: layer {name} has {array.shape[0]} rows where the store has {n} "
                "examples (a foreign or damaged store); rerun its stage"
            )
        sizes = _chunk_sizes(array)  # one stat per chunk file
        missing = [i for i, size in enumerate(sizes) if size is None]
        if missing:
            raise StoreError(
                f"{path}: layer {name} lacks chunk files {missing} of {len(sizes)} (a damaged "
                "store); delete it and rerun its stage"
            )
        wrong = _size_problems(array, sizes)
        if wrong:
            raise StoreError(f"{path}: layer {name}: {wrong[0]}; delete it and rerun its stage")


def _chunk_sizes(array: zarr.Array) -> list[int | None]:
    """The size of each row chunk's file (None: no file)."""
    paths = ChunkPaths(array)
    sizes = []
    for i in range(-(-array.shape[0] // array.chunks[0]) if array.shape else 1):
        try:
            sizes.append(paths(i).stat().st_size)
        except FileNotFoundError:
            sizes.append(None)
    return sizes


def _size_problems(array: zarr.Array, sizes: list[int | None]) -> list[str]:
    """Chunk files of an uncompressed, row-chunked array whose size is not the chunk's."""
    if array.compressors or tuple(array.chunks[1:]) != tuple(array.shape[1:]):
        return []  # a compressed chunk's size says nothing: `chunk_problems` decodes
    expected = int(np.prod(array.chunks)) * array.dtype.itemsize
    return [
        f"chunk {i} holds {size} bytes where its shape needs {expected}"
        for i, size in enumerate(sizes)
        if size is not None and size != expected
    ]


def chunk_problems(array: zarr.Array, decode: bool = True) -> list[str]:
    """Why plain Zarr could not read this array, or []: a chunk file of another size than the
    chunk (uncompressed arrays: every file, from its size alone), or with `decode` a first or
    last chunk that does not decode to the chunk's shape (compressed ones: the last chunk is
    where a short selection's rows could outgrow their array)."""
    problems = _size_problems(array, _chunk_sizes(array))
    if decode and array.shape and array.shape[0]:
        last = (-(-array.shape[0] // array.chunks[0]) - 1) * array.chunks[0]
        for rows in (slice(0, min(array.chunks[0], array.shape[0])), slice(last, None)):
            try:
                array[rows]
            except Exception as err:  # zarr raises several kinds for a malformed chunk
                problems.append(f"rows {rows.start}.. do not read with Zarr: {err}")
    return problems


def partial_path(out: Path) -> Path:
    """Where a store is built before it takes its final name (`.<name>.partial` beside it)."""
    return out.with_name(f".{out.name}.partial")


def open_partial(
    partial: Path, call_hash: str, kind: str, counter: str, log, resuming: str
) -> tuple[zarr.Group, int]:
    """A partial store from an identical earlier call (its `counter` attribute: the progress
    to resume after; `resuming`, formatted with partial and done, is logged), or a fresh one."""
    if partial.exists():
        try:
            group = zarr.open_group(partial, mode="r+")
            if group.attrs.get("call_hash") == call_hash:
                done = int(group.attrs.get(counter, 0))
                log(resuming.format(partial=partial, done=done))
                return group, done
        except Exception:  # an unreadable partial store is rebuilt, never trusted
            pass
        shutil.rmtree(partial)
    partial.parent.mkdir(parents=True, exist_ok=True)
    group = zarr.open_group(partial, mode="w", zarr_format=3)
    group.attrs.update({"kind": kind, "call_hash": call_hash, counter: 0, "complete": False})
    return group, 0


class LayerArray:
    """A stored layer as a lazy (examples, features) array: slicing reads only those rows and
    gives float32 for bfloat16 storage."""

    def __init__(self, array: zarr.Array, dtype: str):
        self.array = array
        self.stored_dtype = dtype
        self.shape = array.shape
        self.chunks = array.chunks
        self.attrs = array.attrs

    @property
    def dtype(self):
        return np.dtype("float32") if self.stored_dtype == "bfloat16" else self.array.dtype

    def __getitem__(self, key) -> np.ndarray:
        values = self.array[key]
        return decode_bfloat16(values) if self.stored_dtype == "bfloat16" else values

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"LayerArray(shape={self.shape}, chunks={self.chunks}, dtype={self.stored_dtype})"


@dataclass(frozen=True)
class Store:
    """An opened store: lazy arrays per layer plus their metadata."""

    path: Path
    group: zarr.Group

    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    @property
    def layers(self) -> list[dict]:
        return self.attrs["layers"]

    def __getitem__(self, layer: str):
        array = self.group[layer]
        dtype = self.group.attrs.get("dtype")
        return LayerArray(array, dtype) if dtype in DTYPES else array


def open_store(path: str | Path, kind: str = "ckaflow.activations") -> Store:
    """Open a complete store for reading; refuse a missing, partial or foreign one.

    >>> store = open_store("results/activations/simclr-resnet18-w8-s0/clean.zarr")
    >>> [layer["name"] for layer in store.layers][:3]
    >>> x = store["layer3.1.out"][:256]  # rows 0..255 as a NumPy array
    """
    path = Path(path)
    if not path.exists():
        raise StoreError(f"{path}: store does not exist")
    try:
        group = zarr.open_group(path, mode="r")
    except Exception as err:  # zarr raises several types for a broken store
        raise StoreError(f"{path}: not a readable Zarr group ({err})") from err
    if group.attrs.get("kind") != kind:
        raise StoreError(f"{path}: is a {group.attrs.get('kind')!r} store, expected {kind!r}")
    if not group.attrs.get("complete"):
        raise StoreError(f"{path}: store is incomplete (no completion flag); rerun its stage")
    check_chunks(path, group)
    return Store(path, group)
