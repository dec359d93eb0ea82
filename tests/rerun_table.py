"""What a change to each config key reruns: the table README.md shows and the test checks.

Every leaf of the schema (generated from it, not listed by hand) is changed, one at a time, in
the tiny study (tests/configs/tiny.yaml) after a complete run; `snakemake -n` then says which
jobs would run. `ROWS` is the expected answer: the first row whose pattern matches a key gives
the jobs, as rule -> count. A key that no row matches fails the test, so a new setting cannot
arrive without saying what it reruns.

    python -m tests.rerun_table      # the README's table, from ROWS
"""

from __future__ import annotations

import copy
import fnmatch
from typing import Any

from ckaflow.config import load_schema

# The tiny study: 2 runs (simclr and supervised, seed 0) x 3 views. One CKA job computes every
# comparison; it reruns whenever any comparison's inputs or settings change, and then computes
# only the comparisons whose stores or settings changed, taking the rest from its cache
# (`ckaflow.stages.cka`; tests/test_workflow.py checks what it computed).
REPORT = {"merge_tables": 1, "figures": 1, "summary": 1}
ONE_METHOD = {
    "train": 1,
    "evaluate": 1,
    "extract": 3,
    "gram": 3,
    "cka": 1,
    "run_tables": 1,
    **REPORT,
}
EVERY_RUN = {
    "train": 2,
    "evaluate": 2,
    "extract": 6,
    "gram": 6,
    "cka": 1,
    "run_tables": 1,
    **REPORT,
}
EVERYTHING = {"prepare_data": 1, "gram_labels": 1, **EVERY_RUN}
GRAM_ONWARD = {"gram": 6, "gram_labels": 1, "cka": 1, **REPORT}
NOTHING: dict[str, int] = {}
REFUSED = None  # the key cannot change alone in the tiny study: the config check stops it

# (patterns, jobs, what the README says). Order matters: the first matching row wins.
ROWS: list[tuple[tuple[str, ...], dict[str, int] | None, str]] = [
    (
        ("study", "device", "backend", "slurm.*", "checkpoint.*", "data.root"),
        NOTHING,
        "nothing: names, where and how jobs run, where the data set's files are",
    ),
    (
        (
            "recipes.supervised.temperature",
            "recipes.supervised.proj_dim",
            "recipes.*.lars_eta",
            "recipes.simclr.momentum",
        ),
        NOTHING,
        "nothing: recipe keys the run's method or optimiser never reads (here SimCLR trains "
        "with AdamW, supervised with SGD)",
    ),
    (
        ("data.resolution",),
        REFUSED,
        "refused alone: only an image folder has it (there, everything reruns)",
    ),
    (
        ("input.*",),
        EVERY_RUN,
        "every trained run onward (an import's own `input`: that import onward)",
    ),
    (("data.*", "augment.*"), EVERYTHING, "everything: the data store and all that follows"),
    (("recipes.simclr.*",), ONE_METHOD, "that method's runs onward (here one run)"),
    (("recipes.supervised.*",), ONE_METHOD, "that method's runs onward (here one run)"),
    (
        ("model.init",),
        EVERY_RUN,
        "every run onward: training, probes, Gram statistics, CKA, tables, figures",
    ),
    (
        ("model.width",),
        EVERY_RUN,
        "every run onward, under new run names",
    ),
    (
        ("model.arch",),
        {**EVERY_RUN, "cka": 1},
        "every run onward, under new run names",
    ),
    (
        ("methods",),
        {"run_tables": 1, "cka": 1, **REPORT},
        "removing a method: the tables, figures and summary (the CKA job takes every remaining "
        "comparison from its cache)",
    ),
    (
        ("seeds",),
        {
            **{k: 2 * v for k, v in ONE_METHOD.items() if k not in ("run_tables", *REPORT)},
            "cka": 1,
            "run_tables": 1,
            **REPORT,
        },
        "adding a seed: its runs, and the comparisons that involve them",
    ),
    (
        ("imports",),
        {
            "import_run": 1,
            "evaluate": 1,
            "extract": 3,
            "gram": 3,
            "cka": 1,
            "run_tables": 1,
            **REPORT,
        },
        "adding a network trained elsewhere: its import, and the comparisons that involve it",
    ),
    (("evaluate.*",), {"evaluate": 2, "run_tables": 1, "figures": 1, "summary": 1}, "probes"),
    (
        (
            "activations.store",
            "activations.batch_size",
            "activations.chunk_rows",
            "activations.dtype",
            "activations.codec",
            "activations.level",
        ),
        {"extract": 6},
        "the stored activations only (CKA never reads them)",
    ),
    (
        ("activations.precision", "activations.channels_last"),
        {"extract": 6, "gram": 6, "cka": 1, **REPORT},
        "the forward pass's numbers: stored activations, Gram statistics onward",
    ),
    (
        ("activations.layers.kinds",),  # every kind but fc: only the supervised run has one
        {"gram": 3, "cka": 1, **REPORT},
        "the compared layers: the Gram statistics of the runs whose layers change, onward (the "
        "stored activations only where their selection changes)",
    ),
    (
        ("activations.layers.names",),  # layer1.* and pool: 7 layers, one tile each
        {"extract": 6, "gram": 6, "cka": 1, **REPORT},
        "the compared layers: Gram statistics onward, and the stored selection within them",
    ),
    (
        ("activations.examples",),
        {"extract": 6, "gram": 6, "gram_labels": 1, "cka": 1, **REPORT},
        "the compared examples: Gram statistics (labels too) onward",
    ),
    (
        ("cka.estimator", "cka.batch_size", "cka.passes"),
        GRAM_ONWARD,
        "Gram statistics onward (never the data store, training or probes)",
    ),
    (("cka.bootstrap",), {"cka": 1, **REPORT}, "CKA onward"),
    (
        ("cka.tile_layers",),
        {"cka": 1, **REPORT},
        "the CKA job onward, which takes every comparison from its cache (no number changes)",
    ),
    (
        ("cka.comparisons",),
        {"cka": 1, **REPORT},
        "removing a comparison kind: tables, figures, summary (the CKA job takes the remaining "
        "comparisons from its cache)",
    ),
    (("plots.*",), {"figures": 1}, "the figures only"),
    (("claims.*",), {"summary": 1}, "the summary and the claims table only"),
]


def leaves(node: dict[str, Any] | None = None, prefix: str = "") -> list[str]:
    """Every settable key of the schema, dotted: an object's properties, recursively."""
    node = load_schema() if node is None else node
    out = []
    for key, sub in node.get("properties", {}).items():
        name = f"{prefix}{key}"
        if sub.get("type") == "object" and sub.get("properties"):
            out += leaves(sub, f"{name}.")
        else:
            out.append(name)
    return out


def row_for(key: str) -> tuple[tuple[str, ...], dict[str, int], str] | None:
    return next((row for row in ROWS if any(fnmatch.fnmatch(key, p) for p in row[0])), None)


def _node(key: str) -> dict[str, Any]:
    node = load_schema()
    for part in key.split("."):
        node = node["properties"][part]
    return node


# the change of `imports`: the finished SimCLR run's model.pt, imported as one more run
IMPORTED = {
    "name": "imported",
    "checkpoint": "results/runs/simclr-resnet18-w4-s0/model.pt",
    "format": "ckaflow",
    "width": 4,
    "stem": "cifar",
    "head": "projector",
    "method": "simclr",
}


def changed_value(key: str, current: Any) -> Any:
    """A valid value other than `current`, derived from the key's schema."""
    if key == "imports":  # a list of records: one more network
        return [*current, IMPORTED]
    if key == "input.normalise":  # one mean and std for the grey images
        return {"mean": [0.5], "std": [0.25]}
    node = _node(key)
    kinds = node.get("type")
    kinds = kinds if isinstance(kinds, list) else [kinds]
    if "enum" in node:
        return next(v for v in node["enum"] if v != current)
    if "oneOf" in node:  # activations.store: none | all | {layers, examples}
        return "all" if current != "all" else "none"
    if "array" in kinds:
        items = node.get("items", {})
        current = list(current or [])
        if "enum" in items:  # a list of choices: drop the last (from all if unset)
            return (current or list(items["enum"]))[:-1]
        if items.get("type") == "integer":  # seeds: one more
            return [*current, max(current, default=-1) + 1]
        if items.get("type") == "number":  # crop_scale: a narrower range
            return [round(current[0] * 2, 6), current[1]]
        return ["layer1.*", "pool"] if key.endswith("names") else ["module load cuda"]
    if "object" in kinds:
        return {"reservation": "mine"}
    if "boolean" in kinds:
        return not current
    if "integer" in kinds:
        bigger = current + 1 if current is not None else node.get("minimum", 1)
        return bigger if bigger <= node.get("maximum", bigger) else current - 1
    if "number" in kinds:
        bigger = round(current * 1.5, 6) if current else 0.1
        return bigger if bigger <= node.get("maximum", bigger) else round(current / 2, 6)
    if "string" in kinds:
        return "/elsewhere" if key.endswith("root") else f"{current or 'x'}2"
    raise ValueError(f"no rule to change {key} ({node})")


def changed_config(study: dict[str, Any], key: str) -> dict[str, Any]:
    """The validated study with one key changed."""
    cfg = copy.deepcopy(study)
    *parents, last = key.split(".")
    target = cfg
    for part in parents:
        target = target[part]
    target[last] = changed_value(key, target.get(last))
    return cfg


def _jobs(jobs: dict[str, int] | None) -> str:
    if jobs is REFUSED:
        return "refused before planning"
    if not jobs:
        return "nothing"
    return ", ".join(f"{rule} {n}" if n else rule for rule, n in jobs.items())


def markdown() -> str:
    lines = ["| Change | What reruns | Jobs in the tiny test study |", "|---|---|---|"]
    for patterns, jobs, says in ROWS:
        keys = ", ".join(f"`{p}`" for p in patterns)
        lines.append(f"| {keys} | {says} | {_jobs(jobs)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown())
