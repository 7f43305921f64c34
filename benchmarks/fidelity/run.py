"""Fidelity benchmark: how well cheap evaluations rank plans against the final recipe (README.md).

Every finished run is a small JSON record under ``records/``, written atomically the moment it
finishes; a rerun skips what is recorded. The model, data, recipe and record helpers are the
accuracy benchmark's (``benchmarks/accuracy/run.py``), so a final-recipe run it already holds is
read from there, not trained again.

    python benchmarks/fidelity/run.py             # run or resume everything, then report
    python benchmarks/fidelity/run.py --report    # only rebuild results/ from the records
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("accuracy_run", HERE.parent / "accuracy" / "run.py")
acc = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(acc)  # type: ignore[union-attr]

DATASETS = ("mnist-5k", "digits")
PLANS = 24
FINAL_SEEDS = (0, 1)
FOLDS, SEEDS = (0, 1), (0, 1)
SEARCHED = ("biotune", "biotune-rerank", "biotune-rerank2", "biotune-winners2", "biotune-paper")
#: proxy -> (epochs, patience, whole training split?)
PROXIES = {"short": (2, 1, False), "long": (4, 4, False), "whole1": (1, 1, True)}
EXTRAP_EPOCH = 15
DRAWS = 200


# ------------------------------------------------------------------------------------ the plans


def make_plans(name: str, names: tuple[str, ...], records: Path) -> list[dict[str, Any]]:
    """The fixed plan set of README.md, in order: anchors, practitioners', evolved, random."""
    from biotune.core.evolution import anchor_genes
    from biotune.core.plan import FineTunePlan, decode_genome, genome_is_valid

    out: list[dict[str, Any]] = []

    def add(kind: str, plan: Any, lr: float) -> None:
        entry = {"kind": kind, "base_lr": lr, "plan": plan.to_dict()}
        if any(e["plan"] == entry["plan"] and e["base_lr"] == lr for e in out):
            return
        out.append({"id": f"p{len(out):02d}", **entry})

    for genes in anchor_genes(len(names)):
        add("anchor", decode_genome(genes, names), 1e-3)
    for lr in (3e-4, 3e-3, 1e-2):
        add("full", FineTunePlan.full(names), lr)
    for lr in (1e-2, 3e-2):
        add("linear", FineTunePlan.head_only(names), lr)
    for lr in (1e-3, 3e-3):
        add("llrd", FineTunePlan.layer_decay(names, 0.8), lr)
    evolved = 0
    for method in SEARCHED:
        for seed in acc.SEEDS:
            rec = acc._read(records / name / method / f"search-seed{seed}.json")
            if rec is None or evolved >= 8:
                continue
            before = len(out)
            add(f"evolved:{method}:{seed}", FineTunePlan.from_dict(rec["plan"]), rec["base_lr"])
            evolved += len(out) - before
    rng = np.random.default_rng(2026)
    while len(out) < PLANS:
        genes = rng.random(len(names) + 1)
        if genome_is_valid(genes):
            add("random", decode_genome(genes, names), 1e-3)
    return out


# ---------------------------------------------------------------------------------- the pieces


class Bench:
    """One dataset: the accuracy benchmark's workbench and cost unit, the folds, the plans."""

    def __init__(self, name: str, records: Path, log: Any) -> None:
        from biotune.core.splits import stratified_folds

        self.name, self.records, self.log = name, records, log
        self.ds = acc.Dataset(name, records / "_unused", records / "_unused", log)
        self.bench = self.ds.bench
        targets = np.asarray(self.bench.splits.train.targets)
        self.folds = stratified_folds(targets, 2, 0)
        path = HERE / "plans" / f"{name}.json"
        if not path.exists():
            plans = make_plans(name, self.bench.partition.names, acc.HERE / "records")
            acc._write(path, {"dataset": name, "plans": plans})
        self.plans = acc._read(path)["plans"]
        self.accuracy = self._accuracy_runs()

    def _accuracy_runs(self) -> dict[tuple[str, float, int], dict[str, Any]]:
        """The accuracy benchmark's final-recipe runs, by (plan, base lr, seed)."""
        from biotune.core.plan import FineTunePlan

        names = self.bench.partition.names
        plain = {"full": FineTunePlan.full(names), "linear": FineTunePlan.head_only(names)}
        out = {}
        for path in (acc.HERE / "records" / self.name).glob("*/lr*.json"):
            rec = acc._read(path)
            if rec is None or rec.get("options"):
                continue
            plan = rec["plan"] or (
                plain[rec["method"]].to_dict() if rec["method"] in plain else None
            )
            if plan is not None:
                out[(json.dumps(plan, sort_keys=True), rec["lr"], rec["seed"])] = rec
        return out

    def final(self, entry: dict[str, Any], seed: int) -> dict[str, Any]:
        from biotune.baselines import run_baseline
        from biotune.core.plan import FineTunePlan

        path = self.records / self.name / "final" / f"{entry['id']}-seed{seed}.json"
        done = acc._read(path)
        if done is not None:
            return done
        key = (json.dumps(entry["plan"], sort_keys=True), entry["base_lr"], seed)
        if key in self.accuracy:
            rec = self.accuracy[key]
            record = {k: rec[k] for k in ("val_balanced", "val_top1", "epochs_run", "best_epoch")}
            record["from"] = f"benchmarks/accuracy: {rec['method']} lr{rec['lr']:g}-seed{seed}"
        else:
            start = time.perf_counter()
            config = replace(acc.recipe(), base_lr=entry["base_lr"])
            plan = FineTunePlan.from_dict(entry["plan"])
            run = run_baseline("plan", self.bench, config, seed, plan=plan)
            record = {
                "val_balanced": run.result.val.balanced,
                "val_top1": run.result.val.top1,
                "epochs_run": run.result.epochs_run,
                "best_epoch": run.result.best_epoch,
                "seconds": time.perf_counter() - start,
            }
            self.log(f"{entry['id']} final seed {seed}: val {record['val_balanced']:.4f}")
        record = {"plan": entry["id"], "seed": seed, **record}
        acc._write(path, record)
        return record

    def proxy(self, entry: dict[str, Any], proxy: str, fold: int, seed: int) -> dict[str, Any]:
        from biotune.core import cost
        from biotune.core.plan import FineTunePlan
        from biotune.data import subset
        from biotune.features import train_plan_fast

        path = self.records / self.name / "proxy" / f"{entry['id']}-{proxy}-f{fold}-s{seed}.json"
        done = acc._read(path)
        if done is not None:
            return done
        epochs, patience, whole = PROXIES[proxy]
        config = replace(acc.recipe(), base_lr=entry["base_lr"], epochs=epochs, patience=patience)
        plan = FineTunePlan.from_dict(entry["plan"])
        splits = self.bench.splits
        train = splits.train if whole else subset(splits.train, self.folds[fold])
        cache = self.bench.feature_cache(config)
        before = list(cache.stage_images) if cache else []
        start = time.perf_counter()
        _, result, cached = train_plan_fast(
            self.bench.model,
            self.bench.partition,
            plan,
            train,
            splits.val,
            config,
            seed=seed,
            cache=cache,
            keys=("train" if whole else ("fold", fold), "val"),
        )
        built = [a - b for a, b in zip(cache.stage_images, before, strict=True)] if cache else []
        work = cost.run_work(
            self.ds.flops, cached, plan.frozen_prefix, result.train_images, result.eval_images
        )
        record = {
            "plan": entry["id"],
            "proxy": proxy,
            "fold": None if whole else fold,
            "seed": seed,
            "val_balanced": result.val.balanced,
            "val_loss_at_best": result.history[result.best_epoch - 1]["val_loss"]
            if result.best_epoch
            else None,
            "curve": [h["val_balanced"] for h in result.history],
            "loss_curve": [h["val_loss"] for h in result.history],
            "status": result.status,
            "cached_prefix": cached,
            "ft_equivalents": work / self.ds.ft_work,
            "cache_ft_equivalents": cost.cache_work(self.ds.flops, built) / self.ds.ft_work
            if built
            else 0.0,
            "seconds": time.perf_counter() - start,
        }
        acc._write(path, record)
        return record

    def run_all(self) -> None:
        """Plan by plan in a fixed shuffled order, so that a partial run holds plans of every
        kind (README.md)."""
        order = np.random.default_rng(1).permutation(len(self.plans))
        for entry in (self.plans[i] for i in order):
            for seed in FINAL_SEEDS:
                self.final(entry, seed)
            for proxy, (_, _, whole) in PROXIES.items():
                for fold in (None,) if whole else FOLDS:
                    for seed in SEEDS:
                        self.proxy(entry, proxy, 0 if fold is None else fold, seed)
            self.log(f"{entry['id']} ({entry['kind']}) done")


def run_dataset(task: dict[str, Any]) -> str:
    import torch

    torch.set_num_threads(1)
    name = task["dataset"]

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {message}", file=sys.stderr, flush=True)

    Bench(name, Path(task["records"]), log).run_all()
    return name


# -------------------------------------------------------------------------------------- report


def _cells(records: Path, name: str, plans: list[dict[str, Any]]) -> dict[str, Any]:
    """Complete plans only: final score, and per proxy the score of every cell."""
    out = {}
    for entry in plans:
        finals = [
            acc._read(records / name / "final" / f"{entry['id']}-seed{s}.json") for s in FINAL_SEEDS
        ]
        if any(f is None for f in finals):
            continue
        cells: dict[str, dict[tuple[Any, int], dict[str, Any]]] = {}
        complete = True
        for proxy, (_, _, whole) in PROXIES.items():
            cells[proxy] = {}
            for fold in (None,) if whole else FOLDS:
                for seed in SEEDS:
                    f = 0 if fold is None else fold
                    rec = acc._read(
                        records / name / "proxy" / f"{entry['id']}-{proxy}-f{f}-s{seed}.json"
                    )
                    if rec is None:
                        complete = False
                    else:
                        cells[proxy][(fold, seed)] = rec
        if complete:
            out[entry["id"]] = {"entry": entry, "finals": finals, "cells": cells}
    return out


def _extrapolate(curve: list[float]) -> float:
    """``a + b log(epoch)`` fitted to the curve, read at EXTRAP_EPOCH (the final budget)."""
    x = np.log(np.arange(1, len(curve) + 1))
    if len(curve) < 2:
        return curve[-1]
    b, a = np.polyfit(x, np.asarray(curve), 1)
    return float(a + b * math.log(EXTRAP_EPOCH))


def scores_by_proxy(
    cell_data: dict[str, Any],
) -> dict[str, dict[tuple[Any, int], tuple[float, float]]]:
    """Per derived proxy, per cell: (score, cost in FT-eq)."""
    out: dict[str, dict[tuple[Any, int], tuple[float, float]]] = {}
    for proxy, cells in cell_data.items():
        for cell, rec in cells.items():
            c = rec["ft_equivalents"]
            out.setdefault(proxy, {})[cell] = (rec["val_balanced"], c)
            if proxy == "short":
                loss = rec["val_loss_at_best"]
                out.setdefault("short-loss", {})[cell] = (-loss if loss is not None else -1e9, c)
            if proxy == "long":
                curve = rec["curve"]
                for k in range(1, len(curve)):
                    out.setdefault(f"long@{k}", {})[cell] = (max(curve[:k]), c * k / len(curve))
                out.setdefault("long-extrap", {})[cell] = (_extrapolate(curve), c)
    return out


def analyse(records: Path, name: str) -> dict[str, Any] | None:
    from scipy import stats

    plans = acc._read(HERE / "plans" / f"{name}.json")
    if plans is None:
        return None
    data = _cells(records, name, plans["plans"])
    if len(data) < 4:
        return {"dataset": name, "plans": len(data)}
    ids = list(data)
    truth = np.array([np.mean([f["val_balanced"] for f in data[i]["finals"]]) for i in ids])
    seeds_gap = np.mean(
        [
            abs(data[i]["finals"][0]["val_balanced"] - data[i]["finals"][1]["val_balanced"])
            for i in ids
        ]
    )
    per_plan = {i: scores_by_proxy(data[i]["cells"]) for i in ids}
    rng = np.random.default_rng(0)
    result: dict[str, Any] = {
        "dataset": name,
        "plans": len(ids),
        "final_seed_gap_points": 100 * seeds_gap,
        "proxies": {},
    }
    for proxy in per_plan[ids[0]]:
        cells = list(per_plan[ids[0]][proxy])
        table = np.array([[per_plan[i][proxy][c][0] for c in cells] for i in ids])
        costs = np.array([[per_plan[i][proxy][c][1] for c in cells] for i in ids])
        crn = [stats.spearmanr(table[:, j], truth)[0] for j in range(len(cells))]
        crn_k = [stats.kendalltau(table[:, j], truth)[0] for j in range(len(cells))]
        draws = []
        for _ in range(DRAWS):
            pick = table[np.arange(len(ids)), rng.integers(0, len(cells), len(ids))]
            draws.append(stats.spearmanr(pick, truth)[0])
        mean = table.mean(axis=1)
        folds = [c for c in cells if c[0] is not None]
        fold_gap = (
            np.mean(
                [
                    abs(table[:, cells.index((0, s))] - table[:, cells.index((1, s))]).mean()
                    for s in SEEDS
                ]
            )
            if folds
            else None
        )
        seed_gap = np.mean(
            [
                abs(table[:, cells.index((f, 0))] - table[:, cells.index((f, 1))]).mean()
                for f in ({c[0] for c in cells})
            ]
        )
        unit = float(costs.mean())
        result["proxies"][proxy] = {
            "spearman_crn": float(np.nanmean(crn)),
            "kendall_crn": float(np.nanmean(crn_k)),
            "spearman_random_cell": float(np.nanmean(draws)),
            "spearman_mean_of_cells": float(stats.spearmanr(mean, truth)[0]),
            "fold_gap_points": None if fold_gap is None else 100 * float(fold_gap),
            "seed_gap_points": 100 * float(seed_gap),
            "ft_eq_per_evaluation": unit,
            "spearman_crn_per_ft_eq": float(np.nanmean(crn)) / unit if unit > 0 else None,
            "cells": len(cells),
        }
    cache = sum(
        rec.get("cache_ft_equivalents", 0.0)
        for i in ids
        for cells in data[i]["cells"].values()
        for rec in cells.values()
    )
    result["cache_build_ft_eq_total"] = cache
    return result


#: The README's rule: the cheap rung's proxy costs at most this per evaluation (FT-eq), and a
#: dearer proxy becomes the middle rung if its correlation is higher by more than MARGIN.
CHEAP, MARGIN = 0.1, 0.1


def choice(results: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The README's rule over the datasets: the cheap rung's proxy and the middle rung, if any."""
    complete = [r for r in results if "proxies" in r]
    if len(complete) < len(DATASETS):
        return None
    # long@k is the curve of a 4-epoch schedule read early (what a pruned run sees), not an
    # evaluation a search can run on its own: reported, not chosen.
    names = set.intersection(*(set(r["proxies"]) for r in complete))
    names = {p for p in names if "@" not in p}

    def mean(proxy: str, key: str) -> float:
        return float(np.mean([r["proxies"][proxy][key] for r in complete]))

    table = {p: (mean(p, "spearman_crn"), mean(p, "ft_eq_per_evaluation")) for p in names}
    cheap = [p for p in names if table[p][1] <= CHEAP]
    if not cheap:
        return None
    rung0 = max(cheap, key=lambda p: (table[p][0], -table[p][1]))
    dearer = [p for p in names if table[p][1] > CHEAP and table[p][0] > table[rung0][0] + MARGIN]
    middle = max(dearer, key=lambda p: (table[p][0], -table[p][1])) if dearer else None
    return {
        "cheap_rung": rung0,
        "middle_rung": middle,
        "by_proxy": {p: {"spearman_crn": s, "ft_eq": c} for p, (s, c) in sorted(table.items())},
        "plans": {r["dataset"]: r["plans"] for r in complete},
    }


def markdown(results: list[dict[str, Any]], machine: str, date: str) -> str:
    lines = [
        "# Fidelity: proxies against the final recipe (EfficientNet-Lite0, 32 px)",
        "",
        f"- built: {date}",
        f"- machine: {machine}",
        "- one FT-equivalent: full fine-tuning of the whole training split for 15 epochs",
        "",
    ]
    for r in results:
        lines += [f"## {r['dataset']} ({r['plans']} complete plans of {PLANS})", ""]
        if "proxies" not in r:
            lines += ["Too few complete plans to correlate.", ""]
            continue
        lines += [
            f"Final recipe's own seed-to-seed difference: {r['final_seed_gap_points']:.2f} points.",
            "",
            "| proxy | Spearman, same cell (CRN) | Kendall (CRN) | Spearman, random cell | "
            "Spearman, mean of cells | fold gap (points) | seed gap (points) | FT-eq / eval | "
            "Spearman per FT-eq |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for p, v in sorted(r["proxies"].items(), key=lambda kv: -kv[1]["spearman_crn"]):
            fold = f"{v['fold_gap_points']:.2f}" if v["fold_gap_points"] is not None else "n/a"
            per = f"{v['spearman_crn_per_ft_eq']:.1f}" if v["spearman_crn_per_ft_eq"] else "n/a"
            lines.append(
                f"| {p} | {v['spearman_crn']:.3f} | {v['kendall_crn']:.3f} | "
                f"{v['spearman_random_cell']:.3f} | {v['spearman_mean_of_cells']:.3f} | {fold} | "
                f"{v['seed_gap_points']:.2f} | {v['ft_eq_per_evaluation']:.3f} | {per} |"
            )
        lines += [
            "",
            f"Cache building, all proxy runs: {r['cache_build_ft_eq_total']:.3f} FT-eq.",
            "",
        ]
    chosen = choice(results)
    if chosen is not None:
        middle = chosen["middle_rung"] or "none"
        ranked = sorted(chosen["by_proxy"].items(), key=lambda kv: -kv[1]["spearman_crn"])
        lines += [
            "## The choice (README's rule, mean over the datasets)",
            "",
            f"Cheap rung: **{chosen['cheap_rung']}**; middle rung: **{middle}** "
            f"(complete plans: {chosen['plans']}).",
            "",
            "| proxy | mean Spearman (CRN) | FT-eq / evaluation |",
            "|---|---|---|",
            *(f"| {p} | {v['spearman_crn']:.3f} | {v['ft_eq']:.3f} |" for p, v in ranked),
            "",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--jobs", type=int, default=1, help="datasets at once, one process each")
    p.add_argument("--records", default=str(HERE / "records"))
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--report", action="store_true", help="only rebuild the results")
    args = p.parse_args(argv)
    datasets = [d for d in args.datasets.split(",") if d]
    records = Path(args.records)
    if not args.report:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        tasks = [{"dataset": d, "records": str(records)} for d in datasets]
        if args.jobs == 1:
            for t in tasks:
                run_dataset(t)
        else:
            from biotune.runner.executors import exit_with_parent

            with ProcessPoolExecutor(
                args.jobs,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=exit_with_parent,
                initargs=(os.getpid(),),
            ) as pool:
                for done in pool.map(run_dataset, tasks):
                    print(f"finished {done}", file=sys.stderr, flush=True)
    from biotune.runner.final import machine_description

    results = [r for r in (analyse(records, d) for d in datasets) if r is not None]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    date = time.strftime("%Y-%m-%d %H:%M")
    machine = machine_description()
    (out / "fidelity.json").write_text(
        json.dumps(
            {"date": date, "machine": machine, "results": results, "choice": choice(results)},
            indent=2,
        )
        + "\n"
    )
    md = markdown(results, machine, date)
    (out / "fidelity.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
