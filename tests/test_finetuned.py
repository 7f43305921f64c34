"""Your model and data in, a fine-tuned model out (issue 14)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import make_tiny_cnn, make_tiny_data
from PIL import Image
from torch import nn
from torch.utils.data import TensorDataset

import biotune
from biotune.errors import BioTuneError
from biotune.training import TrainConfig

TINY = TrainConfig(epochs=2, patience=2, batch_size=16, eval_batch_size=32, base_lr=1e-2)


def _tensor_data(n: int, seed: int) -> TensorDataset:
    """A plain TensorDataset (no .targets), the way a user would have one."""
    data = make_tiny_data(n, seed=seed)
    return TensorDataset(data.images, torch.as_tensor(data.targets))


def test_a_user_module_and_tensor_datasets_train_through_the_front_door(tmp_path):
    torch.manual_seed(0)
    model = make_tiny_cnn()
    learns = TrainConfig(epochs=4, patience=4, batch_size=16, base_lr=1e-2)
    trained, record = biotune.train(
        "full",
        model=model,
        train=_tensor_data(96, 0),
        val=_tensor_data(24, 1),
        test=_tensor_data(24, 2),
        config=learns,
        save=tmp_path / "out",
    )
    assert record["test_top1"] is not None and record["val_balanced"] > 0.5
    meta = json.loads((tmp_path / "out" / "finetuned.json").read_text())
    assert meta["architecture"] == "user:Sequential" and meta["preprocess"] is None
    assert meta["classes"] == ["0", "1", "2"]
    fresh = make_tiny_cnn()
    loaded = biotune.load_finetuned(tmp_path / "out", model=fresh)
    x = make_tiny_data(8, seed=5).images
    with torch.no_grad():
        assert torch.equal(loaded.model(x), trained.eval()(x))


def test_a_user_module_with_the_wrong_head_is_one_line_error():
    wrong = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5))
    with pytest.raises(BioTuneError, match="outputs of shape \\(1, 5\\).*3 classes"):
        biotune.train(
            "full", model=wrong, train=_tensor_data(30, 0), val=_tensor_data(15, 1), config=TINY
        )


def test_one_dataset_is_split_and_a_blocks_override_is_used(tmp_path):
    torch.manual_seed(0)
    blocks = {"features": ["0", "1", "2"], "head": ["4"]}
    trained, record = biotune.train(
        "head",
        model=make_tiny_cnn(),
        dataset=_tensor_data(90, 0),
        blocks=blocks,
        config=TINY,
    )
    assert record["trainable_params"] == sum(p.numel() for p in trained[4].parameters())
    with pytest.raises(BioTuneError, match="override"):
        biotune.train(
            "full",
            model=make_tiny_cnn(),
            dataset=_tensor_data(90, 0),
            blocks={"head": ["4"]},
            config=TINY,
        )


def _save_lite0(tmp_path):
    """Lite0 (offline weights) on Digits, the head trained briefly, saved."""
    trained, record = biotune.train(
        "head",
        model="efficientnet_lite0",
        dataset="digits",
        image_size=32,
        train_size=100,
        val_size=50,
        test_size=60,
        config=TINY,
        save=tmp_path / "lite0",
    )
    return trained, record


def test_saved_model_loads_in_a_fresh_process_with_identical_logits(tmp_path):
    trained, _ = _save_lite0(tmp_path)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = trained.eval()(x)
    torch.save(x, tmp_path / "x.pt")
    script = textwrap.dedent(f"""
        import torch, biotune
        ft = biotune.load_finetuned({str(tmp_path / "lite0")!r})
        x = torch.load({str(tmp_path / "x.pt")!r})
        with torch.no_grad():
            torch.save(ft.model(x), {str(tmp_path / "y.pt")!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True)
    assert torch.equal(torch.load(tmp_path / "y.pt"), expected)


def test_predict_on_test_images_agrees_with_the_test_predictions(tmp_path):
    """The original 8 x 8 pixels of test images, written as PNG files and classified by
    ``biotune predict``, get the classes the trained model gave those images in memory."""
    from biotune.data import _offline_pool, arrays_to_tensor, load_dataset

    trained, _ = _save_lite0(tmp_path)
    splits = load_dataset(
        "digits", 32, (0.5,) * 3, (0.5,) * 3, train_size=100, val_size=50, test_size=60
    )
    pool = _offline_pool("digits")
    resized = arrays_to_tensor(pool.images, 32, (0.5,) * 3, (0.5,) * 3)
    folder = tmp_path / "images"
    folder.mkdir()
    test_images = splits.test.images[:6]
    for i, image in enumerate(test_images):
        match = next(k for k in range(len(resized)) if torch.allclose(resized[k], image, atol=1e-5))
        Image.fromarray(pool.images[match][0]).save(folder / f"{i}.png")
    with torch.no_grad():
        expected = trained.eval()(test_images).argmax(1).tolist()
    out = subprocess.run(
        [sys.executable, "-m", "biotune", "predict", str(tmp_path / "lite0"), str(folder)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    assert [line.split("\t")[0].rsplit("/", 1)[1] for line in out] == [f"{i}.png" for i in range(6)]
    assert [line.split("\t")[1] for line in out] == [str(c) for c in expected]


def _tiny_search_config():
    from dataclasses import replace

    from biotune.core.evolution import EvolutionConfig
    from biotune.presets import default

    config = default()
    return replace(
        config,
        evolution=EvolutionConfig(population_size=3, generations=1, elite=1),
        protocol=replace(config.protocol, seeds=(0,), train=replace(TINY, epochs=1)),
        final=TINY,
        final_seeds=(0, 1),
    )


def test_a_search_on_a_user_module_and_tensor_datasets_saves_its_model(tmp_path):
    torch.manual_seed(0)
    result = biotune.search(
        tmp_path / "run",
        _tiny_search_config(),
        model=make_tiny_cnn(),
        train=_tensor_data(60, 0),
        val=_tensor_data(30, 1),
        test=_tensor_data(30, 2),
        progress=False,
    )
    run = tmp_path / "run"
    config = json.loads((run / "config.json").read_text())
    assert config["search"]["data"]["model"] == "user:Sequential"
    assert config["search"]["data"]["dataset"] == "user:TensorDataset"
    assert set(config["fingerprints"]) == {"model", "data", "weights"}
    best_seed = max(result.final["runs"], key=lambda r: r["val_balanced"])["seed"]
    meta = json.loads((run / "finetuned.json").read_text())
    assert meta["seed"] == best_seed == result.final["model"]["seed"]
    loaded = biotune.load_finetuned(run, model=make_tiny_cnn())
    assert loaded.classes == ["0", "1", "2"]
    origin = json.loads((run / "best_plan.json").read_text())["origin"]
    assert origin["partition"]["names"] == list(result.best_plan.names)

    # Resuming with other data (one label changed) is refused before anything runs.
    changed = _tensor_data(60, 0)
    changed.tensors[1][0] = (changed.tensors[1][0] + 1) % 3
    with pytest.raises(BioTuneError, match="the data .* changed"):
        biotune.search(
            run,
            _tiny_search_config(),
            model=make_tiny_cnn(),
            train=changed,
            val=_tensor_data(30, 1),
            test=_tensor_data(30, 2),
            resume=True,
            progress=False,
        )

    class OtherNet(nn.Sequential):
        """The same blocks and parameters, another class: another model."""

    # (its name is in the configuration, which is compared first)
    with pytest.raises(BioTuneError, match="cannot resume .*data.model: 'user:Sequential'"):
        biotune.search(
            run,
            _tiny_search_config(),
            model=OtherNet(*make_tiny_cnn()),
            train=_tensor_data(60, 0),
            val=_tensor_data(30, 1),
            test=_tensor_data(30, 2),
            resume=True,
            progress=False,
        )


def test_train_plan_uses_the_plans_origin_and_refuses_other_blocks(tmp_path, capsys):
    """A plan searched on Digits trains on Digits with no --dataset; on another model whose
    blocks have the same names but other parameters it is refused."""
    from biotune.cli import main

    config = _tiny_search_config()
    biotune.search(
        tmp_path / "run",
        config,
        model="efficientnet_lite0",
        dataset="digits",
        image_size=32,
        train_size=60,
        val_size=30,
        test_size=30,
        progress=False,
        final=False,
    )
    plan = str(tmp_path / "run" / "best_plan.json")
    assert main(["train", "--plan", plan, "--seeds", "0", "--epochs", "1"]) == 0
    err = capsys.readouterr().err
    assert "model efficientnet_lite0, dataset digits" in err and "digits: 10 classes" in err
    assert (
        main(
            [
                "train",
                "--plan",
                plan,
                "--model",
                "efficientnet_lite1",
                "--seeds",
                "0",
                "--epochs",
                "1",
            ]
        )
        == 2
    )
    assert "other blocks" in capsys.readouterr().err


def test_predict_skips_an_unreadable_image_with_a_warning(tmp_path):
    _save_lite0(tmp_path)
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("L", (8, 8), 128).save(folder / "good.png")
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    done = subprocess.run(
        [sys.executable, "-m", "biotune", "predict", str(tmp_path / "lite0"), str(folder)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0
    assert [line.split("\t")[0].rsplit("/", 1)[1] for line in done.stdout.splitlines()] == [
        "good.png"
    ]
    assert "skipped cannot read image" in done.stderr and "broken.png" in done.stderr
    (folder / "good.png").unlink()
    done = subprocess.run(
        [sys.executable, "-m", "biotune", "predict", str(tmp_path / "lite0"), str(folder)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "none of the 1 image file(s) could be read" in done.stderr


def test_predict_reads_a_batch_at_a_time_and_gives_the_same_classes(tmp_path, monkeypatch):
    """A folder larger than one batch is read and classified batch by batch (memory stays
    bounded), with an unreadable file in the middle skipped, and the same rows as one batch."""
    from biotune.finetuned import FineTuned, image_files, load_finetuned, predict_files

    _save_lite0(tmp_path)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(5):
        Image.new("L", (8, 8), 40 * i).save(folder / f"{i}.png")
    (folder / "2b.png").write_bytes(b"\x89PNG not really")
    finetuned = load_finetuned(tmp_path / "lite0")
    files = image_files([folder])
    with pytest.warns(UserWarning, match="2b.png"):
        whole = predict_files(finetuned, files, batch_size=64)
    sizes: list[int] = []
    original = FineTuned.probabilities

    def spy(self, images, batch_size=64, prepared=False):
        sizes.append(len(images))
        return original(self, images, batch_size, prepared)

    monkeypatch.setattr(FineTuned, "probabilities", spy)
    with pytest.warns(UserWarning, match="2b.png"):
        batched = predict_files(finetuned, files, batch_size=2)
    assert max(sizes) <= 2 and sum(sizes) == 5
    assert [r["file"] for r in batched] == [r["file"] for r in whole]
    assert [r["index"] for r in batched] == [r["index"] for r in whole]
    assert [r["probability"] for r in batched] == pytest.approx([r["probability"] for r in whole])


def test_predict_device_and_batch_size_options(tmp_path, capsys):
    from biotune.cli import main

    _save_lite0(tmp_path)
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("L", (8, 8), 128).save(folder / "a.png")
    model = str(tmp_path / "lite0")
    assert main(["predict", model, str(folder), "--device", "cpu", "--batch-size", "1"]) == 0
    assert capsys.readouterr().out.startswith(str(folder / "a.png"))
    assert main(["predict", model, str(folder), "--device", "gpu9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown device 'gpu9'" in err[0]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved Lite0 model (Digits, head trained briefly) shared by the checks below."""
    folder = tmp_path_factory.mktemp("saved")
    _save_lite0(folder)
    return folder / "lite0"


def _bomb(path) -> None:
    """A 15000 x 15000 PNG (27 KB): over PIL's decompression-bomb limit of 179 M pixels."""
    Image.new("1", (15000, 15000)).save(path)


def _one_error_line(err: str, *needles: str) -> None:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("biotune: error:"), err
    assert all(n in lines[0] for n in needles), err


def test_predict_csv_is_checked_first_and_written_into_new_folders(
    saved, tmp_path, capsys, monkeypatch
):
    import errno
    import os

    import biotune.cli._options
    import biotune.finetuned
    from biotune.cli import main

    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("L", (8, 8), 128).save(folder / "a.png")
    out = tmp_path / "nodir" / "sub" / "out.csv"
    assert main(["predict", str(saved), str(folder), "--csv", str(out)]) == 0
    capsys.readouterr()
    assert out.read_text().splitlines()[0] == "file,class,index,probability"
    assert out.read_text().splitlines()[1].startswith(str(folder / "a.png"))

    def classify(*_args, **_kwargs):
        raise AssertionError("images were classified before --csv was checked")

    monkeypatch.setattr(biotune.finetuned, "predict_files", classify)
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["predict", str(saved), str(folder), "--csv", str(blocker / "out.csv")]) == 2
    _one_error_line(capsys.readouterr().err, "--csv", "not a directory")

    def read_only(*_args, **_kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(biotune.cli._options.tempfile, "TemporaryFile", read_only)
    assert main(["predict", str(saved), str(folder), "--csv", str(tmp_path / "b.csv")]) == 2
    _one_error_line(capsys.readouterr().err, "--csv", "read-only file system")


def test_an_image_over_the_decompression_bomb_limit_is_skipped_with_the_reason(
    saved, tmp_path, capsys
):
    from biotune.cli import main

    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("L", (8, 8), 128).save(folder / "a.png")
    _bomb(folder / "huge.png")
    with pytest.warns(UserWarning, match="huge.png: over PIL's decompression-bomb limit"):
        assert main(["predict", str(saved), str(folder)]) == 0
    assert capsys.readouterr().out.startswith(str(folder / "a.png"))
    assert main(["predict", str(saved), str(folder), "--bad-images", "error"]) == 2
    _one_error_line(capsys.readouterr().err, "huge.png", "decompression-bomb")


def test_an_image_over_the_decompression_bomb_limit_in_a_training_folder_is_skipped(tmp_path):
    from biotune.data import load_dataset

    for c, name in enumerate(("cat", "dog")):
        (tmp_path / name).mkdir()
        for i in range(5):
            Image.new("L", (8, 8), 40 * c + i).save(tmp_path / name / f"{i}.png")
    _bomb(tmp_path / "cat" / "huge.png")
    mean = std = (0.5, 0.5, 0.5)
    with pytest.warns(UserWarning, match="huge.png': over PIL's decompression-bomb limit"):
        splits = load_dataset(str(tmp_path), 8, mean, std)
    assert sum(len(getattr(splits, s)) for s in ("train", "val", "test")) == 10
    with pytest.raises(BioTuneError, match="huge.png.*decompression-bomb"):
        load_dataset(str(tmp_path), 8, mean, std, bad_images="error")


@pytest.mark.parametrize(
    "damage", ["empty", "truncated", "garbage"], ids=["empty", "truncated", "garbage"]
)
def test_a_damaged_weights_file_is_a_one_line_error(saved, tmp_path, damage, capsys):
    import shutil

    from biotune.cli import main

    copy = tmp_path / "model"
    shutil.copytree(saved, copy)
    weights = copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(
        {"empty": b"", "truncated": data[: len(data) // 2], "garbage": b"\x00garbage" * 99}[damage]
    )
    with pytest.raises(BioTuneError, match="cannot load .*model.safetensors"):
        biotune.load_finetuned(copy)
    image = tmp_path / "a.png"
    Image.new("L", (8, 8), 128).save(image)
    assert main(["predict", str(copy), str(image)]) == 2
    _one_error_line(capsys.readouterr().err, "model.safetensors")


def test_probabilities_of_one_image_path_is_one_row(saved, tmp_path):
    finetuned = biotune.load_finetuned(saved)
    image = tmp_path / "a.png"
    Image.new("L", (8, 8), 128).save(image)
    one = finetuned.probabilities(str(image))
    assert one.shape == (1, len(finetuned.classes))
    assert torch.equal(one, finetuned.probabilities([image]))
    assert torch.equal(finetuned.probabilities(image), one)


def test_train_takes_a_plan_dict_as_a_best_plan_json_holds_it():
    from biotune.core.plan import FineTunePlan

    def run(plan):
        torch.manual_seed(0)
        data = {"train": _tensor_data(60, 0), "val": _tensor_data(15, 1)}
        return biotune.train(plan, model=make_tiny_cnn(), config=TINY, **data)[1]

    plan = FineTunePlan.head_only(biotune.partition_blocks(make_tiny_cnn()).names)
    as_dict = {**plan.to_dict(), "fitness": 0.4, "origin": {"base_lr": 1e-3}}
    by_dict, by_plan = run(as_dict), run(plan)
    assert {k: v for k, v in by_dict.items() if k != "seconds"} == {
        k: v for k, v in by_plan.items() if k != "seconds"
    }
    with pytest.raises(BioTuneError, match="plan must be a FineTunePlan, a plan dict"):
        biotune.train(3, model=make_tiny_cnn(), train=_tensor_data(60, 0), val=_tensor_data(15, 1))


def test_a_frozen_head_parameter_is_redrawn_per_seed_and_stays_frozen():
    """As the README says where ``model=`` is described."""
    import copy

    from biotune.training import reinit_head

    torch.manual_seed(0)
    model = make_tiny_cnn()
    model[4].weight.requires_grad_(False)
    data = {"train": _tensor_data(60, 0), "val": _tensor_data(15, 1)}
    trained = [biotune.train("full", model=model, config=TINY, seed=s, **data)[0] for s in (0, 1)]
    drawn = copy.deepcopy(model)
    reinit_head(drawn, biotune.partition_blocks(model), 0)
    assert torch.equal(trained[0][4].weight, drawn[4].weight)  # re-drawn, then never trained
    assert not torch.equal(trained[0][4].weight, trained[1][4].weight)
    assert not torch.equal(trained[0][4].bias, drawn[4].bias)  # the rest of the head trained
    assert not trained[0][4].weight.requires_grad
