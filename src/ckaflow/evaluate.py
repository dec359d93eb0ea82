"""Quality of a trained encoder: kNN accuracy of its pooled features."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def encode(net, pixels_uint8: torch.Tensor, normalise, device, batch_size: int = 512):
    """Pooled encoder features of uint8 images, in eval mode, on the CPU."""
    was_training = net.training
    net.eval()
    feats = []
    for start in range(0, len(pixels_uint8), batch_size):
        batch = pixels_uint8[start : start + batch_size].to(device)
        feats.append(net.encoder(normalise(batch.float() / 255)).float().cpu())
    net.train(was_training)
    return torch.cat(feats)


def knn_accuracy(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
) -> float:
    """Weighted kNN on cosine similarity (Wu et al. 2018), as in SimCLR-style evaluations."""
    bank = F.normalize(bank, dim=1)
    queries = F.normalize(queries, dim=1)
    k = min(k, len(bank))
    correct = 0
    for start in range(0, len(queries), 1024):
        sim = queries[start : start + 1024] @ bank.t()
        weights, idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(sim), num_classes)
        votes.scatter_add_(1, bank_labels[idx], (weights / temperature).exp())
        correct += (votes.argmax(1) == query_labels[start : start + 1024]).sum().item()
    return correct / len(queries)
