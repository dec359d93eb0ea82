import pytest

from ckaflow.errors import CkaflowError
from ckaflow.inspect import inspect_path
from tests.conftest import REPO


def test_activation_store_shows_layers_chunks_and_provenance(activations):
    text = inspect_path(activations[("simclr", "clean")])
    assert "complete" in text and "INCOMPLETE" not in text
    assert "layer4.1.residual" in text and "(64, 512)" in text  # chunked along rows only
    assert "code_version" in text and "model_spec_hash" in text
    assert text.index("stem") < text.index("layer1.0.relu1") < text.index("head.1")


def test_partial_store_is_shown_as_incomplete(tmp_path):
    import zarr

    zarr.open_group(tmp_path / "x.zarr", mode="w").attrs.update({"kind": "ckaflow.activations"})
    assert "INCOMPLETE" in inspect_path(tmp_path / "x.zarr")


def test_model_shows_run_and_metrics(trained):
    text = inspect_path(trained["supervised"])
    assert "run: supervised-resnet18-w4-s0" in text and "kNN accuracy" in text
    assert "fed: 28 px, the training subset's mean and std" in text
    ckpt = inspect_path(trained["supervised"].parent / "checkpoint.pt")
    assert "after epoch 1 (resumable)" in ckpt


def test_table_shows_rows_columns_and_head(tmp_path):
    import pandas as pd

    pd.DataFrame({"layer_a": ["stem", "pool"], "value": [1.0, 0.5]}).to_parquet(
        tmp_path / "t.parquet"
    )
    text = inspect_path(tmp_path / "t.parquet")
    assert "2 rows × 2 columns" in text and "value: float64" in text and "pool" in text


def test_results_folder_lists_what_the_study_lacks(tmp_path):
    (tmp_path / "results" / "figures").mkdir(parents=True)
    text = inspect_path(tmp_path / "results", REPO / "tests" / "configs" / "tiny.yaml")
    assert "0 of" in text and "missing: results/data/fashion-mnist.zarr" in text


def test_unknown_things_are_refused(tmp_path):
    with pytest.raises(CkaflowError, match="does not exist"):
        inspect_path(tmp_path / "nothing")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(CkaflowError, match="not an artifact ckaflow knows"):
        inspect_path(tmp_path / "notes.txt")
    (tmp_path / "bad.pt").write_bytes(b"junk")
    with pytest.raises(CkaflowError, match="not a readable checkpoint"):
        inspect_path(tmp_path / "bad.pt")


def test_a_store_snakemake_wrote_gives_no_warning(activations, tmp_path):
    """Snakemake leaves `.snakemake_timestamp` inside directory outputs; Zarr would warn about it
    on every listing. A healthy artifact is inspected in silence."""
    import shutil
    import subprocess

    from tests.conftest import BIN, ENV

    store = tmp_path / "clean.zarr"
    shutil.copytree(activations[("simclr", "clean")], store)
    (store / ".snakemake_timestamp").touch()
    result = subprocess.run(
        [str(BIN / "ckaflow"), "inspect", str(store)],
        capture_output=True,
        text=True,
        env={**ENV, "PYTHONWARNINGS": "error::UserWarning"},  # a warning fails the command
    )
    assert result.returncode == 0, result.stderr
    assert "layer4.1.out" in result.stdout and "Warning" not in result.stderr
