"""Accuracy benchmark: BioTune against the baselines, on real data (benchmarks.md, section 1).

Default (offline, 2 CPU cores, under an hour): ImageNet EfficientNet-Lite0 on Animal-Shape,
MNIST-5k, Digits and Textures, small stratified subsamples at 32 px, every method of
``biotune compare`` with one recipe and one learning-rate grid chosen on validation, 3 seeds;
two datasets at a time, one single-threaded process each.

    python benchmarks/accuracy/run.py            # the offline benchmark
    python benchmarks/accuracy/run.py --quick    # a few-minute smoke run of the same pipeline
    python benchmarks/accuracy/run.py --paper --data-root ~/data --download   # GPU + internet:
        # ResNet-50, the paper's torchvision datasets, 224 px, whole splits, the paper's recipe

Writes results/accuracy.{json,md} (results/accuracy-quick.* with --quick) next to this file, with
the date, the machine and the exact command, plus one accuracy/parameters plot per dataset.
Searches keep their run directories under runs/accuracy/ and resume if the command is rerun.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "src"))

import torch  # noqa: E402

from biotune.compare import (  # noqa: E402
    ALL_METHODS,
    LABELS,
    SearchScale,
    compare,
    markdown_table,
)
from biotune.errors import BioTuneError  # noqa: E402
from biotune.runner import DataConfig, machine_description  # noqa: E402
from biotune.training import TrainConfig  # noqa: E402

OFFLINE_DATASETS = ("animal-shape", "mnist-5k", "digits", "textures")
#: train / val / test per offline dataset: 300 / 150 / 500, or the whole split where smaller.
OFFLINE_SIZES = {
    "animal-shape": (300, 150, 500),
    "mnist-5k": (300, 150, 500),
    "digits": (300, 150, 359),
    "textures": (300, 150, 154),
}
#: With 3-epoch budgets 1e-4 never won on validation in trial runs, so the offline grid starts
#: at 1e-3 (the same grid for every method; ``biotune compare`` defaults to 1e-4, 1e-3, 1e-2).
OFFLINE_LR_GRID = (1e-3, 3e-3, 1e-2)
#: The paper's datasets that torchvision provides (ISIC 2020 is not in torchvision).
PAPER_DATASETS = ("flowers102", "fgvc-aircraft", "dtd", "cifar10", "stl10", "mnist", "usps",
                  "svhn")


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(t) for t in _csv(text))


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in _csv(text))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: tiny subsamples, 1 epoch, 2 seeds, a tiny search")
    p.add_argument("--paper", action="store_true",
                   help="the paper's setting: resnet50, the paper's torchvision datasets, 224 px, "
                   "whole splits, 30 epochs (patience 3, batch 96), the unscaled paper search")
    p.add_argument("--model", help="model name (default efficientnet_lite0; --paper: resnet50)")
    p.add_argument("--datasets", type=_csv, help="comma-separated dataset names")
    p.add_argument("--methods", type=_csv, default=list(ALL_METHODS),
                   help=f"comma-separated, from {','.join(ALL_METHODS)}")
    p.add_argument("--image-size", type=int, help="pixels (default 32; --paper: 224)")
    p.add_argument("--train-size", type=int, help="training subsample for every dataset")
    p.add_argument("--val-size", type=int, help="validation subsample for every dataset")
    p.add_argument("--test-size", type=int, help="test subsample for every dataset")
    p.add_argument("--full-data", action="store_true", help="whole splits, no subsampling")
    p.add_argument("--data-root", help="where torchvision datasets live")
    p.add_argument("--download", action="store_true", help="download torchvision datasets")
    p.add_argument("--seeds", type=_ints, help="seeds (default 0,1,2)")
    p.add_argument("--lr-grid", type=_floats, help="base lrs chosen on validation "
                   "(default 1e-3,3e-3,1e-2; --paper: 1e-4,1e-3,1e-2)")
    p.add_argument("--epochs", type=int, help="maximum epochs of every final run (default 3)")
    p.add_argument("--patience", type=int, help="early stopping patience (default 1)")
    p.add_argument("--batch-size", type=int, help="training batch size (default 64)")
    p.add_argument("--paper-scale", type=_ints, metavar="POP,GEN,ELITE,SEEDS,EPOCHS",
                   help="scale of the paper-protocol search (default 4,2,1,1,3: population 4, "
                   "2 generations, 1 elite, 1 seed, 3 epochs per evaluation)")
    p.add_argument("--jobs", type=int, help="datasets run at once, each in its own process "
                   "(default: 2 on a CPU, 1 on a GPU); small models train faster as parallel "
                   "single-threaded processes than as one multi-threaded one")
    p.add_argument("--threads", type=int,
                   help="torch CPU threads per job (default: cores / jobs)")
    p.add_argument("--out", default=str(HERE / "results"), help="where results go")
    p.add_argument("--work", default="runs/accuracy",
                   help="where per-dataset comparisons and search run directories go")
    return p.parse_args(argv)


def settings(args: argparse.Namespace) -> dict:
    """Every choice of this run, resolved from the mode and the overrides."""
    if args.paper:
        base = {"model": "resnet50", "datasets": list(PAPER_DATASETS), "image_size": None,
                "full_data": True, "seeds": (0, 1, 2), "lr_grid": (1e-4, 1e-3, 1e-2),
                "epochs": 30, "patience": 3, "batch_size": 96, "eval_batch_size": 64,
                "paper_scale": None, "download": True}
    elif args.quick:
        base = {"model": "efficientnet_lite0", "datasets": list(OFFLINE_DATASETS),
                "image_size": 32, "sizes": (100, 50, 150), "seeds": (0, 1),
                "lr_grid": (1e-3, 1e-2), "epochs": 1, "patience": 1, "batch_size": 64,
                "eval_batch_size": 256, "paper_scale": (3, 1, 1, 1, 1),
                "biotune_scale": (4, 1, 1, 1, 1)}
    else:
        base = {"model": "efficientnet_lite0", "datasets": list(OFFLINE_DATASETS),
                "image_size": 32, "seeds": (0, 1, 2), "lr_grid": OFFLINE_LR_GRID,
                "epochs": 3, "patience": 1, "batch_size": 64, "eval_batch_size": 256,
                "paper_scale": (4, 2, 1, 1, 3)}
    for key in ("model", "datasets", "image_size", "seeds", "lr_grid", "epochs", "patience",
                "batch_size", "paper_scale"):
        value = getattr(args, key)
        if value is not None:
            base[key] = value
    if args.full_data:
        base["full_data"] = True
    if args.download:
        base["download"] = True
    base["explicit_sizes"] = (args.train_size, args.val_size, args.test_size)
    base["methods"] = args.methods
    return base


def data_config(s: dict, dataset: str, args: argparse.Namespace) -> DataConfig:
    if s.get("full_data"):
        sizes: tuple = (None, None, None)
    elif "sizes" in s:
        sizes = s["sizes"]
    else:
        sizes = OFFLINE_SIZES.get(dataset, (1000, 500, 2000))
    sizes = tuple(e if e is not None else d for e, d in zip(s["explicit_sizes"], sizes,
                                                            strict=True))
    return DataConfig(model=s["model"], dataset=dataset, data_root=args.data_root,
                      download=bool(s.get("download")), image_size=s["image_size"],
                      train_size=sizes[0], val_size=sizes[1], test_size=sizes[2])


def _scale(values: tuple | None) -> SearchScale | None:
    if values is None:
        return None
    if len(values) != 5:
        raise BioTuneError("a search scale is POP,GEN,ELITE,SEEDS,EPOCHS (five integers)")
    pop, gen, elite, seeds, epochs = values
    return SearchScale(population=pop, generations=gen, elite=elite,
                       seeds=tuple(range(seeds)), epochs=epochs)


def summary_table(rows: list[dict], datasets: list[str]) -> str:
    """Methods x datasets, test top-1 mean +- std (%): the table the README quotes."""
    lines = ["| method | " + " | ".join(datasets) + " |", "|" + "---|" * (len(datasets) + 1)]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for m in methods:
        cells = []
        for d in datasets:
            r = next((r for r in rows if r["method"] == m and r["dataset"] == d), None)
            cells.append(
                f"{100 * r['test_top1']['mean']:.1f} +- {100 * r['test_top1']['std']:.1f} "
                f"({r['trainable_pct']:.1f}%)" if r else ""
            )
        lines.append(f"| {LABELS.get(m, m)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _log(dataset: str, message: str) -> None:
    print(f"{dataset}: {message}", file=sys.stderr, flush=True)


def run_dataset(task: dict) -> tuple[list[dict], float]:
    """One dataset's comparison (in a worker process when --jobs > 1)."""
    torch.set_num_threads(task["threads"])
    start = time.perf_counter()
    rows = compare(task["methods"], task["data"], task["config"], task["seeds"],
                   task["lr_grid"], task["work"], scales=task["scales"],
                   meta={"command": task["command"]},
                   log=functools.partial(_log, task["data"].dataset))
    return rows, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    s = settings(args)
    command = "python " + " ".join(["benchmarks/accuracy/run.py", *(argv or sys.argv[1:])])
    key = hashlib.sha1(json.dumps(s, sort_keys=True, default=str).encode()).hexdigest()[:8]
    work = Path(args.work) / key
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "accuracy-quick" if args.quick else ("accuracy-paper" if args.paper else "accuracy")
    config = TrainConfig(epochs=s["epochs"], patience=s["patience"], batch_size=s["batch_size"],
                         eval_batch_size=s["eval_batch_size"])
    scales = {m: sc for m, sc in (("biotune-paper", _scale(s.get("paper_scale"))),
                                  ("biotune", _scale(s.get("biotune_scale")))) if sc}
    gpu = torch.cuda.is_available()
    jobs = max(1, min(args.jobs or (1 if gpu else 2), len(s["datasets"])))
    threads = args.threads or max(1, (os.cpu_count() or 1) // jobs)
    tasks = [
        {"data": data_config(s, d, args), "methods": s["methods"], "config": config,
         "seeds": s["seeds"], "lr_grid": s["lr_grid"], "work": work / d, "scales": scales,
         "command": command, "threads": threads}
        for d in s["datasets"]
    ]
    start = time.perf_counter()
    if jobs == 1:
        results = [run_dataset(t) for t in tasks]
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(jobs, mp_context=context) as pool:
            results = list(pool.map(run_dataset, tasks))
    total = time.perf_counter() - start
    rows = [r for dataset_rows, _ in results for r in dataset_rows]
    per_dataset = {
        t["data"].dataset: {"seconds": sec, "data": asdict(t["data"])}
        for t, (_, sec) in zip(tasks, results, strict=True)
    }
    for d in s["datasets"]:
        shutil.copyfile(work / d / "compare.png", out / f"{name}-{d}.png")
    machine = machine_description()
    date = time.strftime("%Y-%m-%d %H:%M")
    notes = json.loads((work / s["datasets"][0] / "compare.json").read_text())["notes"]
    parallel = f"{jobs} dataset(s) at a time, {threads} torch thread(s) each"
    result = {
        "benchmark": "accuracy", "date": date, "machine": machine, "command": command,
        "seconds": total, "parallel": parallel, "settings": s, "train": config.to_dict(),
        "datasets": per_dataset, "notes": notes, "rows": rows,
    }
    (out / f"{name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    md = [
        f"# Accuracy: BioTune against the baselines ({s['model']})", "",
        f"- date: {date}", f"- machine: {machine}", f"- command: `{command}`",
        f"- total wall time: {total / 60:.1f} min ({parallel})", "",
        "Test top-1 accuracy (%), mean +- std over seeds, and (trainable parameters %):", "",
        summary_table(rows, s["datasets"]),
        "Full table (wall seconds per method include its lr grid and, for BioTune, its search):",
        "", markdown_table(rows, with_dataset=True),
        *[f"- {n}" for n in notes], "",
        "Plots: " + ", ".join(f"`{name}-{d}.png`" for d in s["datasets"]), "",
    ]
    (out / f"{name}.md").write_text("\n".join(md))
    print(summary_table(rows, s["datasets"]))
    print(f"total {total / 60:.1f} min; written {out / (name + '.md')} and .json")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BioTuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
