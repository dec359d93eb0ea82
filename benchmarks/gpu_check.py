"""GPU check of the fused Gram stage: speed, GPU against CPU statistics, the `.residual` hook.

    bash benchmarks/gpu.sh              # needs CUDA: ResNet-50 (width 64, CIFAR stem, 32 px)
    bash benchmarks/gpu.sh --small      # anywhere, on the CPU: ResNet-50 width 8, few images

Checks, on one process:

  speed      images/s of the bare forward pass (no hooks, no I/O; the stage's own precision and
             memory format) and of `fused_gram_store` over the same images and batches, every
             registered layer (goal: fused >= 0.5 of bare); the GPU's float32 rate on the Gram
             products and the resulting compute limit, for reading the numbers;
  gpu = cpu  the fused Gram store computed on the device and on the CPU for a small case
             (float32 forward, TF32 off on the device): CKA of every layer pair within 1e-8;
  residual   on the device: the hooked `.residual` of every block equals the block's last
             BatchNorm output computed by hand (the tensor before `out += identity`), `.out`
             equals relu(residual + identity), and the fused stage's Gram of each equals the
             Gram of the hand-computed tensor; in float32 and in the stage's default precision.

Data: CIFAR-10 when installed (/usr/share/datasets/cifar10, torchvision's layout), otherwise
real Fashion-MNIST test images resized to 32 px and copied to 3 channels, written in CIFAR-10's
file layout so that `ckaflow.data.prepare` reads them (fine for speed and equality checks; not
for anything about learning). Model: ckaflow's own ResNet-50 with random weights (its BatchNorm
statistics set from training images, so that activations keep a sane scale), saved as
`train_run` saves a model.pt. `--small` runs everything tiny on the CPU, so that a laptop or CI
can check the script; without it, CUDA is required. Exit status 1 when a correctness check fails
(speed goals are reported, not enforced).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pickle
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

CIFAR_ROOT = Path("/usr/share/datasets/cifar10")
FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")
GOAL_SPEED = 0.5  # fused / bare images per second
GOAL_CKA = 1e-8  # max |CKA(device) - CKA(cpu)|
# Two float32 forward passes with different kernels (cuDNN and oneDNN, or channels-last and not
# on one CPU) differ by ~1e-6 relative in deep layers, which moves CKA by ~1e-7: the end-to-end
# comparison is held to this bound, the 1e-8 goal to the Gram computation on equal activations.
SANITY_CKA = 1e-5
GRAM_TOL = 1e-5  # the stage's Gram (float32 GEMM) of bit-equal activations
VIEW = "clean"


def _quiet(_: str) -> None:
    pass


def image_folder(workdir: Path, n_train: int) -> tuple[Path, str]:
    """A CIFAR-10 root: the real one when installed, else Fashion-MNIST in its layout."""
    from ckaflow.data import _cifar_folder, load_fashion_mnist

    with contextlib.suppress(Exception):
        _cifar_folder(CIFAR_ROOT)
        return CIFAR_ROOT, "CIFAR-10"
    source = load_fashion_mnist(FASHION_ROOT)
    folder = workdir / "fmnist-as-cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def as_cifar(images: np.ndarray) -> np.ndarray:  # (N, 1, 28, 28) -> (N, 3072) uint8
        x = torch.from_numpy(np.array(images, dtype=np.float32))
        x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", antialias=False)
        x = x.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1)
        return x.reshape(len(x), -1).numpy()

    for name, images, labels in (
        ("data_batch_1", source.train_images[:n_train], source.train_labels[:n_train]),
        ("test_batch", source.test_images, source.test_labels),
    ):
        with open(folder / name, "wb") as f:
            pickle.dump({"data": as_cifar(images), "labels": labels.tolist()}, f)
    return folder.parent, "Fashion-MNIST resized to 3x32x32"


def prepare(workdir: Path, n: int, width: int, dev: torch.device) -> tuple[Path, Path, str]:
    """(data store, model.pt, what the images are)."""
    from ckaflow import checkpoint, config, data
    from ckaflow.config import to_jsonable
    from ckaflow.models import initial_network
    from ckaflow.provenance import provenance
    from ckaflow.train.loop import train_spec_hash

    n_train = 512
    root, what = image_folder(workdir, 2 * n_train)
    cfg = config.validate(
        {
            "data": {"name": "cifar10", "root": str(root), "train_size": n_train, "eval_size": n},
            "model": {"arch": "resnet50", "width": width},
            "methods": ["simclr"],
            "recipes": {"simclr": {"epochs": 1}},
        }
    )
    aug = config.augment_spec(cfg)
    store = data.prepare(config.data_spec(cfg), aug, workdir / "d.zarr")
    prepared = data.open_prepared(store)
    attrs = prepared.attrs
    run = config.run_specs(cfg)[0]
    net = initial_network(run, attrs).to(dev)
    # BatchNorm statistics from the training images (cumulative average over them), so that a
    # randomly initialised ResNet-50 does not grow its activations block after block
    norms = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    images, _ = prepared.train()
    net.train()
    with torch.no_grad():
        for s in range(0, len(images), 256):
            net(prepared.normalise(torch.from_numpy(images[s : s + 256]).to(dev)))
    for m in norms:
        m.momentum = 0.1
    net.eval()
    meta = provenance(
        kind="ckaflow.model",
        run=run.run_id,
        run_spec=to_jsonable(run),
        augment=to_jsonable(aug),
        spec_hash=train_spec_hash(run, aug, attrs["spec_hash"]),
        data_spec_hash=attrs["spec_hash"],
        data_attrs={k: attrs[k] for k in ("dataset", "image_shape", "num_classes", "mean", "std")},
        head_outputs=run.head_outputs(attrs["num_classes"]),
        epochs=0,
        note="random weights, BatchNorm statistics from training images (benchmarks/gpu_check.py)",
    )
    model = workdir / "run" / "model.pt"
    model.parent.mkdir(parents=True)
    checkpoint.save(
        model, {"model": {k: v.cpu() for k, v in net.state_dict().items()}, "meta": meta}
    )
    return store, model, what


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def stage_forward(data, net, dev: torch.device, precision: str = "auto", channels_last="auto"):
    """The forward pass of the fused stage (same input scaling, autocast and memory format)."""
    from ckaflow.models import forward_settings

    amp, cl = forward_settings(precision, channels_last, dev)
    if cl:
        net = net.to(memory_format=torch.channels_last)

    def forward(pixels: torch.Tensor):
        x = data.normalise(pixels.float() / 255)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(dev.type, dtype=amp) if amp else contextlib.nullcontext():
            return net(x)

    return forward, amp, cl


def widths_of(net, data, dev: torch.device) -> dict[str, int]:
    from ckaflow.models import record_layers

    pixels = torch.from_numpy(data.group[f"views/{VIEW}"][:1]).to(dev)
    with torch.no_grad(), record_layers(net) as probe:
        net(data.normalise(pixels.float() / 255))
    return {layer.name: int(probe[layer.name].shape[1]) for layer in net.registry()}


def gemm_seconds(widths: dict[str, int], rows: list[int], dev: torch.device) -> tuple[float, int]:
    """Time of every Gram product t @ t.T (t: m x d float32 on `dev`) of the stage, best of 3
    per shape, and their FLOPs (2 m^2 d each)."""
    best: dict[tuple[int, int], float] = {}
    for m in sorted(set(rows)):
        for d in sorted(set(widths.values())):
            t = torch.randn(m, d, device=dev)
            t @ t.T
            times = []
            for _ in range(3):
                sync(dev)
                t0 = time.perf_counter()
                t @ t.T
                sync(dev)
                times.append(time.perf_counter() - t0)
            best[(m, d)] = min(times)
            del t
    seconds = sum(best[(m, d)] for m in rows for d in widths.values())
    return seconds, sum(2 * m * m * d for m in rows for d in widths.values())


def check_speed(store: Path, model: Path, work: Path, dev, batch: int, repeat: int) -> dict:
    from ckaflow.cka.partitions import partition
    from ckaflow.data import open_prepared
    from ckaflow.models import load_network
    from ckaflow.stages import gram as fused

    data = open_prepared(store)
    pixels = torch.from_numpy(data.view(VIEW)).to(dev)
    n = len(pixels)
    net, _ = load_network(model)
    net = net.to(dev)
    widths = widths_of(net, data, dev)
    forward, amp, cl = stage_forward(data, net, dev)
    bare = float("inf")
    with torch.no_grad():
        for s in range(0, min(n, 4 * batch), batch):  # warm-up (cuDNN picks its kernels)
            forward(pixels[s : s + batch])
        sync(dev)
        for _ in range(repeat):
            t0 = time.perf_counter()
            for s in range(0, n, batch):
                forward(pixels[s : s + batch])
            sync(dev)
            bare = min(bare, time.perf_counter() - t0)
    del net, pixels
    flush_s = {"total": 0.0}
    flush = fused._Flusher.flush

    def timed_flush(self, units_done):
        t0 = time.perf_counter()
        try:
            flush(self, units_done)
        finally:
            flush_s["total"] += time.perf_counter() - t0

    fused._Flusher.flush = timed_flush
    best, best_flush = float("inf"), 0.0
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    try:
        for i in range(repeat):
            flush_s["total"] = 0.0
            out = work / f"speed-{i}.zarr"
            t0 = time.perf_counter()
            fused.fused_gram_store(
                model, store, VIEW, out, batch_size=batch, device=dev.type, log=_quiet
            )
            seconds = time.perf_counter() - t0
            if seconds < best:
                best, best_flush = seconds, flush_s["total"]
            shutil.rmtree(out)
    finally:
        fused._Flusher.flush = flush
    rows = [len(b) for b in partition(n, batch)]
    gemm, flops = gemm_seconds(widths, rows, dev)
    return {
        "n": n,
        "layers": len(widths),
        "features": sum(widths.values()),
        "precision": str(amp).replace("torch.", "") if amp else "float32",
        "channels_last": cl,
        "bare_seconds": bare,
        "fused_seconds": best,
        "fused_flush_seconds": best_flush,
        "bare_images_per_s": n / bare,
        "fused_images_per_s": n / best,
        "ratio": bare / best,
        "gram_flops": flops,
        "gemm_seconds": gemm,
        "matmul_gflops": flops / gemm / 1e9,
        "compute_limit_seconds": bare + gemm,
        "peak_gpu_mib": torch.cuda.max_memory_allocated(dev) / 2**20
        if dev.type == "cuda"
        else None,
    }


@contextlib.contextmanager
def exact_float32():
    """No TF32 in convolutions or matrix products (restored afterwards)."""
    saved = (torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = saved[0]
        torch.set_float32_matmul_precision(saved[1])


def _stats(path: Path):
    from ckaflow.gram_stores import load_stats, open_gram

    store = open_gram(path)
    names = [layer["name"] for layer in store.layers]
    return names, load_stats(store, names)


def _compare(a: list, b: list) -> dict:
    """CKA of every layer pair from two lists of GramStats of the same layers."""
    from ckaflow.cka.pairs import cka_between

    gram = max(
        float(np.abs(x.grams - y.grams).max() / (np.abs(y.grams).max() or 1.0))
        for x, y in zip(a, b, strict=True)
    )
    cka_a, cka_b = cka_between(a, a), cka_between(b, b)
    return {
        "layers": len(a),
        "max_cka_diff": float(np.nanmax(np.abs(cka_a - cka_b))),
        "nan_pairs": int(np.isnan(cka_a).sum() + np.isnan(cka_b).sum()),
        "min_same_layer_cka": float(np.nanmin(np.diag(cka_between(a, b)))),
        "max_gram_rel_diff": gram,
    }


def check_device_vs_cpu(store: Path, model: Path, work: Path, dev, examples: int, batch: int):
    """The fused stage on the device against the CPU, float32 forward on both (no TF32): end to
    end, and the Gram computation alone on the very same activations (the CPU's forward pass,
    `gram_stats` on each device: the block code shared by both Gram paths). On the CPU
    (--small) the device side runs channels-last, so that its convolution kernels differ."""
    from ckaflow.cka.grams import gram_stats
    from ckaflow.data import open_prepared
    from ckaflow.models import load_network, record_layers
    from ckaflow.stages.gram import fused_gram_store

    common = dict(batch_size=batch, examples=examples, precision="fp32", log=_quiet)
    with exact_float32():
        on_dev = fused_gram_store(
            model, store, VIEW, work / "dev.zarr", device=dev.type, channels_last=True, **common
        )
    on_cpu = fused_gram_store(
        model, store, VIEW, work / "cpu.zarr", device="cpu", channels_last=False, **common
    )
    names, a = _stats(on_dev)
    _, b = _stats(on_cpu)
    end_to_end = {"examples": examples, "batch": batch, **_compare(a, b)}

    # the same activations: one CPU forward pass of half the examples, every layer
    data = open_prepared(store)
    net, _ = load_network(model)
    rows = max(2 * 4, examples // 2)
    pixels = torch.from_numpy(data.group[f"views/{VIEW}"][:rows])
    with torch.no_grad(), record_layers(net, names) as acts:
        net(data.normalise(pixels.float() / 255))
    block = max(4, batch // 2)
    with exact_float32():
        a = [gram_stats(acts[n], batch_size=block, device=str(dev), name=n) for n in names]
    b = [gram_stats(acts[n], batch_size=block, device="cpu", name=n) for n in names]
    same = {"examples": rows, "batch": block, **_compare(a, b)}
    return {"end_to_end": end_to_end, "same_activations": same}


def _manual_block(block, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(residual, identity, out) of a torchvision BasicBlock or Bottleneck, by hand."""
    from torchvision.models.resnet import Bottleneck

    out = torch.relu(block.bn1(block.conv1(x)))
    if isinstance(block, Bottleneck):
        out = torch.relu(block.bn2(block.conv2(out)))
        residual = block.bn3(block.conv3(out))
    else:
        residual = block.bn2(block.conv2(out))
    identity = block.downsample(x) if block.downsample is not None else x
    return residual, identity, torch.relu(residual + identity)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(1), b.double().flatten(1)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _gram(t: torch.Tensor, dev) -> np.ndarray:
    """The stage's own Gram of a block (stats._Workspace centring, then t @ t.T)."""
    from ckaflow.cka.grams import _Workspace

    t = _Workspace(dev).centred(t.flatten(1), None)
    return (t @ t.T).double().cpu().numpy()


def check_residual(
    store: Path, model: Path, work: Path, dev, m: int, precision: str, channels_last="auto"
) -> dict:
    """Hooked `.residual` / `.out` against the hand computation, and the fused stage's Grams
    of them against the Grams of the hand-computed tensors (one block of m examples)."""
    from ckaflow.models import forward_settings

    amp, _ = forward_settings(precision, channels_last, dev)
    with exact_float32() if amp is None else contextlib.nullcontext(), torch.no_grad():
        return _check_residual(store, model, work, dev, m, precision, channels_last)


def _check_residual(store, model, work, dev, m: int, precision: str, channels_last) -> dict:
    from ckaflow.data import open_prepared
    from ckaflow.gram_stores import load_stats, open_gram
    from ckaflow.models import load_network, record_layers
    from ckaflow.stages.gram import fused_gram_store

    data = open_prepared(store)
    net, _ = load_network(model)
    net = net.to(dev)
    forward, amp, cl = stage_forward(data, net, dev, precision, channels_last)
    blocks = {
        f"layer{s}.{b}": block
        for s in range(1, 5)
        for b, block in enumerate(getattr(net.encoder, f"layer{s}"))
    }
    names = [f"{p}.{kind}" for p in blocks for kind in ("residual", "out")]
    inputs: dict[str, torch.Tensor] = {}

    def keep_input(prefix: str):
        return lambda _, args: inputs.__setitem__(prefix, args[0].clone())

    handles = [block.register_forward_pre_hook(keep_input(p)) for p, block in blocks.items()]
    pixels = torch.from_numpy(data.group[f"views/{VIEW}"][:m]).to(dev)
    try:
        with record_layers(net, names) as captured:
            forward(pixels)
            hooked = dict(captured)
    finally:
        for handle in handles:
            handle.remove()
    # by hand, with no hook attached any more (bn3's hook would overwrite the captured value)
    worst = {"residual": 0.0, "out": 0.0, "post_add": float("inf"), "gram": 0.0}
    manual = {}
    for prefix, block in blocks.items():
        with torch.autocast(dev.type, dtype=amp) if amp else contextlib.nullcontext():
            residual, identity, out = _manual_block(block, inputs[prefix])
        manual[f"{prefix}.residual"], manual[f"{prefix}.out"] = residual, out
        worst["residual"] = max(worst["residual"], _rel(hooked[f"{prefix}.residual"], residual))
        worst["out"] = max(worst["out"], _rel(hooked[f"{prefix}.out"], out))
        # what a hook reading the tensor after `out += identity` would have seen
        post_add = _rel(hooked[f"{prefix}.residual"], residual + identity)
        worst["post_add"] = min(worst["post_add"], post_add)
    fused = fused_gram_store(
        model,
        store,
        VIEW,
        work / f"residual-{precision}.zarr",
        batch_size=m,
        examples=m,
        layers=names,
        device=dev.type,
        precision=precision,
        channels_last=channels_last,
        log=_quiet,
    )
    for name, s in zip(names, load_stats(open_gram(fused), names), strict=True):
        k = _gram(manual[name], dev)
        rel = np.abs(s.grams[0] - k).max() / (np.abs(k).max() or 1.0)
        worst["gram"] = max(worst["gram"], float(rel))
    label = str(amp).replace("torch.", "") if amp else "float32"
    return {"precision": label, "channels_last": cl, "blocks": len(blocks), "rows": m, **worst}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny, on the CPU (no GPU needed)")
    parser.add_argument("--images", type=int, default=None, help="default 10,000 (small: 256)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--dir", default=None, help="scratch folder (default: the temp folder)")
    args = parser.parse_args()
    t_start = time.perf_counter()
    if args.small:
        dev, width, n, batch, repeat = torch.device("cpu"), 8, args.images or 256, 64, 2
        cmp_examples, cmp_batch, residual_rows = 128, 64, 32
        tol = {"float32": 1e-5, "reduced": 2e-2}
    else:
        if not torch.cuda.is_available():
            print(
                "gpu_check: no CUDA GPU is visible (torch.cuda.is_available() is False); run on "
                "a GPU machine, or pass --small for the CPU rehearsal",
                file=sys.stderr,
            )
            return 2
        dev, width, n, batch, repeat = torch.device("cuda", 0), 64, args.images or 10_000, 256, 3
        cmp_examples, cmp_batch, residual_rows = 512, 128, 64
        tol = {"float32": 1e-5, "reduced": 2e-2}  # bf16: same kernels, so ~0 is expected
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "none (CPU, --small)"
    print(f"GPU: {name}; torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        work = Path(tmp)
        store, model, what = prepare(work, n, width, dev)
        t_prep = time.perf_counter() - t_start
        print(f"prepared {n} images ({what}) and ResNet-50 width {width} in {t_prep:.0f} s")
        speed = check_speed(store, model, work, dev, batch, repeat)
        print(f"speed done ({time.perf_counter() - t_start:.0f} s)", flush=True)
        versus = check_device_vs_cpu(store, model, work, dev, cmp_examples, cmp_batch)
        print(f"device vs CPU done ({time.perf_counter() - t_start:.0f} s)", flush=True)
        residual = [
            check_residual(store, model, work, dev, residual_rows, "fp32"),
            # the stage's default on a GPU (bf16, channels-last), rehearsed as such on the CPU
            check_residual(store, model, work, dev, residual_rows, "bf16", True),
        ]
    total = time.perf_counter() - t_start

    rows: list[tuple[str, str, str, str]] = []
    failed = False

    def row(label: str, value: str, goal: str = "", ok: bool | None = None, hard: bool = True):
        nonlocal failed
        verdict = "" if ok is None else ("PASS" if ok else ("FAIL" if hard else "below goal"))
        failed |= ok is False and hard
        rows.append((label, value, goal, verdict))

    s = speed
    setting = f"{s['precision']}{', channels-last' if s['channels_last'] else ''}"
    row(f"bare forward, images/s ({setting})", f"{s['bare_images_per_s']:,.0f}")
    row("fused Gram stage, images/s", f"{s['fused_images_per_s']:,.0f}")
    row("fused / bare", f"{s['ratio']:.2f}", f">= {GOAL_SPEED}", s["ratio"] >= GOAL_SPEED, False)
    row(
        "  of which Zarr writes (s / fused s)",
        f"{s['fused_flush_seconds']:.2f} / {s['fused_seconds']:.2f}",
    )
    row(
        "  Gram GEMMs: GFLOP at fp32 GFLOP/s",
        f"{s['gram_flops'] / 1e9:,.0f} at {s['matmul_gflops']:,.0f}",
    )
    row(
        "  compute limit (bare + GEMMs) / fused",
        f"{s['compute_limit_seconds'] / s['fused_seconds']:.2f}",
    )
    e, g = versus["end_to_end"], versus["same_activations"]
    row(
        f"device vs CPU, fused stage: max |dCKA|, {e['layers']}^2 pairs",
        f"{e['max_cka_diff']:.1e}",
        f"<= {GOAL_CKA:.0e}",
        e["max_cka_diff"] <= GOAL_CKA,
        False,
    )
    row(
        "  same, sanity bound (float32 noise ~1e-7)",
        f"{e['max_cka_diff']:.1e}",
        f"<= {SANITY_CKA:.0e}",
        e["max_cka_diff"] <= SANITY_CKA and e["nan_pairs"] == 0,
    )
    row("  max Gram relative difference", f"{e['max_gram_rel_diff']:.1e}")
    row(
        "device vs CPU, Gram of the same activations",
        f"{g['max_cka_diff']:.1e}",
        f"<= {GOAL_CKA:.0e}",
        g["max_cka_diff"] <= GOAL_CKA and g["nan_pairs"] == 0,
    )
    for r in residual:
        t = tol["float32"] if r["precision"] == "float32" else tol["reduced"]
        tag = f"{r['precision']}{', channels-last' if r['channels_last'] else ''}"
        row(
            f".residual = last BN output ({tag})",
            f"{r['residual']:.1e}",
            f"<= {t:.0e}",
            r["residual"] <= t,
        )
        row(
            f".out = relu(residual + identity) ({tag})",
            f"{r['out']:.1e}",
            f"<= {t:.0e}",
            r["out"] <= t,
        )
        row(
            f"  post-addition tensor would differ by ({tag})",
            f"{r['post_add']:.1e}",
            f"> {10 * t:.0e}",
            r["post_add"] > 10 * t,
        )
        row(
            f"fused Grams = fp32 Grams of hand-made ({tag})",
            f"{r['gram']:.1e}",
            f"<= {GRAM_TOL:.0e}",
            r["gram"] <= GRAM_TOL,
        )

    print()
    print(
        f"fused Gram stage, {'CPU rehearsal (--small)' if args.small else 'GPU'}: ResNet-50 width "
        f"{width} (CIFAR stem, 32 px), {n} images ({what}), batch {batch}, {s['layers']} layers "
        f"({s['features']:,} features per image); device vs CPU: {e['examples']} images in "
        f"blocks of {e['batch']} (same activations: {g['examples']} in blocks of {g['batch']}); "
        f"residual check: {residual[0]['blocks']} blocks x {residual[0]['rows']} images"
    )
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    print(f"{'check':<{widths[0]}}  {'value':>{widths[1]}}  {'goal':<{widths[2]}}  result")
    for label, value, goal, verdict in rows:
        print(f"{label:<{widths[0]}}  {value:>{widths[1]}}  {goal:<{widths[2]}}  {verdict}")
    print(f"total {total:.0f} s; {'FAILED' if failed else 'all correctness checks passed'}")
    if args.json:
        payload = {
            "gpu": name,
            "small": args.small,
            "images": what,
            "speed": speed,
            "device_vs_cpu": versus,
            "residual": residual,
            "seconds": total,
            "failed": failed,
        }
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
