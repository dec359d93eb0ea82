#!/bin/sh
# Installs ckaflow itself into the conda env of the rules, after `snakemake --use-conda` has built
# it from envs/ckaflow.yaml. Snakemake runs this file inside the new env ($CONDA_PREFIX), in
# Snakemake's working directory. A pip entry in the yaml cannot do this: Snakemake copies the yaml
# to <conda-prefix>/<hash>.yaml and conda runs pip from there, so `-e ../` would name .snakemake/.
# The checkout is $CKAFLOW_SRC (workflow/Snakefile sets it to its own repository), else the
# working directory.
set -eu
src=$(cd "${CKAFLOW_SRC:-.}" && pwd)
if ! grep -qs '^name = "ckaflow"$' "$src/pyproject.toml"; then
    echo "envs/ckaflow.post-deploy.sh: $src is not the ckaflow repository. Run snakemake" \
        "--use-conda with workflow/Snakefile, or set CKAFLOW_SRC=/path/to/the/repository." >&2
    exit 1
fi
# Editable, so the rules run the checkout's code (Snakemake rebuilds the env only when this file
# or the yaml change); no dependencies from PyPI, conda installed them all (setuptools included).
"$CONDA_PREFIX/bin/python" -m pip install --no-deps --no-build-isolation --editable "$src"
"$CONDA_PREFIX/bin/ckaflow" --help > /dev/null
