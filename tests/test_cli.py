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
        *("prepare", "import", "train", "evaluate", "run-tables", "extract", "gram", "cka"),
        "merge",
        *("plot", "summarize", "plan", "inspect"),
    }


def test_every_list_of_choices_is_the_schema_s():
    """Estimators, dtypes, codecs, methods, data sets: each listed once, in the schema; the
    command line, the engine, the store and the trainer take theirs from it or match it."""
    from ckaflow import cka, cli, data, store
    from ckaflow.config import schema_enum
    from ckaflow.train.loop import METHODS

    sub = next(a for a in cli.build_parser()._actions if a.dest == "command").choices
    for command in ("gram", "cka"):
        option = next(a for a in sub[command]._actions if a.dest == "estimator")
        assert tuple(option.choices) == schema_enum("cka.estimator")
    assert (
        cka.ESTIMATORS == schema_enum("cka.estimator") == ("minibatch", "linear", "debiased", "rbf")
    )
    assert schema_enum("activations.dtype") == store.DTYPES and "bfloat16" in store.DTYPES
    assert schema_enum("activations.codec") == store.CODECS and "zstd" in store.CODECS
    assert set(METHODS) == set(schema_enum("methods"))
    assert set(data.LOADERS) == set(schema_enum("data.name"))


def test_a_malformed_cka_spec_is_an_error_naming_what_is_expected(tmp_path):
    for spec in ("not json", '{"comparisons": [{"id": "x"}]}'):
        result = _ckaflow("cka", "--spec", spec, "--out", str(tmp_path / "p.parquet"))
        assert result.returncode == 2, result.stderr
        assert "--spec is no CKA spec" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "p.parquet").exists()
