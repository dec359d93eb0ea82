"""The training loop shared by every method: seeded batches, schedule, checkpoint each epoch."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import torch

from ckaflow import evaluate
from ckaflow.augment import hash_seed
from ckaflow.config import AugmentSpec, ModelSpec, RunSpec, stable_hash, to_jsonable
from ckaflow.data import open_prepared
from ckaflow.errors import CheckpointError
from ckaflow.models import Network, resolve_device
from ckaflow.provenance import atomic_path, provenance
from ckaflow.train import checkpoint
from ckaflow.train.optim import make_optimizer, make_schedule
from ckaflow.train.simclr import SimCLR
from ckaflow.train.supervised import Supervised

METHODS = {"simclr": SimCLR, "supervised": Supervised}


def build_network(method: str, spec: ModelSpec, data_attrs: dict, head_outputs: int) -> Network:
    channels, size, _ = data_attrs["image_shape"]
    return Network(method, spec, channels, size, head_outputs)


def train_spec_hash(run: RunSpec, aug: AugmentSpec, data_hash: str) -> str:
    return stable_hash([to_jsonable(run), to_jsonable(aug), data_hash])


def train_run(
    run: RunSpec,
    aug: AugmentSpec,
    data_path: str | Path,
    out_dir: str | Path,
    device: str = "auto",
    log=print,
) -> Path:
    """Train one run; resume from `out_dir/checkpoint.pt` if a matching one exists.

    Writes `model.pt` (weights + metadata) and `metrics.parquet` (one row per epoch).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    if dev.type == "cpu":
        torch.use_deterministic_algorithms(True)
    data = open_prepared(data_path)
    attrs = data.attrs
    spec_hash = train_spec_hash(run, aug, attrs["spec_hash"])
    method = METHODS[run.method](run.recipe, aug)

    torch.manual_seed(hash_seed(run.seed, 0xC0FFEE))
    net = build_network(run.method, run.model, attrs, method.head_outputs(attrs["num_classes"])).to(
        dev
    )
    images_np, labels_np = data.train()
    images = torch.from_numpy(images_np)
    labels = torch.from_numpy(labels_np)
    batch = min(run.recipe.batch_size, len(images))
    steps_per_epoch = len(images) // batch  # drop the ragged last batch: NT-Xent wants full ones
    opt = make_optimizer(net.parameters(), run.recipe)
    sched = make_schedule(opt, run.recipe, steps_per_epoch)

    ckpt_path = out_dir / "checkpoint.pt"
    rows: list[dict] = []
    start_epoch = 0
    if ckpt_path.exists():
        try:
            state = checkpoint.load(ckpt_path, expect_spec_hash=spec_hash)
        except checkpoint.CheckpointError as err:
            log(f"ignoring checkpoint: {err}")
        else:
            net.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["schedule"])
            start_epoch, rows = state["epoch"], state["metrics"]
            log(f"resumed {run.run_id} from epoch {start_epoch}")

    def normalise(x):
        return data.normalise(x)

    for epoch in range(start_epoch, run.recipe.epochs):
        net.train()
        gen = torch.Generator().manual_seed(hash_seed(run.seed, epoch, 0xDA7A))
        order = torch.randperm(len(images), generator=gen)
        t0 = time.perf_counter()
        total_loss, correct, seen = 0.0, 0, 0
        for step in range(steps_per_epoch):
            idx = order[step * batch : (step + 1) * batch]
            pixels = images[idx].to(dev).float() / 255
            loss, stats = method.loss(net, pixels, labels[idx].to(dev), gen, normalise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += loss.item() * len(idx)
            correct += stats.get("correct", 0)
            seen += len(idx)
        seconds = time.perf_counter() - t0
        row = {
            "run": run.run_id,
            "epoch": epoch + 1,
            "loss": total_loss / seen,
            "lr": sched.get_last_lr()[0],
            "seconds": seconds,
            "images_per_s": seen / seconds,
        }
        if run.method == "supervised":
            row["train_accuracy"] = correct / seen
        rows.append(row)
        checkpoint.save(
            ckpt_path,
            {
                "model": net.state_dict(),
                "optimizer": opt.state_dict(),
                "schedule": sched.state_dict(),
                "epoch": epoch + 1,
                "metrics": rows,
                "spec_hash": spec_hash,
            },
        )
        log(
            f"{run.run_id} epoch {epoch + 1}/{run.recipe.epochs} loss {row['loss']:.4f} "
            f"{row['images_per_s']:.0f} img/s "
            f"eta {(run.recipe.epochs - epoch - 1) * seconds:.0f}s"
        )

    # final quality: weighted kNN of pooled features, train subset as the memory bank
    bank = evaluate.encode(net, images, normalise, dev)
    queries = evaluate.encode(net, torch.from_numpy(data.view("clean")), normalise, dev)
    knn = evaluate.knn_accuracy(
        bank, labels, queries, torch.from_numpy(data.eval_labels()), attrs["num_classes"]
    )
    log(f"{run.run_id} kNN accuracy on the eval subset: {knn:.4f}")
    meta = provenance(
        kind="ckaflow.model",
        run=run.run_id,
        run_spec=to_jsonable(run),
        augment=to_jsonable(aug),
        spec_hash=spec_hash,
        data_spec_hash=attrs["spec_hash"],
        data_attrs={k: attrs[k] for k in ("dataset", "image_shape", "num_classes", "mean", "std")},
        head_outputs=method.head_outputs(attrs["num_classes"]),
        epochs=run.recipe.epochs,
        knn_accuracy=knn,
        device=str(dev),
    )
    metrics = pd.DataFrame(rows).assign(knn_accuracy=pd.NA)
    metrics.loc[metrics.index[-1], "knn_accuracy"] = knn
    with atomic_path(out_dir / "metrics.parquet") as scratch:
        metrics.astype({"knn_accuracy": "Float64"}).to_parquet(scratch, index=False)
    with atomic_path(out_dir / "model.pt") as scratch:
        torch.save({"model": net.cpu().state_dict(), "meta": meta}, scratch)
    return out_dir / "model.pt"


def load_network(model_path: str | Path) -> tuple[Network, dict]:
    """Rebuild a trained network from `model.pt`, in eval mode."""
    state = checkpoint.load(Path(model_path))
    meta = state.get("meta")
    if not meta or "run_spec" not in meta:
        raise CheckpointError(
            f"{model_path}: a training checkpoint or foreign file, not a finished model.pt "
            "(it has no run metadata); rerun the train stage"
        )
    run = meta["run_spec"]
    net = build_network(
        run["method"], ModelSpec(**run["model"]), meta["data_attrs"], meta["head_outputs"]
    )
    net.load_state_dict(state["model"])
    return net.eval(), meta
