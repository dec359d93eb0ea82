"""The conda env of the rules (`snakemake --use-conda`): what it lists, and that it builds.

Snakemake copies envs/ckaflow.yaml to <conda-prefix>/<hash>.yaml and runs `conda env create --file`
on that copy (snakemake/deployment/conda.py, `create_env`); conda runs the yaml's pip section from
the copy's directory. Then it runs envs/ckaflow.post-deploy.sh in the new env. There is no conda
here, so the build test runs the real `snakemake --use-conda --conda-create-envs-only` with a
stand-in `conda` on PATH: it makes the env a venv that sees this venv's packages (what conda would
have installed) and runs the pip section as conda does, from the copy's directory (offline).
"""

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.conftest import BIN, REPO

# conda-forge names of PyPI packages where they differ
CONDA_NAMES = {
    "torch": "pytorch",
    "snakemake": "snakemake-minimal",
    "matplotlib": "matplotlib-base",
}

# `conda` for Snakemake's checks (conda.py: Conda.__init__, _check) and `conda env create`.
FAKE_CONDA = """#!{python}
import json, os, subprocess, sys, tempfile
from pathlib import Path

import yaml

root, args = Path(__file__).resolve().parents[1], sys.argv[1:]
if args == ["--version"]:
    print("conda 24.11.3")
elif args[:2] == ["info", "--json"]:
    print(json.dumps({{"conda_prefix": str(root), "platform": "linux-64"}}))
elif args[:2] == ["config", "--get"]:
    print(json.dumps({{"get": {{"channel_priority": "strict"}}}}))
elif args[:1] == ["clean"]:  # --conda-cleanup-pkgs (tarballs by default)
    pass
elif args[:2] == ["env", "create"]:
    file, prefix = args[args.index("--file") + 1], args[args.index("--prefix") + 1]
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", prefix], check=True)
    (purelib,) = Path(prefix, "lib").glob("python*/site-packages")
    (purelib / "conda_packages.pth").write_text({site!r} + "\\n")
    deps = yaml.safe_load(open(file))["dependencies"]
    pip = [spec for d in deps if isinstance(d, dict) for spec in d["pip"]]
    if pip:  # as conda.env.installers.pip: a requirements file next to --file, pip run from there
        workdir = os.path.dirname(os.path.abspath(file))
        with tempfile.NamedTemporaryFile("w", dir=workdir, suffix=".txt", delete=False) as req:
            req.write("\\n".join(pip))
        # offline here: no index, no dependencies, no build isolation (paths resolve the same)
        subprocess.run(
            [f"{{prefix}}/bin/python", "-m", "pip", "install", "-U", "-r", req.name,
             "--exists-action=b", "--no-index", "--no-deps", "--no-build-isolation"],
            cwd=workdir, check=True,
        )
else:
    sys.exit(f"stand-in conda: unexpected arguments {{args}}")
"""

# what Snakemake sources before a command in the env (conda.py: Conda.shellcmd)
FAKE_ACTIVATE = 'export CONDA_PREFIX="$1"\nexport PATH="$1/bin:$PATH"\n'


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ \[]", requirement, maxsplit=1)[0].lower()


def test_conda_env_lists_the_package_dependencies():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    # the post-deploy script builds ckaflow without build isolation, so setuptools too
    requirements = pyproject["project"]["dependencies"] + pyproject["build-system"]["requires"]
    wanted = {CONDA_NAMES.get(_name(r), _name(r)) for r in requirements}
    env = yaml.safe_load((REPO / "envs" / "ckaflow.yaml").read_text())
    listed = {_name(d) for d in env["dependencies"] if isinstance(d, str)} - {"python", "pip"}
    assert listed == wanted


def test_every_rule_names_the_conda_env():
    # Snakemake resolves a rule's `conda:` path against the file that holds the rule
    (conda_env,) = re.findall(
        r'^CONDA_ENV = "(.+)"$', (REPO / "workflow" / "Snakefile").read_text(), re.M
    )
    assert (REPO / "rules" / conda_env).resolve() == REPO / "envs" / "ckaflow.yaml"
    rules = []
    for smk in sorted((REPO / "rules").glob("*.smk")):
        text = smk.read_text() + "\n"
        found = re.findall(r"^rule (\w+):\n((?:[ \t]+.*\n|\n)*)", text, re.M)
        assert len(found) == len(re.findall(r"^rule ", text, re.M)), smk.name
        for name, body in found:
            rules.append(name)
            assert re.search(r"^\s+conda:\s*\n\s+CONDA_ENV\s*$", body, re.M), f"{smk.name}: {name}"
    assert len(rules) > 5


@pytest.fixture
def checkout(tmp_path) -> Path:
    """A copy of the repository, so that building the env writes nothing into this one."""
    ignore = shutil.ignore_patterns(
        ".git",
        ".venv",
        ".snakemake",
        "results",
        "build",
        "*.egg-info",
        "__pycache__",
        ".*_cache",
        ".hypothesis",
    )
    return Path(shutil.copytree(REPO, tmp_path / "checkout", ignore=ignore))


@pytest.fixture
def conda_path(tmp_path) -> str:
    """PATH with the stand-in conda first, then this venv (snakemake), then the rest."""
    bin_dir = tmp_path / "conda" / "bin"
    bin_dir.mkdir(parents=True)
    conda = bin_dir / "conda"
    conda.write_text(
        FAKE_CONDA.format(python=sys.executable, site=sysconfig.get_paths()["purelib"])
    )
    conda.chmod(0o755)
    (bin_dir / "activate").write_text(FAKE_ACTIVATE)
    return os.pathsep.join([str(bin_dir), str(BIN), os.environ["PATH"]])


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CKAFLOW_SRC", "PYTHONPATH")}
    return {**env, **extra}


@pytest.mark.parametrize("where", ["from the checkout", "elsewhere"])
def test_snakemake_builds_the_env_with_ckaflow_from_the_checkout(
    where, checkout, conda_path, tmp_path
):
    config = ["--configfile", str(checkout / "tests" / "configs" / "tiny.yaml")]
    cmd = [str(BIN / "snakemake"), "--use-conda", "--conda-create-envs-only", "--cores", "1"]
    if where == "from the checkout":  # the README's way: plain `snakemake` in the repository
        workdir, env = checkout, _clean_env(PATH=conda_path)
    else:  # --directory elsewhere: the Snakefile tells the script where the checkout is
        workdir, env = tmp_path / "work", _clean_env(PATH=conda_path)
        workdir.mkdir()
        cmd += ["--snakefile", str(checkout / "workflow" / "Snakefile"), "--directory", "."]
    run = subprocess.run(
        cmd + config, cwd=workdir, env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]

    envs = workdir / ".snakemake" / "conda"
    (prefix,) = (p for p in envs.iterdir() if p.is_dir())  # every rule shares the one env
    # what Snakemake handed to conda: a copy of the yaml away from envs/, and the script
    copied = Path(f"{prefix}.yaml")
    assert copied.read_text() == (checkout / "envs" / "ckaflow.yaml").read_text()
    assert copied.parent != checkout / "envs"
    assert Path(f"{prefix}.post-deploy.sh").is_file()

    # ckaflow is installed in the env itself, editable, from the checkout
    (dist,) = prefix.glob("lib/python*/site-packages/ckaflow-*.dist-info")
    direct_url = json.loads((dist / "direct_url.json").read_text())
    assert direct_url["url"] == checkout.as_uri()
    assert direct_url["dir_info"] == {"editable": True}
    # and the rules' command works there, running the checkout's code
    clean = _clean_env(PATH=f"{prefix / 'bin'}{os.pathsep}/usr/bin:/bin")
    assert (prefix / "bin" / "ckaflow").is_file()
    subprocess.run(
        [prefix / "bin" / "ckaflow", "--help"], env=clean, capture_output=True, check=True
    )
    where_from = subprocess.run(
        [prefix / "bin" / "python", "-c", "import ckaflow; print(ckaflow.__file__)"],
        env=clean,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(where_from).is_relative_to(checkout / "src")


def test_post_deploy_refuses_a_working_directory_that_is_not_the_repository(tmp_path):
    """Without CKAFLOW_SRC and outside the repository there is nothing to install: say so."""
    run = subprocess.run(
        ["sh", REPO / "envs" / "ckaflow.post-deploy.sh"],
        cwd=tmp_path,
        env=_clean_env(CONDA_PREFIX=str(tmp_path / "env")),
        capture_output=True,
        text=True,
    )
    assert run.returncode != 0
    assert "CKAFLOW_SRC" in run.stderr
