"""Networks trained elsewhere, as ckaflow runs: a checkpoint becomes the run's `model.pt`.

Formats (config `imports[].format`), each a ResNet whose encoder keys are torchvision's:
- `torchvision`, `timm`: a ResNet's `state_dict()` (`conv1.weight`, ..., `fc.*` the classifier).
- `lightly`: its SimCLR example's module, `backbone` (torchvision's children in an
  `nn.Sequential`: `backbone.0` conv1, `.1` bn1, `.4`-`.7` layer1-4; its benchmarks' CIFAR
  ResNetGenerator's children: `.2`-`.5` layer1-4, no ReLU after the stem, `shortcut` for
  `downsample`; or the ResNet itself, a ResNetGenerator's `linear` its classifier) and
  `projection_head.layers.*`; `online_classifier.classification_head.*` is its classifier;
  BYOL's, MoCo's and SimSiam's momentum copies and prediction head are left out; a
  SplitBatchNorm's per-split statistics (MoCo's `num_splits`) become their mean, as in eval.
- `solo-learn`: its Lightning checkpoint's `state_dict`, `backbone.*` (`encoder.*` before 2022),
  `projector.*` and the online linear `classifier.*`.
- `ckaflow`: a `model.pt` of another study (`encoder.*`, `head.*`).
- `module`: any network, built by `module.builder` ("package.module:function" with `kwargs`),
  the file its `state_dict`; its layers are the modules `module.layers.names` match.
Containers are unwrapped (`state_dict` of Lightning and timm's train.py, `model` of ckaflow) and
`module.` / `_orig_mod.` prefixes (DataParallel, torch.compile) removed.

Loading is strict: every encoder key the network has must be there with its shape, and no key
may be left that is not a known head or the format's training-only state (solo-learn's momentum
encoder, lightly's online classifier when not asked for); the first mismatching keys are named.
Files are read with `weights_only=True`: one that holds code is refused, never run.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from ckaflow import checkpoint
from ckaflow.config import RunSpec, stable_hash, to_jsonable
from ckaflow.data import open_prepared
from ckaflow.errors import CheckpointError
from ckaflow.models import ModuleNetwork, Network, build_module, record_layers
from ckaflow.provenance import atomic_path, provenance

PREFIXES = ("module.", "_orig_mod.")
LAYERS = ("layer1", "layer2", "layer3", "layer4")
# lightly backbones as an nn.Sequential of a ResNet's children: torchvision's (conv1, bn1,
# relu, maxpool, layer1-4) or its own CIFAR ResNetGenerator's (conv1, bn1, layer1-4: the
# stem's ReLU is functional in its forward, so the Sequential has none)
TORCHVISION_CHILDREN = dict(zip("014567", ("conv1", "bn1", *LAYERS), strict=True))
GENERATOR_CHILDREN = dict(zip("012345", ("conv1", "bn1", *LAYERS), strict=True))
# per format: key prefix -> part (encoder | projector | classifier | ignored); first match wins
PARTS = {
    "torchvision": (("fc.", "classifier"), ("", "encoder")),
    "timm": (("fc.", "classifier"), ("", "encoder")),
    "lightly": (
        ("backbone.linear.", "classifier"),  # a ResNetGenerator kept whole: its classifier
        ("backbone_momentum.", "ignored"),  # BYOL's and MoCo's momentum copies
        ("projection_head_momentum.", "ignored"),
        ("prediction_head.", "ignored"),  # BYOL's and SimSiam's predictor (after the projector)
        ("backbone.", "encoder"),
        ("projection_head.layers.", "projector"),
        ("online_classifier.classification_head.", "classifier"),
    ),
    "solo-learn": (
        ("backbone.", "encoder"),
        ("encoder.", "encoder"),
        ("projector.", "projector"),
        ("classifier.", "classifier"),
        ("momentum_", "ignored"),  # momentum methods' second encoder and projector
    ),
    "ckaflow": (("encoder.", "encoder"), ("head.", "head")),
}


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint, unwrapped from its container, without wrapper prefixes."""
    return read_checkpoint(path)[0]


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors of a checkpoint, unwrapped from its container, without wrapper prefixes;
    and the metadata a ckaflow model.pt carries beside them ({} for other files)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    state = checkpoint.read_state(path)
    meta = state.get("meta") if isinstance(state, dict) else None
    meta = meta if isinstance(meta, dict) else {}
    for container in ("state_dict", "model"):  # Lightning / timm train.py, ckaflow
        if isinstance(state, dict) and isinstance(state.get(container), dict):
            state = state[container]
            break
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{path}: not a state_dict (a mapping of names to tensors)")
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"{path}: not a state_dict: {not_tensors[:5]} are not tensors")
    out = {}
    for key, value in state.items():
        for prefix in PREFIXES:
            key = key.removeprefix(prefix)
        out[key] = value
    return out, meta


def split_parts(weights: dict[str, torch.Tensor], fmt: str, path: Path) -> dict[str, dict]:
    """The checkpoint's keys by part (encoder, projector, classifier, ignored), each without
    its prefix; encoder keys in torchvision's names."""
    if fmt not in PARTS:
        raise CheckpointError(f"{path}: unknown format {fmt!r}; expected one of {sorted(PARTS)}")
    parts: dict[str, dict] = {"encoder": {}, "projector": {}, "classifier": {}, "ignored": {}}
    generator = fmt == "lightly" and lightly_generator_sequential(weights)
    children = GENERATOR_CHILDREN if generator else TORCHVISION_CHILDREN
    for key, value in weights.items():
        prefix, part = next(((p, part) for p, part in PARTS[fmt] if key.startswith(p)), ("", ""))
        if not part:
            raise CheckpointError(
                f"{path}: key {key!r} is not part of a {fmt} ResNet (expected keys under "
                f"{[p for p, _ in PARTS[fmt]]}); is the format right?"
            )
        name = key[len(prefix) :]
        if part == "head":  # ckaflow's own: a projector has a BatchNorm, a classifier not
            part = "projector" if any(k.startswith("head.1.") for k in weights) else "classifier"
        if fmt == "lightly" and part == "encoder":
            name = _lightly_encoder_key(name, children)
        if name in parts[part] and part != "ignored":
            raise CheckpointError(
                f"{path}: two {part}s: {key!r} and another key both give {part} {name!r}; "
                "keep one of them in the file"
            )
        parts[part][name] = value
    if not parts["encoder"]:
        raise CheckpointError(f"{path}: no encoder keys for format {fmt!r}; is the format right?")
    if fmt == "lightly":
        parts["encoder"] = merge_split_batchnorm(parts["encoder"])
    return parts


def merge_split_batchnorm(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """lightly's SplitBatchNorm (MoCo's simulated multi-GPU BatchNorm, `num_splits` k) keeps
    k running statistics per channel; in eval mode it uses their mean, so that is what a
    BatchNorm gets here."""
    out = dict(weights)
    for key, value in weights.items():
        module, _, stat = key.rpartition(".")
        channels = weights.get(f"{module}.weight")
        if stat not in ("running_mean", "running_var") or channels is None:
            continue
        splits, rest = divmod(value.numel(), channels.numel())
        if splits > 1 and not rest:
            out[key] = value.view(splits, channels.numel()).mean(dim=0)
    return out


def stem_has_relu(fmt: str, weights: dict[str, torch.Tensor], meta: dict) -> bool:
    """Whether the network's stem ends in a ReLU: not in lightly's CIFAR benchmark backbone,
    nor in a ckaflow model.pt imported from one (its metadata says); in every other."""
    if fmt == "lightly":
        return not lightly_generator_sequential(weights)
    if fmt == "ckaflow":
        return meta.get("stem_relu", True)
    return True


def lightly_generator_sequential(weights: dict[str, torch.Tensor]) -> bool:
    """A lightly backbone made of ResNetGenerator's children: parameters at index 2 (layer1;
    torchvision's children have a parameterless ReLU there)."""
    return any(k.startswith("backbone.2.") for k in weights)


def _lightly_encoder_key(name: str, children: dict[str, str]) -> str:
    """A lightly backbone key in torchvision's names (ResNetGenerator calls the projection
    shortcut what torchvision calls downsample)."""
    first, _, rest = name.partition(".")
    if first in children:
        name = f"{children[first]}.{rest}"
    return name.replace(".shortcut.", ".downsample.")


def projector_layout_of(weights: dict[str, torch.Tensor], path: Path) -> list[list]:
    """The projector's modules from its keys (by index): a BatchNorm where running statistics
    are, a Linear where a 2-D weight is, a ReLU where an index has no parameters."""
    indices = sorted({int(k.split(".")[0]) for k in weights if k.split(".")[0].isdigit()})
    if not indices or len(indices) != len({k.split(".")[0] for k in weights}):
        raise CheckpointError(f"{path}: projector keys {sorted(weights)[:5]} are not indexed")
    layout: list[list] = []
    for i in range(indices[-1] + 1):
        weight = weights.get(f"{i}.weight")
        if f"{i}.running_mean" in weights:
            layout.append(["bn", int(weights[f"{i}.running_mean"].shape[0])])
        elif weight is not None and weight.ndim == 2:
            out_dim, in_dim = weight.shape
            layout.append(["linear", int(in_dim), int(out_dim), f"{i}.bias" in weights])
        elif weight is None and not any(k.startswith(f"{i}.") for k in weights):
            layout.append(["relu"])
        else:
            raise CheckpointError(f"{path}: projector module {i} is neither Linear nor BatchNorm")
    return layout


def _strict(net_state: dict, loaded: dict[str, torch.Tensor], path: Path, what: str) -> None:
    missing = [k for k in net_state if k not in loaded]
    unexpected = [k for k in loaded if k not in net_state]
    shapes = [
        f"{k}: file {tuple(loaded[k].shape)}, network {tuple(net_state[k].shape)}"
        for k in net_state
        if k in loaded and loaded[k].shape != net_state[k].shape
    ]
    if missing or unexpected or shapes:
        problems = []
        if missing:
            problems.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            problems.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if shapes:
            problems.append(f"shape mismatches {shapes[:3]}")
        raise CheckpointError(f"{path}: does not fit {what}: " + "; ".join(problems))


def import_network(run: RunSpec, data_attrs: dict) -> tuple[Network, dict]:
    """The imported run's network with the checkpoint's weights, and what the model.pt's
    metadata needs to rebuild it (head size, projector layout, input channels)."""
    source = run.imported
    path = Path(source.checkpoint)
    if source.format == "module":
        return _import_module(run, data_attrs, path)
    weights, meta = read_checkpoint(path)
    parts = split_parts(weights, source.format, path)
    encoder = parts["encoder"]
    conv1 = _stem_conv1(encoder, source.format, run.model.stem, path)
    model = replace(run.model, in_channels=int(conv1.shape[1]))
    run = replace(run, model=model)
    head = run.head
    wanted, extra = _head_weights(parts, head, path)
    extra["stem_relu"] = stem_has_relu(source.format, weights, meta)
    channels, size, _ = run.fed_shape(data_attrs["image_shape"])
    try:
        net = Network(
            head,
            model,
            channels,
            size,
            extra.get("head_outputs"),
            extra.get("projector"),
            extra["stem_relu"],
        )
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from None
    what = f"a {model.arch} of width {model.width} ({model.stem} stem)"
    _strict(net.encoder.state_dict(), encoder, path, what)
    net.encoder.load_state_dict(encoder)
    if head != "encoder":
        _strict(net.head.state_dict(), wanted, path, f"its {head}")
        net.head.load_state_dict(wanted)
    extra["in_channels"] = model.in_channels
    extra["dropped"] = sorted(
        part for part in ("projector", "classifier", "ignored") if part != head and parts[part]
    )
    return net.eval(), {"run": run, **extra}


def _stem_conv1(encoder: dict[str, torch.Tensor], fmt: str, stem: str, path: Path) -> torch.Tensor:
    """The encoder's conv1 weight, checked: no deep stem, and the configured stem's kernel."""
    conv1 = encoder.get("conv1.weight")
    if "conv1.0.weight" in encoder:
        how = (
            'import it with format: module, module: {builder: "timm:create_model", kwargs: '
            '{model_name: ..., num_classes: ...}, layers: {names: ["layer?.?", "layer?.??", '
            '"global_pool"]}}'
            if fmt == "timm"
            else "import the network with format: module and its builder"
        )
        raise CheckpointError(
            f"{path}: a deep stem (conv1.0, conv1.3, conv1.6, as in timm's resnet*c/d/s), "
            f"which torchvision's ResNet does not have; {how}"
        )
    if conv1 is None or conv1.ndim != 4:
        raise CheckpointError(f"{path}: no conv1.weight among the encoder keys")
    found = "imagenet" if conv1.shape[-1] == 7 else "cifar"
    if found != stem:
        raise CheckpointError(
            f"{path}: conv1 is {conv1.shape[-2]}x{conv1.shape[-1]}, the {found} stem, but the "
            f"config says stem: {stem}"
        )
    return conv1


def _head_weights(parts: dict[str, dict], head: str, path: Path) -> tuple[dict, dict]:
    """The asked-for head's weights ({} for encoder) and the metadata that rebuilds it."""
    extra: dict = {}
    wanted = {} if head == "encoder" else parts[head]
    if head != "encoder" and not wanted:
        found = [p for p in ("projector", "classifier") if parts[p]] or ["none"]
        raise CheckpointError(f"{path}: has no {head} (heads found: {found}); set head")
    if head == "projector":
        extra["projector"] = projector_layout_of(wanted, path)
    if head == "classifier":
        extra["head_outputs"] = int(wanted["weight"].shape[0])
    return wanted, extra


def _import_module(run: RunSpec, data_attrs: dict, path: Path) -> tuple[nn.Module, dict]:
    """Format module: the builder's network, the file its state_dict, loaded strictly."""
    source = run.imported
    weights = read_weights(path)
    try:
        net = build_module(source.builder, source.kwargs)
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from None
    _strict(net.state_dict(), weights, path, f"the network of {source.builder}")
    net.load_state_dict(weights)
    try:
        wrapped = ModuleNetwork(net, source.layers, data_attrs["image_shape"][0])
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from None
    # one forward pass of two blank images: every chosen module must run exactly once
    channels, size, _ = run.fed_shape(data_attrs["image_shape"])
    try:
        with torch.no_grad(), record_layers(wrapped.eval()):
            wrapped(torch.zeros(2, channels, size, size))
    except (ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: {err}") from None
    run = replace(run, model=replace(run.model, in_channels=wrapped.in_channels))
    return wrapped.eval(), {"run": run, "in_channels": wrapped.in_channels, "dropped": []}


def import_run(run: RunSpec, data_path: str | Path, out: str | Path, log=print) -> Path:
    """Write the imported run's `model.pt`: weights, the metadata every later stage reads,
    the source file's format and SHA-256."""
    data = open_prepared(data_path)
    attrs = data.attrs
    net, extra = import_network(run, attrs)
    run = extra["run"]
    path = Path(run.imported.checkpoint)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    run_spec = to_jsonable(run)
    meta = provenance(
        kind="ckaflow.model",
        run=run.run_id,
        run_spec=run_spec,
        spec_hash=stable_hash([run_spec, digest]),
        data_spec_hash=attrs["spec_hash"],
        data_attrs={k: attrs[k] for k in ("dataset", "image_shape", "num_classes", "mean", "std")},
        head_outputs=extra.get("head_outputs"),
        projector=extra.get("projector"),
        stem_relu=extra.get("stem_relu", True),
        imported={
            "format": run.imported.format,
            "checkpoint": str(path),
            "sha256": digest,
            "dropped": extra["dropped"],
        },
        epochs=None,
        knn_accuracy=None,
        device="cpu",
        processes=1,
    )
    out = Path(out)
    state = {"model": {k: v.cpu() for k, v in net.state_dict().items()}, "meta": meta}
    with atomic_path(out) as scratch:
        torch.save(state, scratch)
    layers = len(net.registry())
    log(f"{run.run_id}: {run.imported.format} {path} -> {out} ({layers} layers, {digest[:12]})")
    return out
