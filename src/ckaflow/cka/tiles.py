"""The tile stage: CKA of all layer pairs of a block of rows × a block of columns, from the two
sides' stored Gram statistics, with optional bootstrap confidence intervals.

minibatch: streamed over the blocks (`ckaflow.cka.gram.stream_block_hsics`): block i of every
layer of the tile (one Zarr chunk each) is U-centred and the block's (La, Lb) cross and self HSIC
terms kept; the value (sum over blocks, normalised) and the block bootstrap need nothing else.
Peak memory: one block of every layer, (La + Lb) · b² · 8 bytes, plus blocks · La · Lb · 8 for
the per-block terms and bootstrap · La · Lb · 8 for the replicates (`ckaflow.plan.tile_memory`)
— megabytes, where loading the layers' statistics took about three times their store bytes.

Every value also carries its delete-one-block jackknife replicates (`jackknife`: block g of
pass 0 left out, the same block in every tile; full-data estimators: one of 10 groups of
examples), from which the claims build each effect's image-sampling variance jointly over
layers, runs and views (`ckaflow.claims`).

Full-data estimators (linear, debiased, rbf): one n × n block per layer, and the bootstrap of
linear and rbf resamples examples within it, so the layers are loaded whole (`load_stats`), as
before: memory about 3 · (La + Lb) · n² · 8 bytes.
"""

from __future__ import annotations

import numpy as np

from ckaflow.errors import TileError


def _run_columns(attrs: dict, suffix: str) -> dict:
    """The columns of one side that are the same for all its layers (built once per tile)."""
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


def _layer_columns(layer: dict, suffix: str) -> dict:
    return {
        f"layer_{suffix}": layer["name"],
        f"layer_index_{suffix}": layer["index"],
        f"layer_kind_{suffix}": layer["kind"],
        f"stage_{suffix}": layer["stage"],
        f"block_{suffix}": layer["block"],
    }


def _check_alignment(a, b) -> None:
    if a.attrs["example_ids"] != b.attrs["example_ids"]:
        raise TileError(
            f"{a.path} and {b.path} hold different examples or a different row order; "
            "CKA needs the same examples in the same order on both sides"
        )
    partition = (("passes", 1), ("partition_seed", None), ("partition_digest", None))
    if any(a.attrs.get(k, d) != b.attrs.get(k, d) for k, d in partition):
        raise TileError(
            f"{a.path} and {b.path} use different passes or permutations of the examples; "
            "rerun both gram stages with the same cka.passes and data.seed"
        )
    if a.attrs["block_rows"] != b.attrs["block_rows"]:
        raise TileError(
            f"{a.path} has row blocks {a.attrs['block_rows']} but {b.path} has "
            f"{b.attrs['block_rows']}; recompute both with the same estimator and batch size"
        )


def compute_tile(
    comparison: str,
    kind: str,
    gram_a: str,
    gram_b: str,
    rows: range,
    cols: range,
    estimator: str,
    out: str,
    bootstrap: int = 0,
    seed: int = 0,
) -> None:
    """CKA of layers `rows` of side a against layers `cols` of side b, as a tidy parquet."""
    import pandas as pd

    from ckaflow.cka.engine import cka_between, cka_interval, cka_jackknife
    from ckaflow.cka.gram import load_stats, open_gram, stream_block_hsics
    from ckaflow.provenance import atomic_path, code_version

    a, b = open_gram(gram_a), open_gram(gram_b)
    _check_alignment(a, b)
    held = (a.attrs.get("estimator"), b.attrs.get("estimator"))
    if held != (estimator, estimator):
        raise TileError(
            f"{gram_a} and {gram_b} hold {held[0]}/{held[1]} statistics, but the tile asks "
            f"for {estimator}; delete them and rerun the gram stage"
        )
    block_rows = a.attrs["block_rows"]
    layers_a = [a.layers[i] for i in rows]
    layers_b = [b.layers[j] for j in cols]
    names_a, names_b = [la["name"] for la in layers_a], [lb["name"] for lb in layers_b]
    if estimator == "minibatch":  # streamed block by block (module docstring)
        terms = stream_block_hsics(a, names_a, b, names_b)
        values, jackknife = terms.cka(), terms.jackknife()
        low = high = np.full_like(values, np.nan)
        if bootstrap:
            low, high = terms.interval(bootstrap=bootstrap, seed=seed)
    else:  # one n × n block per layer: in memory (tiny next to the Gram stage: CPU)
        stats_a, stats_b = load_stats(a, names_a), load_stats(b, names_b)
        values, jackknife = cka_between(stats_a, stats_b), cka_jackknife(stats_a, stats_b)
        low = high = np.full_like(values, np.nan)
        if bootstrap:
            low, high = cka_interval(stats_a, stats_b, bootstrap=bootstrap, seed=seed)
    records = []
    run_a, run_b = _run_columns(a.attrs, "a"), _run_columns(b.attrs, "b")
    for i, la in enumerate(layers_a):
        for j, lb in enumerate(layers_b):
            records.append(
                {
                    "comparison": comparison,
                    "kind": kind,
                    **run_a,
                    **_layer_columns(la, "a"),
                    **run_b,
                    **_layer_columns(lb, "b"),
                    "estimator": estimator,
                    "batch_size": max(block_rows),
                    "n": int(sum(block_rows)) // a.attrs.get("passes", 1),
                    "value": float(values[i, j]),
                    "ci_low": float(low[i, j]),
                    "ci_high": float(high[i, j]),
                    "bootstrap": bootstrap,
                    "jackknife": jackknife[:, i, j].tolist(),
                }
            )
    frame = pd.DataFrame.from_records(records).assign(
        source_a=str(gram_a), source_b=str(gram_b), code_version=code_version()
    )
    with atomic_path(out) as scratch:
        frame.to_parquet(scratch, index=False)
