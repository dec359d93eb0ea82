"""Gram statistics: computed once per representation, block by block, in float64.

`gram_stats(x)` reads a representation block by block (a NumPy or torch array, or anything
sliceable by rows, read lazily) and keeps, per block of rows, the kernel Gram matrix in
float64. The GEMM that forms it runs in the input's precision (float32 for
float32/bfloat16/float16 input, on a GPU when one is present) on rows shifted near their column
mean (`block_centre`); every later sum is float64.

Each block's Gram is then transformed once — U-centred for the unbiased HSIC (`minibatch`,
`debiased`), double-centred for the biased one (`linear`, `rbf`) — and flattened with the HSIC
normalisation folded in, so that HSIC(K, L) is one dot product (`GramStats.hsic_vector`) and a
whole matrix of pairs one matrix product (`ckaflow.cka.pairs`). The Gram stages
(`ckaflow.stages`) and `ckaflow.compare` call the block functions directly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ckaflow.cka.estimators import MIN_BATCH_ROWS, center_gram, u_center
from ckaflow.cka.partitions import (
    ESTIMATORS,
    block_sizes,
    check_passes,
    partition,
    partition_digest,
)
from ckaflow.devices import resolve_device

UNBIASED = ("minibatch", "debiased")
RBF_SIGMA_FRACTION = 0.8  # of the median pairwise distance, as in Kornblith et al.'s code
# With passes > 1, a layer is held in memory as column panels of at most this many bytes
# (float32, or float64 for float64 input): a layer that fits is read once, a wider one once per
# panel. See `_partitioned_grams`.
PANEL_BYTES = 4 * 2**30


@dataclass(frozen=True)
class GramStats:
    """Per-block Gram matrices of one representation.

    grams: (blocks, b, b) float64, a shorter last block zero-padded; block_rows: its true sizes.
    With passes > 1 the blocks are pass-major: block i belongs to pass i // blocks_per_pass, and
    `partition(rows of x, block_rows[0], passes, partition_seed)` gives the rows of every block.
    partition_seed and digest (a hash of those rows) are None for one pass, which needs no seed.
    """

    estimator: str
    grams: np.ndarray
    block_rows: tuple[int, ...]
    name: str = ""
    passes: int = 1
    partition_seed: int | None = None
    digest: str | None = None

    @property
    def blocks_per_pass(self) -> int:
        return len(self.block_rows) // self.passes

    @property
    def n(self) -> int:
        """Examples used per pass (all of them but a final block of fewer than 4 rows)."""
        return int(sum(self.block_rows[: self.blocks_per_pass]))

    @property
    def partition_key(self) -> tuple:
        """Equal for two statistics exactly when their blocks hold the same rows."""
        if self.passes == 1:
            return (1,)
        return (self.passes, self.partition_seed, self.digest)

    @cached_property
    def hsic_vector(self) -> np.ndarray:
        """v with HSIC(K, L) = v_K · v_L (the estimator's HSIC, summed over blocks)."""
        return hsic_vector(self.grams, self.block_rows, self.estimator)


def block_vector(k: np.ndarray, estimator: str) -> np.ndarray:
    """v with HSIC(K, L) = v_K · v_L for one block's m × m Gram K (true rows only)."""
    m = k.shape[0]
    if estimator in UNBIASED:  # HSIC₁ = ⟨U(K), U(L)⟩ / (m(m−3))
        return u_center(k).ravel() / np.sqrt(m * (m - 3))
    return center_gram(k).ravel() / (m - 1)  # HSIC₀ = ⟨HKH, HLH⟩ / (m−1)²


def hsic_vector(grams: np.ndarray, block_rows, estimator: str) -> np.ndarray:
    return np.concatenate(
        [block_vector(grams[i, :m, :m], estimator) for i, m in enumerate(block_rows)]
    )


# ---------------------------------------------------------------------------------------------
# Computing the statistics


def _rows_reader(x) -> tuple[int, Callable[[slice], np.ndarray]]:
    """(n, read(rows) -> array) for NumPy, torch and Zarr arrays alike; Zarr is read lazily."""
    import torch

    if hasattr(x, "detach"):  # torch tensor; NumPy has no bfloat16
        x = x.detach().cpu()
        x = (x.float() if x.dtype in (torch.bfloat16, torch.float16) else x).numpy()
    if not hasattr(x, "shape"):
        x = np.asarray(x)
    return int(x.shape[0]), lambda rows: np.asarray(x[rows])


# A block's centre is the mean of its first rows: its error (about σ/√32 per column) grows the
# centred values by about 1.5 %, and the rounding of the float32 GEMM with them, and it costs an
# eighth of a 256-row block's pass over memory (a tenth of the Gram stage's time).
CENTRE_ROWS = 32


def block_centre(t):
    """The centre a block's rows are shifted by before their float32 Gram: near the column
    mean is enough (see `_Workspace`), so the mean of the first `CENTRE_ROWS` rows."""
    return t[:CENTRE_ROWS].mean(0)


class _Workspace:
    """Rows centred on the device, in reusable buffers.

    Reusing the buffers matters: a fresh 50 MB tensor per block costs page faults worth half
    of the GEMM. The centre only has to bring values near zero so that a float32 GEMM keeps its
    precision; any leftover constant shift per column is removed exactly by the centring of the
    Gram (double- or U-centring), so a float32 mean is enough.
    """

    def __init__(self, device):
        self.device = device
        self.buffers: dict = {}

    def centred(self, values, centre, slot: int = 0):
        """`values` (rows, ...) as (rows, features) on the device minus `centre` (default: their
        own `block_centre`); a NumPy array or a torch tensor (on any device, in any precision: the
        forward pass of the fused stage hands its layers over as they are)."""
        import torch

        if isinstance(values, torch.Tensor):
            values = values.detach().reshape(len(values), -1)
            dtype = torch.float64 if values.dtype == torch.float64 else torch.float32
            src = values.to(self.device, dtype)
        else:
            values = values.reshape(len(values), -1)
            dtype = torch.float64 if values.dtype == np.float64 else torch.float32
            src = torch.from_numpy(np.ascontiguousarray(values)).to(self.device, dtype)
        if centre is None:
            centre = block_centre(src)
        return torch.sub(src, centre.to(self.device, dtype), out=self._buffer(slot, src))

    def _buffer(self, slot: int, like):
        """A tensor shaped like `like` in the slot's one flat buffer, grown by half again when
        too small: layers of every width and a short last block share it, so the memory is
        that of the widest block (not one buffer per shape: 4.9 GB for a ResNet-50's layers),
        and no block pays a fresh allocation's page faults (half the cost of a wide block)."""
        import torch

        key, numel = (slot, like.dtype), like.numel()
        flat = self.buffers.get(key)
        if flat is None or flat.numel() < numel:
            grown = numel if flat is None else max(numel, flat.numel() * 3 // 2)
            flat = self.buffers[key] = torch.empty(grown, dtype=like.dtype, device=self.device)
        return flat[:numel].view(like.shape)


_WORKSPACES: dict = {}


def _workspace(device) -> _Workspace:
    """One workspace per device for every `gram_stats` call in this process: its buffers,
    the size of the widest block seen, are reused from layer to layer."""
    return _WORKSPACES.setdefault(str(device), _Workspace(device))


def _gram_block(a, b) -> np.ndarray:
    return (a @ b.T).double().cpu().numpy()


# Below this many rows a block's Gram is one GEMM: splitting it would cost more in smaller
# kernels than the quarter of the products it saves.
SPLIT_GRAM_ROWS = 64


def gram_products(m: int) -> int:
    """Products per feature that `self_gram` forms for m rows (its FLOPs: twice this times
    the features): the top half of the rows against all, the bottom half against itself."""
    if m < SPLIT_GRAM_ROWS:
        return m * m
    h = (m + 1) // 2
    return h * m + (m - h) ** 2


def self_gram(t):
    """t tᵀ for centred rows t (a torch tensor, on its device, in its precision), exactly
    symmetric: the upper triangle mirrored. A GEMM need not round (i, j) and (j, i) alike, and
    a Gram store keeps only the upper triangle (`ckaflow.gram_stores`), so every path that forms a
    Gram in memory mirrors it the same way and gives the stored bits.

    Only the upper triangle is needed, so it is formed as two GEMMs over halves of the rows
    (the top rows against all, the bottom rows against themselves): three quarters of the
    products of t tᵀ, the saving a BLAS `syrk` would make (torch has none)."""
    import torch

    n = len(t)
    if n < SPLIT_GRAM_ROWS:
        g = t @ t.T
    else:
        h = (n + 1) // 2
        g = t.new_zeros(n, n)
        torch.mm(t[:h], t.T, out=g[:h])
        g[h:, h:] = t[h:] @ t[h:].T
    return torch.triu(g) + torch.triu(g, 1).T


def block_gram(values, work: _Workspace) -> np.ndarray:
    """The Gram of one block of rows, centred on its `block_centre`: the one
    definition shared by the store-then-Gram path and the fused stage, so that both give the
    same bits for the same values."""
    t = work.centred(values, None)
    return self_gram(t).double().cpu().numpy()


def _check_finite(k: np.ndarray, read, rows: slice, name: str) -> None:
    """A non-finite input value makes its row's Gram diagonal non-finite: check the small Gram,
    and only on failure count the bad values in the data."""
    if np.isfinite(k).all():
        return
    values = np.asarray(read(rows))
    bad = int((~np.isfinite(values)).sum())
    raise ValueError(
        f"{name or 'representation'}: {bad} non-finite values (NaN or Inf) in rows "
        f"{rows.start}..{rows.stop - 1}"
    )


def gram_stats(
    x,
    *,
    estimator: str = "minibatch",
    batch_size: int = 256,
    passes: int = 1,
    seed: int = 0,
    device: str = "auto",
    name: str = "",
    panel_bytes: int = PANEL_BYTES,
) -> GramStats:
    """Gram statistics of one representation x (n, ...), read block by block.

    For the full-data estimators (`linear`, `debiased`, `rbf`) the n × n Gram is assembled from
    pairs of `batch_size`-row chunks after one pass for the column mean, so peak memory is two
    chunks plus the Gram, whatever the feature count.

    minibatch with `passes` > 1: pass 0 is today's consecutive blocks, passes 1.. are blocks of
    the seeded permutations (see `partition`); see `_partitioned_grams` for how the rows of a
    permuted block are read without reading a chunk per row.
    """
    if batch_size < MIN_BATCH_ROWS:
        raise ValueError(f"batch_size must be >= {MIN_BATCH_ROWS}, got {batch_size}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; expected one of {ESTIMATORS}")
    check_passes(passes, seed, estimator)
    n, read = _rows_reader(x)
    blocks = block_sizes(estimator, n, batch_size)
    work = _workspace(resolve_device(device))
    if passes > 1:
        rows = partition(n, batch_size, passes, seed)
        grams = _partitioned_grams(read, n, rows, batch_size, work, panel_bytes, name)
        return GramStats(
            estimator,
            grams,
            tuple(len(r) for r in rows),
            name,
            passes=passes,
            partition_seed=int(seed),
            digest=partition_digest(rows),
        )
    size = blocks[0].stop - blocks[0].start
    grams = np.zeros((len(blocks), size, size))
    for i, rows in enumerate(blocks):
        if estimator == "minibatch":
            k = block_gram(read(rows), work)
        else:
            k = _streamed_gram(read, rows, batch_size, work)
        _check_finite(k, read, rows, name)
        if estimator == "rbf":
            k = rbf_from_linear(k)
        m = rows.stop - rows.start
        grams[i, :m, :m] = k
    return GramStats(estimator, grams, tuple(b.stop - b.start for b in blocks), name)


def _partitioned_grams(
    read, n: int, blocks: list[np.ndarray], chunk: int, work: _Workspace, panel_bytes: int, name
) -> np.ndarray:
    """The Gram of every block of rows (index arrays, in any order) of one representation.

    Reading a permuted block from a chunked Zarr array would touch nearly every chunk, so the
    layer is read chunk by chunk (in order, `chunk` rows at a time) into an in-memory *column
    panel*: all n rows, as many feature columns as fit `panel_bytes`. Each block's rows are
    gathered from the panel and its b × b Gram formed by one GEMM; a block's Gram is the sum of
    its panels' Grams (K = Σ_F X_F X_Fᵀ), accumulated in float64. A layer that fits the budget
    is read once; a wider one once per panel (⌈n·d·4 / panel_bytes⌉ reads). Memory: one panel
    plus one chunk plus the output; FLOPs: exactly 2·m²·d per block, as for pass 0 alone.

    Each gathered block is centred on its own `block_centre`, as `block_gram` does, so a layer that
    fits one panel gives the very bits of the fused stage, which forwards the permuted block
    itself (any constant shift would do for HSIC₁: K + a1ᵀ + 1aᵀ + c11ᵀ U-centres to the same
    matrix; the own mean keeps the float32 GEMM precise).
    """
    import torch

    first = np.asarray(read(slice(0, min(chunk, n))))
    features = math.prod(first.shape[1:])
    dtype = torch.float64 if first.dtype == np.float64 else torch.float32
    itemsize = 8 if dtype == torch.float64 else 4
    width = int(min(features, max(1, panel_bytes // (n * itemsize))))
    size = len(blocks[0])
    grams = np.zeros((len(blocks), size, size))
    index = [torch.from_numpy(np.asarray(rows, dtype=np.int64)).to(work.device) for rows in blocks]
    gathered: dict = {}
    for lo in range(0, features, width):
        cols = slice(lo, min(lo + width, features))
        panel = np.empty((n, cols.stop - cols.start), dtype=np.float64 if itemsize == 8 else "f4")
        for start in range(0, n, chunk):
            rows = slice(start, min(start + chunk, n))
            values = first if start == 0 else np.asarray(read(rows))
            panel[rows] = values.reshape(len(values), -1)[:, cols]
        t = torch.from_numpy(panel).to(work.device)
        gathered.clear()
        for i, idx in enumerate(index):
            key = (len(idx), t.shape[1])
            if key not in gathered:
                gathered[key] = torch.empty(key, dtype=dtype, device=work.device)
            part = torch.index_select(t, 0, idx, out=gathered[key])
            part -= block_centre(part)
            m = len(idx)
            grams[i, :m, :m] += self_gram(part).double().cpu().numpy()
        del t, panel
    if not np.isfinite(grams).all():
        _raise_non_finite(read, n, chunk, name)
    return grams


def _raise_non_finite(read, n: int, chunk: int, name: str) -> None:
    bad, rows = 0, []
    for start in range(0, n, chunk):
        values = np.asarray(read(slice(start, min(start + chunk, n))))
        flags = ~np.isfinite(values.reshape(len(values), -1))
        bad += int(flags.sum())
        rows += (start + np.flatnonzero(flags.any(axis=1))).tolist()
    where = f" in rows {rows[0]}..{rows[-1]}" if rows else ""
    raise ValueError(f"{name or 'representation'}: {bad} non-finite values (NaN or Inf){where}")


def _streamed_gram(read, rows: slice, chunk: int, work: _Workspace) -> np.ndarray:
    """K over all rows from pairs of row chunks (chunk j is re-read, never kept), every chunk
    centred on the same column mean."""
    import torch

    chunks = [slice(s, min(s + chunk, rows.stop)) for s in range(rows.start, rows.stop, chunk)]
    total = None
    for c in chunks:
        values = read(c)
        part = values.reshape(len(values), -1).sum(axis=0, dtype=np.float64)
        total = part if total is None else total + part
    centre = torch.from_numpy(total / (rows.stop - rows.start))
    n = rows.stop - rows.start
    k = np.zeros((n, n))
    for i, ci in enumerate(chunks):
        ti = work.centred(read(ci), centre, slot=0)
        for cj in chunks[: i + 1]:
            tj = ti if cj == ci else work.centred(read(cj), centre, slot=1)
            block = self_gram(ti).double().cpu().numpy() if cj == ci else _gram_block(ti, tj)
            k[ci, cj] = block
            k[cj, ci] = block.T
    return k


def rbf_from_linear(k: np.ndarray, fraction: float = RBF_SIGMA_FRACTION) -> np.ndarray:
    """RBF Gram exp(−‖xᵢ − xⱼ‖² / (2σ²)) with σ = fraction × median pairwise distance."""
    diag = np.diag(k)
    sq = np.maximum(diag[:, None] + diag[None, :] - 2 * k, 0)
    sigma2 = fraction**2 * np.median(sq)
    if sigma2 <= 0:
        return np.ones_like(k)  # all points equal: a constant kernel, whose HSIC is zero
    return np.exp(-sq / (2 * sigma2))
