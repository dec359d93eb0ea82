"""The layer registry: stable names, kinds and order of every recorded layer, without torch.

Names (also in the README's Layers section). For residual block `layer<s>.<b>`:
  `.relu1`, `.relu2`  block-interior, after each inner ReLU (basic blocks have only `.relu1`)
  `.residual`         the residual branch just before the addition (the paper's "odd" layers)
  `.out`              after the addition and the ReLU (the paper's "even", post-residual layers)
plus `stem`, `pool` (global average pool) and the heads: `head.<i>` for the SimCLR projector,
`fc` for the supervised classifier. The order is the order of the forward pass.
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass

from ckaflow.config import HEADS

# arch -> (block type, blocks per stage)
ARCHS: dict[str, tuple[str, tuple[int, ...]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
}

CIFAR_STEM_MAX_SIZE = 64  # inputs up to this size get the 3x3 stride-1 stem without max-pool
HEAD_STAGE = len(next(iter(ARCHS.values()))[1]) + 1  # pool and heads sit after the last stage


@dataclass(frozen=True)
class Layer:
    name: str
    kind: str  # stem | relu1 | relu2 | residual | out | pool | head | fc
    stage: int  # 0 for the stem, 1.. for residual stages, HEAD_STAGE for pool and heads
    block: int  # block index inside its stage, -1 where there is none
    index: int  # position in forward order

    def as_dict(self) -> dict:
        return asdict(self)


def block_layer_kinds(block_type: str) -> tuple[str, ...]:
    if block_type == "basic":
        return ("relu1", "residual", "out")
    return ("relu1", "relu2", "residual", "out")


def head_layer_names(head: str) -> list[str]:
    """The layers after the pooled features: the projector's hidden activation and output
    (SimCLR's), the classifier, or none (an imported encoder)."""
    names = {"projector": ["head.0", "head.1"], "classifier": ["fc"], "encoder": []}
    head = HEADS.get(head, head)  # a trained method's name stands for its head
    if head not in names:
        raise ValueError(f"unknown head {head!r}; expected one of {sorted(names)}")
    return names[head]


def layer_registry(arch: str, head: str) -> list[Layer]:
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {sorted(ARCHS)}")
    block_type, blocks = ARCHS[arch]
    entries: list[tuple[str, str, int, int]] = [("stem", "stem", 0, -1)]
    for stage, n_blocks in enumerate(blocks, start=1):
        for block in range(n_blocks):
            for kind in block_layer_kinds(block_type):
                entries.append((f"layer{stage}.{block}.{kind}", kind, stage, block))
    entries.append(("pool", "pool", HEAD_STAGE, -1))
    for name in head_layer_names(head):
        entries.append((name, name.split(".")[0], HEAD_STAGE, -1))
    return [Layer(n, k, s, b, i) for i, (n, k, s, b) in enumerate(entries)]


def module_registry(names: list[str]) -> list[Layer]:
    """The layers of an imported module (format module): its chosen modules, kind "module"."""
    return [Layer(name, "module", 1, -1, i) for i, name in enumerate(names)]


def label_layer() -> Layer:
    """The one-hot labels, compared like any layer (class structure)."""
    return Layer("labels", "labels", -1, -1, 0)


def select_layers(
    layers: list[Layer], kinds: list[str] | None = None, names: list[str] | None = None
) -> list[Layer]:
    """The layers whose kind is in `kinds` and whose name matches one of the glob `names`
    (None: no restriction), in forward order; an empty result is an error."""
    chosen = [
        layer
        for layer in layers
        if (kinds is None or layer.kind in kinds)
        and (names is None or any(fnmatch.fnmatchcase(layer.name, p) for p in names))
    ]
    if not chosen:
        raise ValueError(
            f"the layer selection kinds={kinds} names={names} matches none of "
            f"{[layer.name for layer in layers]}"
        )
    return chosen


def _down(size: int) -> int:
    """Spatial size after a stride-2 convolution or pooling with 'same' padding."""
    return (size + 1) // 2


def stem_size(image_size: int, stem: str = "auto", padding: int = 1) -> int:
    """Spatial size after the stem: the CIFAR stem (3x3, stride 1) keeps it (padding 2 adds
    2), the ImageNet stem (7x7 stride 2, then max-pool) quarters it; auto picks by size."""
    if stem == "auto":
        stem = "cifar" if image_size <= CIFAR_STEM_MAX_SIZE else "imagenet"
    if stem == "cifar":
        return image_size + 2 * padding - 2
    return _down(_down(image_size))


def layer_features(
    arch: str,
    width: int,
    image_size: int,
    head: str,
    head_outputs: int | None,
    stem: str = "auto",
    stem_padding: int = 1,
) -> dict[str, int]:
    """Values per example of every registered layer, without building the network (so that
    `ckaflow plan` sizes a study in a moment). Mirrors ckaflow.models: the stem of `stem_size`,
    stride 2 in the first block of stages 2-4 (in the 3x3 conv of a bottleneck, so its relu1
    keeps the input size); a test checks it against the network. An imported projector's
    output size is unknown here (head_outputs None): the feature size stands in."""
    block_type, blocks = ARCHS[arch]
    expansion = 1 if block_type == "basic" else 4
    size = stem_size(image_size, stem, stem_padding)
    out = {"stem": width * size * size}
    for stage, n_blocks in enumerate(blocks, start=1):
        planes = width * 2 ** (stage - 1)
        for block in range(n_blocks):
            size_in = size
            if stage > 1 and block == 0:
                size = _down(size)
            prefix = f"layer{stage}.{block}"
            if block_type == "basic":
                out[f"{prefix}.relu1"] = planes * size * size
            else:
                out[f"{prefix}.relu1"] = planes * size_in * size_in
                out[f"{prefix}.relu2"] = planes * size * size
            out[f"{prefix}.residual"] = out[f"{prefix}.out"] = expansion * planes * size * size
    feature_dim = 8 * width * expansion
    out["pool"] = feature_dim
    head = HEADS.get(head, head)
    heads = head_layer_names(head)
    outputs = head_outputs if head_outputs is not None else feature_dim
    if head == "projector":
        out[heads[0]], out[heads[1]] = feature_dim, outputs
    elif head == "classifier":
        out[heads[0]] = outputs
    return out
