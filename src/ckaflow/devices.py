"""Which torch device `device: auto` (or a named one) means: the one place that decides.

Called by every stage that computes (training, probes, the forward passes, the CKA math) and by
`ckaflow.compare`; imports torch only when called.
"""

from __future__ import annotations

import os


def resolve_device(device: str):
    """`auto` = the GPU when there is one. With several processes per node (LOCAL_RANK set by
    torchrun or SLURM), each takes its own GPU."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device: cuda was requested but no CUDA GPU is visible")
        index = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device(device)
