import json
import subprocess

from tests.conftest import ENV, tiny_config


def _ckaflow(*args, **kw):
    return subprocess.run(["ckaflow", *args], capture_output=True, text=True, env=ENV, **kw)


def test_missing_dataset_is_an_error_for_people_not_a_traceback(tmp_path):
    cfg = tiny_config(data={"root": str(tmp_path / "nowhere")})
    spec = json.dumps({"data": cfg["data"], "augment": cfg["augment"]})
    result = _ckaflow("prepare-data", "--spec", spec, "--out", str(tmp_path / "d.zarr"))
    assert result.returncode == 2
    assert "apt-get install dataset-fashion-mnist" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "d.zarr").exists()


def test_help_lists_every_stage_by_its_rule_s_name():
    import re

    from ckaflow.stages import STAGES
    from tests.conftest import REPO

    out = _ckaflow("--help").stdout
    listed = set(re.findall(r"\{([a-z,-]+)\}", out))  # argparse's {a,b,...} of subcommands
    assert len(listed) == 1  # the same list in the usage and under "positional arguments"
    rules = set(re.findall(r"^rule (\w+):", _all_rules(REPO), re.M)) - {"all"}
    assert len(rules) == len(STAGES)
    assert set(listed.pop().split(",")) == {r.replace("_", "-") for r in rules} | {
        "plan",
        "inspect",
    }


def _all_rules(repo) -> str:
    return "\n".join(p.read_text() for p in sorted((repo / "rules").glob("*.smk")))


def test_each_rule_runs_its_stage_s_command():
    """Every rule's shell is its stage's generated command, and the rule has each placeholder
    the command names (params.spec, input.model...): one table, no spelling twice."""
    import re

    from ckaflow.stages import STAGES
    from tests.conftest import REPO

    text = _all_rules(REPO)
    for rule, stage in STAGES.items():
        body = text.split(f"rule {rule}:", 1)[1].split("\nrule ", 1)[0]
        assert f'command("{rule}")' in body, rule
        for placeholder in re.findall(r"\{(\w+)\.(\w+)\}", stage.shell()):
            kind, name = placeholder
            if kind in ("params", "input", "output") and name != "spec":
                assert re.search(rf"^\s+{name}=", body, re.M), (rule, placeholder)
        assert ("params:\n        spec=" in body) == (stage.spec is not None), rule


def test_every_list_of_choices_is_the_schema_s():
    """Estimators, dtypes, codecs, methods, data sets: each listed once, in the schema; the
    command line, the engine, the store and the trainer take theirs from it or match it."""
    from ckaflow import cka, cli, data, store
    from ckaflow.config import schema_enum
    from ckaflow.train.loop import METHODS

    sub = next(a for a in cli.build_parser()._actions if a.dest == "command").choices
    for command in ("train", "evaluate", "extract", "gram"):
        option = next(a for a in sub[command]._actions if a.dest == "device")
        assert tuple(option.choices) == schema_enum("device")
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
        assert "--spec is no cka spec" in result.stderr and "Traceback" not in result.stderr
        assert "comparisons, estimator, bootstrap, seed, tile_layers, cache" in result.stderr
    assert not (tmp_path / "p.parquet").exists()


def test_each_stage_module_takes_what_its_table_line_says():
    """run()'s keywords are the spec, the paths, the view and the settings that `STAGES` gives
    it (the launch settings stay with the command line), and every path without a default is
    one the command requires."""
    import inspect

    from ckaflow.stages import CLI_ONLY, STAGES

    for rule, stage in STAGES.items():
        params = inspect.signature(stage.module().run).parameters
        expected = {
            *(["spec"] if stage.spec else []),
            *stage.paths,
            *(["view"] if stage.view else []),
        }
        expected |= {s.name for s in stage.settings if s not in CLI_ONLY}
        assert set(params) == expected, rule
        required = {n for n, p in params.items() if p.default is inspect.Parameter.empty}
        assert required - {"spec", "view"} == set(stage.paths) - set(stage.optional), rule


def test_bad_settings_and_specs_are_usage_errors_not_tracebacks(tmp_path):
    """A malformed CKAFLOW_* value is an error of the command that reads it, naming its flag
    (other commands never parse it); a config section's spec with a key the schema lacks is
    refused before the stage runs."""
    env = {**ENV, "CKAFLOW_FLUSH_S": "often", "CKAFLOW_SLURM": "{not json"}
    plan = subprocess.run(["ckaflow", "plan", "--help"], capture_output=True, text=True, env=env)
    assert plan.returncode == 0, plan.stderr
    args = ["--spec", "{}", "--model", "m", "--data", "d", "--view", "clean", "--out", "o"]
    gram = subprocess.run(["ckaflow", "gram", *args], capture_output=True, text=True, env=env)
    assert (
        gram.returncode == 2 and "argument --flush-s: invalid float value: 'often'" in gram.stderr
    )
    cka = subprocess.run(["ckaflow", "cka", "--spec", "{}", "--out", "o"], capture_output=True,
                         text=True, env=env)  # fmt: skip
    assert cka.returncode == 2 and "argument --slurm: invalid JSON value" in cka.stderr
    out = tmp_path / "s.md"
    said = _ckaflow("summary", "--spec", '{"margn": 0.1}', "--cka", "c", "--out", str(out))
    assert said.returncode == 2 and "Traceback" not in said.stderr
    assert "unknown keys ['margn']" in said.stderr and "margin" in said.stderr
    assert not out.exists()


def test_a_launched_stage_s_settings_are_no_part_of_its_job_s_identity():
    """Changing where or how a stage runs (device, checkpointing, flushing) must reattach to its
    running SLURM job, never replace it: launch leaves these keywords out of the identity."""
    from ckaflow.launch import EXECUTION_KWARGS
    from ckaflow.stages import CLI_ONLY, STAGES

    for stage in STAGES.values():
        if stage.launched:
            own = {s.name for s in stage.settings if s not in CLI_ONLY}
            assert own <= set(EXECUTION_KWARGS), (stage.rule, own)
