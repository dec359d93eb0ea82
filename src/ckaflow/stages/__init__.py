"""The workflow's stages, one module per Snakemake rule, and the one table that joins them.

Each stage module `ckaflow.stages.<rule>` has `run(spec, <paths>, out, ...)`: its typed spec
(built by `ckaflow.study.Study`), its input paths and its output path; it writes its artifact
whole or not at all. `STAGES` says, per rule, which spec, which paths and which run-time
settings the stage takes; the command line (`ckaflow.cli`: one subcommand per rule) and the
rules' shell commands (`rules/common.smk`) are both generated from it. Adding a stage means a
rule, a module here, a spec in `Study` and a line in `STAGES`.

Importing this package costs no torch: `ckaflow --help` and Snakemake's parsing stay fast.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, fields
from types import ModuleType
from typing import Any

from ckaflow import config, study


@dataclass(frozen=True)
class Setting:
    """How a stage runs, never what it computes (so in no spec, and no param of its rule): a
    flag whose default is the environment variable the workflow sets from the config. Settings
    in `CLI_ONLY` are the command line's; the others are keywords of the stage's run()."""

    name: str  # the flag is --<name with '-'>
    env: str | None
    default: Any  # None: run()'s own default
    help: str
    parse: Callable[[str], Any] = str
    choices: tuple[str, ...] | None = None

    def value(self) -> Any:
        """The default: the environment's text when set (argparse parses it like a flag's, so a
        bad value is a usage error of the command that reads it), else `default`."""
        raw = os.environ.get(self.env) if self.env else None
        return self.default if raw is None else raw


def json_value(text: str) -> Any:
    return json.loads(text)


json_value.__name__ = "JSON"  # argparse's "invalid JSON value: ..."


def _config_key(key: str, env: str, help: str, parse=str) -> Setting:
    """A setting that is a config key: its default and choices are the schema's."""
    node = config.schema_node(key)
    return Setting(
        key, env, node.get("default"), help, parse, node.get("enum") and tuple(node["enum"])
    )


DEVICE = _config_key("device", "CKAFLOW_DEVICE", "torch device")
BACKEND = _config_key("backend", "CKAFLOW_BACKEND", "run here or as a SLURM job")
SLURM = Setting("slurm", "CKAFLOW_SLURM", None, "JSON: the config's `slurm` section", json_value)
CHECKPOINT = _config_key(
    "checkpoint", "CKAFLOW_CHECKPOINT", "JSON: how often training checkpoints", json_value
)
THREADS = Setting("threads", None, None, "CPU threads for torch (the rule passes its threads)", int)
FLUSH_S = Setting(
    "flush_s",
    "CKAFLOW_FLUSH_S",
    None,
    "seconds between writes of finished blocks (unset: stages.gram.FLUSH_SECONDS)",
    float,
)
DATA_ROOT = Setting(
    "root", "CKAFLOW_DATA_ROOT", None, "folder of the data set's files (the config's data.root)"
)
# the stage runs in this process (local) or as a SLURM job; SlurmSpec picks its resources
LAUNCHED = (BACKEND, SLURM)
# read by the command line, not passed to run()
CLI_ONLY = (THREADS, *LAUNCHED)


# A spec parser takes the JSON value and returns the stage's typed spec, raising ConfigError
# (or TypeError, KeyError: wrong fields); its `expected` says what it takes, for help and errors.
def _parser(parse: Callable[[Any], Any], expected: str) -> Callable[[Any], Any]:
    """`parse` (a function of its own: this sets an attribute on it) saying what it expects."""
    parse.expected = expected
    return parse


def typed(cls: type) -> Callable[[dict], Any]:
    """A spec dataclass from its JSON object."""
    names = ", ".join(f.name for f in fields(cls))
    return _parser(lambda value: cls(**value), f"{cls.__name__}: JSON with {names}")


def section(name: str) -> Callable[[dict], dict]:
    """A spec that is a config section as it stands (evaluate, claims, plots), passed on as the
    library function's keywords."""
    keys = tuple(config.schema_node(name)["properties"])

    def parse(value: dict) -> dict:
        if not isinstance(value, dict):
            raise TypeError(f"expected a JSON object, got {type(value).__name__}")
        if unknown := sorted(set(value) - set(keys)):
            raise KeyError(f"unknown keys {unknown}")
        return value

    return _parser(parse, f"a JSON object with some of {', '.join(keys)} (config {name})")


@dataclass(frozen=True)
class Stage:
    """A stage's line in the table: what its command takes and its rule passes."""

    rule: str  # the Snakemake rule and the module ckaflow.stages.<rule>
    help: str
    spec: Callable[[dict], Any] | None  # JSON -> the typed spec (None: the stage has none)
    paths: dict[str, str]  # run()'s path keywords -> the rule's placeholder
    outputs: tuple[str, ...] = ("out",)  # the path keywords that are written
    many: tuple[str, ...] = ()  # path keywords that take several paths
    optional: tuple[str, ...] = ()  # path keywords one may leave out by hand
    view: bool = False  # one eval view per job (the rule's {wildcards.view})
    settings: tuple[Setting, ...] = ()

    @property
    def command(self) -> str:
        return self.rule.replace("_", "-")

    @property
    def launched(self) -> bool:
        return BACKEND in self.settings

    def module(self) -> ModuleType:
        return importlib.import_module(f"{__name__}.{self.rule}")

    def shell(self) -> str:
        """The rule's command: the spec, the paths, the view and the threads, nothing else."""
        words = ["ckaflow", self.command]
        if self.spec is not None:
            words += ["--spec", "{params.spec}"]
        for name, placeholder in self.paths.items():
            words += [flag(name), placeholder]
        if self.view:
            words += ["--view", "{wildcards.view}"]
        if THREADS in self.settings:
            words += ["--threads", "{threads}"]
        return " ".join(words)


# a trained or imported run's network over the data store, into one output
MODEL_STAGE_PATHS = {"model": "{input.model}", "data": "{input.data}", "out": "{output}"}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


STAGES = {
    stage.rule: stage
    for stage in (
        Stage(
            "prepare_data",
            "prepare the data store (subsets and eval views clean/aug1/aug2)",
            typed(study.PrepareSpec),
            {"out": "{output}"},
            settings=(DATA_ROOT,),
        ),
        Stage(
            "train",
            "train one run (resumes from its checkpoint)",
            typed(study.TrainSpec),
            {"data": "{input.data}", "out": "{params.out_dir}"},
            settings=(DEVICE, CHECKPOINT, THREADS, *LAUNCHED),
        ),
        Stage(
            "import_run",
            "a checkpoint trained elsewhere as a run's model.pt",
            _parser(
                lambda value: config.run_spec_from_dict(value), "RunSpec: JSON of the imported run"
            ),
            {"data": "{input.data}", "out": "{output.model}"},
        ),
        Stage(
            "evaluate",
            "linear probes of a run, trained or imported, at every layer",
            section("evaluate"),
            MODEL_STAGE_PATHS,
            settings=(DEVICE, THREADS, *LAUNCHED),
        ),
        Stage(
            "run_tables",
            "training, probes and runs tables of the runs",
            None,
            {"runs": "{params.runs}", "out": "{params.out_dir}"},
            many=("runs",),
        ),
        Stage(
            "extract",
            "store the selected activations of a run on one view, to look at",
            typed(study.ExtractSpec),
            MODEL_STAGE_PATHS,
            view=True,
            settings=(DEVICE, THREADS, *LAUNCHED),
        ),
        Stage(
            "gram",
            "Gram statistics of every compared layer of a run on one view, from its forward pass",
            typed(study.GramSpec),
            MODEL_STAGE_PATHS,
            view=True,
            settings=(DEVICE, FLUSH_S, THREADS, *LAUNCHED),
        ),
        Stage(
            "gram_labels",
            "Gram statistics of the one-hot eval labels (class structure)",
            typed(study.GramSpec),
            {"data": "{input}", "out": "{output}"},
        ),
        Stage(
            "cka",
            "CKA of every layer pair of every comparison, each Gram store read once",
            typed(study.CkaSpec),
            {"out": "{output}"},
            settings=(THREADS, *LAUNCHED),
        ),
        Stage(
            "merge_tables",
            "the CKA job's table into the tidy table, checked and stamped with the config hash",
            typed(study.TablesSpec),
            {"tables": "{input}", "out": "{output.parquet}"},
            many=("tables",),
        ),
        Stage(
            "figures",
            "heatmaps, curves against depth and probe accuracy (PNG and PDF)",
            section("plots"),
            {"cka": "{input.cka}", "probes": "{input.probes}", "out": "{params.out_dir}"},
            optional=("probes",),
        ),
        Stage(
            "summary",
            "the paper's claims, each a sentence with this study's numbers and a verdict",
            section("claims"),
            {
                "cka": "{input.cka}",
                "probes": "{input.probes}",
                "claims": "{output.claims}",
                "out": "{output.summary}",
            },
            outputs=("claims", "out"),
            optional=("probes", "claims"),
        ),
    )
}
