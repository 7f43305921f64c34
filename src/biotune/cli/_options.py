"""Option groups several commands share: seeds, model and data, a training recipe, the machine,
budgets; each with the function that reads it back into a config.

Options of config fields are generated (``_fields``); the few that do not map one to one onto
a field (``--native-size``, ``--full-data``, ``--blocks``, the seed lists, ``--device``,
``--threads``, ``--augment``) are written here, once each.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from biotune.cli._fields import add_field_options, apply_fields, positive_int
from biotune.errors import BioTuneError


def _seed_list(text: str) -> tuple[int, ...]:
    """'0,3,7' -> (0, 3, 7); '7' -> (7,): always the seeds themselves (a count is --num-seeds)."""
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected seeds as a comma-separated list (0,3,7) or one seed (7), got {text!r}"
        ) from None
    if not seeds:
        raise argparse.ArgumentTypeError(f"expected at least one seed, got {text!r}")
    if any(s < 0 for s in seeds):
        raise argparse.ArgumentTypeError(f"seeds must be >= 0, got {text!r}")
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"seeds repeat in {text!r}")
    return seeds


def add_seed_options(parser: Any, prefix: str, what: str, default: str = "") -> None:
    """``--{prefix}seeds 0,3,7`` (these seeds; ``7`` is the one seed 7) or
    ``--{prefix}num-seeds N`` (seeds 0 to N-1), never both; read back with ``seeds_from``.
    ``default`` says what is used when neither is given."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        f"--{prefix}seeds",
        type=_seed_list,
        metavar="S[,S...]",
        help=f"{what}: these seeds, e.g. 0,3,7 (a single number is one seed)"
        + (f" ({default})" if default else ""),
    )
    group.add_argument(
        f"--{prefix}num-seeds", type=positive_int, metavar="N", help=f"{what}: seeds 0 to N-1"
    )


def seeds_text(configs: Mapping[str, tuple[int, ...]]) -> str:
    """'default 0,1,2' or 'default preset: 0; paper preset: 0,1,2' for a help text."""
    texts = {label: ",".join(str(s) for s in seeds) for label, seeds in configs.items()}
    if len(set(texts.values())) == 1:
        return f"default {next(iter(texts.values()))}"
    return "; ".join(f"{label}: {t}" for label, t in texts.items())


def seeds_from(args: argparse.Namespace, prefix: str = "") -> tuple[int, ...] | None:
    """The seeds given by ``--{prefix}seeds`` or ``--{prefix}num-seeds`` (None: neither)."""
    attr = prefix.replace("-", "_")
    count = getattr(args, f"{attr}num_seeds", None)
    if count is not None:
        return tuple(range(count))
    return getattr(args, f"{attr}seeds", None)


def add_quiet_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--quiet", action="store_true", help="no progress bars or lines (warnings and errors only)"
    )


# -- model and data ---------------------------------------------------------------------------


#: What ``biotune train`` says of a default that a run's best_plan.json replaces.
FROM_PLAN = "; with a run's best_plan.json: the one it was searched with"


def add_data_options(p: argparse.ArgumentParser, from_plan: bool = False) -> None:
    """The ``DataConfig`` options, ``--native-size``, ``--full-data`` and ``--blocks``;
    ``from_plan``: the help says that a run's plan supplies the model and data."""
    from biotune.data import DEMO_SIZES
    from biotune.runner.config import DataConfig

    defaults = {"default": DataConfig()}
    plan = FROM_PLAN if from_plan else ""
    notes = {name: plan for name in ("model", "dataset", "image_size", "split_seed")}
    demo = {
        name: f"; the offline demo datasets: {size}{plan}"
        for name, size in zip(("train_size", "val_size", "test_size"), DEMO_SIZES, strict=True)
    }
    g = p.add_argument_group("model and data")
    add_field_options(
        g,
        DataConfig,
        ("model", "checkpoint", "pretrained", "dataset", "data_root", "download", "image_size"),
        defaults,
        notes=notes,
    )
    g.add_argument(
        "--native-size",
        action="store_true",
        help="the model's native input resolution, the offline demo datasets too (224 for "
        "EfficientNet-Lite0 and ResNet-50, 260 for Lite2): what a dataset other than the demos "
        "gets without --image-size",
    )
    add_field_options(g, DataConfig, ("train_size", "val_size", "test_size"), defaults, notes=demo)
    g.add_argument("--full-data", action="store_true", help="use the whole splits (no subsampling)")
    add_field_options(g, DataConfig, ("split_seed", "bad_images"), defaults, notes=notes)
    g.add_argument(
        "--blocks",
        metavar="FILE.json",
        help='your own block partition: {"block name": ["module prefix or regex", '
        "...], ...} in input-to-output order, the classifier last (default: the "
        "model family's blocks; see biotune blocks MODEL)",
    )


def data_config(args: argparse.Namespace, base: Any) -> Any:
    """``base`` (a ``DataConfig``) with the options of ``add_data_options`` applied."""
    config = apply_fields(args, base)
    changes: dict[str, Any] = {}
    if getattr(args, "native_size", False):
        from biotune.models import native_image_size

        changes["image_size"] = native_image_size(config.model)
    if getattr(args, "full_data", False):
        changes.update(train_size=None, val_size=None, test_size=None, full_data=True)
    if getattr(args, "blocks", None):
        from biotune.inputs import read_blocks

        changes["blocks"] = read_blocks(args.blocks)
    return replace(config, **changes)


# -- a training recipe ------------------------------------------------------------------------

#: The ``TrainConfig`` fields of a training recipe's options (``--epochs``, ``--lr``, ...).
RECIPE = ("epochs", "patience", "min_epochs_share", "batch_size", "base_lr", "optimizer")
#: The ``TrainConfig`` fields of the machine options: one switch for every training of a command.
MACHINE = ("precision", "channels_last")


def add_training_options(
    p: argparse.ArgumentParser,
    prefix: str,
    what: str,
    defaults: Mapping[str, Any],
    names: tuple[str, ...] = RECIPE,
    notes: Mapping[str, str] | None = None,
) -> None:
    """Options of one training recipe; ``defaults`` names the TrainConfigs their help quotes,
    ``notes`` adds to a field's default what only the command knows."""
    from biotune.training import TrainConfig

    add_field_options(p.add_argument_group(what), TrainConfig, names, defaults, prefix, notes)


def train_config(args: argparse.Namespace, prefix: str, base: Any) -> Any:
    """``base`` (a ``TrainConfig``) with its recipe options (``--{prefix}epochs``, ...) and the
    machine options applied."""
    return apply_fields(args, apply_fields(args, base, RECIPE, prefix), MACHINE)


# -- the machine ------------------------------------------------------------------------------


def add_machine_options(
    p: argparse.ArgumentParser, augment: str | None, eval_threads: bool = False
) -> None:
    """--device, --precision, --threads, --channels-last and (where ``augment`` says what it
    augments) --augment: the same switches for every command that trains; ``eval_threads``:
    the command has --eval-threads too (``biotune search``)."""
    from biotune.training import TrainConfig

    g = p.add_argument_group("device and precision")
    add_device_option(g, "train")
    add_field_options(g, TrainConfig, ("precision",), {"default": TrainConfig()})
    g.add_argument(
        "--threads",
        type=positive_int,
        help="torch CPU threads for training in this process (default: torch's choice, all "
        "cores)"
        + ("; the search's evaluations keep their own (--eval-threads)" if eval_threads else ""),
    )
    add_field_options(g, TrainConfig, ("channels_last",), {"default": TrainConfig()})
    if augment:
        g.add_argument(
            "--augment",
            action="store_true",
            default=None,
            help="random resized crops and flips, the torchvision/timm standard, "
            f"for {augment}; the feature cache is off for it",
        )


def add_device_option(p: Any, what: str) -> None:
    """--device, for every command that runs a model (``what``: train, classify, ...)."""
    from biotune.training import DEVICES

    p.add_argument(
        "--device",
        metavar="{" + ",".join(DEVICES) + "}",
        help=f"where to {what} (default auto: a CUDA GPU if there is one, else the CPU; "
        "or the BIOTUNE_DEVICE environment variable)",
    )


def use_machine(args: argparse.Namespace) -> None:
    """--device (checked now; worker processes inherit it) and --threads, for this process."""
    import torch

    from biotune.training import DEVICE_ENV, resolve_device

    device = args.device or os.environ.get(DEVICE_ENV)
    resolve_device(device)
    if args.device:
        os.environ[DEVICE_ENV] = args.device
    if args.threads:
        torch.set_num_threads(args.threads)


# -- budgets ----------------------------------------------------------------------------------


def add_budget_options(p: argparse.ArgumentParser, defaults: Mapping[str, Any]) -> None:
    """``--objective`` (an ``EvolutionConfig`` field), ``--max-trainable``, ``--max-memory``,
    ``--pareto-cost`` and ``--pareto-final``; ``defaults`` names the SearchConfigs their help
    quotes. ``search.search_config`` reads them back with the other fields of their configs."""
    from biotune.core.budget import BudgetConfig
    from biotune.core.evolution import EvolutionConfig

    g = p.add_argument_group("budget and trade-off (beyond the paper)")
    add_field_options(
        g, EvolutionConfig, ("objective",), {label: c.evolution for label, c in defaults.items()}
    )
    add_field_options(
        g,
        BudgetConfig,
        ("max_trainable", "max_memory_mb", "pareto_cost", "pareto_final"),
        {label: c.budget for label, c in defaults.items()},
    )


# -- output files -----------------------------------------------------------------------------


def check_writable(path: Path, option: str) -> None:
    """Refuse an output file that cannot be written, before any work is done for it."""
    if path.is_dir():
        raise BioTuneError(f"{option} {path}: is a directory, not a file")
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise BioTuneError(f"{option} {path}: cannot write there ({folder} is not a directory)")
    try:  # a nameless probe file: the OS says why (read-only file system, permission, space)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        raise BioTuneError(f"{option} {path}: cannot write in {folder} ({reason})") from None


def write_text(path: Path, text: str, option: str) -> None:
    """Write an output file whole or not at all (its missing folders made), or say why not."""
    from biotune.runner.rundir import write_text_atomic

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, text)
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        raise BioTuneError(f"{option} {path}: cannot write ({reason})") from None
