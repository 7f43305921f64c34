"""Every bad input: one line naming the file or option, exit code 2, no traceback, no debris."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from biotune.cli import main

SMALL = ["--image-size", "32", "--train-size", "20", "--val-size", "10", "--test-size", "10"]


def _run(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    err = capsys.readouterr().err
    return code, err


def _image(path: Path, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((12, 12, 3), value, dtype=np.uint8)
    Image.fromarray(arr).save(path)


def _folder(root: Path, classes=("cat", "dog"), per_class: int = 12) -> Path:
    for c, name in enumerate(classes):
        for i in range(per_class):
            _image(root / name / f"{i}.png", 20 * c + i)
    return root


def _assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = [x for x in err.strip().splitlines() if x.strip()]
    error_lines = [x for x in lines if "error:" in x]
    assert len(error_lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in error_lines[0], (needle, err)


def _search_error(argv: list[str], tmp_path: Path, capsys, *needles: str) -> None:
    run_dir = tmp_path / "run"
    code, err = _run(["search", "--run-dir", str(run_dir), "--quiet", *SMALL, *argv], capsys)
    _assert_one_line_error(code, err, *needles)
    assert not (run_dir / "config.json").exists(), "a refused search left a run directory"
    assert not run_dir.exists()


def test_missing_data_folder(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    _search_error(["--dataset", str(missing)], tmp_path, capsys, str(missing))


def test_empty_data_folder(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    _search_error(["--dataset", str(empty)], tmp_path, capsys, str(empty), "sub-folder")


def test_class_folder_without_images(tmp_path, capsys):
    root = _folder(tmp_path / "data")
    (root / "bird").mkdir()
    (root / "bird" / "notes.txt").write_text("no images here")
    _search_error(["--dataset", str(root)], tmp_path, capsys, "bird", "no images")


def test_only_one_class(tmp_path, capsys):
    root = _folder(tmp_path / "data", classes=("cat",))
    _search_error(["--dataset", str(root)], tmp_path, capsys, "one class")


def test_corrupt_image_refused_when_asked(tmp_path, capsys):
    root = _folder(tmp_path / "data")
    (root / "cat" / "broken.png").write_bytes(b"not a png at all")
    _search_error(["--dataset", str(root), "--bad-images", "error"], tmp_path, capsys, "broken.png")


def test_corrupt_image_skipped_with_one_warning(tmp_path, capsys):
    root = _folder(tmp_path / "data")
    (root / "cat" / "broken.png").write_bytes(b"not a png at all")
    (root / "dog" / "broken2.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.warns(UserWarning) as caught:
        code, err = _run(
            [
                "train",
                "--plan",
                "head",
                "--dataset",
                str(root),
                "--image-size",
                "32",
                "--epochs",
                "1",
                "--seeds",
                "1",
            ],
            capsys,
        )
    assert code == 0, err
    skipped = [str(w.message) for w in caught if "unreadable" in str(w.message)]
    assert len(skipped) == 1  # (other warnings: the splits are tiny)
    assert "skipped 2" in skipped[0] and "broken.png" in skipped[0]
    assert "Traceback" not in err


def test_class_sets_that_differ_between_splits(tmp_path, capsys):
    root = tmp_path / "data"
    _folder(root / "train", classes=("cat", "dog"))
    _folder(root / "test", classes=("cat", "cow"))
    _search_error(["--dataset", str(root)], tmp_path, capsys, "cow")


def test_unknown_model_lists_close_matches(tmp_path, capsys):
    _search_error(["--model", "efficientnet_lite9"], tmp_path, capsys, "efficientnet_lite")


def test_unknown_dataset_lists_close_matches(tmp_path, capsys):
    _search_error(["--dataset", "animal_shap"], tmp_path, capsys, "animal-shape")


def test_checkpoint_that_does_not_fit_the_model(tmp_path, capsys):
    ckpt = tmp_path / "other.pt"
    torch.save({"layer.weight": torch.zeros(3, 3)}, ckpt)
    _search_error(["--checkpoint", str(ckpt)], tmp_path, capsys, "other.pt")


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--population", "4", "--elite", "4"], "elite"),
        (["--data-fraction", "1.5"], "data_fraction"),
        (["--data-fraction", "0"], "data_fraction"),
        (["--epochs", "0"], "--epochs"),
        (["--generations", "-1"], "generations"),
        (["--lr", "-0.1"], "base_lr"),
        (["--seeds", "x"], "--seeds"),
        (["--max-trainable", "-5%"], "--max-trainable: expected a percentage in (0, 100]"),
        (["--max-memory", "-30"], "--max-memory: expected a positive number of MB"),
        (["--cache-memory", "lots"], "--cache-memory: expected 'auto' or a number of MB"),
        (["--per-gpu", "0"], "--per-gpu: expected a positive integer, got 0"),
        (["--executor", "process", "--per-gpu", "x"], "--per-gpu: expected a positive integer"),
        (["--max-ft-equivalents", "-1"], "--max-ft-equivalents: expected a positive number"),
        (["--promote", "2", "--rerank", "2"], "--promote 2 must exceed --rerank 2"),
    ],
)
def test_invalid_search_settings(argv, needle, tmp_path, capsys):
    _search_error(argv, tmp_path, capsys, needle)


def test_unwritable_run_directory(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, err = _run(["search", "--run-dir", str(blocker / "run"), "--quiet", *SMALL], capsys)
    _assert_one_line_error(code, err, str(blocker / "run"))


def test_malformed_plan_json(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    plan.write_text('{"blocks": [')
    code, err = _run(["train", "--plan", str(plan), *SMALL], capsys)
    _assert_one_line_error(code, err, "plan.json")


def test_resume_of_a_directory_without_a_search(tmp_path, capsys):
    code, err = _run(["search", "--resume", str(tmp_path)], capsys)
    _assert_one_line_error(code, err, str(tmp_path))


def test_errors_leave_the_process_with_code_2_and_no_traceback(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "biotune.cli",
            "search",
            "--model",
            "resnet5",
            "--run-dir",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "resnet50" in result.stderr
    assert not (tmp_path / "run").exists()
