import json
import subprocess

from tests.conftest import ENV, tiny_config


def _ckaflow(*args, **kw):
    return subprocess.run(["ckaflow", *args], capture_output=True, text=True, env=ENV, **kw)


def test_missing_dataset_is_an_error_for_people_not_a_traceback(tmp_path):
    cfg = tiny_config(data={"root": str(tmp_path / "nowhere")})
    spec = json.dumps({"data": cfg["data"], "augment": cfg["augment"]})
    result = _ckaflow("prepare", "--spec", spec, "--out", str(tmp_path / "d.zarr"))
    assert result.returncode == 2
    assert "apt-get install dataset-fashion-mnist" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "d.zarr").exists()


def test_help_lists_every_stage():
    import re

    out = _ckaflow("--help").stdout
    listed = set(re.findall(r"\{([a-z,-]+)\}", out))  # argparse's {a,b,...} of subcommands
    assert len(listed) == 1  # the same list in the usage and under "positional arguments"
    assert set(listed.pop().split(",")) == {
        *("prepare", "train", "evaluate", "run-tables", "extract", "gram", "tile", "merge"),
        *("plot", "summarize", "plan", "inspect"),
    }


def test_cli_estimators_are_the_engine_estimators():
    from ckaflow import cka, cli

    assert tuple(cli.ESTIMATORS) == cka.ESTIMATORS
