"""The ``biotune`` command line: search, train, blocks, compare, report.

Every user error is a :class:`BioTuneError`: one line on stderr, exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

from biotune.errors import BioTuneError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _seeds(text: str) -> tuple[int, ...]:
    """'3' -> (0, 1, 2); '0,5,7' -> (0, 5, 7)."""
    try:
        if "," in text:
            return tuple(int(s) for s in text.split(",") if s.strip())
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a count (3) or a comma-separated list of seeds (0,1,2), got {text!r}"
        ) from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected at least one seed, got {n}")
    return tuple(range(n))


def _add_data_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", help="model name: efficientnet_lite0/1/2 (offline ImageNet weights), "
                   "a torchvision name (resnet50, densenet121, ...; 'tv:' prefix optional) or "
                   "'timm:NAME' (default: efficientnet_lite0)")
    g.add_argument("--checkpoint", help="load the model's weights from this state-dict file")
    g.add_argument("--no-pretrained", dest="pretrained", action="store_false", default=None,
                   help="start from random weights instead of pretrained ones")
    g.add_argument("--dataset", help="offline: animal-shape, mnist-5k, digits, textures; "
                   "torchvision: flowers102, fgvc-aircraft, dtd, cifar10, stl10, mnist, usps, "
                   "svhn; or a folder with one sub-folder of images per class "
                   "(default: animal-shape)")
    g.add_argument("--data-root", help="where torchvision datasets live or are downloaded to")
    g.add_argument("--download", action="store_true", default=None,
                   help="download torchvision datasets (needs internet)")
    g.add_argument("--image-size", type=_positive_int,
                   help="image side in pixels (default 32; --native-size for the model's own)")
    g.add_argument("--native-size", action="store_true",
                   help="use the model's native input resolution (224 for ResNet-50)")
    g.add_argument("--train-size", type=_positive_int,
                   help="use at most this many training images, a stratified subsample "
                   "(default 1000)")
    g.add_argument("--val-size", type=_positive_int,
                   help="at most this many validation images (default 500)")
    g.add_argument("--test-size", type=_positive_int,
                   help="at most this many test images (default 1500)")
    g.add_argument("--full-data", action="store_true",
                   help="use the whole splits (no subsampling)")
    g.add_argument("--split-seed", type=int, help="seed of the train/val/test split (default 0)")
    g.add_argument("--bad-images", choices=["skip", "error"],
                   help="unreadable image files in a folder dataset: skip them with a warning "
                   "(default) or stop with an error")


def _add_training_options(p: argparse.ArgumentParser, prefix: str, what: str) -> None:
    g = p.add_argument_group(what)
    g.add_argument(f"--{prefix}epochs", type=_positive_int, help="maximum epochs")
    g.add_argument(f"--{prefix}patience", type=int, help="early stopping: epochs without "
                   "validation improvement before stopping")
    g.add_argument(f"--{prefix}batch-size", type=_positive_int, help="training batch size")
    g.add_argument(f"--{prefix}lr", type=float, help="base learning rate (a block's lr is this "
                   "times its multiplier)")
    g.add_argument(f"--{prefix}optimizer", choices=["adam", "adamw", "sgd"], help="optimizer")


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
        changes.update(train_size=None, val_size=None, test_size=None)
    return replace(base, **changes)


def _train_config(args: argparse.Namespace, prefix: str, base: Any) -> Any:
    changes: dict[str, Any] = {}
    for field, attr in (("epochs", "epochs"), ("patience", "patience"),
                        ("batch_size", "batch_size"), ("base_lr", "lr"),
                        ("optimizer", "optimizer")):
        value = getattr(args, prefix + attr, None)
        if value is not None:
            changes[field] = value
    return replace(base, **changes)


def _search_config(args: argparse.Namespace, base: Any) -> Any:
    from biotune.fitness import PruneConfig

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
    if args.seeds is not None:
        proto_changes["seeds"] = args.seeds
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
        "final": _train_config(args, "final_", base.final),
    }
    if args.final_seeds is not None:
        changes["final_seeds"] = args.final_seeds
    if args.seed is not None:
        changes["seed"] = args.seed
    return replace(base, **changes)


def _print_final(final: dict[str, Any]) -> None:
    t1, bal = final["test_top1"], final["test_balanced"]
    print(f"test top-1 {t1['mean']:.4f} +- {t1['std']:.4f} | balanced {bal['mean']:.4f} +- "
          f"{bal['std']:.4f} | {len(final['runs'])} seeds | trainable "
          f"{100 * final['trainable_share']:.1f}% of parameters")


def cmd_search(args: argparse.Namespace) -> int:
    from biotune.presets import preset
    from biotune.progress import SearchProgress
    from biotune.rundir import CONFIG, RunDirectory
    from biotune.runner import Search, SearchConfig

    if args.resume:
        run = RunDirectory(args.resume)
        stored = run.read(CONFIG) if run.exists() else None
        if stored is None:
            raise BioTuneError(f"--resume {args.resume}: no search found in that directory")
        base = SearchConfig.from_dict(stored["search"])
        run_dir = Path(args.resume)
    else:
        base = preset(args.preset)
        run_dir = Path(args.run_dir) if args.run_dir else None
    config = _search_config(args, base)
    if run_dir is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = Path("runs") / f"{Path(config.data.dataset).name}-{config.data.model}-{stamp}"
    print(f"run directory: {run_dir}", file=sys.stderr)
    search = Search(
        config, run_dir, progress=None if args.quiet else SearchProgress(),
        executor=args.executor, workers=args.workers, ray_address=args.ray_address,
    )
    try:
        result = search.run_search(resume=bool(args.resume), final=not args.no_final)
    except KeyboardInterrupt:
        print(f"\ninterrupted: every finished evaluation is saved; resume with\n"
              f"  biotune search --resume {run_dir}", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"best plan (val fitness {result.best_fitness:.4f}): {result.best_plan.describe()}")
    summary = json.loads((run_dir / "search_summary.json").read_text())
    cost = summary["cost"]
    print(f"search: {cost['evaluations']} evaluations, {cost['seconds']:.0f}s of training, "
          f"{cost['ft_equivalents']:.2f} FT-equivalents")
    if result.final:
        _print_final(result.final)
    print(f"plan: {run_dir / 'best_plan.json'}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from biotune.plan import FineTunePlan
    from biotune.presets import FINAL_TRAINING
    from biotune.rundir import write_json_atomic
    from biotune.runner import DataConfig, final_training_run, prepare, summarize_final

    data = _data_config(args, DataConfig())
    bench = prepare(data)
    names = bench.partition.names
    if args.plan == "full":
        plan = FineTunePlan.full(names)
    elif args.plan in ("head", "linear"):
        plan = FineTunePlan.head_only(names)
    else:
        plan = FineTunePlan.load(args.plan)
        plan.check_fits(bench.partition, source=f"plan {args.plan}")
    config = _train_config(args, "", FINAL_TRAINING)
    runs = [final_training_run(bench, plan, config, seed) for seed in args.seeds]
    summary = summarize_final(runs, plan, bench)
    if args.out:
        out = Path(args.out)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(out, summary)
        except OSError as exc:
            raise BioTuneError(f"--out {out}: cannot write ({exc.strerror})") from None
    print(f"plan: {plan.describe()}")
    _print_final(summary)
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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="biotune",
        description="Evolutionary selective fine-tuning (BioTune): search which blocks of a "
        "pretrained image classifier to fine-tune and at what learning rate.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("search", help="search a fine-tuning plan, then train and test it",
                       description="Search a fine-tuning plan with the evolutionary algorithm, "
                       "train the best plan on the whole training split with several seeds and "
                       "test it once. With no options: EfficientNet-Lite0 (offline ImageNet "
                       "weights) on Animal-Shape.")
    s.add_argument("--preset", choices=["default", "paper"], default="default",
                   help="'default': our cheap search; 'paper': the paper's protocol "
                   "(population 10, 10 generations, 3 seeds, 30 epochs)")
    s.add_argument("--run-dir", help="where records go (default runs/DATASET-MODEL-TIME)")
    s.add_argument("--resume", metavar="RUN_DIR",
                   help="continue an interrupted search; its stored configuration is used")
    s.add_argument("--seed", type=int, help="seed of the evolution and the folds (default 0)")
    s.add_argument("--no-final", action="store_true",
                   help="stop after the search, without training the best plan")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
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
    g.add_argument("--population", type=_positive_int, help="population size")
    g.add_argument("--generations", type=int, help="generations after the initial population")
    g.add_argument("--elite", type=int, help="elites kept and refined by local search")
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
    g.add_argument("--data-fraction", type=float,
                   help="share of the training split each evaluation trains on; the folds "
                   "rotate per generation (paper: 0.5)")
    g.add_argument("--seeds", type=_seeds, help="seeds per evaluation: a count or a list")
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
    _add_training_options(s, "", "training of each evaluation")
    _add_training_options(s, "final-", "final training of the best plan")
    s.add_argument("--final-seeds", type=_seeds, help="seeds of the final training (default 3)")
    s.set_defaults(func=cmd_search)

    t = sub.add_parser("train", help="train a given plan and test it",
                       description="Fine-tune a model under a plan (a JSON file, e.g. a run's "
                       "best_plan.json, or 'full' / 'head') on the whole training split, test it.")
    t.add_argument("--plan", required=True, help="plan JSON file, 'full' or 'head'")
    t.add_argument("--seeds", type=_seeds, default=(0, 1, 2), help="seeds (default 3)")
    t.add_argument("--out", help="write the results as JSON here")
    _add_data_options(t)
    _add_training_options(t, "", "training")
    t.set_defaults(func=cmd_train)

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
    warnings.formatwarning = _one_line_warning
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except BioTuneError as exc:
        print(f"biotune: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
