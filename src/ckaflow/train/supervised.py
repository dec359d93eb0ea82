"""Supervised training: cross-entropy with random crop (padding 4) and flip."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ckaflow import augment
from ckaflow.config import AugmentSpec, RecipeSpec


class Supervised:
    name = "supervised"

    def __init__(self, recipe: RecipeSpec, aug: AugmentSpec):
        self.recipe = recipe

    def head_outputs(self, num_classes: int) -> int:
        return num_classes

    def loss(
        self, net, pixels: torch.Tensor, labels: torch.Tensor, gen: torch.Generator, normalise
    ) -> tuple[torch.Tensor, dict[str, float]]:
        params = augment.sample_crop_flip(pixels.shape[0], pixels.shape[-1], gen)
        logits = net(normalise(augment.apply_geometry(pixels, params)))
        loss = F.cross_entropy(logits, labels)
        correct = (logits.argmax(1) == labels).sum().item()
        return loss, {"correct": correct}
