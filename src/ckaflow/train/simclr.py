"""SimCLR (Chen et al. 2020): two augmented views per image, NT-Xent on projected features."""

from __future__ import annotations

import torch

from ckaflow import augment
from ckaflow.config import AugmentSpec, RecipeSpec
from ckaflow.train.losses import nt_xent


class SimCLR:
    name = "simclr"

    def __init__(self, recipe: RecipeSpec, aug: AugmentSpec):
        self.recipe = recipe
        self.aug = aug

    def head_outputs(self, num_classes: int) -> int:
        return self.recipe.proj_dim

    def loss(
        self, net, pixels: torch.Tensor, labels: torch.Tensor, gen: torch.Generator, normalise
    ) -> tuple[torch.Tensor, dict[str, float]]:
        n = pixels.shape[0]
        p1 = augment.sample_simclr(n, self.aug, gen)
        p2 = augment.sample_simclr(n, self.aug, gen)
        views = torch.cat([augment.simclr_view(pixels, p1), augment.simclr_view(pixels, p2)])
        z = net(normalise(views))
        loss = nt_xent(z[:n], z[n:], self.recipe.temperature)
        return loss, {}
