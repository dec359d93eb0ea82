import json
import subprocess

from tests.conftest import ENV, tiny_config


def _ckaflow(*args, **kw):
    return subprocess.run(["ckaflow", *args], capture_output=True, text=True, env=ENV, **kw)


def test_missing_dataset_is_an_error_for_people_not_a_traceback(tmp_path):
    cfg = tiny_config(data={"root": str(tmp_path / "nowhere")})
    spec = json.dumps({"data": cfg["data"], "augment": cfg["augment"], "chunk_rows": 64})
    result = _ckaflow("prepare", "--spec", spec, "--out", str(tmp_path / "d.zarr"))
    assert result.returncode == 2
    assert "apt-get install dataset-fashion-mnist" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "d.zarr").exists()


def test_help_lists_every_stage():
    out = _ckaflow("--help").stdout
    for stage in ("prepare", "train", "extract", "gram", "tile", "merge", "plot", "inspect"):
        assert stage in out


def test_cli_estimators_are_the_engine_estimators():
    from ckaflow import cka, cli

    assert tuple(cli.ESTIMATORS) == cka.ESTIMATORS
