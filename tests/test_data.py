import gzip
import importlib.util
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ckaflow import config, data
from ckaflow.errors import DatasetError
from tests.conftest import tiny_config


def test_fashion_mnist_loads_every_real_image(fashion_root):
    images = data.load_fashion_mnist(fashion_root)
    assert images.train_images.shape == (60000, 1, 28, 28)
    assert images.test_images.shape == (10000, 1, 28, 28)
    assert images.train_images.dtype == np.uint8
    assert np.bincount(images.test_labels).tolist() == [1000] * 10
    # real images, not noise: most pixels are background, and items are brighter in the middle
    first = images.test_images[:500].astype(float)
    assert (first == 0).mean() > 0.3
    assert first[:, :, 10:18, 10:18].mean() > first[:, :, :4, :].mean()


def test_missing_fashion_mnist_says_how_to_install(tmp_path):
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist"):
        data.load_fashion_mnist(tmp_path)


def test_truncated_idx_file_is_named(tmp_path, fashion_root):
    with gzip.open(fashion_root / "t10k-images-idx3-ubyte.gz") as f:
        blob = f.read()
    bad = tmp_path / "t10k-images-idx3-ubyte.gz"
    with gzip.open(bad, "wb") as f:
        f.write(blob[: len(blob) // 2])
    with pytest.raises(DatasetError, match=re.escape(str(bad))):
        data.read_idx_images(bad)


def test_prepared_store_holds_subsets_and_three_views(prepared, study_config):
    store = data.open_prepared(prepared)
    n = study_config["data"]["eval_size"]
    for view in ("clean", "aug1", "aug2"):
        assert store.view(view).shape == (n, 1, 28, 28)
        assert store.view(view).dtype == np.uint8
    assert store.train()[0].shape == (study_config["data"]["train_size"], 1, 28, 28)
    assert not np.array_equal(store.view("aug1"), store.view("clean"))
    assert not np.array_equal(store.view("aug1"), store.view("aug2"))
    attrs = store.attrs
    assert attrs["complete"] and attrs["dataset"] == "fashion-mnist"
    assert attrs["code_version"] and attrs["spec_hash"]
    assert 0.2 < attrs["mean"][0] < 0.4  # Fashion-MNIST's mean intensity is about 0.29


def test_eval_views_are_seeded_per_example(fashion_root):
    cfg = tiny_config()
    aug = config.augment_spec(cfg)
    images = data.load_fashion_mnist(fashion_root).test_images[:20]
    ids = np.arange(20)
    full = data.make_views(images, ids, aug, seed=0)
    part = data.make_views(images[5:12], ids[5:12], aug, seed=0)
    # an example's augmented pixels do not depend on which other examples are in the subset
    assert np.array_equal(full["aug1"][5:12], part["aug1"])
    other_seed = data.make_views(images, ids, aug, seed=1)
    assert not np.array_equal(full["aug1"], other_seed["aug1"])


def test_too_many_images_requested_is_a_clear_error():
    with pytest.raises(DatasetError, match="70000 images requested but only 60000 exist"):
        data.choose_subset(60000, 70000, 0, "train")


def test_incomplete_store_is_refused(tmp_path):
    import zarr

    path = tmp_path / "x.zarr"
    zarr.open_group(path, mode="w").attrs.update({"kind": "ckaflow.data"})
    with pytest.raises(DatasetError, match="not a complete ckaflow data store"):
        data.open_prepared(path)


# --------------------------------------------------------------------------------------------
# CIFAR-10 through torchvision's on-disk layout, built from the real CIFAR-10 test images that
# the foolbox wheel ships


def _foolbox_cifar10() -> list[tuple[np.ndarray, int]]:
    spec = importlib.util.find_spec("foolbox")
    if spec is None:
        pytest.fail("the foolbox wheel is needed: pip install --no-deps foolbox==3.3.4")
    folder = Path(spec.submodule_search_locations[0]) / "data"
    out = []
    for png in sorted(folder.glob("cifar10_*.png")):
        label = int(png.stem.split("_")[-1])
        out.append((np.asarray(Image.open(png).convert("RGB")), label))
    assert len(out) == 20
    return out


def _write_cifar_batch(path: Path, samples) -> None:
    pixels = np.stack([img.transpose(2, 0, 1).reshape(-1) for img, _ in samples])
    with open(path, "wb") as f:
        pickle.dump({"data": pixels, "labels": [lab for _, lab in samples]}, f)


@pytest.fixture()
def cifar_root(tmp_path) -> tuple[Path, list]:
    samples = _foolbox_cifar10()
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    _write_cifar_batch(folder / "data_batch_1", samples[:8])
    _write_cifar_batch(folder / "data_batch_2", samples[8:12])
    _write_cifar_batch(folder / "test_batch", samples[12:])
    return tmp_path, samples


def test_cifar10_loads_from_torchvision_layout(cifar_root):
    root, samples = cifar_root
    images = data.load_cifar10(root)
    assert images.train_images.shape == (12, 3, 32, 32)
    assert images.test_images.shape == (8, 3, 32, 32)
    assert np.array_equal(images.test_images[0].transpose(1, 2, 0), samples[12][0])
    assert images.test_labels.tolist() == [lab for _, lab in samples[12:]]


def test_cifar10_prepares_through_the_same_path(cifar_root, tmp_path):
    root, _ = cifar_root
    spec = config.DataSpec("cifar10", str(root), train_size=12, eval_size=8, seed=0)
    aug = config.augment_spec(tiny_config())
    store = data.open_prepared(data.prepare(spec, aug, tmp_path / "cifar10.zarr", chunk_rows=4))
    assert store.view("aug2").shape == (8, 3, 32, 32)
    assert store.attrs["classes"][0] == "airplane"
    assert len(store.attrs["mean"]) == 3
    normalised = store.normalise(torch.from_numpy(store.view("clean")))
    assert normalised.shape == (8, 3, 32, 32)


def test_missing_cifar10_says_how_to_get_it(tmp_path):
    with pytest.raises(DatasetError, match="torchvision.datasets.CIFAR10"):
        data.load_cifar10(tmp_path)


def test_cifar10_label_out_of_range_is_refused(cifar_root):
    root, samples = cifar_root
    _write_cifar_batch(root / "cifar-10-batches-py" / "test_batch", [(samples[0][0], 12)])
    with pytest.raises(DatasetError, match="label 12 is out of range"):
        data.load_cifar10(root)


def test_a_cifar_batch_that_would_run_code_is_refused(cifar_root):
    """The batches are pickles: one that asks for anything but arrays, lists and strings is
    refused before it can build it (here: open(), which would create a file)."""
    root, _ = cifar_root
    marker = root / "pwned"

    class Trap:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with open(root / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({"data": Trap(), "labels": [0]}, f, protocol=2)
    with pytest.raises(DatasetError, match="refused to build io.open"):
        data.load_cifar10(root)
    assert not marker.exists()


def test_other_files_under_data_root_are_refused_but_a_copy_or_a_move_is_not(cifar_root, tmp_path):
    """The store records the SHA-256 of the files it was made from; data.root pointing at other
    files stops the study (nothing would rerun: data.root is where the files are), an identical
    copy elsewhere or files moved away pass."""
    import shutil

    import zarr

    root, samples = cifar_root
    spec = config.DataSpec("cifar10", str(root), train_size=12, eval_size=8, seed=0)
    store = data.prepare(spec, config.augment_spec(tiny_config()), tmp_path / "c.zarr", 4)
    recorded = data.open_prepared(store).attrs["source_sha256"]
    assert sorted(recorded) == ["data_batch_1", "data_batch_2", "test_batch"]
    data.check_source("cifar10", root, store)  # the same files
    copy = tmp_path / "copy"
    shutil.copytree(root / "cifar-10-batches-py", copy)  # no cifar-10-batches-py level: fine
    data.check_source("cifar10", copy, store)
    data.check_source("cifar10", tmp_path / "moved-away", store)

    relabelled = [(img, (lab + 1) % 10) for img, lab in samples[12:]]
    _write_cifar_batch(copy / "test_batch", relabelled)
    with pytest.raises(DatasetError) as err:
        data.check_source("cifar10", copy, store)
    message = str(err.value)
    assert f"holds other cifar10 files than {store}" in message
    assert "(test_batch differs by SHA-256)" in message and f"remove {store}" in message

    # a file cut short is other content too
    cut = tmp_path / "cut"
    shutil.copytree(root / "cifar-10-batches-py", cut)
    batch = cut / "data_batch_2"
    batch.write_bytes(batch.read_bytes()[:100])
    with pytest.raises(DatasetError, match=r"\(data_batch_2 differs by SHA-256\)"):
        data.check_source("cifar10", cut, store)

    zarr.open_group(store, mode="r+").attrs.pop("source_sha256")  # a store made before
    data.check_source("cifar10", copy, store)
    (store / "zarr.json").write_text("{not json")  # damaged: the stages reading it say so
    data.check_source("cifar10", copy, store)
