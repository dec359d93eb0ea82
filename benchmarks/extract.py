"""Activation-store benchmark: extraction into Zarr against a bare forward pass.

    python benchmarks/extract.py            # demo model (ResNet-18, width 8), 2,000 real images
    python benchmarks/extract.py --quick    # 512 images

In one run, each measurement in a fresh subprocess (so peak memory is its own): images per
second of (bare) the same model and batch with no hooks and no I/O, and of ckaflow's `extract`
into a store with each codec; the ratio to the bare pass (goal >= 0.8 on CPU) and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("bare", "zstd", "lz4", "none", "zstd+float16", "none+float16")  # codec[+dtype]


def prepare(workdir: Path, n: int) -> tuple[Path, Path]:
    """A real Fashion-MNIST data store and a (barely trained) demo model."""
    from ckaflow import config, data
    from ckaflow.train import train_run

    cfg = config.validate(
        {
            "data": {"train_size": 256, "eval_size": n},
            "model": {"width": 8},
            "methods": ["simclr"],
            "recipes": {"simclr": {"epochs": 1}},
        }
    )
    store = data.prepare(config.data_spec(cfg), config.augment_spec(cfg), workdir / "d.zarr")
    run = config.run_specs(cfg)[0]  # one epoch on 256 images: the weights only set the speed
    model = train_run(run, config.augment_spec(cfg), store, workdir / "run", log=lambda _: None)
    return store, model


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def measure(mode: str, store: Path, model: Path, workdir: Path, batch: int) -> dict:
    import torch

    from ckaflow.activations import extract
    from ckaflow.data import open_prepared
    from ckaflow.train.loop import load_network

    data = open_prepared(store)
    pixels = data.view("clean")
    n = len(pixels)
    baseline_mb = current_rss_mb()  # torch, the data and the model are loaded by now
    if mode == "bare":
        net, _ = load_network(model)
        with torch.no_grad():
            net(data.normalise(torch.from_numpy(pixels[:batch]).float() / 255))  # warm-up
            t0 = time.perf_counter()
            for s in range(0, n, batch):
                net(data.normalise(torch.from_numpy(pixels[s : s + batch]).float() / 255))
            seconds = time.perf_counter() - t0
        stored = 0
    else:
        out = workdir / f"{mode}.zarr"
        codec, _, dtype = mode.partition("+")
        t0 = time.perf_counter()
        extract(
            model,
            store,
            "clean",
            out,
            batch_size=batch,
            chunk_rows=batch,
            device="cpu",
            codec=codec,
            dtype=dtype or "float32",
            log=lambda _: None,
        )
        seconds = time.perf_counter() - t0
        stored = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "mode": mode,
        "images_per_s": n / seconds,
        "seconds": seconds,
        "peak_mb": peak_mb,
        "extra_mb": peak_mb - baseline_mb,
        "bytes": stored,
        "n": n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        workdir = Path(args.workdir)
        print(
            json.dumps(
                measure(
                    args.one, workdir / "d.zarr", workdir / "run" / "model.pt", workdir, args.batch
                )
            )
        )
        return
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        prepare(workdir, 512 if args.quick else 2000)
        results = {}
        for mode in MODES:
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--one",
                    mode,
                    "--workdir",
                    tmp,
                    "--batch",
                    str(args.batch),
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            results[mode] = json.loads(out.strip().splitlines()[-1])
    bare = results["bare"]["images_per_s"]
    n = results["bare"]["n"]
    print(
        f"extraction benchmark: ResNet-18 width 8, {n} real Fashion-MNIST images, batch "
        f"{args.batch}, CPU"
    )
    print(
        f"{'mode':<22}{'images/s':>10}{'vs bare':>9}{'peak RSS MB':>13}{'of it extra':>13}"
        f"{'MB on disk':>12}"
    )
    for mode, r in results.items():
        label = "bare forward" if mode == "bare" else f"extract, {mode}"
        print(
            f"{label:<22}{r['images_per_s']:>10.0f}{r['images_per_s'] / bare:>9.2f}"
            f"{r['peak_mb']:>13.0f}{r['extra_mb']:>13.0f}{r['bytes'] / 1e6:>12.1f}"
        )
    print("extra: peak RSS above the process's RSS once torch, the data and the model are loaded")
    print("goal: extract >= 0.80 of the bare forward pass")


if __name__ == "__main__":
    main()
