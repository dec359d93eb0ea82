"""Shared fixtures: small real data (Fashion-MNIST from Debian's package), a trained tiny model."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from ckaflow import config

REPO = Path(__file__).resolve().parents[1]
FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")
BIN = Path(sys.executable).parent  # the venv's ckaflow and snakemake
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}

# Specs for the stages' commands by hand: the library's defaults, every layer and example
STAGE_SPECS = {
    "extract": {
        "layers": None, "examples": None, "precision": "auto", "channels_last": "auto",
        "dtype": "float32", "codec": "zstd", "level": 1, "batch_size": 256, "chunk_rows": 256,
    },
    "gram": {"estimator": "minibatch", "batch_size": 256, "passes": 1, "seed": 0, "examples": None},
    "evaluate": {},
}  # fmt: skip


def stage_spec(stage: str, **changes) -> str:
    """The JSON `--spec` of `ckaflow <stage>`, with `changes` to the defaults."""
    return json.dumps({**STAGE_SPECS[stage], **changes})


def snakemake_cmd(workdir: Path, configfile: Path, *args: str, cores: int = 2) -> list[str]:
    """The real `snakemake` on the repository's workflow, in `workdir`, for one study."""
    return [
        str(BIN / "snakemake"),
        "--snakefile",
        str(REPO / "workflow" / "Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        str(configfile),
        "--cores",
        str(cores),
        *args,
    ]


def tiny_config(tmp_root: Path | None = None, **overrides) -> dict:
    """A validated tiny study: a few hundred real images, a 4-channel ResNet-18, one epoch."""
    raw = {
        "study": "unit",
        "device": "cpu",
        "data": {"train_size": 256, "eval_size": 160, "root": str(FASHION_ROOT)},
        "model": {"arch": "resnet18", "width": 4},
        "recipes": {
            "simclr": {"epochs": 1, "batch_size": 64, "optimizer": "adamw", "lr": 1e-3},
            "supervised": {"epochs": 1, "batch_size": 64, "lr": 0.05},
        },
        "cka": {"batch_size": 64, "tile_layers": 8},
    }
    for key, value in overrides.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return config.validate(raw)


@pytest.fixture(scope="session")
def fashion_root() -> Path:
    if not (FASHION_ROOT / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.fail(
            f"Fashion-MNIST is not installed in {FASHION_ROOT}: "
            "apt-get install dataset-fashion-mnist (the README's test command does this)"
        )
    return FASHION_ROOT


@pytest.fixture(scope="session")
def study_config(fashion_root) -> dict:
    return tiny_config()


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, study_config) -> Path:
    from ckaflow import data

    out = tmp_path_factory.mktemp("data") / "fashion-mnist.zarr"
    return data.prepare(
        config.data_spec(study_config), config.augment_spec(study_config), out, chunk_rows=64
    )


@pytest.fixture(scope="session")
def trained(tmp_path_factory, study_config, prepared) -> dict[str, Path]:
    """Both methods trained for one epoch on real images: run id -> model.pt."""
    from ckaflow.train.loop import train_run

    out = {}
    for run in config.run_specs(study_config):
        run_dir = tmp_path_factory.mktemp(run.run_id)
        out[run.method] = train_run(
            run, config.augment_spec(study_config), prepared, run_dir, device="cpu", log=print
        )
    return out


@pytest.fixture(scope="session")
def activations(tmp_path_factory, trained, prepared) -> dict[tuple[str, str], Path]:
    """Activation stores of both runs on the clean and aug1 views."""
    from ckaflow.activations import extract

    root = tmp_path_factory.mktemp("activations")
    return {
        (method, view): extract(
            model, prepared, view, root / method / f"{view}.zarr", batch_size=50, chunk_rows=64
        )
        for method, model in trained.items()
        for view in ("clean", "aug1")
    }


@pytest.fixture(scope="module")
def grams(activations, tmp_path_factory) -> dict[str, Path]:
    """Minibatch Gram stores (64-row blocks) of both runs' clean activations."""
    from ckaflow.stages.gram import gram_store

    root = tmp_path_factory.mktemp("grams")
    return {
        method: gram_store(activations[(method, "clean")], root / f"{method}.zarr", "minibatch", 64)
        for method in ("simclr", "supervised")
    }
