"""The data set loaders on files in each publisher's format, written here from real images
(Fashion-MNIST's, coloured and padded) where the real files cannot be installed: the same
arrays as torchvision's own readers give on the same files, no code run from a file, and a
clear error for a missing or malformed one; then a data store prepared from each."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from ckaflow import config, data, datasets
from ckaflow.errors import DatasetError
from tests.conftest import FASHION_ROOT, tiny_config


def _real_rgb(n: int, side: int, seed: int = 0) -> np.ndarray:
    """n real images (Fashion-MNIST's test images) as uint8 (n, 3, side, side): each grey image
    tinted per channel and centred on a black canvas (upscaled 3x for side >= 84)."""
    grey = datasets.read_idx_images(FASHION_ROOT / "t10k-images-idx3-ubyte.gz")[:n, 0]
    if side >= 84:
        grey = grey.repeat(3, axis=1).repeat(3, axis=2)
    pad = (side - grey.shape[1]) // 2
    canvas = np.zeros((n, side, side), dtype=np.uint8)
    canvas[:, pad : pad + grey.shape[1], pad : pad + grey.shape[2]] = grey
    tint = np.random.default_rng(seed).uniform(0.4, 1.0, size=(n, 3, 1, 1))
    return (canvas[:, None] * tint).round().astype(np.uint8)


def _labels(n: int, classes: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, classes, n)


def _trust_files(monkeypatch, cls) -> None:
    """torchvision's readers check their files' MD5 against the published ones; these files
    are ours, in the published format."""
    import sys

    monkeypatch.setattr(cls, "_check_integrity", lambda self: True)
    module = sys.modules[cls.__module__]
    if hasattr(module, "check_integrity"):
        monkeypatch.setattr(module, "check_integrity", lambda *args, **kwargs: True)


def _same_splits_as(reader, name: str, root: Path, monkeypatch):
    """Our loader's train and test splits equal torchvision's `reader(root, split=...)`'s
    images (N, C, H, W) and labels; our ImageSet."""
    ours = data.LOADERS[name](root)
    _trust_files(monkeypatch, reader)
    for split, images, labels in (("train", ours.train_images, ours.train_labels),
                                  ("test", ours.test_images, ours.test_labels)):  # fmt: skip
        theirs = reader(str(root), split=split)
        np.testing.assert_array_equal(images, theirs.data)
        np.testing.assert_array_equal(labels, theirs.labels)
    return ours


# -- CIFAR-100 ---------------------------------------------------------------------------------


def _write_cifar100(root: Path, n_train=120, n_test=60) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 5)):
        images = _real_rgb(n, 32, seed)
        entry = {
            "filenames": [f"img_{i}.png" for i in range(n)],
            "batch_label": f"{split} batch",
            "fine_labels": _labels(n, 100, seed).tolist(),
            "coarse_labels": _labels(n, 20, seed).tolist(),
            "data": images.reshape(n, -1),
        }
        (folder / split).write_bytes(pickle.dumps(entry, protocol=2))
    meta = {"fine_label_names": [f"fine{i}" for i in range(100)]}
    meta["coarse_label_names"] = [f"coarse{i}" for i in range(20)]
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return root


def test_cifar100_reads_as_torchvision_reads_it(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR100

    root = _write_cifar100(tmp_path / "c100")
    ours = data.LOADERS["cifar100"](root)
    _trust_files(monkeypatch, CIFAR100)
    for train, images, labels in ((True, ours.train_images, ours.train_labels),
                                  (False, ours.test_images, ours.test_labels)):  # fmt: skip
        theirs = CIFAR100(str(root), train=train)
        np.testing.assert_array_equal(images, theirs.data.transpose(0, 3, 1, 2))
        np.testing.assert_array_equal(labels, theirs.targets)
    assert ours.classes == tuple(CIFAR100(str(root), train=False).classes)
    assert len(ours.classes) == 100


def test_a_cifar100_file_that_would_run_code_is_refused(tmp_path):
    root = _write_cifar100(tmp_path / "c100")
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (root / "cifar-100-python" / "meta").write_bytes(pickle.dumps({"x": Payload()}))
    with pytest.raises(DatasetError, match="refused to build"):
        data.LOADERS["cifar100"](root)
    assert not marker.exists()


# -- SVHN --------------------------------------------------------------------------------------


def _write_svhn(root: Path, n_train=100, n_test=50) -> Path:
    import scipy.io

    root.mkdir(parents=True)
    for name, n, seed in (("train_32x32.mat", n_train, 2), ("test_32x32.mat", n_test, 3)):
        images = _real_rgb(n, 32, seed)
        digits = _labels(n, 10, seed)
        y = np.where(digits == 0, 10, digits).astype(np.uint8)[:, None]  # SVHN: 0 is class 10
        scipy.io.savemat(root / name, {"X": images.transpose(2, 3, 1, 0), "y": y})
    return root


def test_svhn_reads_as_torchvision_reads_it(tmp_path, monkeypatch):
    from torchvision.datasets import SVHN

    root = _write_svhn(tmp_path / "svhn")
    ours = _same_splits_as(SVHN, "svhn", root, monkeypatch)
    assert 0 in ours.train_labels and ours.train_labels.max() == 9


def test_a_malformed_svhn_file_is_named(tmp_path):
    root = _write_svhn(tmp_path / "svhn")
    (root / "test_32x32.mat").write_bytes(b"MATLAB 5.0 MAT-file, but cut short")
    with pytest.raises(DatasetError, match="test_32x32.mat: not a readable SVHN file"):
        data.LOADERS["svhn"](root)
    (root / "test_32x32.mat").unlink()
    with pytest.raises(DatasetError, match="test_32x32.mat is missing"):
        data.LOADERS["svhn"](root)


# -- STL-10 ------------------------------------------------------------------------------------


def _write_stl10(root: Path, n_train=40, n_test=30) -> Path:
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    for split, n, seed in (("train", n_train, 4), ("test", n_test, 6)):
        images = _real_rgb(n, 96, seed)
        # column-major per channel, as STL-10's binaries are
        (folder / f"{split}_X.bin").write_bytes(images.transpose(0, 1, 3, 2).tobytes())
        (folder / f"{split}_y.bin").write_bytes((_labels(n, 10, seed) + 1).astype(np.uint8))
    names = "airplane bird car cat deer dog horse monkey ship truck"
    (folder / "class_names.txt").write_text("\n".join(names.split()) + "\n")
    return root


def test_stl10_reads_as_torchvision_reads_it(tmp_path, monkeypatch):
    from torchvision.datasets import STL10

    root = _write_stl10(tmp_path / "stl")
    ours = _same_splits_as(STL10, "stl10", root, monkeypatch)
    assert ours.classes == tuple(STL10(str(root), split="test").classes)
    assert ours.train_images.shape[1:] == (3, 96, 96)


def test_a_cut_stl10_file_is_named(tmp_path):
    root = _write_stl10(tmp_path / "stl")
    path = root / "stl10_binary" / "test_X.bin"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DatasetError, match="test_X.bin: .* not whole 96x96 images"):
        data.LOADERS["stl10"](root)


# -- an image folder ---------------------------------------------------------------------------


def _write_folder(root: Path, per_class=(7, 3)) -> Path:
    """train/ and val/ with three classes of real images of several sizes and formats."""
    from PIL import Image

    images = _real_rgb(60, 32, 7)
    i = 0
    for split, n in zip(("train", "val"), per_class, strict=True):
        for c, name in enumerate(("cat", "dog", "emu")):
            (root / split / name).mkdir(parents=True)
            for k in range(n):
                img = Image.fromarray(images[i].transpose(1, 2, 0)).resize((40 + 9 * k, 30 + c))
                img.save(root / split / name / f"{k}.{'png' if k % 2 else 'jpg'}")
                i += 1
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    return root


def test_an_image_folder_reads_as_torchvision_image_folder_with_resize_and_crop(tmp_path):
    from torchvision import datasets as tv
    from torchvision import transforms

    root = _write_folder(tmp_path / "folder")
    ours = datasets.load_image_folder(root, resolution=24)
    keep = transforms.Compose([transforms.Resize(24), transforms.CenterCrop(24)])
    for split, images, labels in (("train", ours.train_images, ours.train_labels),
                                  ("val", ours.test_images, ours.test_labels)):  # fmt: skip
        theirs = tv.ImageFolder(str(root / split), transform=keep)
        assert len(images) == len(theirs) and images.shape[1:] == (3, 24, 24)
        decoded = images[np.arange(len(images))]
        for k, (img, label) in enumerate(theirs):
            np.testing.assert_array_equal(decoded[k], np.asarray(img).transpose(2, 0, 1))
            assert labels[k] == label
    assert ours.classes == ("cat", "dog", "emu")


def test_an_image_folder_decodes_only_the_images_asked_for(tmp_path):
    root = _write_folder(tmp_path / "folder")
    images = datasets.load_image_folder(root, resolution=16).train_images
    images[np.array([0, 5])]
    assert [p.name for p in images.read] == ["0.jpg", "5.png"]


def test_a_broken_image_folder_is_named(tmp_path):
    root = _write_folder(tmp_path / "folder")
    (root / "val" / "fox").mkdir()
    with pytest.raises(DatasetError, match=r"classes \['fox'\] are in val/ only"):
        datasets.load_image_folder(root, 16)
    (root / "val" / "fox").rmdir()
    bad = root / "train" / "dog" / "9.png"
    bad.write_bytes(b"\x89PNG not really")
    images = datasets.load_image_folder(root, 16).train_images
    with pytest.raises(DatasetError, match="9.png: not a readable image"):
        images[np.arange(len(images))]
    with pytest.raises(DatasetError, match="expected .*/train/<class>"):
        datasets.load_image_folder(tmp_path / "nothing", 16)


# -- a data store from each --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "write", "extra"),
    [
        ("cifar100", _write_cifar100, {}),
        ("svhn", _write_svhn, {}),
        ("stl10", _write_stl10, {}),
        ("image-folder", lambda root: _write_folder(root, (12, 8)), {"resolution": 20}),
    ],
)
def test_a_data_store_is_prepared_from_each(tmp_path, name, write, extra):
    root = write(tmp_path / "source")
    cfg = tiny_config(data={"name": name, "root": str(root), "train_size": 24,
                            "eval_size": 16, **extra})  # fmt: skip
    spec = config.data_spec(cfg)
    store = data.prepare(spec, config.augment_spec(cfg), tmp_path / "d.zarr", chunk_rows=8)
    prepared = data.open_prepared(store)
    shape, classes = config.dataset_shape(spec)
    assert prepared.attrs["image_shape"] == list(shape)
    assert prepared.attrs["num_classes"] == classes
    for view in ("clean", "aug1", "aug2"):
        assert prepared.view(view).shape == (16, *shape)
    recorded = prepared.attrs["source_sha256"]
    if name == "image-folder":  # the decoded images only, by their paths in the folder
        assert len(recorded) == 24 + 16 and all("/" in key for key in recorded)
    else:
        assert recorded and all(len(digest) == 64 for digest in recorded.values())
    data.check_source(name, str(root), store)  # the same files: passes
    changed = sorted(recorded)[0]
    path = root / changed if name == "image-folder" else next(root.rglob(changed))
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(DatasetError, match="by SHA-256"):
        data.check_source(name, str(root), store)
    mean = torch.tensor(prepared.attrs["mean"])
    assert ((mean > 0) & (mean < 1)).all()


def test_channel_statistics_summed_in_chunks_equal_one_call(tmp_path):
    images = _real_rgb(50, 32)
    whole = data.channel_stats(images)
    chunked = data.channel_stats(images, limit=3 * 32 * 32 * 7)
    np.testing.assert_allclose(chunked, whole, rtol=1e-12)


def test_resolution_belongs_to_image_folders_only(tmp_path):
    with pytest.raises(config.ConfigError, match="data.resolution is required"):
        config.data_spec(tiny_config(data={"name": "image-folder", "root": str(tmp_path)}))
    with pytest.raises(config.ConfigError, match="has its own resolution"):
        config.data_spec(tiny_config(data={"resolution": 64}))
