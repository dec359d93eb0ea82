"""The CKA stage: every layer pair of every comparison of a study, from the sides' Gram stores,
in one job that reads each store once.

A study's comparisons share stores: a run's within, invariance and class comparisons read its
three views' stores (and the labels'), and every cross comparison reads two runs' clean stores.
Computing each comparison (or each tile of one) on its own read a store once per comparison it
takes part in: 15.3 times the stores' bytes for the paper's study. Any split of the comparisons
into jobs re-reads the stores the jobs share (a run's clean store serves both its own and the
cross comparisons), so one job computes them all:

minibatch: streamed over the blocks (`ckaflow.gram_stores.stream_block_hsics`): block i of every
layer of every store (one Zarr chunk each) is read and U-centred once, and each comparison's
(La, Lb) cross and self HSIC terms of the block kept; the value (sum over blocks, normalised),
the block bootstrap and the jackknife need nothing else. Memory: one block of every layer, plus
per comparison blocks · (La · Lb + La + Lb) · 8 bytes of terms (`ckaflow.plan.cka_job_memory`).

Full-data estimators (linear, debiased, rbf): one n × n Gram per layer, and the bootstrap of
linear and rbf resamples examples within it, so the layers are loaded whole, `tile_layers` per
side at a time (memory about 3 · 2 · tile_layers · n² · 8 bytes): each layer is read once per
tile it takes part in.

Reruns stay scoped: each comparison's table is kept in a cache folder under a key of what it was
computed from (the two stores' identities, its layers and the settings), so after a new run, or
one run's new statistics, the job computes and reads only the comparisons that involve them. A
killed job keeps the comparisons it finished.

Every value also carries its delete-one-block jackknife replicates (`jackknife`: block g of
pass 0 left out, the same block in every comparison; full-data estimators: one of 10 groups of
examples), from which the claims build each effect's image-sampling variance jointly over
layers, runs and views (`ckaflow.claims`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ckaflow.config import stable_hash
from ckaflow.errors import ComparisonError, ConfigError
from ckaflow.study import CkaSpec


@dataclass(frozen=True)
class Pair:
    """One comparison: layers `rows` of Gram store a against layers `cols` of store b (None:
    all of them)."""

    id: str
    kind: str
    a: str
    b: str
    rows: range | None = None
    cols: range | None = None

    @classmethod
    def from_dict(cls, d: dict) -> Pair:
        try:
            rows, cols = d.get("rows"), d.get("cols")
            return cls(
                d["id"],
                d["kind"],
                d["a"],
                d["b"],
                range(*rows) if rows else None,
                range(*cols) if cols else None,
            )
        except (KeyError, TypeError, AttributeError) as err:
            raise ConfigError(
                f"a comparison needs id, kind, a and b (Gram store paths), got {d!r}: {err!r}"
            ) from None


def _run_columns(attrs: dict, suffix: str) -> dict:
    """The columns of one side that are the same for all its layers."""
    from ckaflow.config import run_spec_from_dict

    run = attrs.get("run_spec") or {}
    model = run.get("model") or {}
    spec = run_spec_from_dict(run) if run else None
    return {
        f"run_{suffix}": attrs["run"],
        f"method_{suffix}": run.get("method"),
        f"arch_{suffix}": model.get("arch"),
        f"seed_{suffix}": run.get("seed"),
        f"init_{suffix}": spec.init_id if spec else None,
        f"replicate_{suffix}": spec.replicate_of if spec else None,
        f"view_{suffix}": attrs["view"],
    }


def _layer_columns_of(layers: list[dict], suffix: str) -> dict[str, list]:
    """The registry's fields of each layer of one side, as the table names them."""
    fields = {"layer": "name", "layer_index": "index", "layer_kind": "kind"}
    fields |= {"stage": "stage", "block": "block"}
    return {f"{column}_{suffix}": [la[key] for la in layers] for column, key in fields.items()}


def _check_alignment(a, b) -> None:
    if a.attrs["example_ids"] != b.attrs["example_ids"]:
        raise ComparisonError(
            f"{a.path} and {b.path} hold different examples or a different row order; "
            "CKA needs the same examples in the same order on both sides"
        )
    partition = (("passes", 1), ("partition_seed", None), ("partition_digest", None))
    if any(a.attrs.get(k, d) != b.attrs.get(k, d) for k, d in partition):
        raise ComparisonError(
            f"{a.path} and {b.path} use different passes or permutations of the examples; "
            "rerun both gram stages with the same cka.passes and data.seed"
        )
    if a.attrs["block_rows"] != b.attrs["block_rows"]:
        raise ComparisonError(
            f"{a.path} has row blocks {a.attrs['block_rows']} but {b.path} has "
            f"{b.attrs['block_rows']}; recompute both with the same estimator and batch size"
        )


def _check_estimator(store, estimator: str) -> None:
    if store.attrs.get("estimator") != estimator:
        raise ComparisonError(
            f"{store.path} holds {store.attrs.get('estimator')} statistics, but the CKA stage "
            f"asks for {estimator}; delete it and rerun the gram stage"
        )


@dataclass
class _Opened:
    """A pair with its stores opened and its layers chosen."""

    pair: Pair
    a: object
    b: object
    layers_a: list[dict]
    layers_b: list[dict]

    @property
    def names(self) -> tuple[list[str], list[str]]:
        return [la["name"] for la in self.layers_a], [lb["name"] for lb in self.layers_b]


def _open(pairs: list[Pair], estimator: str) -> list[_Opened]:
    from ckaflow.gram_stores import open_gram

    stores: dict[str, object] = {}  # each store opened (and its chunks checked) once
    opened = []
    for pair in pairs:
        for path in (pair.a, pair.b):
            if path not in stores:
                stores[path] = open_gram(path)
        a, b = stores[pair.a], stores[pair.b]
        for store in (a, b):
            _check_estimator(store, estimator)
        _check_alignment(a, b)
        rows = pair.rows if pair.rows is not None else range(len(a.layers))
        cols = pair.cols if pair.cols is not None else range(len(b.layers))
        opened.append(_Opened(pair, a, b, [a.layers[i] for i in rows], [b.layers[j] for j in cols]))
    if opened:  # blocks are paired by position across the whole group
        first = opened[0].a
        for item in opened[1:]:
            _check_alignment(first, item.a)
    return opened


@dataclass
class _Result:
    values: np.ndarray
    low: np.ndarray
    high: np.ndarray
    jackknife: np.ndarray  # (replicates, La, Lb)


def _streamed(opened: list[_Opened], bootstrap: int, seed: int):
    """Each comparison's result in turn, from one streamed pass over every store's blocks."""
    from ckaflow.gram_stores import stream_block_hsics

    terms = stream_block_hsics([(o.a, o.names[0], o.b, o.names[1]) for o in opened])
    for t in terms:
        values = t.cka()
        low = high = np.full_like(values, np.nan)
        if bootstrap:
            low, high = t.interval(bootstrap=bootstrap, seed=seed)
        yield _Result(values, low, high, t.jackknife())


def _loaded(o: _Opened, bootstrap: int, seed: int, tile_layers: int) -> _Result:
    """A full-data comparison, `tile_layers` layers per side in memory at a time."""
    from ckaflow.cka.pairs import cka_between, cka_interval, cka_jackknife
    from ckaflow.gram_stores import load_stats

    names_a, names_b = o.names
    shape = (len(names_a), len(names_b))
    result = _Result(np.empty(shape), np.full(shape, np.nan), np.full(shape, np.nan), None)
    for r in range(0, len(names_a), tile_layers):
        stats_a = load_stats(o.a, names_a[r : r + tile_layers])
        for c in range(0, len(names_b), tile_layers):
            stats_b = load_stats(o.b, names_b[c : c + tile_layers])
            tile = np.s_[r : r + len(stats_a), c : c + len(stats_b)]
            result.values[tile] = cka_between(stats_a, stats_b)
            jackknife = cka_jackknife(stats_a, stats_b)
            if result.jackknife is None:
                result.jackknife = np.empty((len(jackknife), *shape))
            result.jackknife[(slice(None), *tile)] = jackknife
            if bootstrap:
                low, high = cka_interval(stats_a, stats_b, bootstrap=bootstrap, seed=seed)
                result.low[tile], result.high[tile] = low, high
    return result


def _frame(o: _Opened, result: _Result, estimator: str, bootstrap: int):
    """The comparison's rows of the tidy table (`ckaflow.tables.COLUMNS`), built column by
    column: layer pair (i, j) is row i · Lb + j."""
    import pandas as pd

    la, lb = len(o.layers_a), len(o.layers_b)
    block_rows = o.a.attrs["block_rows"]
    columns = {"comparison": o.pair.id, "kind": o.pair.kind}
    for suffix, store, layers, spread in (
        ("a", o.a, o.layers_a, np.repeat),
        ("b", o.b, o.layers_b, np.tile),
    ):
        columns.update(_run_columns(store.attrs, suffix))
        for key, values in _layer_columns_of(layers, suffix).items():
            columns[key] = spread(np.asarray(values), lb if suffix == "a" else la)
    columns |= {
        "estimator": estimator,
        "batch_size": max(block_rows),
        "n": int(sum(block_rows)) // o.a.attrs.get("passes", 1),
        "value": result.values.ravel(),
        "ci_low": result.low.ravel(),
        "ci_high": result.high.ravel(),
        "bootstrap": bootstrap,
        "jackknife": list(result.jackknife.reshape(len(result.jackknife), -1).T),
        "source_a": o.pair.a,
        "source_b": o.pair.b,
    }
    return pd.DataFrame(columns, index=pd.RangeIndex(la * lb))


# Bumped whenever the numbers a comparison's table holds would change for the same stores, so
# that no cached table from older code is reused.
CACHE_VERSION = 1


def _identity(path: str) -> str | None:
    """A digest of a Gram store's attributes (its provenance and creation time: new whenever
    the store is rewritten); None for a store that cannot be read (computing it will say why)."""
    import zarr

    try:
        attrs = dict(zarr.open_group(path, mode="r").attrs)
    except Exception:  # missing or damaged: open_gram names the problem
        return None
    return stable_hash(attrs)


def _cache_file(cache: Path, pair: Pair, settings: list, identities: dict) -> Path | None:
    """Where the comparison's table is kept for these stores and settings (None: a store that
    cannot be identified, so nothing is cached). `identities` holds each store's identity,
    computed once per store (a store's attributes list every example id)."""
    for path in (pair.a, pair.b):
        if path not in identities:
            identities[path] = _identity(path)
    ids = [identities[pair.a], identities[pair.b]]
    if None in ids:
        return None
    rows = (pair.rows.start, pair.rows.stop) if pair.rows else None
    cols = (pair.cols.start, pair.cols.stop) if pair.cols else None
    key = stable_hash([CACHE_VERSION, pair.id, pair.kind, ids, rows, cols, settings])
    return cache / pair.id / f"{key}.parquet"


def _cached(path: Path | None, log):
    """The kept table at `path`, or None when there is none or it cannot be read (a damaged
    file is computed again, never trusted)."""
    import pandas as pd

    if path is None or not path.exists():
        return None
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError) as err:  # pyarrow raises both for a cut or foreign file
        log(f"{path}: unreadable ({err}); computing the comparison again")
        return None


def _keep(path: Path, frame) -> None:
    """Write one comparison's table into the cache, dropping its older versions."""
    from ckaflow.provenance import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as scratch:
        frame.to_parquet(scratch, index=False)
    for old in path.parent.glob("*.parquet"):
        if old != path:
            old.unlink(missing_ok=True)


def _compute(pairs: list[Pair], estimator: str, bootstrap: int, seed: int, tile_layers: int):
    """Each pair's table as soon as it is computed (minibatch pairs streamed together, each
    store read once), so that the caller can keep it before the next."""
    from ckaflow.provenance import code_version

    opened = _open(pairs, estimator)
    if estimator == "minibatch":
        results = _streamed(opened, bootstrap, seed)
    else:
        results = (_loaded(o, bootstrap, seed, tile_layers) for o in opened)
    version = code_version()  # of the code that computed the numbers, cached or not
    for o, r in zip(opened, results, strict=True):
        yield _frame(o, r, estimator, bootstrap).assign(code_version=version)


def compute_comparisons(
    pairs: list[Pair | dict],
    out: str,
    estimator: str,
    bootstrap: int = 0,
    seed: int = 0,
    tile_layers: int = 16,
    cache: str | None = None,
    log=print,
) -> str:
    """CKA of every layer pair of every comparison in `pairs`, as one tidy parquet at `out`;
    minibatch statistics are streamed with each store read once (module docstring). With a
    `cache` folder, a comparison whose stores and settings are unchanged since it was last
    computed is taken from there, and each computed one is kept there (also what a killed job
    keeps)."""
    import pandas as pd

    from ckaflow.bytecount import COUNT
    from ckaflow.provenance import atomic_path

    pairs = [p if isinstance(p, Pair) else Pair.from_dict(p) for p in pairs]
    if not pairs:
        raise ComparisonError(f"{out}: no comparisons to compute")
    t0, read0 = time.monotonic(), COUNT.read
    settings = [estimator, bootstrap, seed]
    identities: dict[str, str | None] = {}
    files = [_cache_file(Path(cache), p, settings, identities) if cache else None for p in pairs]
    kept = {i: _cached(f, log) for i, f in enumerate(files)}
    frames = {i: frame for i, frame in kept.items() if frame is not None}
    todo = [i for i in range(len(pairs)) if i not in frames]
    if todo:
        computed = _compute([pairs[i] for i in todo], estimator, bootstrap, seed, tile_layers)
        for i, frame in zip(todo, computed, strict=True):
            frames[i] = frame
            if files[i] is not None:
                _keep(files[i], frame)
    frame = pd.concat([frames[i] for i in range(len(pairs))], ignore_index=True)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as scratch:
        frame.to_parquet(scratch, index=False)
    log(
        f"{out}: {len(pairs)} comparisons ({len(todo)} computed, {len(pairs) - len(todo)} "
        f"unchanged), {len(frame)} layer pairs; read {COUNT.read - read0:,} bytes of Gram "
        f"statistics in {time.monotonic() - t0:.1f} s"
    )
    return out


def run(spec: CkaSpec, out: str | Path) -> Path:
    """The rule's call: every comparison of the study (`Study.cka_spec`), one table at `out`."""
    compute_comparisons(
        list(spec.comparisons),
        str(out),
        spec.estimator,
        bootstrap=spec.bootstrap,
        seed=spec.seed,
        tile_layers=spec.tile_layers,
        cache=spec.cache,
    )
    return Path(out)
