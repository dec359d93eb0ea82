"""Batched, seeded image augmentations that run on the CPU or a GPU.

Each augmentation is split in two: `sample_*` draws the random parameters for a batch from a
`torch.Generator` (so a view can be seeded per example), and `apply_*` applies them to a float
batch in [0, 1] of shape (N, C, H, W) in one vectorised pass.

SimCLR (Chen et al. 2020, CIFAR variant): random resized crop (scale 0.08-1, ratio 3/4-4/3),
horizontal flip, colour jitter (brightness, contrast, saturation 0.8·s, hue 0.2·s) applied with
probability p, random grayscale; no blur at 32 px. Grey-scale adaptation (Fashion-MNIST): the
jitter keeps brightness and contrast only, since saturation, hue and grayscale are no-ops on one
channel.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ckaflow.config import AugmentSpec


def _uniform(n: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen, dtype=torch.float64)


def _bernoulli(n: int, p: float, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=gen, dtype=torch.float64) < p


def sample_simclr(n: int, spec: AugmentSpec, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Draw SimCLR augmentation parameters for n images."""
    area = _uniform(n, spec.crop_scale[0], spec.crop_scale[1], gen)
    log_ratio = _uniform(n, math.log(3 / 4), math.log(4 / 3), gen)
    ratio = torch.exp(log_ratio)
    width = torch.sqrt(area * ratio).clamp(max=1.0)
    height = torch.sqrt(area / ratio).clamp(max=1.0)
    # crop centre, in [-1, 1] image coordinates, keeping the crop inside the image
    cx = _uniform(n, -1.0, 1.0, gen) * (1 - width)
    cy = _uniform(n, -1.0, 1.0, gen) * (1 - height)
    flip = _bernoulli(n, spec.flip_p, gen)
    s = spec.jitter_strength
    jitter = _bernoulli(n, spec.jitter_p, gen)
    params = {
        "width": width,
        "height": height,
        "cx": cx,
        "cy": cy,
        "flip": flip,
        "jitter": jitter,
        "brightness": _uniform(n, max(0.0, 1 - 0.8 * s), 1 + 0.8 * s, gen),
        "contrast": _uniform(n, max(0.0, 1 - 0.8 * s), 1 + 0.8 * s, gen),
        "saturation": _uniform(n, max(0.0, 1 - 0.8 * s), 1 + 0.8 * s, gen),
        "hue": _uniform(n, -0.2 * s, 0.2 * s, gen),
        "grayscale": _bernoulli(n, spec.grayscale_p, gen),
    }
    return params


def sample_crop_flip(
    n: int, image_size: int, gen: torch.Generator, padding: int = 4
) -> dict[str, torch.Tensor]:
    """Standard supervised CIFAR augmentation: random crop with zero padding, then flip."""
    shift_x = torch.randint(-padding, padding + 1, (n,), generator=gen).double()
    shift_y = torch.randint(-padding, padding + 1, (n,), generator=gen).double()
    ones = torch.ones(n, dtype=torch.float64)
    return {
        "width": ones,
        "height": ones,
        "cx": 2 * shift_x / image_size,
        "cy": 2 * shift_y / image_size,
        "flip": _bernoulli(n, 0.5, gen),
    }


def apply_geometry(images: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Crop, rescale and flip each image with one affine `grid_sample` over the batch."""
    n = images.shape[0]
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    sign = torch.where(params["flip"], -1.0, 1.0).double()
    theta[:, 0, 0] = params["width"] * sign
    theta[:, 0, 2] = params["cx"]
    theta[:, 1, 1] = params["height"]
    theta[:, 1, 2] = params["cy"]
    theta = theta.to(device=images.device, dtype=images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _grey(images: torch.Tensor) -> torch.Tensor:
    if images.shape[1] == 1:
        return images
    weights = torch.tensor([0.299, 0.587, 0.114], device=images.device, dtype=images.dtype)
    return (images * weights.view(1, 3, 1, 1)).sum(1, keepdim=True)


def _per_image(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(device=like.device, dtype=like.dtype).view(-1, 1, 1, 1)


def _rotate_hue(images: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """Hue shift as a rotation of the chroma plane in YIQ space (hue in turns)."""
    to_yiq = torch.tensor(
        [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
        device=images.device,
        dtype=images.dtype,
    )
    from_yiq = torch.linalg.inv(to_yiq)
    angle = hue.to(device=images.device, dtype=images.dtype) * 2 * math.pi
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = torch.zeros(len(hue), 3, 3, device=images.device, dtype=images.dtype)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2] = cos, -sin
    rot[:, 2, 1], rot[:, 2, 2] = sin, cos
    mats = from_yiq @ rot @ to_yiq  # (N, 3, 3)
    return torch.einsum("nij,njhw->nihw", mats, images)


def apply_colour(images: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Colour jitter (for images whose `jitter` flag is set), then random grayscale."""
    x = images
    on = _per_image(params["jitter"], x)
    jittered = (x * _per_image(params["brightness"], x)).clamp(0, 1)
    mean = _grey(jittered).mean(dim=(1, 2, 3), keepdim=True)
    jittered = ((jittered - mean) * _per_image(params["contrast"], x) + mean).clamp(0, 1)
    if x.shape[1] == 3:
        grey = _grey(jittered)
        jittered = ((jittered - grey) * _per_image(params["saturation"], x) + grey).clamp(0, 1)
        jittered = _rotate_hue(jittered, params["hue"]).clamp(0, 1)
    x = on * jittered + (1 - on) * x
    if x.shape[1] == 3:
        gray = _per_image(params["grayscale"], x)
        x = gray * _grey(x).expand_as(x) + (1 - gray) * x
    return x


def simclr_view(images: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    return apply_colour(apply_geometry(images, params), params)


def per_example_generators(seed: int, stream: int, example_ids) -> list[torch.Generator]:
    """One generator per example, so an example's view does not depend on its batch."""
    gens = []
    for example in example_ids:
        gen = torch.Generator()
        gen.manual_seed(hash_seed(seed, stream, int(example)))
        gens.append(gen)
    return gens


def hash_seed(*parts: int) -> int:
    """Mix integers into one 63-bit seed (splitmix64 steps), stable across processes."""
    state = 0x9E3779B97F4A7C15
    mask = (1 << 64) - 1
    for part in parts:
        state = (state ^ (part & mask)) * 0xBF58476D1CE4E5B9 & mask
        state = (state ^ (state >> 31)) * 0x94D049BB133111EB & mask
        state ^= state >> 29
    return state >> 1


def sample_simclr_per_example(
    example_ids, spec: AugmentSpec, seed: int, stream: int
) -> dict[str, torch.Tensor]:
    """SimCLR parameters for each example from its own seeded generator, stacked."""
    draws = [
        sample_simclr(1, spec, gen) for gen in per_example_generators(seed, stream, example_ids)
    ]
    return {key: torch.cat([d[key] for d in draws]) for key in draws[0]}


def take_rows(params, rows):
    """Some rows' parameters of a batch: a dict of per-image tensors, or a tuple of such dicts."""
    if isinstance(params, tuple):
        return tuple(take_rows(p, rows) for p in params)
    return {key: value[rows] for key, value in params.items()}
