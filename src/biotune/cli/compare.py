"""``biotune compare``: its options, read back into the comparison's settings (``biotune.compare``
does the comparison)."""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

from biotune import baselines, presets
from biotune.cli._fields import add_field_options, cli_fields, field_changes, floats
from biotune.cli._options import (
    add_data_options,
    add_machine_options,
    add_quiet_option,
    add_seed_options,
    add_training_options,
    data_config,
    seeds_from,
    seeds_text,
    train_config,
    use_machine,
)
from biotune.compare import (
    ALL_METHODS,
    BIOTUNE_PRESETS,
    DEFAULT_LR_GRID,
    DEFAULT_METHODS,
    DEFAULT_SEEDS,
    OUTPUTS,
    ROWS,
    RUNS,
    SearchScale,
    compare,
    markdown_table,
)

#: Prefix of each BioTune method's scaling options (--paper-population, ...).
SCALE_FLAGS = {"biotune": "biotune", "biotune-paper": "paper"}
#: The training recipe's options: the learning rate is chosen from --lr-grid instead.
RECIPE = ("epochs", "patience", "min_epochs_share", "batch_size", "optimizer")


def _float_list(text: str) -> tuple[float, ...]:
    values = floats(text)
    if any(not (v > 0 and math.isfinite(v)) for v in values):
        raise argparse.ArgumentTypeError(f"expected positive learning rates, got {text!r}")
    return values


def _method_list(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in ALL_METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown method(s) {', '.join(unknown) or repr(text)}; "
            f"choose from {', '.join(ALL_METHODS)}"
        )
    return names


def add_compare_parser(subparsers: Any) -> argparse.ArgumentParser:
    """``biotune compare``: sets ``func=cmd_compare``; help texts quote the real defaults."""
    from biotune.presets import FINAL_TRAINING

    p = subparsers.add_parser(
        "compare",
        help="compare BioTune with the baselines on one dataset and model",
        description="Run several methods with the same splits, the same training recipe and "
        "the same learning-rate grid (chosen per method on validation), over several seeds; "
        "write a table (markdown, CSV, JSON) and a plot of accuracy against trainable "
        "parameters. BioTune rows search a plan first and report the search's cost. Each "
        f"finished training run is kept in OUT/{RUNS}/METHOD/ and each finished method's row in "
        f"OUT/{ROWS}/METHOD.json: the same command run again skips them and refuses results "
        "made with other settings.",
    )
    p.add_argument(
        "--methods",
        type=_method_list,
        default=list(DEFAULT_METHODS),
        help=f"comma-separated, from {','.join(ALL_METHODS)} (default: all but "
        "biotune-paper, the paper's whole protocol: 170 evaluations x 3 seeds of up to 30 "
        "epochs; its --paper-* options scale it down)",
    )
    add_seed_options(p, "", "seeds of the final runs", seeds_text({"": DEFAULT_SEEDS}))
    p.add_argument(
        "--lr-grid",
        type=_float_list,
        default=DEFAULT_LR_GRID,
        help="base learning rates to choose from on validation (default "
        f"{','.join(f'{lr:g}' for lr in DEFAULT_LR_GRID)})",
    )
    p.add_argument(
        "--out",
        help="output folder (default runs/compare-DATASET-MODEL-TIME); finished methods, "
        "training runs and BioTune searches found there are kept",
    )
    add_quiet_option(p)
    add_data_options(p)
    add_training_options(
        p,
        "",
        "training recipe (the same for every method)",
        {"default": FINAL_TRAINING},
        names=RECIPE,
    )
    add_machine_options(p, augment="every method's training runs (not the BioTune searches)")
    g = p.add_argument_group("baseline options")
    add_field_options(
        g,
        baselines.BaselineOptions,
        cli_fields(baselines.BaselineOptions),
        {"": baselines.DEFAULTS},
    )
    for method, flag in SCALE_FLAGS.items():
        name = BIOTUNE_PRESETS[method]
        preset = SearchScale.of(presets.preset(name))
        g = p.add_argument_group(f"scaling of the '{name}' search ({method})")
        add_field_options(g, SearchScale, cli_fields(SearchScale), {"": preset}, f"{flag}-")
        add_seed_options(g, f"{flag}-", "seeds per evaluation", seeds_text({"": preset.seeds}))
    p.set_defaults(func=cmd_compare)
    return p


def scales_from_args(args: argparse.Namespace) -> dict[str, SearchScale]:
    """The scaling options given for each BioTune method (``compare.SearchScale`` fields)."""
    scales = {}
    for method, flag in SCALE_FLAGS.items():
        scale = SearchScale(
            **field_changes(args, SearchScale, prefix=f"{flag}-"),
            seeds=seeds_from(args, f"{flag}-"),
        )
        if scale.describe():
            scales[method] = scale
    return scales


def options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The baseline options given on the command line (``baselines.BaselineOptions`` fields)."""
    return field_changes(args, baselines.BaselineOptions)


def cmd_compare(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from biotune.presets import FINAL_TRAINING
    from biotune.runner.config import DataConfig

    data = data_config(args, DataConfig())
    config = train_config(args, "", FINAL_TRAINING)
    if args.augment:
        config = replace(config, augment=True)
    use_machine(args)
    out = (
        Path(args.out)
        if args.out
        else Path("runs")
        / (f"compare-{Path(data.dataset).name}-{data.model}-{time.strftime('%Y%m%d-%H%M%S')}")
    )
    rows = compare(
        args.methods,
        data,
        config,
        seeds_from(args) or DEFAULT_SEEDS,
        args.lr_grid,
        out,
        scales=scales_from_args(args),
        options=options_from_args(args),
        meta={"command": " ".join(["biotune", *sys.argv[1:]])},
        progress=not args.quiet,
    )
    print(markdown_table(rows))
    print("written: " + ", ".join(str(out / name) for name in OUTPUTS))
    return 0
