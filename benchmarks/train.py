"""Training-loop benchmark: ckaflow's loop against a bare PyTorch loop, same model and batch.

    python benchmarks/train.py            # demo model (ResNet-18, width 8), 2,048 real images
    python benchmarks/train.py --quick    # 1,024 images, one round

The bare loop is what a researcher would write by hand: the same network, optimiser, batch,
augmentations and loss, with no schedule, checkpoints, metrics or progress display. ckaflow's
loop is `train_run` itself; its speed is the images/s of its last epoch (its own metrics table:
setup and the final kNN evaluation excluded, as they are outside the loop). The two alternate
for several rounds and each keeps its best round. Goal: ckaflow >= 0.9 of the bare loop.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch


def bare_epoch(run, aug, data, device) -> float:
    """Images per second of one epoch of a hand-written loop (after one warm-up step)."""
    from ckaflow.augment import apply_geometry, sample_crop_flip, sample_simclr, simclr_view
    from ckaflow.models import initial_network
    from ckaflow.train.losses import nt_xent
    from ckaflow.train.optim import make_optimizer

    net = initial_network(run, data.attrs).to(device).train()
    opt = make_optimizer(net, run.recipe)
    images, labels = (torch.from_numpy(a) for a in data.train())
    batch = run.recipe.batch_size
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(images), generator=gen)
    steps = len(images) // batch

    def step(i: int) -> None:
        idx = order[i * batch : (i + 1) * batch]
        x = images[idx].to(device).float() / 255
        if run.method == "simclr":
            p1, p2 = sample_simclr(batch, aug, gen), sample_simclr(batch, aug, gen)
            z = net(data.normalise(torch.cat([simclr_view(x, p1), simclr_view(x, p2)])))
            loss = nt_xent(z[:batch], z[batch:], run.recipe.temperature)
        else:
            params = sample_crop_flip(batch, x.shape[-1], gen)
            logits = net(data.normalise(apply_geometry(x, params)))
            loss = torch.nn.functional.cross_entropy(logits, labels[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step(0)  # warm-up (ckaflow's measured epoch is its second, so both are warm)
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    return steps * batch / (time.perf_counter() - t0)


def ckaflow_epoch(run, aug, store: Path, workdir: Path, device) -> float:
    from ckaflow.train.loop import train_run

    out = workdir / f"run-{time.monotonic_ns()}"
    train_run(run, aug, store, out, device=str(device), log=lambda _: None)
    return float(pd.read_parquet(out / "metrics.parquet")["images_per_s"].iloc[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)  # as train_run on the CPU: same kernels for both
    from ckaflow import config, data
    from ckaflow.devices import resolve_device

    n = 1024 if args.quick else 2048
    rounds = 1 if args.quick else args.rounds
    cfg = config.validate(
        {
            "data": {"train_size": n, "eval_size": 64},
            "model": {"width": 8},
            "recipes": {
                "simclr": {"epochs": 2, "batch_size": 256, "optimizer": "lars", "lr": 1.0},
                "supervised": {"epochs": 2, "batch_size": 128, "lr": 0.05},
            },
        }
    )
    device = resolve_device("auto")
    aug = config.augment_spec(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        store = data.prepare(config.data_spec(cfg), aug, workdir / "d.zarr")
        prepared = data.open_prepared(store)
        print(
            f"training-loop benchmark: ResNet-18 width 8, {n} real Fashion-MNIST images, "
            f"{device}, {args.threads} threads, best of {rounds} rounds"
        )
        print(f"{'method':<12}{'batch':>6}{'bare img/s':>12}{'ckaflow img/s':>15}{'ratio':>8}")
        for run in config.run_specs(cfg):
            bare, ours = 0.0, 0.0
            for _ in range(rounds):
                bare = max(bare, bare_epoch(run, aug, prepared, device))
                ours = max(ours, ckaflow_epoch(run, aug, store, workdir, device))
            print(
                f"{run.method:<12}{run.recipe.batch_size:>6}{bare:>12.0f}{ours:>15.0f}"
                f"{ours / bare:>8.2f}"
            )


if __name__ == "__main__":
    main()
