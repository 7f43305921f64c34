"""The typed records of a run: statuses and roles are the stored strings; records, the JSON."""

from __future__ import annotations

import json

import pytest

from biotune.core.evolution import Candidate
from biotune.core.records import Evaluation, FinalRun, Role, Status
from biotune.errors import BioTuneError

FINAL = {
    "seed": 0,
    "test_top1": 0.5,
    "test_balanced": 0.25,
    "val_top1": 0.75,
    "val_balanced": 0.5,
    "best_epoch": 1,
    "epochs_run": 2,
    "seconds": 1.5,
    "train_images": 80,
    "eval_images": 40,
    "cached_prefix": 3,
    "status": "ok",
    "trainable_params": 1000,
}


def test_statuses_and_roles_print_format_and_serialise_as_their_values():
    for member in (*Status, *Role):
        assert member == member.value
        assert str(member) == f"{member}" == member.value
        assert json.dumps(member) == json.dumps(member.value)
    assert [s.value for s in Status] == ["ok", "invalid", "diverged", "pruned", "over_budget"]
    assert [r.value for r in Role] == ["initial", "elite", "local", "child", "immigrant"]


def test_an_evaluation_is_stored_as_plain_json_in_field_order():
    ev = Evaluation(
        3,
        1,
        Role.CHILD,
        [0.5, 0.25],
        {"blocks": []},
        1,
        [0],
        [0.5],
        0.5,
        "pruned",
        1.0,
        10,
        5,
        [1],
        pruned_at=1,
    )
    assert ev.status is Status.PRUNED
    stored = ev.to_dict()
    assert type(stored["status"]) is str and type(stored["role"]) is str
    assert list(stored)[:5] == ["candidate", "generation", "role", "genes", "plan"]
    assert json.loads(json.dumps(stored)) == stored


def test_a_final_run_survives_its_line_in_final_runs_jsonl():
    run = FinalRun.from_dict(json.loads(json.dumps(FINAL)))
    assert run.status is Status.OK and run.val_balanced == 0.5
    assert json.dumps(run.to_dict()) == json.dumps(FINAL)  # same keys, same order, same values
    older = {k: v for k, v in FINAL.items() if k != "cached_prefix"}
    assert FinalRun.from_dict(older).cached_prefix == 0  # written before feature caching


def test_an_unknown_status_or_role_is_refused():
    with pytest.raises(ValueError):
        FinalRun(**{**FINAL, "status": "finished"})
    with pytest.raises(BioTuneError, match="role must be one of initial, elite"):
        Candidate(0, [0.5, 0.25], 0, "parent")
    assert Candidate(0, [0.5, 0.25], 0, "elite").role is Role.ELITE
