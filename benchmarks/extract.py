"""Activation-store benchmark: extraction into Zarr against a bare forward pass.

    python benchmarks/extract.py            # demo model (ResNet-18, width 8), 2,000 real images
    python benchmarks/extract.py --quick    # 512 images
    python benchmarks/extract.py --dir /dev/shm   # stores in memory: the disk out of the way

In one run, each measurement in a fresh subprocess: images per second of (bare) the same model
and batch with no hooks and no I/O, and of ckaflow's `extract` into a store with each codec and
dtype; the ratio to the bare pass (goal >= 0.8 on CPU); the peak RSS of the measured section
above the process's RSS once torch, the data and the model are loaded (Linux VmHWM, reset).
"""

from __future__ import annotations

import argparse
import json
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


def reset_peak_rss() -> None:
    """Linux: make VmHWM (the peak RSS) start again from the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def rss_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def measure(mode: str, store: Path, model: Path, workdir: Path, batch: int, repeat: int) -> dict:
    import torch

    from ckaflow.activations import extract
    from ckaflow.data import open_prepared
    from ckaflow.train.loop import load_network

    data = open_prepared(store)
    pixels = data.view("clean")
    n = len(pixels)
    baseline_mb = rss_mb("VmRSS")  # torch, the data and the model are loaded by now
    reset_peak_rss()
    seconds = float("inf")  # best of `repeat`: this machine's speed varies from run to run
    if mode == "bare":
        net, _ = load_network(model)
        with torch.no_grad():
            net(data.normalise(torch.from_numpy(pixels[:batch]).float() / 255))  # warm-up
            for _ in range(repeat):
                t0 = time.perf_counter()
                for s in range(0, n, batch):
                    net(data.normalise(torch.from_numpy(pixels[s : s + batch]).float() / 255))
                seconds = min(seconds, time.perf_counter() - t0)
        stored = 0
    else:
        codec, _, dtype = mode.partition("+")
        for i in range(repeat):
            out = workdir / f"{mode}-{i}.zarr"
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
            seconds = min(seconds, time.perf_counter() - t0)
        stored = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    peak_mb = rss_mb("VmHWM")
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
    parser.add_argument(
        "--dir", default=None, help="where the stores go (default: the system's temp folder)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="best of this many passes")
    parser.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        workdir = Path(args.workdir)
        print(
            json.dumps(
                measure(
                    args.one,
                    workdir / "d.zarr",
                    workdir / "run" / "model.pt",
                    workdir,
                    args.batch,
                    args.repeat,
                )
            )
        )
        return
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
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
                    "--repeat",
                    str(args.repeat),
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
        f"{args.batch}, CPU, best of {args.repeat} passes per mode"
    )
    print(f"{'mode':<22}{'images/s':>10}{'vs bare':>9}{'extra peak MiB':>16}{'MB on disk':>12}")
    for mode, r in results.items():
        label = "bare forward" if mode == "bare" else f"extract, {mode}"
        print(
            f"{label:<22}{r['images_per_s']:>10.0f}{r['images_per_s'] / bare:>9.2f}"
            f"{r['extra_mb']:>16.0f}{r['bytes'] / 1e6:>12.1f}"
        )
    print("goal: extract >= 0.80 of the bare forward pass")


if __name__ == "__main__":
    main()
