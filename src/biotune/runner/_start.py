"""The start of ``Search.run_search``: load the model and data, refuse a run directory that holds
another search (or this one on another model, other data or other blocks), rebuild the
evolution, and write the directory's header (configuration, blocks, partition)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from biotune import __version__
from biotune.core.evolution import BioTuneEvolution
from biotune.core.samplers import SAMPLERS
from biotune.errors import BioTuneError
from biotune.inputs import data_fingerprint, model_fingerprint, weights_fingerprint
from biotune.runner import workbench
from biotune.runner.config import SearchConfig
from biotune.runner.fitness import MACHINE_SETTINGS, Evaluator
from biotune.runner.rundir import BLOCKS, CONFIG, PARTITION, STATE, RunDirectory

if TYPE_CHECKING:
    from biotune.runner.search import Search

_log = logging.getLogger("biotune.search")


@dataclass
class Started:
    """What the loop starts from: the evaluator, the evolution, the records of earlier
    invocations, and the partition record (its fingerprint goes into ``best_plan.json``)."""

    evaluator: Evaluator
    evo: BioTuneEvolution
    records: list[dict[str, Any]]
    partition: dict[str, Any]
    fingerprints: dict[str, str]


def check_config(run: RunDirectory, config: SearchConfig, resume: bool) -> bool:
    """Refuse to mix searches in one directory; True when this is a new search."""
    wanted = config.to_dict()
    stored = run.read(CONFIG) if run.exists() else None
    if stored is None:
        if resume:
            raise BioTuneError(f"nothing to resume: {run.path} holds no search")
        if any(run.path.glob("*.json*")):
            raise BioTuneError(f"run directory {run.path} already holds files; choose a new one")
        return True
    if not resume:
        raise BioTuneError(
            f"run directory {run.path} already holds a search; use --resume to continue "
            "it or choose a new directory"
        )
    diff = _config_diff(_results_config(stored["search"]), _results_config(wanted))
    if diff:
        raise BioTuneError(
            f"cannot resume {run.path} with a different configuration ("
            + "; ".join(diff[:3])
            + (f"; and {len(diff) - 3} more" if len(diff) > 3 else "")
            + ")"
        )
    return False


def _results_config(search: Any) -> Any:
    """A stored configuration less the settings of the machine (``MACHINE_SETTINGS``), which
    change no result: a search resumes under another cache budget."""
    protocol = search.get("protocol") if isinstance(search, dict) else None
    if not isinstance(protocol, dict):
        return search
    kept = {k: v for k, v in protocol.items() if k not in MACHINE_SETTINGS}
    return {**search, "protocol": kept}


def evaluation_workers(search: Search) -> int:
    """How many evaluators share this machine's memory: the workers, or this process alone."""
    return 1 if search.executor == "inprocess" else max(1, search.workers)


def workers_per_gpu(search: Search) -> int:
    """How many evaluators share one GPU, at most: ``per_gpu``, no more than the workers (the
    executors deal the workers round-robin over the GPUs), or this process alone."""
    return min(search.per_gpu, evaluation_workers(search))


def load_and_check(search: Search, new: bool) -> Started:
    """Load and check everything (data, model, blocks, folds, budget) before anything is
    written; a resumed search must find the model, data and blocks it started with."""
    bench = search.bench or workbench.prepare(search.config.data)
    _log.info("data: %s", bench.splits.describe())
    search.bench = bench
    evaluator = workbench.evaluator_for(
        bench, search.config, evaluation_workers(search), workers_per_gpu(search)
    )
    if evaluator.cache_status.startswith("off:"):  # asked for, and not possible: say why
        _log.info("feature cache %s", evaluator.cache_status)
    search.budget = workbench.search_budget(bench, search.config, evaluator.flops)
    records = search.run.evaluations()
    partition = workbench.partition_record(bench)
    prints = {
        "model": model_fingerprint(bench.model),
        "data": data_fingerprint(bench.splits),
        "weights": weights_fingerprint(bench.model, bench.partition),
    }
    if not new:
        _check_partition(search.run, partition, bench.partition.names, records)
        _check_fingerprints(search.run, prints)
    hooks = search.budget.evolution_hooks() if search.budget else {}
    state = search.run.read(STATE)
    lost = _lost(state, records)
    if lost:
        _log.info(
            "%d evaluation record(s) lost (candidates %s): the search replays its steps from "
            "the start and evaluates them again",
            len(lost),
            ", ".join(map(str, lost[:5])) + (", ..." if len(lost) > 5 else ""),
        )
        state = None
    sampler = SAMPLERS[search.config.sampler]
    if state is not None:
        evo = sampler.from_state_dict(state, **hooks)
    else:
        evo = sampler(
            len(bench.partition), search.config.evolution, seed=search.config.seed, **hooks
        )
    return Started(evaluator, evo, records, partition, prints)


def _lost(state: Any, records: list[dict[str, Any]]) -> list[int]:
    """Candidates the stored evolution was told about whose records are gone (a damaged line of
    evaluations.jsonl, skipped): it cannot ask for them again, so the search restarts its
    steps from the beginning, where every recorded candidate is taken from its record."""
    if not isinstance(state, dict):
        return []
    pending = {c.get("id") for c in state.get("pending", [])}
    recorded = {r["candidate"] for r in records}
    told = range(int(state.get("next_id", 0)))
    return [i for i in told if i not in pending and i not in recorded]


def evaluator_factory(search: Search) -> Callable[[], Evaluator]:
    """How workers rebuild the evaluator: from the configuration, or from the given bench
    (pickled to them) when the caller brought its own model or data."""
    workers, per_gpu = evaluation_workers(search), workers_per_gpu(search)
    if search.bench_given:
        return functools.partial(
            workbench.evaluator_for, search.bench, search.config, workers, per_gpu
        )
    return functools.partial(workbench.build_evaluator, search.config, workers, per_gpu)


def write_header(search: Search, started: Started, new: bool) -> None:
    """The configuration (a new search), the blocks' sizes, and the partition record."""
    assert search.bench is not None
    if new:
        search._write(
            CONFIG,
            {
                "biotune": __version__,
                "search": search.config.to_dict(),
                "fingerprints": started.fingerprints,
            },
        )
    search._write(
        BLOCKS,
        [{"name": n, "params": p, "share": s} for n, p, s in search.bench.partition.summary()],
    )
    if new or search.run.read(PARTITION) is None:
        search._write(PARTITION, started.partition)


def _config_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _config_diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}: {va!r} -> {vb!r}")
    return out


def _check_fingerprints(run: RunDirectory, current: dict[str, str]) -> None:
    """Refuse to resume on another model, other weights or other data than the search started
    with (a fingerprint a run directory does not hold, being older than it, is not checked)."""
    stored = (run.read(CONFIG) or {}).get("fingerprints") or {}
    for what, words in (
        ("model", "the model (its class, parameter names or shapes)"),
        ("data", "the data (sizes, classes, labels or files)"),
        ("weights", "the model's weights (a hash of its state dict, the new head excepted)"),
    ):
        if stored.get(what) and stored[what] != current[what]:
            raise BioTuneError(
                f"cannot resume {run.path}: {words} changed since the search started; "
                "resume with the model and data it started with"
            )


def _check_partition(
    run: RunDirectory,
    current: dict[str, Any],
    names: tuple[str, ...],
    records: list[dict[str, Any]],
) -> None:
    """Refuse to resume on other blocks: every stored gene would steer another block."""
    refuse = (
        f"cannot resume {run.path}: the model's blocks changed since the search started "
        "({}); resume with the model and blocks it started with"
    )
    stored = run.read(PARTITION)
    if stored is not None:
        if stored.get("fingerprint") != current["fingerprint"]:
            raise BioTuneError(
                refuse.format(_partition_changes(stored.get("blocks", []), current["blocks"]))
            )
        return
    # A run directory from before partitions were stored: check what its records show.
    state = run.read(STATE)
    if isinstance(state, dict) and state.get("num_blocks", len(names)) != len(names):
        raise BioTuneError(refuse.format(f"{state['num_blocks']} blocks, now {len(names)}"))
    for rec in records[:1]:
        plan = rec["plan"] if isinstance(rec["plan"], dict) else {}
        old = tuple(str(b.get("name")) for b in plan.get("blocks", []))
        if old != names:
            raise BioTuneError(refuse.format(f"{', '.join(old)} -> {', '.join(names)}"))


def _partition_changes(stored: list[dict[str, Any]], current: list[dict[str, Any]]) -> str:
    """Which blocks differ between two partition records, in a few words."""
    old = {b.get("name"): b.get("fingerprint") for b in stored}
    new = {b["name"]: b["fingerprint"] for b in current}

    def names(found: list[Any]) -> str:
        more = f" and {len(found) - 4} more" if len(found) > 4 else ""
        return ", ".join(map(str, found[:4])) + more

    parts = []
    for what, found in (
        ("removed", [n for n in old if n not in new]),
        ("added", [n for n in new if n not in old]),
        ("changed", [n for n in new if n in old and old[n] != new[n]]),
    ):
        if found:
            parts.append(f"{what} {names(found)}")
    return f"{len(old)} blocks, now {len(new)}: " + ("; ".join(parts) or "reordered")
