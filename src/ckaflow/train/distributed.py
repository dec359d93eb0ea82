"""Data-parallel training across processes (torchrun, or one SLURM task per GPU).

Every process draws the same global batch and the same augmentation parameters from the shared
seeded generator and trains on its slice, so the data a run sees does not depend on how many
processes share it. NT-Xent gathers the other processes' embeddings with gradients.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: torch.device) -> bool:
    """Join the process group that torchrun (or submitit's TorchDistributedEnvironment) describes
    in the environment; False when this is a single process."""
    if active():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return True


def local_slice(batch: int) -> slice:
    """This process's rows of a global batch (which must split evenly)."""
    world = world_size()
    if batch % world:
        raise ValueError(f"batch size {batch} does not split evenly over {world} processes")
    per = batch // world
    return slice(rank() * per, (rank() + 1) * per)


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All processes' rows in rank order; gradients flow back to every process's own rows."""
    if not active():
        return x
    return torch.cat(dist_fn.all_gather(x))


def sum_all(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum over processes (epoch statistics)."""
    if not active():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    if active():
        dist.barrier()
