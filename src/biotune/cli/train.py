"""``biotune train``: fine-tune a model under a given plan on the whole training split, test it."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from biotune.cli._options import (
    FROM_PLAN,
    add_data_options,
    add_machine_options,
    add_quiet_option,
    add_seed_options,
    add_training_options,
    check_writable,
    data_config,
    seeds_from,
    seeds_text,
    train_config,
    use_machine,
)
from biotune.cli.search import print_final
from biotune.errors import BioTuneError

#: Seeds of ``biotune train`` when none are given.
TRAIN_SEEDS = (0, 1, 2)


def add_train_parser(sub: Any) -> argparse.ArgumentParser:
    """``biotune train``: sets ``func=cmd_train``; help texts quote the final-training recipe."""
    from biotune.presets import FINAL_TRAINING

    t = sub.add_parser(
        "train",
        help="train a given plan and test it",
        description="Fine-tune a model under a plan (a JSON file, e.g. a run's "
        "best_plan.json, or 'full' / 'head') on the whole training split, test it. "
        "The plan and --out are checked before any training.",
    )
    t.add_argument("--plan", required=True, help="plan JSON file, 'full' or 'head'")
    add_seed_options(t, "", "seeds", seeds_text({"default": TRAIN_SEEDS}))
    t.add_argument("--out", help="write the results as JSON here")
    t.add_argument(
        "--save",
        metavar="DIR",
        help="save the fine-tuned model (the seed best on validation) in DIR: "
        "model.safetensors and finetuned.json, for biotune predict",
    )
    add_data_options(t, from_plan=True)
    add_training_options(
        t, "", "training", {"default": FINAL_TRAINING}, notes={"base_lr": FROM_PLAN}
    )
    add_quiet_option(t)
    add_machine_options(t, augment="the training")
    t.set_defaults(func=cmd_train)
    return t


def _plan_origin(path: str) -> Any:
    """Where a best_plan.json came from (a ``PlanOrigin``; None for a bare plan file), checked
    like the plan itself; the plan was read already, so the file is readable JSON."""
    from biotune.runner.config import PlanOrigin

    raw = json.loads(Path(path).read_text())
    if "origin" not in raw:
        return None
    try:
        return PlanOrigin.from_dict(raw["origin"])
    except BioTuneError as exc:
        raise BioTuneError(f"plan {path}: {exc}") from None


def cmd_train(args: argparse.Namespace) -> int:
    from biotune.callbacks import emit
    from biotune.core.plan import FineTunePlan
    from biotune.presets import FINAL_TRAINING
    from biotune.progress import TrainingProgress
    from biotune.runner.config import DataConfig
    from biotune.runner.final import final_training_run, save_model, summarize_final
    from biotune.runner.rundir import write_json_atomic
    from biotune.runner.workbench import architecture_blocks, partition_record, prepare

    # Everything that can be refused is checked before the data are loaded or a model trains.
    plan = None if args.plan in ("full", "head", "linear") else FineTunePlan.load(args.plan)
    origin = _plan_origin(args.plan) if plan is not None else None
    out = Path(args.out) if args.out else None
    if out is not None:
        check_writable(out, "--out")
    save = Path(args.save) if args.save else None
    if save is not None:
        check_writable(save / "finetuned.json", "--save")
    base_data = origin.data if origin and origin.data else DataConfig()
    if base_data.dataset.startswith("user:") and not args.dataset:
        raise BioTuneError(
            f"plan {args.plan} was searched on data given in Python "
            f"({base_data.dataset}): name the data with --dataset"
        )
    if base_data.model.startswith("user:") and not args.model:
        raise BioTuneError(
            f"plan {args.plan} was searched on a model given in Python "
            f"({base_data.model}): name a model with --model"
        )
    base_train = FINAL_TRAINING
    if origin and origin.base_lr and getattr(args, "lr", None) is None:
        base_train = replace(FINAL_TRAINING, base_lr=origin.base_lr)
    config = train_config(args, "", base_train)
    if args.augment:
        config = replace(config, augment=True)
    use_machine(args)
    seeds = seeds_from(args) or TRAIN_SEEDS
    data = data_config(args, base_data)
    if origin:
        print(
            f"from the plan: model {data.model}, dataset {data.dataset}, base lr "
            f"{config.base_lr:g} (options given override them)",
            file=sys.stderr,
        )
    if plan is not None:  # before the data load, and before weights are downloaded
        plan.check_fits(architecture_blocks(data), source=f"plan {args.plan}")
    bench = prepare(data)
    print(f"data: {bench.splits.describe()}", file=sys.stderr)
    names = bench.partition.names
    if plan is not None:
        plan.check_fits(bench.partition, source=f"plan {args.plan}")
        stored = origin.partition.fingerprint if origin and origin.partition else None
        if stored and stored != partition_record(bench)["fingerprint"]:
            searched_on = origin.data.model if origin.data else "unknown"
            raise BioTuneError(
                f"plan {args.plan} was made for other blocks of the same names "
                f"(model {searched_on}): its genes would "
                "steer other parameters; use the model it was searched on"
            )
    elif args.plan == "full":
        plan = FineTunePlan.full(names)
    else:
        plan = FineTunePlan.head_only(names)
    runs, best = [], None
    progress = [] if args.quiet else [TrainingProgress(config.metric, label="training")]
    try:
        for seed in seeds:
            model, run = final_training_run(
                bench, plan, config, seed, keep_model=True, callbacks=progress
            )
            runs.append(run)
            if best is None or run.val_balanced > best[1].val_balanced:
                best = (model, run)
    finally:
        emit(progress, "close")
    summary = summarize_final(runs, plan, bench)
    if out is not None:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(out, summary)
        except OSError as exc:
            raise BioTuneError(f"--out {out}: cannot write ({exc.strerror})") from None
    print(f"plan: {plan.describe()}")
    print_final(summary)
    if save is not None and best is not None:
        save_model(save, best[0], bench, data, plan, config, best[1])
        print(f"fine-tuned model (seed {best[1].seed}, the best on validation): {save}")
    return 0
