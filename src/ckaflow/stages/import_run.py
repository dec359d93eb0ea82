"""The `import_run` stage: a network trained elsewhere (config `imports`) as the run's
model.pt, loaded strictly (`ckaflow.imports.import_run`)."""

from __future__ import annotations

import sys
from pathlib import Path

from ckaflow.config import RunSpec
from ckaflow.errors import ConfigError


def run(spec: RunSpec, data: str | Path, out: str | Path) -> Path:
    """`spec`: the imported run (`Study.import_spec`); `data`: the data store (image shape,
    normalisation)."""
    from ckaflow.imports import import_run

    if spec.imported is None:
        raise ConfigError("import-run needs the spec of an imported run")
    return import_run(spec, data, out, log=lambda line: print(line, file=sys.stderr))
