"""Image data sets in the formats their publishers ship (as torchvision reads them), read
without running code from any file. Called by `ckaflow.data.prepare` and the study's checks.

Each loader returns an `ImageSet`: train and test splits as uint8 (N, C, H, W) arrays with
int64 labels. An image folder's splits are `FolderImages`, which decode only the images asked
for, so a study of a few thousand images of a million-image folder reads a few thousand files.

| `data.name`     | files under `data.root`                                              |
|-----------------|----------------------------------------------------------------------|
| `fashion-mnist` | the four idx `.gz` files                                             |
| `cifar10`       | `cifar-10-batches-py/{data_batch_1..5, test_batch}`                  |
| `cifar100`      | `cifar-100-python/{train, test, meta}` (the 100 fine labels)         |
| `svhn`          | `train_32x32.mat`, `test_32x32.mat` (label 10 is the digit 0)         |
| `stl10`         | `stl10_binary/{train,test}_{X,y}.bin`, `class_names.txt` (labelled)  |
| `image-folder`  | `train/<class>/<image>` and `val/<class>/<image>` (or `test/`)       |
"""

from __future__ import annotations

import gzip
import hashlib
import pickle
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ckaflow.errors import DatasetError

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
SVHN_FILES = ("train_32x32.mat", "test_32x32.mat")
STL10_FILES = ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", "class_names.txt")
# torchvision's IMG_EXTENSIONS: what `datasets.ImageFolder` takes for an image
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
MAX_IMAGE_PIXELS = 178_956_970  # PIL's own bomb limit, as an error rather than a warning


@dataclass(frozen=True)
class ImageSet:
    """Train and test splits as uint8 (N, C, H, W) arrays with int64 labels."""

    name: str
    classes: tuple[str, ...]
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


# -- Fashion-MNIST (idx files, from Debian's dataset-fashion-mnist) ----------------------------


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


# -- CIFAR-10 and CIFAR-100 (python pickles of arrays, torchvision's layout) -------------------


def _fetch_hint(dataset: str, root: Path) -> str:
    return (
        "On a machine with internet, fetch it with:\n"
        f"  python -c \"import torchvision; torchvision.datasets.{dataset}('{root}', "
        'download=True)"\n'
        "and copy the folder here, or point data.root at an existing copy."
    )


def _cifar_folder(root: Path, folder: str = "cifar-10-batches-py", probe: str = "test_batch"):
    for candidate in (root / folder, root):
        if (candidate / probe).is_file():
            return candidate
    dataset = "CIFAR10" if probe == "test_batch" else "CIFAR100"
    raise DatasetError(
        f"{dataset[:5]}-{dataset[5:]} not found under {root}: expected {root}/{folder}/{probe} "
        f"(torchvision's layout).\n{_fetch_hint(dataset, root)}"
    )


class _CifarUnpickler(pickle.Unpickler):
    """CIFAR's python batches (torchvision's on-disk format, as published by their authors) are
    pickles of a dict of NumPy arrays, lists and strings: only what rebuilds those may be
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
                f"refused to build {module}.{name}: a CIFAR batch holds only arrays, lists "
                "and strings (a file that asks for more could run code)"
            )
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            entry = _CifarUnpickler(f, encoding="latin1").load()
    except (OSError, pickle.UnpicklingError, ValueError, TypeError, EOFError) as err:
        raise DatasetError(f"{path}: not a readable CIFAR file ({err})") from err
    if not isinstance(entry, dict):
        raise DatasetError(f"{path}: not a readable CIFAR file (holds no dict)")
    return entry


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    entry = _unpickle(path)
    try:
        images = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(entry.get("labels", entry.get("fine_labels")), dtype=np.int64)
    except (KeyError, ValueError, TypeError) as err:
        raise DatasetError(f"{path}: not a readable CIFAR batch ({err!r})") from err
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


def _cifar100_folder(root: Path) -> Path:
    folder = _cifar_folder(root, "cifar-100-python", "meta")
    missing = [f for f in ("train", "test") if not (folder / f).is_file()]
    if missing:
        raise DatasetError(f"CIFAR-100 under {folder} lacks {', '.join(missing)}")
    return folder


def load_cifar100(root: str | Path) -> ImageSet:
    """CIFAR-100 with its 100 fine labels (the coarse superclasses are not used)."""
    root = Path(root)
    folder = _cifar100_folder(root)
    names = _unpickle(folder / "meta").get("fine_label_names")
    if not isinstance(names, list) or len(names) != 100:
        raise DatasetError(f"{folder / 'meta'}: no list of 100 fine_label_names")
    train_images, train_labels = _read_cifar_batch(folder / "train")
    test_images, test_labels = _read_cifar_batch(folder / "test")
    classes = tuple(str(n) for n in names)
    return _checked(
        ImageSet("cifar100", classes, train_images, train_labels, test_images, test_labels), root
    )


# -- SVHN (MATLAB v5 files of the cropped digits) ---------------------------------------------


def _read_svhn(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import scipy.io

    if not path.is_file():
        raise DatasetError(
            f"SVHN file {path} is missing: data.root must hold {' and '.join(SVHN_FILES)} "
            f"(torchvision's layout).\n{_fetch_hint('SVHN', path.parent)}"
        )
    try:  # plain arrays: a .mat file holds data, never code
        mat = scipy.io.loadmat(path, variable_names=["X", "y"])
        images, labels = np.asarray(mat["X"]), np.asarray(mat["y"]).reshape(-1)
    except Exception as err:  # scipy raises many kinds for a damaged or foreign file
        raise DatasetError(f"{path}: not a readable SVHN file ({err!r})") from err
    if images.ndim != 4 or images.shape[:3] != (32, 32, 3) or images.dtype != np.uint8:
        raise DatasetError(f"{path}: X is {images.dtype} {images.shape}, expected uint8 32x32x3xN")
    if len(labels) != images.shape[3]:
        raise DatasetError(f"{path}: {images.shape[3]} images but {len(labels)} labels")
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 1 or labels.max() > 10):
        raise DatasetError(f"{path}: labels run {labels.min()}..{labels.max()}, expected 1..10")
    labels[labels == 10] = 0  # SVHN writes the digit 0 as class 10
    return np.ascontiguousarray(images.transpose(3, 2, 0, 1)), labels


def load_svhn(root: str | Path) -> ImageSet:
    root = Path(root)
    train = _read_svhn(root / SVHN_FILES[0])
    test = _read_svhn(root / SVHN_FILES[1])
    classes = tuple(str(d) for d in range(10))
    return _checked(ImageSet("svhn", classes, *train, *test), root)


# -- STL-10 (raw binaries of 96x96 images, column-major) ---------------------------------------


def _stl10_folder(root: Path) -> Path:
    for candidate in (root / "stl10_binary", root):
        if all((candidate / f).is_file() for f in STL10_FILES):
            return candidate
    raise DatasetError(
        f"STL-10 not found under {root}: expected {root}/stl10_binary/ with "
        f"{', '.join(STL10_FILES)} (torchvision's layout).\n{_fetch_hint('STL10', root)}"
    )


def _read_stl10(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    pixels = np.fromfile(folder / f"{split}_X.bin", dtype=np.uint8)
    labels = np.fromfile(folder / f"{split}_y.bin", dtype=np.uint8).astype(np.int64)
    image = 3 * 96 * 96
    if pixels.size % image:
        raise DatasetError(f"{folder}/{split}_X.bin: {pixels.size} bytes, not whole 96x96 images")
    if pixels.size // image != len(labels):
        raise DatasetError(
            f"{folder}: {split}_X.bin holds {pixels.size // image} images, {split}_y.bin "
            f"{len(labels)} labels"
        )
    if labels.size and (labels.min() < 1 or labels.max() > 10):
        raise DatasetError(f"{folder}/{split}_y.bin: labels run outside 1..10")
    # stored column-major per channel: transposed, as torchvision reads them
    images = pixels.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2)
    return np.ascontiguousarray(images), labels - 1


def load_stl10(root: str | Path) -> ImageSet:
    """STL-10's labelled splits (5,000 train, 8,000 test); its unlabelled images are not used."""
    root = Path(root)
    folder = _stl10_folder(root)
    classes = tuple((folder / "class_names.txt").read_text().split())
    if len(classes) != 10:
        raise DatasetError(f"{folder}/class_names.txt names {len(classes)} classes, expected 10")
    train = _read_stl10(folder, "train")
    test = _read_stl10(folder, "test")
    return _checked(ImageSet("stl10", classes, *train, *test), root)


# -- an image folder (torchvision's ImageFolder layout), at a fixed resolution -----------------


def _folder_split(root: Path, split: str) -> Path | None:
    for name in (split,) if split == "train" else ("val", "test"):
        if (root / name).is_dir():
            return root / name
    return None


def _images_in(folder: Path, classes: tuple[str, ...]) -> tuple[list[Path], np.ndarray]:
    files, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(
            p
            for p in (folder / name).rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        files += found
        labels += [label] * len(found)
    return files, np.asarray(labels, dtype=np.int64)


class FolderImages:
    """One split of an image folder as a lazy uint8 (N, 3, R, R) array: indexing with an array
    of positions decodes those files only (RGB; the shorter side resized to R with antialiased
    bilinear interpolation, then the centre R x R crop: torchvision's `Resize(R)` and
    `CenterCrop(R)`)."""

    def __init__(self, root: Path, files: list[Path], resolution: int):
        self.root, self.files, self.resolution = root, files, resolution
        self.read: list[Path] = []  # every file decoded, for its SHA-256

    def __len__(self) -> int:
        return len(self.files)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.files), 3, self.resolution, self.resolution)

    def __getitem__(self, index) -> np.ndarray:
        positions = np.arange(len(self.files))[index]
        return np.stack([self._decode(self.files[i]) for i in np.atleast_1d(positions)])

    def _decode(self, path: Path) -> np.ndarray:
        from PIL import Image
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as F

        Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as img:
                    img = img.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError, Warning) as err:
            raise DatasetError(f"{path}: not a readable image ({err})") from err
        r = self.resolution
        img = F.center_crop(F.resize(img, r, InterpolationMode.BILINEAR, antialias=True), r)
        self.read.append(path)
        return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


def load_image_folder(root: str | Path, resolution: int) -> ImageSet:
    """`root/train/<class>/...` and `root/val/<class>/...` (or `test/`): the classes are the
    train folder's subfolders, in sorted order, as torchvision's ImageFolder numbers them."""
    root = Path(root)
    train_dir, eval_dir = _folder_split(root, "train"), _folder_split(root, "val")
    if train_dir is None or eval_dir is None:
        raise DatasetError(
            f"image folder {root}: expected {root}/train/<class>/<images> and "
            f"{root}/val/<class>/<images> (or test/ for val/), as torchvision's ImageFolder reads"
        )
    classes = tuple(sorted(p.name for p in train_dir.iterdir() if p.is_dir()))
    extra = sorted({p.name for p in eval_dir.iterdir() if p.is_dir()} - set(classes))
    if not classes or extra:
        why = f"classes {extra} are in {eval_dir.name}/ only" if extra else "no class folders"
        raise DatasetError(f"image folder {root}: {why}")
    splits = []
    for folder in (train_dir, eval_dir):
        files, labels = _images_in(folder, classes)
        if not files:
            raise DatasetError(f"image folder {folder}: no images ({', '.join(IMAGE_EXTENSIONS)})")
        splits += [FolderImages(root, files, resolution), labels]
    return _checked(ImageSet("image-folder", classes, *splits), root)


# -- common ------------------------------------------------------------------------------------


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


LOADERS = {
    "fashion-mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "svhn": load_svhn,
    "stl10": load_stl10,
    "image-folder": load_image_folder,
}


def source_files(name: str, root: str | Path) -> list[Path] | None:
    """The files the data set's loader reads under `root`; None when one is missing. (An image
    folder's are the images a study decodes: `ImageSet` splits record them.)"""
    root = Path(root)
    try:
        if name == "fashion-mnist":
            files = [root / f for f in FASHION_MNIST_FILES.values()]
        elif name == "cifar10":
            folder = _cifar_folder(root)
            files = [*sorted(folder.glob("data_batch_*")), folder / "test_batch"]
        elif name == "cifar100":
            folder = _cifar100_folder(root)
            files = [folder / f for f in ("train", "test", "meta")]
        elif name == "svhn":
            files = [root / f for f in SVHN_FILES]
        elif name == "stl10":
            folder = _stl10_folder(root)
            files = [folder / f for f in STL10_FILES]
        else:
            return None
    except DatasetError:
        return None
    return files if all(f.is_file() for f in files) else None


def file_sha256(files: list[Path], root: Path | None = None) -> dict[str, str]:
    """SHA-256 of each file, keyed by its name (or its path below `root`)."""
    digests = {}
    for path in files:
        with open(path, "rb") as fh:
            key = str(path.relative_to(root)) if root else path.name
            digests[key] = hashlib.file_digest(fh, "sha256").hexdigest()
    return digests


def source_sha256(name: str, root: str | Path) -> dict[str, str] | None:
    """SHA-256 of each file the loader reads, by file name, whatever folder holds them (None
    when one is missing, or for an image folder, whose files are recorded as they are read)."""
    files = source_files(name, root)
    return None if files is None else file_sha256(files)
