"""Run a search: schedule evaluations, persist every result, resume, then train the winner.

The loop is Optuna-like: the evolution proposes (``ask``), an executor trains and scores, the
runner records each finished evaluation at once and tells the evolution. After the search, the
best plan is trained on the whole training split with several seeds and tested once.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import platform
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from biotune import __version__, rerank
from biotune.blocks import BlockPartition, partition_blocks
from biotune.callbacks import emit
from biotune.core import cost as costs
from biotune.core.budget import BudgetConfig, SearchBudget
from biotune.core.evolution import BioTuneEvolution, EvolutionConfig
from biotune.core.plan import FineTunePlan, decode_genome
from biotune.core.records import Evaluation, Status
from biotune.data import DEMO_SIZES, DatasetSplits, is_offline, load_dataset, subset
from biotune.errors import BioTuneError
from biotune.executors import Task, check_reachable, make_executor
from biotune.features import FeatureCache, block_chain, train_plan_fast
from biotune.fitness import Evaluator, SearchProtocol
from biotune.inputs import data_fingerprint, model_fingerprint
from biotune.measure import PlanCosts
from biotune.models import LoadedModel, load_model
from biotune.rundir import (
    CONFIG,
    EVALUATIONS,
    GENERATIONS,
    PARTITION,
    SESSIONS,
    STATE,
    RunDirectory,
    fingerprint,
)
from biotune.training import (
    FinalEpochs,
    TrainConfig,
    batches,
    count_parameters,
    default_device,
    evaluate,
)

FINAL_RUNS = "final_runs.jsonl"
_log = logging.getLogger("biotune.search")


@dataclass(frozen=True)
class DataConfig:
    """Which model and data, at which size."""

    model: str = "efficientnet_lite0"
    dataset: str = "animal-shape"
    data_root: str | None = None
    download: bool = False
    pretrained: bool = True
    checkpoint: str | None = None
    image_size: int | None = 32  # None: the model's native resolution
    # None: the whole split, except the offline demo datasets (capped at data.DEMO_SIZES)
    train_size: int | None = None
    val_size: int | None = None
    test_size: int | None = None
    split_seed: int = 0
    bad_images: str = "skip"
    # block name -> module prefixes or regexes, in order (None: the model family's blocks)
    blocks: dict[str, list[str]] | None = None
    full_data: bool = False  # the whole splits, the offline demo datasets too (sizes ignored)

    def __post_init__(self) -> None:
        if self.image_size is not None and self.image_size < 8:
            raise BioTuneError(f"image_size must be at least 8 (got {self.image_size})")
        for name in ("train_size", "val_size", "test_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise BioTuneError(f"{name} must be a positive integer (got {value})")
        if self.bad_images not in ("skip", "error"):
            raise BioTuneError(f"bad_images must be 'skip' or 'error' (got {self.bad_images!r})")


@dataclass(frozen=True)
class SearchConfig:
    """Everything a search depends on; stored in the run directory and checked on resume."""

    data: DataConfig = field(default_factory=DataConfig)
    evolution: EvolutionConfig = field(default_factory=EvolutionConfig)
    protocol: SearchProtocol = field(default_factory=SearchProtocol)
    final: TrainConfig = field(default_factory=TrainConfig)
    final_seeds: tuple[int, ...] = (0, 1, 2)
    seed: int = 0
    # Re-rank the best k distinct plans of the last generation with the final recipe and choose
    # on validation (``rerank.py``); 0 or 1: the search's best plan as it is.
    rerank: int = 0
    # Budgets and the Pareto trade-off's settings (``budget.py``); the defaults change nothing.
    budget: BudgetConfig = field(default_factory=BudgetConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.rerank, int) or self.rerank < 0:
            raise BioTuneError(f"rerank must be a whole number >= 0 (got {self.rerank!r})")

    def to_dict(self) -> dict[str, Any]:
        return {
            "data": asdict(self.data),
            "evolution": self.evolution.to_dict(),
            "protocol": self.protocol.to_dict(),
            "final": self.final.to_dict(),
            "final_seeds": list(self.final_seeds),
            "seed": self.seed,
            # Written only when on, so configurations from before it existed compare equal.
            **({"rerank": self.rerank} if self.rerank else {}),
            **({"budget": self.budget.to_dict()} if self.budget != BudgetConfig() else {}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SearchConfig:
        return cls(
            data=DataConfig(**d["data"]),
            evolution=EvolutionConfig(**d["evolution"]),
            protocol=SearchProtocol.from_dict(d["protocol"]),
            final=TrainConfig(**d["final"]),
            final_seeds=tuple(d["final_seeds"]),
            seed=d["seed"],
            rerank=d.get("rerank", 0),
            budget=BudgetConfig.from_dict(d.get("budget")),
        )


#: Memory for the frozen-prefix features of final trainings and baselines (whole splits).
FINAL_CACHE_MB = 2048.0


@dataclass
class Workbench:
    """The loaded model, its blocks and the data: what every evaluation starts from."""

    loaded: LoadedModel
    partition: BlockPartition
    splits: DatasetSplits
    _caches: dict[tuple, FeatureCache | None] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model

    def feature_cache(self, config: TrainConfig) -> FeatureCache | None:
        """One feature cache of the pretrained model for every training on the whole splits, so
        several seeds, methods and plans share the frozen prefixes; None if the model cannot run
        block by block."""
        key = (config.eval_batch_size, config.precision)
        if key not in self._caches:
            sample, _ = next(batches(self.splits.val, 2))
            stages = block_chain(self.model, self.partition, sample)
            self._caches[key] = None if stages is None else FeatureCache(
                self.model, stages, int(FINAL_CACHE_MB * 2**20), config.eval_batch_size,
                default_device(), config.precision,
            )
        return self._caches[key]

    def __getstate__(self) -> dict[str, Any]:
        """Workers get the model and data, not features cached here."""
        return {**self.__dict__, "_caches": {}}


def split_sizes(data: DataConfig) -> tuple[int | None, int | None, int | None]:
    """The train / val / test caps in force: the ones given, else the demo caps for the offline
    datasets and the whole splits for everything else (a user's folder is used whole)."""
    if data.full_data:
        return (None, None, None)
    given = (data.train_size, data.val_size, data.test_size)
    if not is_offline(data.dataset):
        return given
    return tuple(g if g is not None else d for g, d in zip(given, DEMO_SIZES, strict=True))


def prepare(data: DataConfig) -> Workbench:
    """Load the model and the data, sized and normalised for each other, and split the blocks."""
    probe = load_model(data.model, num_classes=2, pretrained=False)
    size = data.image_size or probe.input_size
    train_size, val_size, test_size = split_sizes(data)
    splits = load_dataset(
        data.dataset, size, probe.mean, probe.std, root=data.data_root, seed=data.split_seed,
        train_size=train_size, val_size=val_size, test_size=test_size,
        download=data.download, bad_images=data.bad_images,
    )
    loaded = load_model(
        data.model, num_classes=len(splits.classes), pretrained=data.pretrained,
        checkpoint=data.checkpoint,
    )
    return Workbench(loaded, partition_blocks(loaded.model, data.blocks), splits)


def search_budget(bench: Any, config: Any, flops: Sequence[float]) -> SearchBudget | None:
    """The budget of a search on ``bench`` (a ``Workbench``) by ``config`` (its
    ``SearchConfig``), its feasibility checked; None for a search with neither budget nor
    Pareto objective: nothing is checked or measured, so it runs and records as before."""
    objective = config.evolution.objective
    if not config.budget.limited and objective != "pareto":
        return None
    sample, _ = next(batches(bench.splits.val, 4))
    costs = PlanCosts(bench.model, bench.partition, sample, flops, config.final.batch_size,
                      config.final.optimizer)
    budget = SearchBudget(config.budget, costs, objective)
    budget.check_feasible()
    return budget


def evaluator_for(bench: Workbench, config: SearchConfig) -> Evaluator:
    """Scores genomes on ``bench``'s model and data by ``config``'s protocol and folds."""
    return Evaluator(
        bench.model, bench.partition, bench.splits, config.protocol, fold_seed=config.seed
    )


def build_evaluator(config: SearchConfig) -> Evaluator:
    """Everything a worker process needs to score genomes, rebuilt from the configuration."""
    return evaluator_for(prepare(config.data), config)


@dataclass
class SearchResult:
    run_dir: Path
    best_plan: FineTunePlan
    best_fitness: float
    evaluations: list[dict[str, Any]]
    final: dict[str, Any] | None
    cost: dict[str, Any] = field(default_factory=dict)
    pareto: dict[str, Any] | None = None  # the objective "pareto": what pareto.json holds


def _config_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _config_diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}: {va!r} -> {vb!r}")
    return out


def partition_record(bench: Workbench) -> dict[str, Any]:
    """The blocks, each fingerprinted by its name and its parameters' names and shapes."""
    shapes = {name: list(p.shape) for name, p in bench.model.named_parameters()}
    blocks = bench.partition.to_dict()["blocks"]
    for block in blocks:
        params = [[name, shapes.get(name)] for name in block["param_names"]]
        block["fingerprint"] = fingerprint([block["name"], params])
    return {"fingerprint": fingerprint([b["fingerprint"] for b in blocks]), "blocks": blocks}


def _partition_changes(stored: list[dict[str, Any]], current: list[dict[str, Any]]) -> str:
    """Which blocks differ between two partition records, in a few words."""
    old = {b.get("name"): b.get("fingerprint") for b in stored}
    new = {b["name"]: b["fingerprint"] for b in current}

    def names(found: list[Any]) -> str:
        more = f" and {len(found) - 4} more" if len(found) > 4 else ""
        return ", ".join(map(str, found[:4])) + more

    parts = []
    for what, found in (
        ("removed", [n for n in old if n not in new]),
        ("added", [n for n in new if n not in old]),
        ("changed", [n for n in new if n in old and old[n] != new[n]]),
    ):
        if found:
            parts.append(f"{what} {names(found)}")
    return f"{len(old)} blocks, now {len(new)}: " + ("; ".join(parts) or "reordered")


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


class Search:
    """A search bound to a run directory: start it, or resume it after any interruption."""

    #: What every evaluation record holds (the runner reads them when it resumes).
    RECORD_KEYS = (
        "candidate", "generation", "role", "genes", "plan", "fold", "seeds", "scores", "fitness",
        "status", "seconds", "train_images", "eval_images", "epochs",
    )

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
    ) -> None:
        self.config = config
        self.run = RunDirectory(run_dir)
        self.bench = bench
        self.bench_given = bench is not None
        # The display is one more callback (biotune.callbacks), called first.
        self.callbacks = [*([progress] if progress is not None else []), *callbacks]
        self.executor = executor
        self.workers = workers
        self.ray_address = ray_address
        self._written: list[str] = []  # files a new search wrote (taken back if it fails early)
        self._sessions: list[dict[str, float]] = []
        self._clock = 0.0
        self.budget: SearchBudget | None = None  # set when the search starts (budget.py)

    # setup
    def _check_config(self, resume: bool) -> bool:
        """Refuse to mix searches in one directory; True when this is a new search."""
        wanted = self.config.to_dict()
        stored = self.run.read(CONFIG) if self.run.exists() else None
        if stored is None:
            if resume:
                raise BioTuneError(f"nothing to resume: {self.run.path} holds no search")
            if any(self.run.path.glob("*.json*")):
                raise BioTuneError(
                    f"run directory {self.run.path} already holds files; choose a new one"
                )
            return True
        if not resume:
            raise BioTuneError(
                f"run directory {self.run.path} already holds a search; use --resume to continue "
                "it or choose a new directory"
            )
        diff = _config_diff(stored["search"], wanted)
        if diff:
            raise BioTuneError(
                f"cannot resume {self.run.path} with a different configuration ("
                + "; ".join(diff[:3]) + (f"; and {len(diff) - 3} more" if len(diff) > 3 else "")
                + ")"
            )
        return False

    def _check_fingerprints(self, current: dict[str, str]) -> None:
        """Refuse to resume on another model or other data than the search started with (a
        run directory from before fingerprints were stored is not checked)."""
        stored = (self.run.read(CONFIG) or {}).get("fingerprints") or {}
        for what, words in (("model", "the model (its class, parameter names or shapes)"),
                            ("data", "the data (sizes, classes, labels or files)")):
            if stored.get(what) and stored[what] != current[what]:
                raise BioTuneError(
                    f"cannot resume {self.run.path}: {words} changed since the search started; "
                    "resume with the model and data it started with"
                )

    def _check_partition(
        self, current: dict[str, Any], names: tuple[str, ...], records: list[dict[str, Any]]
    ) -> None:
        """Refuse to resume on other blocks: every stored gene would steer another block."""
        refuse = (
            f"cannot resume {self.run.path}: the model's blocks changed since the search started "
            "({}); resume with the model and blocks it started with"
        )
        stored = self.run.read(PARTITION)
        if stored is not None:
            if stored.get("fingerprint") != current["fingerprint"]:
                raise BioTuneError(refuse.format(
                    _partition_changes(stored.get("blocks", []), current["blocks"])
                ))
            return
        # A run directory from before partitions were stored: check what its records show.
        state = self.run.read(STATE)
        if isinstance(state, dict) and state.get("num_blocks", len(names)) != len(names):
            raise BioTuneError(refuse.format(f"{state['num_blocks']} blocks, now {len(names)}"))
        for rec in records[:1]:
            plan = rec["plan"] if isinstance(rec["plan"], dict) else {}
            old = tuple(str(b.get("name")) for b in plan.get("blocks", []))
            if old != names:
                raise BioTuneError(refuse.format(
                    f"{', '.join(old)} -> {', '.join(names)}"
                ))

    def _evolution(self, num_blocks: int) -> BioTuneEvolution:
        state = self.run.read(STATE)
        hooks = self.budget.evolution_hooks() if self.budget else {}
        if state is not None:
            return BioTuneEvolution.from_state_dict(state, **hooks)
        return BioTuneEvolution(num_blocks, self.config.evolution, seed=self.config.seed, **hooks)

    def _write(self, name: str, data: Any) -> None:
        self.run.write(name, data)
        if name not in self._written:
            self._written.append(name)

    def _tick(self) -> None:
        """Store this invocation's search time so far: resumed wall time sums the invocations."""
        self._sessions[-1]["seconds"] = time.perf_counter() - self._clock
        self._write(SESSIONS, self._sessions)

    # the loop
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

    def _run_locked(self, resume: bool, final: bool) -> SearchResult:
        """Under the lock: a failure before the first record takes back what this call wrote,
        so the directory can be used again (or is gone, if this call made it)."""
        new = False
        self._written = []
        try:
            new = self._check_config(resume)
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
        """Load and check everything (data, model, blocks, folds, executor), then write."""
        bench = self.bench or prepare(self.config.data)
        _log.info("data: %s", bench.splits.describe())
        self.bench = bench
        evaluator = evaluator_for(bench, self.config)
        self.budget = search_budget(bench, self.config, evaluator.flops)
        records = self.run.records(EVALUATIONS, repair=True, required=self.RECORD_KEYS)
        partition = partition_record(bench)
        prints = {"model": model_fingerprint(bench.model), "data": data_fingerprint(bench.splits)}
        if not new:
            self._check_partition(partition, bench.partition.names, records)
            self._check_fingerprints(prints)
        evo = self._evolution(len(bench.partition))
        # Workers rebuild the evaluator: from the configuration, or from the given bench
        # (pickled to them) when the caller brought its own model or data.
        factory = (
            functools.partial(evaluator_for, bench, self.config)
            if self.bench_given
            else functools.partial(build_evaluator, self.config)
        )
        executor = make_executor(
            self.executor, evaluator, factory, workers=self.workers, ray_address=self.ray_address,
        )
        try:
            if new:
                self._write(CONFIG, {"biotune": __version__, "search": self.config.to_dict(),
                                     "fingerprints": prints})
            self._write(
                "blocks.json",
                [{"name": n, "params": p, "share": s} for n, p, s in bench.partition.summary()],
            )
            if new or self.run.read(PARTITION) is None:
                self._write(PARTITION, partition)
            done = self._loop(evo, evaluator, executor, records)
        finally:
            executor.close()
        best, best_fitness = evo.best
        reranked = self._rerank(evo, evaluator) if self.config.rerank > 1 else []
        if reranked:
            chosen = rerank.choose(reranked)
            best, best_fitness = next((c, f) for c, f in evo.population
                                      if c.id == chosen["candidate"])
        plan = decode_genome(best.genes, bench.partition.names)
        self.run.write(
            "best_plan.json",
            {**plan.to_dict(), "fitness": best_fitness, "candidate": best.id,
             "genes": [float(g) for g in best.genes], "origin": self._origin(partition)},
        )
        evaluations = [done[k] for k in sorted(done)]
        wall = sum(float(s.get("seconds", 0.0)) for s in self._sessions)
        cost = costs.search_cost(evaluations, evaluator.ft_work, wall_seconds=wall)
        cost["cache"] = evaluator.cache_status
        if reranked:
            work = sum(r["work"] for r in reranked)
            cost["rerank"] = {"plans": len(reranked), "work_flops": work,
                              "seconds": sum(r["seconds"] for r in reranked)}
            cost["work_flops"] += work
            cost["ft_equivalents"] = cost["work_flops"] / cost["ft_work_flops"]
        self.run.write("search_summary.json", {"cost": cost, "best_fitness": best_fitness,
                                               "best_plan": plan.to_dict()})
        final_result = self._final(plan) if final else None
        pareto = None
        if self.config.evolution.objective == "pareto":
            from biotune.tradeoff import finish_pareto

            pareto = finish_pareto(self, evaluations, final)
        return SearchResult(self.run.path, plan, best_fitness, evaluations, final_result, cost,
                            pareto)

    def _loop(
        self, evo: BioTuneEvolution, evaluator: Evaluator, executor: Any,
        records: list[dict[str, Any]],
    ) -> dict[int, dict[str, Any]]:
        """Ask, evaluate what is not recorded yet, record each result at once, tell."""
        assert self.bench is not None
        sessions = self.run.read(SESSIONS)
        self._sessions = [*(sessions if isinstance(sessions, list) else []),
                          {"started": time.time(), "seconds": 0.0}]
        self._clock = time.perf_counter()
        done = {r["candidate"]: r for r in records}
        if self.executor == "inprocess":
            self._replay_cache(evaluator, records)
        emit(self.callbacks, "on_search_start", self.config.evolution.total_evaluations, len(done))
        try:
            while not evo.done:
                candidates = evo.ask()
                results = {c.id: done[c.id]["fitness"] for c in candidates if c.id in done}
                for c in candidates:
                    if c.id in done:
                        self._check_record(done[c.id], c)
                on_result = functools.partial(self._record, done, results, evo)

                todo = []
                for c in candidates:
                    if c.id in done:
                        continue
                    twin = self.budget.over_budget(c, evaluator) if self.budget else None
                    twin = twin or self._memoised(c, done, evaluator, self.bench.partition)
                    if twin is not None:
                        on_result(twin)
                    else:
                        todo.append(self._task(c, done, evo.config.objective != "pareto"))
                executor.run(todo, on_result)
                generations = len(evo.history)
                evo.tell(results)
                self._write(STATE, evo.state_dict())
                self._write(GENERATIONS, evo.history)
                if len(evo.history) > generations:
                    best = decode_genome(evo.best[0].genes, self.bench.partition.names)
                    emit(self.callbacks, "on_generation",
                         {**evo.history[-1], "best_plan": best.to_dict()})
        finally:
            with contextlib.suppress(BioTuneError):  # the error that stopped it says more
                self._tick()
            emit(self.callbacks, "on_search_end", evo.done)
        return done

    @staticmethod
    def _replay_cache(evaluator: Evaluator, records: list[dict[str, Any]]) -> None:
        """Rebuild the feature cache of the interrupted invocation by replaying its evaluations'
        requests in order: the evaluations still to come then build (and count) what they would
        have without the interruption, so a resumed search costs what an uninterrupted one does."""
        if evaluator.cache is None:
            return
        with evaluator._pinned_threads():  # cached features depend on the thread count
            for rec in records:
                if rec.get("reused_from") is not None or rec["status"] in (Status.INVALID,
                                                                           Status.OVER_BUDGET):
                    continue
                plan = decode_genome(rec["genes"], evaluator.partition.names)
                train = subset(evaluator.splits.train, evaluator.folds[rec["fold"]])
                evaluator._cached(rec["fold"], train, plan.frozen_prefix)

    def _record(
        self, done: dict[int, dict[str, Any]], results: dict[int, float], evo: Any,
        ev: Evaluation,
    ) -> None:
        """Persist a finished evaluation at once (fsynced) and note its fitness for ``tell``."""
        rec = ev.to_dict()
        if self.budget is not None:
            rec["cost"] = self.budget.record(ev.genes)
        self.run.append(EVALUATIONS, rec)
        done[ev.candidate] = rec
        results[ev.candidate] = ev.fitness
        self._tick()
        emit(self.callbacks, "on_evaluation", rec)

    def _check_record(self, record: dict[str, Any], candidate: Any) -> None:
        if not np.allclose(record["genes"], candidate.genes, rtol=0, atol=1e-12):
            raise BioTuneError(
                f"{self.run.path / EVALUATIONS}: record {candidate.id} does not match the "
                "search state; the run directory was modified"
            )

    @staticmethod
    def _task(candidate: Any, done: dict[int, dict[str, Any]], prune: bool = True) -> Task:
        """A task; children carry this generation's elite curves for early termination (not
        with ``prune=False``: the pareto objective, where a cheap plan below the accurate elites'
        curves may still be on the front)."""
        reference: tuple[tuple[float, ...], ...] = ()
        if prune and candidate.role in ("child", "immigrant"):
            reference = tuple(
                tuple(curve)
                for r in done.values()
                if r["generation"] == candidate.generation and r["role"] in ("elite", "local")
                for curve in r.get("curves", [])
            )
        return Task(
            candidate.id, tuple(float(g) for g in candidate.genes), candidate.generation,
            candidate.role, reference,
        )

    def _memoised(
        self,
        candidate: Any,
        done: dict[int, dict[str, Any]],
        evaluator: Evaluator,
        partition: BlockPartition,
    ) -> Evaluation | None:
        """An equivalent plan already trained on the same fold and seeds is not trained again."""
        if not self.config.protocol.memoize:
            return None
        plan = decode_genome(candidate.genes, partition.names)
        fold = evaluator.fold_of(candidate.generation)
        for rec in done.values():
            if (
                rec["status"] == "ok"
                and rec["fold"] == fold
                and rec.get("reused_from") is None
                and FineTunePlan.from_dict(rec["plan"]).key() == plan.key()
            ):
                return Evaluation(
                    candidate.id, candidate.generation, candidate.role,
                    [float(g) for g in candidate.genes], plan.to_dict(), fold, rec["seeds"],
                    rec["scores"], rec["fitness"], "ok", 0.0, 0, 0, rec["epochs"],
                    rec.get("curves", []), reused_from=rec["candidate"],
                )
        return None

    def _rerank(self, evo: BioTuneEvolution, evaluator: Evaluator) -> list[dict[str, Any]]:
        """The best distinct plans of the last generation trained with the final recipe (seed
        ``final_seeds[0]``, resumable); the best on validation becomes that seed's final run
        and the run's saved model."""
        assert self.bench is not None
        bench, config, seed = self.bench, self.config.final, self.config.final_seeds[0]
        done = {r["candidate"]: r for r in self.run.records(rerank.RERANK, repair=True,
                                                            required=("candidate",))}
        best_model = None
        picks = rerank.candidates(evo.population, bench.partition.names, self.config.rerank)
        for rank, (candidate, fitness, plan) in enumerate(picks):
            if candidate.id in done:
                continue
            model, rec = final_training_run(bench, plan, config, seed, keep_model=True)
            first = plan.frozen_prefix
            work = costs.run_work(evaluator.flops, rec["cached_prefix"], first,
                                  rec["train_images"], rec["eval_images"])
            rec = {**rec, "candidate": candidate.id, "rank": rank, "fitness": fitness,
                   "plan": plan.to_dict(), "work": work}
            self.run.append(rerank.RERANK, rec)
            done[candidate.id] = rec
            _log.info("re-rank %d/%d: %s: val balanced accuracy %.4f (search fitness %.4f)",
                      rank + 1, len(picks), plan.describe(), rec["val_balanced"], fitness)
            if best_model is None or rec["val_balanced"] > best_model[1]["val_balanced"]:
                best_model = (model, rec, plan)
        records = [done[c.id] for c, _, _ in picks]
        chosen = rerank.choose(records)
        finals = {r["seed"] for r in self.run.records(FINAL_RUNS, repair=True,
                                                      required=("seed",))}
        if best_model is not None and best_model[1] is chosen and seed not in finals:
            model, rec, plan = best_model
            save_model(self.run.path, model, bench, self.config.data, plan, config, rec)
            self.run.append(FINAL_RUNS, {k: v for k, v in rec.items()
                                         if k not in ("candidate", "rank", "fitness", "plan",
                                                      "work")})
        return records

    def _origin(self, partition: dict[str, Any]) -> dict[str, Any]:
        """Where a plan came from, so ``biotune train --plan`` can reuse it and refuse a plan
        made for other blocks."""
        return {
            "data": asdict(self.config.data),
            "base_lr": self.config.final.base_lr,
            "partition": {"names": [b["name"] for b in partition["blocks"]],
                          "fingerprint": partition["fingerprint"]},
        }

    def _final(self, plan: FineTunePlan) -> dict[str, Any]:
        """Train the plan on the whole training split per seed (resumable), test each once.

        The seed best on validation so far is saved as the run's fine-tuned model (before its
        record, so a crash in between retrains that seed rather than losing its model).
        """
        assert self.bench is not None
        runs = {
            r["seed"]: r for r in self.run.records(FINAL_RUNS, repair=True, required=("seed",))
        }
        best = max(runs.values(), key=lambda r: r["val_balanced"], default=None)
        for seed in self.config.final_seeds:
            if seed in runs:
                continue
            model, rec = final_training_run(
                self.bench, plan, self.config.final, seed, keep_model=True,
                callbacks=self.callbacks,
            )
            if best is None or rec["val_balanced"] > best["val_balanced"]:
                save_model(self.run.path, model, self.bench, self.config.data, plan,
                           self.config.final, rec)
                best = rec
            self.run.append(FINAL_RUNS, rec)
            runs[seed] = rec
        summary = summarize_final(
            [runs[s] for s in self.config.final_seeds], plan, self.bench
        )
        if best is not None:
            summary["model"] = {"seed": best["seed"], "files": ["model.safetensors",
                                                               "finetuned.json"]}
        self.run.write("final.json", summary)
        return summary


def final_training_run(
    bench: Workbench, plan: FineTunePlan, config: TrainConfig, seed: int,
    keep_model: bool = False, callbacks: Sequence[Any] = (),
) -> Any:
    """Fine-tune under ``plan`` on the whole training split; early stopping on val; test once.

    A plan that freezes the first blocks trains on their cached features (as the search does).
    Returns the record, or (trained model, record) with ``keep_model``. Without a test split the
    test scores are None. ``callbacks`` hear ``on_final_start``, ``on_final_epoch`` and
    ``on_final_run`` (``biotune.callbacks``).
    """
    emit(callbacks, "on_final_start", seed, config.epochs)
    model, result, cached = train_plan_fast(
        bench.model, bench.partition, plan, bench.splits.train, bench.splits.val, config,
        seed=seed, device=default_device(),
        cache=bench.feature_cache(config) if config.frozen_eval else None,
        hooks=FinalEpochs(callbacks, seed) if callbacks else None,
    )
    test = (
        evaluate(model, bench.splits.test, config.eval_batch_size, default_device(),
                 config.precision, config.channels_last)
        if bench.splits.test is not None else None
    )
    record = {
        "seed": seed,
        "test_top1": test.top1 if test else None,
        "test_balanced": test.balanced if test else None,
        "val_top1": result.val.top1,
        "val_balanced": result.val.balanced,
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "seconds": result.seconds,
        "train_images": result.train_images,
        "eval_images": result.eval_images,
        "cached_prefix": cached,
        "status": result.status,
        "trainable_params": count_parameters(model, trainable_only=True),
    }
    emit(callbacks, "on_final_run", record)
    return (model, record) if keep_model else record


def save_model(
    directory: str | Path, model: torch.nn.Module, bench: Workbench, data: DataConfig,
    plan: FineTunePlan, config: TrainConfig, record: dict[str, Any],
) -> Path:
    """Write a trained model with what it takes to use it (``biotune.finetuned``)."""
    from biotune.finetuned import Preprocess, save_finetuned

    user_data = data.dataset.startswith("user:")
    preprocess = None if user_data else Preprocess(
        bench.splits.image_size, bench.loaded.mean, bench.loaded.std,
        "squash" if is_offline(data.dataset) else "crop",
    )
    details = {
        "plan": plan.to_dict(),
        "plan_text": plan.describe(),
        "base_lr": config.base_lr,
        "partition": partition_record(bench),
        "data": {**asdict(data), "splits": bench.splits.describe()},
        "scores": {k: record[k] for k in ("val_top1", "val_balanced", "test_top1",
                                          "test_balanced")},
        "seed": record["seed"],
        "trainable_params": record["trainable_params"],
    }
    return save_finetuned(directory, model, architecture=bench.loaded.name,
                          classes=bench.splits.classes, preprocess=preprocess, details=details)


def summarize_final(
    runs: list[dict[str, Any]], plan: FineTunePlan, bench: Workbench
) -> dict[str, Any]:
    def stat(key: str) -> dict[str, float] | None:
        if any(r.get(key) is None for r in runs):
            return None  # no test split
        values = np.array([r[key] for r in runs], dtype=float)
        return {"mean": float(values.mean()), "std": float(values.std(ddof=0))}

    trained = runs[0]["trainable_params"] if runs else 0  # parameters the user froze excluded
    total = count_parameters(bench.model)
    return {
        "plan": plan.to_dict(),
        "test_top1": stat("test_top1"),
        "test_balanced": stat("test_balanced"),
        "val_balanced": stat("val_balanced"),
        "trainable_params": trained,
        "trainable_share": trained / total,
        "seconds": float(sum(r["seconds"] for r in runs)),
        "runs": runs,
        "machine": machine_description(),
    }


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}"

