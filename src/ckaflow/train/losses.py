"""The training losses: SimCLR's NT-Xent (used by `train.simclr`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ckaflow.train import distributed


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's normalised-temperature cross entropy over 2N views (Chen et al. 2020, eq. 1).

    Row i of z1 and row i of z2 are the positive pair; the other 2N - 2 views are negatives.
    Under data-parallel training the negatives are every process's views (gathered with
    gradients), each process averages over its own anchors, and the gradient averaging of DDP
    then gives exactly the gradient of one process on the whole batch. Computed in float32
    whatever the autocast precision.
    """
    n = z1.shape[0]
    with torch.autocast(device_type=z1.device.type, enabled=False):
        a1 = F.normalize(z1.float(), dim=1)
        a2 = F.normalize(z2.float(), dim=1)
        k1, k2 = distributed.gather_with_grad(a1), distributed.gather_with_grad(a2)
        total = k1.shape[0]
        logits = torch.cat([a1, a2]) @ torch.cat([k1, k2]).t() / temperature
        mine = torch.arange(n, device=z1.device) + distributed.rank() * n
        own = torch.cat([mine, mine + total])  # each anchor's own column: never a negative
        positive = torch.cat([mine + total, mine])
        rows = torch.arange(2 * n, device=z1.device)
        self_mask = torch.zeros_like(logits, dtype=torch.bool)
        self_mask[rows, own] = True
        logits = logits.masked_fill(self_mask, float("-inf"))
        return F.cross_entropy(logits, positive)
