"""What a study computes and where each artifact lives; no torch, so Snakemake loads it fast.

A *side* of a comparison is one representation set: a run on a view, or the eval labels.
A *comparison* pairs two sides; one CKA job computes every comparison, reading each Gram store
once (`ckaflow.stages.cka`).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from ckaflow import config as cfg
from ckaflow.errors import ConfigError
from ckaflow.figure_registry import FAMILIES, FIGURE_FORMATS
from ckaflow.layers import Layer, label_layer, layer_registry, module_registry, select_layers

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


# The typed spec of each stage: what its output is computed from, and nothing else.
@dataclass(frozen=True)
class PrepareSpec:
    data: dict  # data set, subset sizes and seed (not where its files are: data.root)
    augment: dict


@dataclass(frozen=True)
class TrainSpec:
    run: dict  # method, model, seed and the recipe's keys that method uses
    augment: dict


@dataclass(frozen=True)
class ExtractSpec:
    layers: tuple[str, ...]
    examples: int | None
    precision: str
    channels_last: bool | str
    dtype: str
    codec: str
    level: int
    batch_size: int
    chunk_rows: int


@dataclass(frozen=True)
class GramSpec:
    estimator: str
    batch_size: int
    passes: int
    seed: int
    examples: int | None
    layers: tuple[str, ...] | None = None  # None: the labels
    precision: str | None = None
    channels_last: bool | str | None = None

    def blocks(self) -> dict:
        """How the examples are cut into blocks: the same for every side of a study, the
        labels included (the Gram functions' keywords of the same names)."""
        return {
            k: getattr(self, k) for k in ("estimator", "batch_size", "passes", "seed", "examples")
        }


@dataclass(frozen=True)
class CkaSpec:
    comparisons: tuple[dict, ...]  # id, kind and the two sides' Gram store paths (a, b)
    estimator: str
    bootstrap: int
    seed: int
    tile_layers: int  # full-data estimators: layers per side held in memory at once
    cache: str  # each comparison's table, reused while its inputs are unchanged


@dataclass(frozen=True)
class TablesSpec:
    config_hash: str  # of the specs the CKA table's numbers depend on (`Study.tables_spec`)


class Study:
    """The validated config, seen as the set of artifacts it implies."""

    def __init__(self, config: dict[str, Any]):
        self.config = config
        self.data = cfg.data_spec(config)
        self.augment = cfg.augment_spec(config)
        self.cka = cfg.cka_spec(config)
        specs = cfg.run_specs(config)
        self.runs = {run.run_id: run for run in specs}
        if not self.runs:
            raise ConfigError("the study has no runs: list methods to train, or imports")
        if len(self.runs) < len(specs):
            raise ConfigError("two runs share a name: give each import a name of its own")
        for run in self.runs:  # a selection that matches nothing stops here, before any job
            try:
                self.stored_layers(Side(run, "clean"))
            except ValueError as err:
                raise ConfigError(
                    f"activations.layers / activations.store: {err} (run {run}); the stored "
                    "layers are chosen among the compared ones"
                ) from None

    def check_data_source(self) -> None:
        """Stop before planning when data.root now holds other files than the prepared data
        store was made from (see data.check_source)."""
        from ckaflow.data import check_source

        check_source(self.data.name, self.data.root, self.data_store())

    # -- layers ----------------------------------------------------------------------------
    def layers(self, side: Side) -> list[Layer]:
        if side.is_labels:
            return [label_layer()]
        run = self.runs[side.run]
        selection = self.config["activations"]["layers"]
        if run.imported is not None and run.imported.format == "module":
            # every layer the user named: built on torch's meta device to learn their names
            return self._module_layers(side.run)
        return select_layers(
            layer_registry(run.model.arch, run.head), selection["kinds"], selection["names"]
        )

    @functools.cache  # noqa: B019 (one Study per workflow run)
    def _module_layers(self, run_id: str) -> list[Layer]:
        import torch

        from ckaflow.models import build_module, module_layer_names

        source = self.runs[run_id].imported
        try:
            with torch.device("meta"):
                net = build_module(source.builder, source.kwargs)
            return module_registry(module_layer_names(net, source.layers))
        except ValueError as err:
            raise ConfigError(f"imports: {run_id}: {err}") from None

    @property
    def examples(self) -> int | None:
        """Compare the first n eval examples (None: all)."""
        return self.config["activations"]["examples"]

    # -- what each stage computes from ---------------------------------------------------------
    # A rule's params are exactly its stage's spec, so Snakemake reruns a stage when, and only
    # when, something that determines its output changes (README.md: "What a change reruns",
    # tested over every key of the schema). Where and how a stage runs (device, backend, slurm,
    # checkpoint) and where the data set lives (data.root) are part of no spec.
    def prepare_spec(self) -> PrepareSpec:
        data = {k: v for k, v in cfg.to_jsonable(self.data).items() if k != "root"}
        return PrepareSpec(data, cfg.to_jsonable(self.augment))

    def train_spec(self, run: str) -> TrainSpec:
        return TrainSpec(cfg.to_jsonable(self.runs[run]), cfg.to_jsonable(self.augment))

    def import_spec(self, run: str) -> dict:
        """An imported run: its source, format, architecture and labels (the file's content is
        the rule's input, so a new file at the same path reruns it too)."""
        return cfg.to_jsonable(self.runs[run])

    def evaluate_spec(self) -> dict:
        return dict(self.config["evaluate"])

    def extract_spec(self, side: Side) -> ExtractSpec:
        """How one activation store is written: precision, codec, layers, examples."""
        act = self.config["activations"]
        return ExtractSpec(
            layers=tuple(layer.name for layer in self.stored_layers(side)),
            examples=self.stored_examples,
            precision=act["precision"],
            channels_last=act["channels_last"],
            dtype=act["dtype"],
            codec=act["codec"],
            level=act["level"],
            batch_size=act["batch_size"],
            chunk_rows=act["chunk_rows"],
        )

    def gram_spec(self, side: Side) -> GramSpec:
        """What the Gram statistics of one run and view (or of the labels) are computed from."""
        act = self.config["activations"]
        common = {
            "estimator": self.cka.estimator,
            "batch_size": self.cka.batch_size,
            "passes": self.cka.passes,
            "seed": self.data.seed,  # of the permuted passes
            "examples": self.examples,
        }
        if side.is_labels:
            return GramSpec(**common)
        layers = tuple(layer.name for layer in self.layers(side))
        return GramSpec(
            **common, layers=layers, precision=act["precision"], channels_last=act["channels_last"]
        )

    def cka_spec(self) -> CkaSpec:
        """What the CKA job computes: every layer pair of every comparison."""
        return CkaSpec(
            comparisons=tuple(
                {"id": c.id, "kind": c.kind, "a": self.gram(c.a), "b": self.gram(c.b)}
                for c in self.comparisons.values()
            ),
            estimator=self.cka.estimator,
            bootstrap=self.cka.bootstrap,
            seed=self.data.seed,  # of the bootstrap
            tile_layers=self.cka.tile_layers,
            cache=self.cka_cache(),
        )

    def tables_spec(self) -> TablesSpec:
        """The CKA table records a hash of what its numbers depend on: the specs of the stages
        upstream of it (how many layers a full-data CKA job holds at once, and which comparisons
        are made, change no number and are left out; an imported run enters by its checkpoint's
        path)."""
        sides = sorted(self.sides(), key=lambda side: side.tag)
        unread = ("tile_layers", "comparisons")
        cka = {k: v for k, v in cfg.to_jsonable(self.cka).items() if k not in unread}
        upstream = [
            cfg.to_jsonable(self.prepare_spec()),
            [cfg.to_jsonable(self.train_spec(run)) for run in sorted(self.runs)],
            [cfg.to_jsonable(self.gram_spec(side)) for side in sides],
            cka,
        ]
        return TablesSpec(cfg.stable_hash(upstream))

    def claims_spec(self) -> dict:
        """How the claims are judged: the summary's parameters."""
        return dict(self.config["claims"])

    def figures_spec(self) -> dict:
        return dict(self.config["plots"])

    def stored_layers(self, side: Side) -> list[Layer]:
        """The compared layers whose activations are written for inspection (activations.store)."""
        store = self.config["activations"]["store"]
        if store == "none":
            return []
        compared = self.layers(side)
        if store == "all":
            return compared
        selection = store.get("layers") or {}
        kinds = selection.get("kinds")
        if compared[0].kind == "module":  # kinds name ResNet layers; a module's are its own
            kinds = None
        return select_layers(compared, kinds, selection.get("names"))

    @property
    def stored_examples(self) -> int | None:
        """The first n eval examples whose activations are stored (None: all compared ones)."""
        store = self.config["activations"]["store"]
        wanted = store.get("examples") if isinstance(store, dict) else None
        if wanted is None:
            return self.examples
        return wanted if self.examples is None else min(wanted, self.examples)

    def activation_stores(self) -> list[str]:
        """The activation stores the study writes (none when activations.store is none)."""
        if self.config["activations"]["store"] == "none":
            return []
        return [self.activations(run, view) for run, view in self.run_views()]

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

    def gram_stores(self) -> list[str]:
        """Every Gram store some comparison reads: the CKA job's inputs."""
        return sorted({self.gram(side) for side in self.sides()})

    def sides(self) -> set[Side]:
        return {s for c in self.comparisons.values() for s in (c.a, c.b)}

    def run_views(self) -> list[tuple[str, str]]:
        """(run, view) pairs whose activations some comparison needs."""
        return sorted((s.run, s.view) for s in self.sides() if not s.is_labels)

    # -- paths (relative to the working directory) -------------------------------------------
    # The one place artifact paths are spelled: rules take them from here (with "{run}",
    # "{view}"... as arguments, the methods give the rules' wildcard patterns), and so do
    # `inspect` and the target rule.
    FIGURES = f"{RESULTS}/figures"
    TABLES = f"{RESULTS}/tables"

    def data_store(self) -> str:
        return f"{RESULTS}/data/{self.data.name}.zarr"

    @staticmethod
    def run_dir(run: str) -> str:
        return f"{RESULTS}/runs/{run}"

    @staticmethod
    def model(run: str) -> str:
        return f"{RESULTS}/runs/{run}/model.pt"

    @staticmethod
    def metrics(run: str) -> str:
        return f"{RESULTS}/runs/{run}/metrics.parquet"

    @staticmethod
    def probes(run: str) -> str:
        return f"{RESULTS}/runs/{run}/probes.parquet"

    @staticmethod
    def table(name: str, ext: str = "parquet") -> str:
        """A tidy table: cka, claims, training, probes or runs (parquet, or csv)."""
        return f"{Study.TABLES}/{name}.{ext}"

    @staticmethod
    def summary() -> str:
        return f"{RESULTS}/summary.md"

    @staticmethod
    def slurm_records() -> str:
        """Where `launch` keeps each SLURM job's record (outside Snakemake's outputs)."""
        return f"{RESULTS}/.slurm"

    @staticmethod
    def log(stage: str, name: str) -> str:
        return f"{RESULTS}/logs/{stage}/{name}.log"

    def artifacts(self) -> list[str]:
        """Everything the study makes (the target rule's inputs; what `inspect` checks)."""
        out = [self.data_store(), *self.run_files()]
        out += [self.gram(side) for side in sorted(self.sides(), key=lambda s: s.tag)]
        out.append(self.cka_pairs())
        out += [self.table(name, ext) for name in ("cka", "claims") for ext in ("parquet", "csv")]
        out += [*self.run_tables(), *self.figures(), self.summary(), *self.activation_stores()]
        return out

    def run_files(self) -> list[str]:
        """What the per-run tables are made of: each run's model, metrics (trained runs) and
        probes."""
        return [
            f(run_id)
            for run_id, run in self.runs.items()
            for f in (self.model, self.metrics, self.probes)
            if f != self.metrics or run.imported is None
        ]

    def trained_runs(self) -> list[str]:
        return [run_id for run_id, run in self.runs.items() if run.imported is None]

    def imported_runs(self) -> list[str]:
        return [run_id for run_id, run in self.runs.items() if run.imported is not None]

    @staticmethod
    def run_tables() -> list[str]:
        return [
            Study.table(name, ext)
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
    def cka_pairs() -> str:
        """The CKA job's table: every layer pair of every comparison."""
        return f"{RESULTS}/cka/pairs.parquet"

    @staticmethod
    def cka_cache() -> str:
        """Where the CKA job keeps each comparison's table, keyed by what it was computed from,
        so that a rerun computes only the comparisons whose stores or settings changed."""
        return f"{RESULTS}/cka/comparisons"

    def any_module(self, c: Comparison) -> bool:
        """Whether a side of the comparison is a network imported as any module."""
        return any(
            not side.is_labels
            and self.runs[side.run].imported is not None
            and self.runs[side.run].imported.format == "module"
            for side in (c.a, c.b)
        )

    def figures(self) -> list[str]:
        """Every figure the study makes, PNG and PDF (plots.plot_all writes the same set)."""
        return list(self.figure_families)

    @cached_property
    def figure_families(self) -> dict[str, str]:
        """Each figure's path -> its family (`ckaflow.figure_registry`), whose caption in the
        report is workflow/report/<family>.rst."""
        return {
            f"{Study.FIGURES}/{name}.{ext}": family.name
            for family in FAMILIES
            for name in family.planned(self)
            for ext in FIGURE_FORMATS
        }
