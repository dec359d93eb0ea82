"""Activation stores: the registered layers of one run on one view, as a chunked Zarr v3 group.

Layout of `results/activations/<run>/<view>.zarr`: one array per layer, named by the layer,
shape (examples, features) with features flattened from (C, H, W) in C-major order, chunked
along rows only (chunk height = the CKA batch size, so the Gram stage reads each chunk exactly
once). Stored dtype float32, float16, or bfloat16 (kept as its raw 16 bits, `uint16` on disk,
decoded to float32 on read). Group attributes: run, view, layers (names, kinds, order), example
ids, hashes of the model and data, code version, dtype, `rows_done` while writing, and the
`complete` flag, set last.

Writing: the forward pass copies each layer straight into a chunk buffer (pinned host memory
behind a GPU); full chunks go to a background writer through a bounded pool of buffers, so
compression and disk overlap the next forward pass and memory stays bounded (the forward pass
waits when the writer falls behind). The writer encodes each layer's chunk itself, in a pool of
threads, into the bytes Zarr would write, and puts them in the chunk's file: every chunk is
always written (none is skipped as "empty"), so a missing chunk file means a damaged store.
The store is built under `.<name>.partial`; an interrupted extraction resumes after the last
chunk row written for every layer, and only a whole store is renamed into place.
"""

from __future__ import annotations

import os
import queue
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import zarr

from ckaflow.config import stable_hash
from ckaflow.errors import StoreError
from ckaflow.provenance import provenance, replace_into_place

DTYPES = ("float32", "float16", "bfloat16")
CODECS = ("zstd", "lz4", "none")


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


def _torch_dtype(dtype: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]


def _as_disk(buffer) -> np.ndarray:
    """A torch buffer as the NumPy array that goes to disk (bfloat16 as its raw bits)."""
    import torch

    if buffer.dtype == torch.bfloat16:
        return buffer.view(torch.int16).numpy().view(np.uint16)
    return buffer.numpy()


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
        chunks = -(-array.shape[0] // array.chunks[0])
        paths = ChunkPaths(array)
        missing = [i for i in range(chunks) if not paths(i).exists()]
        if missing:
            raise StoreError(
                f"{path}: layer {name} lacks chunk files {missing} of {chunks} (a damaged "
                "store); delete it and rerun its stage"
            )


class _Writer:
    """A background thread taking chunk rows in order; each row's layers are encoded and written
    by a thread pool; buffers cycle through a bounded pool. `rows_done` advances only when every
    layer of a chunk row is on disk."""

    def __init__(self, group: zarr.Group, free: queue.Queue, options: StoreOptions, workers: int):
        self.group = group
        self.free = free
        self.chunk_rows = options.chunk_rows
        self.encoder = ChunkEncoder(options)
        self.paths = {name: ChunkPaths(array) for name, array in group.arrays()}
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ckaflow-encode")
        self.todo: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="ckaflow-writer", daemon=True)
        self.thread.start()

    def _write(self, name: str, buffer, rows: slice) -> None:
        values = _as_disk(buffer)
        filled = rows.stop - rows.start
        if filled < len(values):  # the last, short chunk: pad as Zarr does (fill value 0)
            values = values.copy()
            values[filled:] = 0
        path = self.paths[name](rows.start // self.chunk_rows)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(self.encoder.encode(values))
        except OSError as err:  # write() errors name no file
            raise OSError(err.errno, err.strerror, err.filename or str(path)) from err

    def _run(self) -> None:
        while True:
            item = self.todo.get()
            if item is None:
                return
            rows, buffers, ready = item
            try:
                if self.error is None:
                    if ready is not None:
                        ready.synchronize()
                    jobs = [
                        self.pool.submit(self._write, name, buffer, rows)
                        for name, buffer in buffers.items()
                    ]
                    for job in jobs:
                        job.result()
                    self.group.attrs["rows_done"] = rows.stop
            except BaseException as err:  # re-raised in the forward thread
                self.error = err
            finally:
                self.free.put(buffers)

    def submit(self, rows: slice, buffers: dict, ready) -> None:
        self.check()
        self.todo.put((rows, buffers, ready))

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self.todo.put(None)
        self.thread.join()
        self.pool.shutdown()
        self.check()


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


def extract(
    model_path: str | Path,
    data_path: str | Path,
    view: str,
    out: str | Path,
    batch_size: int = 256,
    chunk_rows: int = 256,
    device: str = "auto",
    dtype: str = "float32",
    codec: str = "zstd",
    level: int = 1,
    layers: list[str] | None = None,
    examples: int | None = None,
    buffers: int = 2,
    workers: int | None = None,
    precision: str = "auto",
    channels_last: bool | str = "auto",
    log=print,
) -> Path:
    """Run the trained network over one eval view and store the registered layers.

    `layers`: names to keep (default: all, in registry order); `examples`: the first n eval
    examples (default: all); `buffers`: chunk buffers in flight (memory bound); `workers`:
    threads encoding and writing chunks (default: up to 4); `precision`, `channels_last`: the
    forward pass's autocast and memory format (`ckaflow.models.forward_settings`).
    """
    import torch

    from ckaflow.forward import ViewPass
    from ckaflow.models import record_layers

    options = StoreOptions(dtype, codec, level, chunk_rows)
    run = ViewPass.open(
        model_path,
        data_path,
        view,
        layers=layers,
        examples=examples,
        device=device,
        precision=precision,
        channels_last=channels_last,
    )
    dev, n, meta, data, view_array = run.device, run.n, run.meta, run.data, run.view
    wanted, forward = run.names, run
    call_hash = stable_hash(
        [
            *(meta["spec_hash"], data.attrs["spec_hash"], view, n, asdict(options), wanted),
            *(run.precision, run.channels_last),
        ]
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    group, start = open_partial(
        partial,
        call_hash,
        "ckaflow.activations",
        "rows_done",
        log,
        "resuming extraction into {partial} after row {done}",
    )

    # feature counts from one example, then the arrays (unless resuming) and chunk buffers
    with torch.no_grad(), record_layers(run.net, wanted) as probe:
        forward(torch.from_numpy(view_array[:1]).to(dev))
    features = {name: probe[name].shape[1] for name in wanted}
    for name, width in features.items():
        if name not in group:
            group.create_array(
                name,
                shape=(n, width),
                chunks=(min(chunk_rows, n), width),
                dtype=options.disk_dtype,
                compressors=options.compressors(),
            )
    pinned = dev.type == "cuda"
    free: queue.Queue = queue.Queue()
    for _ in range(max(1, buffers)):
        free.put(
            {
                name: torch.empty((chunk_rows, width), dtype=_torch_dtype(dtype), pin_memory=pinned)
                for name, width in features.items()
            }
        )
    writer = _Writer(group, free, options, workers or min(4, os.cpu_count() or 1))
    current: dict = {}
    offset = 0

    def sink(name: str, tensor) -> None:  # copy straight into the chunk buffer
        current[name][offset : offset + len(tensor)].copy_(tensor, non_blocking=pinned)

    try:
        with torch.no_grad(), record_layers(run.net, wanted, sink=sink):
            for chunk_start in range(start - start % chunk_rows, n, chunk_rows):
                chunk = slice(chunk_start, min(chunk_start + chunk_rows, n))
                current = free.get()  # waits while the writer is behind: back-pressure
                writer.check()
                for batch_start in range(chunk.start, chunk.stop, batch_size):
                    rows = slice(batch_start, min(batch_start + batch_size, chunk.stop))
                    offset = rows.start - chunk.start
                    forward(torch.from_numpy(view_array[rows]).to(dev, non_blocking=pinned))
                ready = None
                if pinned:  # the writer waits for this chunk's device-to-host copies only
                    ready = torch.cuda.Event()
                    ready.record()
                writer.submit(chunk, current, ready)
    finally:
        writer.close()

    group.attrs.update(
        provenance(
            kind="ckaflow.activations",
            n_examples=n,
            dtype=dtype,
            codec=codec,
            level=level,
            **run.attrs(view),
        )
    )
    group.attrs["complete"] = True  # last: only now is the store whole
    replace_into_place(partial, out)
    return out


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
