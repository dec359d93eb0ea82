"""The tile stage streams over blocks: its peak memory is one block of every layer plus the
per-block HSIC terms (`ckaflow.plan.tile_memory`, what `ckaflow plan` reports), not the layers'
statistics, which a paper-scale tile would hold by the tens of gigabytes."""

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from ckaflow.cka.engine import GramStats, cka_between, cka_interval, partition, partition_digest
from ckaflow.cka.gram import load_stats, open_gram, write_gram_store
from ckaflow.cka.tiles import compute_tile
from ckaflow.plan import tile_memory

LAYERS, N, B, PASSES = 12, 3840, 128, 2  # 30 blocks of 128 rows per pass: 60 blocks per layer
TILE, BOOTSTRAP = 6, 100  # layers 0..5 against layers 6..11


@pytest.fixture(scope="module")
def many_blocks(tmp_path_factory):
    """A Gram store of 12 layers of 60 blocks: 7.9 MB of statistics per layer."""
    rng = np.random.default_rng(0)
    base = rng.standard_normal((N, 24))

    blocks = partition(N, B, PASSES, seed=3)
    digest = partition_digest(blocks)

    def layers():  # the Grams of gram_stats, formed here in float64 (faster than 2 × 60 GEMMs)
        for i in range(LAYERS):
            x = np.tanh(base @ rng.standard_normal((24, 24))) + 0.3 * rng.standard_normal((N, 24))
            x -= x.mean(0)
            grams = np.stack([x[rows] @ x[rows].T for rows in blocks])
            rows = tuple(len(r) for r in blocks)
            yield (
                f"l{i}",
                GramStats("minibatch", grams, rows, passes=PASSES, partition_seed=3, digest=digest),
            )

    meta = [
        {"name": f"l{i}", "index": i, "kind": "conv", "stage": 0, "block": i} for i in range(LAYERS)
    ]
    attrs = {"run": "r", "run_spec": None, "view": "clean", "layers": meta}
    path = tmp_path_factory.mktemp("many-blocks") / "g.zarr"
    return write_gram_store(path, layers(), {**attrs, "example_ids": list(range(N))})


MEASURE = f"""
import sys, tracemalloc
from ckaflow.cka.tiles import compute_tile
path, out, tile = sys.argv[1], sys.argv[2], int(sys.argv[3])
def run(name, rows, cols):
    target = f"{{out}}/{{name}}"
    compute_tile("x", "within", path, path, rows, cols, "minibatch", target, {BOOTSTRAP})
run("warm.parquet", range(0, 1), range(1, 2))  # imports, caches
tracemalloc.start()
run("t.parquet", range(0, tile), range(tile, 2 * tile))
print(tracemalloc.get_traced_memory()[1])
"""


def _tile(path, out, rows, cols, bootstrap=BOOTSTRAP):
    compute_tile("x", "within", str(path), str(path), rows, cols, "minibatch", str(out), bootstrap)
    return pd.read_parquet(out)


def test_tile_peak_memory_is_one_block_of_every_layer(many_blocks, tmp_path):
    store = open_gram(many_blocks)
    blocks = len(store.attrs["block_rows"])
    assert blocks == 60 and store["l0"].chunks == (1, B, B)
    # layers 0..TILE-1 against TILE..2·TILE-1, measured in a fresh process as a tile job runs:
    # what earlier tests left in this one (caches, garbage awaiting collection) is not the tile's
    peak = int(
        subprocess.run(
            [sys.executable, "-c", MEASURE, str(many_blocks), str(tmp_path), str(TILE)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()[-1]
    )
    tile = pd.read_parquet(tmp_path / "t.parquet")
    predicted = tile_memory("minibatch", TILE, TILE, blocks, B, BOOTSTRAP)
    streamed = (2 * TILE * B * B + blocks * TILE * TILE) * 8  # the brief's O(...) terms
    loaded = 2 * TILE * blocks * B * B * 8  # the tile's layers' statistics: 94 MB
    assert predicted < 2 * streamed
    assert peak < 2 * predicted, f"peak {peak / 1e6:.1f} MB, predicted {predicted / 1e6:.1f} MB"
    assert peak > predicted / 2  # the plan's number is not a gross overestimate either
    assert peak < loaded / 20
    # and the streamed tile is the in-memory one
    names = [layer["name"] for layer in store.layers]
    sa, sb = load_stats(store, names[:TILE]), load_stats(store, names[TILE:])
    want = cka_between(sa, sb).ravel()
    np.testing.assert_allclose(tile["value"].to_numpy(), want, atol=1e-12, rtol=0)
    low, _ = cka_interval(sa, sb, bootstrap=BOOTSTRAP, seed=0)
    np.testing.assert_allclose(tile["ci_low"].to_numpy(), low.ravel(), atol=1e-12, rtol=0)
