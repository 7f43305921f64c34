"""The search-cost benchmark finds the paper sides it recorded (hours of work each) on a fresh
machine, under today's configuration."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "search_cost"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("search_cost_run", BENCH / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "scale", [["--train-size", "300"], ["--train-size", "600", "--val-size", "300"]]
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_recorded_paper_side_is_found(bench, scale, seed):
    config = bench.configs(bench.parse_args(scale), seed)["paper"]
    names = [bench._run_dir(Path("runs"), "paper", config).name]
    names += bench._earlier_names("paper", config)
    found = [n for n in names if (BENCH / "records" / f"{n}.json").exists()]
    assert len(found) == 1, names


def test_a_default_side_is_keyed_by_its_configuration(bench):
    args = bench.parse_args([])
    sides = [bench.configs(args, seed)["default"] for seed in (0, 1)]
    names = {bench._run_dir(Path("runs"), "default", c).name for c in sides}
    assert len(names) == 2
