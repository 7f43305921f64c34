"""Where evaluations run does not change what the search finds: in-process, process pool, Ray."""

from __future__ import annotations

import builtins
import functools
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import tiny_search_args

from biotune.core.evolution import EvolutionConfig
from biotune.core.records import MEASURED_FIELDS
from biotune.errors import BioTuneError
from biotune.runner.config import DataConfig, SearchConfig
from biotune.runner.executors import Task, make_executor, run_task
from biotune.runner.fitness import PruneConfig, SearchProtocol
from biotune.runner.search import Search
from biotune.runner.workbench import build_evaluator
from biotune.training import TrainConfig

# A real (offline) search, small enough to run in seconds: Lite0 on 32 px Animal-Shape.
CONFIG = SearchConfig(
    data=DataConfig(image_size=32, train_size=40, val_size=20, test_size=20),
    evolution=EvolutionConfig(population_size=3, generations=1, elite=1),
    protocol=SearchProtocol(
        seeds=(0,),
        train=TrainConfig(epochs=2, batch_size=16, eval_batch_size=64),
        cache_features=True,
        # strict (a child must beat the best elite-phase run), so that some child is pruned
        prune=PruneConfig(quantile=1.0, margin=-0.01),
    ),
    final=TrainConfig(epochs=1),
    final_seeds=(0,),
)


def _search(run_dir: Path, executor: str, workers: int = 1) -> tuple[list[dict], dict]:
    result = Search(CONFIG, run_dir, executor=executor, workers=workers).run_search(final=False)
    records = [{k: v for k, v in r.items() if k not in MEASURED_FIELDS} for r in result.evaluations]
    best = json.loads((run_dir / "best_plan.json").read_text())
    return records, best


@pytest.fixture(scope="module")
def inprocess(tmp_path_factory) -> tuple[list[dict], dict]:
    # The driver runs with another thread count than the workers: the protocol pins the
    # threads of each evaluation, so the results must not notice.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        return _search(tmp_path_factory.mktemp("inprocess") / "run", "inprocess")
    finally:
        torch.set_num_threads(threads)


def test_the_tiny_search_exercises_caching_and_pruning(inprocess):
    records = inprocess[0]
    assert any(r["cached_prefix"] > 0 for r in records)
    assert any(r["status"] == "pruned" for r in records)


def test_process_pool_finds_what_inprocess_finds(inprocess, tmp_path):
    records, best = _search(tmp_path / "run", "process", workers=2)
    assert records == inprocess[0]
    assert best == inprocess[1]


def test_ray_local_cluster_finds_what_inprocess_finds(inprocess, tmp_path):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        records, best = _search(tmp_path / "run", "ray", workers=2)
    finally:
        ray.shutdown()
    assert records == inprocess[0]
    assert best == inprocess[1]


def test_results_arrive_in_the_driver_as_they_finish(tmp_path):
    evaluator = build_evaluator(CONFIG)
    tasks = [Task(i, tuple([0.9] * 10 + [0.5]), 0, "initial") for i in range(2)]
    executor = make_executor("inprocess", evaluator, functools.partial(build_evaluator, CONFIG))
    started = 0
    evaluate = evaluator.evaluate

    def counting(*args, **kwargs):  # noqa: ANN202
        nonlocal started
        started += 1
        return evaluate(*args, **kwargs)

    evaluator.evaluate = counting  # type: ignore[method-assign]
    seen: list[tuple[int, int]] = []
    executor.run(tasks, lambda ev: seen.append((ev.candidate, started)))
    executor.close()
    evaluator.evaluate = evaluate  # type: ignore[method-assign]
    # Each result reaches the driver before the next evaluation starts, not all at the end.
    assert seen == [(0, 1), (1, 2)]
    assert run_task(evaluator, tasks[0]).scores == run_task(evaluator, tasks[1]).scores


def test_unknown_executor_is_refused():
    with pytest.raises(BioTuneError, match="unknown executor 'gpu'"):
        make_executor("gpu", None, lambda: None)  # type: ignore[arg-type]


def test_ray_missing_gives_an_install_hint(monkeypatch):
    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray":
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(BioTuneError, match=r"pip install 'biotune\[ray\]'"):
        make_executor("ray", None, lambda: None)  # type: ignore[arg-type]


# ------------------------------------------------------------------- workers of a dead driver

PROCESS_SEARCH = [
    *tiny_search_args(generations=3),
    *("--executor", "process", "--workers", "2", "--quiet"),
]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_workers_exit_when_the_driver_is_killed(tmp_path, sig):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "biotune.cli", "search", "--run-dir", str(run_dir), *PROCESS_SEARCH],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    records = run_dir / "evaluations.jsonl"
    deadline = time.time() + 300
    while not (records.exists() and records.read_text().count("\n")) and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.1)
    children = psutil.Process(proc.pid).children(recursive=True)
    workers = [c for c in children if "spawn_main" in " ".join(c.cmdline())]
    assert len(workers) == 2
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    _, alive = psutil.wait_procs(children, timeout=15)
    assert not alive, f"still running after the driver died: {[p.cmdline() for p in alive]}"
    if sig == signal.SIGTERM:  # like Ctrl-C: stopped cleanly, resumable
        assert proc.returncode == 130
        assert f"--resume {run_dir}" in err


def test_a_wrong_ray_address_fails_fast_in_one_line_and_leaves_no_run_directory(tmp_path):
    """Nothing listens on the port: the address is checked before anything loads (Ray itself
    would retry for minutes), one line, exit 2, and no run directory."""
    import socket
    import subprocess
    import sys

    pytest.importorskip("ray")
    with socket.socket() as s:  # a free loopback port, closed again: connections are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "biotune",
            "search",
            "--run-dir",
            str(run_dir),
            "--executor",
            "ray",
            "--ray-address",
            f"127.0.0.1:{port}",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"biotune: error: cannot reach the Ray cluster at 127.0.0.1:{port}: Connection refused"
    ]
    assert not run_dir.exists()
