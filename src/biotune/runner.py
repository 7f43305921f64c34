"""Run a search: schedule evaluations, persist every result, resume, then train the winner.

The loop is Optuna-like: the evolution proposes (``ask``), an executor trains and scores, the
runner records each finished evaluation at once and tells the evolution. After the search, the
best plan is trained on the whole training split with several seeds and tested once.
"""

from __future__ import annotations

import functools
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from biotune import __version__
from biotune import cost as costs
from biotune.blocks import BlockPartition, partition_blocks
from biotune.data import DatasetSplits, load_dataset
from biotune.errors import BioTuneError
from biotune.evolution import BioTuneEvolution, EvolutionConfig
from biotune.executors import Task, make_executor
from biotune.features import FeatureCache, block_chain, train_plan_fast
from biotune.fitness import Evaluation, Evaluator, SearchProtocol
from biotune.models import LoadedModel, load_model
from biotune.plan import FineTunePlan, decode_genome
from biotune.rundir import CONFIG, EVALUATIONS, STATE, RunDirectory
from biotune.training import TrainConfig, batches, count_parameters, default_device, evaluate

FINAL_RUNS = "final_runs.jsonl"
GENERATIONS = "generations.json"


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
    train_size: int | None = 1000
    val_size: int | None = 500
    test_size: int | None = 1500
    split_seed: int = 0
    bad_images: str = "skip"

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

    def to_dict(self) -> dict[str, Any]:
        return {
            "data": asdict(self.data),
            "evolution": self.evolution.to_dict(),
            "protocol": self.protocol.to_dict(),
            "final": self.final.to_dict(),
            "final_seeds": list(self.final_seeds),
            "seed": self.seed,
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
        key = (config.eval_batch_size, config.amp)
        if key not in self._caches:
            sample, _ = next(batches(self.splits.val, 2))
            stages = block_chain(self.model, self.partition, sample)
            self._caches[key] = None if stages is None else FeatureCache(
                self.model, stages, int(FINAL_CACHE_MB * 2**20), config.eval_batch_size,
                default_device(), config.amp,
            )
        return self._caches[key]

    def __getstate__(self) -> dict[str, Any]:
        """Workers get the model and data, not features cached here."""
        return {**self.__dict__, "_caches": {}}


def prepare(data: DataConfig, block_override: dict[str, list[str]] | None = None) -> Workbench:
    """Load the model and the data, sized and normalised for each other, and split the blocks."""
    probe = load_model(data.model, num_classes=2, pretrained=False)
    size = data.image_size or probe.input_size
    splits = load_dataset(
        data.dataset, size, probe.mean, probe.std, root=data.data_root, seed=data.split_seed,
        train_size=data.train_size, val_size=data.val_size, test_size=data.test_size,
        download=data.download, bad_images=data.bad_images,
    )
    loaded = load_model(
        data.model, num_classes=len(splits.classes), pretrained=data.pretrained,
        checkpoint=data.checkpoint,
    )
    return Workbench(loaded, partition_blocks(loaded.model, block_override), splits)


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


def _config_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _config_diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}: {va!r} -> {vb!r}")
    return out


class Search:
    """A search bound to a run directory: start it, or resume it after any interruption."""

    def __init__(
        self,
        config: SearchConfig,
        run_dir: str | Path,
        *,
        bench: Workbench | None = None,
        progress: Any = None,
        executor: str = "inprocess",
        workers: int = 1,
        ray_address: str | None = None,
    ) -> None:
        self.config = config
        self.run = RunDirectory(run_dir)
        self.bench = bench
        self.bench_given = bench is not None
        self.progress = progress
        self.executor = executor
        self.workers = workers
        self.ray_address = ray_address

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

    def _evolution(self, num_blocks: int) -> BioTuneEvolution:
        state = self.run.read(STATE)
        if state is not None:
            return BioTuneEvolution.from_state_dict(state)
        return BioTuneEvolution(num_blocks, self.config.evolution, seed=self.config.seed)

    # the loop
    def run_search(self, resume: bool = False, final: bool = True) -> SearchResult:
        """Run (or continue) the search, then the final training; safe to kill at any point."""
        created = not self.run.path.exists()
        try:
            return self._run_locked(resume, final)
        except BioTuneError:
            if created and not self.run.exists():  # refused before anything was recorded
                shutil.rmtree(self.run.path, ignore_errors=True)
            raise

    def _run_locked(self, resume: bool, final: bool) -> SearchResult:
        with self.run.locked():
            new = self._check_config(resume)
            bench = self.bench or prepare(self.config.data)
            self.bench = bench
            if new:
                self.run.write(CONFIG, {"biotune": __version__, "search": self.config.to_dict()})
            self.run.write(
                "blocks.json",
                [{"name": n, "params": p, "share": s} for n, p, s in bench.partition.summary()],
            )
            evaluator = evaluator_for(bench, self.config)
            # Workers rebuild the evaluator: from the configuration, or from the given bench
            # (pickled to them) when the caller brought its own model or data.
            factory = (
                functools.partial(evaluator_for, bench, self.config)
                if self.bench_given
                else functools.partial(build_evaluator, self.config)
            )
            executor = make_executor(
                self.executor, evaluator, factory,
                workers=self.workers, ray_address=self.ray_address,
            )
            done = {r["candidate"]: r for r in self.run.records(EVALUATIONS, repair=True)}
            evo = self._evolution(len(bench.partition))
            total = self.config.evolution.total_evaluations
            if self.progress is not None:
                self.progress.start(total, len(done))
            started = time.perf_counter()
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
                        twin = self._memoised(c, done, evaluator, bench.partition)
                        if twin is not None:
                            on_result(twin)
                        else:
                            todo.append(self._task(c, done))
                    executor.run(todo, on_result)
                    evo.tell(results)
                    self.run.write(STATE, evo.state_dict())
                    self.run.write(GENERATIONS, evo.history)
            finally:
                executor.close()
                if self.progress is not None:
                    self.progress.stop()
            best, best_fitness = evo.best
            plan = decode_genome(best.genes, bench.partition.names)
            self.run.write(
                "best_plan.json",
                {**plan.to_dict(), "fitness": best_fitness, "candidate": best.id,
                 "genes": [float(g) for g in best.genes]},
            )
            evaluations = [done[k] for k in sorted(done)]
            cost = costs.search_cost(
                evaluations, evaluator.ft_work, wall_seconds=time.perf_counter() - started
            )
            cost["cache"] = evaluator.cache_status
            self.run.write("search_summary.json", {"cost": cost, "best_fitness": best_fitness,
                                                   "best_plan": plan.to_dict()})
            final_result = self._final(plan) if final else None
            return SearchResult(
                self.run.path, plan, best_fitness, evaluations, final_result, cost
            )

    def _record(
        self, done: dict[int, dict[str, Any]], results: dict[int, float], evo: Any,
        ev: Evaluation,
    ) -> None:
        """Persist a finished evaluation at once (fsynced) and note its fitness for ``tell``."""
        rec = ev.to_dict()
        self.run.append(EVALUATIONS, rec)
        done[ev.candidate] = rec
        results[ev.candidate] = ev.fitness
        if self.progress is not None:
            self.progress.update(ev, evo)

    def _check_record(self, record: dict[str, Any], candidate: Any) -> None:
        if not np.allclose(record["genes"], candidate.genes, rtol=0, atol=1e-12):
            raise BioTuneError(
                f"{self.run.path / EVALUATIONS}: record {candidate.id} does not match the "
                "search state; the run directory was modified"
            )

    @staticmethod
    def _task(candidate: Any, done: dict[int, dict[str, Any]]) -> Task:
        """A task; children carry this generation's elite curves for early termination."""
        reference: tuple[tuple[float, ...], ...] = ()
        if candidate.role in ("child", "immigrant"):
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
                and rec["reused_from"] is None
                and FineTunePlan.from_dict(rec["plan"]).key() == plan.key()
            ):
                return Evaluation(
                    candidate.id, candidate.generation, candidate.role,
                    [float(g) for g in candidate.genes], plan.to_dict(), fold, rec["seeds"],
                    rec["scores"], rec["fitness"], "ok", 0.0, 0, 0, rec["epochs"],
                    rec["curves"], reused_from=rec["candidate"],
                )
        return None

    def _final(self, plan: FineTunePlan) -> dict[str, Any]:
        """Train the plan on the whole training split per seed (resumable), test each once."""
        assert self.bench is not None
        runs = {r["seed"]: r for r in self.run.records(FINAL_RUNS, repair=True)}
        for seed in self.config.final_seeds:
            if seed in runs:
                continue
            rec = final_training_run(self.bench, plan, self.config.final, seed)
            self.run.append(FINAL_RUNS, rec)
            runs[seed] = rec
        summary = summarize_final(
            [runs[s] for s in self.config.final_seeds], plan, self.bench
        )
        self.run.write("final.json", summary)
        return summary


def final_training_run(
    bench: Workbench, plan: FineTunePlan, config: TrainConfig, seed: int
) -> dict[str, Any]:
    """Fine-tune under ``plan`` on the whole training split; early stopping on val; test once.

    A plan that freezes the first blocks trains on their cached features (as the search does).
    """
    model, result, cached = train_plan_fast(
        bench.model, bench.partition, plan, bench.splits.train, bench.splits.val, config,
        seed=seed, device=default_device(),
        cache=bench.feature_cache(config) if config.frozen_eval else None,
    )
    test = evaluate(model, bench.splits.test, config.eval_batch_size, default_device(), config.amp)
    return {
        "seed": seed,
        "test_top1": test.top1,
        "test_balanced": test.balanced,
        "val_top1": result.val.top1,
        "val_balanced": result.val.balanced,
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "seconds": result.seconds,
        "train_images": result.train_images,
        "cached_prefix": cached,
        "status": result.status,
        "trainable_params": count_parameters(model, trainable_only=True),
    }


def summarize_final(
    runs: list[dict[str, Any]], plan: FineTunePlan, bench: Workbench
) -> dict[str, Any]:
    def stat(key: str) -> dict[str, float]:
        values = np.array([r[key] for r in runs], dtype=float)
        return {"mean": float(values.mean()), "std": float(values.std(ddof=0))}

    trained = sum(bench.partition[n].num_params for n in plan.trained)
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

