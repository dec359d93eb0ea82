"""CKA of live networks, from a notebook: `ckaflow.compare({"a": net_a, "b": net_b}, loader)`.

The chosen layers of every network are hooked; the loader's images are gathered into blocks of
`batch_size` rows, and each block goes through every network once while the hooks turn each
layer's output into its block Gram on the device (the fused Gram stage's arithmetic: float32
products of rows shifted by `grams.block_centre`, float64 sums). Only each block's HSIC terms
are kept, so memory is one block of every layer, whatever the number of images. The result is
the workflow's tidy CKA table (`ckaflow.tables.COLUMNS`), with intervals when `bootstrap` > 0;
on the same networks and images it holds the numbers the workflow gives.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterable, Mapping

import numpy as np

from ckaflow.cka.estimators import MIN_BATCH_ROWS
from ckaflow.cka.grams import _Workspace, block_vector, self_gram
from ckaflow.cka.pairs import BlockHSICs, block_terms
from ckaflow.devices import resolve_device
from ckaflow.tables import COLUMNS


def compare(
    models: Mapping,
    loader: Iterable,
    layers=None,
    *,
    batch_size: int = 256,
    bootstrap: int = 0,
    seed: int = 0,
    device: str = "auto",
    progress: bool | None = None,
):
    """The minibatch CKA of every layer pair of every two networks (one network: of itself).

    models: name -> `torch.nn.Module` (a ckaflow network, or any module; run in eval mode, then
        set back; on its own device, or moved to `device` when one is named).
    loader: an iterable of image batches (tensors, or tuples whose first item is the images: a
        `DataLoader` as it is), already preprocessed as each network expects.
    layers: the module names (glob patterns, e.g. "layer*.?.relu") whose outputs are compared:
        one list for every network, or name -> list; default: a ckaflow network's registered
        layers (required for other modules).
    batch_size: rows per block of the estimator (>= 4; a last block of fewer rows is dropped).
    bootstrap: replicates of the block bootstrap's 95 % interval (0: none).
    progress: a tqdm bar (default: when stderr is a terminal).
    """
    if not models:
        raise ValueError("compare needs at least one network")
    if batch_size < MIN_BATCH_ROWS:
        raise ValueError(f"batch_size must be >= {MIN_BATCH_ROWS}, got {batch_size}")
    nets = {name: _hookable(net, _layers_of(layers, name, net)) for name, net in models.items()}
    names = {name: net.layer_list for name, net in nets.items()}
    # each network runs where its weights are (device "auto"), or on the device named
    devices = {name: _device_of(net, device) for name, net in models.items()}
    works = {dev: _Workspace(dev) for dev in set(devices.values())}
    pairs = list(itertools.combinations(nets, 2)) or [(next(iter(nets)),) * 2]
    terms: dict[tuple, list] = {pair: [] for pair in pairs}
    modes = {name: net.training for name, net in models.items()}
    rows = 0
    try:
        for name, net in models.items():
            net.eval().to(devices[name])
        for block in _blocks(loader, batch_size, progress):
            vectors = {
                name: _block_vectors(net, block.to(devices[name]), works[devices[name]])
                for name, net in nets.items()
            }
            for a, b in pairs:
                terms[(a, b)].append(block_terms(vectors[a], vectors[b]))
            rows += len(block)
    finally:
        for name, net in models.items():
            net.train(modes[name])
    if not rows:
        raise ValueError(f"the loader gave fewer than {MIN_BATCH_ROWS} images: no block to use")
    return _table(pairs, terms, names, batch_size, rows, bootstrap, seed)


def _device_of(net, device: str):
    if device != "auto":
        return resolve_device(device)
    weights = next(iter(net.parameters()), None)
    return weights.device if weights is not None else resolve_device("auto")


def _layers_of(layers, name: str, net) -> list[str] | None:
    if isinstance(layers, Mapping):
        if name not in layers:
            raise ValueError(f"layers names no layers for network {name!r}")
        return list(layers[name])
    return None if layers is None else list(layers)


class _Hooked:
    """A network and the layers hooked in it, in order."""

    def __init__(self, net, layer_list: list[str]):
        self.net, self.layer_list = net, layer_list


def _hookable(net, patterns: list[str] | None) -> _Hooked:
    from ckaflow.models import ModuleNetwork, module_layer_names

    if hasattr(net, "hook_points"):  # a ckaflow network: its registry's names
        names = [layer.name for layer in net.registry()]
        if patterns is not None:
            from fnmatch import fnmatch

            names = [n for n in names if any(fnmatch(n, p) for p in patterns)]
        if not names:
            raise ValueError(f"layers {patterns} match none of the network's registered layers")
        return _Hooked(net, names)
    if patterns is None:
        raise ValueError(
            "layers is required for a network that is not ckaflow's: the module names (or glob "
            "patterns) whose outputs to compare, as in net.named_modules()"
        )
    wrapped = ModuleNetwork(net, tuple(patterns), _in_channels(net))
    return _Hooked(wrapped, module_layer_names(net, tuple(patterns)))


def _in_channels(net) -> int:
    import torch.nn as nn

    first = next((m for m in net.modules() if isinstance(m, nn.Conv2d)), None)
    return first.in_channels if first is not None else 3


def _blocks(loader: Iterable, size: int, progress: bool | None):
    """The loader's images regrouped into blocks of `size` rows (a last one of fewer than
    MIN_BATCH_ROWS dropped), on the CPU; behind a progress bar over the loader."""
    import torch

    batches: Iterable = loader
    if progress or (progress is None and sys.stderr.isatty()):
        from tqdm.auto import tqdm

        batches = tqdm(loader, desc="ckaflow.compare", unit="batch")
    pending: list = []
    held = 0
    for batch in batches:
        images = batch[0] if isinstance(batch, list | tuple) else batch
        images = torch.as_tensor(images)
        pending.append(images)
        held += len(images)
        while held >= size:
            stacked = torch.cat(pending)
            yield stacked[:size]
            pending, held = [stacked[size:]], held - size
    if held >= MIN_BATCH_ROWS:
        yield torch.cat(pending)


def _block_vectors(hooked: _Hooked, images, work: _Workspace) -> np.ndarray:
    """Each hooked layer's U-centred block Gram, flattened (layers × m²), from one forward
    pass: the Gram formed on the device as the layer is computed, as the fused stage does."""
    import torch

    from ckaflow.models import record_layers

    grams: dict = {}

    def sink(name: str, tensor) -> None:
        with torch.autocast(work.device.type, enabled=False):
            grams[name] = self_gram(work.centred(tensor, None))

    with torch.no_grad(), record_layers(hooked.net, hooked.layer_list, sink=sink):
        hooked.net(images)
    stacked = torch.stack([grams.pop(name) for name in hooked.layer_list]).double().cpu().numpy()
    if not np.isfinite(stacked).all():
        bad = [
            n for n, k in zip(hooked.layer_list, stacked, strict=True) if not np.isfinite(k).all()
        ]
        raise ValueError(f"non-finite values (NaN or Inf) in layers {bad}")
    return np.stack([block_vector(k, "minibatch") for k in stacked])


def _table(pairs, terms, names, batch_size: int, rows: int, bootstrap: int, seed: int):
    """The tidy table (`ckaflow.tables.COLUMNS`) of every pair of networks."""
    import pandas as pd

    from ckaflow.provenance import code_version

    version = code_version()
    frames = []
    for a, b in pairs:
        cross, self_a, self_b = (np.stack(t) for t in zip(*terms[(a, b)], strict=True))
        hsics = BlockHSICs(cross, self_a, self_b)
        la, lb = len(names[a]), len(names[b])
        low = high = np.full((la, lb), np.nan)
        if bootstrap:
            low, high = hsics.interval(bootstrap=bootstrap, seed=seed)
        jackknife = hsics.jackknife()
        columns = {c: None for c in COLUMNS}
        columns |= {
            "comparison": f"{a}-vs-{b}" if a != b else f"within-{a}",
            "kind": "cross" if a != b else "within",
            "run_a": a,
            "run_b": b,
            "layer_a": np.repeat(names[a], lb),
            "layer_b": np.tile(names[b], la),
            "layer_index_a": np.repeat(np.arange(la), lb),
            "layer_index_b": np.tile(np.arange(lb), la),
            "estimator": "minibatch",
            "batch_size": batch_size,
            "n": rows,
            "value": hsics.cka().ravel(),
            "ci_low": np.asarray(low).ravel(),
            "ci_high": np.asarray(high).ravel(),
            "bootstrap": bootstrap,
            "jackknife": list(jackknife.reshape(len(jackknife), -1).T),
        }
        columns["code_version"] = version
        frames.append(pd.DataFrame(columns, index=pd.RangeIndex(la * lb)))
    return pd.concat(frames, ignore_index=True).loc[:, list(COLUMNS)]
