"""Activation stores: the registered layers of one run on one view, as a chunked Zarr v3 group.

Layout of `results/activations/<run>/<view>.zarr`: one array per layer, named by the layer,
shape (examples, features) with features flattened from (C, H, W) in C-major order, chunked
along rows only (`activations.chunk_rows` rows per chunk). Only the layers and examples that
`activations.store` selects are written: CKA never reads this store. Stored dtype float32,
float16, or bfloat16 (kept as its raw 16 bits, `uint16` on disk, decoded to float32 on read).
Group attributes: run, view, layers (names, kinds, order), example ids, hashes of the model and
data, code version, dtype, `rows_done` while writing, and the `complete` flag, set last. The
reader and the chunk format are `ckaflow.store`'s, shared with the Gram stores.

Writing: the forward pass copies each layer straight into a chunk buffer (pinned host memory
behind a GPU); full chunks go to a background writer through a bounded pool of buffers, so
compression and disk overlap the next forward pass and memory stays bounded (the forward pass
waits when the writer falls behind). The writer encodes each layer's chunk itself, in a pool of
threads, into the bytes Zarr would write, and puts them in the chunk's file. The store is built
under `.<name>.partial`; an interrupted extraction resumes after the last chunk row written for
every layer, and only a whole store is renamed into place.
"""

from __future__ import annotations

import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import zarr

from ckaflow import bytecount
from ckaflow.config import stable_hash
from ckaflow.killpoints import kill_point, torn_write_point
from ckaflow.provenance import provenance, replace_into_place
from ckaflow.store import ChunkEncoder, ChunkPaths, StoreOptions, open_partial, partial_path

if TYPE_CHECKING:
    from ckaflow.forward import ViewPass


def _torch_dtype(dtype: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]


def _as_disk(buffer) -> np.ndarray:
    """A torch buffer as the NumPy array that goes to disk (bfloat16 as its raw bits)."""
    import torch

    if buffer.dtype == torch.bfloat16:
        return buffer.view(torch.int16).numpy().view(np.uint16)
    return buffer.numpy()


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
            bytecount.wrote(values[:filled].nbytes)  # logical bytes, before the codec
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
                    kill_point("chunk:written")
                    self.group.attrs["rows_done"] = rows.stop
                    torn_write_point("meta:torn", Path(self.group.store.root) / "zarr.json")
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
    from ckaflow.forward import ViewPass

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
    # a chunk never outgrows its array: Zarr reads an array of n < chunk_rows rows as one chunk
    # of n rows, so the chunks written must be that size too
    options = replace(options, chunk_rows=min(chunk_rows, run.n))
    out = Path(out)
    group, start, partial = _open_store(run, view, options, out, log)
    features = _create_arrays(run, group, options)
    _write_chunks(run, group, start, features, options, batch_size, buffers, workers)
    _finish(run, group, view, options, partial, out)
    return out


def _open_store(
    run: ViewPass, view: str, options: StoreOptions, out: Path, log
) -> tuple[zarr.Group, int, Path]:
    """This call's partial store (resumed or fresh), the row to resume after, and its path."""
    meta, data = run.meta, run.data
    call_hash = stable_hash(
        [
            *(meta["spec_hash"], data.attrs["spec_hash"], view, run.n, asdict(options), run.names),
            *(run.precision, run.channels_last),
        ]
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(out)
    group, start = open_partial(
        partial,
        call_hash,
        "ckaflow.activations",
        "rows_done",
        log,
        "resuming extraction into {partial} after row {done}",
    )
    return group, start, partial


def _create_arrays(run: ViewPass, group: zarr.Group, options: StoreOptions) -> dict[str, int]:
    """Each layer's feature count, from one example; its array created unless resuming."""
    import torch

    from ckaflow.models import record_layers

    n, chunk_rows = run.n, options.chunk_rows
    with torch.no_grad(), record_layers(run.net, run.names) as probe:
        run(torch.from_numpy(run.pixels(slice(0, 1))).to(run.device))
    features = {name: probe[name].shape[1] for name in run.names}
    for name, width in features.items():
        if name not in group:
            group.create_array(
                name,
                shape=(n, width),
                chunks=(min(chunk_rows, n), width),
                dtype=options.disk_dtype,
                compressors=options.compressors(),
            )
    return features


def _write_chunks(
    run: ViewPass,
    group: zarr.Group,
    start: int,
    features: dict[str, int],
    options: StoreOptions,
    batch_size: int,
    buffers: int,
    workers: int | None,
) -> None:
    """The forward pass from `start`'s chunk row on, into buffers the background writer empties."""
    import torch

    from ckaflow.models import record_layers

    dev, n, chunk_rows = run.device, run.n, options.chunk_rows
    pinned = dev.type == "cuda"
    # a bounded pool of chunk buffers, cycled between this loop and the writer
    free: queue.Queue = queue.Queue()
    for _ in range(max(1, buffers)):
        free.put(
            {
                name: torch.empty(
                    (chunk_rows, width), dtype=_torch_dtype(options.dtype), pin_memory=pinned
                )
                for name, width in features.items()
            }
        )
    writer = _Writer(group, free, options, workers or min(4, os.cpu_count() or 1))
    current: dict = {}
    offset = 0

    def sink(name: str, tensor) -> None:  # copy straight into the chunk buffer
        current[name][offset : offset + len(tensor)].copy_(tensor, non_blocking=pinned)

    try:
        with torch.no_grad(), record_layers(run.net, run.names, sink=sink):
            for chunk_start in range(start - start % chunk_rows, n, chunk_rows):
                chunk = slice(chunk_start, min(chunk_start + chunk_rows, n))
                current = free.get()  # waits while the writer is behind: back-pressure
                writer.check()
                for batch_start in range(chunk.start, chunk.stop, batch_size):
                    rows = slice(batch_start, min(batch_start + batch_size, chunk.stop))
                    offset = rows.start - chunk.start
                    run(torch.from_numpy(run.pixels(rows)).to(dev, non_blocking=pinned))
                ready = None
                if pinned:  # the writer waits for this chunk's device-to-host copies only
                    ready = torch.cuda.Event()
                    ready.record()
                writer.submit(chunk, current, ready)
    finally:
        writer.close()


def _finish(
    run: ViewPass, group: zarr.Group, view: str, options: StoreOptions, partial: Path, out: Path
) -> None:
    """The store's metadata, then `complete` (last), then the store renamed into place."""
    group.attrs.update(
        provenance(
            kind="ckaflow.activations",
            n_examples=run.n,
            dtype=options.dtype,
            codec=options.codec,
            level=options.level,
            **run.attrs(view),
        )
    )
    group.attrs["complete"] = True  # last: only now is the store whole
    replace_into_place(partial, out)
