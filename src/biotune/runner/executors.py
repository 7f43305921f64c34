"""Where evaluations run. The evolution stays in the driver; executors only train and score.

Every executor gets the same tasks and returns the same records (an evaluation is a pure
function of genome, fold, seeds and reference curves), so the search's result does not depend on
which one runs it or on how many workers it has. Results reach ``on_result`` in the driver as
they finish, so the runner can persist each one at once; their order may vary, their content not
(except the measured ``seconds`` and the cache-building cost, see ``Evaluation``).

* ``inprocess``: one task after another in this process (the default);
* ``process``: a local pool of spawned processes, ``per_gpu`` per GPU or the CPU cores split
  among them;
* ``ray``: Ray actors on an existing cluster (``ray_address``) or a local one started here, each
  with ``1/per_gpu`` of a GPU when the cluster has them.

Several workers on one GPU (``per_gpu``) keep a GPU busy that one small model's training leaves
mostly idle; like the number of workers, it changes throughput, not what an evaluation computes.

Workers build their own evaluator once, from a picklable factory
(``functools.partial(workbench.build_evaluator, config)``): the model and data are loaded in each.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import multiprocessing as mp
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from biotune.core.records import Evaluation
from biotune.errors import BioTuneError
from biotune.runner.fitness import Evaluator
from biotune.training import DEVICE_ENV, default_device

EXECUTORS = ("inprocess", "process", "ray")
RAY_MISSING = "--executor ray needs ray: pip install 'biotune[ray]'"
#: Ray counts resources in units of 1/10000 (four decimals).
RAY_RESOURCE_UNITS = 10_000


@dataclass(frozen=True)
class Task:
    candidate: int
    genes: tuple[float, ...]
    generation: int
    role: str
    reference: tuple[tuple[float, ...], ...] = ()  # elite validation curves (early termination)


class Executor(Protocol):
    name: str

    def run(self, tasks: Sequence[Task], on_result: Callable[[Evaluation], None]) -> None: ...

    def close(self) -> None: ...


def run_task(evaluator: Evaluator, task: Task) -> Evaluation:
    """The one way every executor turns a task into a record."""
    return evaluator.evaluate(
        task.candidate, task.genes, task.generation, task.role, [list(c) for c in task.reference]
    )


class InProcessExecutor:
    """Evaluate one task after another in this process (the default)."""

    name = "inprocess"

    def __init__(self, evaluator: Evaluator) -> None:
        self.evaluator = evaluator

    def run(self, tasks: Sequence[Task], on_result: Callable[[Evaluation], None]) -> None:
        for t in tasks:
            on_result(run_task(self.evaluator, t))

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------------ local processes

_WORKER_EVALUATOR: Evaluator | None = None


def _gpu_ids() -> list[str]:
    """The GPUs worker processes spread over, as ``CUDA_VISIBLE_DEVICES`` entries: none unless
    the chosen device (``--device``, ``BIOTUNE_DEVICE``) is CUDA; the one it names, else every
    visible one (numbered as the driver's own ``CUDA_VISIBLE_DEVICES`` lists them)."""
    try:
        import torch

        device = default_device()
        if device.type != "cuda":
            return []
        ids = [device.index] if device.index is not None else range(torch.cuda.device_count())
    except Exception:  # no usable CUDA: CPU workers
        return []
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")]
    visible = [v for v in visible if v]
    return [visible[i] if i < len(visible) else str(i) for i in ids]


def check_per_gpu(per_gpu: object) -> None:
    """Refuse a ``per_gpu`` other than a whole number >= 1, in one line."""
    if isinstance(per_gpu, bool) or not isinstance(per_gpu, int) or per_gpu < 1:
        raise BioTuneError(f"per_gpu must be a whole number >= 1 (got {per_gpu!r})")


def gpu_slots(gpu_ids: Sequence[str], per_gpu: int, workers: int) -> list[str]:
    """The GPU each of at most ``workers`` workers takes: every GPU ``per_gpu`` times, dealt
    round-robin so that the workers spread evenly (2 GPUs, 4 workers: 2 each). Fewer slots than
    ``workers`` cap the pool; none (no GPU) leave CPU workers, as many as asked."""
    check_per_gpu(per_gpu)
    dealt = [gpu for _ in range(per_gpu) for gpu in gpu_ids]
    return dealt[: max(1, workers)]


def ray_gpu_share(per_gpu: int) -> float:
    """The GPU each Ray actor asks for so that ``per_gpu`` of them fit on one: 1/per_gpu, rounded
    down to Ray's resource precision (rounded up, 7 x 0.1429 would exceed one GPU)."""
    check_per_gpu(per_gpu)
    return max(1, RAY_RESOURCE_UNITS // per_gpu) / RAY_RESOURCE_UNITS


def threads_per_worker(workers: int) -> int:
    """CPU threads for each of ``workers`` workers sharing this machine's cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(1, workers))


ORPHAN_POLL_SECONDS = 0.5


def exit_with_parent(parent: int) -> None:
    """End this worker as soon as ``parent`` is gone (``kill -9`` of the driver, say).

    A daemon thread watches the parent's id: an orphan is re-parented, so ``getppid`` changes.
    Without it, orphaned workers (each holding a model and data) and the resource tracker whose
    pipe they keep open would run on until their current evaluation, or forever, ends.
    """

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(ORPHAN_POLL_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="biotune-parent-watch", daemon=True).start()


def _init_worker(
    factory: Callable[[], Evaluator], threads: int, devices: Any, lock: Any, parent: int
) -> None:
    """Runs once in each new worker: pin it to a GPU (if any), split the cores, build the evaluator.

    ``devices`` is a queue of GPU ids, one per worker (``gpu_slots``; empty on CPU machines); a
    worker takes one before torch touches CUDA, so each worker sees exactly one GPU, which
    ``per_gpu`` workers may share. ``parent`` is the driver's process id: the worker exits when
    the driver dies.
    """
    global _WORKER_EVALUATOR
    exit_with_parent(parent)
    with lock:
        if not devices.empty():
            os.environ["CUDA_VISIBLE_DEVICES"] = devices.get()
            # The one GPU this worker sees is cuda:0, whichever the driver named.
            if os.environ.get(DEVICE_ENV, "").startswith("cuda"):
                os.environ[DEVICE_ENV] = "cuda"
    import torch

    torch.set_num_threads(threads)
    _WORKER_EVALUATOR = factory()


def _worker_run(task: Task) -> Evaluation:
    assert _WORKER_EVALUATOR is not None, "worker started without an evaluator"
    return run_task(_WORKER_EVALUATOR, task)


class ProcessPoolExecutor:
    """A pool of spawned worker processes on this machine, each with its own evaluator.

    On a GPU machine there are ``per_gpu`` workers per GPU (at most ``workers`` in all,
    ``gpu_slots``); on CPU the cores are split evenly between the workers. Workers live until
    ``close()``, so the model and data are loaded once per worker, not once per generation.
    """

    name = "process"

    def __init__(
        self, factory: Callable[[], Evaluator], workers: int = 2, per_gpu: int = 1
    ) -> None:
        slots = gpu_slots(_gpu_ids(), per_gpu, workers)
        self.workers = len(slots) or max(1, workers)
        ctx = mp.get_context("spawn")
        devices = ctx.Queue()
        for gpu in slots:
            devices.put(gpu)
        self._pool = cf.ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=ctx,
            initializer=_init_worker,
            initargs=(factory, threads_per_worker(self.workers), devices, ctx.Lock(), os.getpid()),
        )
        self._interrupted = False

    def run(self, tasks: Sequence[Task], on_result: Callable[[Evaluation], None]) -> None:
        futures = [self._pool.submit(_worker_run, t) for t in tasks]
        try:
            for future in cf.as_completed(futures):
                on_result(future.result())
        except BaseException as exc:
            for f in futures:
                f.cancel()
            # Interrupted (Ctrl-C, SIGTERM) or failed: running evaluations are lost anyway, so
            # stop the workers now instead of waiting for them in close().
            self._interrupted = True
            if isinstance(exc, cf.process.BrokenProcessPool):
                raise BioTuneError(
                    "a worker process died unexpectedly (killed for lack of memory?)"
                ) from None
            raise

    def close(self) -> None:
        if not self._interrupted:
            self._pool.shutdown(wait=True, cancel_futures=True)
            return
        workers = list((getattr(self._pool, "_processes", None) or {}).values())
        for process in workers:
            with contextlib.suppress(Exception):
                process.terminate()
        self._pool.shutdown(wait=True, cancel_futures=True)


# ------------------------------------------------------------------------------------------- Ray


#: How long a cluster address may take to accept a connection (Ray itself retries for minutes).
RAY_CONNECT_TIMEOUT_S = 10.0


def check_reachable(address: str | None) -> None:
    """Fail in seconds, in one line, when nothing listens at a Ray address ``host:port`` (or
    ``ray://host:port``); "auto", "local" and None are Ray's to resolve."""
    if not address or address in ("auto", "local"):
        return
    import socket

    client = address.startswith("ray://")
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host:
        host, port = target, ""
    try:
        port_number = int(port) if port else (10001 if client else 6379)
    except ValueError:
        raise BioTuneError(
            f"--ray-address {address}: expected HOST:PORT or ray://HOST:PORT"
        ) from None
    try:
        with socket.create_connection((host, port_number), timeout=RAY_CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise BioTuneError(f"cannot reach the Ray cluster at {address}: {reason}") from None


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise BioTuneError(RAY_MISSING) from None
    return ray


class _RayWorker:
    """A Ray actor holding one evaluator (wrapped by ``ray.remote`` at run time)."""

    def __init__(self, factory: Callable[[], Evaluator], threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self.evaluator = factory()

    def evaluate(self, task: Task) -> Evaluation:
        return run_task(self.evaluator, task)


class RayExecutor:
    """Ray actors, each holding an evaluator; the driver hands out one task per idle actor.

    On a cluster with GPUs each actor asks for ``1/per_gpu`` of one, so that Ray places up to
    ``per_gpu`` actors on each GPU (it sets their ``CUDA_VISIBLE_DEVICES``). Connects to
    ``address`` (an existing cluster, "auto" for the local one) or starts a local Ray instance,
    which ``close()`` shuts down again; a Ray already initialised by the caller is used as is and
    left running.
    """

    name = "ray"

    def __init__(
        self,
        factory: Callable[[], Evaluator],
        workers: int = 1,
        address: str | None = None,
        per_gpu: int = 1,
    ) -> None:
        check_per_gpu(per_gpu)
        ray = _import_ray()
        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            check_reachable(address)
            try:
                ray.init(
                    address=address or None,
                    include_dashboard=False,
                    log_to_driver=False,
                    configure_logging=False,
                )
            except ConnectionError as exc:
                raise BioTuneError(
                    f"cannot connect to the Ray cluster at {address}: {exc}"
                ) from None
            self._started = True
        resources = ray.cluster_resources()
        # The cluster's GPUs, unless the device asked for is not CUDA (--device cpu): the
        # driver itself may have none, so "auto" uses whatever the workers have.
        asked = os.environ.get(DEVICE_ENV, "auto").strip().lower()
        gpus = int(resources.get("GPU", 0)) if asked == "auto" or asked.startswith("cuda") else 0
        cpus = max(1, int(resources.get("CPU", 1)))
        # More actors than GPU slots (or CPUs) would wait forever for resources: cap them.
        self.workers = max(1, min(workers, gpus * per_gpu or cpus))
        threads = max(1, cpus // self.workers)
        share = ray_gpu_share(per_gpu) if gpus else 0
        actor = ray.remote(num_cpus=threads, num_gpus=share)(_RayWorker)
        self._actors = [actor.remote(factory, threads) for _ in range(self.workers)]

    def run(self, tasks: Sequence[Task], on_result: Callable[[Evaluation], None]) -> None:
        ray = self._ray
        queue = list(tasks)[::-1]
        running: dict[Any, Any] = {}
        idle = list(self._actors)
        while queue or running:
            while queue and idle:
                worker = idle.pop()
                running[worker.evaluate.remote(queue.pop())] = worker
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                idle.append(running.pop(ref))
                on_result(ray.get(ref))  # a worker's exception is raised here

    def close(self) -> None:
        for actor in self._actors:
            self._ray.kill(actor)
        self._actors = []
        if self._started:
            self._ray.shutdown()


def make_executor(
    name: str,
    evaluator: Evaluator,
    evaluator_factory: Callable[[], Evaluator],
    workers: int = 1,
    ray_address: str | None = None,
    per_gpu: int = 1,
) -> Executor:
    """The executor called ``name``; workers of other processes build their own evaluator, up to
    ``per_gpu`` of them on each GPU."""
    check_per_gpu(per_gpu)
    if name == "inprocess":
        return InProcessExecutor(evaluator)
    if name == "process":
        return ProcessPoolExecutor(evaluator_factory, workers, per_gpu)
    if name == "ray":
        return RayExecutor(evaluator_factory, workers, ray_address, per_gpu)
    raise BioTuneError(f"unknown executor {name!r}; choose one of {', '.join(EXECUTORS)}")
