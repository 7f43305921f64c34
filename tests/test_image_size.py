"""The image size: a user's photos at the model's native resolution, the offline demo datasets
at 32 px, ``--image-size`` over both, and the reason printed with the size."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from biotune.cli import main
from biotune.errors import BioTuneError
from biotune.runner.config import DataConfig
from biotune.runner.workbench import image_size_for, prepare


def _photos(root: Path, per_class: int = 5) -> Path:
    """A folder of 320x240 JPEGs, one sub-folder per class, as a camera would leave them."""
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.jpg", quality=85)
    return root


def _stop_after_loading(monkeypatch) -> None:
    """End a search right after its data are loaded and described (nothing is trained)."""
    from biotune.runner import workbench

    def stop(*args, **kwargs):
        raise BioTuneError("stopped by the test after loading the data")

    monkeypatch.setattr(workbench, "evaluator_for", stop)


def _data_line(caplog) -> str:
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data: ")]
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]
    return lines[0]


def test_a_photo_folder_is_searched_at_the_models_native_size_and_says_so(
    tmp_path, monkeypatch, caplog, capsys
):
    folder = _photos(tmp_path / "photos")
    _stop_after_loading(monkeypatch)
    with caplog.at_level(logging.INFO, logger="biotune"):
        code = main(["search", "--dataset", str(folder), "--run-dir", str(tmp_path / "run")])
    assert code == 2 and "stopped by the test" in capsys.readouterr().err
    line = _data_line(caplog)
    assert "224 px, efficientnet_lite0's native resolution" in line, line


def test_the_offline_demo_datasets_stay_at_32_px_and_say_why():
    bench = prepare(DataConfig(dataset="digits", train_size=30, val_size=20, test_size=20))
    assert bench.splits.image_size == 32
    assert bench.splits.val[0][0].shape[-1] == 32
    assert "32 px, the offline demo datasets' size" in bench.splits.describe()
    assert "224 px, --native-size" in bench.splits.describe()


def test_image_size_overrides_the_default_of_a_folder(tmp_path):
    folder = _photos(tmp_path / "photos", per_class=3)
    bench = prepare(DataConfig(dataset=str(folder), image_size=48))
    assert bench.splits.image_size == 48
    assert bench.splits.train[0][0].shape[-2:] == (48, 48)
    assert "48 px, as given (efficientnet_lite0's native resolution: 224 px)" in (
        bench.splits.describe()
    )


@pytest.mark.parametrize(
    ("dataset", "size", "expected"),
    [
        ("flowers102", None, 260),  # a torchvision dataset: the model's own
        ("path/to/photos", None, 260),
        ("animal-shape", None, 32),
        ("animal-shape", 64, 64),
        ("path/to/photos", 96, 96),
    ],
)
def test_image_size_rule(dataset, size, expected):
    data = DataConfig(model="efficientnet_lite2", dataset=dataset, image_size=size)
    assert image_size_for(data, 260, "Lite2's native resolution")[0] == expected


def test_native_size_gives_a_demo_dataset_the_models_resolution(tmp_path, monkeypatch, caplog):
    _stop_after_loading(monkeypatch)
    argv = ["search", "--dataset", "digits", "--train-size", "20", "--val-size", "10"]
    with caplog.at_level(logging.INFO, logger="biotune"):
        main([*argv, "--test-size", "10", "--native-size", "--run-dir", str(tmp_path / "r")])
    assert "224 px, efficientnet_lite0's native resolution" in _data_line(caplog)
