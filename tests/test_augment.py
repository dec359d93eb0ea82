import torch

from ckaflow import augment, config
from tests.conftest import tiny_config

AUG = config.augment_spec(tiny_config())


def _images(channels=3, n=6, size=16):
    gen = torch.Generator().manual_seed(0)
    return torch.rand(n, channels, size, size, generator=gen)


def _identity_params(n, flip=False):
    ones = torch.ones(n, dtype=torch.float64)
    zeros = torch.zeros(n, dtype=torch.float64)
    return {"width": ones, "height": ones, "cx": zeros, "cy": zeros, "flip": torch.full((n,), flip)}


def test_identity_geometry_keeps_pixels():
    x = _images()
    assert torch.allclose(augment.apply_geometry(x, _identity_params(len(x))), x, atol=1e-6)


def test_flip_mirrors_horizontally():
    x = _images()
    out = augment.apply_geometry(x, _identity_params(len(x), flip=True))
    assert torch.allclose(out, torch.flip(x, dims=[-1]), atol=1e-6)


def test_same_seed_same_views_other_seed_other_views():
    x = _images()
    a = augment.simclr_view(x, augment.sample_simclr(6, AUG, torch.Generator().manual_seed(1)))
    b = augment.simclr_view(x, augment.sample_simclr(6, AUG, torch.Generator().manual_seed(1)))
    c = augment.simclr_view(x, augment.sample_simclr(6, AUG, torch.Generator().manual_seed(2)))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_views_stay_images_in_range_and_keep_channels():
    for channels in (1, 3):
        x = _images(channels)
        out = augment.simclr_view(x, augment.sample_simclr(6, AUG, torch.Generator()))
        assert out.shape == x.shape
        assert out.min() >= 0 and out.max() <= 1


def test_grayscale_makes_channels_equal():
    x = _images(3)
    params = augment.sample_simclr(6, AUG, torch.Generator().manual_seed(0))
    params["jitter"][:] = False
    params["grayscale"][:] = True
    out = augment.apply_colour(x, params)
    assert torch.allclose(out[:, 0], out[:, 1]) and torch.allclose(out[:, 1], out[:, 2])


def test_crop_scale_one_keeps_the_whole_image_area():
    spec = config.AugmentSpec((1.0, 1.0), 0.0, 0.0, 0.0, 0.0)
    params = augment.sample_simclr(50, spec, torch.Generator().manual_seed(0))
    area = params["width"] * params["height"]
    assert torch.all(area <= 1 + 1e-9) and torch.all(area > 0.74)


def test_hash_seed_separates_streams():
    seeds = {augment.hash_seed(0, stream, ex) for stream in (1, 2) for ex in range(100)}
    assert len(seeds) == 200
