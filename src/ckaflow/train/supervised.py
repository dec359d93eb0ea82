"""Supervised training: cross-entropy with random crop (padding 4) and flip."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ckaflow import augment
from ckaflow.config import AugmentSpec, RecipeSpec


class Supervised:
    def __init__(self, recipe: RecipeSpec, aug: AugmentSpec):
        self.recipe = recipe

    def sample(self, n: int, image_size: int, gen: torch.Generator):
        return augment.sample_crop_flip(n, image_size, gen)

    def loss(
        self, net, pixels: torch.Tensor, labels: torch.Tensor, params, to_input
    ) -> tuple[torch.Tensor, dict[str, float]]:
        logits = net(to_input(augment.apply_geometry(pixels, params)))
        loss = F.cross_entropy(logits.float(), labels)
        correct = (logits.argmax(1) == labels).sum()
        return loss, {"correct": correct}
