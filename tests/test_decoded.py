"""Image folders decoded once (``biotune.decoded``): the same pixels and the same trainings as
reading the files every epoch, a store shared by subsets, and a file-backed store reused."""

from __future__ import annotations

import copy
import functools
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_cnn
from PIL import Image

from biotune.blocks import partition_blocks
from biotune.core.plan import BlockSetting, FineTunePlan, encode_plan
from biotune.data import DatasetSplits, load_dataset, subset
from biotune.decoded import DecodedImages, PixelStore, decode_images
from biotune.errors import BioTuneError
from biotune.runner.fitness import Evaluator, SearchProtocol
from biotune.training import TrainConfig, batches, fine_tune

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _photo_folder(root: Path, per_class: int = 10) -> Path:
    """JPEGs of varied sizes and aspect ratios, plus a grey PNG and an RGBA PNG."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(("cat", "dog", "fox")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            h, w = (int(v) for v in rng.integers(20, 61, size=2))
            pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) // 2 + 40 * c
            Image.fromarray(pixels).save(root / name / f"{i}.jpg", quality=90)
    grey = rng.integers(0, 256, size=(30, 45), dtype=np.uint8)
    Image.fromarray(grey).save(root / "cat" / "grey.png")
    rgba = rng.integers(0, 256, size=(40, 25, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(root / "dog" / "alpha.png")
    return root


def _load(folder: Path, decode_once: bool, size: int = 16) -> DatasetSplits:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small val / test splits
        return load_dataset(str(folder), size, MEAN, STD, decode_once=decode_once)


def _all_batches(ds: torch.utils.data.Dataset, size: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*batches(ds, size, shuffle=True, seed=3), strict=True)
    return torch.cat(xs), torch.cat(ys)


def test_decoded_folder_gives_bit_identical_images_to_reading_the_files(tmp_path: Path) -> None:
    folder = _photo_folder(tmp_path)
    lazy, decoded = _load(folder, decode_once=False), _load(folder, decode_once=True)
    for split in ("train", "val", "test"):
        assert isinstance(getattr(decoded, split), DecodedImages)
        assert getattr(decoded, split).files == getattr(lazy, split).files
        x_lazy, y_lazy = _all_batches(getattr(lazy, split))
        x_decoded, y_decoded = _all_batches(getattr(decoded, split))
        assert torch.equal(y_lazy, y_decoded)
        assert x_decoded.dtype == torch.float32 and torch.equal(x_lazy, x_decoded)
    image, label = decoded.train[2]
    assert torch.equal(image, lazy.train[2][0]) and label == lazy.train[2][1]


def test_training_from_the_decoded_store_is_bit_identical_to_training_from_files(
    tmp_path: Path,
) -> None:
    folder = _photo_folder(tmp_path)
    lazy, decoded = _load(folder, decode_once=False), _load(folder, decode_once=True)
    config = TrainConfig(epochs=2, patience=2, batch_size=5, eval_batch_size=4)
    torch.manual_seed(0)
    model = make_tiny_cnn()
    results, states = [], []
    for splits in (lazy, decoded):
        trained = copy.deepcopy(model)
        groups = [{"params": list(trained.parameters())}]
        result = fine_tune(trained, groups, splits.train, splits.val, config, seed=1)
        results.append(result)
        states.append(trained.state_dict())
    assert results[0].history == results[1].history and results[0].val == results[1].val
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_subsets_share_the_store_and_keep_their_files(tmp_path: Path) -> None:
    decoded = _load(_photo_folder(tmp_path), decode_once=True)
    part = subset(decoded.train, np.array([3, 0, 5]))
    assert isinstance(part, DecodedImages) and part.store is decoded.train.store
    assert part.files == [decoded.train.files[i] for i in (3, 0, 5)]
    assert list(part.targets) == [decoded.train.targets[i] for i in (3, 0, 5)]
    assert torch.equal(part[1][0], decoded.train[0][0])


def test_a_file_backed_store_is_mapped_again_not_decoded_and_pickles_as_its_path(
    tmp_path: Path,
) -> None:
    folder = _photo_folder(tmp_path / "photos", per_class=3)
    files = sorted(folder.rglob("*.jpg"))

    def to_pixels(path: Path) -> Image.Image:
        return Image.open(path).convert("RGB").resize((8, 8))

    first = decode_images(files, 8, to_pixels, folder=tmp_path / "store", workers=0)
    assert first.path is not None and first.path.exists()
    assert not list((tmp_path / "store").glob("*.partial"))

    def refuse(path: Path) -> Image.Image:
        raise AssertionError("decoded again")

    again = decode_images(files, 8, refuse, folder=tmp_path / "store", workers=0)
    assert np.array_equal(np.asarray(again.pixels), np.asarray(first.pixels))
    state = pickle.dumps(again)
    assert len(state) < first.nbytes  # the path, not the pixels
    back = pickle.loads(state)
    assert isinstance(back, PixelStore) and back.path == first.path
    assert np.array_equal(np.asarray(back.pixels), np.asarray(first.pixels))


def test_an_image_broken_before_decoding_is_a_one_line_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from biotune import data

    folder = _photo_folder(tmp_path)
    broken = folder / "dog" / "3.jpg"

    def break_then_decode(*args: object, **kwargs: object) -> PixelStore:
        broken.write_bytes(b"\xff\xd8 not a jpeg any more")  # after the scan accepted it
        return decode_images(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(data, "decode_images", break_then_decode)
    with pytest.raises(BioTuneError, match="unreadable image") as error:
        _load(folder, decode_once=True)
    assert f"'{broken}'" in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("frozen", [0, 2])
def test_a_search_evaluation_scores_the_same_from_the_store_as_from_the_files(
    tmp_path: Path, frozen: int
) -> None:
    """Folds (subsets of the store) and the feature cache built from it, end to end (scored by
    the likelihood, which any change of a pixel moves)."""
    folder = _photo_folder(tmp_path)
    torch.manual_seed(0)
    model = make_tiny_cnn()
    partition = partition_blocks(model)
    plan = FineTunePlan(
        tuple(BlockSetting(n, i >= frozen, 1.0) for i, n in enumerate(partition.names))
    )
    train = TrainConfig(epochs=2, patience=2, batch_size=4, eval_batch_size=5, metric="likelihood")
    protocol = SearchProtocol(data_fraction=0.5, seeds=(0, 1), train=train, cache_features=True)
    records = []
    for decode_once in (False, True):
        splits = _load(folder, decode_once)
        evaluator = Evaluator(model, partition, splits, protocol)
        records.append(evaluator.evaluate(0, encode_plan(plan), 1))
    lazy, decoded = records
    assert decoded.cached_prefix == lazy.cached_prefix == frozen
    assert decoded.scores == lazy.scores and decoded.curves == lazy.curves
    assert decoded.fitness == lazy.fitness


def test_decoding_in_worker_processes_gives_the_same_pixels_and_one_line_errors(
    tmp_path: Path,
) -> None:
    from biotune.data import _read_resized, _resize_crop

    folder = _photo_folder(tmp_path, per_class=4)
    files = sorted(folder.rglob("*.jpg"))
    read = functools.partial(_read_resized, resize_crop=_resize_crop(16))
    alone = decode_images(files, 16, read, workers=0)
    pooled = decode_images(files, 16, read, workers=2)
    assert np.array_equal(alone.pixels, pooled.pixels)
    files[5].write_bytes(b"\xff\xd8 not a jpeg any more")
    with pytest.raises(BioTuneError, match="unreadable image") as error:
        decode_images(files, 16, read, workers=2)
    assert f"'{files[5]}'" in str(error.value) and "\n" not in str(error.value)
