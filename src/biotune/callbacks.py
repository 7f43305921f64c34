"""Callbacks: what a search tells the code that watches it, and two loggers built on them.

Give ``Search(..., callbacks=[...])`` (or ``biotune.search(callbacks=[...])``) any objects with
some of the methods of :class:`Callback`; a missing method is simply not called. They run in the
driver process, in this order::

    on_search_start(total, done)       the search loop (re)starts
    on_evaluation(record)              after each evaluation is recorded       (many)
    on_generation(summary)             after each generation                   (one per generation)
    on_search_end(finished)            the loop stopped: finished, or interrupted (resumable)
    on_rerank_start(rank, total, plan, epochs)   per re-ranked plan (``--rerank K``, K > 1):
    on_rerank_epoch(rank, epoch)           after each epoch's validation
    on_rerank_run(record)                  trained and scored on validation
    on_final_start(seed, epochs)       per final training seed:
    on_final_epoch(seed, epoch)            after each epoch's validation
    on_final_run(record)                   trained and tested
    close()                            always, last, even after an error or Ctrl-C

A callback that raises stops the search like any error; every record written before stays, so
``--resume`` continues it. The built-in ones: :class:`CSVLogger` (cheap, always on in
``biotune search``), :class:`TensorBoardLogger` (``--log tensorboard``) and the progress display
(:mod:`biotune.progress`). This module imports no torch: the command line sets up its logging
with it before anything heavy loads.
"""

from __future__ import annotations

import csv
import importlib.util
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from biotune.errors import BioTuneError

TENSORBOARD_MISSING = "--log tensorboard needs tensorboard: pip install 'biotune[tensorboard]'"


class Callback:
    """Every hook a search calls; subclass it and override what you need (each does nothing).

    Records are plain dicts, as the run directory stores them: ``record`` of
    ``on_evaluation`` is a line of evaluations.jsonl (``candidate``, ``generation``, ``role``,
    ``fold``, ``plan``, ``fitness`` = 1 - validation score, ``status``, ``seconds``, ...) and
    ``record`` of ``on_final_run`` a line of final_runs.jsonl (``seed``, ``test_top1``,
    ``test_balanced``, ``best_epoch``, ``epochs_run``, ``seconds``, ...).
    """

    def on_search_start(self, total: int, done: int) -> None:
        """``total`` evaluations in the whole search; ``done`` of them recorded before (resume)."""

    def on_evaluation(self, record: dict[str, Any]) -> None:
        """An evaluation was scored and recorded (memoised ones included, ``reused_from`` set)."""

    def on_generation(self, summary: dict[str, Any]) -> None:
        """A generation finished: ``generation``, ``best`` and ``mean`` fitness, ``fitness`` (the
        ranked population), ``best_id`` and ``best_plan`` (the plan the search would return now,
        as a dict)."""

    def on_search_end(self, finished: bool) -> None:
        """The search loop stopped; ``finished`` False means interrupted or failed."""

    def on_rerank_start(self, rank: int, total: int, plan: dict[str, Any], epochs: int) -> None:
        """Re-ranking trains plan ``rank`` (from 0, the search's order) of ``total`` with the
        final recipe (seed ``final_seeds[0]``, at most ``epochs`` epochs). The winner's run
        becomes that seed's final run: it gets ``on_final_run`` but no ``on_final_start``."""

    def on_rerank_epoch(self, rank: int, epoch: dict[str, float]) -> None:
        """One epoch of a re-ranking run (the fields of ``on_final_epoch``)."""

    def on_rerank_run(self, record: dict[str, Any]) -> None:
        """A re-ranking run ended: a line of rerank.jsonl (``rank``, ``candidate``, ``plan``,
        ``fitness``: its search score, ``val_balanced``, ``test_top1``, ...)."""

    def on_final_start(self, seed: int, epochs: int) -> None:
        """A final training starts: ``seed``, at most ``epochs`` epochs (early stopping)."""

    def on_final_epoch(self, seed: int, epoch: dict[str, float]) -> None:
        """One epoch of a final training: ``epoch`` (from 1), ``train_loss``, ``val_top1``,
        ``val_balanced``, ``val_loss``, ``val_likelihood`` and ``seconds``."""

    def on_final_run(self, record: dict[str, Any]) -> None:
        """A final training ended (best epoch restored) and was tested once."""

    def close(self) -> None:
        """The run is over, however it ended: release files and displays."""


def emit(callbacks: Sequence[Any], event: str, *args: Any) -> None:
    """Call ``event`` on every callback that has it, in order."""
    for callback in callbacks:
        method = getattr(callback, event, None)
        if method is not None:
            method(*args)


def plan_text(plan: dict[str, Any]) -> str:
    """'4/10 blocks: blocks.3 x1.2, ...' for a plan dict ('' if it is not one)."""
    from biotune.core.plan import FineTunePlan

    try:
        return FineTunePlan.from_dict(plan).describe()
    except BioTuneError:
        return ""


def multipliers(plan: dict[str, Any]) -> dict[str, float]:
    """Each block's learning-rate multiplier in a plan dict, 0 for a frozen block."""
    return {
        str(b.get("name")): float(b.get("lr_mult", 1.0)) if b.get("train") else 0.0
        for b in plan.get("blocks", [])
    }


# ------------------------------------------------------------------------------------------- CSV


class CSVLogger(Callback):
    """Spreadsheet-ready logs in ``folder``: evaluations.csv, generations.csv (with the best
    plan's multiplier per block, 0 = frozen), rerank_epochs.csv and rerank_runs.csv (when
    plans are re-ranked), final_epochs.csv and final_runs.csv.

    Each row is appended (and the file closed) at once, so the files survive a kill; a resumed
    search appends its new rows to them, as an uninterrupted one would have: the epochs of a
    training a kill cut short are cut off when it starts again (the file's size at its start
    is kept in a hidden ``.NAME.attempt`` file until it ends), and a generation or an
    evaluation logged again replaces its row. Nothing is created before the first event.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def _append(self, name: str, row: dict[str, Any], key: str | None = None) -> None:
        """Append ``row``; with ``key``, rows already there with its value of ``key`` go."""
        path = self.folder / name
        self.folder.mkdir(parents=True, exist_ok=True)
        columns = list(row)
        if path.exists() and path.stat().st_size > 0:
            with open(path, newline="") as f:
                rows = list(csv.reader(f))
            columns = rows[0] if rows and rows[0] else columns
            if key is not None and key in columns:
                at = columns.index(key)
                kept = [r for r in rows[1:] if len(r) <= at or r[at] != str(row[key])]
                if len(kept) < len(rows) - 1:
                    self._rewrite(path, [columns, *kept])
            new = False
        else:
            new = True
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)

    @staticmethod
    def _rewrite(path: Path, rows: list[list[str]]) -> None:
        from biotune.runner.rundir import write_text_atomic

        text = io.StringIO()
        csv.writer(text).writerows(rows)
        write_text_atomic(path, text.getvalue())

    def _start_attempt(self, name: str) -> None:
        """A training starts logging epochs to ``name``: cut off the rows of an attempt that
        never ended (killed; the search trains it again now), then note where this one starts."""
        path, marker = self.folder / name, self.folder / f".{name}.attempt"
        self.folder.mkdir(parents=True, exist_ok=True)
        size = path.stat().st_size if path.exists() else 0
        if marker.exists():
            start = int(marker.read_text() or 0)
            if start < size:
                with open(path, "r+b") as f:
                    f.truncate(start)
                size = start
        marker.write_text(str(size))

    def _end_attempt(self, name: str) -> None:
        (self.folder / f".{name}.attempt").unlink(missing_ok=True)

    def on_evaluation(self, record: dict[str, Any]) -> None:
        self._append(
            "evaluations.csv",
            {
                "candidate": record.get("candidate"),
                "generation": record.get("generation"),
                "role": record.get("role"),
                "fold": record.get("fold"),
                "status": record.get("status"),
                "fitness": record.get("fitness"),
                "val_score": 1 - record["fitness"] if record.get("fitness") is not None else "",
                "seconds": record.get("seconds"),
                "epochs": " ".join(str(e) for e in record.get("epochs", [])),
                "cached_prefix": record.get("cached_prefix", 0),
                "reused_from": "" if record.get("reused_from") is None else record["reused_from"],
                "plan": plan_text(record.get("plan") or {}),
            },
            key="candidate",
        )

    def on_generation(self, summary: dict[str, Any]) -> None:
        plan = summary.get("best_plan") or {}
        self._append(
            "generations.csv",
            {
                "generation": summary["generation"],
                "best_fitness": summary["best"],
                "best_val_score": 1 - summary["best"],
                "mean_fitness": summary["mean"],
                "best_id": summary.get("best_id"),
                "best_plan": plan_text(plan),
                **{f"lr_mult:{name}": m for name, m in multipliers(plan).items()},
            },
            key="generation",
        )

    def on_rerank_start(self, rank: int, total: int, plan: dict[str, Any], epochs: int) -> None:
        self._start_attempt("rerank_epochs.csv")

    def on_rerank_epoch(self, rank: int, epoch: dict[str, float]) -> None:
        self._append("rerank_epochs.csv", {"rank": rank, **epoch})

    def on_rerank_run(self, record: dict[str, Any]) -> None:
        self._end_attempt("rerank_epochs.csv")
        row = {k: v for k, v in record.items() if k not in ("plan", "history", "work")}
        self._append("rerank_runs.csv", {**row, "plan": plan_text(record.get("plan") or {})})

    def on_final_start(self, seed: int, epochs: int) -> None:
        self._start_attempt("final_epochs.csv")

    def on_final_epoch(self, seed: int, epoch: dict[str, float]) -> None:
        self._append("final_epochs.csv", {"seed": seed, **epoch})

    def on_final_run(self, record: dict[str, Any]) -> None:
        self._end_attempt("final_epochs.csv")
        self._append("final_runs.csv", record)


# ----------------------------------------------------------------------------------- TensorBoard


class TensorBoardLogger(Callback):
    """TensorBoard event files in ``folder`` (``tensorboard --logdir FOLDER``): search/fitness per
    evaluation, search/best and search/mean per generation, best_plan/BLOCK (its learning-rate
    multiplier, 0 = frozen) per generation, rerank/rank_R/... per epoch and rerank/val_balanced
    per re-ranked plan, final/seed_S/... per epoch and final/test_* per seed.

    Needs the ``tensorboard`` package (``pip install 'biotune[tensorboard]'``), checked here so
    that a search does not start only to fail at its first record.
    """

    def __init__(self, folder: str | Path) -> None:
        if not self.available():
            raise BioTuneError(TENSORBOARD_MISSING)
        self.folder = Path(folder)
        self._writer: Any = None

    @staticmethod
    def available() -> bool:
        """Whether the ``tensorboard`` package is installed."""
        return importlib.util.find_spec("tensorboard") is not None

    @property
    def writer(self) -> Any:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.folder))
        return self._writer

    def on_evaluation(self, record: dict[str, Any]) -> None:
        step = record["candidate"]
        self.writer.add_scalar("search/fitness", record["fitness"], step)
        self.writer.add_scalar("search/val_score", 1 - record["fitness"], step)

    def on_generation(self, summary: dict[str, Any]) -> None:
        step = summary["generation"]
        self.writer.add_scalar("search/best", summary["best"], step)
        self.writer.add_scalar("search/mean", summary["mean"], step)
        plan = summary.get("best_plan") or {}
        for name, mult in multipliers(plan).items():
            self.writer.add_scalar(f"best_plan/{name}", mult, step)
        self.writer.add_text("best_plan", plan_text(plan), step)
        self.writer.flush()

    def _curves(self, prefix: str, epoch: dict[str, float]) -> None:
        """One point per epoch on each of a training run's curves (``prefix/train_loss``, ...)."""
        step = int(epoch["epoch"])
        for key, value in epoch.items():
            if key != "epoch":
                self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def on_rerank_epoch(self, rank: int, epoch: dict[str, float]) -> None:
        self._curves(f"rerank/rank_{rank}", epoch)

    def on_rerank_run(self, record: dict[str, Any]) -> None:
        self.writer.add_scalar("rerank/val_balanced", record["val_balanced"], record["rank"])
        self.writer.add_text("rerank/plan", plan_text(record.get("plan") or {}), record["rank"])
        self.writer.flush()

    def on_final_epoch(self, seed: int, epoch: dict[str, float]) -> None:
        self._curves(f"final/seed_{seed}", epoch)

    def on_final_run(self, record: dict[str, Any]) -> None:
        for key in ("test_top1", "test_balanced"):
            if record.get(key) is not None:
                self.writer.add_scalar(f"final/{key}", record[key], record["seed"])
        self.writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
