"""Where evaluations run does not change what the search finds: in-process, process pool, Ray."""

from __future__ import annotations

import builtins
import functools
import json
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import psutil
import pytest
import torch
from conftest import tiny_search_args

from biotune.core.evolution import EvolutionConfig
from biotune.core.records import MEASURED_FIELDS
from biotune.errors import BioTuneError
from biotune.runner import executors
from biotune.runner.config import DataConfig, SearchConfig
from biotune.runner.executors import Task, gpu_slots, make_executor, ray_gpu_share, run_task
from biotune.runner.fitness import PruneConfig, SearchProtocol
from biotune.runner.search import Search
from biotune.runner.workbench import build_evaluator
from biotune.training import DEVICE_ENV, TrainConfig

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


def _search(
    run_dir: Path, executor: str, workers: int = 1, per_gpu: int = 1
) -> tuple[list[dict], dict]:
    search = Search(CONFIG, run_dir, executor=executor, workers=workers, per_gpu=per_gpu)
    result = search.run_search(final=False)
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
    # --per-gpu changes nothing on the CPU (it would put 3 workers on each GPU)
    records, best = _search(tmp_path / "run", "process", workers=2, per_gpu=3)
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
    *("--children-batch", "0"),  # the random plans of a generation at once: both workers busy
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


# ----------------------------------------------------------------------- several workers per GPU


def test_gpu_slots_deal_each_gpu_per_gpu_times_round_robin():
    assert gpu_slots(["0"], 3, 3) == ["0", "0", "0"]
    assert gpu_slots(["0"], 3, 5) == ["0", "0", "0"]  # more workers than slots: capped
    assert gpu_slots(["0", "1"], 2, 4) == ["0", "1", "0", "1"]
    assert gpu_slots(["0", "1"], 2, 3) == ["0", "1", "0"]  # fewer workers: still spread
    assert gpu_slots(["2", "3"], 1, 8) == ["2", "3"]  # the default: one worker per GPU
    assert gpu_slots([], 4, 6) == []  # no GPU: CPU workers, as many as asked


class _FakePool:
    """Stands in for concurrent.futures' pool: records how it was made, starts no process."""

    def __init__(self, **kwargs) -> None:  # noqa: ANN003
        self.kwargs = kwargs

    def shutdown(self, **kwargs) -> None:  # noqa: ANN003
        pass


def _process_pool(monkeypatch, gpus: list[str], workers: int, per_gpu: int):  # noqa: ANN202
    monkeypatch.setattr(executors, "_gpu_ids", lambda: gpus)
    monkeypatch.setattr(executors.cf, "ProcessPoolExecutor", _FakePool)
    pool = executors.ProcessPoolExecutor(lambda: None, workers, per_gpu)  # type: ignore[arg-type]
    made = pool._pool.kwargs  # type: ignore[attr-defined]
    devices = made["initargs"][2]
    dealt = [devices.get(timeout=10) for _ in range(len(gpus) and pool.workers)]
    assert devices.empty()
    pool.close()
    assert made["max_workers"] == pool.workers
    assert made["initargs"][1] == executors.threads_per_worker(pool.workers)
    return pool.workers, dealt


def test_the_process_pool_puts_per_gpu_workers_on_each_gpu(monkeypatch):
    assert _process_pool(monkeypatch, ["2", "3"], 8, 2) == (4, ["2", "3", "2", "3"])
    assert _process_pool(monkeypatch, ["2", "3"], 3, 2) == (3, ["2", "3", "2"])
    assert _process_pool(monkeypatch, ["0"], 5, 3) == (3, ["0", "0", "0"])
    assert _process_pool(monkeypatch, ["2", "3"], 8, 1) == (2, ["2", "3"])  # as before
    assert _process_pool(monkeypatch, [], 6, 3) == (6, [])  # CPU workers: not capped


class _FakeRay:
    """Just what RayExecutor asks of Ray: a cluster's resources and actors that never run."""

    def __init__(self, resources: dict[str, float]) -> None:
        self.resources = resources
        self.options: dict = {}

    def is_initialized(self) -> bool:
        return True

    def cluster_resources(self) -> dict[str, float]:
        return self.resources

    def remote(self, **options):  # noqa: ANN003, ANN201
        self.options = options
        return lambda cls: types.SimpleNamespace(remote=lambda *args: object())

    def kill(self, actor) -> None:  # noqa: ANN001
        pass


def _ray_actors(monkeypatch, resources: dict[str, float], workers: int, per_gpu: int):  # noqa: ANN202
    fake = _FakeRay(resources)
    monkeypatch.setattr(executors, "_import_ray", lambda: fake)
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    ray = executors.RayExecutor(lambda: None, workers, per_gpu=per_gpu)  # type: ignore[arg-type]
    actors = len(ray._actors)
    ray.close()
    assert actors == ray.workers
    return actors, fake.options["num_gpus"], fake.options["num_cpus"]


def test_ray_actors_ask_for_a_share_of_a_gpu(monkeypatch):
    cluster = {"GPU": 2.0, "CPU": 16.0}
    assert _ray_actors(monkeypatch, cluster, 10, 3) == (6, 0.3333, 2)  # capped at 3 x 2 GPUs
    assert _ray_actors(monkeypatch, cluster, 4, 2) == (4, 0.5, 4)
    assert _ray_actors(monkeypatch, cluster, 10, 1) == (2, 1.0, 8)  # as before: a GPU each
    assert _ray_actors(monkeypatch, {"CPU": 4.0}, 8, 3) == (4, 0, 1)  # no GPU: one per CPU
    # Rounded down to Ray's four decimals, so that K actors always fit on one GPU.
    assert all(ray_gpu_share(k) * k <= 1 for k in range(1, 50))
    assert ray_gpu_share(7) == 0.1428


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "2"])
def test_a_bad_per_gpu_is_refused_in_one_line(value, tmp_path):
    with pytest.raises(BioTuneError, match=r"^per_gpu must be a whole number >= 1 \(got"):
        Search(CONFIG, tmp_path / "run", executor="process", per_gpu=value)
    with pytest.raises(BioTuneError, match="per_gpu must be a whole number"):
        make_executor("inprocess", None, lambda: None, per_gpu=value)  # type: ignore[arg-type]
    assert not (tmp_path / "run").exists()
