"""Datasets: offline pools, image folders and their validation, stratified deterministic splits."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from biotune.core.splits import stratified_folds
from biotune.data import (
    DatasetSplits,
    TensorImageDataset,
    available_datasets,
    load_dataset,
    subset,
)
from biotune.errors import BioTuneError

HALF = (0.5, 0.5, 0.5)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
OFFLINE = {"animal-shape": 10, "mnist-5k": 10, "digits": 10, "textures": 3}
NATIVE_SIZE = {"animal-shape": 28, "mnist-5k": 28, "digits": 8, "textures": 32}


def _splits(s: DatasetSplits) -> dict[str, torch.utils.data.Dataset]:
    return {"train": s.train, "val": s.val, "test": s.test}


def _assert_within_one_of_share(targets: np.ndarray, share: np.ndarray) -> None:
    counts = np.bincount(targets, minlength=len(share))
    expected = len(targets) * share
    assert np.all(np.abs(counts - expected) < 1 + 1e-9), (counts, expected)


def _image_hashes(ds: TensorImageDataset) -> list[str]:
    return [hashlib.sha1(img.numpy().tobytes()).hexdigest() for img in ds.images]


# ---------------------------------------------------------------------------------------------
# Offline datasets


@pytest.mark.parametrize("name", list(OFFLINE))
def test_offline_dataset_loads_requested_sizes_as_normalised_rgb(name: str) -> None:
    s = load_dataset(name, 16, HALF, HALF, train_size=40, val_size=20, test_size=30)
    assert s.name == name and s.image_size == 16
    assert len(s.classes) == OFFLINE[name]
    assert [len(d) for d in _splits(s).values()] == [40, 20, 30]
    for ds in _splits(s).values():
        image, label = ds[0]
        assert image.shape == (3, 16, 16) and image.dtype == torch.float32
        assert isinstance(label, int)
        assert ds.targets.dtype == np.int64
        assert ds.targets.min() >= 0 and ds.targets.max() < len(s.classes)
        assert float(ds.images.min()) >= -1.0 - 1e-6 and float(ds.images.max()) <= 1.0 + 1e-6
    assert name in s.describe() and "train 40" in s.describe()


def test_animal_shape_has_its_ten_animal_class_names() -> None:
    s = load_dataset("animal-shape", 8, HALF, HALF, train_size=30, val_size=10, test_size=10)
    assert s.classes[:3] == ["Bear", "Bird", "Cat"] and s.classes[-1] == "Zebra"


def test_per_channel_statistics_make_three_distinct_channels() -> None:
    s = load_dataset(
        "digits", 8, IMAGENET_MEAN, IMAGENET_STD, train_size=20, val_size=10, test_size=10
    )
    image, _ = s.train[0]
    raw = load_dataset("digits", 8, (0.0,), (1.0,), train_size=20, val_size=10, test_size=10)
    pixel = raw.train[0][0][0]
    for c in range(3):
        expected = (pixel - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        assert torch.allclose(image[c], expected, atol=1e-5)


@pytest.mark.parametrize("name", list(OFFLINE))
def test_offline_splits_are_disjoint_and_stratified(name: str) -> None:
    size = NATIVE_SIZE[name]  # no resizing: distinct source images stay distinct tensors
    s = load_dataset(name, size, HALF, HALF)
    hashes = [h for ds in _splits(s).values() for h in _image_hashes(ds)]
    assert len(set(hashes)) == len(hashes)
    all_targets = np.concatenate([ds.targets for ds in _splits(s).values()])
    share = np.bincount(all_targets) / len(all_targets)
    for ds in _splits(s).values():
        _assert_within_one_of_share(ds.targets, share)
    assert len(s.train) > len(s.val) > 0 and len(s.test) > 0


def test_subsamples_are_stratified_within_their_split() -> None:
    full = load_dataset("digits", 8, HALF, HALF, seed=3)
    small = load_dataset("digits", 8, HALF, HALF, seed=3, train_size=57, val_size=23, test_size=31)
    for split, ds in _splits(small).items():
        parent = _splits(full)[split].targets
        _assert_within_one_of_share(ds.targets, np.bincount(parent, minlength=10) / len(parent))
        assert set(_image_hashes(ds)) <= set(_image_hashes(_splits(full)[split]))


def test_sizes_asked_for_one_split_leave_the_others_unchanged() -> None:
    full = load_dataset("textures", 16, HALF, HALF, seed=1)
    small = load_dataset("textures", 16, HALF, HALF, seed=1, train_size=30)
    assert torch.equal(full.test.images, small.test.images)
    assert np.array_equal(full.val.targets, small.val.targets)


def test_same_seed_same_splits_and_another_seed_others() -> None:
    a = load_dataset("digits", 12, HALF, HALF, seed=5, train_size=100)
    b = load_dataset("digits", 12, HALF, HALF, seed=5, train_size=100)
    c = load_dataset("digits", 12, HALF, HALF, seed=6, train_size=100)
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(a, split).images, getattr(b, split).images)
        assert np.array_equal(getattr(a, split).targets, getattr(b, split).targets)
    assert not torch.equal(a.test.images, c.test.images)
    assert set(_image_hashes(a.test)) != set(_image_hashes(c.test))


def test_sizes_are_caps_so_small_datasets_are_used_whole() -> None:
    whole = load_dataset("digits", 8, HALF, HALF)
    capped = load_dataset("digits", 8, HALF, HALF, train_size=5000, val_size=50)
    assert len(capped.train) == len(whole.train)
    assert len(capped.val) == 50


def test_dataset_names_ignore_case_and_dash_or_underscore() -> None:
    s = load_dataset("MNIST_5K", 8, HALF, HALF, train_size=10, val_size=10, test_size=10)
    assert s.name == "mnist-5k"
    assert {"animal-shape", "mnist-5k", "digits", "textures", "cifar10", "isic"} <= set(
        available_datasets()
    )


def test_unknown_name_suggests_close_matches() -> None:
    with pytest.raises(
        BioTuneError, match="unknown dataset 'animal_shap'.*close matches: animal-shape"
    ):
        load_dataset("animal_shap", 8, HALF, HALF)


def test_torchvision_dataset_missing_offline_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(BioTuneError) as error:
        load_dataset("cifar10", 32, HALF, HALF, root=tmp_path)
    message = str(error.value)
    assert "dataset 'cifar10' not found under" in message and str(tmp_path) in message
    assert "--download" in message and "\n" not in message


def test_in_memory_subset_keeps_targets_and_batches_through_a_dataloader() -> None:
    s = load_dataset("digits", 8, HALF, HALF, train_size=50)
    part = subset(s.train, np.arange(10, 20))
    assert isinstance(part, TensorImageDataset)
    assert np.array_equal(part.targets, s.train.targets[10:20])
    assert torch.equal(part.images, s.train.images[10:20])
    images, labels = next(iter(DataLoader(part, batch_size=4)))
    assert images.shape == (4, 3, 8, 8) and labels.dtype == torch.int64


def _fake_torchvision_class(num_classes: int, sizes: dict[str, int], label_attribute: str):
    """Stands in for a downloaded torchvision dataset: same constructor, labels, classes, and
    PIL images made from an array of pixels, as CIFAR10 or MNIST make them."""

    class Fake(torch.utils.data.Dataset):
        def __init__(self, root, download=False, transform=None, train=None, split=None, **_):
            part = split if split is not None else ("train" if train else "test")
            labels = np.arange(sizes[part]) % num_classes
            setattr(self, label_attribute, labels.tolist())
            self.data = np.repeat(10 * labels.astype(np.uint8), 30 * 40).reshape(-1, 30, 40)
            self.classes = [f"kind{i}" for i in range(num_classes)]
            self.transform = transform

        def __len__(self) -> int:
            return len(getattr(self, label_attribute))

        def __getitem__(self, index: int):
            image = Image.fromarray(self.data[index])
            if self.transform is not None:
                image = self.transform(image)
            return image, getattr(self, label_attribute)[index]

    return Fake


@pytest.mark.parametrize(
    ("name", "cls", "label_attribute", "expected"),
    [
        ("cifar10", "CIFAR10", "targets", [90, 10, 30]),  # val carved from train
        ("flowers102", "Flowers102", "_labels", [100, 20, 30]),  # official val
    ],
)
def test_torchvision_datasets_keep_official_splits(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    name: str,
    cls: str,
    label_attribute: str,
    expected: list[int],
) -> None:
    import torchvision.datasets

    fake = _fake_torchvision_class(5, {"train": 100, "val": 20, "test": 30}, label_attribute)
    monkeypatch.setattr(torchvision.datasets, cls, fake)
    s = load_dataset(name, 24, HALF, HALF, root=tmp_path, seed=4)
    assert [len(d) for d in _splits(s).values()] == expected
    assert s.classes == [f"kind{i}" for i in range(5)]
    for ds in _splits(s).values():
        assert np.bincount(ds.targets, minlength=5).tolist() == [len(ds) // 5] * 5
        image, label = ds[len(ds) - 1]
        assert image.shape == (3, 24, 24) and label == ds.targets[-1]
        assert torch.allclose(image, torch.full_like(image, (10 * label / 255 - 0.5) / 0.5))
    small = load_dataset(name, 24, HALF, HALF, root=tmp_path, seed=4, train_size=25)
    assert np.bincount(small.train.targets).tolist() == [5] * 5


# ---------------------------------------------------------------------------------------------
# Stratified folds


def test_stratified_folds_partition_the_items_and_keep_class_shares() -> None:
    rng = np.random.default_rng(0)
    for _ in range(30):
        num_classes = int(rng.integers(2, 12))
        targets = rng.integers(0, num_classes, size=int(rng.integers(20, 400)))
        k = int(rng.integers(2, 6))
        folds = stratified_folds(targets, k, seed=int(rng.integers(0, 1000)))
        assert len(folds) == k
        assert np.array_equal(np.sort(np.concatenate(folds)), np.arange(len(targets)))
        assert max(map(len, folds)) - min(map(len, folds)) <= 1
        share = np.bincount(targets, minlength=num_classes) / len(targets)
        for fold in folds:
            counts = np.bincount(targets[fold], minlength=num_classes)
            assert np.all(np.abs(counts - len(fold) * share) < 1 + 1e-9)


def test_stratified_folds_depend_on_the_seed_only() -> None:
    targets = np.repeat(np.arange(4), 25)
    first = stratified_folds(targets, 2, seed=7)
    again = stratified_folds(targets, 2, seed=7)
    other = stratified_folds(targets, 2, seed=8)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(first[0], other[0])
    assert np.array_equal(stratified_folds(targets, 1, seed=0)[0], np.arange(100))


# ---------------------------------------------------------------------------------------------
# Image folders


def _write_images(folder: Path, count: int, mode: str = "RGB", size: int = 20) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        value = (i * 37) % 256
        color = value if mode == "L" else (value, 255 - value, 128)
        Image.new(mode, (size, size + 4), color).save(folder / f"img{i}.png")


def test_image_folder_without_split_folders_is_split_deterministically(tmp_path: Path) -> None:
    _write_images(tmp_path / "pets" / "cat", 10)
    _write_images(tmp_path / "pets" / "dog", 10)
    s = load_dataset(str(tmp_path / "pets"), 16, IMAGENET_MEAN, IMAGENET_STD, seed=2)
    again = load_dataset(str(tmp_path / "pets"), 16, IMAGENET_MEAN, IMAGENET_STD, seed=2)
    assert s.name == "pets" and s.classes == ["cat", "dog"]
    assert [len(d) for d in _splits(s).values()] == [12, 4, 4]
    for ds in _splits(s).values():
        assert np.bincount(ds.targets, minlength=2).tolist() == [len(ds) // 2] * 2
        image, label = ds[0]
        assert image.shape == (3, 16, 16) and label in (0, 1)
    files = [set(map(str, getattr(s, split).files)) for split in ("train", "val", "test")]
    assert not (files[0] & files[1]) and not (files[0] & files[2]) and not (files[1] & files[2])
    assert files[2] == set(map(str, again.test.files))


def test_image_folder_with_train_val_test_folders_uses_them(tmp_path: Path) -> None:
    for split, count in (("train", 6), ("val", 2), ("test", 3)):
        for name in ("a", "b"):
            _write_images(tmp_path / split / name, count)
    s = load_dataset(str(tmp_path), 16, HALF, HALF)
    assert [len(d) for d in _splits(s).values()] == [12, 4, 6]
    assert all("/test/" in str(f) for f in s.test.files)


def test_image_folder_without_val_folder_carves_val_from_train(tmp_path: Path) -> None:
    for split, count in (("train", 10), ("test", 3)):
        for name in ("a", "b"):
            _write_images(tmp_path / split / name, count)
    s = load_dataset(str(tmp_path), 16, HALF, HALF, seed=0)
    assert [len(d) for d in _splits(s).values()] == [18, 2, 6]
    assert all("/train/" in str(f) for f in s.val.files)
    assert not set(s.val.files) & set(s.train.files)


def test_train_folder_without_test_folder_is_an_error(tmp_path: Path) -> None:
    _write_images(tmp_path / "train" / "a", 3)
    _write_images(tmp_path / "train" / "b", 3)
    with pytest.raises(BioTuneError, match="has train/ but no test/"):
        load_dataset(str(tmp_path), 16, HALF, HALF)


def test_isic_reads_the_folder_under_data_root(tmp_path: Path) -> None:
    _write_images(tmp_path / "isic" / "benign", 5)
    _write_images(tmp_path / "isic" / "malignant", 5)
    s = load_dataset("isic", 16, HALF, HALF, root=tmp_path, train_size=4)
    assert s.name == "isic" and s.classes == ["benign", "malignant"] and len(s.train) == 4
    with pytest.raises(BioTuneError, match="pass --data-root"):
        load_dataset("isic", 16, HALF, HALF)


def test_grey_and_rgba_images_become_three_channels(tmp_path: Path) -> None:
    _write_images(tmp_path / "grey", 5, mode="L")
    _write_images(tmp_path / "alpha", 5, mode="RGBA")
    s = load_dataset(str(tmp_path), 16, HALF, HALF)
    images = [s.train[i][0] for i in range(len(s.train))]
    assert all(image.shape == (3, 16, 16) for image in images)
    grey = next(
        img
        for img, label in zip(images, s.train.targets, strict=True)
        if s.classes[label] == "grey"
    )
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])


def test_missing_image_folder_is_an_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(BioTuneError, match="does not exist") as error:
        load_dataset("isic", 16, HALF, HALF, root=tmp_path / "nowhere")
    assert f"'{tmp_path / 'nowhere'}'" in str(error.value)


def test_folder_without_class_folders_is_an_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(BioTuneError, match="has no class sub-folders") as error:
        load_dataset(str(tmp_path / "empty"), 16, HALF, HALF)
    assert str(tmp_path / "empty") in str(error.value)


def test_class_folder_without_images_is_an_error_naming_it(tmp_path: Path) -> None:
    _write_images(tmp_path / "cat", 3)
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "notes.txt").write_text("no images here")
    with pytest.raises(BioTuneError, match="has no images") as error:
        load_dataset(str(tmp_path), 16, HALF, HALF)
    assert f"class folder '{tmp_path / 'dog'}'" in str(error.value)
    assert ".png" in str(error.value)


def test_a_single_class_is_an_error_naming_the_folder(tmp_path: Path) -> None:
    _write_images(tmp_path / "only" / "cat", 4)
    with pytest.raises(BioTuneError, match="only one class") as error:
        load_dataset(str(tmp_path / "only"), 16, HALF, HALF)
    assert str(tmp_path / "only") in str(error.value)


def _add_corrupt_files(folder: Path) -> None:
    (folder / "garbage.png").write_bytes(b"this is not an image")
    good = (folder / "img0.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])


def test_unreadable_images_are_skipped_with_one_warning(tmp_path: Path) -> None:
    _write_images(tmp_path / "cat", 6)
    _write_images(tmp_path / "dog", 6)
    _add_corrupt_files(tmp_path / "dog")
    with pytest.warns(UserWarning, match="skipped 2 unreadable") as record:
        s = load_dataset(str(tmp_path), 16, HALF, HALF)
    skipped = [str(w.message) for w in record if str(w.message).startswith("skipped ")]
    assert len(skipped) == 1 and "garbage.png" in skipped[0]
    assert sum(len(d) for d in _splits(s).values()) == 12


def test_unreadable_image_is_an_error_when_asked(tmp_path: Path) -> None:
    _write_images(tmp_path / "cat", 6)
    _write_images(tmp_path / "dog", 6)
    _add_corrupt_files(tmp_path / "dog")
    with pytest.raises(BioTuneError, match="unreadable image") as error:
        load_dataset(str(tmp_path), 16, HALF, HALF, bad_images="error")
    assert str(tmp_path / "dog" / "garbage.png") in str(error.value)
