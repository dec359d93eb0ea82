"""`ckaflow.compare` against pytorch-cka's model API on the same networks and images.

    pip install --no-deps pytorch-cka==1.1.3   # optional: without it (b) is skipped
    python benchmarks/live.py                  # 2,048 images; --quick: 512

Two torchvision ResNet-18s (seeds 0 and 1, the 8 residual blocks and the pooled features: 9
layers each) on real images (Fashion-MNIST's test images, grey repeated to RGB, 28 px), one
DataLoader of batch 256 for both libraries, so that both compute the same estimator: minibatch
CKA, unbiased HSIC summed over batches of 256. In one run, each measurement in a fresh
subprocess (time: best of --rounds; memory: the process's peak RSS above its RSS before):
  (a) ckaflow.compare({"a": net0, "b": net1}, loader, layers=..., batch_size=256)
  (b) pytorch-cka 1.1.3  cka.compute_cka(net0, net1, loader, layers=...)
  (r) the reference: the same estimator from float64 networks, in float64 throughout.
Prints each one's time, peak memory and largest distance from (r).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

LAYERS = [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)] + ["avgpool"]
FASHION = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


def networks(dtype=torch.float32):
    import torchvision

    nets = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        nets.append(torchvision.models.resnet18(num_classes=10).to(dtype).eval())
    return nets


def loader(n: int, dtype=torch.float32):
    from ckaflow.datasets import read_idx_images

    grey = torch.from_numpy(read_idx_images(FASHION)[:n].copy()).to(dtype) / 255
    images = ((grey - 0.286) / 0.353).expand(-1, 3, -1, -1).contiguous()
    dataset = torch.utils.data.TensorDataset(images, torch.zeros(n, dtype=torch.long))
    return torch.utils.data.DataLoader(dataset, batch_size=256, shuffle=False)


def run_ckaflow(n: int) -> np.ndarray:
    import ckaflow

    a, b = networks()
    table = ckaflow.compare({"a": a, "b": b}, loader(n), layers=LAYERS, batch_size=256,
                            device="cpu", progress=False)  # fmt: skip
    return table["value"].to_numpy().reshape(len(LAYERS), len(LAYERS))


def run_pytorch_cka(n: int) -> np.ndarray:
    # pytorch-cka's package is called cka, as benchmarks/cka.py is: import it from site-packages
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    sys.modules.pop("cka", None)
    import cka

    a, b = networks()
    (matrix,) = cka.compute_cka(a, b, loader(n), layers=LAYERS, device="cpu", progress=False)
    return matrix.double().numpy()


def run_reference(n: int) -> np.ndarray:
    """Minibatch CKA in float64: float64 networks, float64 Grams and HSIC sums."""
    from ckaflow.cka.estimators import gram_linear, hsic_unbiased

    nets = networks(torch.float64)
    sums = np.zeros((len(LAYERS), len(LAYERS)))
    selfs = [np.zeros(len(LAYERS)), np.zeros(len(LAYERS))]
    modules = [dict(net.named_modules()) for net in nets]
    for images, _ in loader(n, torch.float64):
        grams = []
        for net, named in zip(nets, modules, strict=True):
            seen = {}
            handles = [
                named[name].register_forward_hook(
                    lambda m, i, o, name=name, seen=seen: seen.__setitem__(
                        name, o.flatten(1).numpy()
                    )
                )
                for name in LAYERS
            ]
            with torch.no_grad():
                net(images)
            for h in handles:
                h.remove()
            grams.append([gram_linear(seen[name]) for name in LAYERS])
        for i, k in enumerate(grams[0]):
            selfs[0][i] += hsic_unbiased(k, k)
            for j, l_ in enumerate(grams[1]):
                sums[i, j] += hsic_unbiased(k, l_)
        for j, l_ in enumerate(grams[1]):
            selfs[1][j] += hsic_unbiased(l_, l_)
    return sums / np.sqrt(np.outer(selfs[0], selfs[1]))


MODES = {"ckaflow": run_ckaflow, "pytorch-cka": run_pytorch_cka, "reference": run_reference}


def child(mode: str, n: int, out: str) -> None:
    torch.set_num_threads(torch.get_num_threads())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    matrix = MODES[mode](n)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    np.save(out, matrix)
    print(json.dumps({"seconds": seconds, "peak_mib": peak / 1024}))


def measure(mode: str, n: int, rounds: int, folder: Path) -> tuple[float, float, np.ndarray]:
    best, peak = float("inf"), 0.0
    for _ in range(rounds):
        out = folder / f"{mode}.npy"
        done = subprocess.run(
            [sys.executable, __file__, "--child", mode, "--n", str(n), "--out", str(out)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        result = json.loads(done.stdout.strip().splitlines()[-1])
        best, peak = min(best, result["seconds"]), max(peak, result["peak_mib"])
    return best, peak, np.load(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", default=None)
    parser.add_argument("--n", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    n = args.n or (512 if args.quick else 2048)
    if args.child:
        child(args.child, n, args.out)
        return
    import importlib.util
    import tempfile

    modes = ["ckaflow", "pytorch-cka"] if importlib.util.find_spec("cka") else ["ckaflow"]
    with tempfile.TemporaryDirectory() as tmp:
        _, _, reference = measure("reference", n, 1, Path(tmp))
        print(f"live-model CKA: 2 ResNet-18s x {len(LAYERS)} layers, {n} real images, batch 256,"
              f" CPU, {torch.get_num_threads()} threads, best of {args.rounds}")  # fmt: skip
        print(f"{'':<14}{'seconds':>10}{'peak MiB':>10}{'max |CKA - float64|':>22}")
        for mode in modes:
            seconds, peak, matrix = measure(mode, n, args.rounds, Path(tmp))
            error = float(np.abs(matrix - reference).max())
            print(f"{mode:<14}{seconds:>10.2f}{peak:>10.0f}{error:>22.1e}")


if __name__ == "__main__":
    main()
