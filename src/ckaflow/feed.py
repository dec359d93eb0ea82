"""How a run's network is fed the study's pixels: the one preprocessing of training, the kNN
monitor, the probes and the Gram and activation stages.

The data store holds each view's uint8 pixels once, shared by every run so that CKA compares
the same images. A run's `input` (`ckaflow.config.InputSpec`) says how its network sees them:
resized to its resolution (bilinear, antialiased, in float32, never rounded back to uint8)
and normalised by the data set's statistics, ImageNet's, or its own mean and std.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ckaflow.config import IMAGENET_MEAN, IMAGENET_STD, InputSpec, RunSpec
from ckaflow.errors import ConfigError


@dataclass(frozen=True)
class Feed:
    """pixels (uint8, or float in [0, 1]; N, C, H, W) -> the network's input."""

    resolution: int | None  # None: as stored
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.float() / 255 if pixels.dtype == torch.uint8 else pixels
        side = self.resolution
        if side and tuple(x.shape[-2:]) != (side, side):
            x = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True)
        if len(self.mean) == 3 and x.shape[1] == 1:  # grey images, a 3-channel network
            x = x.expand(-1, 3, -1, -1)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device)
        return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def feed_for(run: RunSpec, data_attrs: dict) -> Feed:
    """The run's feed on a data store with attributes `data_attrs` (its image shape and its
    training subset's mean and std)."""
    spec = run.input or InputSpec()
    mean, std = {
        "dataset": (data_attrs["mean"], data_attrs["std"]),
        "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
        "explicit": (spec.mean, spec.std),
    }[spec.normalise]
    channels = run.model.in_channels or data_attrs["image_shape"][0]  # the network's
    if len(mean) not in (1, channels):
        raise ConfigError(
            f"{run.run_id}: input normalisation has {len(mean)} values, one per channel; the "
            f"network takes {channels} channel(s): give {channels} (or one for all)"
        )
    return Feed(spec.resolution, tuple(float(v) for v in mean), tuple(float(v) for v in std))
