"""Data that would break a search late or silently: corrupt files, wide image modes, tiny splits."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from biotune.data import load_dataset, to_rgb
from biotune.errors import BioTuneError

HALF = (0.5, 0.5, 0.5)
DEFAULT_SIZES = {"train_size": 1000, "val_size": 500, "test_size": 1500}  # runner.DataConfig


def _write_jpegs(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """Noisy JPEGs, so that half of one holds a real part of its compressed data."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        pixels = rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
        paths.append(folder / f"img{i}.jpg")
        Image.fromarray(pixels).save(paths[-1], quality=90)
    return paths


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _jpeg_folder_with_a_truncated_file(root: Path) -> Path:
    _write_jpegs(root / "cat", 12, seed=0)
    truncated = _write_jpegs(root / "dog", 12, seed=1)[5]
    _truncate(truncated)
    with Image.open(truncated) as image:
        image.verify()  # headers intact: the check the scan used to rely on passes
    return truncated


def _read_every_item(splits) -> None:
    for ds in (splits.train, splits.val, splits.test):
        for i in range(len(ds)):
            ds[i]


# ---------------------------------------------------------------------------------------------
# Truncated and corrupt files


def test_truncated_jpeg_is_skipped_at_scan_time_with_a_warning_naming_it(tmp_path: Path) -> None:
    truncated = _jpeg_folder_with_a_truncated_file(tmp_path)
    with pytest.warns(UserWarning, match="skipped 1 unreadable") as record:
        s = load_dataset(str(tmp_path), 16, HALF, HALF)
    skipped = [str(w.message) for w in record if str(w.message).startswith("skipped ")]
    assert len(skipped) == 1 and str(truncated) in skipped[0] and "\n" not in skipped[0]
    files = [f for ds in (s.train, s.val, s.test) for f in ds.files]
    assert truncated not in files and len(files) == 23
    _read_every_item(s)  # what the search does, at any point of it: nothing left to crash


def test_truncated_jpeg_is_a_one_line_error_naming_it_when_asked(tmp_path: Path) -> None:
    truncated = _jpeg_folder_with_a_truncated_file(tmp_path)
    with pytest.raises(BioTuneError, match="unreadable image") as error:
        load_dataset(str(tmp_path), 16, HALF, HALF, bad_images="error")
    assert f"'{truncated}'" in str(error.value) and "truncated" in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "delete"])
def test_image_broken_after_the_scan_is_a_one_line_error_naming_it(
    tmp_path: Path, damage: str
) -> None:
    _write_jpegs(tmp_path / "cat", 12, seed=0)
    _write_jpegs(tmp_path / "dog", 12, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small val / test splits
        s = load_dataset(str(tmp_path), 16, HALF, HALF, decode_once=False)  # read on demand
    path = s.train.files[3]
    if damage == "truncate":
        _truncate(path)
    elif damage == "garbage":
        path.write_bytes(b"\xff\xd8 not a jpeg any more")
    else:
        path.unlink()
    with pytest.raises(BioTuneError, match="unreadable image") as error:
        s.train[3]
    assert f"'{path}'" in str(error.value) and "\n" not in str(error.value)
    image, _ = s.train[4]  # the others still read
    assert image.shape == (3, 16, 16)


# ---------------------------------------------------------------------------------------------
# Every image mode a file can hold -> a faithful RGB image


def _palette_grey(mode: str) -> Image.Image:
    image = Image.new(mode, (6, 5), 7 if mode == "P" else (7, 255))
    image.putpalette([128, 128, 128] * 256)
    return image


MID_GREY = {
    "L": lambda: Image.new("L", (6, 5), 128),
    "LA": lambda: Image.new("LA", (6, 5), (128, 255)),
    "P": lambda: _palette_grey("P"),
    "PA": lambda: _palette_grey("PA"),
    "RGB": lambda: Image.new("RGB", (6, 5), (128, 128, 128)),
    "RGBA": lambda: Image.new("RGBA", (6, 5), (128, 128, 128, 255)),
    "CMYK": lambda: Image.new("CMYK", (6, 5), (0, 0, 0, 127)),
    "YCbCr": lambda: Image.new("YCbCr", (6, 5), (128, 128, 128)),
    "I": lambda: Image.new("I", (6, 5), 128 * 257),
    "I;16": lambda: Image.new("I;16", (6, 5), 128 * 257),
    "F": lambda: Image.new("F", (6, 5), 128 / 255),  # float greys in 0..1
    "F (0..255)": lambda: Image.new("F", (6, 5), 128.0),
}


def _from_disk(image: Image.Image, folder: Path) -> Image.Image:
    """Saved and read back as TIFF, which holds every one of these modes."""
    path = folder / "image.tif"
    image.save(path)
    reread = Image.open(path)
    reread.load()
    return reread


@pytest.mark.parametrize("mode", list(MID_GREY))
def test_every_image_mode_keeps_mid_grey_mid_grey(tmp_path: Path, mode: str) -> None:
    image = _from_disk(MID_GREY[mode](), tmp_path)
    assert image.mode == mode.split()[0]
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == (6, 5)
    assert np.abs(np.asarray(rgb, dtype=int) - 128).max() <= 2


@pytest.mark.parametrize("bit", [0, 1])
def test_one_bit_images_are_black_and_white(tmp_path: Path, bit: int) -> None:
    rgb = to_rgb(_from_disk(Image.new("1", (6, 5), bit), tmp_path))
    assert rgb.mode == "RGB" and np.all(np.asarray(rgb) == 255 * bit)


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_sixteen_bit_range_maps_onto_0_to_255_not_white(tmp_path: Path, mode: str) -> None:
    ramp = np.linspace(0, 65535, 64).round().astype(np.uint16).reshape(8, 8)
    image = Image.fromarray(ramp)
    if mode == "I":
        image = image.convert("I")
    rgb = np.asarray(to_rgb(_from_disk(image, tmp_path)))
    assert image.mode == mode
    expected = np.rint(ramp / 257.0)
    for c in range(3):
        assert np.array_equal(rgb[..., c], expected)
    assert rgb.min() == 0 and rgb.max() == 255


def test_float_images_outside_0_to_1_are_clipped_and_nan_is_black() -> None:
    values = np.array([[-5.0, 0.0, 77.0, 300.0, np.nan]], dtype=np.float32)
    rgb = np.asarray(to_rgb(Image.fromarray(values)))
    assert rgb[0, :, 0].tolist() == [0, 0, 77, 255, 0]


def test_sixteen_bit_png_folder_loads_as_grey_not_white(tmp_path: Path) -> None:
    for name, level in (("dark", 10000), ("light", 50000)):
        (tmp_path / name).mkdir()
        for i in range(10):
            grey = np.full((20, 20), level + 100 * i, dtype=np.uint16)
            Image.fromarray(grey).save(tmp_path / name / f"{i}.png")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small val / test splits
        s = load_dataset(str(tmp_path), 16, (0.0,), (1.0,))
    for i in range(len(s.train)):
        image, label = s.train[i]
        level = 10000 if s.classes[label] == "dark" else 50000
        assert abs(float(image.mean()) - level / 65535) < 0.03, (s.classes[label], image.mean())


# ---------------------------------------------------------------------------------------------
# Splits too small to learn from or to judge by


def _png_classes(root: Path, per_class: dict[str, int]) -> None:
    for name, count in per_class.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.new("L", (12, 12), (i * 40) % 256).save(root / name / f"{i}.png")


def test_two_images_per_class_warn_that_val_and_test_are_tiny(tmp_path: Path) -> None:
    _png_classes(tmp_path, {"cat": 2, "dog": 2})
    with pytest.warns(UserWarning) as record:
        s = load_dataset(str(tmp_path), 16, HALF, HALF)
    assert len(s.val) == 1 and len(s.test) == 1
    messages = [str(w.message) for w in record]
    for split in ("val", "test"):
        [message] = [m for m in messages if f"the {split} split" in m]
        assert "fewer than 5 images for 2 of 2 classes" in message
        assert "cat (" in message and "dog (" in message and "\n" not in message


def test_a_small_requested_val_size_warns_naming_the_classes() -> None:
    with pytest.warns(UserWarning, match=r"the val split has fewer than 5 images") as record:
        load_dataset("textures", 8, HALF, HALF, val_size=9, test_size=30)
    [message] = [str(w.message) for w in record if "split" in str(w.message)]
    assert re.search(r"3 of 3 classes \(brick \(\d\), grass \(\d\), gravel \(\d\)\)", message)


def test_a_class_without_training_images_is_refused(tmp_path: Path) -> None:
    _png_classes(tmp_path, {"ant": 10, "bee": 10, "cow": 10})
    with pytest.raises(BioTuneError, match="no training image for 1 of 3 classes") as error:
        load_dataset(str(tmp_path), 16, HALF, HALF, train_size=2)
    assert "\n" not in str(error.value)
    with pytest.raises(BioTuneError, match=r"'digits': no training image for 5 of 10 classes"):
        load_dataset("digits", 8, HALF, HALF, train_size=5)


def test_an_empty_validation_split_is_refused(tmp_path: Path) -> None:
    _png_classes(tmp_path, {"cat": 1, "dog": 1})
    with pytest.raises(BioTuneError, match="too few images for a val split") as error:
        load_dataset(str(tmp_path), 16, HALF, HALF)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("name", ["animal-shape", "mnist-5k", "digits", "textures"])
def test_offline_datasets_at_default_sizes_load_without_any_warning(name: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = load_dataset(name, 8, HALF, HALF, **DEFAULT_SIZES)
    assert len(s.val) >= 5 * len(s.classes)


def test_sizes_used_by_the_search_tests_warn_but_load(recwarn: pytest.WarningsRecorder) -> None:
    s = load_dataset("animal-shape", 8, HALF, HALF, train_size=40, val_size=20, test_size=20)
    assert [len(s.train), len(s.val), len(s.test)] == [40, 20, 20]
    assert all(np.bincount(s.train.targets, minlength=10) > 0)
    assert torch.is_tensor(s.train[0][0])
    assert any("fewer than 5 images" in str(w.message) for w in recwarn)
