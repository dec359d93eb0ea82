"""Real image data sets, and the prepared data store every later stage reads.

`prepare` writes `results/data/<dataset>.zarr` once: the training subset (uint8 images + labels),
the eval subset and its three views `clean`, `aug1`, `aug2` materialised as uint8 images, so every
model sees the very same pixels.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zarr

from ckaflow import augment, bytecount
from ckaflow.config import VIEWS, AugmentSpec, DataSpec, stable_hash, to_jsonable
from ckaflow.datasets import (  # noqa: F401  (the loaders, also reached as ckaflow.data.*)
    LOADERS,
    FolderImages,
    ImageSet,
    file_sha256,
    load_cifar10,
    load_fashion_mnist,
    load_image_folder,
    read_idx_images,
    source_sha256,
)
from ckaflow.errors import DatasetError, StoreError
from ckaflow.provenance import atomic_path, provenance
from ckaflow.store import open_store


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
    now = _sha256_now(name, Path(root), recorded) if recorded else None
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


def _sha256_now(name: str, root: Path, recorded: dict) -> dict[str, str] | None:
    """The digests of the files `recorded` names, as they are now (None if one is gone). An
    image folder's are the images the store was made from, by their paths below `root`."""
    if name != "image-folder":
        return source_sha256(name, root)
    files = [root / f for f in recorded]
    return file_sha256(files, root) if all(f.is_file() for f in files) else None


def load_image_set(spec: DataSpec) -> ImageSet:
    if spec.name == "image-folder":
        return load_image_folder(spec.root, spec.resolution)
    return LOADERS[spec.name](spec.root)


def _read_sha256(spec: DataSpec, source: ImageSet) -> dict[str, str] | None:
    """The SHA-256 of every file the store is made from: the data set's files, or the images
    of an image folder that were decoded."""
    if isinstance(source.train_images, FolderImages):
        read = source.train_images.read + source.test_images.read
        return file_sha256(sorted(set(read)), Path(spec.root))
    return source_sha256(spec.name, spec.root)


# Above this many values, the channel statistics are summed chunk by chunk (a float64 copy of
# 10,000 ImageNet-size images would take 12 GB); below it, in one call, as ckaflow always has.
STATS_IN_ONE_CALL = 1 << 27


def channel_stats(images: np.ndarray, limit: int = STATS_IN_ONE_CALL) -> tuple[list, list]:
    """Per-channel mean and standard deviation of uint8 (N, C, H, W) images scaled to [0, 1]."""
    if images.size <= limit:
        scaled = images.astype(np.float64) / 255
        return scaled.mean(axis=(0, 2, 3)).tolist(), scaled.std(axis=(0, 2, 3)).tolist()
    count = images.shape[0] * images.shape[2] * images.shape[3]
    sums = np.zeros(images.shape[1])
    rows = max(1, limit // max(1, images[0].size))
    for start in range(0, len(images), rows):
        sums += (images[start : start + rows].astype(np.float64) / 255).sum(axis=(0, 2, 3))
    mean = sums / count
    squares = np.zeros(images.shape[1])
    for start in range(0, len(images), rows):
        part = images[start : start + rows].astype(np.float64) / 255
        squares += ((part - mean[None, :, None, None]) ** 2).sum(axis=(0, 2, 3))
    return mean.tolist(), np.sqrt(squares / count).tolist()


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
    mean, std = channel_stats(train_images)  # normalisation of the training subset
    # the data's identity is its content, not the folder it was read from (data.root)
    content = hashlib.sha256()
    labels = (source.train_labels[train_idx], source.test_labels[eval_idx])
    for values in (train_images, eval_images, *labels):
        content.update(np.ascontiguousarray(values).tobytes())
    identity = {
        k: v for k, v in to_jsonable(spec).items() if k != "root" and v is not None
    }  # (a setting left unset, such as resolution, keeps the identity of stores made before it)

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
                source_sha256=_read_sha256(spec, source),
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
        """uint8 or [0, 1] pixels, standardised by the training subset's per-channel mean and
        std: what a run with the default `input` is fed."""
        from ckaflow.feed import Feed

        return Feed(None, tuple(self.attrs["mean"]), tuple(self.attrs["std"]))(pixels)


def open_prepared(path: str | Path) -> PreparedData:
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: prepared data store missing; run `ckaflow prepare-data` first")
    try:
        group = open_store(path, kind="ckaflow.data").group
    except StoreError as err:
        raise DatasetError(
            f"{err}: not a complete ckaflow data store; delete it and rerun"
        ) from None
    return PreparedData(path, group)
