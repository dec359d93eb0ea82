"""CKA engine benchmark: all pairs from one Gram per layer, against a per-pair baseline.

    python benchmarks/cka.py            # 20 layers, N = 2,000, feature dims 1,000 .. 50,000
    python benchmarks/cka.py --quick    # a smaller problem, for a smoke run

Measures, in one run on one machine:
  (a) ckaflow: `gram_stats` once per layer (the Gram stage: its best time of --rounds, and the
      median over rounds of its rate over the matmul rate measured just before), then every pair
      (`cka_between`). A block's Gram is symmetric: the stage forms its upper triangle, three
      quarters of the products of t tᵀ; its rate counts the full 2·m²·d of a Gram (the work
      any Gram must deliver), so that a faster way to the same Gram shows as a higher rate;
  (b) a per-pair baseline that builds both Gram matrices for every pair, as common CKA libraries
      do (float32 GEMM on centred rows, float64 HSIC: the same arithmetic, without the reuse);
  (c) the machine's plain float32 matmul throughput (square torch.mm).
Goals: (a) >= 15x faster than (b); the Gram stage >= 80% of (c)'s FLOP rate; (a) == (b) to 1e-8.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from ckaflow.cka.estimators import hsic_unbiased, row_blocks
from ckaflow.cka.grams import gram_stats
from ckaflow.cka.pairs import cka_between


def synthetic_layers(n: int, dims: list[int], seed: int = 0) -> list[np.ndarray]:
    """Post-ReLU layers of a random network: correlated, non-negative, like real activations."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, 64, generator=gen)
    layers = []
    for d in dims:
        w = torch.randn(h.shape[1], d, generator=gen) / h.shape[1] ** 0.5
        h = torch.relu(h @ w)
        layers.append(h.numpy())
        if d > 4096:  # keep the next layer's input small; the stored layer keeps its width
            h = h[:, :4096]
    return layers


def matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best / 1e9


def _block_gram32(x: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(x)
    t = t - t.double().mean(0).float()
    return (t @ t.T).double().numpy()


def baseline_per_pair(layers: list[np.ndarray], batch_size: int) -> np.ndarray:
    """Every pair recomputes both sides' Grams, block by block (torch-cka / ckatorch style)."""
    n = len(layers[0])
    out = np.empty((len(layers), len(layers)))
    for i, x in enumerate(layers):
        for j, y in enumerate(layers):
            xy = xx = yy = 0.0
            for rows in row_blocks(n, batch_size):
                k, l_ = _block_gram32(x[rows]), _block_gram32(y[rows])
                xy += hsic_unbiased(k, l_)
                xx += hsic_unbiased(k, k)
                yy += hsic_unbiased(l_, l_)
            out[i, j] = xy / np.sqrt(xx * yy)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 layers, N = 512, dims to 8,000")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rounds", type=int, default=3, help="Gram stage: best of this many")
    args = parser.parse_args()
    n, n_layers, top = (512, 8, 8000) if args.quick else (2000, 20, 50000)
    dims = np.geomspace(1000, top, n_layers).round().astype(int).tolist()
    layers = synthetic_layers(n, dims)
    b = args.batch_size
    gram_flops = sum(2 * (r.stop - r.start) ** 2 * d for d in dims for r in row_blocks(n, b))

    # Each round times the matmul rate right before the Gram stage: a shared machine's speed
    # drifts within a run, so a ratio is taken within a round, and the median over rounds.
    rounds = []
    for _ in range(args.rounds):
        peak = matmul_gflops()
        t0 = time.perf_counter()
        stats = [gram_stats(x, batch_size=b, device=args.device) for x in layers]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        rounds.append((time.perf_counter() - t0, peak))
    t_gram, peak = min(rounds)
    ratio = float(np.median([gram_flops / t / 1e9 / p for t, p in rounds]))
    t0 = time.perf_counter()
    ours = cka_between(stats, stats)
    t_pairs = time.perf_counter() - t0
    t_ours = t_gram + t_pairs

    t0 = time.perf_counter()
    base = baseline_per_pair(layers, b)
    t_base = time.perf_counter() - t0

    gram_rate = gram_flops / t_gram / 1e9
    diff = float(np.abs(ours - base).max())
    device = "cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu"
    print(
        f"CKA benchmark: {n_layers} post-ReLU layers, N = {n}, batch {b}, "
        f"dims {dims[0]}..{dims[-1]}, device {device}, torch threads {torch.get_num_threads()}"
    )
    print(f"{'measure':<44}{'value':>14}")
    print(f"{'(c) float32 matmul, 2048^3 (GFLOP/s)':<44}{peak:>14.1f}")
    print(f"{'(a) Gram stage (s)':<44}{t_gram:>14.3f}")
    print(f"{'(a) Gram stage (GFLOP/s)':<44}{gram_rate:>14.1f}")
    print(f"{'(a) all pairs from the Grams (s)':<44}{t_pairs:>14.3f}")
    print(f"{'(a) total (s)':<44}{t_ours:>14.3f}")
    print(f"{'(b) per-pair baseline (s)':<44}{t_base:>14.3f}")
    print(f"{'speed-up (b) / (a)  [goal >= 15]':<44}{t_base / t_ours:>14.1f}")
    print(f"{'Gram rate / matmul rate  [goal >= 0.80]':<44}{ratio:>14.2f}")
    print(f"{'max |(a) - (b)|  [goal <= 1e-8]':<44}{diff:>14.2e}")


if __name__ == "__main__":
    main()
