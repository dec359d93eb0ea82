"""The `prepare_data` stage: subsets of the real data set and the eval views clean, aug1 and
aug2, as uint8 images in one Zarr store (`ckaflow.data.prepare`)."""

from __future__ import annotations

from pathlib import Path

from ckaflow import config
from ckaflow.study import PrepareSpec


def run(spec: PrepareSpec, out: str | Path, root: str | None = None) -> Path:
    """`root`: where the data set's files are (no part of the spec: moving them reruns nothing);
    unset: `data.root` of the spec when it has one (by hand), else the config's default."""
    data = dict(spec.data)
    data["root"] = root or data.get("root") or config.schema_node("data.root")["default"]
    from ckaflow.data import prepare

    return prepare(config.DataSpec(**data), config.augment_spec_from_dict(spec.augment), out)
