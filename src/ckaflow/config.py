"""The study configuration: schema validation with defaults, then frozen dataclasses.

The schema (`schema/config.schema.yaml`) is the single source of truth for keys, types, ranges
and defaults; Snakemake validates against the same file before any job runs.
"""

from __future__ import annotations

import copy
import difflib
import functools
import hashlib
import json
from dataclasses import dataclass, field, fields, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from ckaflow.errors import ConfigError

VIEWS = ("clean", "aug1", "aug2")
# image shape (C, H, W) and class count of each data set, known before any data is read (an
# image folder's: see `dataset_shape`)
DATASET_SHAPES = {
    "fashion-mnist": ((1, 28, 28), 10),
    "cifar10": ((3, 32, 32), 10),
    "cifar100": ((3, 32, 32), 100),
    "svhn": ((3, 32, 32), 10),
    "stl10": ((3, 96, 96), 10),
}


def schema_path() -> Path:
    return Path(str(resources.files("ckaflow") / "schema" / "config.schema.yaml"))


@functools.cache
def _schema() -> dict[str, Any]:
    return yaml.safe_load(schema_path().read_text())


def load_schema() -> dict[str, Any]:
    return copy.deepcopy(_schema())


def schema_node(key: str) -> dict[str, Any]:
    """The schema of one config key, dotted ("cka.estimator", "slurm.train"); through arrays
    to their items."""
    node = _schema()
    for part in key.split("."):
        node = node["properties"][part]
    return node.get("items", node) if node.get("type") == "array" else node


def schema_enum(key: str) -> tuple:
    """The allowed values of a config key: the schema is the one list of every choice."""
    return tuple(schema_node(key)["enum"])


def schema_defaults(key: str) -> dict[str, Any]:
    """The defaults of an object-valued config key ("slurm"), nested ones filled in."""
    return validate({})[key]


def _validator_with_defaults(schema: dict[str, Any]) -> jsonschema.protocols.Validator:
    """A validator that fills in `default` values as it descends, nested objects included."""
    base = jsonschema.validators.validator_for(schema)
    validate_properties = base.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for key, sub in properties.items():
                if key not in instance and "default" in sub:
                    instance[key] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    cls = jsonschema.validators.extend(base, {"properties": set_defaults})
    return cls(schema)


def validate(raw: dict[str, Any] | None, source: str = "config") -> dict[str, Any]:
    """Validate a raw config mapping, fill defaults, and return the completed copy.

    Raises ConfigError naming the key, the value and what is allowed.
    """
    config = copy.deepcopy(raw or {})
    validator = _validator_with_defaults(load_schema())
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [line for err in errors for line in _explain(err)]
        raise ConfigError(f"{source} is not a valid ckaflow study:\n" + "\n".join(lines))
    return config


MESSAGE_CHARS = 160  # a schema error quotes the offending value: keep each line short


def _explain(err: jsonschema.ValidationError) -> list[str]:
    """One short line per problem: the dotted key, and for a key the schema does not know, the
    nearest one it does ("did you mean `bootstrap`?") and the keys allowed there."""
    at = ".".join(str(p) for p in err.absolute_path)
    if err.validator == "additionalProperties" and isinstance(err.instance, dict):
        known = sorted(err.schema.get("properties", {}))
        lines = []
        for key in sorted(set(err.instance) - set(known), key=str):
            where = f"{at}.{key}" if at else str(key)
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
            hint = f"did you mean `{close[0]}`? " if close else ""
            lines.append(f"  {where}: unknown key; {hint}(allowed: {', '.join(known)})")
        return lines
    if err.validator in ("oneOf", "anyOf") and err.context:
        # the alternative of the value's own type (string or mapping) says what is wrong
        by_alternative: dict[Any, list] = {}
        for sub in err.context:
            by_alternative.setdefault(sub.schema_path[0], []).append(sub)
        fitting = [
            subs
            for subs in by_alternative.values()
            if not any(list(sub.schema_path)[1:] == ["type"] for sub in subs)
        ]
        if fitting:
            return _explain(jsonschema.exceptions.best_match(fitting[0]))
    message = err.message
    if err.validator == "enum" and isinstance(err.instance, str):
        close = difflib.get_close_matches(err.instance, [str(v) for v in err.validator_value], 1)
        message += f"; did you mean `{close[0]}`?" if close else ""
    if len(message) > MESSAGE_CHARS:
        message = message[: MESSAGE_CHARS - 3] + "..."
    return [f"  {at or '(top level)'}: {message}"]


def load(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    return validate(raw, source=str(path))


def stable_hash(obj: Any) -> str:
    """Short hash of a JSON-serialisable object, independent of key order."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Typed, frozen views of the parts each stage needs.


@dataclass(frozen=True)
class DataSpec:
    name: str
    root: str
    train_size: int
    eval_size: int
    seed: int
    resolution: int | None = None  # image-folder: the stored images' side


@dataclass(frozen=True)
class AugmentSpec:
    crop_scale: tuple[float, float]
    flip_p: float
    jitter_strength: float
    jitter_p: float
    grayscale_p: float


# ImageNet's per-channel mean and std (torchvision's and timm's ResNet weights expect them)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# a spec field added after artifacts existed: left out of `to_jsonable` while unset, so every
# spec hash made before it stays what it was
OMIT_UNSET = {"omit_unset": True}


@dataclass(frozen=True)
class InputSpec:
    """How a run's network sees the study's images (config `input`): resized to `resolution`
    px (None: as stored) and normalised by the data set's statistics, ImageNet's, or `mean`
    and `std` given explicitly (`normalise` is then "explicit")."""

    resolution: int | None = None
    normalise: str = "dataset"  # dataset | imagenet | explicit
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


def input_spec(section: dict[str, Any] | None, where: str = "input") -> InputSpec | None:
    """The config's `input` section as a spec; None for the default (the data as stored,
    normalised by its own statistics), which every run had before `input` existed."""
    section = section or {}
    normalise = section.get("normalise", "dataset")
    if isinstance(normalise, dict):
        mean, std = tuple(normalise["mean"]), tuple(normalise["std"])
        if len(mean) != len(std):
            raise ConfigError(
                f"{where}.normalise: mean has {len(mean)} values and std {len(std)}; give one "
                "per channel"
            )
        spec = InputSpec(section.get("resolution"), "explicit", mean, std)
    else:
        spec = InputSpec(section.get("resolution"), normalise)
    return None if spec == InputSpec() else spec


def describe_input(spec: InputSpec | None, image_shape) -> str:
    """What a network is fed, for people: "224 px (stored 32 px), ImageNet's mean and std"."""
    spec = spec or InputSpec()
    stored = image_shape[1]
    size = f"{spec.resolution} px (stored {stored} px)" if spec.resolution else f"{stored} px"
    how = {
        "dataset": "the training subset's mean and std",
        "imagenet": "ImageNet's mean and std",
        "explicit": f"mean {list(spec.mean or ())}, std {list(spec.std or ())}",
    }[spec.normalise]
    return f"{size}, {how}"


@dataclass(frozen=True)
class ModelSpec:
    arch: str
    width: int
    init: str = "seed"  # where initial weights come from: see model.init in the schema
    # auto: the CIFAR stem (3x3 conv, stride 1, no max-pool) up to CIFAR_STEM_MAX_SIZE px, the
    # ImageNet stem (7x7 conv, stride 2, max-pool) above; imported networks name theirs
    stem: str = "auto"
    stem_padding: int = 1  # of the CIFAR stem's 3x3 conv (solo-learn's is 2)
    in_channels: int | None = None  # None: the data's; 3 on grey images repeats the channel


# the head of a trained run's network, by method; imported runs name theirs
HEADS = {"simclr": "projector", "supervised": "classifier"}
# the label of the supervised side in the paper's claims; every other method label is a
# self-supervised side (imported runs may carry any label: byol, dino, ...)
SUPERVISED = "supervised"
METHOD_NAMES = {"simclr": "SimCLR"}


def method_name(label) -> str:
    """How figures and the summary print a method label."""
    return METHOD_NAMES.get(label, str(label))


@dataclass(frozen=True)
class ImportSpec:
    """A network trained elsewhere (config `imports`), compared like a trained run."""

    name: str
    checkpoint: str
    format: str  # ckaflow | torchvision | timm | lightly | solo-learn | module
    head: str  # encoder | projector | classifier: the layers after the pooled features
    builder: str | None = None  # format module: "package.module:function" that builds it
    kwargs: dict | None = None  # format module: the builder's keyword arguments
    layers: tuple[str, ...] | None = None  # format module: glob patterns over named_modules()


@dataclass(frozen=True)
class RecipeSpec:
    epochs: int
    batch_size: int
    optimizer: str
    lr: float
    momentum: float | None  # None where unread: see used_recipe
    weight_decay: float
    warmup_epochs: int
    temperature: float | None
    proj_dim: int | None
    lars_eta: float | None
    precision: str
    channels_last: bool | str  # auto | True | False: see models.forward_settings


@dataclass(frozen=True)
class RunSpec:
    """One model: method × architecture × seed with its recipe (trained by ckaflow), or a
    network imported from a checkpoint (`imported`; its method and seed are the user's labels)."""

    method: str
    model: ModelSpec
    seed: int | None
    recipe: RecipeSpec | None
    imported: ImportSpec | None = None
    input: InputSpec | None = field(default=None, metadata=OMIT_UNSET)  # None: as stored

    def fed_shape(self, image_shape) -> tuple[int, int, int]:
        """(C, H, W) of what the network sees: the stored images at the run's input resolution."""
        channels, height, width = image_shape
        side = self.input.resolution if self.input is not None else None
        return (channels, side, side) if side else (channels, height, width)

    @property
    def run_id(self) -> str:
        if self.imported is not None:
            return self.imported.name
        return run_id(self.method, self.model, self.seed)

    @property
    def head(self) -> str:
        """encoder | projector | classifier: what follows the pooled features."""
        return self.imported.head if self.imported is not None else HEADS[self.method]

    def head_outputs(self, num_classes: int) -> int | None:
        """Outputs of the network's head: SimCLR's projection, or one logit per class (None
        for an imported network, whose checkpoint says)."""
        if self.imported is not None:
            return None
        return self.recipe.proj_dim if self.method == "simclr" else num_classes

    @property
    def replicate_of(self) -> str | None:
        """Names the set of runs this one replicates: runs of one method, model (architecture,
        width, initialisation scheme, stem) and recipe, or of one import format and head, that
        differ only in seed. None for a run without a seed, which replicates nothing."""
        if self.seed is None:
            return None
        spec = to_jsonable(self)
        del spec["seed"]
        if spec["imported"]:  # the file and the name differ between seeds of one import
            del spec["imported"]["name"], spec["imported"]["checkpoint"]
        width = "" if self.model.width == 64 else f"-w{self.model.width}"
        return f"{self.method}-{self.model.arch}{width}-{stable_hash(spec)[:8]}"

    @property
    def init_id(self) -> str:
        """Names the initial weights: two runs with equal init_id (and model) start from the
        same network, so their similarity is partly inherited from the starting point."""
        mode = self.model.init
        if self.imported is not None:  # trained elsewhere: its start is its own
            return f"imported-{self.imported.name}"
        if mode == "shared":
            return "shared"
        if mode == "seed-and-method":
            return f"{self.method}-s{self.seed}"
        return f"s{self.seed}"


@dataclass(frozen=True)
class CkaSpec:
    estimator: str
    batch_size: int
    passes: int
    bootstrap: int
    tile_layers: int
    comparisons: tuple[str, ...]


def run_id(method: str, model: ModelSpec, seed: int) -> str:
    width = "" if model.width == 64 else f"-w{model.width}"
    return f"{method}-{model.arch}{width}-s{seed}"


def data_spec(cfg: dict[str, Any]) -> DataSpec:
    spec = DataSpec(**cfg["data"])
    if spec.name == "image-folder" and spec.resolution is None:
        raise ConfigError(
            "data.resolution is required for data.name: image-folder (the side of the square "
            "images the study stores, e.g. 224)"
        )
    if spec.name != "image-folder" and spec.resolution is not None:
        raise ConfigError(
            f"data.resolution is for image folders; {spec.name} has its own resolution "
            f"({DATASET_SHAPES[spec.name][0][1]} px): remove the key"
        )
    return spec


def dataset_shape(spec: DataSpec) -> tuple[tuple[int, int, int], int]:
    """(C, H, W) of the stored images and the number of classes, before any image is read:
    an image folder's classes are the subfolders of its train/ folder."""
    if spec.name != "image-folder":
        return DATASET_SHAPES[spec.name]
    train = Path(spec.root) / "train"
    classes = sum(p.is_dir() for p in train.iterdir()) if train.is_dir() else 0
    if not classes:
        raise ConfigError(f"data.root {spec.root}: no class folders in {train}")
    return (3, spec.resolution, spec.resolution), classes


def augment_spec(cfg: dict[str, Any]) -> AugmentSpec:
    aug = dict(cfg["augment"])
    aug["crop_scale"] = tuple(aug["crop_scale"])
    return AugmentSpec(**aug)


def model_spec(cfg: dict[str, Any]) -> ModelSpec:
    return ModelSpec(**cfg["model"])


def cka_spec(cfg: dict[str, Any]) -> CkaSpec:
    cka = dict(cfg["cka"])
    cka["comparisons"] = tuple(cka["comparisons"])
    if cka["passes"] > 1 and cka["estimator"] != "minibatch":  # caught before any job runs
        raise ConfigError(
            f"cka.passes = {cka['passes']} needs the minibatch estimator, not "
            f"{cka['estimator']}: the full-data estimators already use every pair of examples"
        )
    return CkaSpec(**cka)


def used_recipe(method: str, recipe: dict[str, Any]) -> RecipeSpec:
    """A method's recipe with the keys its training never reads set to None (SimCLR's
    temperature and projection for supervised runs, momentum for AdamW, LARS's trust
    coefficient for other optimisers), so that changing them retrains nothing."""
    used = dict(recipe)
    if method != "simclr":
        used["temperature"] = used["proj_dim"] = None
    if used["optimizer"] == "adamw":
        used["momentum"] = None
    if used["optimizer"] != "lars":
        used["lars_eta"] = None
    return RecipeSpec(**used)


def run_specs(cfg: dict[str, Any]) -> list[RunSpec]:
    """The trained runs (methods × seeds), then the imported ones."""
    model, fed = model_spec(cfg), input_spec(cfg.get("input"))
    if fed is not None and fed.normalise != "dataset" and cfg["methods"]:
        _check_normalised_channels(fed, _channels(cfg["data"]["name"]))
    trained = [
        RunSpec(method, model, seed, used_recipe(method, cfg["recipes"][method]), None, fed)
        for method in cfg["methods"]
        for seed in cfg["seeds"]
    ]
    return trained + [import_run_spec(entry) for entry in cfg.get("imports", [])]


def _channels(name: str) -> int:
    """Channels of a data set's stored images (an image folder's are RGB)."""
    return DATASET_SHAPES[name][0][0] if name in DATASET_SHAPES else 3


def _check_normalised_channels(fed: InputSpec, channels: int) -> None:
    """The trained runs' normalisation against their network's channels, before any job runs
    (an import's channels are its file's: `ckaflow.feed` checks them at its import)."""
    values = len(fed.mean) if fed.mean else 3  # ImageNet's: 3
    if values not in (1, channels):
        raise ConfigError(
            f"input.normalise: {values} values, one per channel, for trained networks of "
            f"{channels} channel(s), the data's: give {channels} (or one for all)"
        )


def import_run_spec(entry: dict[str, Any]) -> RunSpec:
    """The run of one `imports` entry; its stem defaults to the format's for CIFAR."""
    stem_padding = 2 if entry["format"] == "solo-learn" and entry["stem"] == "cifar" else 1
    model = ModelSpec(entry["arch"], entry["width"], "imported", entry["stem"], stem_padding)
    source = ImportSpec(entry["name"], entry["checkpoint"], entry["format"], entry["head"])
    if entry["format"] == "module":
        module = entry.get("module") or {}
        if not module.get("builder") or not (module.get("layers") or {}).get("names"):
            raise ConfigError(
                f"imports: {entry['name']} has format module: give module.builder "
                '("package.module:function") and module.layers.names (glob patterns)'
            )
        source = ImportSpec(
            entry["name"],
            entry["checkpoint"],
            "module",
            "encoder",
            module["builder"],
            dict(module.get("kwargs") or {}),
            tuple(module["layers"]["names"]),
        )
    fed = input_spec(entry.get("input"), f"imports: {entry['name']}: input")
    return RunSpec(entry["method"], model, entry.get("seed"), None, source, fed)


def to_jsonable(spec: Any) -> Any:
    """A spec as plain data (like `dataclasses.asdict`), without the unset `OMIT_UNSET` fields."""
    if is_dataclass(spec) and not isinstance(spec, type):
        return {
            f.name: to_jsonable(getattr(spec, f.name))
            for f in fields(spec)
            if not (f.metadata.get("omit_unset") and getattr(spec, f.name) is None)
        }
    if isinstance(spec, (list, tuple)):
        return type(spec)(to_jsonable(v) for v in spec)
    if isinstance(spec, dict):
        return {k: to_jsonable(v) for k, v in spec.items()}
    return copy.deepcopy(spec)


def run_spec_from_dict(d: dict[str, Any]) -> RunSpec:
    recipe = RecipeSpec(**d["recipe"]) if d.get("recipe") else None
    imported = None
    if d.get("imported"):
        fields = dict(d["imported"])
        fields["layers"] = tuple(fields["layers"]) if fields.get("layers") else None
        imported = ImportSpec(**fields)
    fed = None
    if d.get("input"):
        fields_ = dict(d["input"])
        for key in ("mean", "std"):
            fields_[key] = tuple(fields_[key]) if fields_.get(key) else None
        fed = InputSpec(**fields_)
    return RunSpec(d["method"], ModelSpec(**d["model"]), d["seed"], recipe, imported, fed)


def augment_spec_from_dict(d: dict[str, Any]) -> AugmentSpec:
    return augment_spec({"augment": d})
