"""The `gram` stage: Gram statistics of every compared layer of one run on one view.

`fused_gram_store` (the rule's) runs the network over the view block by block and forms each
block's Gram from the activations while they are in memory; `gram_store` computes the same
statistics from a stored activation store instead (the check that both agree, and by hand).
Both write a Gram store (`ckaflow.gram_stores`).

`fused_gram_store` runs a trained network over one eval view and, for every selected layer,
forms the per-block Gram matrices of `ckaflow.cka.grams` from the activations while they are in
memory (one matrix product per layer and block, on the GPU when there is one), writing the Gram
store directly: the activations never touch the disk.

minibatch: each block of `batch_size` examples is one forward pass. Pass 0 takes the examples
in stored order; with `passes` > 1, pass p forwards the blocks of the seeded permutation
`partitions.partition(n, batch_size, passes, seed)`, so a network sees every example once per
pass,
as in Nguyen, Raghu & Kornblith (2021).

Full-data estimators (linear, debiased, rbf) need every pair of examples, so their Gram is
assembled from a layer's rows held in memory: layers are taken in groups whose float32 rows fit
`memory_bytes`, one forward pass over all examples per group.

Both give the bits of the store-then-Gram path (`gram_store`) on float32 values,
because both call the same block code (`grams.block_gram`, `grams.gram_stats`).

Resuming: the store is built under `.<name>.partial` with the call's hash; statistics are
flushed to it every `flush_s` seconds (and when `flush_bytes` are waiting) with `units_done`
(blocks, or layer groups) recorded after each flush, so a killed job restarts from there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from ckaflow import bytecount
from ckaflow.cka.grams import _Workspace, gram_stats, self_gram
from ckaflow.cka.partitions import block_sizes, partition, partition_digest
from ckaflow.config import stable_hash
from ckaflow.errors import StoreError
from ckaflow.gram_stores import (
    GRAM_FORMAT,
    GRAM_KIND,
    _stats,
    check_passes_config,
    create_gram_array,
    pack_upper,
    write_gram_store,
)
from ckaflow.killpoints import kill_point, torn_write_point
from ckaflow.provenance import provenance, replace_into_place
from ckaflow.store import ChunkPaths, open_partial, open_store, partial_path
from ckaflow.study import GramSpec

# Full-data estimators: float32 rows of a group of layers held at once (see module docstring).
MEMORY_BYTES = 2 * 2**30
FLUSH_SECONDS = 60.0
FLUSH_BYTES = 512 * 2**20


def _non_finite(name: str, where: str, rows) -> StoreError:
    """A non-finite value makes its row's Gram diagonal non-finite: name the block's examples."""
    return StoreError(
        f"{where} layer {name}: non-finite values (NaN or Inf) in the activations of examples "
        f"{sorted(int(r) for r in rows)[:8]}... (a block of {len(rows)})"
    )


class _Flusher:
    """Holds computed (layer, block) Grams and writes them to the partial store every
    `seconds` (or once `max_bytes` wait); `units_done` is recorded only after every write."""

    def __init__(self, group: zarr.Group, arrays: dict, seconds: float, max_bytes: int):
        self.group = group
        # chunk files and block size per layer, resolved once (opening an array reads its
        # metadata from disk: more than writing a chunk costs)
        self.paths = {name: ChunkPaths(array) for name, array in arrays.items()}
        self.dtype = {name: array.dtype.newbyteorder("<") for name, array in arrays.items()}
        self.seconds = seconds
        self.max_bytes = max_bytes
        self.pending: dict[str, dict[int, np.ndarray]] = {}
        self.bytes = 0
        self.last = time.monotonic()

    def add(self, name: str, block: int, k: np.ndarray, size: int) -> None:
        """Block `block`'s m × m Gram of a layer, zero-padded to size × size as GramStats holds
        a shorter last block, kept packed in the array's dtype (which holds it exactly)."""
        m = k.shape[0]
        if m < size:
            padded = np.zeros((size, size))
            padded[:m, :m] = k
            k = padded
        packed = pack_upper(k)
        stored = packed.astype(self.dtype[name])
        if not np.array_equal(stored, packed):  # a float32 store takes float32 products only
            raise StoreError(f"layer {name}: block {block}'s Gram is not exact in {stored.dtype}")
        self.pending.setdefault(name, {})[block] = stored
        self.bytes += stored.nbytes

    def maybe_flush(self, units_done: int) -> None:
        if self.bytes >= self.max_bytes or time.monotonic() - self.last >= self.seconds:
            self.flush(units_done)

    def flush(self, units_done: int) -> None:
        """Each block's packed Gram (`ckaflow.gram_stores`: its upper triangle) goes straight into
        its chunk file as the raw little-endian bytes Zarr stores for an uncompressed array
        (zstd halved the size at ~80 MB/s, a third of the stage's time; Zarr's own write path
        per chunk costs more than the write)."""
        for name, blocks in self.pending.items():
            dtype = self.dtype[name]
            for i, packed in blocks.items():
                path = self.paths[name](i)
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(np.ascontiguousarray(packed, dtype=dtype).tobytes())
                    bytecount.wrote(packed.nbytes)
                except OSError as err:  # write() errors name no file
                    raise OSError(err.errno, err.strerror, err.filename or str(path)) from err
        kill_point("chunk:written")
        self.group.attrs["units_done"] = units_done
        torn_write_point("meta:torn", Path(self.group.store.root) / "zarr.json")
        self.pending.clear()
        self.bytes = 0
        self.last = time.monotonic()


def _layer_groups(features: dict[str, int], n: int, memory_bytes: int) -> list[list[str]]:
    """Layers in registry order, grouped so that each group's float32 rows fit the budget
    (a layer wider than the budget alone is a group of its own)."""
    groups: list[list[str]] = []
    used = 0
    for name, width in features.items():
        size = n * width * 4
        if groups and used + size <= memory_bytes:
            groups[-1].append(name)
            used += size
        else:
            groups.append([name])
            used = size
    return groups


@dataclass
class _FusedPass:
    """A run's forward pass over one view with the partition of its examples into blocks:
    what the minibatch and full-data loops share."""

    view: Any  # ckaflow.forward.ViewPass
    pixels: Any  # the view's uint8 pixels, on the device once (3 KB per CIFAR image)
    blocks: list[np.ndarray]  # row indices of every block of every pass
    where: str  # names the run and view in errors

    @property
    def size(self) -> int:
        return max(len(rows) for rows in self.blocks)

    def forward(self, rows) -> None:
        import torch

        if not isinstance(rows, slice):
            rows = torch.from_numpy(np.asarray(rows, dtype=np.int64)).to(self.view.device)
        self.view(self.pixels[rows])

    def layer_shapes(self) -> tuple[dict[str, int], bool]:
        """Each layer's feature count, and whether any computes in float64, from one example."""
        import torch

        from ckaflow.models import record_layers

        with torch.no_grad(), record_layers(self.view.net, self.view.names) as probe:
            self.forward(slice(0, 1))
        features = {name: int(probe[name].shape[1]) for name in self.view.names}
        return features, any(t.dtype == torch.float64 for t in probe.values())


def _blocks(estimator: str, n: int, batch_size: int, passes: int, seed: int) -> list[np.ndarray]:
    if estimator == "minibatch":
        return partition(n, batch_size, passes, seed)
    return [np.arange(s.start, s.stop) for s in block_sizes(estimator, n, batch_size)]


def _open_partial_store(fused: _FusedPass, out: Path, chosen: dict, wide: bool, log):
    """The partial store of this call (resumed after its `units_done`, or fresh), with an array
    per layer: float32 products (exact in float32) unless the network computes in float64 or
    the kernel is the RBF's (`ckaflow.gram_stores.storage_dtype`)."""
    view = fused.view
    block_rows = tuple(len(rows) for rows in fused.blocks)
    call_hash = stable_hash(
        [
            view.meta["spec_hash"],
            view.data.attrs["spec_hash"],
            chosen["view"],
            view.n,
            view.names,
            chosen["estimator"],
            block_rows,
            chosen["passes"],
            chosen["seed"],
            view.precision,
            view.channels_last,
            GRAM_FORMAT,  # the chunk layout: an older partial store is rebuilt, not continued
        ]
    )
    partial = partial_path(out)
    group, done = open_partial(
        partial,
        call_hash,
        GRAM_KIND,
        "units_done",
        log,
        "resuming the Gram stage in {partial} after {done} units",
    )
    arrays = dict(group.arrays())  # those of a resumed store, then the missing ones
    for name in view.names:
        if name not in arrays:
            dtype = "float64" if wide else "float32"
            arrays[name] = create_gram_array(group, name, len(fused.blocks), fused.size, dtype)
    return group, done, {name: arrays[name] for name in view.names}


def _minibatch_grams(fused: _FusedPass, flusher: _Flusher, done: int, log) -> None:
    """Block after block (from `done`): one forward pass, each layer's Gram formed by its hook
    as the layer is computed, the block's Grams to the flusher."""
    import torch

    from ckaflow.models import record_layers

    names, dev, blocks = fused.view.names, fused.view.device, fused.blocks
    work = _Workspace(dev)
    grams: dict = {}

    def sink(name: str, tensor) -> None:
        # float32 product whatever the forward's autocast; the Gram stays on the device until
        # the block is done (one transfer per block)
        with torch.autocast(dev.type, enabled=False):
            grams[name] = self_gram(work.centred(tensor, None))

    t0 = last_log = time.monotonic()
    with torch.no_grad(), record_layers(fused.view.net, names, sink=sink):
        for i in range(done, len(blocks)):
            fused.forward(blocks[i])
            stacked = torch.stack([grams.pop(name) for name in names])
            for name, k in zip(names, stacked.double().cpu().numpy(), strict=True):
                if not np.isfinite(k).all():
                    raise _non_finite(name, fused.where, blocks[i])
                flusher.add(name, i, k, fused.size)
            flusher.maybe_flush(i + 1)
            if time.monotonic() - last_log >= 30:
                rate = (i + 1 - done) * fused.size / (time.monotonic() - t0)
                log(f"block {i + 1}/{len(blocks)}, {rate:.0f} images/s")
                last_log = time.monotonic()
    flusher.flush(len(blocks))


def _full_data_grams(
    fused: _FusedPass, flusher: _Flusher, groups: list, features: dict, done: int, settings, log
) -> None:
    """Group after group of layers (from `done`): their rows held in memory over one forward
    pass of every example, then each layer's one Gram (`gram_stats`)."""
    import torch

    from ckaflow.models import record_layers

    estimator, batch_size = settings["estimator"], settings["batch_size"]
    n = fused.view.n
    with torch.no_grad():
        for g in range(done, len(groups)):
            held = {name: torch.empty((n, features[name])) for name in groups[g]}
            state = {"offset": 0}

            def keep(name: str, tensor, held=held, state=state) -> None:
                held[name][state["offset"] : state["offset"] + len(tensor)].copy_(tensor)

            with record_layers(fused.view.net, groups[g], sink=keep):
                for start in range(0, n, batch_size):
                    state["offset"] = start
                    fused.forward(slice(start, min(start + batch_size, n)))
            for name in groups[g]:
                s = gram_stats(
                    held.pop(name).numpy(),
                    estimator=estimator,
                    batch_size=batch_size,
                    device=str(fused.view.device),
                    name=f"{fused.where} layer {name}",
                )
                flusher.add(name, 0, s.grams[0], fused.size)
            flusher.flush(g + 1)
            log(f"layer group {g + 1}/{len(groups)} done")


def _finish(group: zarr.Group, fused: _FusedPass, settings: dict, model_path, out: Path):
    """The store's metadata in one write, then its completion flag, then its final name."""
    seeded = settings["passes"] > 1  # one pass needs no seed (grams.GramStats)
    group.update_attributes(
        provenance(
            kind=GRAM_KIND,
            gram_format=GRAM_FORMAT,
            estimator=settings["estimator"],
            block_rows=[len(rows) for rows in fused.blocks],
            passes=settings["passes"],
            partition_seed=int(settings["seed"]) if seeded else None,
            partition_digest=partition_digest(fused.blocks) if seeded else None,
            source=str(model_path),
            **fused.view.attrs(settings["view"]),
        )
    )
    group.attrs["complete"] = True  # last: only now is the store whole
    replace_into_place(partial_path(out), out)


def fused_gram_store(
    model_path: str | Path,
    data_path: str | Path,
    view: str,
    out: str | Path,
    *,
    estimator: str = "minibatch",
    batch_size: int = 256,
    passes: int = 1,
    seed: int = 0,
    layers: list[str] | None = None,
    examples: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    channels_last: bool | str = "auto",
    memory_bytes: int = MEMORY_BYTES,
    flush_s: float = FLUSH_SECONDS,
    flush_bytes: int = FLUSH_BYTES,
    log=print,
) -> Path:
    """Gram statistics of the selected layers (default all) of a trained run on one eval view
    (its first `examples` examples, default all), computed during the forward pass.

    precision / channels_last: the forward pass's autocast and memory format
    (`ckaflow.models.forward_settings`); the Gram products run in float32 and every sum in
    float64 whatever the precision.
    """
    import torch

    from ckaflow.forward import ViewPass

    check_passes_config(estimator, passes, seed)
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
    pixels = torch.from_numpy(run.pixels(slice(0, run.n))).to(run.device)
    blocks = _blocks(estimator, run.n, batch_size, passes, seed)
    fused = _FusedPass(run, pixels, blocks, f"{model_path} on {view}")
    features, wide = fused.layer_shapes()
    chosen = {"view": view, "estimator": estimator, "batch_size": batch_size}
    chosen |= {"passes": passes, "seed": seed}
    out = Path(out)
    group, done, arrays = _open_partial_store(fused, out, chosen, wide or estimator == "rbf", log)
    flusher = _Flusher(group, arrays, flush_s, flush_bytes)
    t0 = time.monotonic()
    if estimator == "minibatch":
        _minibatch_grams(fused, flusher, done, log)
    else:
        groups = _layer_groups(features, run.n, memory_bytes)
        _full_data_grams(fused, flusher, groups, features, done, chosen, log)
    _finish(group, fused, chosen, model_path, out)
    log(f"{out}: {len(run.names)} layers, {len(blocks)} blocks in {time.monotonic() - t0:.1f} s")
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


def run(
    spec: GramSpec,
    model: str | Path,
    data: str | Path,
    view: str,
    out: str | Path,
    device: str = "auto",
    flush_s: float = FLUSH_SECONDS,
) -> Path:
    """The rule's call: `fused_gram_store` with the spec's settings (an unset precision or
    memory format: the forward pass's own choice)."""
    return fused_gram_store(
        model,
        data,
        view,
        out,
        **spec.blocks(),
        layers=None if spec.layers is None else list(spec.layers),
        precision=spec.precision or "auto",
        channels_last="auto" if spec.channels_last is None else spec.channels_last,
        device=device,
        flush_s=flush_s,
    )
