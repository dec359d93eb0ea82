"""The augmentations against torchvision: parameters as `get_params`/`ColorJitter` draw them, and
each batched view equal, image by image, to torchvision.transforms.v2.functional with the same
parameters, on real Fashion-MNIST (one channel) and CIFAR-10/100 (three channel) images."""

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T1
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from ckaflow import augment, config, data
from tests.conftest import tiny_config
from tests.tolerances import gamma, resample_atol

AUG = config.augment_spec(tiny_config())
# every branch often: strong jitter, grayscale on half the images
STRONG = config.AugmentSpec((0.08, 1.0), 0.5, 1.0, 0.8, 0.5)


@pytest.fixture(scope="module")
def fashion(fashion_root) -> torch.Tensor:
    """64 real Fashion-MNIST test images, float in [0, 1], (64, 1, 28, 28)."""
    images = data.read_idx_images(fashion_root / "t10k-images-idx3-ubyte.gz")[:64]
    return torch.from_numpy(np.array(images)).float() / 255


@pytest.fixture(scope="module")
def cifar() -> torch.Tensor:
    """The 40 real CIFAR-10 and CIFAR-100 test images of the foolbox wheel, (40, 3, 32, 32)."""
    spec = importlib.util.find_spec("foolbox")
    if spec is None:
        pytest.fail("the foolbox wheel is needed: pip install --no-deps foolbox==3.3.4")
    folder = Path(spec.origin).parent / "data"
    pngs = sorted(folder.glob("cifar10_*.png")) + sorted(folder.glob("cifar100_*.png"))
    assert len(pngs) == 40
    images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in pngs])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


def _uint8(x: torch.Tensor) -> torch.Tensor:
    return (x * 255).round().clamp(0, 255).to(torch.int16)


def _boxes(n, top, left, height, width, flip=False):
    full = lambda v: torch.full((n,), v, dtype=torch.int64)  # noqa: E731
    return {
        "top": full(top),
        "left": full(left),
        "height": full(height),
        "width": full(width),
        "flip": torch.full((n,), flip),
    }


# ---------------------------------------------------------------------------------------------
# The views against torchvision's functional ops, image by image


def _torchvision_view(image: torch.Tensor, params: dict, i: int) -> torch.Tensor:
    """One image's SimCLR view by torchvision.transforms.v2.functional, with the drawn params."""
    height, width = image.shape[-2:]
    top, left, h, w = (int(b[i]) for b in augment.crop_boxes(params, height, width))
    out = TF.resized_crop(
        image, top, left, h, w, [height, width], InterpolationMode.BILINEAR, antialias=True
    )
    if params["flip"][i]:
        out = TF.horizontal_flip(out)
    if params["jitter"][i]:
        for op in params["order"][i].tolist():  # ColorJitter's fn_idx
            if op == 0:
                out = TF.adjust_brightness(out, float(params["brightness"][i]))
            elif op == 1:
                out = TF.adjust_contrast(out, float(params["contrast"][i]))
            elif op == 2:
                out = TF.adjust_saturation(out, float(params["saturation"][i]))
            else:
                out = TF.adjust_hue(out, float(params["hue"][i]))
    if params["grayscale"][i]:  # RandomGrayscale: as many channels out as in
        out = TF.rgb_to_grayscale(out, num_output_channels=image.shape[0])
    return out


def _check_against_torchvision(images: torch.Tensor, spec, seeds) -> int:
    checked = 0
    for seed in seeds:
        params = augment.sample_simclr(len(images), spec, torch.Generator().manual_seed(seed))
        ours = augment.simclr_view(images, params)
        assert ours.shape == images.shape
        for i in range(len(images)):
            ref = _torchvision_view(images[i], params, i)
            diff = (_uint8(ours[i]) - _uint8(ref)).abs().max().item()
            assert diff <= 1, f"seed {seed}, image {i}: uint8 views differ by {diff}"
            checked += 1
    return checked


def test_rgb_views_match_torchvision_image_by_image(cifar):
    assert _check_against_torchvision(cifar, STRONG, seeds=range(6)) == 240
    assert _check_against_torchvision(cifar, AUG, seeds=range(2)) == 80


def test_one_channel_views_match_torchvision_image_by_image(fashion):
    assert _check_against_torchvision(fashion, STRONG, seeds=range(4)) == 256
    assert _check_against_torchvision(fashion, AUG, seeds=range(2)) == 128


def test_each_colour_op_matches_torchvision_alone(cifar, fashion):
    """Every op in first place on every image (the order test above mixes them)."""
    for images in (cifar, fashion):
        n = len(images)
        params = augment.sample_simclr(n, STRONG, torch.Generator().manual_seed(7))
        params["jitter"][:] = True
        params["grayscale"][:] = False
        for op, name in enumerate(augment.JITTER_OPS):
            others = [o for o in range(4) if o != op]
            params["order"] = torch.tensor([op, *others]).repeat(n, 1)
            for other in others:  # factors that leave the image as it is
                params[augment.JITTER_OPS[other]] = torch.full((n,), 0.0 if other == 3 else 1.0)
            params[name] = augment.sample_simclr(n, STRONG, torch.Generator().manual_seed(op))[name]
            ours = augment.apply_colour(images, params)
            fn = getattr(TF, f"adjust_{name}")
            for i in range(n):
                ref = fn(images[i], float(params[name][i]))
                diff = (_uint8(ours[i]) - _uint8(ref)).abs().max().item()
                assert diff <= 1, f"{name}, {images.shape[1]} channels, image {i}: {diff}"


def test_one_channel_saturation_hue_and_grayscale_leave_the_image(fashion):
    params = augment.sample_simclr(len(fashion), STRONG, torch.Generator().manual_seed(0))
    params["jitter"][:] = True
    params["grayscale"][:] = True
    params["brightness"][:] = 1.0
    params["contrast"][:] = 1.0
    assert params["saturation"].sub(1).abs().min() > 0 and params["hue"].abs().min() > 0
    assert torch.equal(augment.apply_colour(fashion, params), fashion)


def test_grayscale_uses_torchvision_weights_and_fills_three_channels(cifar):
    params = augment.sample_simclr(len(cifar), AUG, torch.Generator().manual_seed(0))
    params["jitter"][:] = False
    params["grayscale"][:] = True
    out = augment.apply_colour(cifar, params)
    assert out.shape == cifar.shape
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])
    # three weighted terms, weights rounded to float32: γ₄ per path, Σ weights·|x| ≤ 1
    assert (out - TF.rgb_to_grayscale(cifar, num_output_channels=3)).abs().max() <= 2 * gamma(4)


# ---------------------------------------------------------------------------------------------
# Geometry: float32 coordinates and weights, bounded by `resample_atol` (2.0e-5 per resampler
# at 32 px); a sampling position off by 1/100 pixel moves real CIFAR pixels by > 3e-3


def test_resize_of_a_box_inside_the_image_does_not_depend_on_antialias(cifar):
    """The crop box is never larger than the image, so resizing it back only upsamples, where
    torchvision's antialiased bilinear kernel is the plain one (and downsampling is not)."""
    image = cifar[0]
    for h in range(1, 33):
        for w in range(1, 33):
            kwargs = {"size": [32, 32], "interpolation": InterpolationMode.BILINEAR}
            a = TF.resized_crop(image, 32 - h, 0, h, w, antialias=True, **kwargs)
            b = TF.resized_crop(image, 32 - h, 0, h, w, antialias=False, **kwargs)
            assert (a - b).abs().max() <= resample_atol(32, paths=2), (h, w)
    down_aa = TF.resize(image, [12, 12], antialias=True)
    assert not torch.allclose(down_aa, TF.resize(image, [12, 12], antialias=False), atol=0.05)


def test_every_box_matches_torchvision_resized_crop_and_flip(cifar, fashion):
    for images in (cifar[:4], fashion[:4]):
        size = images.shape[-1]
        for h in range(1, size + 1, 3):
            for w in range(1, size + 1, 2):
                for flip in (False, True):
                    top, left = (size - h) // 3, size - w
                    params = _boxes(len(images), top, left, h, w, flip)
                    ours = augment.apply_geometry(images, params)
                    ref = TF.resized_crop(images, top, left, h, w, [size, size], antialias=True)
                    ref = TF.horizontal_flip(ref) if flip else ref
                    bound = resample_atol(size, paths=2)
                    assert (ours - ref).abs().max() <= bound, (h, w, flip)


def test_identity_geometry_keeps_pixels(cifar):
    out = augment.apply_geometry(cifar, _boxes(len(cifar), 0, 0, 32, 32))
    assert (out - cifar).abs().max() <= resample_atol(32)


def test_flip_mirrors_horizontally(cifar):
    out = augment.apply_geometry(cifar, _boxes(len(cifar), 0, 0, 32, 32, flip=True))
    assert (out - torch.flip(cifar, dims=[-1])).abs().max() <= resample_atol(32)


def test_supervised_crop_flip_is_padded_random_crop_then_flip(cifar):
    gen = torch.Generator().manual_seed(3)
    params = augment.sample_crop_flip(len(cifar), 32, gen)
    assert params["top"].abs().max() <= 4 and params["left"].abs().max() <= 4
    assert len(set(params["top"].tolist())) > 5 and 0 < params["flip"].sum() < len(cifar)
    out = augment.apply_geometry(cifar, params)
    for i in range(len(cifar)):
        ref = TF.crop(
            TF.pad(cifar[i], [4]), 4 + int(params["top"][i]), 4 + int(params["left"][i]), 32, 32
        )
        ref = TF.horizontal_flip(ref) if params["flip"][i] else ref
        assert (out[i] - ref).abs().max() <= resample_atol(32), i  # pad and crop: exact


# ---------------------------------------------------------------------------------------------
# The sampler


def _get_params(scales, log_ratios, position, height, width):
    """RandomResizedCrop.get_params (torchvision 0.2x, transcribed), fed our draws."""
    area = height * width
    for k in range(len(scales)):
        target_area = area * scales[k]
        aspect_ratio = math.exp(log_ratios[k])
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = int(position[0] * (height - h + 1))  # torch.randint(0, height - h + 1)
            j = int(position[1] * (width - w + 1))
            return i, j, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < 3 / 4:
        w = width
        h = int(round(w / (3 / 4)))
    elif in_ratio > 4 / 3:
        h = height
        w = int(round(h * (4 / 3)))
    else:
        w = width
        h = height
    return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize("scale", [(0.08, 1.0), (0.5, 1.0), (0.9, 1.0)])
@pytest.mark.parametrize("size", [(32, 32), (28, 28), (20, 30), (32, 12)])
def test_crop_boxes_are_get_params_of_the_draws(scale, size):
    spec = config.AugmentSpec(scale, 0.5, 0.5, 0.8, 0.2)
    params = augment.sample_simclr(2000, spec, torch.Generator().manual_seed(0))
    boxes = torch.stack(augment.crop_boxes(params, *size), dim=1).tolist()
    for n, box in enumerate(boxes):
        expected = _get_params(
            params["crop_scale"][n].tolist(),
            params["crop_log_ratio"][n].tolist(),
            params["crop_position"][n].tolist(),
            *size,
        )
        assert tuple(box) == expected, n


def test_draws_have_get_params_ranges():
    params = augment.sample_simclr(5000, AUG, torch.Generator().manual_seed(0))
    scales, log_ratios = params["crop_scale"], params["crop_log_ratio"]
    assert scales.shape == log_ratios.shape == (5000, 10)  # ten tries per image
    assert scales.min() >= 0.08 and scales.max() <= 1.0
    assert scales.min() < 0.09 and scales.max() > 0.99
    assert log_ratios.min() >= math.log(3 / 4) and log_ratios.max() <= math.log(4 / 3)
    assert log_ratios.min() < math.log(3 / 4) + 0.01 and log_ratios.max() > math.log(4 / 3) - 0.01


def test_impossible_scale_takes_the_centre_crop_fallback():
    """Area >= 0.99 of the image never fits a 32x8 or 8x32 image at a ratio in [3/4, 4/3]."""
    spec = config.AugmentSpec((0.99, 1.0), 0.5, 0.5, 0.8, 0.2)
    params = augment.sample_simclr(500, spec, torch.Generator().manual_seed(0))
    tall = torch.stack(augment.crop_boxes(params, 32, 8), dim=1)
    assert (tall == torch.tensor([(32 - 11) // 2, 0, 11, 8])).all()  # h = round(8 / (3/4))
    wide = torch.stack(augment.crop_boxes(params, 8, 32), dim=1)
    assert (wide == torch.tensor([0, (32 - 11) // 2, 8, 11])).all()  # w = round(8 * 4/3)


def test_accepted_boxes_lie_inside_the_image_at_every_position():
    params = augment.sample_simclr(20000, AUG, torch.Generator().manual_seed(1))
    for height, width in ((32, 32), (28, 28), (20, 30)):
        top, left, h, w = augment.crop_boxes(params, height, width)
        assert (h > 0).all() and (h <= height).all() and (w > 0).all() and (w <= width).all()
        assert (top >= 0).all() and (left >= 0).all()
        assert (top + h <= height).all() and (left + w <= width).all()
        # the position is uniform over every place the box fits: both ends, mean in the middle
        for start, length, side in ((top, h, height), (left, w, width)):
            room = side - length
            moves = room > 0
            assert (start[moves] == 0).sum() > 100 and (start[moves] == room[moves]).sum() > 100
            assert abs((start[moves] / room[moves]).mean() - 0.5) < 0.01
        assert ((w / h).log().abs() <= math.log(4 / 3) + 0.2).all()  # the ratio, up to rounding


def test_accepted_area_is_uniform_on_the_scale_range():
    """Where every try fits (scale <= 3/4 on a square image: w, h <= sqrt(3/4 · 4/3) of the
    side), the first try is taken, and the box's area is uniform on the scale range."""
    spec = config.AugmentSpec((0.1, 0.6), 0.5, 0.5, 0.8, 0.2)
    params = augment.sample_simclr(20000, spec, torch.Generator().manual_seed(2))
    top, left, h, w = augment.crop_boxes(params, 32, 32)
    area = (h * w).double() / 1024  # rounding moves it by at most ~ (h + w + 1) / 2 pixels
    assert (area - params["crop_scale"][:, 0]).abs().max() < 33 / 1024
    quantiles = torch.quantile(area, torch.linspace(0.1, 0.9, 9, dtype=torch.float64))
    expected = 0.1 + 0.5 * torch.linspace(0.1, 0.9, 9, dtype=torch.float64)
    assert (quantiles - expected).abs().max() < 0.01


def test_crop_box_distribution_matches_torchvision_get_params():
    """Over the whole default range, where some tries are refused: the same box-size
    distribution as torchvision's own RandomResizedCrop.get_params."""
    n = 6000
    params = augment.sample_simclr(n, AUG, torch.Generator().manual_seed(3))
    _, _, h, w = augment.crop_boxes(params, 32, 32)
    ours = (h * w).double()
    torch.manual_seed(3)
    image = torch.zeros(3, 32, 32)
    theirs = []
    for _ in range(n):
        _, _, th, tw = T1.RandomResizedCrop.get_params(image, list(AUG.crop_scale), [3 / 4, 4 / 3])
        theirs.append(th * tw)
    theirs = torch.tensor(theirs, dtype=torch.float64)
    grid = torch.linspace(0, 1024, 200, dtype=torch.float64)
    ks = (ours[:, None] <= grid).double().mean(0) - (theirs[:, None] <= grid).double().mean(0)
    assert ks.abs().max() < 0.03  # two-sample KS, n = 6000 each: ~1% level is 0.03
    assert abs(ours.mean() - theirs.mean()) < 10


def test_crop_scale_one_keeps_the_whole_image():
    spec = config.AugmentSpec((1.0, 1.0), 0.0, 0.0, 0.0, 0.0)
    params = augment.sample_simclr(500, spec, torch.Generator().manual_seed(0))
    for size in (32, 28):
        boxes = torch.stack(augment.crop_boxes(params, size, size), dim=1)
        assert (boxes == torch.tensor([0, 0, size, size])).all()
    images = torch.rand(500, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    # the whole image resampled onto itself; jitter factors 1 and shift 0 are exact
    assert (augment.simclr_view(images, params) - images).abs().max() <= resample_atol(32)


def test_jitter_order_is_a_random_permutation_per_image():
    params = augment.sample_simclr(4000, AUG, torch.Generator().manual_seed(0))
    order = params["order"]
    assert (order.sort(dim=1).values == torch.arange(4)).all()
    assert len({tuple(row) for row in order.tolist()}) == 24  # all 4! orders occur
    # each op at each position a quarter of the time
    counts = torch.stack([(order == op).double().mean(0) for op in range(4)])
    assert (counts - 0.25).abs().max() < 0.03


def test_jitter_factors_have_colorjitter_ranges():
    s = 0.5
    params = augment.sample_simclr(5000, AUG, torch.Generator().manual_seed(0))
    for name in ("brightness", "contrast", "saturation"):
        assert params[name].min() >= 1 - 0.8 * s and params[name].max() <= 1 + 0.8 * s
        assert params[name].min() < 1 - 0.8 * s + 0.01 and params[name].max() > 1 + 0.8 * s - 0.01
    assert params["hue"].abs().max() <= 0.2 * s and params["hue"].abs().max() > 0.2 * s - 0.01
    for name, p in (("flip", 0.5), ("jitter", 0.8), ("grayscale", 0.2)):
        assert abs(params[name].double().mean() - p) < 0.03, name
    strong = config.AugmentSpec((0.08, 1.0), 0.5, 2.0, 0.8, 0.2)
    big = augment.sample_simclr(5000, strong, torch.Generator().manual_seed(0))
    assert big["brightness"].min() >= 0 and big["brightness"].min() < 0.01  # max(0, 1 - 1.6)


def test_same_seed_same_params_and_views_other_seed_other_views(cifar):
    def draw(seed):
        return augment.sample_simclr(len(cifar), AUG, torch.Generator().manual_seed(seed))

    a, b, c = draw(1), draw(1), draw(2)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(augment.simclr_view(cifar, a), augment.simclr_view(cifar, b))
    assert not torch.equal(augment.simclr_view(cifar, a), augment.simclr_view(cifar, c))


def test_per_example_views_do_not_depend_on_the_batch(cifar):
    ids = list(range(100, 140))
    whole = augment.sample_simclr_per_example(ids, AUG, seed=0, stream=1)
    part = augment.sample_simclr_per_example(ids[5:9], AUG, seed=0, stream=1)
    assert all(torch.equal(whole[k][5:9], part[k]) for k in whole)
    views = augment.simclr_view(cifar, whole)
    assert torch.equal(views[5:9], augment.simclr_view(cifar[5:9], part))
    other_stream = augment.sample_simclr_per_example(ids, AUG, seed=0, stream=2)
    assert not torch.equal(whole["crop_scale"], other_stream["crop_scale"])


def test_views_stay_images_in_range_and_keep_channels(cifar, fashion):
    for images in (cifar, fashion):
        out = augment.simclr_view(
            images, augment.sample_simclr(len(images), STRONG, torch.Generator())
        )
        assert out.shape == images.shape and out.dtype == images.dtype
        assert out.min() >= 0 and out.max() <= 1


def test_views_keep_full_precision_inside_autocast(cifar):
    """Training's loss (and so the augmentation) runs under autocast on a GPU: the views must
    not drop to bf16 there (a matmul-based resize would; CPU autocast casts matmul too)."""
    params = augment.sample_simclr(len(cifar), STRONG, torch.Generator().manual_seed(0))
    plain = augment.simclr_view(cifar, params)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = augment.simclr_view(cifar, params)
    assert autocast.dtype == torch.float32
    assert torch.allclose(autocast, plain, atol=1e-6)


def test_hash_seed_separates_streams():
    seeds = {augment.hash_seed(0, stream, ex) for stream in (1, 2) for ex in range(100)}
    assert len(seeds) == 200
