"""What a study computes and where each artifact lives; no torch, so Snakemake loads it fast.

A *side* of a comparison is one representation set: a run on a view, or the eval labels.
A *comparison* pairs two sides; its layer pairs are cut into *tiles* of at most
`tile_layers` × `tile_layers` pairs, the unit of rerun and parallelism.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from ckaflow import config as cfg
from ckaflow.layers import Layer, label_layer, layer_registry, select_layers

RESULTS = "results"
LABELS = "labels"


@dataclass(frozen=True)
class Side:
    run: str  # a run id, or "labels"
    view: str  # clean | aug1 | aug2, or "labels"

    @property
    def is_labels(self) -> bool:
        return self.run == LABELS

    @property
    def tag(self) -> str:
        return LABELS if self.is_labels else f"{self.run}.{self.view}"


@dataclass(frozen=True)
class Comparison:
    kind: str  # within | cross | invariance | class
    a: Side
    b: Side

    @property
    def id(self) -> str:
        return f"{self.kind}-{self.a.tag}-vs-{self.b.tag}"


@dataclass(frozen=True)
class Tile:
    comparison: Comparison
    row: int
    col: int

    @property
    def name(self) -> str:
        return f"r{self.row}c{self.col}"


class Study:
    """The validated config, seen as the set of artifacts it implies."""

    def __init__(self, config: dict[str, Any]):
        self.config = config
        self.data = cfg.data_spec(config)
        self.augment = cfg.augment_spec(config)
        self.cka = cfg.cka_spec(config)
        self.runs = {run.run_id: run for run in cfg.run_specs(config)}

    # -- layers ----------------------------------------------------------------------------
    def layers(self, side: Side) -> list[Layer]:
        if side.is_labels:
            return [label_layer()]
        run = self.runs[side.run]
        selection = self.config["activations"]["layers"]
        return select_layers(
            layer_registry(run.model.arch, run.method), selection["kinds"], selection["names"]
        )

    # -- comparisons -----------------------------------------------------------------------
    @cached_property
    def comparisons(self) -> dict[str, Comparison]:
        wanted = self.cka.comparisons
        out: list[Comparison] = []
        ids = list(self.runs)
        labels = Side(LABELS, LABELS)
        for run in ids:
            clean = Side(run, "clean")
            if "within" in wanted:
                out += [Comparison("within", Side(run, v), Side(run, v)) for v in cfg.VIEWS]
            if "invariance" in wanted:  # two augmented views, and the clean image vs one
                out.append(Comparison("invariance", Side(run, "aug1"), Side(run, "aug2")))
                out.append(Comparison("invariance", clean, Side(run, "aug1")))
            if "class" in wanted:
                out.append(Comparison("class", clean, labels))
        if "cross" in wanted:
            for a, b in itertools.combinations(ids, 2):
                out.append(Comparison("cross", Side(a, "clean"), Side(b, "clean")))
        return {c.id: c for c in out}

    def tiles(self, comparison: Comparison) -> list[Tile]:
        t = self.cka.tile_layers
        rows = math.ceil(len(self.layers(comparison.a)) / t)
        cols = math.ceil(len(self.layers(comparison.b)) / t)
        return [Tile(comparison, r, c) for r in range(rows) for c in range(cols)]

    def tile(self, comparison_id: str, name: str) -> Tile:
        for tile in self.tiles(self.comparisons[comparison_id]):
            if tile.name == name:
                return tile
        raise KeyError(f"comparison {comparison_id} has no tile {name}")

    def tile_ranges(self, tile: Tile) -> tuple[range, range]:
        t = self.cka.tile_layers
        n_a = len(self.layers(tile.comparison.a))
        n_b = len(self.layers(tile.comparison.b))
        return (
            range(tile.row * t, min((tile.row + 1) * t, n_a)),
            range(tile.col * t, min((tile.col + 1) * t, n_b)),
        )

    def sides(self) -> set[Side]:
        return {s for c in self.comparisons.values() for s in (c.a, c.b)}

    def run_views(self) -> list[tuple[str, str]]:
        """(run, view) pairs whose activations some comparison needs."""
        return sorted((s.run, s.view) for s in self.sides() if not s.is_labels)

    # -- paths (relative to the working directory) -------------------------------------------
    def data_store(self) -> str:
        return f"{RESULTS}/data/{self.data.name}.zarr"

    @staticmethod
    def model(run: str) -> str:
        return f"{RESULTS}/runs/{run}/model.pt"

    @staticmethod
    def metrics(run: str) -> str:
        return f"{RESULTS}/runs/{run}/metrics.parquet"

    @staticmethod
    def probes(run: str) -> str:
        return f"{RESULTS}/runs/{run}/probes.parquet"

    def run_files(self) -> list[str]:
        """What the per-run tables are made of: each run's model, metrics and probes."""
        return [f(run) for run in self.runs for f in (self.model, self.metrics, self.probes)]

    @staticmethod
    def run_tables() -> list[str]:
        return [
            f"{RESULTS}/tables/{name}.{ext}"
            for name in ("training", "probes", "runs")
            for ext in ("parquet", "csv")
        ]

    @staticmethod
    def activations(run: str, view: str) -> str:
        return f"{RESULTS}/activations/{run}/{view}.zarr"

    @staticmethod
    def gram(side: Side) -> str:
        if side.is_labels:
            return f"{RESULTS}/gram/{LABELS}.zarr"
        return f"{RESULTS}/gram/{side.run}/{side.view}.zarr"

    @staticmethod
    def tile_path(tile: Tile) -> str:
        return f"{RESULTS}/cka/{tile.comparison.id}/{tile.name}.parquet"

    def all_tiles(self) -> list[Tile]:
        return [t for c in self.comparisons.values() for t in self.tiles(c)]

    def figures(self) -> list[str]:
        """Every figure the study makes, PNG and PDF (plots.plot_all writes the same set)."""
        names = [
            f"within-{c.a.run}.{c.a.view}" for c in self.comparisons.values() if c.kind == "within"
        ]
        for c in self.comparisons.values():
            if c.kind == "cross":
                names += [f"cross{part}-{c.a.run}-vs-{c.b.run}" for part in ("", "-odd", "-even")]
        kinds = {c.kind for c in self.comparisons.values()}
        names += [
            name
            for kind, name in (
                ("cross", "cross-diagonal"),
                ("invariance", "invariance"),
                ("class", "class"),
            )
            if kind in kinds
        ]
        names.append("probes")
        return [f"{RESULTS}/figures/{name}.{ext}" for name in names for ext in ("png", "pdf")]
