"""Accuracy benchmark: BioTune against the baselines at a converged budget (see README.md here).

The protocol is fixed in README.md. Every finished piece of work (one training run, one search)
is a small JSON record under ``records/``, written atomically the moment it finishes; a rerun
skips what is recorded, so the benchmark runs in pieces over several sittings. Search run
directories (large, resumable) live under ``--work`` and are never committed.

    python benchmarks/accuracy/run.py                 # run or resume everything, then report
    python benchmarks/accuracy/run.py --report        # only rebuild results/ from the records
    python benchmarks/accuracy/run.py --datasets digits --methods full,linear   # a part
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

# ----------------------------------------------------------------------------- the protocol
MODEL = "efficientnet_lite0"
IMAGE_SIZE = 32
#: train / val / test: 1,000 / 500 where the data has them, else the whole split; test: the
#: whole test split (the offline pools split 60 / 20 / 20), capped at 2,000.
SIZES = {
    "animal-shape": (1000, 500, 2000),
    "mnist-5k": (1000, 500, 1000),
    "digits": (1000, 359, 359),
    "textures": (460, 154, 154),
}
DATASETS = tuple(SIZES)
SEEDS = (0, 1, 2, 3, 4)
LR_GRID = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
EPOCHS, PATIENCE, BATCH, EVAL_BATCH = 15, 3, 64, 256
#: The paper's baselines (issue 13's claim was made against these) and the practitioners'.
PAPER_BASELINES = ("full", "linear", "autorgn", "lora", "l2sp", "l1sp")
BASELINES = (*PAPER_BASELINES, "llrd", "lpft")
#: LLRD's decays, each tried with every lr of the grid (15 runs, all counted in its cost).
LLRD_DECAYS = (0.5, 0.65, 0.8)
#: The default preset of 2026-11-30 (rotating folds, the basic anchors, no middle rung), which
#: the first candidates changed: the preset itself became ``biotune-mf``'s settings later.
#: Applied in order, after each entry's own middle rung and re-ranking (``_nested`` checks each
#: step: rotating folds refuse re-ranking the whole search).
OLD_DEFAULT: dict[str, Any] = {
    "protocol.fold_policy": "rotate",
    "evolution.anchor_set": "basic",
    "evolution.initial_size": None,
    "promote": 0,
    "promote_epochs": 4,
}
#: Issue 25's candidate default, ``biotune-mf``: common random numbers (one fold, one seed), the
#: wide anchors, the best 6 plans of the whole search trained 4 epochs on that fold (the fidelity
#: benchmark's ``long``), the best 2 of them with the final recipe.
MF: dict[str, Any] = {
    "protocol.fold_policy": "fixed",
    "evolution.anchor_set": "wide",
    "evolution.initial_size": 10,
    "promote": 6,
    "promote_epochs": 4,
    "rerank": 2,
    "rerank_from": "best",
}
#: The equal-budget arms: one candidate at a time and more generations than the budget allows,
#: so the cost limit (``BUDGET_FROM``), not the count, ends them.
ARM: dict[str, Any] = {
    "sampler": "random",
    "evolution.children_batch": 1,
    "evolution.generations": 20,
}
#: BioTune methods: the preset searched, and what is changed (None: the preset as it is).
#: "biotune-rerank" is the first candidate default tried after the 2026-11-30 default: the same
#: search, its 3 best distinct plans re-ranked with the final recipe on validation.
#: Each candidate's re-ranking is spelled out, so the preset's own (which became
#: "biotune-winners2"'s on 2026-11-30) changes none of them.
SEARCHES = {
    "biotune": ("evolution", {"promote": 0, "rerank": 0, "rerank_from": "last", **OLD_DEFAULT}),
    "biotune-rerank": (
        "evolution",
        {"promote": 0, "rerank": 3, "rerank_from": "last", **OLD_DEFAULT},
    ),
    "biotune-rerank2": (
        "evolution",
        {"promote": 0, "rerank": 2, "rerank_from": "last", **OLD_DEFAULT},
    ),
    "biotune-winners2": (
        "evolution",
        {"promote": 0, "rerank": 2, "rerank_from": "winners", **OLD_DEFAULT},
    ),
    "biotune-paper": (
        "paper",
        {"population_size": 8, "generations": 3, "elite": 2, "seeds": (0,), "epochs": 4},
    ),
    # Issue 25 (README, "A search that earns its keep"): the candidate and its ablation arms.
    "biotune-mf": ("evolution", MF),
    "random-search": (
        "evolution",
        {**MF, **ARM},
    ),
    "tpe": ("evolution", {**MF, **ARM, "sampler": "tpe"}),
    # Its follow-up (README, "One plan per structure"): the rungs take the best plan of each
    # set of trained blocks instead of the best plans.
    "biotune-mfs": ("evolution", {**MF, "rerank_from": "structures"}),
    # The arms with biotune-mfs's rungs, derived from their run directories (README): run only
    # if biotune-mfs is adopted.
    "random-search-s": ("evolution", {**MF, **ARM, "rerank_from": "structures"}),
    "tpe-s": ("evolution", {**MF, **ARM, "sampler": "tpe", "rerank_from": "structures"}),
    "anchors-rerank-s": (
        "evolution",
        {
            **MF,
            "evolution.population_size": 7,
            "evolution.initial_size": 7,
            "evolution.generations": 0,
            "rerank_from": "structures",
        },
    ),
    "anchors-rerank": (
        "evolution",
        {
            **MF,
            "evolution.population_size": 7,
            "evolution.initial_size": 7,
            "evolution.generations": 0,
        },
    ),
}
#: A candidate whose search is another method's but for ``rerank`` starts from that method's
#: finished run directory (its evolution is deterministic: the from-scratch searches of
#: "biotune-rerank" equal those of "biotune" fitness for fitness), keeping the re-ranking runs
#: of the first k ranks, so only its missing re-ranking runs are trained. Its seconds: the
#: evolution's sessions plus its re-ranking runs, as a from-scratch search would spend them.
DERIVED = {
    "biotune-rerank": "biotune",
    "biotune-rerank2": "biotune-rerank",
    "biotune-winners2": "biotune",
    "biotune-mfs": "biotune-mf",
    "random-search-s": "random-search",
    "tpe-s": "tpe",
    "anchors-rerank-s": "anchors-rerank",
}
#: Equal-budget arms: each search of these stops proposing plans once its evaluations have cost
#: what the named method's search of the same dataset and seed cost (issue 25's ablation).
BUDGET_FROM = {
    "random-search": "biotune-mf",
    "tpe": "biotune-mf",
    "random-search-s": "biotune-mf",
    "tpe-s": "biotune-mf",
}
#: The cost entries of a search summary that are rungs above the evaluations.
RUNGS = ("promote", "rerank")
#: The candidate defaults the README's rule chooses from.
CANDIDATES = ("biotune", "biotune-rerank", "biotune-rerank2", "biotune-winners2")
#: The order in which a dataset's methods run: the cheap and decisive ones first.
ORDER = (
    "full",
    "linear",
    "biotune",
    "biotune-rerank",
    "biotune-rerank2",
    "biotune-winners2",
    "l2sp",
    "l1sp",
    "lora",
    "autorgn",
    "biotune-paper",
    "llrd",
    "lpft",
    "biotune-mf",
    "random-search",
    "tpe",
    "anchors-rerank",
    "biotune-mfs",
    "random-search-s",
    "tpe-s",
    "anchors-rerank-s",
)
LABELS = {
    "full": "Full fine-tuning",
    "linear": "Linear probing",
    "autorgn": "AutoRGN",
    "lora": "LoRA",
    "l2sp": "L2-SP",
    "l1sp": "L1-SP",
    "llrd": "Layer-wise lr decay",
    "lpft": "LP-FT",
    "biotune": "BioTune (default search, 2026-11-30)",
    "biotune-rerank": "BioTune (default + re-rank 3 plans)",
    "biotune-rerank2": "BioTune (default + re-rank 2 plans)",
    "biotune-winners2": "BioTune (default + re-rank 2 generation winners)",
    "biotune-paper": "BioTune (paper protocol, scaled)",
    "biotune-mf": "BioTune (multi-fidelity: CRN, wide anchors, middle rung)",
    "random-search": "Random search (same rungs, equal cost)",
    "tpe": "TPE (Optuna, same rungs, equal cost)",
    "biotune-mfs": "BioTune (multi-fidelity, one plan per structure at the rungs)",
    "random-search-s": (
        "Random search (one plan per structure at the rungs, equal cost; the default since "
        "2026-12-04)"
    ),
    "tpe-s": "TPE (one plan per structure at the rungs, equal cost)",
    "anchors-rerank-s": "Wide anchors + rungs only (one plan per structure)",
    "anchors-rerank": "Wide anchors + rungs only (no search)",
}


def recipe():
    from biotune.training import TrainConfig

    return TrainConfig(
        epochs=EPOCHS, patience=PATIENCE, batch_size=BATCH, eval_batch_size=EVAL_BATCH
    )


# ----------------------------------------------------------------------------------- records


def _record_path(records: Path, dataset: str, method: str, name: str) -> Path:
    return records / dataset / method / f"{name}.json"


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _write(path: Path, data: dict[str, Any]) -> None:
    from biotune.runner.rundir import write_json_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, data)


class Sitting:
    """This sitting's wall time in ``wall.json``, rewritten every minute while it runs, so a
    sitting cut short (a session's end kills it) still counts, to its last beat. Each beat
    merges this sitting's entry into the file under a lock, so sittings that run side by side
    (e.g. two method groups) keep each other's entries."""

    BEAT_SECONDS = 60.0

    def __init__(
        self, path: Path, wall: dict[str, Any], jobs: int, datasets: list[str], methods: list[str]
    ) -> None:
        import threading

        self.path, self.wall = path, wall
        self.start = time.perf_counter()
        self.entry: dict[str, Any] = {
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "id": f"{os.getpid()}-{time.time_ns()}",
            "last_beat": time.strftime("%Y-%m-%d %H:%M:%S"),
            "seconds": 0.0,
            "ended": None,
            "jobs": jobs,
            "datasets": datasets,
            "methods": methods,
        }
        wall["sessions"].append(self.entry)
        self._stop = threading.Event()
        self.beat()
        self._thread = threading.Thread(target=self._beats, daemon=True)
        self._thread.start()

    def beat(self) -> None:
        from filelock import FileLock

        self.entry["seconds"] = time.perf_counter() - self.start
        self.entry["last_beat"] = time.strftime("%Y-%m-%d %H:%M:%S")
        with FileLock(str(self.path) + ".lock"):
            on_disk = _read(self.path) or {"sessions": []}
            others = [e for e in on_disk["sessions"] if e.get("id") != self.entry["id"]]
            self.wall["sessions"] = [*others, self.entry]
            _write(self.path, self.wall)

    def _beats(self) -> None:
        while not self._stop.wait(self.BEAT_SECONDS):
            self.beat()

    def end(self) -> None:
        self._stop.set()
        self._thread.join()
        self.entry["ended"] = time.strftime("%Y-%m-%d %H:%M:%S")
        self.beat()


def wall_text(wall: dict[str, Any], records: Path) -> str:
    """The benchmark's wall time over its sittings, and the work its records sum to."""
    sittings = wall["sessions"]
    total = sum(s["seconds"] for s in sittings)
    cut = sum(1 for s in sittings if not s.get("ended"))
    work = sum(r.get("seconds", 0.0) for r in map(_read, records.glob("*/*/*.json")) if r)
    jobs = "/".join(str(j) for j in sorted({s["jobs"] for s in sittings})) or "2"
    return (
        f"{total / 3600:.2f} h of wall time over {len(sittings)} sittings ({cut} cut short by a "
        f"session's end, counted to their last record or beat; {jobs} processes at a time, 1 "
        f"torch thread each); {work / 3600:.2f} h of training and search summed over the records"
    )


def _run_name(lr: float, seed: int, extra: dict[str, Any] | None = None) -> str:
    """``lr0.003-seed0``, or with a tuned option ``lr0.003-decay0.65-seed0``."""
    tuned = "".join(f"-decay{v:g}" for k, v in (extra or {}).items() if k == "llrd_decay")
    return f"lr{lr:g}{tuned}-seed{seed}"


def _point_label(record: dict[str, Any]) -> str:
    """'0.003', or for LLRD '0.003, decay 0.65': a grid point as tables show it."""
    decay = (record.get("options") or {}).get("llrd_decay")
    return f"{record['lr']:g}" + (f", decay {decay:g}" if decay is not None else "")


def grid_points(method: str) -> list[tuple[float, dict[str, Any]]]:
    """The (lr, options) points a baseline is tuned over with seed 0: the lr grid, and for LLRD
    the lr grid times its decays (decay-major, so ties go to the smaller decay, then lr)."""
    if method == "llrd":
        return [(lr, {"llrd_decay": d}) for d in LLRD_DECAYS for lr in LR_GRID]
    return [(lr, {}) for lr in LR_GRID]


# ------------------------------------------------------------------------------------- pieces


class Dataset:
    """One dataset's workbench, its cost unit and the record folder; runs pieces on demand."""

    def __init__(self, name: str, records: Path, work: Path, log: Callable[[str], None]) -> None:
        from biotune.core import cost
        from biotune.measure import block_flops
        from biotune.runner.config import DataConfig
        from biotune.runner.workbench import prepare
        from biotune.training import batches

        self.name, self.records, self.work, self.log = name, records, work, log
        train, val, test = SIZES[name]
        self.data = DataConfig(
            model=MODEL,
            dataset=name,
            image_size=IMAGE_SIZE,
            train_size=train,
            val_size=val,
            test_size=test,
        )
        self.bench = prepare(self.data)
        sample, _ = next(batches(self.bench.splits.val, 1))
        self.flops = block_flops(self.bench.model, self.bench.partition, sample[0])
        self.ft_work = cost.ft_work(
            self.flops, len(self.bench.splits.train), len(self.bench.splits.val), EPOCHS
        )

    def run(
        self,
        method: str,
        lr: float,
        seed: int,
        plan: Any = None,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """One training run with the shared recipe, recorded; read back if already recorded.
        ``extra``: the method's options (LLRD's decay, LP-FT's head lr)."""
        from biotune.baselines import run_baseline
        from biotune.training import count_parameters, evaluate

        extra = dict(extra or {})
        path = _record_path(self.records, self.name, method, _run_name(lr, seed, extra))
        done = _read(path)
        if done is not None:
            return done
        config = replace(recipe(), base_lr=lr)
        start = time.perf_counter()
        options = {"plan": plan} if plan is not None else extra
        run = run_baseline(
            "plan" if plan is not None else method, self.bench, config, seed, **options
        )
        test = evaluate(run.model, self.bench.splits.test, EVAL_BATCH)
        result = run.result
        cached = int(run.info.get("cached_prefix", 0))
        phases = run.info.get("phases") or [
            {
                "cached_prefix": cached,
                "first_trained": _first_trained(method, plan, len(self.bench.partition)),
                "train_images": result.train_images,
                "eval_images": result.eval_images,
            }
        ]
        work = sum(self._work(phase) for phase in phases)
        record = {
            "dataset": self.name,
            "method": method,
            "lr": lr,
            "seed": seed,
            "val_top1": result.val.top1,
            "val_balanced": result.val.balanced,
            "test_top1": test.top1,
            "test_balanced": test.balanced,
            "best_epoch": result.best_epoch,
            "epochs_run": result.epochs_run,
            "status": result.status,
            "train_images": result.train_images,
            "trainable_params": run.trainable_params,
            "total_params": count_parameters(self.bench.model),
            "cached_prefix": cached,
            "ft_equivalents": work / self.ft_work,
            "seconds": time.perf_counter() - start,
            "plan": plan.to_dict() if plan is not None else run.info.get("plan"),
            **({"options": extra} if extra else {}),
            **({"phases": phases} if "phases" in run.info else {}),
        }
        _write(path, record)
        self.log(
            f"{method} lr {lr:g} seed {seed}: val {result.val.balanced:.4f} "
            f"({result.epochs_run} epochs, best {result.best_epoch}, "
            f"{record['seconds']:.0f} s)"
        )
        return record

    def _work(self, phase: dict[str, Any]) -> float:
        """A training phase's work; a cached prefix counts its building once (the training
        split's tables for two batch sizes, and validation)."""
        from biotune.core import cost

        cached = phase["cached_prefix"]
        work = cost.run_work(
            self.flops, cached, phase["first_trained"], phase["train_images"], phase["eval_images"]
        )
        if cached:
            n = len(self.bench.splits.train) * 2 + len(self.bench.splits.val)
            work += n * sum(self.flops[:cached])
        return work

    def baseline(self, method: str) -> None:
        """The grid with the first seed, the choice on validation, the other seeds. LP-FT's
        head phase takes linear probing's lr, chosen on its own grid (run here if missing)."""
        fixed: dict[str, Any] = {}
        if method == "lpft":
            probes = [self.run("linear", lr, SEEDS[0]) for lr in LR_GRID]
            fixed["lpft_head_lr"] = choose(probes)["lr"]
        grid = [
            self.run(method, lr, SEEDS[0], extra={**fixed, **o}) for lr, o in grid_points(method)
        ]
        best = choose(grid)
        for seed in SEEDS[1:]:
            self.run(method, best["lr"], seed, extra={**fixed, **best.get("options", {})})

    def search(self, method: str, seed: int) -> dict[str, Any]:
        """One BioTune search (its own seed), recorded; its plan is trained like a baseline."""
        from biotune.core.plan import FineTunePlan
        from biotune.runner.search import Search

        path = _record_path(self.records, self.name, method, f"search-seed{seed}")
        done = _read(path)
        budget = None
        if method in BUDGET_FROM:  # the same cost as that method's search of this seed
            source = self.search(BUDGET_FROM[method], seed)
            budget = source["evaluation_work_flops"] / source["search_ft_work_flops"]
        config = search_config(method, self.data, seed, budget)
        stored = config.to_dict()
        # the records made before the cache's budget became "auto" by default hashed it so
        stored["protocol"].setdefault("cache_budget_mb", 1024.0)
        fingerprint = hashlib.sha1(json.dumps(stored, sort_keys=True).encode()).hexdigest()[:12]
        if done is not None and done.get("config_sha1") != fingerprint:
            raise SystemExit(
                f"{path} was searched with another configuration ({done.get('config_sha1')} != "
                f"{fingerprint}): move the old records of {method} aside to keep them"
            )
        if done is None:
            run_dir = self.work / self.name / f"{method}-seed{seed}"
            derived = not (run_dir / "config.json").exists() and self._derive(
                method, seed, config, run_dir
            )
            resume = (run_dir / "config.json").exists()
            self.log(
                f"{method} search seed {seed}: {'resuming' if resume else 'starting'} in {run_dir}"
            )
            start = time.perf_counter()
            result = Search(config, run_dir, bench=self.bench).run_search(
                resume=resume, final=False
            )
            done = {
                "dataset": self.name,
                "method": method,
                "seed": seed,
                "preset": SEARCHES[method][0],
                "scaling": SEARCHES[method][1],
                "plan": result.best_plan.to_dict(),
                "plan_text": result.best_plan.describe(),
                "best_fitness": result.best_fitness,
                "evaluations": result.cost["evaluations"],
                "ft_equivalents": result.cost["work_flops"] / self.ft_work,
                "search_ft_equivalents": result.cost["ft_equivalents"],
                # the evaluations alone (no rungs), in work and in the search's own unit
                "evaluation_work_flops": result.cost["work_flops"]
                - sum((result.cost.get(k) or {}).get("work_flops", 0.0) for k in RUNGS),
                "search_ft_work_flops": result.cost["ft_work_flops"],
                "max_ft_equivalents": budget,
                # a resumed or derived search's earlier sittings are in its sessions
                "seconds": result.search_seconds if resume else time.perf_counter() - start,
                "derived_from": DERIVED[method] if derived else None,
                "base_lr": config.protocol.train.base_lr,
                "config_sha1": fingerprint,
            }
            _write(path, done)
            self.log(
                f"{method} search seed {seed}: {done['plan_text']} "
                f"({done['ft_equivalents']:.2f} FT-eq, {done['seconds']:.0f} s)"
            )
        plan = FineTunePlan.from_dict(done["plan"])
        self._same_run(method, done["base_lr"], seed, plan)
        self.run(method, done["base_lr"], seed, plan=plan)
        return done

    def _same_run(self, method: str, lr: float, seed: int, plan: Any) -> None:
        """A derived method whose search chose its source's plan gets the source's run of that
        plan (the same plan, lr, seed and data train the same model: training is
        deterministic on the CPU), marked as such, instead of training it again."""
        source = DERIVED.get(method)
        path = _record_path(self.records, self.name, method, _run_name(lr, seed))
        if source is None or path.exists():
            return
        record = _read(_record_path(self.records, self.name, source, _run_name(lr, seed)))
        if record is not None and record.get("plan") == plan.to_dict():
            _write(path, {**record, "method": method, "same_run_as": source})
            self.log(f"{method} lr {lr:g} seed {seed}: {source}'s run of the same plan")

    def _derive(self, method: str, seed: int, config: Any, run_dir: Path) -> bool:
        """Start ``run_dir`` as a copy of the source method's finished search (``DERIVED``)."""
        source = DERIVED.get(method)
        if source is None:
            return False
        src = self.work / self.name / f"{source}-seed{seed}"
        if not (src / "search_summary.json").exists():
            return False
        derive_run(src, run_dir, config)
        self.log(f"{method} search seed {seed}: derived from {src}")
        return True

    def biotune(self, method: str) -> None:
        # The default search is cheap: one search per seed, so the spread over seeds includes the
        # search's own randomness. The scaled paper protocol searches once (seed 0), as the paper.
        if method != "biotune-paper":
            for seed in SEEDS:
                self.search(method, seed)
            return
        done = self.search(method, SEEDS[0])
        from biotune.core.plan import FineTunePlan

        plan = FineTunePlan.from_dict(done["plan"])
        for seed in SEEDS[1:]:
            self.run(method, done["base_lr"], seed, plan=plan)


def derive_run(src: Path, run_dir: Path, config: Any) -> None:
    """``run_dir``: a finished search's run directory ``src`` made the start of a search that
    differs only in its rungs (``config``): the evaluations and sessions kept, the rungs' runs
    kept only for the plans ``config``'s rungs pick (re-ranking alone: the first ranks), the
    end results dropped. Resumed, it trains only the missing runs and ends as a search of
    ``config`` from scratch would (a test checks it)."""
    skip = {"model.safetensors", "finetuned.json", "final_runs.jsonl", "final.json"}
    skip |= {"best_plan.json", "search_summary.json"}  # written when the search finishes
    tmp = run_dir.with_name(run_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and f.name not in skip and not f.name.startswith("."):
            shutil.copy2(f, tmp / f.name)
    stored = json.loads((tmp / "config.json").read_text())
    stored["search"] = config.to_dict()
    (tmp / "config.json").write_text(json.dumps(stored, indent=2) + "\n")
    if config.promote:  # the rungs' runs of the plans this search's rungs also pick
        picks = _promote_picks(tmp, config)
        for name in ("promote.jsonl", "rerank.jsonl"):
            _keep_lines(tmp / name, lambda r: r["candidate"] in picks)
    else:
        _keep_lines(tmp / "rerank.jsonl", lambda r: r["rank"] < config.rerank)
    tmp.rename(run_dir)


def _promote_picks(run_dir: Path, config: Any) -> set[int]:
    """The candidates ``config``'s middle rung trains, from a search's evaluations."""
    from biotune.runner.rerank import best_of_search

    names = [b["name"] for b in json.loads((run_dir / "partition.json").read_text())["blocks"]]
    lines = (run_dir / "evaluations.jsonl").read_text().splitlines()
    evaluations = [json.loads(x) for x in lines if x.strip()]
    structures = config.rerank_from == "structures"
    picks = best_of_search(evaluations, names, config.promote, structures)
    return {c.id for c, _, _ in picks}


def _keep_lines(path: Path, keep: Any) -> None:
    """Keep the JSON lines of ``path`` (if it exists) that ``keep`` accepts."""
    if path.exists():
        lines = [x for x in path.read_text().splitlines() if x.strip() and keep(json.loads(x))]
        path.write_text("".join(line + "\n" for line in lines))


def _first_trained(method: str, plan: Any, blocks: int) -> int:
    if plan is not None:
        return plan.frozen_prefix
    return blocks - 1 if method == "linear" else 0


def choose(grid: list[dict[str, Any]]) -> dict[str, Any]:
    """The grid run with the best validation balanced accuracy (ties: the earlier grid point,
    i.e. the smaller lr)."""
    return max(
        enumerate(grid),
        key=lambda ir: (ir[1]["val_balanced"] if ir[1]["status"] != "diverged" else -1.0, -ir[0]),
    )[1]


def _nested(config: Any, changes: dict[str, Any]) -> Any:
    """``config`` with dotted changes applied (``"protocol.train.epochs": 4``), checked once."""
    for key, value in changes.items():
        path = key.split(".")
        parts = [config]
        for name in path[:-1]:
            parts.append(getattr(parts[-1], name))
        new = value
        for owner, name in zip(reversed(parts), reversed(path), strict=True):
            new = replace(owner, **{name: new})
        config = new
    return config


def search_config(method: str, data: Any, seed: int, budget: float | None = None) -> Any:
    """A BioTune method's search on ``data`` with seed ``seed``; ``budget``: the cost limit of
    an equal-budget arm (``BUDGET_FROM``), in the search's own FT-equivalents."""
    from biotune.presets import preset

    name, changes = SEARCHES[method]
    config = replace(preset(name), data=data, seed=seed, final=recipe())
    if any("." in key for key in changes or {}):
        config = _nested(config, changes)
        return replace(config, max_ft_equivalents=budget) if budget is not None else config
    changes = dict(changes or {})
    if "rerank" in changes:
        config = replace(config, rerank=changes.pop("rerank"))
    if "rerank_from" in changes:
        config = replace(config, rerank_from=changes.pop("rerank_from"))
    if changes:
        evo = replace(
            config.evolution,
            population_size=changes["population_size"],
            generations=changes["generations"],
            elite=changes["elite"],
        )
        train = replace(
            config.protocol.train,
            epochs=changes["epochs"],
            patience=min(config.protocol.train.patience, changes["epochs"]),
        )
        config = replace(
            config,
            evolution=evo,
            protocol=replace(config.protocol, seeds=changes["seeds"], train=train),
        )
    return config


_DATASETS: dict[str, Dataset] = {}  # per worker process: each dataset is prepared once


def run_piece(task: dict[str, Any]) -> str:
    """One method on one dataset (in a worker process): its grid and seeds, or its searches."""
    import torch

    torch.set_num_threads(task["threads"])
    name, method = task["dataset"], task["method"]

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {message}", file=sys.stderr, flush=True)

    if name not in _DATASETS:
        _DATASETS[name] = Dataset(name, Path(task["records"]), Path(task["work"]), log)
    ds = _DATASETS[name]
    log(f"{method}: start")
    if method in SEARCHES:
        ds.biotune(method)
    else:
        ds.baseline(method)
    return f"{name}/{method}"


# ------------------------------------------------------------------------------------ report


def load_rows(records: Path, datasets: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per dataset and method: the chosen setting's runs (5 seeds) and the tuning cost."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for d in datasets:
        out[d] = {}
        for method in ORDER:
            folder = records / d / method
            if not folder.is_dir():
                continue
            runs = {p.stem: _read(p) for p in folder.glob("lr*.json")}
            if method in SEARCHES:
                searches = [_read(p) for p in sorted(folder.glob("search-seed*.json"))]
                finals = [r for r in runs.values() if r is not None]
                if not searches or len(finals) < len(SEEDS):
                    continue
                tuning_ft = sum(s["ft_equivalents"] for s in searches) / len(searches)
                tuning_s = sum(s["seconds"] for s in searches) / len(searches)
                chosen = sorted(finals, key=lambda r: r["seed"])
                by_seed = {r["seed"]: r for r in chosen}
                extra = {
                    "plans": [s["plan_text"] for s in searches],
                    "whole_ft": sum(whole_search_ft(method, s, by_seed) for s in searches)
                    / len(searches),
                }
            else:
                grid = _grid_records(records / d, method, runs)
                if grid is None:
                    continue
                best = choose(grid)
                options = best.get("options", {})
                chosen = [runs.get(_run_name(best["lr"], s, options)) for s in SEEDS]
                if any(c is None for c in chosen):
                    continue
                tuning = list(grid)
                if method == "lpft":  # its head lr was tuned on linear probing's grid
                    probes = _grid_records(records / d, "linear", None)
                    if probes is None:
                        continue
                    tuning += probes
                tuning_ft = sum(g["ft_equivalents"] for g in tuning)
                tuning_s = sum(g["seconds"] for g in tuning)
                extra = {
                    "lr": best["lr"],
                    "tuned": {k: v for k, v in options.items() if k == "llrd_decay"},
                    "head_lr": options.get("lpft_head_lr"),
                    "val_by_lr": {_point_label(g): g["val_balanced"] for g in grid},
                    "whole_ft": tuning_ft,  # the grid's seed-0 winner is the final run
                }
            out[d][method] = {"runs": chosen, "tuning_ft": tuning_ft, "tuning_s": tuning_s, **extra}
    return out


def _grid_records(
    folder: Path, method: str, runs: dict[str, Any] | None
) -> list[dict[str, Any]] | None:
    """A baseline's seed-0 grid runs in grid order, or None until all are recorded. LP-FT's
    head lr is part of each name, read from the records themselves."""
    if runs is None:
        runs = {p.stem: _read(p) for p in (folder / method).glob("lr*.json")}
    seed0 = [r for r in runs.values() if r is not None and r["seed"] == SEEDS[0]]
    by_point = {(r["lr"], (r.get("options") or {}).get("llrd_decay")): r for r in seed0}
    grid = [by_point.get((lr, o.get("llrd_decay"))) for lr, o in grid_points(method)]
    return None if any(g is None for g in grid) else grid  # type: ignore[return-value]


def whole_search_ft(method: str, search: dict[str, Any], runs: dict[int, dict[str, Any]]) -> float:
    """What ``biotune search`` costs as a whole, in FT-equivalents: the search plus the final
    training of seed 0. A re-ranking search holds that run already (its winning re-rank run is
    the seed-0 final run); otherwise it is the plan's run with the search's own seed (seed 0 for
    the paper protocol's single search)."""
    if (SEARCHES[method][1] or {}).get("rerank", 0) > 1:
        return float(search["ft_equivalents"])
    return float(search["ft_equivalents"] + runs[search["seed"]]["ft_equivalents"])


def mean_val(entry: dict[str, Any]) -> float:
    return sum(r["val_balanced"] for r in entry["runs"]) / len(entry["runs"])


def choose_default(
    rows: dict[str, dict[str, dict[str, Any]]], datasets: list[str]
) -> dict[str, Any]:
    """The README's rule: among the candidates complete on every dataset whose whole search
    costs less than full fine-tuning's grid on average, the highest mean validation balanced
    accuracy wins; within 0.2 points of it, the cheapest. Decided on validation only."""
    grid = [rows[d]["full"]["whole_ft"] for d in datasets if "full" in rows[d]]
    grid_mean = sum(grid) / len(grid) if len(grid) == len(datasets) else None
    table = []
    for m in CANDIDATES:
        if any(m not in rows[d] for d in datasets):
            table.append({"method": m, "complete": False})
            continue
        cost = sum(rows[d][m]["whole_ft"] for d in datasets) / len(datasets)
        table.append(
            {
                "method": m,
                "complete": True,
                "val_balanced": sum(mean_val(rows[d][m]) for d in datasets) / len(datasets),
                "whole_ft": cost,
                "eligible": grid_mean is not None and cost < grid_mean,
            }
        )
    eligible = [c for c in table if c.get("eligible")]
    chosen = None
    if eligible and all(c["complete"] for c in table):
        best = max(c["val_balanced"] for c in eligible)
        close = [c for c in eligible if c["val_balanced"] >= best - 0.002]
        chosen = min(close, key=lambda c: c["whole_ft"])["method"]
    return {"grid_ft": grid_mean, "candidates": table, "chosen": chosen}


def claim(
    rows: dict[str, dict[str, dict[str, Any]]],
    comparisons: list[dict[str, Any]],
    datasets: list[str],
    method: str,
) -> dict[str, Any] | None:
    """Issue 13's three conditions for ``method``, or None until it and the paper's baselines
    are complete (the best baseline is whichever is best among those complete)."""
    if any(m not in rows[d] for d in datasets for m in (*PAPER_BASELINES, method)):
        return None
    mine = {c["dataset"]: c for c in comparisons if c["method"] == method}
    gain = sum(mine[d]["vs_full"]["mean"] for d in datasets) / len(datasets)
    cost = {d: (rows[d][method]["whole_ft"], rows[d]["full"]["whole_ft"]) for d in datasets}
    mean_cost = [sum(c[i] for c in cost.values()) / len(cost) for i in (0, 1)]
    checks = {
        "not_worse_than_best": all(mine[d]["vs_best"]["high"] >= 0 for d in datasets),
        "gain_over_full_2_points": gain >= 2.0,
        "cheaper_than_full_grid": mean_cost[0] < mean_cost[1],
    }
    return {
        "method": method,
        "mean_gain_over_full": gain,
        "whole_ft_by_dataset": cost,
        "whole_ft_mean": mean_cost,
        "checks": checks,
        "holds": all(checks.values()),
    }


#: Issue 25's method under test, the arm it must beat at equal cost, the other arms, and the
#: default it would replace.
DEFAULT_METHOD = "biotune-mf"
ARMS = ("random-search", "tpe", "anchors-rerank")
CURRENT_DEFAULT = "biotune-winners2"


def adopt_rule(
    rows: dict[str, dict[str, dict[str, Any]]],
    datasets: list[str],
    method: str = DEFAULT_METHOD,
    current: str = CURRENT_DEFAULT,
) -> dict[str, Any]:
    """Issue 25's rule for the default, written before its records (README): ``method``
    replaces ``current`` if its mean validation balanced accuracy is at least ``current``'s
    minus 0.2 points and its whole search costs fewer FT-equivalents than full fine-tuning's
    grid, on average over the datasets. ``adopted`` is None until both are complete."""
    complete = all(m in rows[d] for d in datasets for m in (method, current, "full"))
    out: dict[str, Any] = {"method": method, "current": current, "adopted": None}
    if not complete:
        return out

    def mean(f: Any) -> float:
        return sum(f(d) for d in datasets) / len(datasets)

    out["val_balanced"] = mean(lambda d: mean_val(rows[d][method]))
    out["current_val_balanced"] = mean(lambda d: mean_val(rows[d][current]))
    out["whole_ft"] = mean(lambda d: rows[d][method]["whole_ft"])
    out["grid_ft"] = mean(lambda d: rows[d]["full"]["whole_ft"])
    out["adopted"] = (
        out["val_balanced"] >= out["current_val_balanced"] - 0.002
        and out["whole_ft"] < out["grid_ft"]
    )
    return out


def worst_val(
    rows: dict[str, dict[str, dict[str, Any]]], datasets: list[str], method: str
) -> float:
    """A method's worst search on validation: the lowest seed-run validation balanced accuracy
    minus full fine-tuning's mean on that dataset."""
    return min(
        r["val_balanced"] - mean_val(rows[d]["full"])
        for d in datasets
        for r in rows[d][method]["runs"]
    )


#: The follow-up candidate (README, "One plan per structure at the rungs").
STRUCTURES_METHOD = "biotune-mfs"


def adopt_structures(
    rows: dict[str, dict[str, dict[str, Any]]],
    datasets: list[str],
    method: str = STRUCTURES_METHOD,
    current: str = DEFAULT_METHOD,
) -> dict[str, Any]:
    """The README's rule for ``biotune-mfs``, written before its records: it replaces
    ``current`` if its mean validation balanced accuracy is at least ``current``'s minus 0.2
    points, its worst search on validation (the lowest seed-run validation balanced accuracy
    minus full fine-tuning's mean on that dataset) is better than ``current``'s, and its whole
    search costs fewer FT-equivalents than full fine-tuning's grid, on average over the
    datasets. ``adopted`` is None until both are complete."""
    out = adopt_rule(rows, datasets, method, current)
    if out["adopted"] is None:
        return out
    out["worst_val"] = worst_val(rows, datasets, method)
    out["current_worst_val"] = worst_val(rows, datasets, current)
    out["adopted"] = out["adopted"] and out["worst_val"] > out["current_worst_val"]
    return out


def arms_of(method: str) -> tuple[str, ...]:
    """The equal-cost arms ``method`` is compared with (random search first): the ones with its
    rungs."""
    if method in FINAL_CANDIDATES:  # biotune-mfs and the other methods of the last rule
        return tuple(a for a in (f"{a}-s" for a in ARMS) if a != method)
    return ARMS


def chosen_default(rows: dict[str, dict[str, dict[str, Any]]], datasets: list[str]) -> str:
    """The method issue 25's targets are read for: the last rule's choice once it is made
    (``random_search_rule``), else ``biotune-mfs`` if its rule adopts it."""
    last = random_search_rule(rows, datasets)["chosen"]
    if last is not None:
        return last
    return STRUCTURES_METHOD if adopt_structures(rows, datasets)["adopted"] else DEFAULT_METHOD


#: The last rule's candidates (README, "The evolution against random search"), the cheapest
#: first: the anchors alone, random search at the evolution's cost, the evolution.
FINAL_CANDIDATES = ("anchors-rerank-s", "random-search-s", STRUCTURES_METHOD)


def random_search_rule(
    rows: dict[str, dict[str, dict[str, Any]]], datasets: list[str]
) -> dict[str, Any]:
    """The README's rule after the evolution did not beat random search, written before the
    anchors' records: a candidate qualifies if its mean validation balanced accuracy is at
    least the best candidate's minus 0.2 points, its worst search on validation (as in
    ``adopt_structures``) at most 1 point below the best worst search, and its whole search
    cheaper than full fine-tuning's grid. The anchors alone win if they qualify; random search
    if it qualifies and the evolution does not; otherwise the evolution stays. ``chosen`` is
    None until every candidate is complete."""
    out: dict[str, Any] = {"candidates": {}, "chosen": None}
    if any(m not in rows[d] for d in datasets for m in (*FINAL_CANDIDATES, "full")):
        return out

    def mean(f: Any) -> float:
        return sum(f(d) for d in datasets) / len(datasets)

    grid = mean(lambda d: rows[d]["full"]["whole_ft"])
    table = {
        m: {
            "val_balanced": mean(lambda d, m=m: mean_val(rows[d][m])),
            "worst_val": worst_val(rows, datasets, m),
            "whole_ft": mean(lambda d, m=m: rows[d][m]["whole_ft"]),
        }
        for m in FINAL_CANDIDATES
    }
    best_val = max(c["val_balanced"] for c in table.values())
    best_worst = max(c["worst_val"] for c in table.values())
    for c in table.values():
        c["qualifies"] = (
            c["val_balanced"] >= best_val - 0.002
            and c["worst_val"] >= best_worst - 0.01
            and c["whole_ft"] < grid
        )
    anchors, random_search, evolution = FINAL_CANDIDATES
    if table[anchors]["qualifies"]:
        chosen = anchors
    elif table[random_search]["qualifies"] and not table[evolution]["qualifies"]:
        chosen = random_search
    else:
        chosen = evolution
    return {"candidates": table, "grid_ft": grid, "chosen": chosen}


def targets(
    rows: dict[str, dict[str, dict[str, Any]]],
    comparisons: list[dict[str, Any]],
    room: dict[str, Any] | None,
    datasets: list[str],
    method: str = DEFAULT_METHOD,
) -> dict[str, Any] | None:
    """Issue 25's pre-registered targets for ``method`` (README), or None until it and every
    baseline are complete on every dataset. Test top-1 points throughout."""
    if room is None or any(method not in rows[d] for d in datasets):
        return None
    mine = {c["dataset"]: c for c in comparisons if c["method"] == method}
    gain = sum(mine[d]["vs_full"]["mean"] for d in datasets) / len(datasets)
    worst = []
    for d in datasets:
        full_mean = _stat([r["test_top1"] for r in rows[d]["full"]["runs"]])[0]
        low = min(rows[d][method]["runs"], key=lambda r: r["test_top1"])
        worst.append(
            {"dataset": d, "seed": low["seed"], "points": 100 * (low["test_top1"] - full_mean)}
        )
    cost = [rows[d][method]["whole_ft"] for d in datasets]
    grid = [rows[d]["full"]["whole_ft"] for d in datasets]
    out: dict[str, Any] = {
        "method": method,
        "mean_gain_over_full": gain,
        "best_baseline_gain_validation": room["validation_mean_gain"],
        "best_baseline_gain_hindsight": room["hindsight_mean_gain"],
        "worst_search": min(worst, key=lambda w: w["points"]),
        "whole_ft_mean": sum(cost) / len(cost),
        "full_grid_ft_mean": sum(grid) / len(grid),
    }
    checks = {
        "gain_at_least_best_baseline_validation": gain >= room["validation_mean_gain"],
        "gain_at_least_best_baseline_hindsight (stretch)": gain >= room["hindsight_mean_gain"],
        "not_worse_than_best_anywhere": all(mine[d]["vs_best"]["high"] >= 0 for d in datasets),
        "worst_search_within_1_point_of_full": out["worst_search"]["points"] >= -1.0,
        "whole_search_at_most_full_grid": out["whole_ft_mean"] <= out["full_grid_ft_mean"],
    }
    arms = arms_of(method)
    if arms[0].startswith("random-search") and all(arms[0] in rows[d] for d in datasets):
        pairs = [
            r for d in datasets for r in _pairs(rows[d][method]["runs"], rows[d][arms[0]]["runs"])
        ]
        out["vs_random_search"] = _interval(pairs)
        checks["beats_random_search_at_equal_cost"] = out["vs_random_search"]["mean"] > 0
    out["vs_arms"] = {
        arm: _interval(
            [x for d in datasets for x in _pairs(rows[d][method]["runs"], rows[d][arm]["runs"])]
        )
        for arm in arms
        if all(arm in rows[d] for d in datasets)
    }
    out["checks"] = checks
    return out


def _pairs(a: list[dict[str, Any]], b: list[dict[str, Any]], key: str = "test_top1") -> list[float]:
    """Differences a - b in points, paired by seed."""
    by_seed = {r["seed"]: r[key] for r in b}
    return [100 * (r[key] - by_seed[r["seed"]]) for r in a if r["seed"] in by_seed]


def _interval(diffs: list[float]) -> dict[str, float]:
    """Mean with a 95 % t interval."""
    from scipy import stats

    mean, sd = _stat(diffs)
    n = len(diffs)
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n) if n > 1 else 0.0
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}


def headroom(
    table: list[dict[str, Any]], datasets: list[str], baselines: tuple[str, ...] = BASELINES
) -> dict[str, Any] | None:
    """How much any baseline gains over tuned full fine-tuning: on each dataset the baseline
    a user would pick on validation, and the one that tests best (hindsight, for scale only).

    It bounds what the +2.0-point bar asks: a plan must beat the hindsight-best baseline by the
    difference, on average. None until every baseline is recorded on every dataset.
    """
    cell = {(r["dataset"], r["method"]): r for r in table}
    if any((d, m) not in cell for d in datasets for m in baselines):
        return None
    out: dict[str, Any] = {"by_dataset": {}}
    for d in datasets:
        full = cell[(d, "full")]["test_top1"]
        picks = {
            "validation": max(baselines, key=lambda m: cell[(d, m)]["val_balanced"]),
            "hindsight": max(baselines, key=lambda m: cell[(d, m)]["test_top1"]),
        }
        out["by_dataset"][d] = {
            how: {"method": m, "gain": 100 * (cell[(d, m)]["test_top1"] - full)}
            for how, m in picks.items()
        }
    for how in ("validation", "hindsight"):
        gains = [out["by_dataset"][d][how]["gain"] for d in datasets]
        out[f"{how}_mean_gain"] = sum(gains) / len(gains)
    return out


def _stat(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0


def paired(a: list[dict[str, Any]], b: list[dict[str, Any]], key: str) -> dict[str, float]:
    """Mean paired (by seed) difference a - b in points, with a 95 % t interval."""
    return _interval(_pairs(a, b, key))


def report(records: Path, out: Path, datasets: list[str], wall: dict[str, Any]) -> str:
    """results/accuracy.{json,md} and the plots, from whatever is recorded."""
    from biotune.runner.final import machine_description

    rows = load_rows(records, datasets)
    table: list[dict[str, Any]] = []
    for d, methods in rows.items():
        for m, r in methods.items():
            runs = r["runs"]
            top1, top1_sd = _stat([x["test_top1"] for x in runs])
            bal, bal_sd = _stat([x["test_balanced"] for x in runs])
            val, _ = _stat([x["val_balanced"] for x in runs])
            trainable = sum(x["trainable_params"] for x in runs) / len(runs)
            table.append(
                {
                    "dataset": d,
                    "method": m,
                    "label": LABELS[m],
                    "test_top1": top1,
                    "test_top1_std": top1_sd,
                    "test_balanced": bal,
                    "test_balanced_std": bal_sd,
                    "val_balanced": val,
                    "trainable_pct": 100 * trainable / runs[0]["total_params"],
                    "tuning_ft_equivalents": r["tuning_ft"],
                    "tuning_seconds": r["tuning_s"],
                    "lr": r.get("lr"),
                    "val_by_lr": r.get("val_by_lr"),
                    "plans": r.get("plans"),
                    "seeds": [x["seed"] for x in runs],
                }
            )
    comparisons = []
    for d, methods in rows.items():
        base = [m for m in methods if m in BASELINES]
        for m in (x for x in methods if x in SEARCHES):
            entry: dict[str, Any] = {"dataset": d, "method": m}
            if "full" in methods:
                entry["vs_full"] = paired(methods[m]["runs"], methods["full"]["runs"], "test_top1")
            if base:
                best = max(
                    base, key=lambda b: _stat([x["test_top1"] for x in methods[b]["runs"]])[0]
                )
                entry["best_baseline"] = best
                entry["vs_best"] = paired(methods[m]["runs"], methods[best]["runs"], "test_top1")
            comparisons.append(entry)
    rule = choose_default(rows, datasets)
    verdicts = [
        claim(rows, comparisons, datasets, m)
        for m in SEARCHES
        if m in (*CANDIDATES, DEFAULT_METHOD)
    ]
    room = headroom(table, datasets)
    room_paper = headroom(table, datasets, PAPER_BASELINES)
    if room_paper is not None:
        room_paper["over"] = "of the paper's six baselines" + (
            " (LLRD and LP-FT pending)" if room is None else ""
        )
    progress = count_records(records, datasets)
    machine = machine_description()
    date = time.strftime("%Y-%m-%d %H:%M")
    result = {
        "benchmark": "accuracy",
        "date": date,
        "machine": machine,
        "protocol": protocol(),
        "wall": wall,
        "rows": table,
        "comparisons": comparisons,
        "default_rule": rule,
        "default_rule_issue25": adopt_rule(rows, datasets),
        "structures_rule": adopt_structures(rows, datasets),
        "random_search_rule": random_search_rule(rows, datasets),
        "claim": targets(
            rows, comparisons, headroom(table, datasets), datasets, chosen_default(rows, datasets)
        ),
        # the evolution's own targets, beside the default's when the last rule chose another
        "claim_evolution": targets(rows, comparisons, room, datasets, STRUCTURES_METHOD),
        "claim_issue13": [v for v in verdicts if v is not None],
        "headroom": room,
        "headroom_paper_baselines": room_paper,
        "progress": progress,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "accuracy.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(table, comparisons, datasets, date, machine, wall)
    md += rule_markdown(rule, [v for v in verdicts if v is not None], room or room_paper, progress)
    md += issue25_markdown(
        result["default_rule_issue25"],
        result["claim"],
        result["structures_rule"],
        result["random_search_rule"],
    )
    chosen, evolution = result["claim"], result["claim_evolution"]
    if chosen and evolution and chosen["method"] != STRUCTURES_METHOD:
        md += "\n" + targets_markdown(evolution)
    (out / "accuracy.md").write_text(md)
    plots(table, datasets, out)
    return md


def protocol() -> dict[str, Any]:
    return {
        "model": MODEL,
        "image_size": IMAGE_SIZE,
        "sizes": SIZES,
        "seeds": SEEDS,
        "lr_grid": LR_GRID,
        "epochs": EPOCHS,
        "patience": PATIENCE,
        "batch": BATCH,
        "searches": {k: {"preset": v[0], "scaling": v[1]} for k, v in SEARCHES.items()},
    }


def markdown(
    table: list[dict[str, Any]],
    comparisons: list[dict[str, Any]],
    datasets: list[str],
    date: str,
    machine: str,
    wall: dict[str, Any],
) -> str:
    lines = [
        "# Accuracy: BioTune against the baselines (EfficientNet-Lite0, 32 px)",
        "",
        f"- built: {date}",
        f"- machine: {machine}",
        f"- time: {wall.get('text', 'n/a')}",
        "",
        "Test top-1 % (mean +- std over 5 seeds), trainable parameters %, and tuning cost "
        "(FT-equivalents; one = full fine-tuning of the training split for 15 epochs):",
        "",
        "| method | " + " | ".join(datasets) + " |",
        "|---|" + "---|" * len(datasets),
    ]
    for m in ORDER:
        cells = []
        for d in datasets:
            r = next((x for x in table if x["dataset"] == d and x["method"] == m), None)
            cells.append(
                f"{100 * r['test_top1']:.2f} +- {100 * r['test_top1_std']:.2f} "
                f"({r['trainable_pct']:.1f}%, {r['tuning_ft_equivalents']:.2f} FT-eq)"
                if r
                else "pending"
            )
        lines.append(f"| {LABELS[m]} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Paired differences in test top-1 points (BioTune - other, by seed), 95 % CI:",
        "",
        "| dataset | method | vs full fine-tuning | best baseline | vs best baseline |",
        "|---|---|---|---|---|",
    ]
    for c in comparisons:

        def ci(x: dict[str, float] | None) -> str:
            return f"{x['mean']:+.2f} [{x['low']:+.2f}, {x['high']:+.2f}]" if x else ""

        lines.append(
            f"| {c['dataset']} | {LABELS[c['method']]} | {ci(c.get('vs_full'))} | "
            f"{LABELS.get(c.get('best_baseline', ''), '')} | {ci(c.get('vs_best'))} |"
        )
    lines += [
        "",
        "Full rows (balanced accuracy, chosen lr, validation scores per lr, plans):",
        "",
        "| dataset | method | test top-1 | test balanced | val balanced | lr | tuning s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in table:
        lines.append(
            f"| {r['dataset']} | {r['label']} | {100 * r['test_top1']:.2f} | "
            f"{100 * r['test_balanced']:.2f} +- {100 * r['test_balanced_std']:.2f} | "
            f"{100 * r['val_balanced']:.2f} | {r['lr'] if r['lr'] else 'search'} | "
            f"{r['tuning_seconds']:.0f} |"
        )
    for r in table:
        if r["plans"]:
            lines.append(f"\n{r['dataset']} {r['label']} plans: " + "; ".join(r["plans"]))
    return "\n".join(lines) + "\n"


def count_records(records: Path, datasets: list[str]) -> dict[str, dict[str, str]]:
    """Per method and dataset, how much is recorded: seed runs (and searches) done."""
    out: dict[str, dict[str, str]] = {}
    for m in ORDER:
        out[m] = {}
        for d in datasets:
            folder = records / d / m
            runs = len(list(folder.glob("lr*.json")))
            searches = len(list(folder.glob("search-seed*.json")))
            out[m][d] = f"{runs} runs" + (f", {searches} searches" if m in SEARCHES else "")
    return out


def issue25_markdown(
    rule: dict[str, Any],
    claim: dict[str, Any] | None,
    structures: dict[str, Any],
    last: dict[str, Any] | None = None,
) -> str:
    """Issue 25's rules for the default and its targets, as far as their rows exist."""
    lines = ["", "## Issue 25: the multi-fidelity default and its targets", ""]
    if last is not None and last["chosen"] is None:
        lines += ["The rule after the comparison with random search: pending.", ""]
    elif last is not None:
        lines += [
            "The rule after the comparison with random search (validation only; qualifies: "
            "mean within 0.2 points of the best, worst search within 1 point of the best worst, "
            f"whole search under full fine-tuning's grid, {last['grid_ft']:.2f} FT-eq):",
            "",
            "| method | val balanced % | worst search, points | whole search FT-eq | qualifies |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {LABELS[m]} | {100 * c['val_balanced']:.2f} | {100 * c['worst_val']:+.2f} | "
            f"{c['whole_ft']:.2f} | {'yes' if c['qualifies'] else 'no'} |"
            for m, c in last["candidates"].items()
        ]
        lines += ["", f"Chosen: **{LABELS[last['chosen']]}**.", ""]
    if structures["adopted"] is None:
        lines += [f"The rule for {LABELS[structures['method']]}: pending.", ""]
    else:
        lines += [
            f"The rule for {LABELS[structures['method']]} (validation only): "
            f"{100 * structures['val_balanced']:.2f} % against "
            f"{100 * structures['current_val_balanced']:.2f} % (minus 0.2 allowed); worst search "
            f"{100 * structures['worst_val']:+.2f} points against full fine-tuning's mean "
            f"validation, {100 * structures['current_worst_val']:+.2f} for "
            f"{LABELS[structures['current']]} (must be better); whole search "
            f"{structures['whole_ft']:.2f} FT-eq (grid {structures['grid_ft']:.2f}): "
            f"**{'adopted' if structures['adopted'] else 'not adopted'}**.",
            "",
        ]
    if rule["adopted"] is None:
        lines.append(f"The rule for the default: pending ({LABELS[rule['method']]} incomplete).")
    else:
        lines.append(
            f"The rule for the default (validation only): {LABELS[rule['method']]} "
            f"{100 * rule['val_balanced']:.2f} % against {LABELS[rule['current']]} "
            f"{100 * rule['current_val_balanced']:.2f} % (minus 0.2 allowed); whole search "
            f"{rule['whole_ft']:.2f} FT-eq against full fine-tuning's grid "
            f"{rule['grid_ft']:.2f}: **{'adopted' if rule['adopted'] else 'not adopted'}**."
        )
    lines.append("")
    if claim is None:
        lines += ["Targets: pending (the method or a baseline is incomplete).", ""]
        return "\n".join(lines)
    return "\n".join(lines) + "\n" + targets_markdown(claim)


def targets_markdown(claim: dict[str, Any]) -> str:
    """Issue 25's targets for one method (``targets``), as a list and a table."""
    worst = claim["worst_search"]
    lines = [
        f"Targets, read for {LABELS[claim['method']]}:",
        "",
        f"- mean gain over tuned full fine-tuning: {claim['mean_gain_over_full']:+.2f} points "
        f"(best baseline chosen on validation {claim['best_baseline_gain_validation']:+.2f}, "
        f"in hindsight {claim['best_baseline_gain_hindsight']:+.2f})",
        f"- worst single search: {worst['points']:+.2f} points against full fine-tuning's mean "
        f"({worst['dataset']}, seed {worst['seed']})",
        f"- whole search {claim['whole_ft_mean']:.2f} FT-eq, full fine-tuning's grid "
        f"{claim['full_grid_ft_mean']:.2f}",
    ]
    for arm, iv in claim.get("vs_arms", {}).items():
        lines.append(
            f"- minus {LABELS[arm]}: {iv['mean']:+.2f} points "
            f"[{iv['low']:+.2f}, {iv['high']:+.2f}] over {iv['n']} pairs"
        )
    lines += ["", "| target | met |", "|---|---|"]
    lines += [f"| {k} | {'yes' if v else '**no**'} |" for k, v in claim["checks"].items()]
    return "\n".join([*lines, ""])


def rule_markdown(
    rule: dict[str, Any],
    verdicts: list[dict[str, Any]],
    room: dict[str, Any] | None,
    progress: dict[str, dict[str, str]],
) -> str:
    """The default's choice (validation only), the claim's three conditions and the headroom."""
    grid = f"{rule['grid_ft']:.2f}" if rule["grid_ft"] is not None else "pending"
    lines = [
        "",
        "## Choosing the default (the README's rule; validation scores only)",
        "",
        f"Full fine-tuning's five-point grid costs {grid} FT-eq on average over the datasets.",
        "",
        "| candidate | mean val balanced % | whole search FT-eq (mean) | under the grid's cost |",
        "|---|---|---|---|",
    ]
    for c in rule["candidates"]:
        if not c["complete"]:
            lines.append(f"| {LABELS[c['method']]} | pending | pending | pending |")
            continue
        lines.append(
            f"| {LABELS[c['method']]} | {100 * c['val_balanced']:.2f} | {c['whole_ft']:.2f} | "
            f"{'yes' if c['eligible'] else 'no'} |"
        )
    chosen = LABELS[rule["chosen"]] if rule["chosen"] else "pending (or none eligible)"
    lines += ["", f"Chosen: **{chosen}**.", ""]
    if verdicts:
        lines += [
            "## The claim (issue 13)",
            "",
            "| method | not worse than the best baseline anywhere | mean gain over full FT "
            "| whole search FT-eq vs full FT grid | holds |",
            "|---|---|---|---|---|",
        ]
        for v in verdicts:
            c = v["checks"]
            lines.append(
                f"| {LABELS[v['method']]} | {'yes' if c['not_worse_than_best'] else 'no'} | "
                f"{v['mean_gain_over_full']:+.2f} points "
                f"({'>=' if c['gain_over_full_2_points'] else '<'} +2.0) | "
                f"{v['whole_ft_mean'][0]:.2f} vs {v['whole_ft_mean'][1]:.2f} | "
                f"{'**yes**' if v['holds'] else '**no**'} |"
            )
        lines.append("")
    if room is not None:
        picked = "; ".join(
            f"{d}: {LABELS[v['validation']['method']]} {v['validation']['gain']:+.2f}, "
            f"{LABELS[v['hindsight']['method']]} {v['hindsight']['gain']:+.2f}"
            for d, v in room["by_dataset"].items()
        )
        lines += [
            "## Headroom over tuned full fine-tuning",
            "",
            f"Test top-1 points over full fine-tuning of the best {room.get('over', 'baseline')} "
            "per dataset, chosen on "
            "validation (what a user could do) and by test score (hindsight, for scale only): "
            f"{picked}. Mean: {room['validation_mean_gain']:+.2f} chosen on validation, "
            f"{room['hindsight_mean_gain']:+.2f} with hindsight.",
            "",
        ]
    lines += ["## Records so far", "", "| method | " + " | ".join(next(iter(progress.values())))]
    lines[-1] += " |"
    lines.append("|---|" + "---|" * len(next(iter(progress.values()))))
    for m, by in progress.items():
        lines.append(f"| {LABELS[m]} | " + " | ".join(by.values()) + " |")
    return "\n".join(lines) + "\n"


def plots(table: list[dict[str, Any]], datasets: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for d in datasets:
        rows = [r for r in table if r["dataset"] == d]
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(7.6, 4.4))
        for r in rows:
            star = r["method"] in SEARCHES
            ax.errorbar(
                max(r["trainable_pct"], 1e-3),
                100 * r["test_top1"],
                yerr=100 * r["test_top1_std"],
                fmt="*" if star else "o",
                ms=13 if star else 7,
                capsize=3,
                label=r["label"],
            )
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (% of the model, log scale)")
        ax.set_ylabel("test top-1 accuracy (%)")
        ax.set_title(f"{d}: accuracy against trainable parameters")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
        fig.tight_layout()
        fig.savefig(out / f"accuracy-{d}.png", dpi=110)
        plt.close(fig)
    methods = [m for m in ORDER if any(r["method"] == m for r in table)]
    if not methods:
        return
    fig, ax = plt.subplots(figsize=(8, 4.2))
    width = 0.8 / max(len(datasets), 1)
    for i, d in enumerate(datasets):
        ys = [
            next(
                (100 * r["test_top1"] for r in table if r["dataset"] == d and r["method"] == m),
                float("nan"),
            )
            for m in methods
        ]
        ax.bar([k + i * width for k in range(len(methods))], ys, width, label=d)
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(methods))])
    ax.set_xticklabels([LABELS[m] for m in methods], rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("test top-1 accuracy (%)")
    lows = [100 * r["test_top1"] for r in table]
    ax.set_ylim(max(0.0, min(lows) - 5), 100)
    ax.legend(fontsize=8)
    ax.set_title("Summary: test top-1 per method and dataset (mean over 5 seeds)")
    fig.tight_layout()
    fig.savefig(out / "accuracy-summary.png", dpi=110)
    plt.close(fig)


# -------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated")
    p.add_argument(
        "--methods", default=",".join(ORDER), help="comma-separated, from " + ",".join(ORDER)
    )
    p.add_argument("--jobs", type=int, default=2, help="datasets at once, one process each")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--records", default=str(HERE / "records"), help="where records go")
    p.add_argument("--work", default="runs/accuracy", help="search run directories")
    p.add_argument("--out", default=str(HERE / "results"), help="where results go")
    p.add_argument("--report", action="store_true", help="only rebuild the results")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    datasets = [d for d in args.datasets.split(",") if d]
    methods = [m for m in args.methods.split(",") if m]
    unknown = [d for d in datasets if d not in SIZES] + [m for m in methods if m not in ORDER]
    if unknown:
        print(f"error: unknown dataset or method: {', '.join(unknown)}", file=sys.stderr)
        return 2
    records = Path(args.records)
    wall_file = records / "wall.json"
    wall = _read(wall_file) or {"sessions": []}
    if not args.report:
        os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
        # Method-major order: every dataset's full fine-tuning, then linear probing, ...
        tasks = [
            {
                "dataset": d,
                "method": m,
                "records": str(records),
                "work": args.work,
                "threads": args.threads,
            }
            for m in ORDER
            if m in methods
            for d in datasets
        ]
        sitting = Sitting(wall_file, wall, args.jobs, datasets, methods)
        try:
            if args.jobs == 1:
                for t in tasks:
                    run_piece(t)
            else:
                context = multiprocessing.get_context("spawn")
                from biotune.runner.executors import exit_with_parent

                # Workers end with this process (a session's end kills only the parent).
                with ProcessPoolExecutor(
                    args.jobs,
                    mp_context=context,
                    initializer=exit_with_parent,
                    initargs=(os.getpid(),),
                ) as pool:
                    for done in pool.map(run_piece, tasks):
                        print(f"finished {done}", file=sys.stderr, flush=True)
        finally:
            sitting.end()
    wall["text"] = wall_text(wall, records)
    print(report(records, Path(args.out), datasets, wall))
    return 0


if __name__ == "__main__":
    sys.exit(main())
