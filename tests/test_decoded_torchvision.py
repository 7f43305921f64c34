"""torchvision datasets decoded once, as image folders are: the same pixels, targets and
trainings as reading their items lazily, one-line errors for unreadable files, a store file
named by what its pixels are, and the lazy path where one asks for it or the disk is full.

The datasets are torchvision's own classes (DTD reads image files, MNIST holds arrays), opened
offline from small files written here."""

from __future__ import annotations

import copy
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets
from conftest import make_tiny_cnn
from PIL import Image

from biotune import decoded as decoded_module
from biotune.blocks import partition_blocks
from biotune.core.plan import BlockSetting, FineTunePlan, encode_plan
from biotune.data import DatasetSplits, _pil_transform, _TorchvisionImages, load_dataset
from biotune.decoded import DecodedImages
from biotune.errors import BioTuneError
from biotune.features import FeatureCache, block_chain
from biotune.runner.fitness import Evaluator, SearchProtocol
from biotune.training import TrainConfig, batches, fine_tune

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIZE = 24  # resized to 24 * 232 / 224 = 24, then cropped: DTD's photos are larger
MNIST_SIZE = 32  # MNIST's 28 px upsampled to 33, then cropped
DTD_CLASSES = ("banded", "dotted", "zigzag")


def _dtd_root(root: Path) -> Path:
    """DTD's layout (dtd/dtd/images/CLASS/*.jpg, dtd/dtd/labels/SPLIT1.txt): JPEGs of varied
    sizes, a grey JPEG and an RGBA PNG, which torchvision converts to RGB itself."""
    data = root / "dtd" / "dtd"
    rng = np.random.default_rng(0)
    lines: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for c, name in enumerate(DTD_CLASSES):
        (data / "images" / name).mkdir(parents=True)
        for i in range(12):
            h, w = (int(v) for v in rng.integers(26, 61, size=2))
            pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) // 2 + 40 * c
            file = f"{name}_{i:04d}.jpg"
            Image.fromarray(pixels).save(data / "images" / name / file, quality=90)
            lines["train" if i < 6 else "val" if i < 9 else "test"].append(f"{name}/{file}")
    grey = rng.integers(0, 256, size=(30, 45), dtype=np.uint8)
    Image.fromarray(grey).save(data / "images" / "banded" / "banded_0100.jpg")
    rgba = rng.integers(0, 256, size=(40, 28, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(data / "images" / "dotted" / "dotted_0100.png")
    lines["train"] += ["banded/banded_0100.jpg", "dotted/dotted_0100.png"]
    (data / "labels").mkdir()
    for split, names in lines.items():
        (data / "labels" / f"{split}1.txt").write_text("\n".join(names) + "\n")
    return root


def _idx(path: Path, array: np.ndarray) -> None:
    """An MNIST file: the idx header (uint8, big-endian sizes), then the bytes."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _mnist_root(root: Path) -> Path:
    """MNIST's raw idx files: 8 training and 3 test digits per class, random pixels."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for prefix, per_class in (("train", 8), ("t10k", 3)):
        labels = np.repeat(np.arange(10), per_class)
        images = rng.integers(0, 256, size=(len(labels), 28, 28)) // 2 + 12 * labels[:, None, None]
        _idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return root


_ROOTS = {"dtd": (_dtd_root, SIZE, len(DTD_CLASSES)), "mnist": (_mnist_root, MNIST_SIZE, 10)}


def _load(name: str, root: Path, decode_once: bool) -> DatasetSplits:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small val / test splits
        return load_dataset(name, _ROOTS[name][1], MEAN, STD, root=root, decode_once=decode_once)


def _make(name: str, tmp_path: Path) -> Path:
    return _ROOTS[name][0](tmp_path / name)


def _all_batches(ds: torch.utils.data.Dataset, size: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*batches(ds, size, shuffle=True, seed=3), strict=True)
    return torch.cat(xs), torch.cat(ys)


@pytest.mark.parametrize("name", ["dtd", "mnist"])
def test_a_decoded_torchvision_dataset_gives_the_pixels_of_reading_it_lazily(
    tmp_path: Path, name: str
) -> None:
    root = _make(name, tmp_path)
    lazy, decoded = _load(name, root, decode_once=False), _load(name, root, decode_once=True)
    assert lazy.classes == decoded.classes
    stores = set()
    for split in ("train", "val", "test"):
        lazy_split, decoded_split = getattr(lazy, split), getattr(decoded, split)
        assert isinstance(lazy_split, _TorchvisionImages)
        assert isinstance(decoded_split, DecodedImages)
        stores.add(id(decoded_split.store))
        assert np.array_equal(lazy_split.targets, decoded_split.targets)
        assert decoded_split.files == lazy_split.files()
        x_lazy, y_lazy = _all_batches(lazy_split)
        x_decoded, y_decoded = _all_batches(decoded_split)
        assert torch.equal(y_lazy, y_decoded)
        assert x_decoded.dtype == torch.float32 and torch.equal(x_lazy, x_decoded)
    assert len(stores) == 1  # the three splits share one store
    if name == "dtd":
        assert all(isinstance(f, Path) and f.exists() for f in decoded.train.files)
    else:
        assert decoded.train.files is None  # MNIST holds arrays, not files

    # The lazy path is what torchvision gives with our transform inside it (as before).
    size = _ROOTS[name][1]
    split = {"split": "test", "partition": 1} if name == "dtd" else {"train": False}
    cls = torchvision.datasets.DTD if name == "dtd" else torchvision.datasets.MNIST
    reference = cls(str(root), transform=_pil_transform(size, MEAN, STD), **split)
    expected = torch.stack([reference[i][0] for i in range(len(reference))])
    assert torch.equal(torch.stack([decoded.test[i][0] for i in range(len(expected))]), expected)


@pytest.mark.parametrize("name", ["dtd", "mnist"])
def test_training_on_a_decoded_torchvision_dataset_is_bit_identical_to_reading_it_lazily(
    tmp_path: Path, name: str
) -> None:
    root = _make(name, tmp_path)
    config = TrainConfig(epochs=2, patience=2, batch_size=5, eval_batch_size=4)
    torch.manual_seed(0)
    model = make_tiny_cnn(_ROOTS[name][2])
    results, states = [], []
    for decode_once in (False, True):
        splits = _load(name, root, decode_once)
        trained = copy.deepcopy(model)
        groups = [{"params": list(trained.parameters())}]
        results.append(fine_tune(trained, groups, splits.train, splits.val, config, seed=1))
        states.append(trained.state_dict())
    assert results[0].history == results[1].history and results[0].val == results[1].val
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_a_search_evaluation_on_a_decoded_torchvision_dataset_scores_as_the_lazy_one(
    tmp_path: Path,
) -> None:
    """Folds of the store and the feature cache built from it, end to end (scored by the
    likelihood, which any change of a pixel moves)."""
    root = _make("dtd", tmp_path)
    torch.manual_seed(0)
    model = make_tiny_cnn()
    partition = partition_blocks(model)
    plan = FineTunePlan(tuple(BlockSetting(n, i >= 2, 1.0) for i, n in enumerate(partition.names)))
    train = TrainConfig(epochs=2, patience=2, batch_size=4, eval_batch_size=5, metric="likelihood")
    protocol = SearchProtocol(data_fraction=0.5, seeds=(0, 1), train=train, cache_features=True)
    records = []
    for decode_once in (False, True):
        evaluator = Evaluator(model, partition, _load("dtd", root, decode_once), protocol)
        records.append(evaluator.evaluate(0, encode_plan(plan), 1))
    lazy, decoded = records
    assert decoded.cached_prefix == lazy.cached_prefix == 2
    assert decoded.scores == lazy.scores and decoded.curves == lazy.curves
    assert decoded.fitness == lazy.fitness


def test_decode_once_false_reads_a_torchvision_dataset_from_its_files_every_time(
    tmp_path: Path,
) -> None:
    root = _make("dtd", tmp_path)
    lazy, decoded = _load("dtd", root, decode_once=False), _load("dtd", root, decode_once=True)
    before_lazy, before_decoded = lazy.test[0][0], decoded.test[0][0]
    Image.new("RGB", (40, 40), (255, 0, 0)).save(lazy.test.files()[0], format="JPEG")
    assert not torch.equal(lazy.test[0][0], before_lazy)  # read again
    assert torch.equal(decoded.test[0][0], before_decoded)  # decoded once


def test_an_unreadable_torchvision_image_is_a_one_line_error_naming_it(tmp_path: Path) -> None:
    root = _make("dtd", tmp_path)
    broken = root / "dtd" / "dtd" / "images" / "dotted" / "dotted_0007.jpg"  # in val
    broken.write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(BioTuneError, match="unreadable image") as error:
        _load("dtd", root, decode_once=True)
    assert f"'{broken}'" in str(error.value) and "\n" not in str(error.value)
    lazy = _load("dtd", root, decode_once=False)  # nothing read yet
    index = lazy.val.files().index(broken)
    with pytest.raises(BioTuneError, match="unreadable image") as error:
        lazy.val[index]
    assert f"'{broken}'" in str(error.value) and "\n" not in str(error.value)


def test_a_torchvision_store_file_is_named_by_its_pixels_and_mapped_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from biotune import data

    monkeypatch.setattr(decoded_module, "IN_MEMORY_BYTES", 0)  # every store a file
    monkeypatch.setenv("BIOTUNE_DECODED_DIR", str(tmp_path / "stores"))
    root = _make("mnist", tmp_path)
    first = _load("mnist", root, decode_once=True)
    assert first.train.store.path is not None and first.train.store.path.exists()

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded again")

    with monkeypatch.context() as patch:
        patch.setattr(data, "_read_torchvision", refuse)
        again = _load("mnist", root, decode_once=True)
    assert again.train.store.path == first.train.store.path
    assert torch.equal(_all_batches(again.train)[0], _all_batches(first.train)[0])

    images = root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    pixels = bytearray(images.read_bytes())
    pixels[-1] ^= 0xFF  # one pixel of the last training digit
    images.write_bytes(bytes(pixels))
    changed = _load("mnist", root, decode_once=True)
    assert changed.train.store.path != first.train.store.path
    assert len(list((tmp_path / "stores").glob("*.u8"))) == 2


def test_a_store_the_disk_has_no_room_for_leaves_the_dataset_lazy_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(decoded_module, "IN_MEMORY_BYTES", 0)
    monkeypatch.setenv("BIOTUNE_DECODED_DIR", str(tmp_path / "stores"))
    full = types.SimpleNamespace(total=10**9, used=10**9 - 2**20, free=2**20)
    monkeypatch.setattr(decoded_module.shutil, "disk_usage", lambda path: full)
    root = _make("dtd", tmp_path)
    with pytest.warns(UserWarning, match="need .* GiB under .* which has 0.0 GiB free") as caught:
        splits = load_dataset("dtd", SIZE, MEAN, STD, root=root)
    message = next(str(w.message) for w in caught if "GiB free" in str(w.message))
    assert "BIOTUNE_DECODED_DIR" in message and "\n" not in message
    assert isinstance(splits.train, _TorchvisionImages)
    assert not list((tmp_path / "stores").glob("*"))  # nothing half-written
    lazy = _load("dtd", root, decode_once=False)
    assert torch.equal(_all_batches(splits.train)[0], _all_batches(lazy.train)[0])


def test_a_feature_cache_reads_a_lazy_dataset_with_the_devices_loader_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from biotune import features, training

    lazy = _load("dtd", _make("dtd", tmp_path), decode_once=False)
    torch.manual_seed(0)
    model = make_tiny_cnn().eval()
    stages = block_chain(model, partition_blocks(model), lazy.val[0][0][None])
    assert stages is not None
    alone = FeatureCache(model, stages, 10**8, 4).features("val", lazy.val, 2)
    workers: list[int] = []

    class Spy(torch.utils.data.DataLoader):
        def __init__(self, *args: object, num_workers: int = 0, **kwargs: object) -> None:
            workers.append(num_workers)
            super().__init__(*args, num_workers=num_workers, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(training, "DataLoader", Spy)
    monkeypatch.setattr(features, "loader_options", lambda device: {"workers": 2})
    pooled = FeatureCache(model, stages, 10**8, 4).features("val", lazy.val, 2)
    assert 2 in workers
    assert alone is not None and pooled is not None
    assert alone.by_batch_size.keys() == pooled.by_batch_size.keys()
    assert all(torch.equal(t, pooled.by_batch_size[b]) for b, t in alone.by_batch_size.items())
