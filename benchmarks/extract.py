"""Fused Gram stage benchmark: the Gram stage during the forward pass against storing activations.

    python benchmarks/extract.py              # demo model (ResNet-18, width 8), 2,000 real images
    python benchmarks/extract.py --quick      # 512 images
    python benchmarks/extract.py --json r.json --dir /dev/shm   # results as JSON, stores in memory

In one run, on the CPU, each measurement in a fresh subprocess (rounds alternate the modes; each
mode's time is the best over rounds and passes, as this machine's speed varies from run to run):

  (a) bare   the same model's forward pass over the same images in the same batches: no hooks,
             no I/O;
  (b) fused  `ckaflow.stages.gram.fused_gram_store` of every registered layer (minibatch
             estimator, one pass): no activation is stored;
  (c) store  the store-then-Gram path end to end: `ckaflow.activations.extract` of every layer
             (zstd level 1, float32) and then `ckaflow.stages.gram.gram_store` on it (same
             estimator and blocks);
  matmul     the machine's float32 rate on the Gram products themselves: `t @ t.T` for
             t (m, d), one per layer width d and block size m, best of several.

Derived: the fused stage's compute limit = time(a) + the Gram GEMMs' time at the measured rate
(sum over layers and blocks of 2·m²·d FLOPs: full Grams t tᵀ, although the stage forms only
each Gram's upper triangle, three quarters of them, `grams.self_gram`); the goals
(c)/(b) >= 2.5 and limit/(b) >= 0.8 are printed as met or not. Peak RSS: VmHWM above the
process's RSS once torch and the data are loaded (Linux, reset through /proc/self/clear_refs).
When (b) misses its goal (or with `--profile always`) one more subprocess times where the fused
stage's time goes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("bare", "fused", "store", "matmul")
VIEW = "clean"
GOAL_SPEEDUP = 2.5  # (c) / (b)
GOAL_LIMIT = 0.8  # compute limit / (b)


def prepare(workdir: Path, n: int) -> tuple[Path, Path]:
    """A real Fashion-MNIST data store and a (barely trained) demo model."""
    from ckaflow import config, data
    from ckaflow.train.loop import train_run

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


def layer_widths(model: Path, store: Path) -> dict[str, int]:
    """Features of every registered layer, in registry order (one example through the net)."""
    import torch

    from ckaflow.data import open_prepared
    from ckaflow.models import load_network, record_layers

    net, _ = load_network(model)
    data = open_prepared(store)
    pixels = torch.from_numpy(data.group[f"views/{VIEW}"][:1])
    with torch.no_grad(), record_layers(net) as probe:
        net(data.normalise(pixels.float() / 255))
    return {layer.name: int(probe[layer.name].shape[1]) for layer in net.registry()}


def store_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _quiet(_: str) -> None:
    pass


def measure(mode: str, store: Path, model: Path, workdir: Path, batch: int, repeat: int) -> dict:
    """One mode, best of `repeat` passes, in this (fresh) process."""
    import torch

    from ckaflow.activations import extract
    from ckaflow.cka.partitions import partition
    from ckaflow.data import open_prepared
    from ckaflow.models import load_network
    from ckaflow.stages.gram import fused_gram_store, gram_store

    data = open_prepared(store)
    pixels = data.view(VIEW)
    n = len(pixels)
    result: dict = {"mode": mode, "n": n, "threads": torch.get_num_threads()}
    if mode == "matmul":  # the Gram products of the fused stage, shape by shape
        widths = layer_widths(model, store)
        rows = [len(b) for b in partition(n, batch)]
        shapes: dict[tuple[int, int], float] = {}
        for m in sorted(set(rows)):
            for d in sorted(set(widths.values())):
                t = torch.randn(m, d).relu_()
                t -= t.mean(0)
                t @ t.T  # warm-up
                best = float("inf")
                for _ in range(max(5, 2 * repeat)):
                    t0 = time.perf_counter()
                    t @ t.T
                    best = min(best, time.perf_counter() - t0)
                shapes[(m, d)] = best
        flops = sum(2 * m * m * d for m in rows for d in widths.values())
        gemm_s = sum(shapes[(m, d)] for m in rows for d in widths.values())
        peak = max(shapes, key=lambda s: 2 * s[0] ** 2 * s[1] / shapes[s])
        result.update(
            layers=len(widths),
            features=sum(widths.values()),
            block_rows=rows,
            gram_flops=flops,
            gemm_seconds=gemm_s,
            gflops=flops / gemm_s / 1e9,
            peak_gflops=2 * peak[0] ** 2 * peak[1] / shapes[peak] / 1e9,
            peak_shape=list(peak),
            shapes={f"{m}x{d}": s for (m, d), s in shapes.items()},
        )
        return result

    baseline_mb = rss_mb("VmRSS")  # torch and the data are loaded by now
    reset_peak_rss()
    seconds = float("inf")  # best of `repeat`
    if mode == "bare":
        net, _ = load_network(model)
        baseline_mb = rss_mb("VmRSS")
        reset_peak_rss()
        images = torch.from_numpy(pixels)
        with torch.no_grad():
            net(data.normalise(images[:batch].float() / 255))  # warm-up
            for _ in range(repeat):
                t0 = time.perf_counter()
                for s in range(0, n, batch):
                    net(data.normalise(images[s : s + batch].float() / 255))
                seconds = min(seconds, time.perf_counter() - t0)
        result.update(seconds=seconds)
    elif mode == "fused":
        for i in range(repeat):
            out = workdir / f"fused-{os.getpid()}-{i}.zarr"
            t0 = time.perf_counter()
            fused_gram_store(
                model,
                store,
                VIEW,
                out,
                estimator="minibatch",
                batch_size=batch,
                passes=1,
                seed=0,
                device="cpu",
                log=_quiet,
            )
            elapsed = time.perf_counter() - t0
            if elapsed < seconds:
                seconds = elapsed
                keep = workdir / "fused-kept.zarr"  # for the parent's equality check
                shutil.rmtree(keep, ignore_errors=True)
                out.rename(keep)
            else:
                shutil.rmtree(out)
        result.update(seconds=seconds)
    elif mode == "store":
        best = None
        peaks = {"extract": 0.0, "gram": 0.0}
        for i in range(repeat):
            acts = workdir / f"acts-{os.getpid()}-{i}.zarr"
            grams = workdir / f"grams-{os.getpid()}-{i}.zarr"
            reset_peak_rss()
            t0 = time.perf_counter()
            extract(
                model,
                store,
                VIEW,
                acts,
                batch_size=batch,
                chunk_rows=batch,
                device="cpu",
                dtype="float32",
                codec="zstd",
                level=1,
                log=_quiet,
            )
            t1 = time.perf_counter()
            peaks["extract"] = max(peaks["extract"], rss_mb("VmHWM") - baseline_mb)
            reset_peak_rss()
            t2 = time.perf_counter()
            gram_store(acts, grams, "minibatch", batch, "cpu", 1, 0)
            t3 = time.perf_counter()
            peaks["gram"] = max(peaks["gram"], rss_mb("VmHWM") - baseline_mb)
            parts = {"extract": t1 - t0, "gram": t3 - t2, "bytes": store_bytes(acts)}
            if best is None or parts["extract"] + parts["gram"] < best["extract"] + best["gram"]:
                best = parts
                keep = workdir / "store-kept.zarr"
                shutil.rmtree(keep, ignore_errors=True)
                grams.rename(keep)
            shutil.rmtree(acts)
            shutil.rmtree(grams, ignore_errors=True)
        seconds = best["extract"] + best["gram"]
        result.update(
            seconds=seconds,
            extract_seconds=best["extract"],
            gram_seconds=best["gram"],
            bytes=best["bytes"],
            extract_extra_mb=peaks["extract"],
            gram_extra_mb=peaks["gram"],
        )
        result["peak_mb"] = baseline_mb + max(peaks.values())
        result["extra_mb"] = max(peaks.values())
        result["images_per_s"] = n / seconds
        return result
    else:
        raise ValueError(mode)
    peak_mb = rss_mb("VmHWM")
    result.update(
        images_per_s=n / seconds,
        peak_mb=peak_mb,
        extra_mb=peak_mb - baseline_mb,
    )
    return result


def profile_fused(store: Path, model: Path, workdir: Path, batch: int) -> dict:
    """Where the fused stage's time goes: timers wrapped around its parts (no src changes),
    and torch's profiler for the ATen operators. One warm-up pass, then one timed pass."""
    from torch.profiler import ProfilerActivity, profile, record_function

    import ckaflow.models as models
    from ckaflow.cka import grams
    from ckaflow.stages import gram as fused

    timers: dict[str, float] = {}
    stamps: dict[str, float] = {}
    counts: dict[str, int] = {}

    def timed(key, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                timers[key] = timers.get(key, 0.0) + time.perf_counter() - t0
                counts[key] = counts.get(key, 0) + 1
                stamps[key + ".end"] = time.perf_counter()

        return wrapper

    forward = models.Network.forward

    def network_forward(self, x):
        if "probe" not in counts:  # the stage's first forward: one example, for the widths
            return timed("probe", forward)(self, x)
        stamps.setdefault("blocks.start", time.perf_counter())
        return timed("forward", forward)(self, x)

    record = models.record_layers

    def record_layers(net, names=None, sink=None, pooled=False):
        if sink is None:
            return record(net, names, pooled=pooled)
        inner = timed("sink", sink)

        def timed_sink(name, tensor):  # the stage's hook sink: centring and GEMM
            with record_function("gram_sink"):
                return inner(name, tensor)

        return record(net, names, sink=timed_sink, pooled=pooled)

    patches = [
        (models.Network, "forward", network_forward),
        (models, "record_layers", record_layers),
        (grams._Workspace, "centred", timed("centred", grams._Workspace.centred)),
        (fused._Flusher, "add", timed("flusher.add", fused._Flusher.add)),
        (fused._Flusher, "flush", timed("flusher.flush", fused._Flusher.flush)),
    ]
    for owner, name, value in patches:
        setattr(owner, name, value)

    def run(out: Path) -> float:
        t0 = time.perf_counter()
        fused.fused_gram_store(model, store, VIEW, out, batch_size=batch, device="cpu", log=_quiet)
        return t0

    run(workdir / "profile-warm.zarr")
    for d in (timers, stamps, counts):
        d.clear()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t_start = run(workdir / "profile.zarr")
    t_end = time.perf_counter()
    shutil.rmtree(workdir / "profile-warm.zarr")
    shutil.rmtree(workdir / "profile.zarr")
    wall = t_end - t_start
    blocks = stamps["flusher.flush.end"] - stamps["blocks.start"]
    ops = {}
    for e in prof.key_averages():
        ops[e.key] = {"self_s": e.self_cpu_time_total / 1e6, "calls": e.count}
    sink = timers["sink"]
    centred = timers["centred"]
    forward_s = timers["forward"]  # of the blocks, with the hooks and sinks
    flush = timers["flusher.flush"]
    parts = {
        "setup (model, data, probe, arrays) and finish (attrs, rename)": wall - blocks,
        "forward pass itself (hooks excluded)": forward_s - sink,
        "hook sink: centring (mean + subtract into a buffer)": centred,
        "hook sink: Gram GEMM t @ t.T": sink - centred,
        "per block: pixels, stack, float64, isfinite, add": blocks - forward_s - flush,
        "Zarr writes (_Flusher.flush)": flush,
    }
    return {"wall": wall, "parts": parts, "ops": ops, "sink_calls": counts.get("sink", 0)}


def _subprocess(args: list[str]) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, check=False
    )
    if out.returncode:
        sys.stderr.write(out.stderr)
        raise SystemExit(f"measurement {args[:2]} failed (exit {out.returncode})")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare_grams(a: Path, b: Path) -> dict:
    """Max relative difference of the fused and the stored path's Grams, over every layer."""
    import numpy as np

    from ckaflow.gram_stores import load_stats, open_gram

    sa, sb = open_gram(a), open_gram(b)
    names = [layer["name"] for layer in sa.layers]
    worst = 0.0
    for x, y in zip(load_stats(sa, names), load_stats(sb, names), strict=True):
        scale = np.abs(x.grams).max() or 1.0
        worst = max(worst, float(np.abs(x.grams - y.grams).max() / scale))
    return {"layers": len(names), "max_rel_diff": worst}


def best_of(rounds: list[dict], mode: str) -> dict:
    runs = [r[mode] for r in rounds]
    if mode == "matmul":
        return min(runs, key=lambda r: r["gemm_seconds"])
    best = dict(min(runs, key=lambda r: r["seconds"]))
    best["extra_mb"] = max(r["extra_mb"] for r in runs)  # the worst peak seen
    best["seconds_all"] = [r["seconds"] for r in runs]
    return best


def goal(value: float, target: float) -> str:
    return "PASS" if value >= target else "below goal"


def report(results: dict, args, n: int, threads: int) -> dict:
    bare, fused, store, mm = (results[m] for m in MODES)
    limit = bare["seconds"] + mm["gemm_seconds"]
    speedup = store["seconds"] / fused["seconds"]
    of_limit = limit / fused["seconds"]
    derived = {
        "compute_limit_seconds": limit,
        "speedup_vs_store": speedup,
        "fraction_of_compute_limit": of_limit,
        "gram_gflop": mm["gram_flops"] / 1e9,
        "matmul_gflops": mm["gflops"],
        "goals": {
            "speedup_vs_store": {"goal": GOAL_SPEEDUP, "met": speedup >= GOAL_SPEEDUP},
            "fraction_of_compute_limit": {"goal": GOAL_LIMIT, "met": of_limit >= GOAL_LIMIT},
        },
    }
    print(
        f"fused Gram benchmark: ResNet-18 width 8 (CIFAR stem), {n} real Fashion-MNIST images "
        f"({VIEW} view), batch {args.batch}, {mm['layers']} layers ({mm['features']:,} features "
        f"per image), CPU, {threads} threads, best of {args.rounds} rounds x {args.repeat} passes"
    )
    print(
        f"float32 matmul on the Gram shapes (m x d @ d x m): {mm['gflops']:.1f} GFLOP/s over all "
        f"layers and blocks (peak {mm['peak_gflops']:.1f} at m x d = "
        f"{mm['peak_shape'][0]} x {mm['peak_shape'][1]}); Gram work {mm['gram_flops'] / 1e9:.1f} "
        f"GFLOP = {mm['gemm_seconds']:.2f} s at that rate"
    )
    print(f"{'mode':<34}{'seconds':>9}{'images/s':>10}{'extra peak MiB':>16}{'MB on disk':>12}")
    rows = [
        ("(a) bare forward", bare, bare["extra_mb"], None),
        ("(b) fused Gram stage", fused, fused["extra_mb"], None),
        ("(c) store path: extract + gram", store, store["extra_mb"], store["bytes"]),
    ]
    for label, r, extra, size in rows:
        disk = f"{size / 1e6:>12.1f}" if size else f"{'-':>12}"
        print(f"{label:<34}{r['seconds']:>9.2f}{n / r['seconds']:>10.0f}{extra:>16.0f}{disk}")
    for label, key, mb in (
        ("      extract, zstd-1 float32", "extract_seconds", "extract_extra_mb"),
        ("      gram_store", "gram_seconds", "gram_extra_mb"),
    ):
        print(f"{label:<34}{store[key]:>9.2f}{n / store[key]:>10.0f}{store[mb]:>16.0f}{'':>12}")
    print(f"{'compute limit of (b): (a) + GEMMs':<34}{limit:>9.2f}{n / limit:>10.0f}")
    print(
        f"fused is {speedup:.2f}x faster than the store path   "
        f"(goal >= {GOAL_SPEEDUP}: {goal(speedup, GOAL_SPEEDUP)})"
    )
    print(
        f"fused reaches {of_limit:.2f} of its compute limit    "
        f"(goal >= {GOAL_LIMIT}: {goal(of_limit, GOAL_LIMIT)})"
    )
    return derived


def print_profile(p: dict) -> None:
    print(f"where the fused stage's time goes (one profiled pass, {p['wall']:.2f} s wall):")
    for label, seconds in p["parts"].items():
        print(f"  {label:<64}{seconds:>7.2f} s {100 * seconds / p['wall']:>5.1f} %")
    top = sorted(p["ops"].items(), key=lambda kv: -kv[1]["self_s"])[:10]
    print("  top ATen operators by self CPU time (seconds, calls):")
    print(
        "  "
        + ", ".join(f"{k.removeprefix('aten::')} {v['self_s']:.2f} ({v['calls']})" for k, v in top)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="512 images instead of 2,000")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument(
        "--dir", default=None, help="where the stores go (default: the system's temp folder)"
    )
    parser.add_argument("--repeat", type=int, default=2, help="passes per mode and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each running every mode")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)"
    )
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--profile", choices=("auto", "always", "never"), default="auto")
    parser.add_argument("--one", choices=(*MODES, "profile"), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        import torch

        torch.set_num_threads(args.threads)
        workdir = Path(args.workdir)
        store, model = workdir / "d.zarr", workdir / "run" / "model.pt"
        if args.one == "profile":
            result = profile_fused(store, model, workdir, args.batch)
        else:
            result = measure(args.one, store, model, workdir, args.batch, args.repeat)
        print(json.dumps(result))
        return

    n_images = 512 if args.quick else 2000
    load = {"start": os.getloadavg()[0]}  # other work on the machine makes every mode slower
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        workdir = Path(tmp)
        t0 = time.perf_counter()
        prepare(workdir, n_images)
        print(f"prepared data and model in {time.perf_counter() - t0:.0f} s", flush=True)
        common = ["--workdir", tmp, "--batch", str(args.batch), "--threads", str(args.threads)]
        rounds = []
        for r in range(args.rounds):
            order = MODES[r % len(MODES) :] + MODES[: r % len(MODES)]  # alternate the order
            measured = {}
            for mode in order:
                measured[mode] = _subprocess(["--one", mode, "--repeat", str(args.repeat), *common])
            rounds.append(measured)
            print(
                f"round {r + 1}/{args.rounds}: "
                + ", ".join(
                    f"{m} {measured[m].get('seconds', measured[m].get('gemm_seconds')):.2f} s"
                    for m in MODES
                ),
                flush=True,
            )
        results = {mode: best_of(rounds, mode) for mode in MODES}
        load["end"] = os.getloadavg()[0]
        equal = compare_grams(workdir / "fused-kept.zarr", workdir / "store-kept.zarr")
        print()
        derived = report(results, args, n_images, args.threads)
        print(
            f"machine: {os.cpu_count()} cores, load average {load['start']:.1f} at the start and "
            f"{load['end']:.1f} at the end of the rounds (others' work slows every mode)"
        )
        print(
            f"check: the fused Grams equal the store path's to {equal['max_rel_diff']:.1e} "
            f"(max relative difference, {equal['layers']} layers)"
        )
        profiled = None
        below = not derived["goals"]["fraction_of_compute_limit"]["met"]
        if args.profile == "always" or (args.profile == "auto" and below):
            print()
            profiled = _subprocess(["--one", "profile", *common])
            print_profile(profiled)
    if args.json:
        payload = {
            "config": {
                "model": "resnet18 width 8, CIFAR stem",
                "images": n_images,
                "view": VIEW,
                "batch": args.batch,
                "threads": args.threads,
                "rounds": args.rounds,
                "repeat": args.repeat,
                "device": "cpu",
                "cores": os.cpu_count(),
                "load_average": load,
            },
            "results": results,
            "derived": derived,
            "fused_equals_store": equal,
            "rounds": rounds,
            "profile": profiled,
        }
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
