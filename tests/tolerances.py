"""Test tolerances derived from the floating-point arithmetic of the code under test.

A tolerance here is a bound on rounding error, computed from the unit roundoff u of the
precision (2⁻²⁴ for float32, 2⁻⁵³ for float64), the lengths of the sums involved and the
magnitudes of the values, never from what one machine happened to produce. Two results of the
same quantity computed by different kernels (another CPU, the GPU, another batch shape) differ
by at most the sum of their two bounds.

Dot products (Higham 2002, §3.1; Higham & Mary 2019, "A new approach to probabilistic rounding
error analysis", SIAM J. Sci. Comput. 41(5), Thm. 3.1): a length-p dot product xᵀy evaluated
in precision u in *any* order of summation (BLAS kernels block, use FMA and several
accumulators: each is some order) satisfies |fl(xᵀy) − xᵀy| ≤ c·|x|ᵀ|y| with

    c = γ_p = p·u / (1 − p·u)                             always, or
    c = γ̃_p(λ) = exp(λ·√p·u + p·u²/(1 − u)) − 1 ≈ λ·√p·u
                                    with probability ≥ 1 − 2p·exp(−λ²(1 − u)²/2)

when the rounding errors are independent, mean-zero random variables (the model of Higham &
Mary, who show it describes such sums well). λ = 10 makes the failure probability at
most 4·10⁻²²·p per dot product: for every Gram entry of every test run ever, negligible.
`dot_rtol` takes the smaller of the two (γ_p is smaller for p < λ², i.e. short sums).

Bounds on longer computations (`cka_atol`, `sequential_atol`) are first order in u. Where two
results come from the same kernels on the same values, the tests assert equality instead.
"""

from __future__ import annotations

import math

import numpy as np

U32 = 2.0**-24  # unit roundoff of float32
U64 = 2.0**-53  # unit roundoff of float64
LAMBDA = 10.0  # confidence parameter of the probabilistic bound (see the module docstring)


def gamma(n: int, u: float = U32) -> float:
    """γ_n = n·u/(1 − n·u): the relative error of n successive roundings (Higham, Lemma 3.1)."""
    if n * u >= 1:
        raise ValueError(f"{n} roundings at u = {u}: no bound")
    return n * u / (1 - n * u)


def dot_rtol(p: int, u: float = U32, lam: float = LAMBDA) -> float:
    """c with |fl(xᵀy) − xᵀy| ≤ c·|x|ᵀ|y| for a length-p dot product (or sum of p terms, or one
    entry of a GEMM with inner dimension p) in precision u, in any summation order:
    min(γ_p, γ̃_p(λ))."""
    p = max(int(p), 1)
    probabilistic = math.expm1(lam * math.sqrt(p) * u + p * u * u / (1 - u))
    return min(gamma(p, u), probabilistic) if p * u < 1 else probabilistic


def float32_dot_rtol(p: int) -> float:
    """`dot_rtol` for float32 accumulation (u = 2⁻²⁴): e.g. 3.3·10⁻⁵ for p = 3136 features."""
    return dot_rtol(p, U32)


def mean_rtol(n: int, u: float = U32) -> float:
    """|fl(mean) − mean| ≤ mean_rtol(n)·mean(|x|): a sum of n terms, then one division."""
    return (1 + dot_rtol(n, u)) * (1 + u) - 1


def gram_rtol(p: int, u: float = U32) -> float:
    """ε with |K̂ᵢⱼ − Kᵢⱼ| ≤ ε·Σₖ|tᵢₖ||tⱼₖ| ≤ ε·‖tᵢ‖‖tⱼ‖ for the Gram stage's K̂ = fl(t̂ t̂ᵀ),
    t̂ = fl(x − c): each centred value is rounded once (factor 1 + u, twice per product), then
    the length-p products are summed (`dot_rtol`). K is the exact Gram of x − c for the same c."""
    return (1 + u) ** 2 * (1 + dot_rtol(p, u)) - 1


def _precision(x) -> float:
    """The Gram stage's GEMM runs in float64 for float64 input, else in float32."""
    return U64 if np.asarray(x).dtype == np.float64 else U32


def row_scale(x, u: float | None = None) -> np.ndarray:
    """r with ‖tᵢ‖ ≤ rᵢ for the rows t = x − c the Gram stage multiplies, c its computed column
    mean: ‖xᵢ − x̄‖ plus ‖c − x̄‖ ≤ `mean_rtol`(n)·‖mean|x|‖ (a constant shift is exactly
    removed by the centring of the Gram, so only this bound on ‖tᵢ‖ matters)."""
    u = _precision(x) if u is None else u
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    shift = mean_rtol(len(x), u) * np.linalg.norm(np.abs(x).mean(axis=0))
    return np.linalg.norm(x - x.mean(axis=0), axis=1) + shift


def gram_atol(x, u: float | None = None) -> np.ndarray:
    """Entrywise bound ε·rᵢrⱼ (`gram_rtol`, `row_scale`) on the error of one computed Gram of the
    rows of x (n, ...) centred on their column mean, in x's precision (`_precision`)."""
    u = _precision(x) if u is None else u
    features = int(np.prod(np.shape(x)[1:]))
    r = row_scale(x, u)
    return gram_rtol(features, u) * np.outer(r, r)


def _block(x, estimator: str) -> tuple[float, float]:
    """(‖v‖², bound on ‖δv‖²) for one block's HSIC vector v (`grams.block_vector`, without its
    normalisation, which scales both alike): v = U(K) (U-centring) or HKH, K the block's Gram.

    |δK| ≤ E entrywise (`gram_atol`), so ‖δK‖_F ≤ ‖E‖_F; U-centring is linear with operator
    norm √(2(m−1)/(m−2)) on m × m matrices (the largest singular value of its m² × m² matrix;
    ≤ √3; 1 on symmetric ones, but a GEMM need not round Kᵢⱼ and Kⱼᵢ alike), double centring
    is a projection (norm 1). rbf: Lᵢⱼ = exp(−sᵢⱼ/2σ²)
    with sᵢⱼ = Kᵢᵢ + Kⱼⱼ − 2Kᵢⱼ, so |δsᵢⱼ| ≤ Eᵢᵢ + Eⱼⱼ + 2Eᵢⱼ, σ² = 0.64·median(s) moves by at
    most 0.64·max|δs| (a median is 1-Lipschitz), and to first order
    |δLᵢⱼ| ≤ Lᵢⱼ(|δsᵢⱼ|/2σ² + sᵢⱼ|δσ²|/2σ⁴). The float64 centring itself (sums of m terms)
    adds at most 4γ_{m+3}(2⁻⁵³)·max|K| per entry.
    """
    from ckaflow.cka.estimators import center_gram, gram_linear, u_center
    from ckaflow.cka.grams import RBF_SIGMA_FRACTION, rbf_from_linear

    e = gram_atol(x)
    k = gram_linear(x)
    m = len(k)
    if estimator == "rbf":
        d = np.diag(e)
        ds = d[:, None] + d[None, :] + 2 * e
        s = np.maximum(np.diag(k)[:, None] + np.diag(k)[None, :] - 2 * k, 0)
        sigma2 = RBF_SIGMA_FRACTION**2 * np.median(s)
        dsigma2 = RBF_SIGMA_FRACTION**2 * ds.max()
        k = rbf_from_linear(k)
        e = k * (ds / (2 * sigma2) + s * dsigma2 / (2 * sigma2**2))
    if estimator in ("minibatch", "debiased"):
        v, norm = u_center(k), math.sqrt(2 * (m - 1) / (m - 2))
    else:
        v, norm = center_gram(k), 1.0
    err = norm * np.linalg.norm(e) + m * 4 * gamma(m + 3, U64) * np.abs(k).max()
    return float(np.sum(v * v)), float(err**2)


def cka_atol(x, y, blocks, estimator: str = "minibatch") -> float:
    """Bound on |computed − exact| CKA of x and y (n, ...) for one path that forms each block's
    Gram in the inputs' precision (float32, or float64 for float64 input) and does everything
    else in float64, as `ckaflow.cka.grams` does; `blocks`: the row indices of every block
    (`partitions.partition`; one block of all rows for the full-data estimators).

    Propagation: CKA = cos∠(a, b), a and b the concatenated (normalised) block vectors. A
    perturbation δa turns a by an angle of at most arcsin(‖δa‖/‖a‖) (`_block` bounds ‖δa‖),
    and cos is 1-Lipschitz in the angle, so |δCKA| ≤ arcsin η_a + arcsin η_b. The three float64
    inner products of length N = Σ m² and the ratio add 3·dot_rtol(N, 2⁻⁵³) + 4·2⁻⁵³. (The plain
    estimators of `ckaflow.cka.estimators`, the tests' float64 references, reach the same HSIC
    terms through other float64 sums of at most 4m² products: relative rounding of order
    γ_{4m²}(2⁻⁵³) ≈ 2·10⁻¹² at m = 64, 10⁷ times below the float32 terms they are added to.)
    """
    x, y = np.asarray(x), np.asarray(y)
    total = 0.0
    for z in (x, y):
        vv = ee = 0.0
        for rows in blocks:
            m = len(range(len(z))[rows]) if isinstance(rows, slice) else len(rows)
            scale = m * (m - 3) if estimator in ("minibatch", "debiased") else (m - 1) ** 2
            v2, e2 = _block(z[rows], estimator)
            vv += v2 / scale
            ee += e2 / scale
        total += math.asin(min(1.0, math.sqrt(ee / vv)))
    n = sum((len(range(len(x))[r]) if isinstance(r, slice) else len(r)) ** 2 for r in blocks)
    return total + 3 * dot_rtol(n, U64) + 4 * U64


def linear_atol(layer, x, dx=0.0, paths: int = 2):
    """Entrywise bound on |ŷ₁ − ŷ₂| for two float32 evaluations ŷ = fl(W x̂ + b) of an
    nn.Linear on inputs x̂₁, x̂₂ with |x̂₁ − x̂₂| ≤ dx (x: either, n × d): the exact outputs differ
    by at most |W|·dx, and each evaluation is within dot_rtol(d + 1)·(|W||x| + |b|) of its
    exact output (the bias is one more term of the sum), whatever the kernel."""
    import torch

    w = layer.weight.detach().double().abs()
    b = 0.0 if layer.bias is None else layer.bias.detach().double().abs()
    x = torch.as_tensor(x, dtype=torch.float64).abs()
    dx = torch.as_tensor(dx, dtype=torch.float64)
    drift = dx @ w.T if dx.ndim else dx * w.sum(dim=1)
    return drift + paths * dot_rtol(w.shape[1] + 1) * (x @ w.T + b)


def sequential_atol(modules, x, dx, paths: int = 2) -> list:
    """Entrywise bounds on |ŷ₁ − ŷ₂| after each of `modules` (nn.Linear, eval-mode
    nn.BatchNorm1d, nn.ReLU, nn.Identity) run in float32 on inputs with |x̂₁ − x̂₂| ≤ dx, from
    x (float64, exact): per module, what the exact outputs' distance can grow to plus `paths`
    times one evaluation's rounding. Linear: `linear_atol`. BatchNorm: y = α(x − μ) + β with
    α = γ/√(σ² + ε), at most 6 roundings however a kernel orders them, so |α|·dx plus
    γ₆·(|αx| + |αμ| + |β|) per evaluation. ReLU and Identity: dx itself (1-Lipschitz, exact)."""
    import torch
    from torch import nn

    x = torch.as_tensor(x, dtype=torch.float64)
    dx = torch.as_tensor(dx, dtype=torch.float64)
    out = []
    for module in modules:
        if isinstance(module, nn.Linear):
            dx = linear_atol(module, x, dx, paths)
            bias = None if module.bias is None else module.bias.detach().double()
            x = torch.nn.functional.linear(x, module.weight.detach().double(), bias)
        elif isinstance(module, nn.BatchNorm1d) and not module.training:
            scale = 1.0 if module.weight is None else module.weight.detach().double()
            alpha = scale / torch.sqrt(module.running_var.double() + module.eps)
            mean = module.running_mean.double()
            beta = 0.0 if module.bias is None else module.bias.detach().double()
            rounding = (alpha * x).abs() + (alpha * mean).abs() + abs(beta)
            dx = alpha.abs() * dx + paths * gamma(6) * rounding
            x = alpha * (x - mean) + beta
        elif isinstance(module, nn.ReLU):
            x = x.clamp(min=0)
        elif not isinstance(module, nn.Identity):
            raise TypeError(f"no rounding bound for {type(module).__name__}")
        out.append(dx.detach())
    return out


def resample_atol(size: int, paths: int = 1) -> float:
    """Bound on |computed − exact| of a float32 bilinear resample (grid_sample, or interpolate
    with or without antialias, upsampling) of an image with values in [0, 1] and sides ≤ size,
    times `paths` (two resamplers compared: 2; against an exact copy: 1).

    Per axis the source coordinate takes at most 5 roundings on magnitudes ≤ size (scale,
    centre, offsets; grid_sample's unnormalisation), so it is off by ≤ 5·u·size pixels, which
    moves the value by at most that much (bilinear interpolation of [0, 1] values is
    1-Lipschitz per axis); the weights and the weighted sums (two separable passes or four
    taps, the normalisation of the weights) take at most 20 roundings on values ≤ 1."""
    return paths * (2 * 5 * size + 20) * U32
