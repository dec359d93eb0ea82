"""Activation stores: every registered layer of one run on one view, as a chunked Zarr v3 group.

Layout of `results/activations/<run>/<view>.zarr`: one array per layer, named by the layer,
shape (examples, features) with features flattened from (C, H, W) in C-major order, float32,
chunked along rows only (chunk height = the CKA batch size, so the Gram stage reads each chunk
exactly once). Group attributes carry the run, view, layer registry, example ids, provenance and
a `complete` flag; the store is written under a scratch name and renamed when whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from ckaflow.errors import StoreError
from ckaflow.provenance import atomic_path, provenance


def extract(
    model_path: str | Path,
    data_path: str | Path,
    view: str,
    out: str | Path,
    batch_size: int = 256,
    chunk_rows: int = 256,
    device: str = "auto",
) -> Path:
    """Run the trained network over one eval view and store every registered layer."""
    import torch

    from ckaflow.data import open_prepared
    from ckaflow.models import record_layers, resolve_device
    from ckaflow.train.loop import load_network

    dev = resolve_device(device)
    net, meta = load_network(model_path)
    net = net.to(dev)
    data = open_prepared(data_path)
    pixels = data.view(view)
    n = len(pixels)
    registry = net.registry()
    out = Path(out)
    with atomic_path(out) as scratch:
        group = zarr.open_group(scratch, mode="w", zarr_format=3)
        arrays: dict[str, zarr.Array] = {}
        with torch.no_grad(), record_layers(net) as captured:
            for start in range(0, n, batch_size):
                batch = torch.from_numpy(pixels[start : start + batch_size]).to(dev)
                net(data.normalise(batch.float() / 255))
                for layer in registry:
                    values = captured[layer.name].float().cpu().numpy()
                    if layer.name not in arrays:
                        arrays[layer.name] = group.create_array(
                            layer.name,
                            shape=(n, values.shape[1]),
                            chunks=(min(chunk_rows, n), values.shape[1]),
                            dtype="float32",
                        )
                    arrays[layer.name][start : start + len(values)] = values
        group.attrs.update(
            provenance(
                kind="ckaflow.activations",
                run=meta["run"],
                run_spec=meta["run_spec"],
                view=view,
                layers=[layer.as_dict() for layer in registry],
                example_ids=data.group["eval/ids"][...].tolist(),
                model_spec_hash=meta["spec_hash"],
                data_spec_hash=data.attrs["spec_hash"],
                n_examples=n,
                complete=True,
            )
        )
    return out


@dataclass(frozen=True)
class Store:
    """An opened activation store: lazy Zarr arrays per layer plus their metadata."""

    path: Path
    group: zarr.Group

    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    @property
    def layers(self) -> list[dict]:
        return self.attrs["layers"]

    def __getitem__(self, layer: str) -> zarr.Array:
        return self.group[layer]


def open_store(path: str | Path, kind: str = "ckaflow.activations") -> Store:
    """Open a complete store for reading; refuse a missing, partial or foreign one."""
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
    return Store(path, group)


def check_finite(values: np.ndarray, where: str) -> None:
    if not np.isfinite(values).all():
        bad = int((~np.isfinite(values)).sum())
        raise StoreError(f"{where}: {bad} non-finite values (NaN or Inf)")
