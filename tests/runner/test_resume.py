"""A search killed with SIGKILL at any point resumes to exactly the uninterrupted result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_search_args

TINY = [*tiny_search_args(), "--quiet"]
TIMING_KEYS = {"seconds", "cache_work", "cache_images"}


def _search(run_dir: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "biotune.cli", "search", "--run-dir", str(run_dir), *TINY, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def _records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "evaluations.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING_KEYS} for x in lines]


def _final(run_dir: Path) -> list[dict]:
    runs = json.loads((run_dir / "final.json").read_text())["runs"]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in runs]


def _counted_cost(run_dir: Path) -> dict:
    cost = json.loads((run_dir / "search_summary.json").read_text())["cost"]
    for rung in ("promote", "rerank"):  # the rungs' time is not part of what is counted
        if rung in cost:
            cost[rung] = {k: v for k, v in cost[rung].items() if k != "seconds"}
    return {k: v for k, v in cost.items() if k not in ("seconds", "wall_seconds")}


def _resume(run_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "biotune.cli", "search", "--resume", str(run_dir), "--quiet"],
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    proc = _search(run_dir)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return run_dir


def _assert_same_as_reference(run_dir: Path, reference: Path) -> None:
    got, want = _records(run_dir), _records(reference)
    ids = [r["candidate"] for r in got]
    assert len(ids) == len(set(ids)), "a finished evaluation ran twice"
    # by candidate: a memoised evaluation is recorded before the trained ones of its ask
    assert sorted(got, key=lambda r: r["candidate"]) == sorted(want, key=lambda r: r["candidate"])
    assert json.loads((run_dir / "best_plan.json").read_text()) == json.loads(
        (reference / "best_plan.json").read_text()
    )
    assert _final(run_dir) == _final(reference)
    # The resumed search counts the work of an uninterrupted one, and the time of every run.
    assert _counted_cost(run_dir) == _counted_cost(reference)
    sessions = json.loads((run_dir / "sessions.json").read_text())
    assert len(sessions) == 2
    wall = json.loads((run_dir / "search_summary.json").read_text())["cost"]["wall_seconds"]
    assert wall == pytest.approx(sum(s["seconds"] for s in sessions))


def test_kill_during_training_then_resume_gives_the_same_search(tmp_path, reference):
    run_dir = tmp_path / "run"
    proc = _search(run_dir)
    records = run_dir / "evaluations.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:
        if records.exists() and len(records.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    time.sleep(0.3)  # well inside the next evaluation's training
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = len(records.read_text().splitlines())
    assert 3 <= before < len(_records(reference))
    kept = records.read_text().splitlines()[:before]
    result = _resume(run_dir)
    assert result.returncode == 0, result.stderr
    assert records.read_text().splitlines()[:before] == kept, "finished records were rewritten"
    _assert_same_as_reference(run_dir, reference)


def test_kill_in_the_middle_of_a_record_write_then_resume(tmp_path, reference):
    run_dir = tmp_path / "run"
    proc = _search(run_dir, env={"BIOTUNE_FAILPOINT": "append:5"})
    proc.communicate(timeout=600)
    assert proc.returncode == -signal.SIGKILL
    raw = (run_dir / "evaluations.jsonl").read_bytes()
    assert not raw.endswith(b"\n"), "the failpoint should leave a torn last line"
    result = _resume(run_dir)
    assert result.returncode == 0, result.stderr
    _assert_same_as_reference(run_dir, reference)


def test_second_process_cannot_write_a_locked_run_directory(tmp_path):
    from biotune.errors import BioTuneError
    from biotune.runner.rundir import RunDirectory

    run = RunDirectory(tmp_path / "run")
    with run.locked(), pytest.raises(BioTuneError, match="in use"), RunDirectory(run.path).locked():
        pass


def test_resume_with_another_configuration_is_refused(tmp_path, reference):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "biotune.cli",
            "search",
            "--resume",
            str(reference),
            "--model",
            "efficientnet_lite1",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "different configuration" in result.stderr
    assert "data.model" in result.stderr
    assert "Traceback" not in result.stderr
