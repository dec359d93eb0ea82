"""The conda env of the rules and pyproject.toml must name the same dependencies."""

import re
import tomllib

import yaml

from tests.conftest import REPO

# conda-forge names of PyPI packages where they differ
CONDA_NAMES = {
    "torch": "pytorch",
    "snakemake": "snakemake-minimal",
    "matplotlib": "matplotlib-base",
}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ \[]", requirement, maxsplit=1)[0].lower()


def test_conda_env_lists_the_package_dependencies():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = {CONDA_NAMES.get(_name(r), _name(r)) for r in project["dependencies"]}
    env = yaml.safe_load((REPO / "envs" / "ckaflow.yaml").read_text())
    listed = {_name(d) for d in env["dependencies"] if isinstance(d, str)} - {"python", "pip"}
    assert listed == wanted


def test_every_rule_names_the_conda_env():
    for smk in (REPO / "rules").glob("*.smk"):
        text = smk.read_text()
        assert text.count("rule ") == text.count("conda:"), smk.name
