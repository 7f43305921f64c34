"""Re-rank the search's best plans with the final recipe before choosing one (multi-fidelity).

The search scores plans with a short training on one fold: cheap, but a noisy proxy for what
the final training will make of a plan (``benchmarks/search_cost/README.md``: short evaluations
over-rate plans that train the new head at a high rate). So a few plans (``rerank_from``: the
last generation's best distinct plans, each generation's winner, or with scores that compare
across generations the best of the whole search; never two fitness values from different folds
compared) are trained with the final recipe on the whole training split,
seed ``final_seeds[0]``, and the plan with the best validation score wins. The winning run is
that seed's final run, so the winner is not trained twice. This is the same selection the
baselines get from their learning-rate grid: a few full-recipe runs compared on validation.
Each run is recorded in ``rerank.jsonl``; callbacks hear ``on_rerank_start``,
``on_rerank_epoch`` and ``on_rerank_run``, and ``on_final_run`` for the winning run.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from biotune.callbacks import emit
from biotune.core.cost import run_work
from biotune.core.evolution import BioTuneEvolution, Candidate
from biotune.core.plan import FineTunePlan, decode_genome
from biotune.core.records import FinalRun, Role
from biotune.finetuned import META
from biotune.runner import promote
from biotune.runner.final import final_training_run, save_model
from biotune.runner.fitness import Evaluator
from biotune.training import EpochEvents

if TYPE_CHECKING:
    from biotune.runner.search import Search

_log = logging.getLogger("biotune.search")


def candidates(
    population: Sequence[tuple[Any, float]], names: Sequence[str], k: int
) -> list[tuple[Any, float, FineTunePlan]]:
    """The first ``k`` distinct plans of a generation (best first): (candidate, fitness, plan)."""
    out: list[tuple[Any, float, FineTunePlan]] = []
    seen: set[tuple] = set()
    for candidate, fitness in population:
        plan = decode_genome(candidate.genes, names)
        if not plan.trained or plan.key() in seen:
            continue
        seen.add(plan.key())
        out.append((candidate, fitness, plan))
        if len(out) == k:
            break
    return out


def generation_winners(
    history: Sequence[dict[str, Any]],
    evaluations: Sequence[dict[str, Any]],
    population: Sequence[tuple[Any, float]],
    names: Sequence[str],
    k: int,
) -> list[tuple[Any, float, FineTunePlan]]:
    """Each generation's winner, newest first, one plan per set of trained blocks, topped up
    with the last generation's best distinct plans.

    A winner is the best of its generation on that generation's fold, so no two fitness values
    from different folds are compared; the final-recipe training decides between them. Going
    back through the generations keeps a structure the search preferred earlier and left later
    on one fold's noise (the last generation may hold variants of one plan only, e.g. linear
    probes at three learning rates)."""
    by_id = {r["candidate"]: r for r in evaluations}
    out: list[tuple[Any, float, FineTunePlan]] = []
    structures: set[tuple[str, ...]] = set()
    seen: set[tuple] = set()
    for summary in reversed(history):
        record = by_id.get(summary.get("best_id"))
        if record is None:
            continue
        plan = decode_genome(record["genes"], names)
        if not plan.trained or plan.trained in structures:
            continue
        structures.add(plan.trained)
        seen.add(plan.key())
        out.append((_candidate_of(record), float(record["fitness"]), plan))
        if len(out) == k:
            return out
    for candidate, fitness, plan in candidates(population, names, len(population)):
        if len(out) == k:
            break
        if plan.key() not in seen:
            seen.add(plan.key())
            out.append((candidate, fitness, plan))
    return out


def _candidate_of(record: dict[str, Any]) -> Candidate:
    """The candidate an evaluation record was made for."""
    return Candidate(
        record["candidate"],
        np.asarray(record["genes"], dtype=float),
        record["generation"],
        Role(record["role"]),
    )


def best_of_search(
    evaluations: Sequence[dict[str, Any]],
    names: Sequence[str],
    k: int,
    structures: bool = False,
) -> list[tuple[Any, float, FineTunePlan]]:
    """The ``k`` best distinct plans of the whole search (lowest fitness first, ties: the earlier
    candidate); with ``structures``, only the best plan of each set of trained blocks. Only for
    scores that compare across generations (``fold_policy="fixed"`` or one fold), which
    ``SearchConfig`` checks.

    An evolution's best plans are mostly local variants of its elites (in the accuracy
    benchmark, the 6 best of a search held 1 to 3 sets of trained blocks), so the best plans
    alone give the longer rungs near-copies of one plan to choose from; one per structure keeps
    the plans a short evaluation under-rates, such as full fine-tuning, in the running."""
    out: list[tuple[Any, float, FineTunePlan]] = []
    seen: set[tuple] = set()
    for record in sorted(evaluations, key=lambda r: (r["fitness"], r["candidate"])):
        plan = decode_genome(record["genes"], names)
        key = plan.trained if structures else plan.key()
        if not plan.trained or key in seen:
            continue
        seen.add(key)
        out.append((_candidate_of(record), float(record["fitness"]), plan))
        if len(out) == k:
            break
    return out


def choose(records: Sequence[dict[str, Any]], metric: str = "val_balanced") -> dict[str, Any]:
    """The record with the best validation score; ties go to the better search rank."""
    return max(records, key=lambda r: (r[metric], -r["rank"]))


def rerank_plans(
    search: Search, evo: BioTuneEvolution, evaluator: Evaluator
) -> tuple[list[dict[str, Any]], list[tuple[Any, float, FineTunePlan]]]:
    """The plans ``rerank_from`` picks (``candidates`` or ``generation_winners``) trained with
    the final recipe (seed ``final_seeds[0]``, resumable); the best on validation becomes that
    seed's final run and the run's saved model. Returns the runs' records and the picks."""
    assert search.bench is not None
    bench, config, seed = search.bench, search.config.final, search.config.final_seeds[0]
    done = search.run.rerank_runs()
    names, k = bench.partition.names, max(search.config.rerank, search.config.promote)
    if search.config.rerank_from == "winners":
        picks = generation_winners(evo.history, search.run.evaluations(), evo.population, names, k)
    elif search.config.rerank_from in ("best", "structures"):
        structures = search.config.rerank_from == "structures"
        picks = best_of_search(search.run.evaluations(), names, k, structures)
    else:
        picks = candidates(evo.population, names, k)
    if search.config.promote > search.config.rerank:  # the middle rung narrows them first
        picks = promote.narrow(search, evaluator, picks)
    # A run recorded earlier keeps its training; its rank is its place among these picks (ties
    # on validation go to the better rank).
    ranks = {c.id: rank for rank, (c, _, _) in enumerate(picks)}
    done = {i: {**r, "rank": ranks[i]} if i in ranks else r for i, r in done.items()}
    finished = [done[c.id] for c, _, _ in picks if c.id in done]
    best = choose(finished) if finished else None
    for rank, (candidate, fitness, plan) in enumerate(picks):
        if candidate.id in done:
            continue
        _log.info(
            "re-rank %d/%d: training %s with the final recipe (seed %d, up to %d epochs)",
            rank + 1,
            len(picks),
            plan.describe(),
            seed,
            config.epochs,
        )
        emit(search.callbacks, "on_rerank_start", rank, len(picks), plan.to_dict(), config.epochs)
        model, run = final_training_run(
            bench,
            plan,
            config,
            seed,
            keep_model=True,
            hooks=EpochEvents(search.callbacks, "on_rerank_epoch", rank),
        )
        work = run_work(
            evaluator.flops,
            run.cached_prefix,
            plan.frozen_prefix,
            run.train_images,
            run.eval_images,
        )
        rec = {
            **run.to_dict(),
            "candidate": candidate.id,
            "rank": rank,
            "fitness": fitness,
            "plan": plan.to_dict(),
            "work": work,
        }
        if best is None or choose([best, rec]) is rec:
            # The best so far is saved as the run's model before its record is written, so a
            # resumed search finds the winner's model on disk and never trains it again.
            save_model(search.run.path, model, bench, search.config.data, plan, config, run)
            best = rec
        search.run.append_rerank(rec)
        done[candidate.id] = rec
        emit(search.callbacks, "on_rerank_run", rec)
        _log.info(
            "re-rank %d/%d: %s: val balanced accuracy %.4f (its search score %.4f)",
            rank + 1,
            len(picks),
            plan.describe(),
            rec["val_balanced"],
            1 - fitness,  # fitness is a loss: 1 - the protocol's score
        )
    records = [done[c.id] for c, _, _ in picks]
    if not records:
        return [], picks
    chosen = choose(records)
    if seed not in search.run.final_runs() and _saved(search, chosen):
        run = FinalRun.from_dict(chosen)
        search.run.append_final_run(run)
        _log.info(
            "final training seed %d: the re-ranking's winning run (re-rank %d/%d), not trained "
            "again",
            seed,
            chosen["rank"] + 1,
            len(picks),
        )
        emit(search.callbacks, "on_final_run", run.to_dict())
    return records, picks


def _saved(search: Search, record: dict[str, Any]) -> bool:
    """Whether the run's saved model is the one of this re-ranking record (always, on the CPU;
    a run retrained on a GPU after a crash may score otherwise, and is then trained again as
    its seed's final run)."""
    meta = search.run.read(META)
    return (
        isinstance(meta, dict)
        and meta.get("plan") == record["plan"]
        and meta.get("seed") == record["seed"]
        and (meta.get("scores") or {}).get("val_balanced") == record["val_balanced"]
    )
