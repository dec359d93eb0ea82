"""PyTorch files read safely (weights only: never code) and checkpoints written atomically;
the ground floor under models, imports, training and inspect."""

from __future__ import annotations

from pathlib import Path

import torch

from ckaflow import bytecount
from ckaflow.errors import CheckpointError, UnsafeFileError
from ckaflow.provenance import atomic_path


def save(path: Path, state: dict) -> None:
    with atomic_path(path) as scratch:
        torch.save(state, scratch)


# what a training checkpoint holds (train/loop.py); one without these is from an older version
TRAINING_KEYS = (
    "model", "optimizer", "schedule", "scaler", "rng", "generator", "epoch", "step_in_epoch",
    "epoch_sums", "metrics", "spec_hash",
)  # fmt: skip


def read_state(path: Path):
    """Unpickle a PyTorch file with `weights_only=True`: tensors, numbers, strings and plain
    containers only, so loading a file from elsewhere never runs code from it. ckaflow's own
    checkpoints and models hold nothing else."""
    import pickle
    import re

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        bytecount.read(Path(path).stat().st_size)
        return state
    except pickle.UnpicklingError as err:
        # torch names the first object the pickle would build ("GLOBAL io.open"); any other
        # unpickling error is a damaged or foreign file
        found = re.search(r"GLOBAL (\S+)", str(err))
        if not found:
            pattern = r"WeightsUnpickler error:\s*(.*?)\s*(?:Check the doc|$)"
            why = re.search(pattern, str(err), re.S)
            detail = why.group(1) if why else str(err)
            raise CheckpointError(f"{path}: not a readable checkpoint ({detail})") from err
        raise UnsafeFileError(
            f"{path}: refused: it holds Python objects such as {found.group(1)} beyond tensors "
            "and plain values, whose unpickling could run code; ckaflow loads weights only. "
            "Re-save it as a state_dict of tensors if you trust where it came from"
        ) from err
    except Exception as err:  # torch raises many types for a truncated or foreign file
        raise CheckpointError(f"{path}: not a readable checkpoint ({err})") from err


def load(
    path: Path, expect_spec_hash: str | None = None, expect_keys: tuple[str, ...] = ("model",)
) -> dict:
    state = read_state(path)
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
