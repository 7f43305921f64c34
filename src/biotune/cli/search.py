"""``biotune search``: search a fine-tuning plan, then train and test it."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from biotune.cli import EXIT_INTERRUPTED
from biotune.cli._fields import add_field_options, apply_fields, field_changes, positive_int
from biotune.cli._options import (
    add_budget_options,
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
from biotune.errors import BioTuneError


def _preset_help() -> str:
    from biotune.presets import DEFAULT_BUDGET, paper

    c = paper()
    return (
        "'default': random search over plans, with anchors, a short evaluation and longer "
        f"training for the best few, until the evaluations cost {DEFAULT_BUDGET:g} "
        "FT-equivalents; 'evolution': the same with the paper's evolutionary algorithm "
        "proposing the plans; 'paper': the paper's protocol (population "
        f"{c.evolution.population_size}, {c.evolution.generations} generations, "
        f"{len(c.protocol.seeds)} seeds, up to {c.protocol.train.epochs} epochs); "
        "default: 'default'"
    )


def add_search_parser(sub: Any) -> argparse.ArgumentParser:
    """``biotune search``: sets ``func=cmd_search``; help texts quote both presets' values."""
    from biotune.core.evolution import EvolutionConfig
    from biotune.presets import PRESETS, default, paper
    from biotune.runner.config import SearchConfig
    from biotune.runner.fitness import PruneConfig, SearchProtocol

    presets = {"default preset": default(), "paper preset": paper()}
    s = sub.add_parser(
        "search",
        help="search a fine-tuning plan, then train and test it",
        description="Search a fine-tuning plan (by default random search over BioTune's "
        "plans, which did as well as its evolution at equal cost; --preset evolution for "
        "the evolutionary algorithm), train the best plan on the whole training split with "
        "several seeds and "
        "test it once. With no options: EfficientNet-Lite0 (offline ImageNet "
        "weights) on Animal-Shape.",
    )
    s.add_argument("--preset", choices=list(PRESETS), help=_preset_help())
    s.add_argument("--run-dir", help="where records go (default runs/DATASET-MODEL-TIME)")
    s.add_argument(
        "--config",
        metavar="FILE",
        help="start from this configuration (JSON, or YAML with PyYAML; the schema of "
        "a run directory's config.json, e.g. one copied from an earlier run) instead "
        "of a preset; options given change it",
    )
    s.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue an interrupted search in RUN_DIR with the configuration stored "
        "there (--preset is refused; other options must match it; --run-dir, if "
        "given, must be RUN_DIR)",
    )
    add_field_options(
        s,
        SearchConfig,
        (
            "seed",
            "rerank",
            "rerank_from",
            "promote",
            "promote_epochs",
            "sampler",
            "max_ft_equivalents",
        ),
        presets,
    )
    s.add_argument(
        "--no-final",
        action="store_true",
        help="stop after the search, without training the best plan",
    )
    add_quiet_option(s)
    s.add_argument(
        "--log",
        choices=["csv", "tensorboard"],
        default="csv",
        help="csv (default): the search and final training logged as CSV files in "
        "RUN_DIR/logs (cheap, always written); tensorboard: TensorBoard event files "
        "in RUN_DIR/logs/tensorboard as well (pip install 'biotune[tensorboard]')",
    )
    g = s.add_argument_group("execution (does not change results)")
    g.add_argument(
        "--executor",
        choices=["inprocess", "process", "ray"],
        default="inprocess",
        help="where evaluations run: this process (default), a local process pool, "
        "or a Ray cluster",
    )
    g.add_argument(
        "--workers",
        type=positive_int,
        default=1,
        help="parallel workers for --executor process/ray (default 1)",
    )
    g.add_argument(
        "--per-gpu",
        type=positive_int,
        default=1,
        metavar="K",
        help="evaluations sharing each GPU with --executor process/ray: up to K workers per GPU "
        "(K x the GPUs in all, --workers at most), for a model too small to keep a GPU busy; "
        "each one's 'auto' --cache-memory takes 1/K of the GPU's share. Only throughput "
        "changes: each evaluation is the same training on its own seeds (on a GPU, runs are "
        "not bit-identical anyway: cuDNN autotunes its kernels, some backward passes add "
        "atomically); no effect on the CPU (default 1: one worker per GPU)",
    )
    g.add_argument(
        "--ray-address", help="address of an existing Ray cluster (default: start a local one)"
    )
    add_data_options(s)

    g = s.add_argument_group("evolution")
    evolutions = {label: c.evolution for label, c in presets.items()}
    add_field_options(g, EvolutionConfig, ("population_size", "generations", "elite"), evolutions)
    batches = {label: c.evolution.children_batch or 0 for label, c in presets.items()}
    g.add_argument(
        "--children-batch",
        type=int,
        help="children made per step: 1 = the paper's sequential order (the mating pool "
        "changes after every child); 0 = all children of a generation at once, so that they "
        "can be trained in parallel ("
        + "; ".join(f"{label}: {value}" for label, value in batches.items())
        + ")",
    )
    add_field_options(g, EvolutionConfig, ("anchors", "anchor_set", "initial_size"), evolutions)

    g = s.add_argument_group("fitness protocol")
    protocols = {label: c.protocol for label, c in presets.items()}
    add_field_options(g, SearchProtocol, ("data_fraction", "fold_policy"), protocols)
    add_seed_options(
        g,
        "",
        "seeds of each evaluation",
        seeds_text({label: c.protocol.seeds for label, c in presets.items()}),
    )
    g = s.add_argument_group("speed-ups (default preset: all on; paper preset: all off)")
    add_field_options(g, SearchProtocol, ("cache_features", "cache_memory", "memoize"), protocols)
    g.add_argument(
        "--prune",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="stop a child's training early when it is clearly worse than this "
        "generation's elites at the same epoch ("
        + "; ".join(
            f"{label}: {'on' if c.protocol.prune is not None else 'off'}"
            for label, c in presets.items()
        )
        + ")",
    )
    add_field_options(g, PruneConfig, ("quantile",), {"default": PruneConfig()})
    add_field_options(g, SearchProtocol, ("cpu_threads",), protocols)
    add_training_options(
        s,
        "",
        "training of each evaluation",
        {label: c.protocol.train for label, c in presets.items()},
    )
    add_training_options(
        s,
        "final-",
        "final training of the best plan",
        {label: c.final for label, c in presets.items()},
    )
    g = s.add_argument_group("seeds of the final training")
    add_seed_options(
        g,
        "final-",
        "seeds of the final training of the best plan",
        seeds_text({label: c.final_seeds for label, c in presets.items()}),
    )
    add_machine_options(
        s, augment="the final training (not the search's evaluations)", eval_threads=True
    )
    add_budget_options(s, presets)
    s.set_defaults(func=cmd_search)
    return s


def _prune(args: argparse.Namespace, protocol: Any) -> Any:
    """--prune / --no-prune and --prune-quantile (which turns pruning on) -> a PruneConfig."""
    from biotune.runner.fitness import PruneConfig

    if args.prune is False:
        return None
    if args.prune or args.prune_quantile is not None:
        return apply_fields(args, protocol.prune or PruneConfig())
    return protocol.prune


def _evolution(args: argparse.Namespace, base: Any) -> Any:
    """``base``'s evolution settings with the options given (--objective too, the budget
    group's). A --population above a preset's initial size raises it unless --initial-size is
    given: the initial generation scores at least a population."""
    changes = field_changes(args, type(base))
    population = changes.get("population_size")
    if population is not None and "initial_size" not in changes:
        return base.resized(changes.pop("population_size"), **changes)
    return replace(base, **changes) if changes else base


def search_config(args: argparse.Namespace, base: Any) -> Any:
    """``base`` (a ``SearchConfig``: a preset or the stored one) with the options given. Rotating
    folds (--fold-policy rotate) make a preset's ``--rerank-from best`` pick each generation's
    winners instead, unless --rerank-from is given: scores of different folds do not compare;
    ``--rerank 0`` or ``1`` drops a preset's middle rung (--promote), which only narrows what the
    final recipe re-ranks."""
    from biotune.runner.config import ACROSS_GENERATIONS

    evolution = _evolution(args, base.evolution)
    if args.children_batch is not None:  # 0: all children of a generation at once
        evolution = replace(evolution, children_batch=args.children_batch or None)
    protocol = apply_fields(args, base.protocol)
    seeds = seeds_from(args)
    protocol = replace(
        protocol,
        train=train_config(args, "", protocol.train),
        prune=_prune(args, protocol),
        **({"seeds": seeds} if seeds is not None else {}),
    )
    final = train_config(args, "final-", base.final)
    if args.augment:
        final = replace(final, augment=True)
    final_seeds = seeds_from(args, "final-")
    changes = field_changes(args, type(base))
    if (
        base.rerank_from in ACROSS_GENERATIONS
        and "rerank_from" not in changes
        and not protocol.comparable_across_generations
    ):  # rotating folds: each generation's winner is the plan its own fold could judge
        changes["rerank_from"] = "winners"
    if changes.get("rerank", 2) < 2 and "promote" not in changes:
        changes["promote"] = 0  # the middle rung only narrows what the final recipe re-ranks
    # One replace, so that checks between fields (e.g. --sampler with --fold-policy) see the
    # whole configuration.
    return replace(
        base,
        **changes,
        data=data_config(args, base.data),
        evolution=evolution,
        protocol=protocol,
        final=final,
        budget=apply_fields(args, base.budget),
        **({"final_seeds": final_seeds} if final_seeds is not None else {}),
    )


def read_config(path: str) -> Any:
    """A search configuration file: JSON (or YAML, if PyYAML is installed) in the schema of a run
    directory's config.json, either that whole file or its "search" part."""
    from biotune.core.fields import refuse_unknown
    from biotune.runner.config import SearchConfig

    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise BioTuneError(f"--config {path}: cannot read ({exc.strerror})") from None
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise BioTuneError(
                f"--config {path}: YAML needs PyYAML (pip install pyyaml), or "
                "give the configuration as JSON"
            ) from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:  # its message spans lines: where, and what went wrong
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise BioTuneError(f"--config {path}: malformed YAML{where}: {problem}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BioTuneError(
                f"--config {path}: malformed JSON at line {exc.lineno}: {exc.msg}"
            ) from None
    if isinstance(data, dict) and "search" in data:  # a run's whole config.json
        refuse_unknown(data, ("biotune", "search", "fingerprints"), f"--config {path}")
        data = data["search"]
    elif isinstance(data, dict):  # its "search" part (a misspelt "search" gets a hint too)
        known = [f.name for f in dataclasses.fields(SearchConfig)]
        refuse_unknown(data, [*known, "search"], f"--config {path}")
    try:
        return SearchConfig.from_dict(data)
    except BioTuneError as exc:
        raise BioTuneError(f"--config {path}: {exc}") from None


def print_final(final: dict[str, Any]) -> None:
    t1, bal = final["test_top1"], final["test_balanced"]
    seeds = len(final["runs"])
    print(
        f"test top-1 {t1['mean']:.4f} +- {t1['std']:.4f} | balanced {bal['mean']:.4f} +- "
        f"{bal['std']:.4f} | {seeds} seed{'s' if seeds != 1 else ''} | trainable "
        f"{100 * final['trainable_share']:.1f}% of parameters"
    )


def _check_resume_options(args: argparse.Namespace) -> None:
    """--resume continues a search with its stored configuration, in its own directory."""
    if args.run_dir and Path(args.run_dir).resolve() != Path(args.resume).resolve():
        raise BioTuneError(
            f"--resume {args.resume} continues the search in that directory; --run-dir "
            f"{args.run_dir} names another (drop --run-dir)"
        )
    for option, value in (("--preset", args.preset), ("--config", args.config)):
        if value is not None:
            raise BioTuneError(
                f"{option} does not apply with --resume: the configuration stored in "
                f"{args.resume} decides (drop {option})"
            )


def _interrupted(run_dir: Path, created: bool) -> None:
    """After Ctrl-C: how to resume, only if there is a search to resume; else tidy up."""
    from biotune.runner.rundir import CONFIG, LOCK

    if (run_dir / CONFIG).exists():
        print(
            "biotune: interrupted; everything finished is saved, resume with: "
            f"biotune search --resume {shlex.quote(str(run_dir))}",
            file=sys.stderr,
        )
        return
    if created:  # this call made the directory and nothing was recorded: leave no debris
        with contextlib.suppress(OSError):
            if all(p.name == LOCK for p in run_dir.iterdir()):
                (run_dir / LOCK).unlink(missing_ok=True)
                run_dir.rmdir()
    print("biotune: interrupted before the search started: nothing to resume", file=sys.stderr)


def cmd_search(args: argparse.Namespace) -> int:
    from biotune.callbacks import CSVLogger, TensorBoardLogger
    from biotune.core.cost import ft_unit
    from biotune.presets import preset
    from biotune.progress import SearchProgress
    from biotune.reports import validation_text
    from biotune.runner.config import SearchConfig
    from biotune.runner.rundir import CONFIG, RunDirectory
    from biotune.runner.search import Search

    if args.resume:
        _check_resume_options(args)
        run = RunDirectory(args.resume)
        stored = run.read(CONFIG) if run.exists() else None
        if stored is None:
            raise BioTuneError(f"--resume {args.resume}: no search found in that directory")
        try:
            search = stored.get("search") if isinstance(stored, dict) else None
            base = SearchConfig.from_dict(search)
        except BioTuneError as exc:
            raise BioTuneError(f"--resume {args.resume}: {CONFIG}: {exc}") from None
        run_dir = Path(args.resume)
    elif args.config:
        if args.preset:
            raise BioTuneError(
                "--config and --preset both say where the configuration comes from: give one"
            )
        base = read_config(args.config)
        run_dir = Path(args.run_dir) if args.run_dir else None
    else:
        base = preset(args.preset or "default")
        run_dir = Path(args.run_dir) if args.run_dir else None
    config = search_config(args, base)
    use_machine(args)
    if args.device and args.device.startswith("cuda:") and args.executor != "inprocess":
        raise BioTuneError(
            f"--device {args.device} picks one GPU for this process; --executor "
            f"{args.executor} spreads its workers over the GPUs (use --device "
            "cuda or auto)"
        )
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
            config,
            run_dir,
            progress=None if args.quiet else SearchProgress.for_search(config),
            callbacks=loggers,
            executor=args.executor,
            workers=args.workers,
            ray_address=args.ray_address,
            per_gpu=args.per_gpu,
        )
        result = search.run_search(resume=bool(args.resume), final=not args.no_final)
    except KeyboardInterrupt:
        _interrupted(run_dir, created)
        return EXIT_INTERRUPTED
    summary = json.loads((run_dir / "search_summary.json").read_text())
    cost = summary["cost"]
    from biotune.runner.rundir import RunDirectory

    reranked = list(RunDirectory(run_dir).rerank_runs().values()) if "rerank" in cost else []
    print(f"best plan: {result.best_plan.describe()}")
    print(f"  {validation_text(reranked, metric, result.best_fitness)}")
    rungs = [
        f"{cost[k]['plans']} {name} runs"
        for k, name in (("promote", "middle-rung"), ("rerank", "re-ranking"))
        if cost.get(k)
    ]
    rerank_note = f", {' and '.join(rungs)} included" if rungs else ""
    print(
        f"search: {cost['evaluations']} evaluations, {cost['seconds']:.0f}s of training, "
        f"{cost['ft_equivalents']:.2f} FT-equivalents{rerank_note} (one FT-equivalent: "
        f"{ft_unit(config.protocol.train.epochs)})"
    )
    if result.final:
        print_final(result.final)
    if result.pareto:
        from biotune.reports import pareto_table

        print(pareto_table(result.pareto))
        print(f"front: {run_dir / 'pareto.json'}, {run_dir / 'pareto.png'}")
    print(f"plan: {run_dir / 'best_plan.json'}")
    if result.final and result.final.get("model"):
        print(
            f"fine-tuned model (seed {result.final['model']['seed']}, the best on validation): "
            f"{run_dir / 'model.safetensors'}; use it with: biotune predict {run_dir} IMAGES"
        )
    return 0
