"""The ``biotune`` command line: search, train, blocks, compare, report.

Every user error is a :class:`BioTuneError`: one line on stderr, exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from biotune.errors import BioTuneError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
#: Seeds of ``biotune train`` when none are given.
TRAIN_SEEDS = (0, 1, 2)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


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
    group.add_argument(f"--{prefix}seeds", type=_seed_list, metavar="S[,S...]",
                       help=f"{what}: these seeds, e.g. 0,3,7 (a single number is one seed)"
                       + (f" ({default})" if default else ""))
    group.add_argument(f"--{prefix}num-seeds", type=_positive_int, metavar="N",
                       help=f"{what}: seeds 0 to N-1")


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


def _fraction(text: str) -> float:
    """'0.5' or '1/2' -> 0.5; SearchProtocol checks that it is 1/k."""
    try:
        if "/" in text:
            num, den = text.split("/")
            return int(num) / int(den)
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(
            f"expected a share such as 0.5 or 1/3, got {text!r}"
        ) from None


def _add_data_options(p: argparse.ArgumentParser) -> None:
    from biotune.data import DEMO_SIZES
    from biotune.runner.config import DataConfig

    d = DataConfig()  # the defaults the help quotes
    g = p.add_argument_group("model and data")
    g.add_argument("--model", help="model name: efficientnet_lite0/1/2 (offline ImageNet weights), "
                   "a torchvision name (resnet50, densenet121, ...; 'tv:' prefix optional) or "
                   f"'timm:NAME' (default: {d.model})")
    g.add_argument("--checkpoint", help="load the model's weights from this state-dict file")
    g.add_argument("--no-pretrained", dest="pretrained", action="store_false", default=None,
                   help="start from random weights instead of pretrained ones")
    g.add_argument("--dataset", help="offline: animal-shape, mnist-5k, digits, textures; "
                   "torchvision: flowers102, fgvc-aircraft, dtd, cifar10, stl10, mnist, usps, "
                   "svhn; or a folder with one sub-folder of images per class "
                   f"(default: {d.dataset})")
    g.add_argument("--data-root", help="where torchvision datasets live or are downloaded to")
    g.add_argument("--download", action="store_true", default=None,
                   help="download torchvision datasets (needs internet)")
    g.add_argument("--image-size", type=_positive_int,
                   help=f"image side in pixels (default {d.image_size}; --native-size for the "
                   "model's own)")
    g.add_argument("--native-size", action="store_true",
                   help="use the model's native input resolution (224 for ResNet-50)")
    demo = "; the offline demo datasets: {}"
    g.add_argument("--train-size", type=_positive_int,
                   help="use at most this many training images, a stratified subsample "
                   "(default: all" + demo.format(DEMO_SIZES[0]) + ")")
    g.add_argument("--val-size", type=_positive_int,
                   help="at most this many validation images (default: all"
                   + demo.format(DEMO_SIZES[1]) + ")")
    g.add_argument("--test-size", type=_positive_int,
                   help="at most this many test images (default: all"
                   + demo.format(DEMO_SIZES[2]) + ")")
    g.add_argument("--full-data", action="store_true",
                   help="use the whole splits (no subsampling)")
    g.add_argument("--split-seed", type=int,
                   help=f"seed of the train/val/test split (default {d.split_seed})")
    g.add_argument("--bad-images", choices=["skip", "error"],
                   help="unreadable image files in a folder dataset (every image is decoded "
                   "when the folder is scanned): skip them with a warning (default) or stop "
                   "with an error")
    g.add_argument("--blocks", metavar="FILE.json",
                   help='your own block partition: {"block name": ["module prefix or regex", '
                   '...], ...} in input-to-output order, the classifier last (default: the '
                   "model family's blocks; see biotune blocks MODEL)")


def defaults_text(field: str, defaults: Mapping[str, Any]) -> str:
    """' (default 8)' or ' (default preset: 2; paper preset: 30)', read from the configs."""
    values = {label: getattr(config, field) for label, config in defaults.items()}
    if len(set(values.values())) == 1:
        return f" (default {next(iter(values.values()))})"
    return " (" + "; ".join(f"{label}: {v}" for label, v in values.items()) + ")"


def _add_training_options(
    p: argparse.ArgumentParser, prefix: str, what: str, defaults: Mapping[str, Any]
) -> None:
    """Options of one training recipe; ``defaults`` names the TrainConfigs their help quotes."""
    g = p.add_argument_group(what)
    g.add_argument(f"--{prefix}epochs", type=_positive_int,
                   help="maximum epochs" + defaults_text("epochs", defaults))
    g.add_argument(f"--{prefix}patience", type=int, help="early stopping: epochs in a row "
                   "without a new best validation score before stopping"
                   + defaults_text("patience", defaults))
    g.add_argument(f"--{prefix}batch-size", type=_positive_int,
                   help="training batch size" + defaults_text("batch_size", defaults))
    g.add_argument(f"--{prefix}lr", type=float, help="base learning rate (a block's lr is this "
                   "times its multiplier)" + defaults_text("base_lr", defaults))
    g.add_argument(f"--{prefix}optimizer", choices=["adam", "adamw", "sgd"],
                   help="optimizer" + defaults_text("optimizer", defaults))


def add_machine_options(p: argparse.ArgumentParser, augment: str | None) -> None:
    """--device, --precision, --threads, --channels-last and (where ``augment`` says what it
    augments) --augment: the same switches for every command that trains."""
    from biotune.training import DEVICES, PRECISIONS

    g = p.add_argument_group("device and precision")
    g.add_argument("--device", metavar="{" + ",".join(DEVICES) + "}",
                   help="where to train (default auto: a CUDA GPU if there is one, else the CPU; "
                   "or the BIOTUNE_DEVICE environment variable)")
    g.add_argument("--precision", choices=PRECISIONS,
                   help="auto (default): float32 on the CPU; on a GPU bfloat16 where it runs "
                   "natively (compute capability 8.0+), else float16 with loss scaling; 32: "
                   "float32 everywhere")
    g.add_argument("--threads", type=_positive_int,
                   help="torch CPU threads for training in this process (default: torch's "
                   "choice, all cores); a search's evaluations keep their own (--eval-threads)")
    g.add_argument("--channels-last", action="store_true", default=None,
                   help="channels-last memory format: 1.45x to 1.66x faster CPU training steps "
                   "for EfficientNet-Lite0, but results differ in float rounding from the default")
    if augment:
        g.add_argument("--augment", action="store_true", default=None,
                       help="random resized crops and flips, the torchvision/timm standard, "
                       f"for {augment}; the feature cache is off for it")


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


def _data_config(args: argparse.Namespace, base: Any) -> Any:
    changes: dict[str, Any] = {}
    for name in ("model", "checkpoint", "pretrained", "dataset", "data_root", "download",
                 "image_size", "train_size", "val_size", "test_size", "split_seed", "bad_images"):
        value = getattr(args, name, None)
        if value is not None:
            changes[name] = value
    if getattr(args, "native_size", False):
        changes["image_size"] = None
    if getattr(args, "full_data", False):
        changes.update(train_size=None, val_size=None, test_size=None, full_data=True)
    if getattr(args, "blocks", None):
        from biotune.inputs import read_blocks

        changes["blocks"] = read_blocks(args.blocks)
    return replace(base, **changes)


def _train_config(args: argparse.Namespace, prefix: str, base: Any) -> Any:
    changes: dict[str, Any] = {}
    for field, attr in (("epochs", "epochs"), ("patience", "patience"),
                        ("batch_size", "batch_size"), ("base_lr", "lr"),
                        ("optimizer", "optimizer")):
        value = getattr(args, prefix + attr, None)
        if value is not None:
            changes[field] = value
    for field in ("precision", "channels_last"):  # one switch for every training of a command
        if getattr(args, field, None) is not None:
            changes[field] = getattr(args, field)
    return replace(base, **changes)


def _search_config(args: argparse.Namespace, base: Any) -> Any:
    from biotune.runner.fitness import PruneConfig

    evo = base.evolution
    evo_changes = {k: getattr(args, k) for k in ("population", "generations", "elite")
                   if getattr(args, k) is not None}
    if "population" in evo_changes:
        evo_changes["population_size"] = evo_changes.pop("population")
    if args.children_batch is not None:
        evo_changes["children_batch"] = args.children_batch or None
    if args.anchors is not None:
        evo_changes["anchors"] = args.anchors
    if args.initial_size is not None:
        evo_changes["initial_size"] = args.initial_size
    protocol = base.protocol
    proto_changes: dict[str, Any] = {}
    if args.data_fraction is not None:
        proto_changes["data_fraction"] = args.data_fraction
    if seeds_from(args) is not None:
        proto_changes["seeds"] = seeds_from(args)
    proto_changes["train"] = _train_config(args, "", protocol.train)
    for option, name in (("cache", "cache_features"), ("cache_budget_mb", "cache_budget_mb"),
                         ("memoize", "memoize"), ("eval_threads", "cpu_threads")):
        if getattr(args, option) is not None:
            proto_changes[name] = getattr(args, option)
    if args.prune is False:
        proto_changes["prune"] = None
    elif args.prune or args.prune_quantile is not None:
        prune = protocol.prune or PruneConfig()
        if args.prune_quantile is not None:
            prune = replace(prune, quantile=args.prune_quantile)
        proto_changes["prune"] = prune
    changes: dict[str, Any] = {
        "data": _data_config(args, base.data),
        "evolution": replace(evo, **evo_changes),
        "protocol": replace(protocol, **proto_changes),
        "final": replace(_train_config(args, "final_", base.final),
                         **({"augment": True} if args.augment else {})),
    }
    if seeds_from(args, "final-") is not None:
        changes["final_seeds"] = seeds_from(args, "final-")
    if args.seed is not None:
        changes["seed"] = args.seed
    from biotune.core.budget import budget_options

    return budget_options(args, replace(base, **changes))


def _print_final(final: dict[str, Any]) -> None:
    t1, bal = final["test_top1"], final["test_balanced"]
    print(f"test top-1 {t1['mean']:.4f} +- {t1['std']:.4f} | balanced {bal['mean']:.4f} +- "
          f"{bal['std']:.4f} | {len(final['runs'])} seeds | trainable "
          f"{100 * final['trainable_share']:.1f}% of parameters")


def _check_resume_options(args: argparse.Namespace) -> None:
    """--resume continues a search with its stored configuration, in its own directory."""
    if args.run_dir and Path(args.run_dir).resolve() != Path(args.resume).resolve():
        raise BioTuneError(
            f"--resume {args.resume} continues the search in that directory; --run-dir "
            f"{args.run_dir} names another (drop --run-dir)"
        )
    if args.preset is not None:
        raise BioTuneError(
            f"--preset does not apply with --resume: the configuration stored in {args.resume} "
            "decides (drop --preset)"
        )


def _interrupted(run_dir: Path, created: bool) -> None:
    """After Ctrl-C: how to resume, only if there is a search to resume; else tidy up."""
    from biotune.runner.rundir import CONFIG, LOCK

    if (run_dir / CONFIG).exists():
        print(f"\ninterrupted: every finished evaluation is saved; resume with\n"
              f"  biotune search --resume {run_dir}", file=sys.stderr)
        return
    if created:  # this call made the directory and nothing was recorded: leave no debris
        with contextlib.suppress(OSError):
            if all(p.name == LOCK for p in run_dir.iterdir()):
                (run_dir / LOCK).unlink(missing_ok=True)
                run_dir.rmdir()
    print("\ninterrupted before the search started: nothing to resume", file=sys.stderr)


def cmd_search(args: argparse.Namespace) -> int:
    from biotune.callbacks import CSVLogger, TensorBoardLogger
    from biotune.presets import preset
    from biotune.progress import SearchProgress
    from biotune.reports import score_name
    from biotune.runner.config import SearchConfig
    from biotune.runner.rundir import CONFIG, RunDirectory
    from biotune.runner.search import Search

    if args.resume:
        _check_resume_options(args)
        run = RunDirectory(args.resume)
        stored = run.read(CONFIG) if run.exists() else None
        if stored is None:
            raise BioTuneError(f"--resume {args.resume}: no search found in that directory")
        base = SearchConfig.from_dict(stored["search"])
        run_dir = Path(args.resume)
    else:
        base = preset(args.preset or "default")
        run_dir = Path(args.run_dir) if args.run_dir else None
    config = _search_config(args, base)
    use_machine(args)
    if args.device and args.device.startswith("cuda:") and args.executor != "inprocess":
        raise BioTuneError(f"--device {args.device} picks one GPU for this process; --executor "
                           f"{args.executor} gives each worker a GPU of its own (use --device "
                           "cuda or auto)")
    if run_dir is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = Path("runs") / f"{Path(config.data.dataset).name}-{config.data.model}-{stamp}"
    logging.getLogger("biotune").info(f"run directory: {run_dir}")
    metric = config.protocol.train.metric
    created = not run_dir.exists()
    loggers: list[Any] = [CSVLogger(run_dir / "logs")]
    if args.log == "tensorboard":
        loggers.append(TensorBoardLogger(run_dir / "logs" / "tensorboard"))
    try:
        search = Search(
            config, run_dir, progress=None if args.quiet else SearchProgress(metric=metric),
            callbacks=loggers,
            executor=args.executor, workers=args.workers, ray_address=args.ray_address,
        )
        result = search.run_search(resume=bool(args.resume), final=not args.no_final)
    except KeyboardInterrupt:
        _interrupted(run_dir, created)
        return EXIT_INTERRUPTED
    print(f"best plan (validation {score_name(metric)} {1 - result.best_fitness:.4f} on the last "
          f"generation's fold): {result.best_plan.describe()}")
    summary = json.loads((run_dir / "search_summary.json").read_text())
    cost = summary["cost"]
    print(f"search: {cost['evaluations']} evaluations, {cost['seconds']:.0f}s of training, "
          f"{cost['ft_equivalents']:.2f} FT-equivalents")
    if result.final:
        _print_final(result.final)
    if result.pareto:
        from biotune.reports import pareto_table

        print(pareto_table(result.pareto))
        print(f"front: {run_dir / 'pareto.json'}, {run_dir / 'pareto.png'}")
    print(f"plan: {run_dir / 'best_plan.json'}")
    if result.final and result.final.get("model"):
        print(f"fine-tuned model (seed {result.final['model']['seed']}, the best on validation): "
              f"{run_dir / 'model.safetensors'}; use it with: biotune predict {run_dir} IMAGES")
    return 0


def _check_writable(path: Path, option: str) -> None:
    """Refuse an output file that cannot be written, before any work is done for it."""
    if path.is_dir():
        raise BioTuneError(f"{option} {path}: is a directory, not a file")
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise BioTuneError(f"{option} {path}: cannot write there ({folder} is not a directory)")
    if not os.access(folder, os.W_OK | os.X_OK):  # the file is written next to it, then moved
        raise BioTuneError(f"{option} {path}: cannot write in {folder} (permission denied)")


def _plan_origin(path: str) -> dict[str, Any]:
    """What a best_plan.json says about where it came from (empty for a bare plan file)."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return raw.get("origin", {}) if isinstance(raw, dict) else {}


def cmd_train(args: argparse.Namespace) -> int:
    from biotune.callbacks import emit
    from biotune.core.plan import FineTunePlan
    from biotune.presets import FINAL_TRAINING
    from biotune.progress import TrainingProgress
    from biotune.runner.config import DataConfig
    from biotune.runner.final import final_training_run, save_model, summarize_final
    from biotune.runner.rundir import write_json_atomic
    from biotune.runner.workbench import partition_record, prepare

    # Everything that can be refused is checked before the data are loaded or a model trains.
    plan = None if args.plan in ("full", "head", "linear") else FineTunePlan.load(args.plan)
    origin = _plan_origin(args.plan) if plan is not None else {}
    out = Path(args.out) if args.out else None
    if out is not None:
        _check_writable(out, "--out")
    save = Path(args.save) if args.save else None
    if save is not None:
        _check_writable(save / "finetuned.json", "--save")
    base_data = DataConfig(**origin["data"]) if origin.get("data") else DataConfig()
    if base_data.dataset.startswith("user:") and not args.dataset:
        raise BioTuneError(f"plan {args.plan} was searched on data given in Python "
                           f"({base_data.dataset}): name the data with --dataset")
    if base_data.model.startswith("user:") and not args.model:
        raise BioTuneError(f"plan {args.plan} was searched on a model given in Python "
                           f"({base_data.model}): name a model with --model")
    base_train = FINAL_TRAINING
    if origin.get("base_lr") and getattr(args, "lr", None) is None:
        base_train = replace(FINAL_TRAINING, base_lr=float(origin["base_lr"]))
    config = _train_config(args, "", base_train)
    if args.augment:
        config = replace(config, augment=True)
    use_machine(args)
    seeds = seeds_from(args) or TRAIN_SEEDS
    data = _data_config(args, base_data)
    if origin:
        print(f"from the plan: model {data.model}, dataset {data.dataset}, base lr "
              f"{config.base_lr:g} (options given override them)", file=sys.stderr)
    bench = prepare(data)
    print(f"data: {bench.splits.describe()}", file=sys.stderr)
    names = bench.partition.names
    if plan is not None:
        plan.check_fits(bench.partition, source=f"plan {args.plan}")
        stored = origin.get("partition", {}).get("fingerprint")
        if stored and stored != partition_record(bench)["fingerprint"]:
            raise BioTuneError(f"plan {args.plan} was made for other blocks of the same names "
                               f"(model {origin.get('data', {}).get('model')}): its genes would "
                               "steer other parameters; use the model it was searched on")
    elif args.plan == "full":
        plan = FineTunePlan.full(names)
    else:
        plan = FineTunePlan.head_only(names)
    runs, best = [], None
    progress = [] if args.quiet else [TrainingProgress(config.metric, label="training")]
    try:
        for seed in seeds:
            model, run = final_training_run(bench, plan, config, seed, keep_model=True,
                                            callbacks=progress)
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
    _print_final(summary)
    if save is not None and best is not None:
        save_model(save, best[0], bench, data, plan, config, best[1])
        print(f"fine-tuned model (seed {best[1].seed}, the best on validation): {save}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import csv

    from biotune.finetuned import image_files, load_finetuned, predict_files

    finetuned = load_finetuned(args.model_dir)
    files = image_files(args.images)
    rows = predict_files(finetuned, files)
    if args.csv:
        out = Path(args.csv)
        _check_writable(out, "--csv")
        with open(out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["file", "class", "index", "probability"])
            writer.writeheader()
            writer.writerows(rows)
        print(f"{len(rows)} predictions written to {out}", file=sys.stderr)
    else:
        for r in rows:
            print(f"{r['file']}\t{r['class']}\t{r['probability']:.4f}")
    return 0


def cmd_blocks(args: argparse.Namespace) -> int:
    from biotune.blocks import describe_blocks, partition_blocks
    from biotune.models import load_model

    loaded = load_model(args.model, num_classes=args.num_classes, pretrained=False)
    print(f"{loaded.name} ({args.num_classes}-class head)")
    print(describe_blocks(partition_blocks(loaded.model)))
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (which option, what was expected), exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _preset_help() -> str:
    from biotune.presets import paper

    c = paper()
    return (f"'default': our cheap search; 'paper': the paper's protocol (population "
            f"{c.evolution.population_size}, {c.evolution.generations} generations, "
            f"{len(c.protocol.seeds)} seeds, up to {c.protocol.train.epochs} epochs); "
            "default: 'default'")


def build_parser() -> argparse.ArgumentParser:
    from biotune.presets import FINAL_TRAINING, default, paper

    parser = _Parser(
        prog="biotune",
        description="Evolutionary selective fine-tuning (BioTune): search which blocks of a "
        "pretrained image classifier to fine-tune and at what learning rate.",
    )
    from biotune import __version__

    parser.add_argument("--version", action="version", version=f"biotune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    presets = {"default preset": default(), "paper preset": paper()}

    s = sub.add_parser("search", help="search a fine-tuning plan, then train and test it",
                       description="Search a fine-tuning plan with the evolutionary algorithm, "
                       "train the best plan on the whole training split with several seeds and "
                       "test it once. With no options: EfficientNet-Lite0 (offline ImageNet "
                       "weights) on Animal-Shape.")
    s.add_argument("--preset", choices=["default", "paper"], help=_preset_help())
    s.add_argument("--run-dir", help="where records go (default runs/DATASET-MODEL-TIME)")
    s.add_argument("--resume", metavar="RUN_DIR",
                   help="continue an interrupted search in RUN_DIR with the configuration stored "
                   "there (--preset is refused; other options must match it; --run-dir, if "
                   "given, must be RUN_DIR)")
    s.add_argument("--seed", type=int, help="seed of the evolution and the folds (default 0)")
    s.add_argument("--no-final", action="store_true",
                   help="stop after the search, without training the best plan")
    s.add_argument("--quiet", action="store_true",
                   help="no progress bars or lines (warnings and errors only)")
    s.add_argument("--log", choices=["csv", "tensorboard"], default="csv",
                   help="csv (default): the search and final training logged as CSV files in "
                   "RUN_DIR/logs (cheap, always written); tensorboard: TensorBoard event files "
                   "in RUN_DIR/logs/tensorboard as well (pip install 'biotune[tensorboard]')")
    g = s.add_argument_group("execution (does not change results)")
    g.add_argument("--executor", choices=["inprocess", "process", "ray"], default="inprocess",
                   help="where evaluations run: this process (default), a local process pool, "
                   "or a Ray cluster")
    g.add_argument("--workers", type=_positive_int, default=1,
                   help="parallel workers for --executor process/ray (default 1)")
    g.add_argument("--ray-address", help="address of an existing Ray cluster (default: start a "
                   "local one)")
    _add_data_options(s)
    g = s.add_argument_group("evolution")
    evolutions = {label: c.evolution for label, c in presets.items()}
    g.add_argument("--population", type=_positive_int,
                   help="population size" + defaults_text("population_size", evolutions))
    g.add_argument("--generations", type=int, help="generations after the initial population"
                   + defaults_text("generations", evolutions))
    g.add_argument("--elite", type=int, help="elites kept and refined by local search"
                   + defaults_text("elite", evolutions))
    g.add_argument("--children-batch", type=int,
                   help="children made per step: 1 = the paper's sequential order; 0 = all "
                   "children of a generation at once (parallel)")
    g.add_argument("--anchors", action=argparse.BooleanOptionalAction, default=None,
                   help="start the population from full fine-tuning, the top half and linear "
                   "probing (default preset: on; paper preset: off, random genomes)")
    g.add_argument("--initial-size", type=_positive_int,
                   help="genomes scored in the initial generation, the best --population of "
                   "them kept (default: the population size)")
    g = s.add_argument_group("fitness protocol")
    protocols = {label: c.protocol for label, c in presets.items()}
    g.add_argument("--data-fraction", type=_fraction, metavar="1/K",
                   help="share of the training split each evaluation trains on: 1/k for a whole "
                   "number k (1, 0.5, 1/3, 0.25, ...), the split cut into k folds that rotate "
                   "per generation" + defaults_text("data_fraction", protocols))
    add_seed_options(g, "", "seeds of each evaluation", seeds_text({
        label: c.protocol.seeds for label, c in presets.items()
    }))
    g = s.add_argument_group("speed-ups (default preset: all on; paper preset: all off)")
    g.add_argument("--cache", action=argparse.BooleanOptionalAction, default=None,
                   help="train on cached outputs of a plan's frozen first blocks (exact)")
    g.add_argument("--cache-budget-mb", type=float,
                   help="memory for cached features per worker, in MB (default 1024)")
    g.add_argument("--memoize", action=argparse.BooleanOptionalAction, default=None,
                   help="do not retrain a plan already scored on the same fold and seeds")
    g.add_argument("--prune", action=argparse.BooleanOptionalAction, default=None,
                   help="stop a child's training early when it is clearly worse than this "
                   "generation's elites at the same epoch")
    g.add_argument("--prune-quantile", type=float,
                   help="prune below this quantile of the elites' curves (default 0.5: median)")
    g.add_argument("--eval-threads", type=int,
                   help="CPU threads per evaluation (default 1; results depend on it, so it is "
                   "part of the configuration)")
    _add_training_options(s, "", "training of each evaluation", {
        label: c.protocol.train for label, c in presets.items()
    })
    _add_training_options(s, "final-", "final training of the best plan", {
        label: c.final for label, c in presets.items()
    })
    g = s.add_argument_group("seeds of the final training")
    add_seed_options(g, "final-", "seeds of the final training of the best plan", seeds_text({
        label: c.final_seeds for label, c in presets.items()
    }))
    add_machine_options(s, augment="the final training (not the search's evaluations)")
    from biotune.core.budget import add_budget_options

    add_budget_options(s)
    s.set_defaults(func=cmd_search)

    t = sub.add_parser("train", help="train a given plan and test it",
                       description="Fine-tune a model under a plan (a JSON file, e.g. a run's "
                       "best_plan.json, or 'full' / 'head') on the whole training split, test it. "
                       "The plan and --out are checked before any training.")
    t.add_argument("--plan", required=True, help="plan JSON file, 'full' or 'head'")
    add_seed_options(t, "", "seeds", seeds_text({"default": TRAIN_SEEDS}))
    t.add_argument("--out", help="write the results as JSON here")
    t.add_argument("--save", metavar="DIR",
                   help="save the fine-tuned model (the seed best on validation) in DIR: "
                   "model.safetensors and finetuned.json, for biotune predict")
    _add_data_options(t)
    _add_training_options(t, "", "training", {"default": FINAL_TRAINING})
    t.add_argument("--quiet", action="store_true",
                   help="no progress bars or lines (warnings and errors only)")
    add_machine_options(t, augment="the training")
    t.set_defaults(func=cmd_train)

    pr = sub.add_parser("predict", help="classify images with a fine-tuned model",
                        description="Load a fine-tuned model (a search's run directory or a "
                        "train --save folder) and print the class and its probability for each "
                        "image (folders are searched recursively).")
    pr.add_argument("model_dir", help="run directory or folder holding finetuned.json")
    pr.add_argument("images", nargs="+", help="image files or folders")
    pr.add_argument("--csv", help="write file,class,index,probability rows here instead")
    pr.set_defaults(func=cmd_predict)

    b = sub.add_parser("blocks", help="show how a model is split into blocks",
                       description="Print a model's blocks with parameter counts and shares.")
    b.add_argument("model", nargs="?", default="efficientnet_lite0", help="model name")
    b.add_argument("--num-classes", type=_positive_int, default=1000,
                   help="classes of the new head (default 1000)")
    b.set_defaults(func=cmd_blocks)

    from biotune.compare import add_compare_parser
    from biotune.reports import add_report_parser

    add_compare_parser(sub)
    add_report_parser(sub)
    return parser


def _one_line_warning(message, category, filename, lineno, line=None) -> str:  # noqa: ANN001
    return f"biotune: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    """Run one command: a user error is one line and exit code 2, Ctrl-C one line and 130."""
    warnings.formatwarning = _one_line_warning
    try:
        args = build_parser().parse_args(argv)
        from biotune.progress import setup_logging

        setup_logging(quiet=getattr(args, "quiet", False))
        return args.func(args)
    except BioTuneError as exc:
        print(f"biotune: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\nbiotune: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
