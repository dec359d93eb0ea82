"""Checkpoints: the full training state, written atomically."""

from __future__ import annotations

from pathlib import Path

import torch

from ckaflow.errors import CheckpointError
from ckaflow.provenance import atomic_path


def save(path: Path, state: dict) -> None:
    with atomic_path(path) as scratch:
        torch.save(state, scratch)


# what a training checkpoint holds (train/loop.py); one without these is from an older version
TRAINING_KEYS = (
    "model", "optimizer", "schedule", "scaler", "rng", "generator", "epoch", "step_in_epoch",
    "epoch_sums", "metrics", "spec_hash",
)  # fmt: skip


def load(
    path: Path, expect_spec_hash: str | None = None, expect_keys: tuple[str, ...] = ("model",)
) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises many types for a truncated or foreign file
        raise CheckpointError(f"{path}: not a readable checkpoint ({err})") from err
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path}: not a ckaflow checkpoint (no model state)")
    missing = [key for key in expect_keys if key not in state]
    if missing:
        raise CheckpointError(f"{path}: lacks {missing} (written by an older ckaflow?)")
    if expect_spec_hash is not None and state.get("spec_hash") != expect_spec_hash:
        raise CheckpointError(
            f"{path}: written for spec {state.get('spec_hash')}, this run is {expect_spec_hash}"
        )
    return state
