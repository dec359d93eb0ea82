"""A trained network run over one eval view: what the Gram stage and activation extraction share.

`ViewPass.open` loads the run's network onto the device with the forward settings
(`ckaflow.models.forward_settings`: autocast precision, channels-last), opens the view of the
data store, resolves the requested layers against the registry, and calling it runs uint8
pixels through the network (fed as the run's `input` says, `ckaflow.feed`; in the chosen
memory format, under autocast); the layers reach whatever `record_layers` hooks are installed.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckaflow.errors import StoreError
from ckaflow.layers import Layer


@dataclass
class ViewPass:
    net: Any
    meta: dict
    data: Any  # ckaflow.data.Prepared
    view: Any  # the view's (examples, C, H, W) uint8 Zarr array
    n: int  # examples used: the first n of the view
    layers: list[Layer]  # the requested layers, in registry order
    device: Any
    amp: Any  # autocast dtype, or None
    channels_last: bool
    feed: Any  # ckaflow.feed.Feed: the run's resize and normalisation

    @classmethod
    def open(
        cls,
        model_path: str | Path,
        data_path: str | Path,
        view: str,
        *,
        layers: list[str] | None = None,
        examples: int | None = None,
        device: str = "auto",
        precision: str = "auto",
        channels_last: bool | str = "auto",
    ) -> ViewPass:
        import torch

        from ckaflow.config import run_spec_from_dict
        from ckaflow.data import open_prepared
        from ckaflow.devices import resolve_device
        from ckaflow.feed import feed_for
        from ckaflow.models import forward_settings, load_network

        dev = resolve_device(device)
        amp, cl = forward_settings(precision, channels_last, dev)
        net, meta = load_network(model_path)
        net = net.to(dev)
        if cl:
            net = net.to(memory_format=torch.channels_last)
        data = open_prepared(data_path)
        array = data.group[f"views/{view}"]
        n = array.shape[0] if examples is None else min(examples, array.shape[0])
        registry = net.registry()
        wanted = [layer.name for layer in registry] if layers is None else list(layers)
        unknown = sorted(set(wanted) - {layer.name for layer in registry})
        if unknown:
            raise StoreError(f"{model_path}: the model has no layers {unknown}")
        chosen = [layer for layer in registry if layer.name in wanted]
        feed = feed_for(run_spec_from_dict(meta["run_spec"]), data.attrs)
        return cls(net, meta, data, array, n, chosen, dev, amp, cl, feed)

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @property
    def precision(self) -> str:
        """The forward pass's precision, as recorded in a store's attributes."""
        return str(self.amp).replace("torch.", "") if self.amp else "float32"

    def attrs(self, view: str) -> dict:
        """What a store made by this pass records about it (with `provenance`)."""
        return {
            "run": self.meta["run"],
            "run_spec": self.meta["run_spec"],
            "view": view,
            "layers": [layer.as_dict() for layer in self.layers],
            "example_ids": self.data.group["eval/ids"][: self.n].tolist(),
            "model_spec_hash": self.meta["spec_hash"],
            "data_spec_hash": self.data.attrs["spec_hash"],
            "precision": self.precision,
            "channels_last": self.channels_last,
        }

    def pixels(self, rows):
        """uint8 pixels of the view's examples `rows` (a slice or indices), read from the store."""
        import numpy as np

        from ckaflow import bytecount

        return bytecount.read_array(np.asarray(self.view[rows]))

    def __call__(self, pixels) -> None:
        """Run uint8 pixels (a tensor on the device) through the network."""
        import torch

        x = self.feed(pixels)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        autocast = torch.autocast(self.device.type, dtype=self.amp) if self.amp else None
        with autocast or contextlib.nullcontext():
            self.net(x)
