"""``Search``: a search bound to a run directory, started or resumed, and what it returns.

A thin front in the manner of Optuna's ``Study``: it holds the lock, turns SIGTERM into Ctrl-C,
takes back what a failed start wrote, and hands each step to a private worker: ``_start`` (load
and check everything, write the directory's header), ``_optimize`` (the ask / evaluate / record
/ tell loop), ``_choose`` (the plan the search recommends, and its cost); then ``final`` trains
and tests that plan, and ``tradeoff`` the Pareto front.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from biotune.callbacks import emit
from biotune.core.budget import SearchBudget
from biotune.core.plan import FineTunePlan
from biotune.errors import BioTuneError
from biotune.runner import _choose, _optimize, _start
from biotune.runner.config import SearchConfig
from biotune.runner.executors import check_per_gpu, check_reachable, make_executor
from biotune.runner.final import train_final
from biotune.runner.rundir import EVALUATIONS, RunDirectory
from biotune.runner.tradeoff import finish_pareto
from biotune.runner.workbench import Workbench


@dataclass
class SearchResult:
    run_dir: Path
    best_plan: FineTunePlan
    best_fitness: float
    evaluations: list[dict[str, Any]]
    final: dict[str, Any] | None
    cost: dict[str, Any] = field(default_factory=dict)
    pareto: dict[str, Any] | None = None  # the objective "pareto": what pareto.json holds

    @property
    def search_seconds(self) -> float:
        """Wall time of the search over all its sittings (each counted to its last evaluation)
        plus its middle-rung and re-ranking runs: what a resumed search cost, not only its last
        sitting."""
        rungs = [self.cost.get(k) or {} for k in ("promote", "rerank")]
        return float(self.cost.get("wall_seconds", 0.0)) + sum(
            float(r.get("seconds", 0.0)) for r in rungs
        )


class Search:
    """A search bound to a run directory: start it, or resume it after any interruption."""

    def __init__(
        self,
        config: SearchConfig,
        run_dir: str | Path,
        *,
        bench: Workbench | None = None,
        progress: Any = None,
        callbacks: Sequence[Any] = (),
        executor: str = "inprocess",
        workers: int = 1,
        ray_address: str | None = None,
        per_gpu: int = 1,
    ) -> None:
        check_per_gpu(per_gpu)
        self.config = config
        self.run = RunDirectory(run_dir)
        self.bench = bench
        self.bench_given = bench is not None
        # The display is one more callback (biotune.callbacks), called first.
        self.callbacks = [*([progress] if progress is not None else []), *callbacks]
        self.executor = executor
        self.workers = workers
        self.per_gpu = per_gpu
        self.ray_address = ray_address
        self._written: list[str] = []  # files a new search wrote (taken back if it fails early)
        self._sessions: list[dict[str, float]] = []  # search time per invocation (_optimize)
        self._clock = 0.0
        self.budget: SearchBudget | None = None  # set when the search starts (core.budget)

    def run_search(self, resume: bool = False, final: bool = True) -> SearchResult:
        """Run (or continue) the search, then the final training; safe to kill at any point.

        SIGTERM stops it as Ctrl-C does (KeyboardInterrupt), leaving it resumable.
        """
        if self.executor == "ray":
            check_reachable(self.ray_address)  # before anything loads or is written
        with self.run.locked(), _sigterm_interrupts():
            try:
                return self._run_locked(resume, final)
            finally:
                emit(self.callbacks, "close")

    def _write(self, name: str, data: Any) -> None:
        """Write a JSON file of the run, noting it as this call's (see ``_run_locked``)."""
        self.run.write(name, data)
        if name not in self._written:
            self._written.append(name)

    def _run_locked(self, resume: bool, final: bool) -> SearchResult:
        """Under the lock: a failure before the first record takes back what this call wrote,
        so the directory can be used again (or is gone, if this call made it)."""
        new = False
        self._written = []
        try:
            new = _start.check_config(self.run, self.config, resume)
            return self._run_checked(new, final)
        except Exception as exc:
            records = self.run.path / EVALUATIONS
            kept = records.exists() and records.stat().st_size > 0
            if not kept:
                self.run.discard(self._written if new else [])
            detail = _out_of_memory(exc)
            if detail is None:
                raise
            saved = f"; finished evaluations are saved, resume with --resume {self.run.path}"
            raise BioTuneError(f"out of memory: {detail}{saved if kept else ''}") from None

    def _run_checked(self, new: bool, final: bool) -> SearchResult:
        """Load and check everything, search, choose the plan, then train and test it."""
        started = _start.load_and_check(self, new)
        executor = make_executor(
            self.executor,
            started.evaluator,
            _start.evaluator_factory(self),
            workers=self.workers,
            ray_address=self.ray_address,
            per_gpu=self.per_gpu,
        )
        try:
            _start.write_header(self, started, new)
            done = _optimize.optimize(
                self, started.evo, started.evaluator, executor, started.records
            )
        finally:
            executor.close()
        chosen = _choose.choose(self, started.evo, started.evaluator, started.partition)
        evaluations = [done[k] for k in sorted(done)]
        cost = _choose.write_summary(self, chosen, evaluations, started.evaluator)
        final_result = train_final(self, chosen.plan) if final else None
        pareto = None
        if self.config.evolution.objective == "pareto":
            pareto = finish_pareto(self, evaluations, final)
        return SearchResult(
            self.run.path, chosen.plan, chosen.fitness, evaluations, final_result, cost, pareto
        )


def _out_of_memory(exc: BaseException) -> str | None:
    """What ran out, if ``exc`` is an allocation failure (host or GPU), else None."""
    if isinstance(exc, MemoryError):
        return str(exc) or "MemoryError"
    message = str(exc)
    if isinstance(exc, RuntimeError) and (
        "out of memory" in message or "can't allocate memory" in message
    ):
        return message.strip().splitlines()[0][:200]
    return None


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """While a search runs, SIGTERM raises KeyboardInterrupt as Ctrl-C does: the run is left
    resumable. Only the main thread can set signal handlers; elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
