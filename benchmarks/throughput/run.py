"""Evaluation throughput: what each speed-up saves on one evaluation (benchmarks.md, §3).

For plans whose first k blocks are frozen (the rest fine-tuned at the base learning rate), one
search evaluation (one seed, half the training split) is timed without caching, with frozen-prefix
feature caching from a cold cache (building it counted) and from a warm one, and as a memoised
twin; a clearly worse plan is timed with and without early termination against a full
fine-tuning reference. All in one process, one after another, so the ratios are comparable.
Memory: the peak RSS of this process, and the feature cache's peak bytes against its budget (also
under a budget too small for every entry, to show that it holds).

    python benchmarks/throughput/run.py            # Lite0, 64 px, 300 train / 150 val (~10 min)
    python benchmarks/throughput/run.py --quick    # a smoke run (32 px, tiny data, ~30 s)

Writes results/throughput.{json,md} (throughput-quick.* with --quick) next to this file.
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from biotune.core.evolution import Candidate
from biotune.core.plan import BlockSetting, FineTunePlan, encode_plan
from biotune.features import FeatureCache
from biotune.runner._optimize import memoised
from biotune.runner.config import DataConfig
from biotune.runner.final import machine_description
from biotune.runner.fitness import Evaluator, PruneConfig, SearchProtocol
from biotune.runner.rundir import write_json_atomic
from biotune.runner.workbench import prepare
from biotune.training import TrainConfig

HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 32 px, tiny data")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--train-size", type=int, default=300)
    p.add_argument("--val-size", type=int, default=150)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--frozen", default="0,1,3,5,7,9", help="frozen-prefix lengths k to time")
    p.add_argument("--cache-budget-mb", type=float, default=1024.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2, help="each timing: the fastest of N runs")
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    if args.quick:
        args.image_size, args.train_size, args.val_size, args.epochs = 32, 80, 40, 2
        args.frozen, args.repeats = "0,3,9", 1
    return args


def _plan(names: tuple[str, ...], frozen: int, lr: float = 1.0) -> FineTunePlan:
    return FineTunePlan(tuple(BlockSetting(n, i >= frozen, lr) for i, n in enumerate(names)))


REPEATS = 1  # set from --repeats: each timing is the fastest of this many runs


def _timed(fn: Any) -> tuple[Any, float]:
    """(result, seconds): the fastest of REPEATS runs, which drops noise from a shared machine."""
    best = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return out, best


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main(argv: list[str] | None = None) -> int:
    global REPEATS
    args = parse_args(argv)
    REPEATS = max(1, args.repeats)
    torch.set_num_threads(args.threads)
    data = DataConfig(
        image_size=args.image_size,
        train_size=args.train_size,
        val_size=args.val_size,
        test_size=20,
    )
    bench = prepare(data)
    train = TrainConfig(
        epochs=args.epochs, patience=args.epochs, batch_size=64, eval_batch_size=256
    )
    base = SearchProtocol(
        data_fraction=0.5, seeds=(0,), train=train, cache_memory=args.cache_budget_mb
    )
    names = bench.partition.names

    def evaluator(**kw: Any) -> Evaluator:
        return Evaluator(bench.model, bench.partition, bench.splits, replace(base, **kw))

    plain = evaluator()
    rows = []
    warm = evaluator(cache_features=True)
    for k in (int(x) for x in args.frozen.split(",")):
        genes = encode_plan(_plan(names, k))
        uncached, t_plain = _timed(lambda g=genes: plain.evaluate(0, g, 0))
        cold = [evaluator(cache_features=True) for _ in range(REPEATS)]
        cached_cold, t_cold = _timed(lambda g=genes, c=cold: c.pop().evaluate(0, g, 0))
        warm.evaluate(0, genes, 0)
        cached_warm, t_warm = _timed(lambda g=genes: warm.evaluate(0, g, 0))
        rows.append(
            {
                "frozen": k,
                "first_block_trained": names[k],
                "seconds_uncached": t_plain,
                "seconds_cached_cold": t_cold,
                "seconds_cached_warm": t_warm,
                "speedup_cold": t_plain / t_cold,
                "speedup_warm": t_plain / t_warm,
                "work_ratio_warm": uncached.work / max(cached_warm.work, 1.0),
                "same_scores": uncached.scores == cached_warm.scores == cached_cold.scores,
                "cached_prefix": cached_warm.cached_prefix,
            }
        )
        print(json.dumps(rows[-1]), flush=True)

    # Memoisation: an equivalent plan already scored on this fold is a lookup, not a training
    # (the search loop's own lookup).
    genes = encode_plan(_plan(names, 3))
    record, t_train = _timed(lambda: plain.evaluate(0, genes, 0))
    done = {0: record.to_dict()}
    twin = Candidate(1, genes.copy(), 0, "initial")
    memo, t_memo = _timed(lambda: memoised(twin, done, plain))
    memo_row = {
        "seconds_trained": t_train,
        "seconds_memoised": t_memo,
        "speedup": t_train / max(t_memo, 1e-9),
        "reused_from": memo.reused_from,
    }

    # Early termination: a clearly worse plan (head only, low lr) against full fine-tuning.
    reference = plain.evaluate(0, encode_plan(_plan(names, 0)), 0).curves
    worse = encode_plan(_plan(names, len(names) - 1, lr=0.2))
    pruner = evaluator(prune=PruneConfig(min_epochs=1, quantile=0.5))
    unpruned, t_full = _timed(lambda: plain.evaluate(0, worse, 0, "child", reference))
    pruned, t_pruned = _timed(lambda: pruner.evaluate(0, worse, 0, "child", reference))
    prune_row = {
        "seconds_unpruned": t_full,
        "seconds_pruned": t_pruned,
        "speedup": t_full / t_pruned,
        "status": pruned.status,
        "pruned_at": pruned.pruned_at,
        "epochs": args.epochs,
        "work_ratio": unpruned.work / max(pruned.work, 1.0),
    }

    # Memory: the cache within its budget, also when the budget cannot hold every entry.
    assert warm.cache is not None
    splits = bench.splits
    pair = max(  # the largest (train, val) pair of entries: not room for them all
        warm.cache.entry_bytes(splits.train, k) + warm.cache.entry_bytes(splits.val, k)
        for k in range(1, len(names))
    )
    small = FeatureCache(bench.model, warm.cache.stages, pair, 256)
    for k in range(1, len(names)):
        small.features("train", splits.train, k)
        small.features("val", splits.val, k)
    memory = {
        "peak_rss_mb": _peak_rss_mb(),
        "cache_budget_mb": args.cache_budget_mb,
        "cache_peak_mb": warm.cache.peak_bytes / 2**20,
        "within_budget": warm.cache.peak_bytes <= warm.cache.budget_bytes,
        "small_budget_mb": small.budget_bytes / 2**20,
        "small_peak_mb": small.peak_bytes / 2**20,
        "small_within_budget": small.peak_bytes <= small.budget_bytes,
        "small_refused": small.skipped,
    }
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine_description(),
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "settings": {
            "model": data.model,
            "dataset": data.dataset,
            "image_size": args.image_size,
            "train_size": args.train_size,
            "val_size": args.val_size,
            "epochs": args.epochs,
            "data_fraction": 0.5,
            "seeds": 1,
            "threads": args.threads,
            "repeats": REPEATS,
        },
        "caching": rows,
        "memoisation": memo_row,
        "pruning": prune_row,
        "memory": memory,
    }
    stem = "throughput-quick" if args.quick else "throughput"
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / f"{stem}.json", report)
    text = markdown(report)
    (args.out / f"{stem}.md").write_text(text)
    print(text)
    return 0


def markdown(r: dict[str, Any]) -> str:
    s = r["settings"]
    lines = [
        f"# Evaluation throughput ({r['date']})",
        "",
        f"Machine: {r['machine']}  ",
        f"Command: `{r['command']}`  ",
        f"One evaluation: {s['model']} on {s['dataset']}, {s['image_size']} px, half of "
        f"{s['train_size']} training images, {s['val_size']} validation, {s['epochs']} epochs, "
        f"1 seed, {s['threads']} thread(s); each time the fastest of {s['repeats']} runs.",
        "",
        "| frozen k | first trained | uncached s | cached cold s | cached warm s | speed-up cold "
        "| speed-up warm | work ratio | same scores |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["caching"]:
        lines.append(
            f"| {row['frozen']} | {row['first_block_trained']} | {row['seconds_uncached']:.2f} "
            f"| {row['seconds_cached_cold']:.2f} | {row['seconds_cached_warm']:.2f} "
            f"| {row['speedup_cold']:.2f}x | {row['speedup_warm']:.2f}x "
            f"| {row['work_ratio_warm']:.2f}x | {'yes' if row['same_scores'] else 'NO'} |"
        )
    m, p, mem = r["memoisation"], r["pruning"], r["memory"]
    lines += [
        "",
        f"Memoisation: trained {m['seconds_trained']:.2f} s, memoised twin "
        f"{1000 * m['seconds_memoised']:.2f} ms ({m['speedup']:.0f}x).  ",
        f"Early termination of a clearly worse plan (head only, lr x0.2, against full "
        f"fine-tuning): {p['seconds_unpruned']:.2f} s -> {p['seconds_pruned']:.2f} s "
        f"({p['speedup']:.2f}x, work {p['work_ratio']:.2f}x), {p['status']} after "
        f"{p['pruned_at']} of {p['epochs']} epochs.  ",
        f"Memory: peak RSS {mem['peak_rss_mb']:.0f} MiB; feature cache peak "
        f"{mem['cache_peak_mb']:.1f} MiB of a {mem['cache_budget_mb']:.0f} MiB budget "
        f"({'within' if mem['within_budget'] else 'OVER'}); with a {mem['small_budget_mb']:.1f} "
        f"MiB budget: peak {mem['small_peak_mb']:.1f} MiB "
        f"({'within' if mem['small_within_budget'] else 'OVER'}), {mem['small_refused']} "
        "entries refused.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
