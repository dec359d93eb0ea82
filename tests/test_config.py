import pytest

from ckaflow import config
from ckaflow.errors import ConfigError


def test_defaults_fill_every_section():
    cfg = config.validate({})
    assert cfg["cka"]["estimator"] == "minibatch"
    assert cfg["recipes"]["simclr"]["temperature"] == 0.5
    assert cfg["data"]["name"] == "fashion-mnist"


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="modle: unknown key; did you mean `model`?"):
        config.validate({"modle": {"arch": "resnet18"}})


def test_an_unknown_key_far_from_any_is_named_with_the_allowed_ones():
    with pytest.raises(ConfigError) as raised:
        config.validate({"cka": {"zzz": 1}})
    (line,) = [line for line in str(raised.value).splitlines() if "zzz" in line]
    assert "did you mean" not in line and "allowed: batch_size, bootstrap," in line


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"data\.train_size: 'many' is not of type 'integer'"):
        config.validate({"data": {"train_size": "many"}})


def test_out_of_range_names_key_and_limit():
    with pytest.raises(ConfigError, match=r"cka\.batch_size: 2 is less than the minimum of 4"):
        config.validate({"cka": {"batch_size": 2}})


def test_unknown_estimator_lists_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"cka\.estimator: 'rbf2' is not one of"):
        config.validate({"cka": {"estimator": "rbf2"}})


def test_missing_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.yaml")


def test_run_ids_are_readable_and_stable():
    cfg = config.validate({"model": {"arch": "resnet50"}, "seeds": [0, 3]})
    ids = [run.run_id for run in config.run_specs(cfg)]
    assert ids == [
        "simclr-resnet50-s0",
        "simclr-resnet50-s3",
        "supervised-resnet50-s0",
        "supervised-resnet50-s3",
    ]
    narrow = config.validate({"model": {"width": 8}, "methods": ["simclr"]})
    assert config.run_specs(narrow)[0].run_id == "simclr-resnet18-w8-s0"


def test_stable_hash_ignores_key_order_but_not_values():
    assert config.stable_hash({"a": 1, "b": 2}) == config.stable_hash({"b": 2, "a": 1})
    assert config.stable_hash({"a": 1}) != config.stable_hash({"a": 2})


def test_demo_config_is_valid():
    from tests.conftest import REPO

    cfg = config.load(REPO / "config.yaml")
    assert set(cfg["methods"]) == {"simclr", "supervised"}
    assert 1500 <= cfg["data"]["eval_size"] <= 2500


def test_passes_with_a_full_data_estimator_is_refused_before_anything_runs():
    import pytest

    from ckaflow.errors import ConfigError
    from ckaflow.study import Study
    from tests.conftest import tiny_config

    with pytest.raises(ConfigError, match="needs the minibatch estimator, not linear"):
        Study(tiny_config(cka={"estimator": "linear", "passes": 3}))
    Study(tiny_config(cka={"estimator": "minibatch", "passes": 3}))  # the protocol itself


def test_slurm_defaults_are_the_schema_s():
    """One place for every default: a SlurmSpec built from nothing asks for what the schema
    says (1 GPU, 1,440 minutes), as does one built from a validated config."""
    from ckaflow.launch import STAGES, SlurmSpec

    assert STAGES == ("train", "evaluate", "extract", "gram", "cka")
    bare = SlurmSpec()
    assert (bare.gpus, bare.time_min, bare.cpus, bare.mem_gb) == (1, 1440, 8, 32)
    assert (bare.poll_s, bare.query_timeout_s, bare.signal_delay_s) == (5, 120, 120)
    slurm = config.validate({})["slurm"]
    for stage in STAGES:
        spec = SlurmSpec.from_config(slurm, stage)
        assert spec == SlurmSpec(data_parallel=stage == "train"), stage
    partial = SlurmSpec.from_config({"partition": "gpu", "gram": {"gpus": 2}}, "gram")
    assert (partial.partition, partial.gpus, partial.time_min) == ("gpu", 2, 1440)


def test_recipe_keys_a_method_never_reads_are_no_part_of_its_run():
    raw = config.validate(
        {"recipes": {"supervised": {"optimizer": "sgd"}, "simclr": {"optimizer": "adamw"}}}
    )
    runs = {run.method: run.recipe for run in config.run_specs(raw)}
    assert runs["supervised"].temperature is None and runs["supervised"].proj_dim is None
    assert runs["supervised"].momentum == 0.9 and runs["supervised"].lars_eta is None
    assert runs["simclr"].momentum is None and runs["simclr"].temperature == 0.5
    lars = config.validate({"recipes": {"simclr": {"optimizer": "lars"}}})
    assert config.run_specs(lars)[0].recipe.lars_eta == 0.001


def test_the_readme_s_config_examples_are_valid_studies():
    """Every YAML block of the README is a valid (partial) config whose runs can be built, so
    the examples a user copies do not rot as the schema changes."""
    import re
    import textwrap

    import yaml

    from tests.conftest import REPO

    blocks = re.findall(r"```yaml\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    assert len(blocks) >= 3  # cluster settings, imports, a module import
    imports = 0
    for block in blocks:
        raw = config.validate(yaml.safe_load(textwrap.dedent(block)))
        runs = config.run_specs(raw)
        imports += sum(run.imported is not None for run in runs)
        assert runs, block
    assert imports >= 3
