"""The anchor workload: exact full-data CKA of 20 layers x 2,000 examples, against
pytorch-cka's full-batch CKA and against the float32 GEMMs both need.

    pip install --no-deps pytorch-cka==1.1.3   # optional: without it (b) is skipped
    python benchmarks/anchor.py

In one run, on one machine (the layers of benchmarks/cka.py: post-ReLU, dims 1,000..50,000):
  (a) ckaflow  `cka_matrix(layers, estimator="debiased")`: float32 Grams on centred rows,
               float64 U-centring and HSIC, every pair;
  (b) pytorch-cka 1.1.3  `cka_from_features(feats, feats)`: float32 throughout;
  (c) the float32 GEMMs alone: one centred n x n Gram per layer (`t @ t.T`), the compute both
      need (ckaflow forms each Gram from symmetric pairs of row chunks, about half of it);
  (r) the reference: the same estimator in float64 from float64 Grams.
Prints each time, (a)/(b), (a)/(c), and each one's largest distance from (r).
"""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from cka import synthetic_layers  # noqa: E402  (benchmarks/cka.py)

# pytorch-cka's package is also called cka: import it from site-packages, not from here
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
del sys.modules["cka"]

from ckaflow.cka.estimators import hsic_unbiased  # noqa: E402
from ckaflow.cka.matrix import cka_matrix  # noqa: E402


def reference(layers: list[np.ndarray]) -> np.ndarray:
    """Debiased CKA of every pair in float64."""
    grams = []
    for x in layers:
        t = torch.from_numpy(x).double()
        t -= t.mean(0)
        grams.append((t @ t.T).numpy())
    self_terms = [hsic_unbiased(k, k) for k in grams]
    out = np.empty((len(layers), len(layers)))
    for i, k in enumerate(grams):
        for j, g in enumerate(grams):
            out[i, j] = hsic_unbiased(k, g) / np.sqrt(self_terms[i] * self_terms[j])
    return out


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    n = 2000
    dims = np.geomspace(1000, 50000, 20).round().astype(int).tolist()
    layers = synthetic_layers(n, dims)
    feats = [torch.from_numpy(x) for x in layers]
    ours, t_ours = timed(lambda: cka_matrix(layers, estimator="debiased", device="cpu"))

    def gemms():
        for f in feats:
            t = f - f.mean(0)
            t @ t.T

    _, t_gemm = timed(gemms)
    try:
        pcka = importlib.import_module("cka")
        theirs, t_theirs = timed(lambda: pcka.cka_from_features(feats, feats).numpy())
    except ImportError:
        theirs, t_theirs = None, float("nan")
    ref = reference(layers)
    print(
        f"anchor workload: {len(layers)} post-ReLU layers, N = {n}, dims {dims[0]}..{dims[-1]}, "
        f"CPU, torch threads {torch.get_num_threads()}"
    )
    print(f"{'measure':<52}{'seconds':>10}{'max |x - ref|':>16}")
    print(
        f"{'(a) ckaflow cka_matrix, debiased':<52}{t_ours:>10.2f}{np.abs(ours - ref).max():>16.1e}"
    )
    if theirs is not None:
        err = np.abs(theirs - ref).max()
        print(f"{'(b) pytorch-cka 1.1.3 cka_from_features':<52}{t_theirs:>10.2f}{err:>16.1e}")
    print(f"{'(c) float32 GEMMs alone (a full Gram per layer)':<52}{t_gemm:>10.2f}")
    print(f"(a) / (b) = {t_ours / t_theirs:.2f} (goal <= 1.5); (a) / (c) = {t_ours / t_gemm:.2f}")


if __name__ == "__main__":
    main()
