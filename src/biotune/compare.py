"""``biotune compare``: BioTune against the baselines, on equal terms.

Every method gets the same splits, the same final-training recipe and the same small
learning-rate grid, chosen per method on the validation split with the first seed; the winning
grid run is that seed's final run, the other seeds are trained at the chosen rate. Every run is
tested once, when it ends (so that it can be kept); only the runs at the chosen rate are reported.
BioTune's rows first search a plan (``final=False``), then train that plan exactly like a
baseline; their search cost is reported apart.

Each finished training run is kept in ``runs/METHOD/`` and each method's row in
``rows/METHOD.json`` under the output folder as soon as it is done, with the settings it was made
with: the same command run again skips the finished methods and runs (and resumes an interrupted
BioTune search), and refuses stored results made with other settings.

Heavy modules (torch, the runner) are imported where they are used, so that building the command
line parser (``biotune.cli.compare``) stays fast. Messages go to the ``biotune.compare`` logger,
a line per training run and per method; ``progress`` adds bars (or, without a terminal, a line
per finished method) and the BioTune searches' own progress.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from biotune import baselines
from biotune.core.fields import option
from biotune.errors import BioTuneError

if TYPE_CHECKING:
    from biotune.progress import CompareProgress
    from biotune.runner.config import DataConfig, SearchConfig
    from biotune.runner.workbench import Workbench
    from biotune.training import TrainConfig

BASELINES = ("full", "linear", "autorgn", "lora", "l2sp", "l1sp", "llrd", "lpft")
#: BioTune methods and the preset each one searches with.
BIOTUNE_PRESETS = {"biotune": "default", "biotune-paper": "paper"}
ALL_METHODS = (*BASELINES, *BIOTUNE_PRESETS)
#: What ``biotune compare`` runs unless told: not the paper's full protocol, which takes hours.
DEFAULT_METHODS = (*BASELINES, "biotune")
#: The accuracy benchmark's grid: half a decade apart, 3e-4 to 3e-2.
DEFAULT_LR_GRID = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
LABELS = {
    **baselines.LABELS,
    "biotune": "BioTune (our default search)",
    "biotune-paper": "BioTune (paper protocol)",
}
OUTPUTS = ("compare.md", "compare.csv", "compare.json", "compare.png")
DEFAULT_SEEDS = (0, 1, 2)
#: Finished methods' rows, one JSON file each, under the output folder.
ROWS = "rows"
#: Finished training runs, ``RUNS/METHOD/RUN.json`` under the output folder (``RunRecords``).
RUNS = "runs"


@dataclass(frozen=True)
class SearchScale:
    """Overrides that shrink a preset search to a budget (None keeps the preset's value)."""

    population: int | None = option(
        None, flag="--population", type="positive_int", help="population size"
    )
    generations: int | None = option(None, flag="--generations", type="int", help="generations")
    elite: int | None = option(None, flag="--elite", type="int", help="elites")
    seeds: tuple[int, ...] | None = None  # --PREFIX-seeds / --PREFIX-num-seeds (a pair)
    epochs: int | None = option(
        None, flag="--epochs", type="positive_int", help="epochs per evaluation"
    )

    @classmethod
    def of(cls, config: SearchConfig) -> SearchScale:
        """The values ``config`` (a preset) has, to quote as the defaults."""
        return cls(
            config.evolution.population_size,
            config.evolution.generations,
            config.evolution.elite,
            config.protocol.seeds,
            config.protocol.train.epochs,
        )

    def apply(self, config: SearchConfig) -> SearchConfig:
        evo = config.evolution
        changes = {
            k: v
            for k, v in (("generations", self.generations), ("elite", self.elite))
            if v is not None
        }
        if self.population is not None:
            evo = evo.resized(self.population, **changes)
        elif changes:
            evo = replace(evo, **changes)
        protocol = config.protocol
        train = protocol.train
        if self.epochs is not None:
            train = replace(train, epochs=self.epochs, patience=min(train.patience, self.epochs))
        protocol = replace(
            protocol, seeds=self.seeds if self.seeds is not None else protocol.seeds, train=train
        )
        return replace(config, evolution=evo, protocol=protocol)

    def describe(self) -> str:
        """Only the values that were changed, e.g. 'population 4, generations 2'."""
        parts = [
            f"{k} {list(v) if isinstance(v, tuple) else v}"
            for k, v in asdict(self).items()
            if v is not None
        ]
        return ", ".join(parts)


def _parse_methods(methods: Sequence[str]) -> list[str]:
    out: list[str] = []
    for m in methods:
        m = m.strip().lower()
        if m not in ALL_METHODS:
            raise BioTuneError(f"unknown method {m!r}; choose from {', '.join(ALL_METHODS)}")
        if m not in out:
            out.append(m)
    if not out:
        raise BioTuneError("no method to compare")
    return out


def _stat(values: Sequence[float]) -> dict[str, float]:
    n = len(values)
    mean = sum(values) / n
    return {"mean": mean, "std": math.sqrt(sum((v - mean) ** 2 for v in values) / n)}


def _log(message: str) -> None:
    logging.getLogger("biotune.compare").info(message)


def search_config(
    method: str,
    data: DataConfig,
    scale: SearchScale | None,
    recipe: TrainConfig | None = None,
) -> SearchConfig:
    """The preset search of a BioTune method on ``data``, scaled (invalid scales fail here); its
    evaluations run in ``recipe``'s precision and memory format (no augmentation: that is for
    the final runs)."""
    from biotune.presets import preset

    config = replace(preset(BIOTUNE_PRESETS[method]), data=data)
    if recipe is not None:
        train = replace(
            config.protocol.train, precision=recipe.precision, channels_last=recipe.channels_last
        )
        config = replace(config, protocol=replace(config.protocol, train=train))
    return scale.apply(config) if scale is not None else config


def _search_plan(
    method: str,
    config: SearchConfig,
    bench: Workbench,
    out_dir: Path,
    scale: SearchScale | None,
    log: Callable[[str], None],
    progress: bool = False,
) -> tuple[Any, dict[str, Any]]:
    """Run (or resume) the method's search in its own run directory; the plan and its cost."""
    from biotune.progress import SearchProgress
    from biotune.runner.rundir import RunDirectory
    from biotune.runner.search import Search

    run_dir = out_dir / f"search-{method}"
    resume = RunDirectory(run_dir).exists()
    log(
        f"[{method}] {'resuming' if resume else 'running'} the search in {run_dir} "
        f"({config.evolution.total_evaluations} evaluations x {len(config.protocol.seeds)} "
        f"seed{'s' if len(config.protocol.seeds) != 1 else ''})"
    )
    start = time.perf_counter()
    display = SearchProgress.for_search(config) if progress else None
    result = Search(config, run_dir, bench=bench, progress=display).run_search(
        resume=resume, final=False
    )
    cost = result.cost
    search = {
        "preset": BIOTUNE_PRESETS[method],
        "scaling": scale.describe() if scale is not None else "",
        "run_dir": str(run_dir),
        "evaluations": cost["evaluations"],
        "ft_equivalents": cost["ft_equivalents"],
        "ft_epochs": config.protocol.train.epochs,  # the unit's epoch budget
        "seconds": cost["seconds"],
        "wall_seconds": time.perf_counter() - start,
        "best_fitness": result.best_fitness,
        "val_metric": config.protocol.train.metric,
        "val_score": 1 - result.best_fitness,
        "plan": result.best_plan.to_dict(),
        "plan_text": result.best_plan.describe(),
        "cost": cost,
    }
    return result.best_plan, search


class RunRecords:
    """A method's finished training runs, one JSON file each under ``OUT/runs/METHOD/``, written
    the moment a run ends (tested once, then), so that a stopped compare keeps them: the same
    command run again reads them back instead of training again. ``digest`` names the settings
    they were made with; a record made with others is refused, as a stored row is."""

    def __init__(self, folder: Path, digest: str) -> None:
        self.folder, self.digest = folder, digest

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        path = self.path(key)
        stored = _read_stored(path, ("settings_digest", "run"), "run", "train it")
        if stored is None:
            return None
        digest, record = stored
        if digest != self.digest:
            raise BioTuneError(
                f"{path} was made with other settings; use another --out, or delete "
                f"{self.folder} to train that method again"
            )
        return record

    def put(self, key: str, record: dict[str, Any]) -> None:
        from biotune.runner.rundir import write_json_atomic

        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path(key), {"settings_digest": self.digest, "run": record})
        except OSError as exc:
            raise BioTuneError(f"cannot write {self.path(key)}: {exc.strerror or exc}") from None


def _run_key(phase: str, lr: float, extra: Mapping[str, Any], seed: int) -> str:
    """'lr0.001-seed0', 'head-lr0.01-seed0', 'lr0.001-llrd_decay0.65-seed0'."""
    parts = [phase] if phase else []
    parts += [f"lr{lr:g}", *(f"{k}{v:g}" for k, v in extra.items()), f"seed{seed}"]
    return "-".join(parts)


def compare_method(
    method: str,
    bench: Workbench,
    config: TrainConfig,
    seeds: Sequence[int],
    lr_grid: Sequence[float],
    *,
    options: Mapping[str, Any] | None = None,
    plan: Any = None,
    log: Callable[[str], None] = _log,
    progress: CompareProgress | None = None,
    records: RunRecords | None = None,
) -> dict[str, Any]:
    """One row: choose the base lr on validation (the rule of ``baselines.select_lr``: one run
    per grid point with the first seed, the best validation score, ties to the earlier point),
    train the other seeds at it, test each run once. Every run is logged as it ends and, with
    ``records``, kept and read back on a rerun."""
    from biotune.baselines import run_baseline, tuning_grid, tuning_options
    from biotune.training import count_parameters, default_device, evaluate

    name = "plan" if plan is not None else method
    opts = {k: v for k, v in (options or {}).items() if k in tuning_options(name)}
    if plan is not None:
        opts["plan"] = plan
    device = default_device()
    start = time.perf_counter()
    head = method == "lpft" and opts.get("lpft_head_lr") is None
    planned = len(tuning_grid(name, lr_grid, opts)) + len(seeds) - 1 + (len(lr_grid) if head else 0)
    if progress is not None:
        progress.method_start(method, planned)
    count = 0

    def trained(
        run_name: str, phase: str, lr: float, extra: dict[str, Any], seed: int, fixed: dict
    ) -> dict[str, Any]:
        """One training run, tested once and recorded, or its record from an earlier call."""
        nonlocal count
        count += 1
        key = _run_key(phase, lr, extra, seed)
        what = f"[{method}] {phase + ' ' if phase else ''}lr {baselines.setting_label(lr, extra)}"
        record = records.get(key) if records is not None else None
        if record is not None:
            log(f"{what}, seed {seed} ({count}/{planned}): kept from {records.path(key)}")
        else:
            run = run_baseline(
                run_name, bench, replace(config, base_lr=lr), seed, device, **fixed, **extra
            )
            test = evaluate(
                run.model,
                bench.splits.test,
                config.eval_batch_size,
                device,
                config.precision,
                config.channels_last,
            )
            result = run.result
            record = {
                "seed": seed,
                "lr": lr,
                "options": dict(extra),
                # a diverged run scores 0 on validation, whatever its last epoch measured
                "val_score": result.val.get(config.metric) if result.status != "diverged" else 0.0,
                "test_top1": test.top1,
                "test_balanced": test.balanced,
                "val_top1": result.val.top1,
                "val_balanced": result.val.balanced,
                "best_epoch": result.best_epoch,
                "epochs_run": result.epochs_run,
                "seconds": result.seconds,
                "train_images": result.train_images,
                "status": result.status,
                "trainable_params": run.trainable_params,
                "info": {k: v for k, v in run.info.items() if k != "last_ratios"},
            }
            if records is not None:
                records.put(key, record)
            log(
                f"{what}, seed {seed} ({count}/{planned}): validation {config.metric} "
                f"{record['val_score']:.4f}, {result.status}, best epoch {result.best_epoch} of "
                f"{result.epochs_run} in {result.seconds:.1f}s"
            )
        if progress is not None:
            progress.run_done()
        return record

    def choose(run_name: str, phase: str, given: dict) -> tuple[dict[str, Any], dict[str, float]]:
        """The grid's best run on validation and every grid point's score by its label."""
        grid_name = baselines.TUNED.get(run_name, ("", ""))[1]
        fixed = {k: v for k, v in given.items() if k != grid_name}
        val: dict[str, float] = {}
        best: dict[str, Any] | None = None
        for lr, extra in tuning_grid(run_name, lr_grid, given):
            record = trained(run_name, phase, lr, extra, seeds[0], fixed)
            val[baselines.setting_label(lr, extra)] = record["val_score"]
            if best is None or record["val_score"] > best["val_score"]:
                best = record
        assert best is not None
        return best, val

    extra_info: dict[str, Any] = {}
    if head:  # LP-FT's head phase gets its lr the way linear probing does: on validation
        probe, probe_val = choose("linear", "head", {})
        opts["lpft_head_lr"] = probe["lr"]
        extra_info["head_val_by_lr"] = probe_val
        log(f"[{method}] head lr {probe['lr']:g} chosen on validation (linear probing's grid)")
    best, val = choose(name, "", opts)
    grid_name = baselines.TUNED.get(name, ("", ""))[1]
    fixed = {k: v for k, v in opts.items() if k != grid_name}
    chosen = best["options"]
    log(
        f"[{method}] lr {baselines.setting_label(best['lr'], chosen)} chosen on validation "
        f"({'; '.join(f'{k}: {v:.3f}' for k, v in val.items())})"
    )
    runs = []
    for seed in seeds:
        record = best if seed == seeds[0] else trained(name, "", best["lr"], chosen, seed, fixed)
        runs.append({k: v for k, v in record.items() if k not in ("lr", "options", "info")})
        log(
            f"[{method}] seed {seed}: test top-1 {record['test_top1']:.4f}, balanced "
            f"{record['test_balanced']:.4f} ({record['seconds']:.1f}s, best epoch "
            f"{record['best_epoch']} of {record['epochs_run']})"
        )
    total = count_parameters(bench.model)
    trainable = runs[0]["trainable_params"]
    return {
        "method": method,
        "label": LABELS.get(method, method),
        "dataset": bench.splits.name,
        "model": bench.loaded.name,
        "lr": best["lr"],
        "val_by_lr": val,
        "tuned": dict(chosen),
        "seeds": list(seeds),
        "test_top1": _stat([r["test_top1"] for r in runs]),
        "test_balanced": _stat([r["test_balanced"] for r in runs]),
        "val_balanced": _stat([r["val_balanced"] for r in runs]),
        "trainable_params": trainable,
        "total_params": total,
        "trainable_pct": 100.0 * trainable / total,
        "train_seconds": _stat([r["seconds"] for r in runs])["mean"],
        "wall_seconds": time.perf_counter() - start,
        "search": None,
        "info": {**best["info"], **extra_info},
        "runs": runs,
    }


def compare(
    methods: Sequence[str],
    data: DataConfig,
    config: TrainConfig,
    seeds: Sequence[int] = (0, 1, 2),
    lr_grid: Sequence[float] = DEFAULT_LR_GRID,
    out_dir: str | Path = "compare",
    *,
    bench: Workbench | None = None,
    scales: Mapping[str, SearchScale] | None = None,
    options: Mapping[str, Any] | None = None,
    meta: Mapping[str, Any] | None = None,
    log: Callable[[str], None] = _log,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Run ``methods`` on one dataset and model; write compare.{md,csv,json,png} to ``out_dir``.

    ``scales`` shrinks a BioTune method's search (``{"biotune-paper": SearchScale(...)}``);
    ``options`` are method options (``lora_rank``, ``l2sp_alpha``, ``rgn_batches``, ...), each given
    to the methods that take it; ``meta`` is stored in the JSON (e.g. the command line). A method
    whose row is in ``out_dir/rows`` from an earlier call with the same settings is not run again
    (other settings: an error), and a BioTune search resumes from its run directory there.
    ``progress`` shows bars on a terminal, else logs a line per method (``biotune.progress``).
    """
    from biotune.runner.workbench import prepare

    methods = _parse_methods(methods)
    seeds = list(seeds)
    if not seeds:
        raise BioTuneError("compare needs at least one seed")
    if len(set(seeds)) != len(seeds):
        raise BioTuneError(f"seeds repeat: {seeds}")
    grid = [float(lr) for lr in lr_grid]
    if not grid or any(not (lr > 0 and math.isfinite(lr)) for lr in grid):
        raise BioTuneError(f"the learning-rate grid needs positive numbers (got {list(lr_grid)})")
    scales = dict(scales or {})
    _check_options(options)
    for m in scales:
        if m not in BIOTUNE_PRESETS:
            raise BioTuneError(f"a search scale applies to {', '.join(BIOTUNE_PRESETS)}, not {m!r}")
        if m not in methods:
            raise BioTuneError(
                f"a search scale is given for {m!r}, which is not among the methods compared "
                f"({', '.join(methods)})"
            )
    searches = {
        m: search_config(m, data, scales.get(m), config) for m in methods if m in BIOTUNE_PRESETS
    }
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BioTuneError(f"cannot create {out}: {exc.strerror}") from None
    settings = {
        m: _row_settings(m, data, config, seeds, grid, options, searches.get(m)) for m in methods
    }
    rows_dir = out / ROWS
    stored = {m: _stored_row(rows_dir / f"{m}.json", settings[m]) for m in methods}
    bench = bench or prepare(data)
    log(f"compare on {bench.splits.describe()} with {bench.loaded.name}: {', '.join(methods)}")
    rows = []
    display = None
    if progress:
        from biotune.progress import CompareProgress

        display = CompareProgress(methods)
    try:
        for method in methods:
            if stored[method] is not None:
                log(f"[{method}] finished earlier: row kept from {rows_dir / f'{method}.json'}")
                rows.append(stored[method])
                if display is not None:
                    display.method_done(method, stored[method], kept=True)
                continue
            plan, search = None, None
            if method in BIOTUNE_PRESETS:
                plan, search = _search_plan(
                    method, searches[method], bench, out, scales.get(method), log, progress
                )
                log(f"[{method}] plan: {search['plan_text']}")
            made_with = {**settings[method], "plan": plan.to_dict() if plan else None}
            row = compare_method(
                method,
                bench,
                config,
                seeds,
                grid,
                options=options,
                plan=plan,
                log=log,
                progress=display,
                records=RunRecords(out / RUNS / method, _digest(made_with)),
            )
            if search is not None:
                row["search"] = search
                row["wall_seconds"] += search["wall_seconds"]
            _keep_row(rows_dir / f"{method}.json", settings[method], row)
            rows.append(row)
            if display is not None:
                display.method_done(method, row)
    finally:
        if display is not None:
            display.close()
    notes = comparison_notes(config, seeds, grid, scales, options, methods)
    for row in rows:
        if row["method"] == "lora":
            info = row["info"]
            notes.append(
                f"LoRA: rank {info['rank']}, alpha {info['alpha']}, adapters on "
                f"{info['adapted']} conv/linear layers; {len(info['skipped'])} grouped "
                "convolutions skipped (PEFT needs the rank to be a multiple of their groups)."
            )
        elif row["method"] == "llrd":
            notes.append(
                f"Layer-wise lr decay: block i of B at lr x decay^(B-1-i) (the head at the lr), "
                f"the decay chosen jointly with the lr on validation: {row['tuned']}."
            )
        elif row["method"] == "lpft":
            head, tune = row["info"]["phases"]
            notes.append(
                f"LP-FT: the head alone for the first {head['epochs']} epochs at lr "
                f"{head['lr']:g} (chosen on validation like linear probing's unless given), "
                f"then every block for up to {tune['epochs']} epochs from that head, each phase "
                "with its own cosine schedule and early stopping."
            )
    write_outputs(
        rows,
        out,
        notes,
        {
            "data": asdict(data),
            "train": config.to_dict(),
            "seeds": seeds,
            "lr_grid": grid,
            **dict(meta or {}),
        },
    )
    return rows


def _row_settings(
    method: str,
    data: DataConfig,
    config: TrainConfig,
    seeds: Sequence[int],
    grid: Sequence[float],
    options: Mapping[str, Any] | None,
    search: SearchConfig | None,
) -> dict[str, Any]:
    """Everything a method's row depends on, as stored in JSON (a rerun must match it)."""
    from biotune.baselines import tuning_options

    taken = tuning_options("plan" if method in BIOTUNE_PRESETS else method)
    settings = {
        "method": method,
        "data": asdict(data),
        "train": config.to_dict(),
        "seeds": list(seeds),
        "lr_grid": list(grid),
        "options": {k: v for k, v in sorted((options or {}).items()) if k in taken},
        "search": search.to_dict() if search is not None else None,
    }
    return json.loads(json.dumps(settings, default=str))


def _digest(settings: Mapping[str, Any]) -> str:
    """A short name for the settings a training run was made with."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _settings_diff(stored: Any, wanted: Any, prefix: str = "") -> list[str]:
    if isinstance(stored, dict) and isinstance(wanted, dict):
        return [
            d
            for k in sorted(set(stored) | set(wanted))
            for d in _settings_diff(stored.get(k), wanted.get(k), f"{prefix}{k}.")
        ]
    return [] if stored == wanted else [f"{prefix.rstrip('.')}: {stored!r} -> {wanted!r}"]


def _read_stored(path: Path, keys: tuple[str, ...], what: str, redo: str) -> tuple | None:
    """The ``keys`` of a stored compare file, None if there is none; a damaged one is a
    one-line error saying how to get rid of it."""
    try:
        stored = json.loads(path.read_text())
        return tuple(stored[k] for k in keys)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise BioTuneError(
            f"{path} is unreadable or not a compare {what} ({exc}); delete it to {redo} again"
        ) from None


def _stored_row(path: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """A method's finished row from an earlier run of the same command; None if there is none.

    A row made with other settings is refused rather than mixed into a table it does not fit.
    """
    stored = _read_stored(path, ("row", "settings"), "row", "run that method")
    if stored is None:
        return None
    row, made_with = stored
    diff = _settings_diff(made_with, settings)
    if diff:
        raise BioTuneError(
            f"{path} was made with other settings ("
            + "; ".join(diff[:3])
            + (f"; and {len(diff) - 3} more" if len(diff) > 3 else "")
            + "); use another --out, or delete it to run that method again"
        )
    return row


def _keep_row(path: Path, settings: dict[str, Any], row: dict[str, Any]) -> None:
    """Store a finished row at once (atomically), so an interrupted compare loses no method."""
    from biotune.runner.rundir import write_json_atomic

    try:
        path.parent.mkdir(exist_ok=True)
        write_json_atomic(path, {"settings": settings, "row": row})
    except OSError as exc:
        raise BioTuneError(f"cannot write {path}: {exc.strerror or exc}") from None


def _check_options(options: Mapping[str, Any] | None) -> None:
    from biotune.baselines import METHODS, BaselineOptions, tuning_options

    known = {o for m in METHODS if m != "plan" for o in tuning_options(m)}
    unknown = sorted(set(options or {}) - known)
    if unknown:
        raise BioTuneError(
            f"unknown method option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    BaselineOptions(**dict(options or {}))  # its checks, before any run


def comparison_notes(
    config: TrainConfig,
    seeds: Sequence[int],
    grid: Sequence[float],
    scales: Mapping[str, SearchScale],
    options: Mapping[str, Any] | None,
    methods: Sequence[str],
) -> list[str]:
    """What a reader of the table must know to judge it."""
    grid_text = ", ".join(f"{lr:g}" for lr in grid)
    notes = [
        f"Every method: {config.optimizer}, {config.scheduler} schedule, up to {config.epochs} "
        f"epochs, early stopping (patience {config.patience}) on validation {config.metric} "
        f"accuracy, batch {config.batch_size}; base lr chosen from {{{grid_text}}} "
        f"on validation with seed {seeds[0]}; test mean +- std over seeds {list(seeds)}.",
        "BioTune rows: the search's best plan (validation only), trained like every other row; "
        "search cost in FT-equivalents of the search's own epoch budget, named beside each "
        "count (one FT-eq (E epochs): the training and validation work of full fine-tuning of "
        "the whole training split for E epochs, as biotune.core.cost counts it) and seconds of "
        "training.",
    ]
    for method in methods:
        if method in scales and scales[method].describe():
            notes.append(
                f"{LABELS[method]}: preset '{BIOTUNE_PRESETS[method]}' scaled to fit the "
                f"budget: {scales[method].describe()}."
            )
    if options:
        notes.append("Method options: " + ", ".join(f"{k}={v}" for k, v in options.items()) + ".")
    return notes


# ---------------------------------------------------------------------------------------------
# outputs


def _pct(stat: Mapping[str, float]) -> str:
    return f"{100 * stat['mean']:.2f} +- {100 * stat['std']:.2f}"


def markdown_table(rows: Sequence[Mapping[str, Any]], with_dataset: bool = False) -> str:
    """The comparison as a markdown table (accuracies in %)."""
    head = [
        "method",
        "test top-1 (%)",
        "test balanced (%)",
        "trainable params (%)",
        "lr",
        "train s/run",
        "wall s",
        "search cost",
    ]
    if with_dataset:
        head.insert(0, "dataset")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        search = r.get("search")
        epochs = search.get("ft_epochs") if search else None
        cost = (
            f"{search['ft_equivalents']:.1f} FT-eq"
            + (f" ({epochs} epochs)" if epochs else "")
            + f", {search['seconds']:.0f} s, {search['evaluations']} evals"
            if search
            else ""
        )
        cells = [
            r["label"],
            _pct(r["test_top1"]),
            _pct(r["test_balanced"]),
            f"{r['trainable_pct']:.2f}",
            baselines.setting_label(r["lr"], r.get("tuned") or {}),
            f"{r['train_seconds']:.1f}",
            f"{r['wall_seconds']:.0f}",
            cost,
        ]
        if with_dataset:
            cells.insert(0, r["dataset"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


CSV_COLUMNS = (
    "dataset",
    "model",
    "method",
    "test_top1_mean",
    "test_top1_std",
    "test_balanced_mean",
    "test_balanced_std",
    "val_balanced_mean",
    "trainable_params",
    "trainable_pct",
    "lr",
    "train_seconds",
    "wall_seconds",
    "search_evaluations",
    "search_ft_equivalents",
    "search_seconds",
    "search_scaling",
)


def csv_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        s = r.get("search") or {}
        out.append(
            {
                "dataset": r["dataset"],
                "model": r["model"],
                "method": r["method"],
                "test_top1_mean": r["test_top1"]["mean"],
                "test_top1_std": r["test_top1"]["std"],
                "test_balanced_mean": r["test_balanced"]["mean"],
                "test_balanced_std": r["test_balanced"]["std"],
                "val_balanced_mean": r["val_balanced"]["mean"],
                "trainable_params": r["trainable_params"],
                "trainable_pct": r["trainable_pct"],
                "lr": r["lr"],
                "train_seconds": r["train_seconds"],
                "wall_seconds": r["wall_seconds"],
                "search_evaluations": s.get("evaluations", ""),
                "search_ft_equivalents": s.get("ft_equivalents", ""),
                "search_seconds": s.get("seconds", ""),
                "search_scaling": s.get("scaling", ""),
            }
        )
    return out


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(csv_rows(rows))


def plot_accuracy_vs_params(rows: Sequence[Mapping[str, Any]], path: Path, title: str = "") -> None:
    """Test top-1 (mean +- std) against % trainable parameters, one labelled point per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.6, 4.4))
    markers = "osD^vP<>Xh"
    for k, r in enumerate(rows):
        x = max(r["trainable_pct"], 1e-3)
        y, err = 100 * r["test_top1"]["mean"], 100 * r["test_top1"]["std"]
        biotune = r["method"] in BIOTUNE_PRESETS
        ax.errorbar(
            x,
            y,
            yerr=err,
            fmt="*" if biotune else markers[k % len(markers)],
            ms=13 if biotune else 7,
            capsize=3,
            alpha=0.85,
            label=r["label"],
        )
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (% of the model, log scale)")
    ax.set_ylabel("test top-1 accuracy (%)")
    ax.set_title(title or "accuracy against trainable parameters")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(
    rows: Sequence[Mapping[str, Any]],
    out_dir: Path,
    notes: Sequence[str],
    meta: Mapping[str, Any],
) -> list[Path]:
    """compare.md, compare.csv, compare.json and compare.png in ``out_dir``."""
    from biotune.runner.final import machine_description
    from biotune.runner.rundir import write_json_atomic

    date = time.strftime("%Y-%m-%d %H:%M")
    machine = machine_description()
    title = f"{rows[0]['dataset']} / {rows[0]['model']}" if rows else "comparison"
    paths = [out_dir / name for name in OUTPUTS]
    md = [f"# {title}", "", f"{date}; {machine}", ""]
    if meta.get("command"):
        md += [f"Command: `{meta['command']}`", ""]
    md += [markdown_table(rows), *[f"- {n}" for n in notes], ""]
    paths[0].write_text("\n".join(md))
    write_csv(rows, paths[1])
    write_json_atomic(
        paths[2],
        {"date": date, "machine": machine, **dict(meta), "notes": list(notes), "rows": list(rows)},
    )
    plot_accuracy_vs_params(rows, paths[3], title)
    return paths
