"""The CKA job streams over blocks: it reads each layer of each store once, however many
comparisons use it, and its peak memory is one block of every layer plus the per-block HSIC
terms (`ckaflow.plan.cka_job_memory`, what `ckaflow plan` reports), not the layers' statistics,
which a paper-scale job would hold by the tens of gigabytes."""

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import zarr

from ckaflow.bytecount import COUNT
from ckaflow.cka.grams import GramStats
from ckaflow.cka.pairs import cka_between, cka_interval
from ckaflow.cka.partitions import partition, partition_digest
from ckaflow.gram_stores import load_stats, open_gram, write_gram_store
from ckaflow.plan import cka_job_memory
from ckaflow.stages.cka import Pair, compute_comparisons

LAYERS, N, B, PASSES = 12, 3840, 128, 2  # 30 blocks of 128 rows per pass: 60 blocks per layer
TILE, BOOTSTRAP = 6, 100  # three comparisons of layers 0..5 and 6..11 of one store
SPLITS = [
    (range(0, TILE), range(TILE, 2 * TILE)),
    (range(0, TILE),) * 2,
    (range(TILE, 2 * TILE),) * 2,
]


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
from ckaflow.stages.cka import Pair, compute_comparisons
from tests.test_cka_job import SPLITS
path, out = sys.argv[1], sys.argv[2]
def run(name, splits):
    pairs = [Pair(f"x{{i}}", "within", path, path, r, c) for i, (r, c) in enumerate(splits)]
    compute_comparisons(pairs, f"{{out}}/{{name}}", "minibatch", {BOOTSTRAP}, log=print)
run("warm.parquet", [(range(0, 1), range(1, 2))])  # imports, caches
tracemalloc.start()
run("t.parquet", SPLITS)
print(tracemalloc.get_traced_memory()[1])
"""


def _job(path, out):
    pairs = [Pair(f"x{i}", "within", str(path), str(path), r, c) for i, (r, c) in enumerate(SPLITS)]
    before = COUNT.read
    compute_comparisons(pairs, str(out), "minibatch", BOOTSTRAP, log=lambda _: None)
    return pd.read_parquet(out), COUNT.read - before


def test_each_layer_is_read_once_whatever_the_comparisons(many_blocks, tmp_path):
    """Three comparisons use each of the 12 layers twice: the job reads each layer once."""
    table, read = _job(many_blocks, tmp_path / "t.parquet")
    store = open_gram(many_blocks)
    layer_bytes = store["l0"].nbytes
    assert read == LAYERS * layer_bytes
    assert len(table) == 3 * TILE * TILE


def test_job_peak_memory_is_one_block_of_every_layer(many_blocks, tmp_path):
    store = open_gram(many_blocks)
    blocks = len(store.attrs["block_rows"])
    assert blocks == 60 and store["l0"].chunks == (1, B * (B + 1) // 2)
    # measured in a fresh process as a CKA job runs: what earlier tests left in this one
    # (caches, garbage awaiting collection) is not the job's
    peak = int(
        subprocess.run(
            [sys.executable, "-c", MEASURE, str(many_blocks), str(tmp_path)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()[-1]
    )
    table = pd.read_parquet(tmp_path / "t.parquet")
    pairs = [(TILE, TILE)] * 3
    predicted = cka_job_memory("minibatch", LAYERS, pairs, blocks, B, BOOTSTRAP, 16)
    streamed = (LAYERS * B * B + 3 * blocks * TILE * TILE) * 8  # the brief's O(...) terms
    loaded = LAYERS * blocks * B * B * 8  # the layers' statistics: 94 MB
    assert predicted < 2 * streamed
    assert peak < 2 * predicted, f"peak {peak / 1e6:.1f} MB, predicted {predicted / 1e6:.1f} MB"
    assert peak > predicted / 2  # the plan's number is not a gross overestimate either
    assert peak < loaded / 20
    # and the streamed job is the in-memory computation
    names = [layer["name"] for layer in store.layers]
    first = table[table["comparison"] == "x0"]
    sa, sb = load_stats(store, names[:TILE]), load_stats(store, names[TILE:])
    want = cka_between(sa, sb).ravel()
    np.testing.assert_allclose(first["value"].to_numpy(), want, atol=1e-12, rtol=0)
    low, _ = cka_interval(sa, sb, bootstrap=BOOTSTRAP, seed=0)
    np.testing.assert_allclose(first["ci_low"].to_numpy(), low.ravel(), atol=1e-12, rtol=0)


def test_a_rerun_takes_unchanged_comparisons_from_the_cache(many_blocks, tmp_path):
    """Reruns stay scoped: a comparison is computed again only when one of its stores is new
    (rewritten: another identity) or its settings change; nothing unchanged is read again."""
    import shutil

    other = tmp_path / "other.zarr"
    shutil.copytree(many_blocks, other)
    pairs = [
        Pair("same", "within", str(many_blocks), str(many_blocks), range(0, 3), range(0, 3)),
        Pair("other", "within", str(other), str(other), range(0, 3), range(0, 3)),
    ]
    lines: list[str] = []

    def run(bootstrap=0):
        before = COUNT.read
        compute_comparisons(
            pairs, str(tmp_path / "t.parquet"), "minibatch", bootstrap, cache=str(tmp_path / "c"),
            log=lines.append,
        )  # fmt: skip
        return COUNT.read - before, lines[-1]

    read, line = run()
    assert "2 comparisons (2 computed, 0 unchanged)" in line and read > 0
    first = pd.read_parquet(tmp_path / "t.parquet")
    read, line = run()
    assert "(0 computed, 2 unchanged)" in line and read == 0
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "t.parquet"), first)
    zarr.open_group(other, mode="r+").attrs["created"] = "later"  # as a rewritten store has
    read, line = run()
    assert "(1 computed, 1 unchanged)" in line
    assert read == 3 * open_gram(other)["l0"].nbytes  # its three layers, once
    cut = next((tmp_path / "c" / "same").iterdir())  # a kept table cut short: computed again
    cut.write_bytes(cut.read_bytes()[:100])
    read, line = run()
    assert "(1 computed, 1 unchanged)" in line and any("unreadable" in x for x in lines)
    pd.testing.assert_frame_equal(
        pd.read_parquet(tmp_path / "t.parquet")
        .query("comparison == 'same'")
        .drop(columns="code_version"),
        first.query("comparison == 'same'").drop(columns="code_version"),
    )
    _, line = run(bootstrap=10)  # another setting: everything again
    assert "(2 computed, 0 unchanged)" in line
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["other", "same"]
    assert all(len(list(d.iterdir())) == 1 for d in (tmp_path / "c").iterdir())  # old dropped
