"""The search loop: ask the evolution, evaluate what is not recorded yet, record each result at
once, tell the evolution, save its state.

One evaluation's way through it: ``evo.ask()`` gives a candidate -> ``task_for`` makes it a
``Task`` (with this generation's elite curves, for early termination) -> the executor runs
``Evaluator.evaluate`` (``runner.fitness``), which trains the plan (``train_plan``, or
``train_plan_cached`` on cached features of the frozen prefix) -> an ``Evaluation`` record
(``core.records``) -> ``_record`` appends it to ``evaluations.jsonl`` (fsynced) -> once the
whole ask is recorded, ``evo.tell()`` and ``state.json``. A candidate recorded by an earlier
invocation is not evaluated again, and neither is an equivalent plan already scored on the same
fold (``memoised``) or one over budget (recorded as such, never trained).
"""

from __future__ import annotations

import contextlib
import functools
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from biotune.callbacks import emit
from biotune.core.evolution import BioTuneEvolution, Candidate
from biotune.core.plan import FineTunePlan, decode_genome
from biotune.core.records import Evaluation, Role, Status
from biotune.errors import BioTuneError
from biotune.runner.executors import Executor, Task
from biotune.runner.fitness import Evaluator
from biotune.runner.rundir import EVALUATIONS, GENERATIONS, SESSIONS, STATE

if TYPE_CHECKING:
    from biotune.runner.search import Search


def optimize(
    search: Search,
    evo: BioTuneEvolution,
    evaluator: Evaluator,
    executor: Executor,
    records: list[dict[str, Any]],
) -> dict[int, dict[str, Any]]:
    """Run the evolution to its end; every evaluation record by candidate id."""
    assert search.bench is not None
    sessions = search.run.read(SESSIONS)
    search._sessions = [
        *(sessions if isinstance(sessions, list) else []),
        {"started": time.time(), "seconds": 0.0},
    ]
    search._clock = time.perf_counter()
    done = {r["candidate"]: r for r in records}
    if search.executor == "inprocess":
        evaluator.replay_cache(records)
    emit(search.callbacks, "on_search_start", search.config.evolution.total_evaluations, len(done))
    try:
        while not evo.done and not spent(search, done, evaluator):
            candidates = evo.ask()
            results = {c.id: done[c.id]["fitness"] for c in candidates if c.id in done}
            for c in candidates:
                if c.id in done:
                    _check_record(search, done[c.id], c)
            on_result = functools.partial(_record, search, done, results)

            todo = []
            for c in candidates:
                if c.id in done:
                    continue
                twin = search.budget.over_budget(c, evaluator) if search.budget else None
                twin = twin or memoised(c, done, evaluator)
                if twin is not None:
                    on_result(twin)
                else:
                    todo.append(task_for(c, done, evo.config.objective != "pareto"))
            executor.run(todo, on_result)
            generations = len(evo.history)
            evo.tell(results)
            search._write(STATE, evo.state_dict())
            search._write(GENERATIONS, evo.history)
            if len(evo.history) > generations:
                best = decode_genome(evo.best[0].genes, search.bench.partition.names)
                emit(
                    search.callbacks,
                    "on_generation",
                    {**evo.history[-1], "best_plan": best.to_dict()},
                )
    finally:
        with contextlib.suppress(BioTuneError):  # the error that stopped it says more
            _tick(search)
        # a search that reached its cost limit is done, not stopped
        emit(search.callbacks, "on_search_end", evo.done or spent(search, done, evaluator))
    return done


def spent(search: Search, done: dict[int, dict[str, Any]], evaluator: Evaluator) -> bool:
    """Whether the search's cost limit (``max_ft_equivalents``) is reached: no more proposals.
    Checked between asks, so a sampler asking one candidate at a time stops within one
    evaluation of it."""
    limit = search.config.max_ft_equivalents
    if limit is None:
        return False
    work = sum(r.get("work", 0.0) + r.get("cache_work", 0.0) for r in done.values())
    return work / evaluator.ft_work >= limit


def task_for(candidate: Candidate, done: dict[int, dict[str, Any]], prune: bool = True) -> Task:
    """A task; children carry this generation's elite curves for early termination (not
    with ``prune=False``: the pareto objective, where a cheap plan below the accurate elites'
    curves may still be on the front)."""
    reference: tuple[tuple[float, ...], ...] = ()
    if prune and candidate.role in (Role.CHILD, Role.IMMIGRANT):
        reference = tuple(
            tuple(curve)
            for r in done.values()
            if r["generation"] == candidate.generation and r["role"] in (Role.ELITE, Role.LOCAL)
            for curve in r.get("curves", [])
        )
    return Task(
        candidate.id,
        tuple(float(g) for g in candidate.genes),
        candidate.generation,
        candidate.role,
        reference,
    )


def memoised(
    candidate: Candidate, done: dict[int, dict[str, Any]], evaluator: Evaluator
) -> Evaluation | None:
    """An equivalent plan already trained on the same fold and seeds is not trained again."""
    if not evaluator.protocol.memoize:
        return None
    plan = decode_genome(candidate.genes, evaluator.partition.names)
    fold = evaluator.fold_of(candidate.generation)
    for rec in done.values():
        if (
            rec["status"] == Status.OK
            and rec["fold"] == fold
            and rec.get("reused_from") is None
            and FineTunePlan.from_dict(rec["plan"]).key() == plan.key()
        ):
            return Evaluation(
                candidate.id,
                candidate.generation,
                candidate.role,
                [float(g) for g in candidate.genes],
                plan.to_dict(),
                fold,
                rec["seeds"],
                rec["scores"],
                rec["fitness"],
                Status.OK,
                0.0,
                0,
                0,
                rec["epochs"],
                rec.get("curves", []),
                reused_from=rec["candidate"],
            )
    return None


def _record(
    search: Search,
    done: dict[int, dict[str, Any]],
    results: dict[int, float],
    ev: Evaluation,
) -> None:
    """Persist a finished evaluation at once (fsynced) and note its fitness for ``tell``."""
    rec = ev.to_dict()
    if search.budget is not None:
        rec["cost"] = search.budget.record(ev.genes)
    search.run.append_evaluation(rec)
    done[ev.candidate] = rec
    results[ev.candidate] = ev.fitness
    _tick(search)
    emit(search.callbacks, "on_evaluation", rec)


def _check_record(search: Search, record: dict[str, Any], candidate: Candidate) -> None:
    if not np.allclose(record["genes"], candidate.genes, rtol=0, atol=1e-12):
        raise BioTuneError(
            f"{search.run.path / EVALUATIONS}: record {candidate.id} does not match the "
            "search state; the run directory was modified"
        )


def _tick(search: Search) -> None:
    """Store this invocation's search time so far: resumed wall time sums the invocations."""
    search._sessions[-1]["seconds"] = time.perf_counter() - search._clock
    search._write(SESSIONS, search._sessions)
