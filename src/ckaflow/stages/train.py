"""The `train` stage: one run (method x architecture x seed), resumed from its checkpoint after
a crash (`ckaflow.train.loop.train_run`)."""

from __future__ import annotations

from pathlib import Path

from ckaflow import config
from ckaflow.study import TrainSpec


def run(
    spec: TrainSpec, data: str | Path, out: str | Path, device: str = "auto", checkpoint=None
) -> Path:
    """`out`: the run's folder (model.pt, metrics.parquet, checkpoint.pt); `checkpoint`: how
    often to checkpoint ({every_min, every_steps}; unset: `CheckpointPolicy`'s default)."""
    from ckaflow.train.loop import CheckpointPolicy, train_run

    return train_run(
        run=config.run_spec_from_dict(spec.run),
        aug=config.augment_spec_from_dict(spec.augment),
        data_path=data,
        out_dir=out,
        device=device,
        policy=CheckpointPolicy(**(checkpoint or {})),
    )
