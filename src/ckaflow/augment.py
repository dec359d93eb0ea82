"""Seeded image augmentations with torchvision's semantics, applied batched on the CPU or a GPU.

Each augmentation is split in two: `sample_*` draws the random parameters for a batch from a
`torch.Generator` (so a view can be seeded per example, and the same generator state gives the
same parameters), and `apply_*` applies them to a float batch in [0, 1] of shape (N, C, H, W) in
one vectorised pass, with a different parameter set per image.

SimCLR (Chen et al. 2020, CIFAR variant, no blur at 32 px) is torchvision's

    RandomResizedCrop(size=(H, W), scale=crop_scale, ratio=(3/4, 4/3))   # bilinear
    RandomHorizontalFlip(flip_p)
    RandomApply([ColorJitter(0.8 s, 0.8 s, 0.8 s, 0.2 s)], p=jitter_p)  # s = jitter_strength
    RandomGrayscale(grayscale_p)

with the same parameter distributions: the crop box is `RandomResizedCrop.get_params` (ten tries
of area = scale·H·W and a log-uniform ratio, integer w = round(sqrt(area·ratio)) and
h = round(sqrt(area/ratio)), accepted if 0 < w <= W and 0 < h <= H, then a uniform integer
position; otherwise the centre crop with the ratio clamped to [3/4, 4/3]); the jitter draws
brightness, contrast and saturation factors in [max(0, 1 - 0.8 s), 1 + 0.8 s] and a hue shift in
[-0.2 s, 0.2 s], and applies the four in a random order per image (`randperm(4)`). The ops are
those of `torchvision.transforms.v2.functional`: brightness, contrast and saturation are blends
`(f·img + (1 - f)·other).clamp(0, 1)` with black, the per-image mean of the grey image, and the
per-pixel grey image; hue shifts H in HSV; grey is 0.2989 R + 0.587 G + 0.114 B, replicated to
the three channels. The crop is resized back to the full size bilinearly; the box is never larger
than the image, so this only upsamples and antialiasing makes no difference.

`sample_simclr` does not know the image size, so it keeps the raw draws (the ten tries' scales
and log-ratios, two uniforms for the position) and `crop_boxes` turns them into integer pixel
boxes for the images at hand, exactly as `get_params` would. The batched ops here are checked
image by image against torchvision's functional ops with the same parameters in
tests/test_augment.py.

One-channel images (Fashion-MNIST) behave as torchvision v2 on a 1-channel tensor: brightness and
contrast apply (the contrast target is the image's own mean); saturation and hue return the image
unchanged ("match PIL behaviour"), as does grayscale (its output keeps the input's one channel).
The factors and the order are still drawn, so the random stream is the same for both.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ckaflow.config import AugmentSpec

CROP_TRIES = 10  # RandomResizedCrop.get_params
RATIO = (3 / 4, 4 / 3)
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # ColorJitter's fn_idx
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")
GREY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale


def _uniform(shape, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=gen, dtype=torch.float64)


def _bernoulli(n: int, p: float, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=gen, dtype=torch.float64) < p


# ---------------------------------------------------------------------------------------------
# Sampling


def sample_simclr(n: int, spec: AugmentSpec, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Draw SimCLR augmentation parameters for n images (any size: see `crop_boxes`)."""
    s = spec.jitter_strength
    factor = (max(0.0, 1 - 0.8 * s), 1 + 0.8 * s)
    return {
        "crop_scale": _uniform((n, CROP_TRIES), *spec.crop_scale, gen),
        "crop_log_ratio": _uniform((n, CROP_TRIES), math.log(RATIO[0]), math.log(RATIO[1]), gen),
        "crop_position": torch.rand(n, 2, generator=gen, dtype=torch.float64),
        "flip": _bernoulli(n, spec.flip_p, gen),
        "jitter": _bernoulli(n, spec.jitter_p, gen),
        # a uniformly random permutation of the four ops per image, as randperm(4)
        "order": torch.rand(n, 4, generator=gen, dtype=torch.float64).argsort(dim=1),
        "brightness": _uniform(n, *factor, gen),
        "contrast": _uniform(n, *factor, gen),
        "saturation": _uniform(n, *factor, gen),
        "hue": _uniform(n, -0.2 * s, 0.2 * s, gen),
        "grayscale": _bernoulli(n, spec.grayscale_p, gen),
    }


def sample_crop_flip(
    n: int, image_size: int, gen: torch.Generator, padding: int = 4
) -> dict[str, torch.Tensor]:
    """Standard supervised CIFAR augmentation: random crop of the zero-padded image, then flip.

    As torchvision's RandomCrop(image_size, padding) then RandomHorizontalFlip(): the box is the
    image's size, shifted by up to `padding` pixels; pixels outside the image are zero.
    """
    left = torch.randint(-padding, padding + 1, (n,), generator=gen)
    top = torch.randint(-padding, padding + 1, (n,), generator=gen)
    size = torch.full((n,), image_size, dtype=torch.int64)
    return {
        "top": top,
        "left": left,
        "height": size,
        "width": size.clone(),
        "flip": _bernoulli(n, 0.5, gen),
    }


def crop_boxes(
    params: dict[str, torch.Tensor], height: int, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer crop boxes (top, left, height, width) of images of size height x width.

    Explicit boxes (`sample_crop_flip`) are returned as they are; SimCLR's raw draws are resolved
    as `RandomResizedCrop.get_params` resolves its draws: the first of the ten tries whose box
    fits, else the centre crop with the aspect ratio clamped to [3/4, 4/3].
    """
    if "top" in params:
        return params["top"], params["left"], params["height"], params["width"]
    target_area = height * width * params["crop_scale"]
    aspect = torch.exp(params["crop_log_ratio"])
    w = torch.round(torch.sqrt(target_area * aspect)).long()  # round half to even, as round()
    h = torch.round(torch.sqrt(target_area / aspect)).long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.long().argmax(dim=1, keepdim=True)  # the first try that fits (0 if none)
    found = fits.any(dim=1)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    # a uniform integer in [0, H - h] and [0, W - w], as torch.randint(0, H - h + 1)
    u = params["crop_position"]
    top = torch.floor(u[:, 0] * (height - h + 1)).long().clamp(max=height - h)
    left = torch.floor(u[:, 1] * (width - w + 1)).long().clamp(max=width - w)
    # the fallback
    in_ratio = width / height
    if in_ratio < min(RATIO):
        fw, fh = width, int(round(width / min(RATIO)))
    elif in_ratio > max(RATIO):
        fw, fh = int(round(height * max(RATIO))), height
    else:
        fw, fh = width, height
    top = torch.where(found, top, (height - fh) // 2)
    left = torch.where(found, left, (width - fw) // 2)
    h = torch.where(found, h, fh)
    w = torch.where(found, w, fw)
    return top, left, h, w


# ---------------------------------------------------------------------------------------------
# Geometry


def _source_coords(
    start: torch.Tensor,
    length: torch.Tensor,
    in_size: int,
    out_size: int,
    flip: torch.Tensor | None = None,
) -> torch.Tensor:
    """(N, out_size) source coordinates of a bilinear resize of [start, start + length), in
    grid_sample's normalised units (align_corners=True: -1 and 1 are the first and last pixel).

    The sampling positions and edge handling of `interpolate(mode="bilinear",
    align_corners=False)` on the cropped image: (x + 0.5)·length/out - 0.5, clamped to the crop
    (so the edge pixels are not blended with pixels outside the box). Where `flip` is set, the
    output is mirrored: output x samples where out_size - 1 - x would.
    """
    length = length.double().view(-1, 1)
    x = torch.arange(out_size, dtype=torch.float64).expand(len(length), -1)
    if flip is not None:
        x = torch.where(flip.view(-1, 1), out_size - 1 - x, x)
    src = ((x + 0.5) * length / out_size - 0.5).clamp(min=0)
    src = torch.minimum(src, length - 1) + start.view(-1, 1)
    return 2 * src / max(in_size - 1, 1) - 1


def apply_geometry(images: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Crop each image's box, resize it to the full size (bilinear), and flip where drawn.

    torchvision's resized_crop then horizontal_flip, batched: one `grid_sample` over the batch
    whose sampling grid is each box's resize grid, with the coordinates clamped to the box as
    `interpolate` clamps them. A box over the image's edge (`sample_crop_flip`) reads zeros
    there, as torchvision's padded crop. The sampling runs in the images' precision even inside
    an autocast region (training's loss runs in one on a GPU).
    """
    n, _, height, width = images.shape
    top, left, h, w = (b.cpu() for b in crop_boxes(params, height, width))
    gy = _source_coords(top, h, height, height)
    gx = _source_coords(left, w, width, width, flip=params["flip"].cpu())
    grid = torch.stack(
        (
            gx.view(n, 1, width).expand(n, height, width),
            gy.view(n, height, 1).expand(n, height, width),
        ),
        dim=-1,
    ).to(device=images.device, dtype=images.dtype)
    with torch.autocast(images.device.type, enabled=False):
        out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out.clamp_(0, 1)


# ---------------------------------------------------------------------------------------------
# Colour


def _per_image(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(device=like.device, dtype=like.dtype).view(-1, 1, 1, 1)


def _grey(images: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) grey image, as rgb_to_grayscale (one channel: the image itself)."""
    if images.shape[1] == 1:
        return images
    r, g, b = images.unbind(dim=1)
    grey = r.mul(GREY_WEIGHTS[0]).add_(g, alpha=GREY_WEIGHTS[1]).add_(b, alpha=GREY_WEIGHTS[2])
    return grey.unsqueeze(1)


def _blend(images: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    ratio = _per_image(ratio, images)
    return (images * ratio).add_(other * (1 - ratio)).clamp_(0, 1)


def _brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (images * _per_image(factor, images)).clamp_(0, 1)


def _contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(images, _grey(images).mean(dim=(1, 2, 3), keepdim=True), factor)


def _saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    if images.shape[1] == 1:
        return images
    return _blend(images, _grey(images), factor)


_HSV_OFFSETS = (5.0, 3.0, 1.0)  # R, G, B of the closed-form HSV -> RGB


def _hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Shift H in HSV by a per-image amount (in turns), as adjust_hue: RGB -> HSV -> RGB.

    H is computed as torchvision's `_rgb_to_hsv` computes it (sector 0, 2 or 4 by the largest
    channel, ties to R then G); the way back is the closed form of the same HSV -> RGB map,
    channel = V - V·S·clamp(min(k, 4 - k), 0, 1) with k = (offset + 6·H) mod 6 and V·S = max - min,
    which needs no per-sector gather.
    """
    if images.shape[1] == 1:
        return images
    r, g, b = images.unbind(dim=1)
    maxc = torch.maximum(torch.maximum(r, g), b)
    spread = maxc - torch.minimum(torch.minimum(r, g), b)
    is_r, is_g = maxc == r, maxc == g
    d = torch.where(spread == 0, 1.0, spread)  # flat pixels: any hue, the output is maxc
    h6 = torch.where(is_r, (g - b) / d, torch.where(is_g, (b - r) / d + 2.0, (r - g) / d + 4.0))
    h6 = h6.add_(6 * _per_image(shift, images).squeeze(1)).unsqueeze(1)
    offsets = torch.tensor(_HSV_OFFSETS, device=images.device, dtype=images.dtype)
    k = (h6 + offsets.view(1, 3, 1, 1)).remainder_(6.0)
    return maxc.unsqueeze(1) - spread.unsqueeze(1) * torch.minimum(k, 4.0 - k).clamp_(0, 1)


_JITTER_FNS = (_brightness, _contrast, _saturation, _hue)


def apply_colour(images: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Colour jitter in each image's drawn order (where `jitter` is set), then random grayscale.

    Each step applies every op to the images that have it at that position of their order, so
    the four ops cost about as much as running each once over the whole batch.
    """
    x = images.clone()
    one_channel = x.shape[1] == 1
    on = params["jitter"].cpu()
    order = params["order"].cpu()
    for step in range(4):
        for op, fn in enumerate(_JITTER_FNS):
            if one_channel and op in (SATURATION, HUE):
                continue  # identity on one channel, as torchvision v2
            factor = params[JITTER_OPS[op]].cpu()
            here = on & (order[:, step] == op)
            if op == HUE:
                here &= factor != 0  # a shift of 0 (jitter_strength 0): ColorJitter skips hue
            rows = here.nonzero().squeeze(1)
            if len(rows):
                rows_dev = rows.to(x.device)
                x.index_copy_(0, rows_dev, fn(x.index_select(0, rows_dev), factor[rows]))
    if not one_channel:
        rows = params["grayscale"].cpu().nonzero().squeeze(1)
        if len(rows):
            rows_dev = rows.to(x.device)
            grey = _grey(x.index_select(0, rows_dev)).expand(-1, 3, -1, -1)
            x.index_copy_(0, rows_dev, grey.contiguous())
    return x


def simclr_view(images: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    return apply_colour(apply_geometry(images, params), params)


# ---------------------------------------------------------------------------------------------
# Seeding


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
