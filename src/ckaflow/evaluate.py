"""Quality of an encoder: kNN accuracy of its pooled features, and linear probes of every layer.

The probes are the paper's linear-separability curve: each registered layer, averaged over
space, feeds a multinomial logistic regression fitted on the train subset and scored on the
clean eval subset. The same probes on the run's untrained network (its exact initial weights,
with BatchNorm statistics from the training images) are the baseline a trained encoder must
beat.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import torch
import torch.nn.functional as F

from ckaflow.models import record_layers

if TYPE_CHECKING:
    from ckaflow.config import RunSpec


@torch.no_grad()
def encode(net, pixels_uint8: torch.Tensor, feed, device, batch_size: int = 512):
    """Pooled encoder features of uint8 images, in eval mode, on the CPU."""
    was_training = net.training
    net.eval()
    feats = []
    for start in range(0, len(pixels_uint8), batch_size):
        batch = pixels_uint8[start : start + batch_size].to(device)
        feats.append(net.encoder(feed(batch)).float().cpu())
    net.train(was_training)
    return torch.cat(feats)


def knn_accuracy(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
) -> float:
    """Weighted kNN on cosine similarity (Wu et al. 2018), as in SimCLR-style evaluations."""
    bank = F.normalize(bank, dim=1)
    queries = F.normalize(queries, dim=1)
    k = min(k, len(bank))
    correct = 0
    for start in range(0, len(queries), 1024):
        sim = queries[start : start + 1024] @ bank.t()
        weights, idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(sim), num_classes)
        votes.scatter_add_(1, bank_labels[idx], (weights / temperature).exp())
        correct += (votes.argmax(1) == query_labels[start : start + 1024]).sum().item()
    return correct / len(queries)


@torch.no_grad()
def pooled_layers(
    net, pixels_uint8: torch.Tensor, feed, device, names: list[str], batch_size: int = 512
) -> dict[str, torch.Tensor]:
    """Every named layer of uint8 images, feature maps averaged over space, in eval mode."""
    net.eval()
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    with record_layers(net, names, pooled=True) as captured:
        for start in range(0, len(pixels_uint8), batch_size):
            batch = pixels_uint8[start : start + batch_size].to(device)
            net(feed(batch))
            for name in names:
                parts[name].append(captured[name].float())
    return {name: torch.cat(chunks) for name, chunks in parts.items()}


@torch.no_grad()
def calibrate_batchnorm(net, pixels_uint8: torch.Tensor, feed, device, batch_size: int = 512):
    """Replace every BatchNorm's running statistics by those of the given images: one no-grad
    pass in train mode, averaged over all batches (momentum None). An untrained network keeps
    its initial statistics (mean 0, variance 1) otherwise, which in eval mode scales each
    channel arbitrarily; trained networks got theirs from the training images too."""
    from torch.optim.swa_utils import update_bn

    batches = (
        feed(pixels_uint8[start : start + batch_size].to(device))
        for start in range(0, len(pixels_uint8), batch_size)
    )
    update_bn(batches, net)
    return net.eval()


def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    eval_x: torch.Tensor,
    eval_y: torch.Tensor,
    num_classes: int,
    steps: int = 200,
    weight_decay: float = 1e-4,
) -> tuple[float, float]:
    """(train, eval) accuracy of a multinomial logistic regression on standardised features,
    fitted by full-batch L-BFGS (deterministic: no minibatch order, no learning rate to tune)."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, eval_x = (train_x - mean) / std, (eval_x - mean) / std
    weight = torch.zeros(train_x.shape[1], num_classes, device=train_x.device, requires_grad=True)
    bias = torch.zeros(num_classes, device=train_x.device, requires_grad=True)
    opt = torch.optim.LBFGS(
        [weight, bias], lr=1, max_iter=steps, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        logits = train_x @ weight + bias
        loss = F.cross_entropy(logits, train_y) + weight_decay * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        train_acc = ((train_x @ weight + bias).argmax(1) == train_y).float().mean().item()
        eval_acc = ((eval_x @ weight + bias).argmax(1) == eval_y).float().mean().item()
    return train_acc, eval_acc


def probe_run(
    model_path: str | Path,
    data_path: str | Path,
    out: str | Path,
    layers: str = "all",
    steps: int = 200,
    weight_decay: float = 1e-4,
    untrained: bool = True,
    device: str = "auto",
    log=print,
) -> pd.DataFrame:
    """Linear probes of one trained run (and of its untrained initial network) at every
    registered layer (`layers="all"`) or at the encoder output only (`"pool"`); writes
    `out` (parquet), one row per encoder and layer."""
    trained, inputs = _probe_inputs(model_path, data_path, device)
    meta = inputs.meta
    registry = trained.registry()
    # the representation: the pooled features, or a module import's last chosen layer
    representation = next((la for la in registry if la.kind == "pool"), registry[-1])
    chosen = registry if layers == "all" else [representation]
    encoders = {"trained": trained}
    if untrained:
        encoders["untrained"] = _untrained_encoder(inputs)
    rows = []
    for encoder, net in encoders.items():
        rows += _encoder_rows(inputs, encoder, net, chosen, steps, weight_decay)
        at = next(r for r in rows if r["encoder"] == encoder and r["layer"] == representation.name)
        log(f"{meta['run']} {encoder}: linear probe at {at['layer']} {at['eval_accuracy']:.4f}")
    return _write_probes(rows, inputs, steps, weight_decay, out)


@dataclass
class _ProbeInputs:
    """What every probe of one run needs: its spec and metadata, its feed, the device, and the
    train and clean eval subsets (labels on the device)."""

    run: RunSpec
    meta: dict
    feed: Callable
    dev: torch.device
    train_images: torch.Tensor
    train_labels: torch.Tensor
    eval_images: torch.Tensor
    eval_labels: torch.Tensor


def _probe_inputs(model_path, data_path, device: str):
    """The trained network of `model_path`, and the inputs its probes share."""
    from ckaflow.config import run_spec_from_dict
    from ckaflow.data import open_prepared
    from ckaflow.devices import resolve_device
    from ckaflow.feed import feed_for
    from ckaflow.models import load_network

    dev = resolve_device(device)
    trained, meta = load_network(model_path)
    run = run_spec_from_dict(meta["run_spec"])
    data = open_prepared(data_path)
    feed = feed_for(run, data.attrs)
    train_images, train_labels = (torch.from_numpy(a) for a in data.train())
    eval_images = torch.from_numpy(data.view("clean"))
    eval_labels = torch.from_numpy(data.eval_labels()).to(dev)
    train_labels = train_labels.to(dev)
    inputs = _ProbeInputs(
        run, meta, feed, dev, train_images, train_labels, eval_images, eval_labels
    )
    return trained, inputs


def _untrained_encoder(inputs: _ProbeInputs):
    """The run's exact initial network, its BatchNorm statistics from the training images."""
    from ckaflow.models import initial_network

    dev = inputs.dev
    net = initial_network(inputs.run, inputs.meta["data_attrs"], inputs.meta).to(dev)
    return calibrate_batchnorm(net, inputs.train_images, inputs.feed, dev)


def _encoder_rows(
    inputs: _ProbeInputs, encoder: str, net, chosen: list, steps: int, weight_decay: float
) -> list[dict]:
    """One encoder's probe rows, one per chosen layer, in the order of `chosen`."""
    dev, feed, names = inputs.dev, inputs.feed, [layer.name for layer in chosen]
    net = net.to(dev)
    train_feats = pooled_layers(net, inputs.train_images, feed, dev, names)
    eval_feats = pooled_layers(net, inputs.eval_images, feed, dev, names)
    return [
        _layer_row(inputs, encoder, layer, train_feats, eval_feats, steps, weight_decay)
        for layer in chosen
    ]


def _layer_row(
    inputs: _ProbeInputs,
    encoder: str,
    layer,
    train_feats: dict[str, torch.Tensor],
    eval_feats: dict[str, torch.Tensor],
    steps: int,
    weight_decay: float,
) -> dict:
    """The linear probe of one encoder's layer, as a row of the probes table."""
    run, meta = inputs.run, inputs.meta
    train_acc, eval_acc = linear_probe(
        train_feats[layer.name],
        inputs.train_labels,
        eval_feats[layer.name],
        inputs.eval_labels,
        meta["data_attrs"]["num_classes"],
        steps,
        weight_decay,
    )
    return {
        "run": meta["run"],
        "method": run.method,
        "arch": run.model.arch,
        "width": run.model.width,
        "seed": run.seed,
        "encoder": encoder,
        "layer": layer.name,
        "layer_index": layer.index,
        "layer_kind": layer.kind,
        "stage": layer.stage,
        "block": layer.block,
        "features": train_feats[layer.name].shape[1],
        "train_accuracy": train_acc,
        "eval_accuracy": eval_acc,
    }


def _write_probes(
    rows: list[dict], inputs: _ProbeInputs, steps: int, weight_decay: float, out
) -> pd.DataFrame:
    """The probes table with its settings and provenance, written whole to `out` or not at all."""
    from ckaflow.provenance import atomic_path, code_version

    table = pd.DataFrame(rows).assign(
        n_train=len(inputs.train_images),
        n_eval=len(inputs.eval_images),
        steps=steps,
        weight_decay=weight_decay,
        code_version=code_version(),
        model_spec_hash=inputs.meta["spec_hash"],
    )
    out = Path(out)
    with atomic_path(out) as scratch:
        table.to_parquet(scratch, index=False)
    return table
