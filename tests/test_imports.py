"""Networks trained elsewhere: files made by the libraries themselves, imported, then compared
with the same network run natively (CKA 1 at every layer); tampered files refused clearly.

torchvision, timm and lightly build and save their own networks here (lightly's SimCLR example
module, trained a few steps with its NT-Xent loss on real images). solo-learn cannot be installed
next to this torch (its only release pins torch 1.9), so its checkpoint is built in its
documented layout: a Lightning checkpoint whose `state_dict` holds `backbone.*` (torchvision's
ResNet, `fc` removed, for CIFAR a 3x3 stride-1 conv1 with padding 2 and no max-pool),
`projector.*` (Linear, ReLU, Linear) and the online linear `classifier.*`.
"""

from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ckaflow import config
from ckaflow.cka.grams import gram_stats
from ckaflow.cka.pairs import cka_between
from ckaflow.data import open_prepared
from ckaflow.errors import CheckpointError
from ckaflow.imports import import_run
from ckaflow.models import load_network, record_layers
from tests.conftest import BIN, ENV
from tests.tolerances import mean_rtol, sequential_atol

N = 96  # eval images compared


def _spec(name, path, fmt, head, stem="imagenet", method="supervised", arch="resnet18"):
    entry = {"name": name, "checkpoint": str(path), "format": fmt, "method": method}
    entry.update(arch=arch, width=64, stem=stem, head=head)
    return config.import_run_spec(config.validate({"imports": [entry]})["imports"][0])


def _images(prepared: Path) -> torch.Tensor:
    """Real eval images as the network sees them: normalised, grey repeated to 3 channels."""
    data = open_prepared(prepared)
    x = data.normalise(torch.from_numpy(data.view("clean")[:N]).float() / 255)
    return x.expand(-1, 3, -1, -1).contiguous()


def _train_steps(model: nn.Module, loss_fn, prepared: Path, steps: int = 3) -> None:
    """A few optimiser steps on real training images (so weights and BN statistics move)."""
    data = open_prepared(prepared)
    images, labels = data.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for step in range(steps):
        rows = slice(32 * step, 32 * (step + 1))
        x = data.normalise(torch.from_numpy(images[rows]).float() / 255).expand(-1, 3, -1, -1)
        loss = loss_fn(model, x, torch.from_numpy(labels[rows]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def _native(model: nn.Module, points: dict[str, tuple[str, str]], x: torch.Tensor) -> dict:
    """Each layer recorded from the library's own module: name -> (module path, output|input)."""
    got, handles = {}, []
    modules = dict(model.named_modules())
    for name, (path, where) in points.items():

        def keep(tensor, name=name):
            got[name] = tensor.detach().flatten(1).clone()

        if where == "input":
            hook = modules[path].register_forward_pre_hook(lambda m, a, k=keep: k(a[0]))
        else:
            hook = modules[path].register_forward_hook(lambda m, a, out, k=keep: k(out))
        handles.append(hook)
    with torch.no_grad():
        model(x)
    for hook in handles:
        hook.remove()
    return got


def _resnet_points(prefix: str, stages: dict[int, str], pool: str) -> dict:
    """Registry name -> module path in a torchvision-style ResNet under `prefix`."""
    points = {"stem": (f"{prefix}{stages[0]}", "output")}
    for stage in range(1, 5):
        for block in range(2):
            at = f"{prefix}{stages[stage]}.{block}"
            base = f"layer{stage}.{block}"
            points[f"{base}.relu1"] = (f"{at}.conv2", "input")
            points[f"{base}.residual"] = (f"{at}.bn2", "output")
            points[f"{base}.out"] = (at, "output")
    points["pool"] = (f"{prefix}{pool}", "output")
    return points


TORCHVISION_POINTS = _resnet_points(
    "", {0: "maxpool", 1: "layer1", 2: "layer2", 3: "layer3", 4: "layer4"}, "avgpool"
)


def _assert_same_network(model_pt: Path, native: dict, x: torch.Tensor) -> None:
    """Every registered layer of the imported run: linear CKA 1 against the native layer."""
    net, meta = load_network(model_pt)
    names = [layer.name for layer in net.registry()]
    assert sorted(names) == sorted(native), (sorted(names), sorted(native))
    grey = x[:, :1]  # the imported network repeats the grey channel itself
    with torch.no_grad(), record_layers(net, names) as ours:
        net(grey)
    bounds = _pool_and_head_bounds(net, ours, native)
    stats = {}
    for name in names:
        a = gram_stats(ours[name].double().numpy(), estimator="linear", batch_size=N)
        b = gram_stats(native[name].double().numpy(), estimator="linear", batch_size=N)
        stats[name] = (a, b)
        if name in bounds:  # other float32 kernels may pool (a library's avg_pool2d, mean)
            assert ((ours[name] - native[name]).abs() <= bounds[name]).all(), name
        else:  # the encoder: the same modules on the same values, hence the same bits
            assert torch.allclose(ours[name], native[name], rtol=1e-4, atol=1e-5), name
    cka = np.array([cka_between([a], [b])[0, 0] for a, b in stats.values()])
    assert np.all(np.abs(cka - 1) < 1e-6), dict(zip(names, cka, strict=True))
    assert meta["imported"]["sha256"] and meta["run_spec"]["imported"]["name"]


def _pool_and_head_bounds(net, ours: dict, native: dict) -> dict:
    """Rounding bounds on |ours − native| for `pool` (a mean of the last map's H·W values, which
    a library may take with another kernel: two means, each within `mean_rtol` of exact, plus
    the mean of the maps' own difference) and each head layer after it (`sequential_atol` of
    our head's modules: the native head computes the same, perhaps with other kernels)."""
    from ckaflow.models import Network

    if not isinstance(net, Network) or "pool" not in ours:
        return {}  # a module import: its layers are its own modules, run alike
    last = [n for n in ours if n.endswith(".out")][-1]
    channels = ours["pool"].shape[1]
    h = ours[last].double().view(len(ours[last]), channels, -1)
    dh = (ours[last] - native[last]).abs().double().view_as(h)
    exact = h.mean(dim=2)
    bounds = {"pool": dh.mean(dim=2) + 2 * mean_rtol(h.shape[2]) * h.abs().mean(dim=2)}
    head = net.head
    if isinstance(head, nn.Linear):
        bounds["fc"] = sequential_atol([head], exact, bounds["pool"])[0]
    elif isinstance(head, nn.Sequential):
        after = sequential_atol(list(head), exact, bounds["pool"])
        bounds["head.0"] = after[next(i for i, m in enumerate(head) if isinstance(m, nn.ReLU))]
        bounds["head.1"] = after[-1]
    return bounds


def _assert_tampered_refused(path: Path, run, prepared: Path, tmp_path: Path, key: str) -> None:
    """The same file without layer2.0.bn1's running mean (`key` in the file's own naming):
    refused, naming the file and the key."""
    state = torch.load(path, weights_only=True)
    del state.get("state_dict", state)[key]
    tampered = tmp_path / f"tampered-{path.name}"
    torch.save(state, tampered)
    run = replace(run, imported=replace(run.imported, checkpoint=str(tampered)))
    with pytest.raises(CheckpointError) as err:
        import_run(run, prepared, tmp_path / "tampered.pt")
    assert str(tampered) in str(err.value), err.value
    assert "missing ['layer2.0.bn1.running_mean']" in str(err.value), err.value
    assert not (tmp_path / "tampered.pt").exists()


@pytest.fixture(scope="module")
def images(prepared):
    return _images(prepared)


def test_torchvision_resnet_imports_as_the_same_network(prepared, images, tmp_path):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    _train_steps(model, lambda m, x, y: nn.functional.cross_entropy(m(x), y), prepared)
    path = tmp_path / "resnet18.pth"
    torch.save(model.state_dict(), path)
    run = _spec("tv", path, "torchvision", "classifier")
    out = import_run(run, prepared, tmp_path / "m.pt")
    native = _native(model, {**TORCHVISION_POINTS, "fc": ("fc", "output")}, images)
    _assert_same_network(out, native, images)
    _assert_tampered_refused(path, run, prepared, tmp_path, "layer2.0.bn1.running_mean")


def test_timm_resnet_imports_as_the_same_network(prepared, images, tmp_path):
    import timm

    torch.manual_seed(1)
    model = timm.create_model("resnet18", num_classes=10)
    _train_steps(model, lambda m, x, y: nn.functional.cross_entropy(m(x), y), prepared)
    path = tmp_path / "timm.pth"
    torch.save(model.state_dict(), path)
    run = _spec("timm", path, "timm", "classifier")
    out = import_run(run, prepared, tmp_path / "m.pt")
    _assert_tampered_refused(path, run, prepared, tmp_path, "layer2.0.bn1.running_mean")
    points = {**TORCHVISION_POINTS, "pool": ("global_pool", "output"), "fc": ("fc", "output")}
    points["stem"] = ("maxpool", "output")
    _assert_same_network(out, _native(model, points, images), images)


def _lightly_simclr():
    """lightly's SimCLR example (examples/pytorch/simclr.py): torchvision's children without
    fc as the backbone, SimCLRProjectionHead(512, 512, 128) as the projector."""
    import torchvision
    from lightly.models.modules import SimCLRProjectionHead

    class SimCLR(nn.Module):
        def __init__(self, backbone):
            super().__init__()
            self.backbone = backbone
            self.projection_head = SimCLRProjectionHead(512, 512, 128)

        def forward(self, x):
            return self.projection_head(self.backbone(x).flatten(start_dim=1))

    resnet = torchvision.models.resnet18()
    return SimCLR(nn.Sequential(*list(resnet.children())[:-1]))


def test_lightly_simclr_imports_with_its_projector(prepared, images, tmp_path):
    from lightly.loss import NTXentLoss

    torch.manual_seed(2)
    model, loss = _lightly_simclr(), NTXentLoss()

    def contrastive(m, x, _):  # two views: a flip and a shift of the same real images
        return loss(m(x), m(torch.roll(x.flip(-1), 2, dims=-1)))

    _train_steps(model, contrastive, prepared)
    path = tmp_path / "lightly.pth"
    torch.save(model.state_dict(), path)
    run = _spec("lightly", path, "lightly", "projector", method="simclr")
    out = import_run(run, prepared, tmp_path / "m.pt")
    _assert_tampered_refused(path, run, prepared, tmp_path, "backbone.5.0.bn1.running_mean")
    stages = {0: "3", 1: "4", 2: "5", 3: "6", 4: "7"}
    points = _resnet_points("backbone.", stages, "8")
    points["head.0"] = ("projection_head.layers.2", "output")  # the ReLU
    points["head.1"] = ("projection_head.layers.4", "output")  # the closing BatchNorm
    _assert_same_network(out, _native(model, points, images), images)


def _assert_untrained_baseline_is_the_same_network(model_pt, prepared, tmp_path, monkeypatch):
    """The probes' untrained baseline of an imported run: its architecture exactly (projector
    layout from the file, no stem ReLU where the file has none), other weights."""
    from ckaflow import evaluate, models

    built = []

    def spy(*args, **kwargs):
        built.append(models.build_network(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(models, "initial_network", spy)
    evaluate.probe_run(model_pt, prepared, tmp_path / "probes.parquet", "pool", steps=2)
    trained, _ = load_network(model_pt)
    shapes = {k: v.shape for k, v in trained.state_dict().items()}
    assert {k: v.shape for k, v in built[0].state_dict().items()} == shapes
    assert type(built[0].encoder.relu) is type(trained.encoder.relu)


class LightlyBenchmarkModel(nn.Module):
    """The shape of lightly's CIFAR-10 benchmark models (benchmarks/cifar10_benchmark.py): its
    own ResNetGenerator's children without `linear` and an adaptive pool as the backbone (the
    generator's forward applies the stem's ReLU functionally, so this backbone has none after
    bn1), a projection head, and for BYOL/MoCo a predictor and momentum copies."""

    def __init__(self, projection_head, prediction_head=None, momentum=False, num_splits=0):
        import copy

        from lightly.models import ResNetGenerator

        super().__init__()
        resnet = ResNetGenerator("resnet-18", 1, num_splits=num_splits)
        self.backbone = nn.Sequential(*list(resnet.children())[:-1], nn.AdaptiveAvgPool2d(1))
        self.projection_head = projection_head
        if prediction_head is not None:
            self.prediction_head = prediction_head
        if momentum:
            self.backbone_momentum = copy.deepcopy(self.backbone)
            self.projection_head_momentum = copy.deepcopy(self.projection_head)

    def forward(self, x):
        return self.projection_head(self.backbone(x).flatten(start_dim=1))


# registry name -> module in a LightlyBenchmarkModel: the stem is bn1's output (no ReLU)
GENERATOR_POINTS = _resnet_points("backbone.", {0: "1", 1: "2", 2: "3", 3: "4", 4: "5"}, "6")


def test_lightly_cifar_benchmark_backbone_imports_without_the_stem_relu(
    prepared, images, tmp_path, monkeypatch
):
    from lightly.loss import NTXentLoss
    from lightly.models import ResNetGenerator

    torch.manual_seed(4)
    from lightly.models.modules import SimCLRProjectionHead

    model, loss = LightlyBenchmarkModel(SimCLRProjectionHead(512, 512, 128)), NTXentLoss()

    def contrastive(m, x, _):
        return loss(m(x), m(torch.roll(x.flip(-1), 2, dims=-1)))

    _train_steps(model, contrastive, prepared)
    path = tmp_path / "lightly-generator.pth"
    torch.save(model.state_dict(), path)
    run = _spec("gen", path, "lightly", "projector", stem="cifar", method="simclr")
    out = import_run(run, prepared, tmp_path / "m.pt")
    assert torch.load(out, weights_only=True)["meta"]["stem_relu"] is False
    _assert_tampered_refused(path, run, prepared, tmp_path, "backbone.3.0.bn1.running_mean")
    points = dict(GENERATOR_POINTS)
    points["head.0"] = ("projection_head.layers.2", "output")
    points["head.1"] = ("projection_head.layers.4", "output")
    native = _native(model, points, images)
    _assert_same_network(out, native, images)
    _assert_untrained_baseline_is_the_same_network(out, prepared, tmp_path, monkeypatch)

    # imported again from its model.pt (format ckaflow): still without the stem's ReLU
    again = _spec("again", out, "ckaflow", "projector", stem="cifar", method="simclr")
    _assert_same_network(import_run(again, prepared, tmp_path / "a.pt"), native, images)

    # a ResNetGenerator kept whole (its forward has the ReLU; `linear` is its classifier)
    torch.manual_seed(5)
    whole = nn.Module()
    whole.backbone = ResNetGenerator("resnet-18", num_classes=10)
    whole.forward = whole.backbone.forward
    _train_steps(whole, lambda m, x, y: nn.functional.cross_entropy(m(x), y), prepared)
    path = tmp_path / "lightly-whole.pth"
    torch.save(whole.state_dict(), path)
    run = _spec("whole", path, "lightly", "classifier", stem="cifar", method="supervised")
    out = import_run(run, prepared, tmp_path / "w.pt")
    points = _resnet_points("backbone.", {0: "", **{s: f"layer{s}" for s in range(1, 5)}}, "")
    points["stem"] = ("backbone.layer1", "input")  # after the functional ReLU
    points["pool"] = ("backbone.linear", "input")  # avg_pool2d(4) of the 4x4 map: global
    points["fc"] = ("backbone.linear", "output")
    _assert_same_network(out, _native(whole, points, images), images)
    # and an online classifier beside it: two classifiers, refused rather than one dropped
    state = whole.state_dict()
    for name in ("weight", "bias"):
        state[f"online_classifier.classification_head.{name}"] = state[f"backbone.linear.{name}"]
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="two classifiers") as err:
        import_run(run, prepared, tmp_path / "two.pt")
    assert str(path) in str(err.value)


def test_lightly_byol_imports_without_its_momentum_copies_and_predictor(prepared, images, tmp_path):
    """lightly's BYOL (examples and benchmarks): backbone, projection and prediction heads, and
    momentum copies of backbone and projector; the online backbone and projector are compared."""

    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead

    torch.manual_seed(7)
    heads = BYOLProjectionHead(512, 1024, 256), BYOLPredictionHead(256, 1024, 256)
    model, loss = LightlyBenchmarkModel(*heads, momentum=True), NegativeCosineSimilarity()

    def byol(m, x, _):
        p = m.prediction_head(m(x))
        with torch.no_grad():
            z = m.projection_head_momentum(m.backbone_momentum(x.flip(-1)).flatten(start_dim=1))
        return loss(p, z)

    _train_steps(model, byol, prepared)
    path = tmp_path / "byol.pth"
    torch.save(model.state_dict(), path)
    run = _spec("byol", path, "lightly", "projector", stem="cifar", method="byol")
    out = import_run(run, prepared, tmp_path / "m.pt")
    meta = torch.load(out, weights_only=True)["meta"]
    assert meta["imported"]["dropped"] == ["ignored"]  # momentum copies and predictor
    points = dict(GENERATOR_POINTS)
    points["head.0"] = ("projection_head.layers.2", "output")
    points["head.1"] = ("projection_head.layers.3", "output")
    _assert_same_network(out, _native(model, points, images), images)


def test_lightly_moco_split_batchnorm_imports_with_its_eval_statistics(prepared, images, tmp_path):
    """lightly's MoCo CIFAR benchmark: a ResNetGenerator with SplitBatchNorm (num_splits=8), its
    file saved in training mode with 8 different running statistics per channel; eval mode uses
    their mean, and so does the import."""

    from lightly.loss import NTXentLoss
    from lightly.models.modules import MoCoProjectionHead

    torch.manual_seed(8)
    head = MoCoProjectionHead(512, 512, 128)
    model, loss = LightlyBenchmarkModel(head, momentum=True, num_splits=8), NTXentLoss()
    _train_steps(model, lambda m, x, _: loss(m(x), m(torch.roll(x, 2, dims=-1))), prepared)
    model.train()  # one more training batch: the 8 splits' statistics drift apart again
    with torch.no_grad():
        model(images[:32])
    state = model.state_dict()
    splits = state["backbone.1.running_mean"].view(8, 64)
    assert not torch.allclose(splits[0], splits[1])
    path = tmp_path / "moco.pth"
    torch.save(state, path)
    model.eval()  # lightly's SplitBatchNorm averages the splits here
    out = import_run(
        _spec("moco", path, "lightly", "projector", stem="cifar", method="moco"),
        prepared,
        tmp_path / "m.pt",
    )
    points = dict(GENERATOR_POINTS)
    points["head.0"] = ("projection_head.layers.1", "output")  # Linear, ReLU, Linear
    points["head.1"] = ("projection_head.layers.2", "output")
    _assert_same_network(out, _native(model, points, images), images)


def _solo_learn_simclr(proj_hidden=256, proj_out=64):
    """solo-learn's SimCLR for CIFAR (solo/methods/base.py, simclr.py): torchvision's ResNet
    with conv1 3x3 stride 1 padding 2 and no max-pool, fc removed; projector Linear-ReLU-Linear;
    an online linear classifier."""
    import torchvision

    class SoloSimCLR(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = torchvision.models.resnet18()
            self.backbone.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=2, bias=False)
            self.backbone.maxpool = nn.Identity()
            self.backbone.fc = nn.Identity()
            self.projector = nn.Sequential(
                nn.Linear(512, proj_hidden), nn.ReLU(), nn.Linear(proj_hidden, proj_out)
            )
            self.classifier = nn.Linear(512, 10)

        def forward(self, x):
            return self.projector(self.backbone(x))

    return SoloSimCLR()


def test_solo_learn_checkpoint_imports_with_its_cifar_stem(prepared, images, tmp_path):
    torch.manual_seed(3)
    model = _solo_learn_simclr()

    def contrastive(m, x, _):
        z = nn.functional.normalize(torch.cat([m(x), m(torch.roll(x, 3, dims=-1))]), dim=1)
        sim = z @ z.T / 0.2
        sim.fill_diagonal_(-1e9)
        n = len(x)
        target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
        return nn.functional.cross_entropy(sim, target)

    _train_steps(model, contrastive, prepared)
    path = tmp_path / "simclr-cifar10-ep=1.ckpt"
    lightning = {"epoch": 1, "global_step": 3, "pytorch-lightning_version": "2.1.2"}
    torch.save({**lightning, "state_dict": model.state_dict()}, path)
    run = _spec("solo", path, "solo-learn", "projector", stem="cifar", method="simclr")
    assert run.model.stem_padding == 2
    out = import_run(run, prepared, tmp_path / "m.pt")
    _assert_tampered_refused(path, run, prepared, tmp_path, "backbone.layer2.0.bn1.running_mean")
    points = _resnet_points(
        "backbone.", {0: "maxpool", **{s: f"layer{s}" for s in range(1, 5)}}, "avgpool"
    )
    points["head.0"] = ("projector.1", "output")
    points["head.1"] = ("projector.2", "output")
    _assert_same_network(out, _native(model, points, images), images)
    # its online classifier, as the head instead of the projector
    out = import_run(
        replace(run, imported=replace(run.imported, head="classifier")), prepared, tmp_path / "c.pt"
    )
    points = {k: v for k, v in points.items() if not k.startswith("head")}
    native = _native(model, points, images)
    with torch.no_grad():
        native["fc"] = model.classifier(model.backbone(images))
    _assert_same_network(out, native, images)


# -- tampered files and wrong settings: a clear error naming the file and the first keys ------


@pytest.fixture(scope="module")
def torchvision_file(tmp_path_factory):
    import torchvision

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tv") / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


def _tampered(source: Path, tmp_path: Path, change) -> Path:
    state = torch.load(source, weights_only=True)
    change(state)
    path = tmp_path / "tampered.pth"
    torch.save(state, path)
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.pop("layer3.1.bn2.running_var"), "missing ['layer3.1.bn2.running_var']"),
        (lambda s: s.update({"layer2.9.conv1.weight": torch.zeros(1)}), "layer2.9.conv1.weight"),
        (
            lambda s: s.update({"layer4.0.conv2.weight": torch.zeros(512, 512, 1, 1)}),
            "shape mismatches ['layer4.0.conv2.weight: file (512, 512, 1, 1), network "
            "(512, 512, 3, 3)",
        ),
    ],
)
def test_a_tampered_file_is_refused_naming_the_keys(
    change, message, torchvision_file, prepared, tmp_path
):
    path = _tampered(torchvision_file, tmp_path, change)
    with pytest.raises(CheckpointError) as err:
        import_run(_spec("tv", path, "torchvision", "classifier"), prepared, tmp_path / "m.pt")
    assert str(path) in str(err.value) and message in str(err.value)
    assert not (tmp_path / "m.pt").exists()


def test_a_wrong_stem_arch_format_or_head_is_refused(torchvision_file, prepared, tmp_path):
    out = tmp_path / "m.pt"
    cases = [
        (
            _spec("tv", torchvision_file, "torchvision", "encoder", stem="cifar"),
            "the imagenet stem",
        ),
        (
            _spec("tv", torchvision_file, "torchvision", "encoder", arch="resnet34"),
            "missing ['layer1.2.",
        ),
        (_spec("tv", torchvision_file, "lightly", "encoder"), "is not part of a lightly ResNet"),
        (_spec("tv", torchvision_file, "torchvision", "projector"), "has no projector"),
    ]
    for run, message in cases:
        with pytest.raises(CheckpointError) as err:
            import_run(run, prepared, out)
        assert str(torchvision_file) in str(err.value) and message in str(err.value), err.value
    assert not out.exists()


def test_the_command_line_refuses_a_tampered_file_without_a_traceback(
    torchvision_file, prepared, tmp_path
):
    import json
    from dataclasses import asdict

    path = _tampered(torchvision_file, tmp_path, lambda s: s.pop("conv1.weight"))
    run = _spec("tv", path, "torchvision", "encoder")
    cmd = [str(BIN / "ckaflow"), "import-run", "--spec", json.dumps(asdict(run))]
    cmd += ["--data", str(prepared), "--out", str(tmp_path / "m.pt")]
    result = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "no conv1.weight" in result.stderr
    assert str(path) in result.stderr and not (tmp_path / "m.pt").exists()


def test_a_file_that_would_run_code_is_refused(prepared, tmp_path):
    class Trap:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    path = tmp_path / "trap.pth"
    torch.save({"conv1.weight": torch.zeros(1), "trap": Trap()}, path)
    with pytest.raises(CheckpointError, match="refused"):
        import_run(_spec("trap", path, "torchvision", "encoder"), prepared, tmp_path / "m.pt")
    assert not (tmp_path / "pwned").exists()


def test_a_ckaflow_model_of_another_study_imports_as_itself(trained, prepared, images, tmp_path):
    original, _ = load_network(trained["simclr"])
    entry = {"name": "other", "checkpoint": str(trained["simclr"]), "format": "ckaflow"}
    entry.update(method="simclr", width=4, stem="cifar", head="projector")
    run = config.import_run_spec(config.validate({"imports": [entry]})["imports"][0])
    out = import_run(run, prepared, tmp_path / "m.pt")
    names = [layer.name for layer in original.registry()]
    with torch.no_grad(), record_layers(original, names) as native:
        original(images[:, :1])
    _assert_same_network(out, dict(native), images)


@pytest.mark.e2e
def test_a_study_of_one_trained_and_two_imported_runs(tmp_path):
    """The tiny study with a supervised run trained by ckaflow, a torchvision ResNet-18 (fed
    64 px images with ImageNet's normalisation) and a MobileNet (format module) imported: every
    stage treats the imports like runs; a new file reruns its import onward."""
    import json

    import pandas as pd
    import torchvision
    import yaml
    import zarr

    from ckaflow.study import Side, Study
    from tests.conftest import REPO, snakemake_cmd

    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "tv.pth")
    mobilenet = torchvision.models.mobilenet_v3_small(num_classes=10)
    torch.save(mobilenet.state_dict(), tmp_path / "mnv3.pth")
    cfg = yaml.safe_load((REPO / "tests" / "configs" / "tiny.yaml").read_text())
    cfg["methods"] = ["supervised"]
    cfg["imports"] = [
        {"name": "tv", "checkpoint": "tv.pth", "format": "torchvision", "head": "classifier"}
        | {"method": "supervised", "stem": "imagenet"}
        | {"input": {"resolution": 64, "normalise": "imagenet"}},  # fed as ImageNet weights
        {"name": "mnv3", "checkpoint": "mnv3.pth", "format": "module", "method": "mobilenet"}
        | {"module": MOBILENET},
    ]
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(cfg))
    cmd = snakemake_cmd(tmp_path, tmp_path / "study.yaml")
    result = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stderr[-4000:]

    results = tmp_path / "results"
    runs = pd.read_parquet(results / "tables" / "runs.parquet").set_index("run")
    assert set(runs.index) == {"supervised-resnet18-w4-s0", "tv", "mnv3"}
    assert runs.loc["mnv3", "imported_from"] == "module" and runs.loc["mnv3", "linear_accuracy"] > 0
    assert runs.loc["tv", "imported_from"] == "torchvision"
    assert pd.isna(runs.loc["supervised-resnet18-w4-s0", "imported_from"])
    training = pd.read_parquet(results / "tables" / "training.parquet")
    assert set(training["run"]) == {"supervised-resnet18-w4-s0"}  # no training for the import
    cka = pd.read_parquet(results / "tables" / "cka.parquet")
    cross = cka[cka["kind"] == "cross"]
    assert set(cross["run_a"]) | set(cross["run_b"]) == set(runs.index)
    assert set(cka[cka["run_a"] == "mnv3"]["layer_kind_a"]) == {"module"}
    assert {"within", "invariance", "class"} <= set(cka[cka["run_a"] == "tv"]["kind"])
    assert np.isfinite(cka["value"]).all()
    probes = pd.read_parquet(results / "tables" / "probes.parquet")
    assert set(probes[probes["run"] == "tv"]["encoder"]) == {"trained", "untrained"}
    figures = results / "figures"
    assert (figures / "cross-supervised-resnet18-w4-s0-vs-tv.png").stat().st_size > 10_000
    summary = (results / "summary.md").read_text()
    assert summary.count("| **C") >= 7 and "mnv3: linear probe at classifier.3" in summary
    # the module run takes no part in the claims, so both sides left are supervised
    assert "Methods compared: (no self-supervised method) vs supervised." in summary
    assert (figures / "within-mnv3.clean.png").stat().st_size > 10_000
    log = (results / "logs" / "import_run" / "tv.log").read_text()
    assert "torchvision tv.pth" in log and "27 layers" in log  # stem, 8 x 3, pool, fc

    dry = subprocess.run([*cmd, "--dry-run"], env=ENV, capture_output=True, text=True)
    assert "Nothing to be done" in dry.stdout + dry.stderr
    # another file at the same path: the import and everything after it, never the training
    torch.manual_seed(1)
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "tv.pth")
    dry = subprocess.run([*cmd, "--dry-run"], env=ENV, capture_output=True, text=True)
    jobs = dry.stdout.split("Job stats:")[1].split("\n\n")[0]
    assert "import_run" in jobs and "train " not in jobs and "prepare_data" not in jobs
    meta = json.dumps(torch.load(results / "runs" / "tv" / "model.pt", weights_only=True)["meta"])
    assert '"format": "torchvision"' in meta
    shown = subprocess.run(
        [str(BIN / "ckaflow"), "inspect", str(results / "runs" / "tv" / "model.pt")],
        env=ENV,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert (
        "tv (imported, not trained by ckaflow)" in shown
        and runs.loc["tv", "checkpoint_sha256"] in shown
        and "fed: 64 px (stored 28 px), ImageNet's mean and std" in shown
    )
    features = probes[(probes["run"] == "tv") & (probes["layer"] == "layer1.0.out")]["features"]
    assert set(features) == {64}  # pooled channels; the Gram stage saw 16 x 16 maps
    gram_store = Study.gram(Side("tv", "clean"))
    fed = zarr.open_group(tmp_path / gram_store, mode="r").attrs["run_spec"]["input"]
    assert fed == {"resolution": 64, "normalise": "imagenet", "mean": None, "std": None}


# -- format module: any network, by its builder's name, its layers by glob ---------------------

MOBILENET = {
    "builder": "torchvision.models:mobilenet_v3_small",
    "kwargs": {"num_classes": 10},
    "layers": {"names": ["features.0", "features.*.block", "features.12", "classifier.3"]},
}


def _module_spec(name, path, module):
    entry = {"name": name, "checkpoint": str(path), "format": "module", "method": "supervised"}
    return config.import_run_spec(
        config.validate({"imports": [entry | {"module": module}]})["imports"][0]
    )


def test_a_network_that_is_not_a_resnet_imports_by_its_builder(prepared, images, tmp_path):
    import torchvision

    torch.manual_seed(4)
    model = torchvision.models.mobilenet_v3_small(num_classes=10)
    _train_steps(model, lambda m, x, y: nn.functional.cross_entropy(m(x), y), prepared)
    path = tmp_path / "mobilenet.pth"
    torch.save(model.state_dict(), path)
    out = import_run(_module_spec("mnv3", path, MOBILENET), prepared, tmp_path / "m.pt")
    names = ["features.0", *(f"features.{i}.block" for i in range(1, 12)), "features.12"]
    names.append("classifier.3")
    net, _ = load_network(out)
    assert [layer.name for layer in net.registry()] == names  # in named_modules() order
    native = _native(model, {name: (name, "output") for name in names}, images)
    _assert_same_network(out, native, images)


def test_a_timm_deep_stem_is_refused_as_timm_and_imports_as_a_module(prepared, images, tmp_path):
    """timm's resnet18d (3-conv stem, avg-pool shortcut) is no torchvision ResNet: format timm
    says so and names the way that works, format module with timm's own builder."""
    import timm

    torch.manual_seed(6)
    model = timm.create_model("resnet18d", num_classes=10)
    _train_steps(model, lambda m, x, y: nn.functional.cross_entropy(m(x), y), prepared)
    path = tmp_path / "resnet18d.pth"
    torch.save(model.state_dict(), path)
    with pytest.raises(CheckpointError, match="a deep stem .* format: module") as err:
        import_run(_spec("d", path, "timm", "classifier"), prepared, tmp_path / "m.pt")
    assert str(path) in str(err.value)
    module = {
        "builder": "timm:create_model",
        "kwargs": {"model_name": "resnet18d", "num_classes": 10},
        "layers": {"names": ["layer?.?", "layer?.??", "global_pool"]},
    }
    out = import_run(_module_spec("d", path, module), prepared, tmp_path / "m.pt")
    names = [f"layer{s}.{b}" for s in range(1, 5) for b in range(2)] + ["global_pool"]
    native = _native(model, {name: (name, "output") for name in names}, images)
    _assert_same_network(out, native, images)


def test_a_module_import_refuses_a_wrong_builder_layers_or_weights(prepared, tmp_path):
    import torchvision

    path = tmp_path / "mobilenet.pth"
    torch.save(torchvision.models.mobilenet_v3_small(num_classes=10).state_dict(), path)
    cases = [
        ({**MOBILENET, "builder": "torchvision.models:no_such_net"}, "cannot be found"),
        ({**MOBILENET, "kwargs": {"num_classes": 7}}, "shape mismatches ['classifier.3.weight"),
        ({**MOBILENET, "layers": {"names": ["nothing.*"]}}, "match none of its modules"),
    ]
    for module, message in cases:
        with pytest.raises(CheckpointError) as err:
            import_run(_module_spec("mnv3", path, module), prepared, tmp_path / "m.pt")
        assert str(path) in str(err.value) and message in str(err.value), err.value
    assert not (tmp_path / "m.pt").exists()


class Reused(nn.Module):
    """One ReLU module called twice per forward pass."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.act(self.act(self.conv(x))).mean(dim=(2, 3)))


def test_a_module_called_twice_per_forward_pass_is_refused(prepared, tmp_path):
    path = tmp_path / "reused.pth"
    torch.save(Reused().state_dict(), path)
    module = {"builder": "tests.test_imports:Reused", "layers": {"names": ["act", "fc"]}}
    with pytest.raises(CheckpointError, match="layer act is computed more than once"):
        import_run(_module_spec("reused", path, module), prepared, tmp_path / "m.pt")
    module["layers"]["names"] = ["conv", "fc"]  # modules that run once: fine
    out = import_run(_module_spec("once", path, module), prepared, tmp_path / "m.pt")
    assert [layer.name for layer in load_network(out)[0].registry()] == ["conv", "fc"]
