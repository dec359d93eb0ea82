"""Each network fed as it was trained: a run's `input` (resolution, normalisation) applied to
the shared stored pixels, the same way in every stage, without changing any existing run."""

from __future__ import annotations

import pytest
import torch

from ckaflow import config
from ckaflow.cka.grams import gram_stats
from ckaflow.cka.pairs import cka_between
from ckaflow.errors import ConfigError
from ckaflow.feed import Feed, feed_for
from ckaflow.forward import ViewPass
from ckaflow.imports import import_run
from ckaflow.models import record_layers
from tests.test_imports import TORCHVISION_POINTS, _native, _pool_and_head_bounds

N = 32  # eval images, each at 224 px


def _import_entry(name, path, **extra) -> dict:
    entry = {"name": name, "checkpoint": str(path), "format": "torchvision"}
    return entry | {"method": "supervised", "head": "classifier"} | extra


def test_an_imagenet_resnet_sees_what_torchvision_preprocessing_gives(prepared, tmp_path):
    """A torchvision ResNet-18 saved with its weights, imported with `input: {resolution: 224,
    normalise: imagenet}`: its layers through ckaflow's forward pass (the Gram and activation
    stages' own) equal torchvision's on the same images preprocessed by hand as its ImageNet
    weights' transforms do (bilinear antialiased resize, ImageNet mean and std)."""
    import torchvision
    import torchvision.transforms.v2.functional as TF

    torch.manual_seed(3)
    model = torchvision.models.resnet18().eval()
    path = tmp_path / "resnet18.pth"
    torch.save(model.state_dict(), path)
    fed = {"resolution": 224, "normalise": "imagenet"}
    cfg = config.validate({"imports": [_import_entry("tv224", path, input=fed)]})
    model_pt = import_run(config.run_specs(cfg)[-1], prepared, tmp_path / "model.pt")

    view = ViewPass.open(model_pt, prepared, "clean", examples=N, device="cpu")
    pixels = torch.from_numpy(view.pixels(slice(0, N)))
    with torch.no_grad(), record_layers(view.net, view.names) as ours:
        view(pixels)

    by_hand = TF.resize(pixels.float() / 255, [224, 224], antialias=True)  # bilinear
    by_hand = TF.normalize(
        by_hand.expand(-1, 3, -1, -1), [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    )
    native = _native(model, {**TORCHVISION_POINTS, "fc": ("fc", "output")}, by_hand)

    assert sorted(ours) == sorted(native)
    assert ours["layer1.0.out"].shape[1] == 64 * 56 * 56  # the network saw 224 px
    bounds = _pool_and_head_bounds(view.net, ours, native)
    for name in view.names:
        if name in bounds:
            assert ((ours[name] - native[name]).abs() <= bounds[name]).all(), name
        else:  # the same modules on the same values
            assert torch.equal(ours[name], native[name]), name
        a = gram_stats(ours[name].double().numpy(), estimator="linear", batch_size=N)
        b = gram_stats(native[name].double().numpy(), estimator="linear", batch_size=N)
        assert abs(cka_between([a], [b])[0, 0] - 1) < 1e-6, name


def test_the_default_input_leaves_every_spec_and_hash_as_before(study_config):
    """A run without `input` serialises without the key (so no artifact made before `input`
    existed is rebuilt); setting it changes the run's spec, and only that run's."""
    runs = config.run_specs(study_config)
    assert all("input" not in config.to_jsonable(run) for run in runs)
    fed = config.validate(study_config | {"input": {"resolution": 32}})
    changed = config.run_specs(fed)
    assert [r.input for r in changed] == [config.InputSpec(32)] * len(runs)
    assert all(config.to_jsonable(r)["input"]["resolution"] == 32 for r in changed)
    assert {r.replicate_of for r in runs}.isdisjoint({r.replicate_of for r in changed})
    back = [config.run_spec_from_dict(config.to_jsonable(r)) for r in changed]
    assert back == changed


def test_the_feed_resizes_and_normalises_as_declared(prepared):
    from ckaflow.data import open_prepared

    data = open_prepared(prepared)
    attrs = data.attrs
    pixels = torch.from_numpy(data.view("clean")[:4])
    run = config.run_specs(config.validate({"methods": ["supervised"]}))[0]
    # the default is the data store's own standardisation, bit for bit
    assert torch.equal(feed_for(run, attrs)(pixels), data.normalise(pixels))
    explicit = config.InputSpec(40, "explicit", (0.25,), (0.5,))
    x = feed_for(config.RunSpec(**{**vars(run), "input": explicit}), attrs)(pixels)
    assert x.shape == (4, 1, 40, 40)
    assert x.min() >= (0 - 0.25) / 0.5 and x.max() <= (1 - 0.25) / 0.5
    # a constant image stays constant through the resize: only the normalisation moves it
    grey = Feed(40, (0.5, 0.5, 0.5), (0.25, 0.5, 1.0))(
        torch.full((1, 1, 28, 28), 255, dtype=torch.uint8)
    )
    assert torch.allclose(grey[0, :, 0, 0], torch.tensor([2.0, 1.0, 0.5]))


def test_a_normalisation_that_does_not_fit_the_network_is_refused(prepared):
    from ckaflow.data import open_prepared

    # grey images: a trained run's network takes one channel, refused before any job runs
    cfg = config.validate({"methods": ["supervised"], "input": {"normalise": "imagenet"}})
    with pytest.raises(ConfigError, match=r"3 values, one per channel, for trained networks of 1"):
        config.run_specs(cfg)
    # an import's channels are its file's: checked when it is fed
    attrs = open_prepared(prepared).attrs
    run = config.run_specs(config.validate({"methods": ["supervised"]}))[0]
    explicit = config.InputSpec(None, "explicit", (0.5, 0.5), (0.2, 0.2))
    with pytest.raises(ConfigError, match=r"has 2 values, one per channel; the network takes 1"):
        feed_for(config.RunSpec(**{**vars(run), "input": explicit}), attrs)
    bad = {"input": {"normalise": {"mean": [0.5, 0.5], "std": [0.2]}}}
    with pytest.raises(ConfigError, match="mean has 2 values and std 1"):
        config.run_specs(config.validate(bad))
    with pytest.raises(ConfigError, match="did you mean `imagenet`"):
        config.validate({"input": {"normalise": "imagenett"}})


def test_the_plan_counts_the_layers_at_the_fed_resolution(study_config, tmp_path):
    """An import fed 64 px images has the layer widths of 64 px, whatever the stored size."""
    from ckaflow.plan import forward_flops, study_costs

    entry = _import_entry("tv", tmp_path / "tv.pth")
    fed = {"resolution": 64, "normalise": "imagenet"}
    cfg = config.validate(study_config | {"imports": [entry | {"input": fed}]})
    counted = study_costs(cfg).forward_flops["tv"]
    as_stored = config.run_specs(config.validate({"imports": [entry]}))[-1]
    assert counted == forward_flops(as_stored, (1, 64, 64), 10)  # stored at 64 px instead
    assert counted > 4 * forward_flops(as_stored, (1, 28, 28), 10)
