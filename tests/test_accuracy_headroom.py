"""The accuracy benchmark's headroom: what the best baseline gains over full fine-tuning."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

RUN = Path(__file__).resolve().parents[1] / "benchmarks" / "accuracy" / "run.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("accuracy_run", RUN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(scores: dict[str, dict[str, tuple[float, float]]]) -> list[dict]:
    return [
        {"dataset": d, "method": m, "val_balanced": val, "test_top1": test}
        for d, by in scores.items()
        for m, (val, test) in by.items()
    ]


def test_headroom_picks_on_validation_and_with_hindsight(bench):
    base = {m: (0.5, 0.5) for m in bench.BASELINES}
    a = {**base, "full": (0.80, 0.90), "l1sp": (0.90, 0.91), "lora": (0.70, 0.95)}
    b = {**base, "full": (0.90, 0.80), "linear": (0.85, 0.84)}
    room = bench.headroom(_rows({"a": a, "b": b}), ["a", "b"])
    assert room["by_dataset"]["a"]["validation"]["method"] == "l1sp"
    assert room["by_dataset"]["a"]["hindsight"]["method"] == "lora"
    assert room["by_dataset"]["b"]["validation"]["method"] == "full"
    assert room["validation_mean_gain"] == pytest.approx((1.0 + 0.0) / 2)
    assert room["hindsight_mean_gain"] == pytest.approx((5.0 + 4.0) / 2)


def test_headroom_waits_for_every_baseline(bench):
    scores = {m: (0.5, 0.5) for m in bench.BASELINES if m != "autorgn"}
    assert bench.headroom(_rows({"a": scores}), ["a"]) is None
