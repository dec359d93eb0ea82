"""The real Snakemake workflow, end to end, on a tiny study of real Fashion-MNIST images."""

import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ckaflow.tables import COLUMNS
from tests.conftest import ENV, REPO, snakemake_cmd

TINY = REPO / "tests" / "configs" / "tiny.yaml"


def snakemake(workdir: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    cmd = snakemake_cmd(workdir, TINY, *args)
    result = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


@pytest.fixture(scope="module")
def finished(tmp_path_factory, fashion_root) -> Path:
    workdir = tmp_path_factory.mktemp("workflow")
    snakemake(workdir)
    return workdir


@pytest.mark.e2e
def test_table_has_the_documented_schema(finished):
    table = pd.read_parquet(finished / "results" / "tables" / "cka.parquet")
    assert list(table.columns) == [*COLUMNS, "config_hash", "merged_by"]
    assert set(table["kind"]) == {"within", "cross", "invariance", "class"}
    assert set(table["method_a"]) == {"simclr", "supervised"}
    assert set(table["estimator"]) == {"minibatch"}
    assert (table["n"] == 300).all()
    assert (table["bootstrap"] == 20).all()
    assert np.isfinite(table[["ci_low", "ci_high"]]).all().all()
    assert (table["ci_low"] <= table["ci_high"] + 1e-12).all()
    csv = pd.read_csv(finished / "results" / "tables" / "cka.csv")
    assert len(csv) == len(table)


@pytest.mark.e2e
def test_every_layer_with_itself_is_one_and_every_value_finite(finished):
    table = pd.read_parquet(finished / "results" / "tables" / "cka.parquet")
    assert np.isfinite(table["value"]).all()
    diagonal = table[(table["kind"] == "within") & (table["layer_a"] == table["layer_b"])]
    assert len(diagonal) == 28 + 27  # every layer of both runs
    np.testing.assert_allclose(diagonal["value"], 1.0, atol=1e-6)


@pytest.mark.e2e
def test_class_structure_and_invariance_are_compared(finished):
    table = pd.read_parquet(finished / "results" / "tables" / "cka.parquet")
    classes = table[table["kind"] == "class"]
    assert set(classes["layer_b"]) == {"labels"}
    assert len(classes) == 28 + 27
    invariance = table[table["kind"] == "invariance"]
    views = set(zip(invariance["view_a"], invariance["view_b"], strict=True))
    assert views == {("aug1", "aug2"), ("clean", "aug1")}
    per_layer = invariance[invariance["layer_a"] == invariance["layer_b"]]
    assert len(per_layer) == 2 * (28 + 27)


@pytest.mark.e2e
def test_figures_and_artifacts_exist(finished):
    figures = sorted(p.name for p in (finished / "results" / "figures").glob("*.png"))
    assert "class.png" in figures and "invariance.png" in figures
    assert sum(name.startswith("within-") for name in figures) == 2
    pair = "simclr-resnet18-w4-s0-vs-supervised-resnet18-w4-s0"
    for part in ("cross", "cross-odd", "cross-even"):
        assert f"{part}-{pair}.png" in figures
    assert "cross-diagonal.png" in figures
    assert all((finished / "results" / "figures" / f).stat().st_size > 10_000 for f in figures)
    assert list((finished / "results" / "activations").glob("*/aug2.zarr"))


@pytest.mark.e2e
def test_summary_states_each_claim_with_numbers(finished):
    text = (finished / "results" / "summary.md").read_text()
    for claim in (
        "Early layers match",
        "The last stage diverges",
        "SimCLR fits augmentation invariance",
        "Supervised learning fits the classes",
    ):
        assert claim in text
    assert "In stage 4 the mean even-layer" in text
    assert text.count("agrees") + text.count("disagrees") >= 5


@pytest.mark.e2e
def test_second_run_has_nothing_to_do(finished):
    result = snakemake(finished, "--dry-run")
    assert "Nothing to be done" in result.stdout + result.stderr
