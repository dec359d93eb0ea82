#!/usr/bin/env bash
# GPU check of the fused Gram stage (see benchmarks/gpu_check.py for what it checks).
#
#   bash benchmarks/gpu.sh                 # needs CUDA; about 2-4 minutes on an H200
#   bash benchmarks/gpu.sh --small         # on the CPU, tiny: checks that the script works
#   bash benchmarks/gpu.sh --json out.json # also write the results as JSON
#
# Runs from the repository root, with the project's .venv when there is one (else `python`),
# and is stopped after 8 minutes whatever happens.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
exec timeout --signal=INT --kill-after=20 470 "$PYTHON" benchmarks/gpu_check.py "$@"
