"""ResNets built from torchvision's blocks, and hooks that record every registered layer.

The CIFAR stem (3x3 conv, stride 1, no max-pool) is used for inputs up to 64 px, as in SimCLR's
CIFAR experiments. `width` is the channel count of the first stage (64 = standard ResNet).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from ckaflow import checkpoint
from ckaflow.augment import hash_seed
from ckaflow.config import HEADS, ModelSpec, RunSpec, run_spec_from_dict
from ckaflow.errors import CheckpointError
from ckaflow.layers import (
    ARCHS,
    CIFAR_STEM_MAX_SIZE,
    Layer,
    head_layer_names,
    layer_registry,
    module_registry,
)


class Encoder(ResNet):
    """torchvision's ResNet with a width multiplier, 1- or 3-channel input and the CIFAR or
    ImageNet stem; `fc` is an identity, so the output is the pooled feature vector."""

    def __init__(
        self,
        arch: str,
        width: int,
        in_channels: int,
        image_size: int,
        stem: str = "auto",
        stem_padding: int = 1,
        stem_relu: bool = True,
    ):
        nn.Module.__init__(self)
        block_type, blocks = ARCHS[arch]
        block = BasicBlock if block_type == "basic" else Bottleneck
        self._norm_layer = nn.BatchNorm2d
        self.inplanes = width
        self.dilation = 1
        self.groups = 1
        self.base_width = 64  # torchvision's Bottleneck scales inner width by base_width / 64
        if stem == "auto":
            stem = "cifar" if image_size <= CIFAR_STEM_MAX_SIZE else "imagenet"
        if stem == "cifar":
            self.conv1 = nn.Conv2d(
                in_channels, width, 3, stride=1, padding=stem_padding, bias=False
            )
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        # the stem's own; torchvision's blocks have theirs
        self.relu = nn.ReLU(inplace=True) if stem_relu else nn.Identity()
        self.layer1 = self._make_layer(block, width, blocks[0])
        self.layer2 = self._make_layer(block, 2 * width, blocks[1], stride=2)
        self.layer3 = self._make_layer(block, 4 * width, blocks[2], stride=2)
        self.layer4 = self._make_layer(block, 8 * width, blocks[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Identity()
        self.feature_dim = 8 * width * block.expansion
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


def projector_layout(in_dim: int, out_dim: int) -> list[list]:
    """SimCLR v1's projector, as ckaflow trains it: Linear -> BN -> ReLU -> Linear."""
    return [
        ["linear", in_dim, in_dim, False],
        ["bn", in_dim],
        ["relu"],
        ["linear", in_dim, out_dim, True],
    ]


def build_projector(layout: list[list]) -> nn.Sequential:
    """A projector from its layout: ["linear", in, out, bias], ["bn", n] or ["relu"] per module
    (imported projectors differ: lightly's ends in a BatchNorm, solo-learn's has none).
    Registry: head.0 = the first ReLU's output (hidden), head.1 = the last module's."""
    modules: list[nn.Module] = []
    for kind, *args in layout:
        if kind == "linear":
            modules.append(nn.Linear(args[0], args[1], bias=bool(args[2])))
        elif kind == "bn":
            modules.append(nn.BatchNorm1d(args[0]))
        elif kind == "relu":
            modules.append(nn.ReLU())
        else:
            raise ValueError(f"unknown projector module {kind!r}")
    if not any(isinstance(m, nn.ReLU) for m in modules):
        raise ValueError("a projector needs a ReLU: head.0 is its hidden activation")
    return nn.Sequential(*modules)


class Network(nn.Module):
    """Encoder plus its head: the projector, the classifier, or none (`head`, see
    layers.head_layer_names). A network made for 3 channels repeats grey images' one channel.
    `stem_relu` False: no ReLU between the stem's BatchNorm and layer1, as in lightly's CIFAR
    benchmark backbone (ResNetGenerator's children in an nn.Sequential leave out its
    functional ReLU); every other network has it."""

    def __init__(
        self,
        head: str,
        spec: ModelSpec,
        in_channels: int,
        image_size: int,
        out: int | None,
        projector: list[list] | None = None,
        stem_relu: bool = True,
    ):
        super().__init__()
        head = HEADS.get(head, head)  # a trained method's name stands for its head
        self.head_kind = head
        self.arch = spec.arch
        net_channels = spec.in_channels or in_channels
        if net_channels != in_channels and not (in_channels == 1 and net_channels == 3):
            raise ValueError(
                f"the network takes {net_channels} input channels, the images have {in_channels}"
            )
        self.repeat_channels = net_channels if net_channels != in_channels else 0
        self.encoder = Encoder(
            spec.arch,
            spec.width,
            net_channels,
            image_size,
            spec.stem,
            spec.stem_padding,
            stem_relu,
        )
        dim = self.encoder.feature_dim
        if head == "projector":
            # an imported projector's layout comes from its checkpoint (out unknown before)
            self.projector = projector or projector_layout(dim, out or dim)
            self.head: nn.Module = build_projector(self.projector)
        elif head == "classifier":
            self.head = nn.Linear(dim, out or dim)
        else:
            self.head = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.repeat_channels:
            x = x.expand(-1, self.repeat_channels, -1, -1)
        return self.head(self.encoder(x))

    def registry(self) -> list[Layer]:
        return layer_registry(self.arch, self.head_kind)

    def hook_points(self) -> dict[str, tuple[nn.Module, str]]:
        return _hook_points(self)


def build_module(builder: str, kwargs: dict | None = None) -> nn.Module:
    """`package.module:function` called with `kwargs`: the network of an import of format
    module."""
    import importlib

    module_name, _, function = builder.partition(":")
    try:
        target = importlib.import_module(module_name)
        for part in function.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"builder {builder!r} cannot be found ({err})") from None
    net = target(**(kwargs or {}))
    if not isinstance(net, nn.Module):
        raise ValueError(f"builder {builder!r} returned a {type(net).__name__}, not a module")
    return net


def module_layer_names(net: nn.Module, patterns: tuple[str, ...]) -> list[str]:
    """The names in `named_modules()` (in its order) that match one of the glob patterns."""
    names = [n for n, _ in net.named_modules() if n and any(fnmatch(n, p) for p in patterns)]
    if not names:
        raise ValueError(f"module.layers.names {list(patterns)} match none of its modules")
    return names


class ModuleNetwork(nn.Module):
    """Any network (import format module), its chosen modules' outputs as its layers, named by
    their path in `named_modules()`; the kind of each is "module"."""

    def __init__(self, net: nn.Module, patterns: tuple[str, ...], data_channels: int):
        super().__init__()
        self.net = net
        self.layer_names = module_layer_names(net, patterns)
        first = next((m for m in net.modules() if isinstance(m, nn.Conv2d)), None)
        self.in_channels = first.in_channels if first is not None else data_channels
        if self.in_channels != data_channels and not (data_channels == 1 and self.in_channels == 3):
            raise ValueError(
                f"the network takes {self.in_channels} input channels, the images have "
                f"{data_channels}"
            )
        # grey images into a 3-channel network: the channel repeated
        self.repeat_channels = self.in_channels if self.in_channels != data_channels else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.repeat_channels:
            x = x.expand(-1, self.repeat_channels, -1, -1)
        return self.net(x)

    def registry(self) -> list[Layer]:
        return module_registry(self.layer_names)

    def hook_points(self) -> dict[str, tuple[nn.Module, str]]:
        modules = dict(self.net.named_modules())
        return {name: (modules[name], "output") for name in self.layer_names}


def _hook_points(net: Network) -> dict[str, tuple[nn.Module, str]]:
    """Registered layer name -> (module, 'output' | 'input') whose tensor *is* that layer.

    Hooks sit on modules called exactly once per forward: torchvision's blocks reuse one
    in-place ReLU, so `.relu1`/`.relu2` are the inputs of the next conv, and `.residual` is the
    last BatchNorm's output (copied before the in-place `out += identity`).
    """
    enc = net.encoder
    points: dict[str, tuple[nn.Module, str]] = {"stem": (enc.maxpool, "output")}
    for stage in range(1, 5):
        for b, block in enumerate(getattr(enc, f"layer{stage}")):
            prefix = f"layer{stage}.{b}"
            points[f"{prefix}.relu1"] = (block.conv2, "input")
            if isinstance(block, Bottleneck):
                points[f"{prefix}.relu2"] = (block.conv3, "input")
                points[f"{prefix}.residual"] = (block.bn3, "output")
            else:
                points[f"{prefix}.residual"] = (block.bn2, "output")
            points[f"{prefix}.out"] = (block, "output")
    points["pool"] = (enc.avgpool, "output")
    heads = head_layer_names(net.head_kind)
    if net.head_kind == "projector":
        hidden = next(m for m in net.head if isinstance(m, nn.ReLU))
        points[heads[0]] = (hidden, "output")
        points[heads[1]] = (net.head[-1], "output")
    elif net.head_kind == "classifier":
        points[heads[0]] = (net.head, "output")
    return points


@contextlib.contextmanager
def record_layers(
    net: Network, names: list[str] | None = None, sink=None, pooled: bool = False
) -> Iterator[dict[str, torch.Tensor]]:
    """Within the context, each forward pass fills the yielded dict with a detached copy of every
    requested layer, flattened to (batch, features); `pooled` averages feature maps over space
    first (batch, channels). With `sink(name, tensor)`, each layer's tensor goes to the sink
    instead, which must copy what it keeps before returning (the tensor may be modified in
    place afterwards). A module called twice in one forward pass (a reused one) is refused:
    which call would be the layer?"""
    points = net.hook_points()
    wanted = [layer.name for layer in net.registry()] if names is None else names
    unknown = sorted(set(wanted) - set(points))
    if unknown:
        raise KeyError(f"unknown layers {unknown}; the registry has {list(points)}")
    captured: dict[str, torch.Tensor] = {}
    seen: set[str] = set()  # layers recorded during the current forward pass of `net`
    running = [False]

    def start(module, args) -> None:
        seen.clear()
        running[0] = True

    def stop(module, args, out) -> None:
        running[0] = False

    handles = [net.register_forward_pre_hook(start), net.register_forward_hook(stop)]

    def keep(name: str, tensor: torch.Tensor) -> None:
        if running[0] and name in seen:
            raise ValueError(
                f"layer {name} is computed more than once per forward pass (a module used "
                "twice): choose modules that run once, e.g. not a shared activation"
            )
        seen.add(name)
        if pooled and tensor.ndim == 4:
            tensor = tensor.mean(dim=(2, 3))
        if sink is not None:
            sink(name, tensor.detach().flatten(1))
        else:
            captured[name] = tensor.detach().flatten(1).clone()

    for name in wanted:
        module, where = points[name]
        if where == "input":
            handles.append(
                module.register_forward_pre_hook(lambda m, args, n=name: keep(n, args[0]))
            )
        else:
            handles.append(module.register_forward_hook(lambda m, a, out, n=name: keep(n, out)))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def forward_settings(
    precision: str, channels_last: bool | str, dev: torch.device
) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, channels-last?) of a forward pass on `dev`.

    `precision` auto = bf16 on a GPU and fp32 on the CPU (where runs are also deterministic);
    fp32, bf16 and fp16 named explicitly hold on any device, so the GPU's mixed-precision path
    can be rehearsed on the CPU. `channels_last` auto = on a GPU only; True = on any device.
    """
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"precision {precision!r} is not one of auto, fp32, bf16, fp16")
    if channels_last not in ("auto", True, False):
        raise ValueError(f"channels_last {channels_last!r} is not one of auto, true, false")
    gpu = dev.type == "cuda"
    if precision == "auto":
        precision = "bf16" if gpu else "fp32"
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return amp, gpu if channels_last == "auto" else bool(channels_last)


# -- building and loading networks ---------------------------------------------------------


def build_network(run: RunSpec, data_attrs: dict, meta: dict | None = None) -> nn.Module:
    """The run's network for the data (untrained); `meta` (a model.pt's) gives an imported
    network's head size, projector layout and whether its stem has a ReLU."""
    channels, size, _ = run.fed_shape(data_attrs["image_shape"])
    meta = meta or {}
    source = run.imported
    if source is not None and source.format == "module":
        return ModuleNetwork(build_module(source.builder, source.kwargs), source.layers, channels)
    out = meta.get("head_outputs") or run.head_outputs(data_attrs["num_classes"])
    projector, stem_relu = meta.get("projector"), meta.get("stem_relu", True)
    return Network(run.head, run.model, channels, size, out, projector, stem_relu)


def initial_network(run: RunSpec, data_attrs: dict, meta: dict | None = None) -> Network:
    """The run's network as training starts (seeded): also the untrained probe baseline."""
    torch.manual_seed(init_seed(run))
    return build_network(run, data_attrs, meta)


def init_seed(run: RunSpec) -> int:
    """The torch seed of the run's initial weights (`model.init` in the config)."""
    if run.imported is not None:  # the untrained baseline of an imported network: its name
        name = int.from_bytes(hashlib.sha256(run.imported.name.encode()).digest()[:8], "little")
        return hash_seed(name, 0xC0FFEE)
    if run.model.init == "shared":
        return hash_seed(0, 0xC0FFEE)
    if run.model.init == "seed-and-method":
        method = sum(ord(c) << (8 * i) for i, c in enumerate(run.method[:7]))
        return hash_seed(run.seed, method, 0xC0FFEE)
    return hash_seed(run.seed, 0xC0FFEE)


def load_network(model_path: str | Path) -> tuple[Network, dict]:
    """Rebuild a trained or imported network from `model.pt`, in eval mode."""
    state = checkpoint.load(Path(model_path))
    meta = state.get("meta")
    if not meta or "run_spec" not in meta:
        raise CheckpointError(
            f"{model_path}: a training checkpoint or foreign file, not a finished model.pt "
            "(it has no run metadata); rerun the train stage"
        )
    run = run_spec_from_dict(meta["run_spec"])
    net = build_network(run, meta["data_attrs"], meta)
    net.load_state_dict(state["model"])
    return net.eval(), meta
