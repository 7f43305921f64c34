"""Which early-stopping rule the final recipe uses, decided on validation (the rule and the
candidates are in this folder's README, "Early stopping of the final recipe").

Each (dataset, plan, seed) trains the final recipe's 8 epochs with no early stop and keeps every
epoch's validation score, one JSON record under ``early_stopping/`` (a rerun reuses them); each
candidate rule is then replayed on those curves with ``biotune.training.stops_early``, the
function training stops by. Test scores are not read.

    nice -n 10 python benchmarks/default_run/early_stopping.py
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
RECORDS = HERE / "early_stopping"
DATASETS = ("digits", "textures")
SEEDS = (0, 1, 2)
#: min_epochs_share of each candidate, shortest first.
CANDIDATES = {"A, today": 0.0, "B, half": 0.5, "C, three quarters": 0.75}
#: A longer rule must beat the one kept so far by more than this (0.2 points).
MARGIN = 0.002


def curve(bench, dataset: str, name: str, plan, lr: float, seed: int) -> list[dict]:  # noqa: ANN001
    """Every epoch's validation scores of one run of the final recipe with no early stop."""
    from biotune.presets import FINAL_TRAINING
    from biotune.runner.final import machine_description

    out = RECORDS / f"{dataset}-{name}-seed{seed}.json"
    if not out.exists():
        config = replace(FINAL_TRAINING, base_lr=lr, min_epochs_share=1.0)
        start = time.perf_counter()
        _, result, cached = bench.train(plan, config, seed)
        record = {
            "dataset": dataset,
            "plan": name,
            "seed": seed,
            "recipe": config.to_dict(),
            "cached_prefix": cached,
            "seconds": time.perf_counter() - start,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
            "machine": machine_description(),
            "history": result.history,
        }
        RECORDS.mkdir(exist_ok=True)
        out.write_text(json.dumps(record, indent=2) + "\n")
        print(f"{out.name}: {record['seconds']:.0f}s", file=sys.stderr)
    return json.loads(out.read_text())["history"]


def replay(history: list[dict], share: float) -> tuple[float, int]:
    """The restored best epoch's validation balanced accuracy and the epochs run, had the run
    stopped by the final recipe with ``min_epochs_share`` = ``share``."""
    from biotune.presets import FINAL_TRAINING
    from biotune.training import stops_early

    config = replace(FINAL_TRAINING, min_epochs_share=share)
    best, since = -1.0, 0
    for epoch in history:
        if epoch["val_balanced"] > best:
            best, since = epoch["val_balanced"], 0
        else:
            since += 1
        if stops_early(config, epoch["epoch"], since):
            return best, epoch["epoch"]
    return best, len(history)


def main() -> int:
    import torch

    from biotune.core.plan import FineTunePlan
    from biotune.runner.config import DataConfig
    from biotune.runner.workbench import prepare

    torch.set_num_threads(1)
    runs: dict[tuple[str, str, int], list[dict]] = {}
    for dataset in DATASETS:
        bench = prepare(DataConfig(dataset=dataset, image_size=32))
        plans = {
            "biotune-plan": (FineTunePlan.load(HERE / "early_stopping" / "plan.json"), 1e-3),
            "full-lr3e-3": (FineTunePlan.full(bench.partition.names), 3e-3),
        }
        for name, (plan, lr) in plans.items():
            for seed in SEEDS:
                runs[(dataset, name, seed)] = curve(bench, dataset, name, plan, lr, seed)
    lines = [
        "| rule | mean val balanced % (12 runs) | digits, plan | digits, full | textures, plan "
        "| textures, full | mean epochs run |",
        "|---|---|---|---|---|---|---|",
    ]
    means = {}
    for label, share in CANDIDATES.items():
        scored = {key: replay(history, share) for key, history in runs.items()}
        means[label] = statistics.fmean(v for v, _ in scored.values())
        cells = [
            100 * statistics.fmean(scored[(d, p, s)][0] for s in SEEDS)
            for d in DATASETS
            for p in ("biotune-plan", "full-lr3e-3")
        ]
        epochs = statistics.fmean(e for _, e in scored.values())
        lines.append(
            f"| {label} ({share:g}) | {100 * means[label]:.2f} | "
            + " | ".join(f"{c:.2f}" for c in cells)
            + f" | {epochs:.2f} |"
        )
    kept = next(iter(CANDIDATES))
    for label in list(CANDIDATES)[1:]:
        if means[label] > means[kept] + MARGIN:
            kept = label
    print("\n".join(lines))
    print(f"\ndecision: {kept} (min_epochs_share {CANDIDATES[kept]:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
