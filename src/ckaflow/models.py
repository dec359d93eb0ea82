"""ResNets built from torchvision's blocks, and hooks that record every registered layer.

The CIFAR stem (3x3 conv, stride 1, no max-pool) is used for inputs up to 64 px, as in SimCLR's
CIFAR experiments. `width` is the channel count of the first stage (64 = standard ResNet).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from ckaflow.augment import hash_seed
from ckaflow.config import ModelSpec, RunSpec
from ckaflow.errors import CheckpointError
from ckaflow.layers import ARCHS, CIFAR_STEM_MAX_SIZE, Layer, head_layer_names, layer_registry
from ckaflow.train import checkpoint


class Encoder(ResNet):
    """torchvision's ResNet with a width multiplier, 1- or 3-channel input and the CIFAR stem;
    `fc` is an identity, so the output is the pooled feature vector."""

    def __init__(self, arch: str, width: int, in_channels: int, image_size: int):
        nn.Module.__init__(self)
        block_type, blocks = ARCHS[arch]
        block = BasicBlock if block_type == "basic" else Bottleneck
        self._norm_layer = nn.BatchNorm2d
        self.inplanes = width
        self.dilation = 1
        self.groups = 1
        self.base_width = 64  # torchvision's Bottleneck scales inner width by base_width / 64
        if image_size <= CIFAR_STEM_MAX_SIZE:
            self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
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


def projection_head(in_dim: int, out_dim: int) -> nn.Sequential:
    """SimCLR v1 projector: Linear -> BN -> ReLU -> Linear. Registry: head.0 (hidden), head.1."""
    return nn.Sequential(
        nn.Linear(in_dim, in_dim, bias=False),
        nn.BatchNorm1d(in_dim),
        nn.ReLU(),
        nn.Linear(in_dim, out_dim),
    )


class Network(nn.Module):
    """Encoder plus the method's head (projector or classifier)."""

    def __init__(self, method: str, spec: ModelSpec, in_channels: int, image_size: int, out: int):
        super().__init__()
        self.method = method
        self.arch = spec.arch
        self.encoder = Encoder(spec.arch, spec.width, in_channels, image_size)
        if method == "simclr":
            self.head: nn.Module = projection_head(self.encoder.feature_dim, out)
        else:
            self.head = nn.Linear(self.encoder.feature_dim, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))

    def registry(self) -> list[Layer]:
        return layer_registry(self.arch, self.method)


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
    heads = head_layer_names(net.method)
    if net.method == "simclr":
        points[heads[0]] = (net.head[2], "output")
        points[heads[1]] = (net.head[3], "output")
    else:
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
    place afterwards)."""
    points = _hook_points(net)
    wanted = [layer.name for layer in net.registry()] if names is None else names
    unknown = sorted(set(wanted) - set(points))
    if unknown:
        raise KeyError(f"unknown layers {unknown}; the registry has {list(points)}")
    captured: dict[str, torch.Tensor] = {}
    handles = []

    def keep(name: str, tensor: torch.Tensor) -> None:
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


def resolve_device(device: str) -> torch.device:
    """`auto` = the GPU when there is one. With several processes per node (LOCAL_RANK set by
    torchrun or SLURM), each takes its own GPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device: cuda was requested but no CUDA GPU is visible")
        index = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device(device)


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


def build_network(method: str, spec: ModelSpec, data_attrs: dict, head_outputs: int) -> Network:
    channels, size, _ = data_attrs["image_shape"]
    return Network(method, spec, channels, size, head_outputs)


def initial_network(run: RunSpec, data_attrs: dict) -> Network:
    """The run's network as training starts (seeded): also the untrained probe baseline."""
    torch.manual_seed(init_seed(run))
    return build_network(
        run.method, run.model, data_attrs, run.head_outputs(data_attrs["num_classes"])
    )


def init_seed(run: RunSpec) -> int:
    """The torch seed of the run's initial weights (`model.init` in the config)."""
    if run.model.init == "shared":
        return hash_seed(0, 0xC0FFEE)
    if run.model.init == "seed-and-method":
        method = sum(ord(c) << (8 * i) for i, c in enumerate(run.method[:7]))
        return hash_seed(run.seed, method, 0xC0FFEE)
    return hash_seed(run.seed, 0xC0FFEE)


def load_network(model_path: str | Path) -> tuple[Network, dict]:
    """Rebuild a trained network from `model.pt`, in eval mode."""
    state = checkpoint.load(Path(model_path))
    meta = state.get("meta")
    if not meta or "run_spec" not in meta:
        raise CheckpointError(
            f"{model_path}: a training checkpoint or foreign file, not a finished model.pt "
            "(it has no run metadata); rerun the train stage"
        )
    run = meta["run_spec"]
    net = build_network(
        run["method"], ModelSpec(**run["model"]), meta["data_attrs"], meta["head_outputs"]
    )
    net.load_state_dict(state["model"])
    return net.eval(), meta
