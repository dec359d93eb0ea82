"""Real image data sets, and the prepared data store every later stage reads.

`prepare` writes `results/data/<dataset>.zarr` once: the training subset (uint8 images + labels),
the eval subset and its three views `clean`, `aug1`, `aug2` materialised as uint8 images, so every
model sees the very same pixels.
"""

from __future__ import annotations

import gzip
import hashlib
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zarr

from ckaflow import augment, bytecount
from ckaflow.config import VIEWS, AugmentSpec, DataSpec, stable_hash, to_jsonable
from ckaflow.errors import DatasetError
from ckaflow.provenance import atomic_path, provenance

FASHION_MNIST_CLASSES = (
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}


@dataclass(frozen=True)
class ImageSet:
    """Train and test splits as uint8 (N, C, H, W) arrays with int64 labels."""

    name: str
    classes: tuple[str, ...]
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST (idx files, from Debian's dataset-fashion-mnist)


def _read_idx(path: Path, magic: int, item_shape: tuple[int, ...]) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        blob = f.read()
    header = 8 + 4 * len(item_shape)
    if len(blob) < header:
        raise DatasetError(f"{path}: file is {len(blob)} bytes, shorter than its idx header")
    found_magic, count = struct.unpack(">II", blob[:8])
    if found_magic != magic:
        raise DatasetError(f"{path}: idx magic number is {found_magic}, expected {magic}")
    dims = struct.unpack(">" + "I" * len(item_shape), blob[8:header])
    if tuple(dims) != item_shape:
        raise DatasetError(f"{path}: items have shape {dims}, expected {item_shape}")
    expected = header + count * int(np.prod(item_shape, dtype=np.int64))
    if len(blob) != expected:
        raise DatasetError(f"{path}: {len(blob)} bytes for {count} items, expected {expected}")
    return np.frombuffer(blob, dtype=np.uint8, offset=header).reshape(count, *item_shape)


def read_idx_images(path: Path) -> np.ndarray:
    return _read_idx(path, 2051, (28, 28))[:, None, :, :]


def read_idx_labels(path: Path) -> np.ndarray:
    return _read_idx(path, 2049, ()).astype(np.int64)


def load_fashion_mnist(root: str | Path) -> ImageSet:
    root = Path(root)
    missing = [f for f in FASHION_MNIST_FILES.values() if not (root / f).is_file()]
    if missing:
        raise DatasetError(
            f"Fashion-MNIST not found in {root} (missing: {', '.join(missing)}).\n"
            "Install it with:  sudo apt-get install dataset-fashion-mnist\n"
            "(it puts the four idx .gz files in /usr/share/datasets/fashion-mnist), or without\n"
            "root:  apt-get download dataset-fashion-mnist &&\n"
            "       dpkg-deb -x dataset-fashion-mnist_*.deb DIR\n"
            "and set data.root to DIR/usr/share/datasets/fashion-mnist in your config."
        )
    arrays = {key: root / name for key, name in FASHION_MNIST_FILES.items()}
    return _checked(
        ImageSet(
            "fashion-mnist",
            FASHION_MNIST_CLASSES,
            read_idx_images(arrays["train_images"]),
            read_idx_labels(arrays["train_labels"]),
            read_idx_images(arrays["test_images"]),
            read_idx_labels(arrays["test_labels"]),
        ),
        root,
    )


# ---------------------------------------------------------------------------------------------
# CIFAR-10 (torchvision's on-disk layout: <root>/cifar-10-batches-py/{data_batch_1..5,test_batch})


def _cifar_folder(root: Path) -> Path:
    for candidate in (root / "cifar-10-batches-py", root):
        if (candidate / "test_batch").is_file():
            return candidate
    raise DatasetError(
        f"CIFAR-10 not found under {root}: expected {root}/cifar-10-batches-py/test_batch "
        "(torchvision's layout).\nOn a machine with internet, fetch it with:\n"
        '  python -c "import torchvision; '
        f"torchvision.datasets.CIFAR10('{root}', download=True)\"\n"
        "and copy the folder here, or point data.root at an existing copy."
    )


class _CifarUnpickler(pickle.Unpickler):
    """CIFAR-10's python batches (torchvision's on-disk format, as published by its authors)
    are pickles of a dict of NumPy arrays, lists and strings: only what rebuilds those may be
    looked up, so a file put in their place cannot run code when read."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy._core.numeric", "_frombuffer"),  # arrays pickled with protocol 5
        ("numpy.core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(
                f"refused to build {module}.{name}: a CIFAR-10 batch holds only arrays, lists "
                "and strings (a file that asks for more could run code)"
            )
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            entry = _CifarUnpickler(f, encoding="latin1").load()
        images = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(entry.get("labels", entry.get("fine_labels")), dtype=np.int64)
    except (OSError, pickle.UnpicklingError, KeyError, ValueError, TypeError, EOFError) as err:
        raise DatasetError(f"{path}: not a readable CIFAR-10 batch ({err})") from err
    if len(images) != len(labels):
        raise DatasetError(f"{path}: {len(images)} images but {len(labels)} labels")
    return images, labels


def load_cifar10(root: str | Path) -> ImageSet:
    root = Path(root)
    folder = _cifar_folder(root)
    train_files = sorted(folder.glob("data_batch_*"))
    if not train_files:
        raise DatasetError(f"CIFAR-10 under {folder} has a test_batch but no data_batch_* files")
    train = [_read_cifar_batch(p) for p in train_files]
    test_images, test_labels = _read_cifar_batch(folder / "test_batch")
    return _checked(
        ImageSet(
            "cifar10",
            CIFAR10_CLASSES,
            np.concatenate([t[0] for t in train]),
            np.concatenate([t[1] for t in train]),
            test_images,
            test_labels,
        ),
        root,
    )


def _checked(images: ImageSet, root: Path) -> ImageSet:
    for split in ("train", "test"):
        labels = getattr(images, f"{split}_labels")
        n_images = len(getattr(images, f"{split}_images"))
        if n_images != len(labels):
            raise DatasetError(f"{root}: {split} has {n_images} images but {len(labels)} labels")
        bad = labels[(labels < 0) | (labels >= len(images.classes))]
        if bad.size:
            raise DatasetError(
                f"{root}: {split} label {int(bad[0])} is out of range 0..{len(images.classes) - 1}"
            )
    return images


LOADERS = {"fashion-mnist": load_fashion_mnist, "cifar10": load_cifar10}


def source_files(name: str, root: str | Path) -> list[Path] | None:
    """The files the data set's loader reads under `root`; None when one is missing."""
    root = Path(root)
    if name == "fashion-mnist":
        files = [root / f for f in FASHION_MNIST_FILES.values()]
        return files if all(f.is_file() for f in files) else None
    try:
        folder = _cifar_folder(root)
    except DatasetError:
        return None
    return [*sorted(folder.glob("data_batch_*")), folder / "test_batch"]


def source_sha256(name: str, root: str | Path) -> dict[str, str] | None:
    """SHA-256 of each file the loader reads, by file name, whatever folder holds them (None
    when one is missing)."""
    files = source_files(name, root)
    if files is None:
        return None
    digests = {}
    for path in files:
        with open(path, "rb") as fh:
            digests[path.name] = hashlib.file_digest(fh, "sha256").hexdigest()
    return digests


def check_source(name: str, root: str | Path, store: str | Path) -> None:
    """Stop when `root` holds other files than the prepared `store` was made from: nothing
    would rerun (data.root is where the files are, not what they are), so the study would
    keep the old files' results under the new setting. Files that are missing (moved away
    after preparing) or a store made before ckaflow recorded its sources pass."""
    store = Path(store)
    if not (store / "zarr.json").is_file():
        return
    try:
        recorded = zarr.open_group(store, mode="r").attrs.get("source_sha256")
    except (OSError, ValueError, KeyError):  # a damaged store: the stages reading it say so
        return
    now = source_sha256(name, root) if recorded else None
    if now is None or now == recorded:
        return
    changed = sorted(f for f in set(now) | set(recorded) if now.get(f) != recorded.get(f))
    raise DatasetError(
        f"data.root ({root}) holds other {name} files than {store} was prepared from "
        f"({', '.join(changed)} {'differs' if len(changed) == 1 else 'differ'} by SHA-256). "
        "The results of the old files stand as "
        f"they are. To redo the study with these files, remove {store} (everything after it "
        "reruns); to keep the old results, point data.root back at the old files."
    )


def load_image_set(spec: DataSpec) -> ImageSet:
    return LOADERS[spec.name](spec.root)


# ---------------------------------------------------------------------------------------------
# The prepared data store


def choose_subset(n_available: int, n_wanted: int, seed: int, what: str) -> np.ndarray:
    """A seeded random subset of indices, sorted so the stored order is the natural one."""
    if n_wanted > n_available:
        raise DatasetError(f"{what}: {n_wanted} images requested but only {n_available} exist")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_available, size=n_wanted, replace=False))


def make_views(
    images: np.ndarray, example_ids: np.ndarray, aug: AugmentSpec, seed: int
) -> dict[str, np.ndarray]:
    """The eval views: `clean` as is, `aug1`/`aug2` SimCLR-augmented, seeded per example."""
    views = {"clean": images}
    pixels = torch.from_numpy(np.array(images)).float() / 255
    for stream, name in enumerate(VIEWS[1:], start=1):
        params = augment.sample_simclr_per_example(example_ids, aug, seed, stream)
        out = augment.simclr_view(pixels, params)
        views[name] = (out * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    return views


def prepare(spec: DataSpec, aug: AugmentSpec, out: str | Path, chunk_rows: int = 256) -> Path:
    """Write the prepared data store for one study."""
    source = load_image_set(spec)
    train_idx = choose_subset(len(source.train_images), spec.train_size, spec.seed, "train")
    eval_idx = choose_subset(len(source.test_images), spec.eval_size, spec.seed + 1, "eval")
    train_images = source.train_images[train_idx]
    eval_images = source.test_images[eval_idx]
    views = make_views(eval_images, eval_idx, aug, spec.seed)
    # normalisation statistics of the training subset, per channel
    scaled = train_images.astype(np.float64) / 255
    mean = scaled.mean(axis=(0, 2, 3)).tolist()
    std = scaled.std(axis=(0, 2, 3)).tolist()
    # the data's identity is its content, not the folder it was read from (data.root)
    content = hashlib.sha256()
    labels = (source.train_labels[train_idx], source.test_labels[eval_idx])
    for values in (train_images, eval_images, *labels):
        content.update(np.ascontiguousarray(values).tobytes())
    identity = {k: v for k, v in to_jsonable(spec).items() if k != "root"}

    out = Path(out)
    with atomic_path(out) as scratch:
        root = zarr.open_group(scratch, mode="w", zarr_format=3)
        _array(root, "train/images", train_images, chunk_rows)
        _array(root, "train/labels", source.train_labels[train_idx], chunk_rows)
        _array(root, "train/ids", train_idx.astype(np.int64), chunk_rows)
        _array(root, "eval/labels", source.test_labels[eval_idx], chunk_rows)
        _array(root, "eval/ids", eval_idx.astype(np.int64), chunk_rows)
        for name, pixels in views.items():
            _array(root, f"views/{name}", pixels, chunk_rows)
        root.attrs.update(
            provenance(
                kind="ckaflow.data",
                dataset=source.name,
                classes=list(source.classes),
                num_classes=len(source.classes),
                image_shape=list(train_images.shape[1:]),
                mean=mean,
                std=std,
                views=list(VIEWS),
                spec=to_jsonable(spec),
                augment=to_jsonable(aug),
                content_sha256=content.hexdigest(),
                source_sha256=source_sha256(spec.name, spec.root),
                spec_hash=stable_hash([identity, to_jsonable(aug), content.hexdigest()]),
                complete=True,
            )
        )
    return out


def _array(group: zarr.Group, name: str, values: np.ndarray, chunk_rows: int) -> None:
    chunks = (min(chunk_rows, len(values)), *values.shape[1:])
    arr = group.create_array(name, shape=values.shape, chunks=chunks, dtype=values.dtype)
    arr[...] = values
    bytecount.wrote(values.nbytes)


@dataclass(frozen=True)
class PreparedData:
    """The prepared data store, opened for reading."""

    path: Path
    group: zarr.Group

    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    def view(self, name: str) -> np.ndarray:
        if name not in VIEWS:
            raise ValueError(f"unknown view {name!r}; expected one of {VIEWS}")
        return bytecount.read_array(self.group[f"views/{name}"][...])

    def train(self) -> tuple[np.ndarray, np.ndarray]:
        images, labels = self.group["train/images"][...], self.group["train/labels"][...]
        return bytecount.read_array(images), bytecount.read_array(labels)

    def eval_labels(self) -> np.ndarray:
        return bytecount.read_array(self.group["eval/labels"][...])

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 or [0, 1] pixels -> the model's input scale (per-channel standardised)."""
        if pixels.dtype == torch.uint8:
            pixels = pixels.float() / 255
        mean = torch.tensor(self.attrs["mean"], dtype=pixels.dtype, device=pixels.device)
        std = torch.tensor(self.attrs["std"], dtype=pixels.dtype, device=pixels.device)
        return (pixels - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def open_prepared(path: str | Path) -> PreparedData:
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: prepared data store missing; run `ckaflow prepare` first")
    group = zarr.open_group(path, mode="r")
    if group.attrs.get("kind") != "ckaflow.data" or not group.attrs.get("complete"):
        raise DatasetError(f"{path}: not a complete ckaflow data store; delete it and rerun")
    return PreparedData(path, group)
