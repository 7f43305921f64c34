"""Search cost: the paper's protocol against our default search, in one run (benchmarks.md, §2).

Both searches run on the same machine, model (ImageNet EfficientNet-Lite0) and data (Animal-Shape,
32 px, 300 train / 150 val / 1000 test by default), in this process, one after the other. The
paper side keeps the paper's population (10), generations (10), elite (3), seeds (3), data
fraction (1/2), patience (3) and batch sizes, with no caching, no memoisation and no early
termination; only the epoch cap and the data are scaled down to fit 2 CPU cores, the same for both
sides: each evaluation trains at most ``--epochs`` epochs (ours: its own epoch count if smaller).
Each search's best plan is then trained by one final recipe on the whole training split with 3
seeds and tested once.

Cost unit: one FT-equivalent = fine-tuning every block on the whole training split for
``--epochs`` epochs with validation after each (``biotune.core.cost``), the same unit for both
sides.

    python benchmarks/search_cost/run.py                        # one search seed, ~35 min
    python benchmarks/search_cost/run.py --search-seeds 0,1,2   # three, ~1 h 45
    python benchmarks/search_cost/run.py --quick    # a smoke run (small data, small populations)

Writes results/search_cost.{json,md} (search_cost-quick.* with --quick, search_cost-VARIANT.* with
``--variant``, an ablation that changes the default side only) next to this file, with
the date, the machine and the exact command. Run directories go to runs/search_cost/; a rerun
with the same settings resumes an unfinished search, and reuses a side that finished (search and
final runs) with the times measured when it ran, its date in the report (``--redo`` runs it again).
A finished side is also kept as a small record in records/ (committed), so a fresh machine
reuses it; a side resumed over several sittings counts the search seconds of each (its
sessions.json). ``--sides paper`` runs the paper sides alone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from biotune import presets
from biotune.core import cost
from biotune.measure import block_flops
from biotune.progress import SearchProgress, setup_logging
from biotune.runner.config import DataConfig, SearchConfig
from biotune.runner.final import final_training_run, machine_description, summarize_final
from biotune.runner.rundir import write_json_atomic
from biotune.runner.search import Search
from biotune.runner.workbench import prepare

HERE = Path(__file__).resolve().parent

TARGET_FT_RATIO = 20.0
TARGET_WALL_RATIO = 10.0
TARGET_ACCURACY_POINTS = 1.0


def _evolution(**changes: Any) -> Callable[[SearchConfig], SearchConfig]:
    return lambda c: replace(c, evolution=replace(c.evolution, **changes))


def _training(**changes: Any) -> Callable[[SearchConfig], SearchConfig]:
    """A change of the short training every evaluation runs."""
    return lambda c: replace(
        c, protocol=replace(c.protocol, train=replace(c.protocol.train, **changes))
    )


#: Ablations of the default side (``--variant``): one change each, the paper side unchanged.
VARIANTS: dict[str, Callable[[SearchConfig], SearchConfig]] = {
    "anchors-off": _evolution(anchors=False),
    "no-pruning": lambda c: replace(c, protocol=replace(c.protocol, prune=None)),
    "3-epochs": _training(epochs=3),
    "population-8": _evolution(population_size=8),
    "initial-12": _evolution(initial_size=12),
    "local-step-0.5": _evolution(local_search_step=0.5),
    "likelihood": _training(metric="likelihood"),
    "batch-16": _training(batch_size=16),
    "batch-32": _training(batch_size=32),
    # the paper's population and elite, paid for by evaluations half as long: 1 epoch of batch
    # 32 (5 optimizer steps, each fold image seen once; the default: 2 epochs of batch 64, 6 steps)
    "wide-short": lambda c: _training(epochs=1, batch_size=32)(
        _evolution(population_size=10, elite=3)(c)
    ),
}


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: tiny data and small populations (NOT the paper's protocol)",
    )
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--train-size", type=int, default=300)
    p.add_argument("--val-size", type=int, default=150)
    p.add_argument("--test-size", type=int, default=1000)
    p.add_argument(
        "--search-seeds",
        type=_ints,
        default=[0],
        help="comma-separated seeds; each runs both searches (default 0)",
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=3,
        help="epoch cap of every search evaluation, both sides (paper: 30)",
    )
    p.add_argument(
        "--final-epochs",
        type=int,
        default=presets.FINAL_TRAINING.epochs,
        help="epochs of the final training of each found plan (same for both)",
    )
    p.add_argument(
        "--variant",
        choices=sorted(VARIANTS),
        help="an ablation: change the default side only (results/search_cost[-SCALE]-VARIANT.*)",
    )
    p.add_argument(
        "--executor",
        default="inprocess",
        choices=["inprocess", "process", "ray"],
        help="where both searches run their evaluations (the same for both)",
    )
    p.add_argument("--workers", type=int, default=1)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads of this process (1: steadiest on a shared 2-core box)",
    )
    p.add_argument(
        "--runs",
        type=Path,
        default=Path("runs/search_cost"),
        help="where the run directories go (resumed if present)",
    )
    p.add_argument(
        "--redo",
        action="store_true",
        help="run both sides again even where a finished record exists",
    )
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument(
        "--records",
        type=Path,
        default=HERE / "records",
        help="finished sides, one small JSON each (committed; reused like the run directories)",
    )
    p.add_argument(
        "--sides",
        default="paper,default",
        help="which sides to run: paper,default (both, then the report), or one of them "
        "(its records only, e.g. the paper sides while the default is still being chosen)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.train_size, args.val_size, args.test_size = 80, 40, 200
        args.epochs, args.final_epochs = 2, 2
    return args


def configs(args: argparse.Namespace, seed: int = 0) -> dict[str, SearchConfig]:
    """The two searches on the same data, with the same epoch cap, final recipe and search
    seed (the seed of the evolution and of the folds)."""
    data = DataConfig(
        image_size=args.image_size,
        train_size=args.train_size,
        val_size=args.val_size,
        test_size=args.test_size,
    )
    final = replace(presets.FINAL_TRAINING, epochs=args.final_epochs)
    out = {}
    for name, base in (("paper", presets.paper()), ("default", presets.default())):
        train = replace(base.protocol.train, epochs=min(args.epochs, base.protocol.train.epochs))
        evolution = base.evolution
        if args.quick:  # a smoke run only: small populations on both sides
            evolution = replace(evolution, population_size=4, generations=1, elite=1)
        out[name] = replace(
            base,
            data=data,
            evolution=evolution,
            protocol=replace(base.protocol, train=train),
            final=final,
            final_seeds=(0, 1, 2),
            seed=seed,
        )
    if args.variant:
        out["default"] = VARIANTS[args.variant](out["default"])
    return out


def _digest(config: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10]


def _run_dir(root: Path, name: str, config: SearchConfig) -> Path:
    return root / f"{name}-{_digest(config.to_dict())}"


def _earlier_names(name: str, config: SearchConfig) -> list[str]:
    """The names the same search had before the feature cache's memory became a machine
    setting (2026-12-02): its configuration then held ``cache_budget_mb: 1024.0``, which no
    search result depends on. Keeps the paper sides recorded before (hours each) found."""
    stored = config.to_dict()
    if "cache_memory" in stored["protocol"]:  # a budget set by hand: never keyed the old way
        return []
    stored["protocol"]["cache_budget_mb"] = 1024.0
    return [f"{name}-{_digest(stored)}"]


def run_side(name: str, config: SearchConfig, args: argparse.Namespace, unit_epochs: int) -> dict:
    """One search, then its plan's final training; wall times measured here, in this process."""
    run_dir = _run_dir(args.runs, name, config)
    finished = run_dir / "benchmark_side.json"
    record = args.records / f"{run_dir.name}.json"  # committed: survives a fresh machine
    earlier = [args.records / f"{n}.json" for n in _earlier_names(name, config)]
    for path in (record, finished, *earlier):
        if path.exists() and not args.redo:
            side = json.loads(path.read_text())
            print(f"{name}: reusing the side finished on {side['date']} ({path})", flush=True)
            return side
    resume = (run_dir / "config.json").exists()
    bench = prepare(config.data)
    search = Search(
        config,
        run_dir,
        bench=bench,
        progress=SearchProgress.for_search(config),
        executor=args.executor,
        workers=args.workers,
    )
    start = time.perf_counter()
    result = search.run_search(resume=resume, final=False)
    search_wall = time.perf_counter() - start
    if resume:
        # Every sitting's search time (sessions.json, to its last evaluation) and re-ranking.
        search_wall = result.search_seconds
    flops = block_flops(bench.model, bench.partition, bench.splits.val[0][0])
    unit = cost.ft_work(flops, len(bench.splits.train), len(bench.splits.val), unit_epochs)
    summary = cost.search_cost(result.evaluations, unit, search_wall)
    add_rerank(summary, result.cost.get("rerank"))
    if resume:
        summary["note"] = (
            "resumed: wall time summed over the search's sittings (sessions.json and rerank runs)"
        )
    start = time.perf_counter()
    plan = result.best_plan
    runs = [final_training_run(bench, plan, config.final, s) for s in config.final_seeds]
    final = summarize_final(runs, result.best_plan, bench)
    final_wall = time.perf_counter() - start
    print(
        f"{name}: {summary['evaluations']} evaluations ({summary['by_status']}), "
        f"{summary['ft_equivalents']:.2f} FT-equivalents, {search_wall:.0f} s search; "
        f"test balanced {final['test_balanced']['mean']:.4f}",
        flush=True,
    )
    side = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "run_dir": str(run_dir),
        "settings": {
            "evolution": config.evolution.to_dict(),
            "protocol": config.protocol.to_dict(),
            "final": config.final.to_dict(),
            "final_seeds": list(config.final_seeds),
        },
        "cost": summary,
        "search_wall_seconds": search_wall,
        "final_wall_seconds": final_wall,
        "best_plan": result.best_plan.describe(),
        "best_fitness": result.best_fitness,
        "final": {
            k: final[k] for k in ("test_top1", "test_balanced", "val_balanced", "trainable_share")
        },
        "block_flops": flops,
    }
    write_json_atomic(finished, side)
    args.records.mkdir(parents=True, exist_ok=True)
    write_json_atomic(record, side)
    return side


def add_rerank(summary: dict[str, Any], rerank: dict[str, Any] | None) -> None:
    """Count a re-ranking's runs in the search's cost (all of them, the winner's too, though it
    is then seed 0's final run: the conservative count)."""
    if not rerank or "rerank" in summary:
        return
    summary["rerank"] = rerank
    summary["work_flops"] += rerank["work_flops"]
    summary["ft_equivalents"] = summary["work_flops"] / summary["ft_work_flops"]


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("inf")


def compare_sides(p: dict, d: dict) -> dict[str, float]:
    """Ratios paper / default of cost, and the default's test accuracy minus the paper's."""
    return {
        "ft_equivalents": _ratio(p["cost"]["ft_equivalents"], d["cost"]["ft_equivalents"]),
        "wall_seconds": _ratio(p["search_wall_seconds"], d["search_wall_seconds"]),
        "balanced_points": 100
        * (d["final"]["test_balanced"]["mean"] - p["final"]["test_balanced"]["mean"]),
    }


def _acc(side: dict, key: str) -> str:
    s = side["final"][key]
    return f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}"


def _side_table(search: dict, default: str = "default") -> list[str]:
    p, d, r = search["paper"], search["default"], search["ratios"]
    rows = [
        (
            "evaluations (trained)",
            f"{p['cost']['evaluations']} ({p['cost']['trained']})",
            f"{d['cost']['evaluations']} ({d['cost']['trained']})",
            "",
        ),
        (
            "FT-equivalents",
            f"{p['cost']['ft_equivalents']:.2f}",
            f"{d['cost']['ft_equivalents']:.2f}",
            f"{r['ft_equivalents']:.1f}x",
        ),
        (
            "search wall time (s)",
            f"{p['search_wall_seconds']:.0f}",
            f"{d['search_wall_seconds']:.0f}",
            f"{r['wall_seconds']:.1f}x",
        ),
        ("test top-1 % (3 seeds)", _acc(p, "test_top1"), _acc(d, "test_top1"), ""),
        (
            "test balanced % (3 seeds)",
            _acc(p, "test_balanced"),
            _acc(d, "test_balanced"),
            f"{r['balanced_points']:+.2f} points",
        ),
        ("found plan", p["best_plan"], d["best_plan"], ""),
        ("finished", p.get("date", "?"), d.get("date", "?"), ""),
    ]
    return [
        f"## Search seed {search['seed']}",
        "",
        f"| | paper protocol | {default} | ratio |",
        "|---|---|---|---|",
        *[f"| {a} | {b} | {c} | {e} |" for a, b, c, e in rows],
        "",
    ]


def markdown(report: dict[str, Any]) -> str:
    r, t = report["ratios"], report["targets"]
    lines = [
        f"# Search cost: paper protocol vs default ({report['date']})",
        "",
        f"Machine: {report['machine']}  ",
        f"Command: `{report['command']}`  ",
        f"Data: {report['data']}; every search evaluation capped at {report['epochs']} epochs "
        f"(paper: 30), the same for both; FT-equivalent = {report['epochs']} epochs of full "
        "fine-tuning on the whole training split, validation included. Each search seed runs "
        "both searches (its own folds and evolution); each found plan is trained with final "
        "seeds 0, 1, 2 and tested once.",
        "",
    ]
    default = f"default, {report['variant']}" if report.get("variant") else "default"
    for search in report["searches"]:
        lines += _side_table(search, default)
    n = len(report["searches"])
    lines += [
        f"## Over {n} search seed(s)",
        "",
        f"- FT-equivalents, summed: {r['ft_equivalents']:.1f}x fewer for the default.",
        f"- search wall time, summed: {r['wall_seconds']:.1f}x less for the default.",
        f"- test balanced accuracy, mean over search seeds: paper {r['paper_balanced']:.2f} %, "
        f"default {r['default_balanced']:.2f} % ({r['balanced_points']:+.2f} points).",
        "",
        "Targets: >= 20x fewer FT-equivalents: "
        + ("met" if t["ft"] else "NOT met")
        + "; >= 10x less wall time: "
        + ("met" if t["wall"] else "NOT met")
        + "; test accuracy within 1 point or better: "
        + ("met" if t["accuracy"] else "NOT met")
        + ".",
    ]
    if report["quick"]:
        lines += ["", "**Quick smoke run: populations shrunk, NOT the paper's protocol.**"]
    if report.get("variant"):
        lines += [
            "",
            f"**Ablation `{report['variant']}`: the default side changed, NOT our default.**",
        ]
    return "\n".join(lines) + "\n"


SCALE = ("image_size", "train_size", "val_size", "test_size", "epochs", "final_epochs")


def results_stem(args: argparse.Namespace) -> str:
    """``search_cost``, then ``quick``, the data scale where it is not the default (so another
    scale never overwrites the default's results) and the variant."""
    defaults = parse_args([])
    scale = ""
    if not args.quick and any(getattr(args, k) != getattr(defaults, k) for k in SCALE):
        scale = (
            f"{args.image_size}px-{args.train_size}-{args.val_size}-{args.test_size}"
            f"-e{args.epochs}-f{args.final_epochs}"
        )
    return "-".join(
        filter(None, ["search_cost", "quick" if args.quick else "", scale, args.variant])
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()  # a search's progress, one line per evaluation when not on a terminal
    torch.set_num_threads(args.threads)
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine_description(),
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "quick": args.quick,
        "data": f"Animal-Shape, EfficientNet-Lite0, {args.image_size} px, train {args.train_size}"
        f" / val {args.val_size} / test {args.test_size}",
        "epochs": args.epochs,
        "threads": args.threads,
        "executor": f"{args.executor} x{args.workers}",
        "variant": args.variant,
        "searches": [],
    }
    for seed in args.search_seeds:
        search: dict[str, Any] = {"seed": seed}
        for name, config in configs(args, seed).items():
            if name not in args.sides.split(","):
                continue
            label = f"{name}-{args.variant}" if name == "default" and args.variant else name
            search[name] = run_side(label, config, args, args.epochs)
        if "paper" not in search or "default" not in search:
            continue
        search["ratios"] = compare_sides(search["paper"], search["default"])
        report["searches"].append(search)
    if not report["searches"]:
        print(f"sides recorded in {args.records}; the report needs both sides", flush=True)
        return 0
    searches = report["searches"]

    def ft(side: str) -> float:
        return sum(s[side]["cost"]["ft_equivalents"] for s in searches)

    def wall(side: str) -> float:
        return sum(s[side]["search_wall_seconds"] for s in searches)

    def balanced(side: str) -> float:
        return 100 * float(np.mean([s[side]["final"]["test_balanced"]["mean"] for s in searches]))

    points = balanced("default") - balanced("paper")
    report["ratios"] = {
        "ft_equivalents": _ratio(ft("paper"), ft("default")),
        "wall_seconds": _ratio(wall("paper"), wall("default")),
        "paper_balanced": balanced("paper"),
        "default_balanced": balanced("default"),
        "balanced_points": points,
    }
    report["targets"] = {
        "ft": report["ratios"]["ft_equivalents"] >= TARGET_FT_RATIO,
        "wall": report["ratios"]["wall_seconds"] >= TARGET_WALL_RATIO,
        "accuracy": bool(np.isfinite(points) and points >= -TARGET_ACCURACY_POINTS),
    }
    stem = results_stem(args)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / f"{stem}.json", report)
    text = markdown(report)
    (args.out / f"{stem}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
