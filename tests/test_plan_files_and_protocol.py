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
