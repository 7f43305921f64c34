"""Values read from files and settings are checked, never silently coerced or rounded."""

from __future__ import annotations

import json

import pytest

from biotune.core.plan import BlockSetting, FineTunePlan
from biotune.errors import BioTuneError
from biotune.runner.fitness import SearchProtocol


@pytest.mark.parametrize(
    ("fraction", "folds"), [(1, 1), (1.0, 1), (0.5, 2), (1 / 3, 3), (0.25, 4), (0.1, 10)]
)
def test_data_fraction_one_over_k_trains_on_one_of_k_folds(fraction, folds):
    assert SearchProtocol(data_fraction=fraction).folds == folds


@pytest.mark.parametrize(
    "fraction", [0.7, 0.9, 0.4, 0.3, 0.333, 0.0, 1.5, float("nan"), True, "0.5"]
)
def test_data_fraction_that_is_not_one_over_k_is_refused_not_rounded(fraction):
    with pytest.raises(BioTuneError, match="data_fraction") as error:
        SearchProtocol(data_fraction=fraction)
    assert "\n" not in str(error.value)


def test_data_fraction_error_names_the_nearest_one_over_k():
    with pytest.raises(BioTuneError, match=r"1/k .* got 0\.7, nearest 1/1"):
        SearchProtocol(data_fraction=0.7)
    with pytest.raises(BioTuneError, match=r"got 0\.4, nearest 1/2"):
        SearchProtocol(data_fraction=0.4)


def _plan(*blocks: dict) -> dict:
    return {"blocks": list(blocks)}


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (
            _plan({"name": "stem", "train": "false", "lr_mult": 1.0}),
            "block 0 'stem': \"train\" must be true or false (got 'false')",
        ),
        (_plan({"name": "stem", "train": 0}), "block 0 'stem': \"train\" must be true or false"),
        (
            _plan({"name": "stem", "train": True}, {"name": "head"}),
            "block 1 'head': \"train\" must be true or false (got None)",
        ),
        (
            _plan({"name": "stem", "train": True, "lr_mult": "2"}),
            "block 0 'stem': \"lr_mult\" must be a number (got '2')",
        ),
        (_plan({"name": "stem", "train": True, "lr_mult": True}), '"lr_mult" must be a number'),
        (_plan({"name": 3, "train": True}), 'block 0: "name" must be a string (got 3)'),
        (_plan("stem"), "block 0 must be an object"),
        ({"blocks": {"stem": True}}, "not a fine-tuning plan"),
        ([], "not a fine-tuning plan"),
        (_plan(), "no blocks"),
    ],
)
def test_plan_file_types_are_checked_and_the_error_names_file_and_block(tmp_path, data, needle):
    path = tmp_path / "best_plan.json"
    path.write_text(json.dumps(data))
    with pytest.raises(BioTuneError) as error:
        FineTunePlan.load(path)
    message = str(error.value)
    assert message.startswith(str(path)) and needle in message and "\n" not in message


def test_a_well_typed_plan_file_reads_back_exactly(tmp_path):
    plan = FineTunePlan((BlockSetting("stem", False, 1.0), BlockSetting("head", True, 2.5)))
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({**plan.to_dict(), "fitness": 0.3}))
    assert FineTunePlan.load(path) == plan
    whole = FineTunePlan.from_dict({"blocks": [{"name": "head", "train": True, "lr_mult": 2}]})
    assert whole.blocks == (BlockSetting("head", True, 2.0),)  # an integer multiplier reads too


LITE0_BLOCKS = ("stem", *(f"blocks.{i}" for i in range(7)), "neck", "head")


def _best_plan_file(tmp_path, origin, names=LITE0_BLOCKS):
    """A best_plan.json as a search writes it, with ``origin`` as given."""
    path = tmp_path / "best_plan.json"
    path.write_text(json.dumps({**FineTunePlan.full(names).to_dict(), "origin": origin}))
    return path


def _good_origin(model: str = "efficientnet_lite0") -> dict:
    """An origin as a search writes it (``_choose._origin``)."""
    from dataclasses import asdict

    from biotune.runner.config import DataConfig

    return {
        "data": asdict(DataConfig(model=model, dataset="digits")),
        "base_lr": 1e-3,
        "partition": {"names": list(LITE0_BLOCKS), "fingerprint": "0" * 64},
    }


def _no_loading(monkeypatch):
    import biotune.runner.workbench

    def refuse(*_args, **_kwargs):
        raise AssertionError("the data and model were loaded before the plan was checked")

    monkeypatch.setattr(biotune.runner.workbench, "prepare", refuse)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda o: None, "origin must be an object"),
        (lambda o: "resnet", "origin must be an object"),
        (lambda o: {**o, "data": [1]}, "origin.data must be an object"),
        (
            lambda o: {**o, "data": {**o["data"], "train_size": "many"}},
            "origin.data.train_size must be a whole number or null (got 'many')",
        ),
        (lambda o: {**o, "base_lr": "fast"}, "origin.base_lr must be a number"),
        (lambda o: {**o, "base_lr": -1}, "base_lr must be a positive number"),
        (lambda o: {**o, "partition": "blocks"}, "origin.partition must be an object"),
        (lambda o: {**o, "partition": {"names": []}}, "origin.partition: 'fingerprint' is missing"),
        (lambda o: {**o, "dtaa": {}}, "origin: unknown setting 'dtaa'; did you mean 'data'?"),
    ],
)
def test_a_plan_files_origin_is_checked_like_the_plan(
    tmp_path, monkeypatch, capsys, change, needle
):
    from test_cli_errors import _assert_one_line_error, _run

    _no_loading(monkeypatch)
    path = _best_plan_file(tmp_path, change(_good_origin()))
    code, err = _run(["train", "--plan", str(path), "--seeds", "0", "--quiet"], capsys)
    _assert_one_line_error(code, err, str(path), needle)


def test_a_plan_for_another_model_is_refused_before_any_weights_load(tmp_path, monkeypatch, capsys):
    from test_cli_errors import _assert_one_line_error, _run

    _no_loading(monkeypatch)
    path = _best_plan_file(tmp_path, _good_origin("resnet18"))
    code, err = _run(["train", "--plan", str(path), "--seeds", "0", "--quiet"], capsys)
    _assert_one_line_error(code, err, "does not fit the model", "layer1")
    assert "Downloading" not in err
