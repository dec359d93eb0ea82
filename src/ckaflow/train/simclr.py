"""SimCLR (Chen et al. 2020): two augmented views per image, NT-Xent on projected features."""

from __future__ import annotations

import torch

from ckaflow import augment
from ckaflow.config import AugmentSpec, RecipeSpec
from ckaflow.train.losses import nt_xent


class SimCLR:
    def __init__(self, recipe: RecipeSpec, aug: AugmentSpec):
        self.recipe = recipe
        self.aug = aug

    def sample(self, n: int, image_size: int, gen: torch.Generator):
        """Augmentation parameters of both views for a batch of n images."""
        return augment.sample_simclr(n, self.aug, gen), augment.sample_simclr(n, self.aug, gen)

    def loss(
        self, net, pixels: torch.Tensor, labels: torch.Tensor, params, to_input
    ) -> tuple[torch.Tensor, dict[str, float]]:
        p1, p2 = params
        n = pixels.shape[0]
        views = torch.cat([augment.simclr_view(pixels, p1), augment.simclr_view(pixels, p2)])
        z = net(to_input(views))
        return nt_xent(z[:n], z[n:], self.recipe.temperature), {}
