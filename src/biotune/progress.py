"""Progress that works everywhere: live bars on a terminal, plain log lines anywhere else.

Every message goes through :mod:`logging` (the ``biotune`` logger and its children), so a library
user routes them like any other; the command line sends them to stderr (``setup_logging``). On a
terminal, rich bars (with an ETA) show the search, each final training seed by epoch, and
``biotune compare`` by method. When stderr is not a terminal (a log file, CI, nohup, a cluster
job) there are no bars: one line per finished evaluation, generation, epoch, run and method,
never cut short. The per-evaluation and per-epoch lines are logged at DEBUG while bars show them.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Column

from biotune.callbacks import Callback, plan_text

_lines = logging.getLogger("biotune.progress")


def on_terminal(stream: Any = None) -> bool:
    """Whether ``stream`` (stderr) is an interactive terminal that can redraw a bar."""
    stream = stream if stream is not None else sys.stderr
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and os.environ.get("TERM") != "dumb"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a message comes: above a live rich display
    (which redirects it), or into a test's capture."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def setup_logging(quiet: bool = False) -> None:
    """For the command line: ``biotune`` messages on stderr, one plain line each, with the clock
    time in front when stderr is not a terminal; ``quiet`` keeps only warnings and errors."""
    logger = logging.getLogger("biotune")
    for handler in [h for h in logger.handlers if isinstance(h, _StderrHandler)]:
        logger.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(
        logging.Formatter("%(message)s")
        if on_terminal()
        else logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    )
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)


def _ensure_output() -> None:
    """A progress display was asked for but logging is not configured at all: print the lines
    on stderr rather than drop them (a configured application decides for itself)."""
    if not logging.getLogger().handlers and not logging.getLogger("biotune").handlers:
        setup_logging()


def duration(seconds: float) -> str:
    """'8.1s', '3m20s', '2h05m'."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def eta(elapsed: float, done: int, total: int) -> str:
    """'eta 3m20s' from the mean time per finished item so far ('' before the first)."""
    if done <= 0 or total <= done:
        return ""
    return f"eta {duration(elapsed / done * (total - done))}"


class _Display:
    """The one live rich display of this process. Nested reporters (compare, its searches, their
    final trainings) add bars to it instead of fighting over the terminal; a nested reporter's
    bars go when it closes, the outermost one's stay on screen."""

    def __init__(self) -> None:
        self.progress: Progress | None = None
        self.users = 0

    def open(self, console: Console | None) -> Progress:
        if self.progress is None:
            self.progress = Progress(
                TextColumn("[bold]{task.description}[/bold]"),
                BarColumn(bar_width=24),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                # On a narrow terminal the status gives way, never the bar and its times.
                TextColumn(
                    "{task.fields[status]}",
                    table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1),
                ),
                console=console or Console(stderr=True),
                speed_estimate_period=3600,
                expand=True,
            )
            self.progress.start()
        self.users += 1
        return self.progress

    def close(self, tasks: Sequence[Any]) -> None:
        if self.progress is None:
            return
        self.users -= 1
        if self.users > 0:
            for task in tasks:
                self.progress.remove_task(task)
            return
        self.progress.stop()
        self.progress = None


_DISPLAY = _Display()


class _Reporter(Callback):
    """Bars on a terminal (or a given rich console), else log lines; ``bars`` forces either."""

    def __init__(self, console: Console | None = None, bars: bool | None = None) -> None:
        self.console = console
        self.bars = bars if bars is not None else (console is not None or on_terminal())
        self._progress: Progress | None = None
        self._tasks: list[Any] = []
        if not self.bars:
            _ensure_output()

    def _add(self, description: str, total: int, completed: int = 0) -> Any:
        if self._progress is None:
            self._progress = _DISPLAY.open(self.console)
        task = self._progress.add_task(description, total=total, completed=completed, status="")
        self._tasks.append(task)
        return task

    def _update(self, task: Any, **changes: Any) -> None:
        if self._progress is not None and task is not None:
            self._progress.update(task, **changes)

    def _say(self, text: str, always: bool = False) -> None:
        """A line for the log: INFO, or DEBUG while a bar shows the same (unless ``always``)."""
        _lines.log(logging.INFO if always or not self.bars else logging.DEBUG, text)

    def close(self) -> None:
        if self._progress is not None:
            _DISPLAY.close(self._tasks)
            self._progress, self._tasks = None, []


class TrainingProgress(_Reporter):
    """Final trainings: a bar per seed over its epochs, or a line per epoch and per run.

    ``label`` names them ("final training" after a search, "training" for ``biotune train``);
    ``metric`` is the validation metric that early stopping watches.
    """

    def __init__(
        self,
        metric: str = "balanced",
        label: str = "final training",
        console: Console | None = None,
        bars: bool | None = None,
    ) -> None:
        from biotune.reports import score_name

        super().__init__(console, bars)
        self.metric = metric
        self.label = label
        self._val = f"val {score_name(metric)}"
        # One entry per training run, keyed by its name ("final training seed 0").
        self._task: dict[str, Any] = {}
        self._epochs: dict[str, int] = {}
        self._started: dict[str, float] = {}
        self._best: dict[str, float] = {}

    def _run_start(self, key: str, epochs: int, line: bool = True) -> None:
        self._epochs[key] = epochs
        self._started[key] = time.perf_counter()
        self._best[key] = -1.0
        if self.bars:
            self._task[key] = self._add(key, epochs)
        if line:
            self._say(f"{key}: up to {epochs} epochs")

    def _run_epoch(self, key: str, epoch: dict[str, float]) -> None:
        n, total = int(epoch["epoch"]), self._epochs.get(key, 0)
        score = epoch.get(f"val_{self.metric}", float("nan"))
        self._best[key] = max(self._best.get(key, -1.0), score)
        text = (
            f"train loss {epoch['train_loss']:.4f}, {self._val} {score:.4f} "
            f"(best {self._best[key]:.4f})"
        )
        self._update(self._task.get(key), advance=1, status=text)
        elapsed = time.perf_counter() - self._started.get(key, time.perf_counter())
        later = eta(elapsed, n, total)
        self._say(
            f"{key}: epoch {n}/{total}, {text}, "
            f"{epoch['seconds']:.1f}s" + (f" | {later} at most" if later else "")
        )

    def _run_end(self, key: str, epochs_run: int, status: str) -> None:
        self._update(self._task.get(key), total=epochs_run, completed=epochs_run, status=status)

    def on_final_start(self, seed: int, epochs: int) -> None:
        self._run_start(f"{self.label} seed {seed}", epochs)

    def on_final_epoch(self, seed: int, epoch: dict[str, float]) -> None:
        self._run_epoch(f"{self.label} seed {seed}", epoch)

    def on_final_run(self, record: dict[str, Any]) -> None:
        key = f"{self.label} seed {record['seed']}"
        tested = (
            f"test top-1 {record['test_top1']:.4f}, balanced {record['test_balanced']:.4f}"
            if record.get("test_top1") is not None
            else "no test split"
        )
        stopped = f"best epoch {record['best_epoch']} of {record['epochs_run']}"
        self._run_end(key, record["epochs_run"], f"{tested} ({stopped})")
        self._say(f"{key} done in {duration(record['seconds'])}: {tested} ({stopped})", always=True)


class SearchProgress(TrainingProgress):
    """A search and then its final training (see ``TrainingProgress``).

    Its "best" is the best of the latest finished generation: the plan the search would return
    now, the winner once the search ends. ``metric`` (the protocol's) names the score. With a
    ``budget`` (``max_ft_equivalents``) the cost, not the count, ends the search: its lines give
    no count to reach and no time left. A ``sampler`` other than the evolution has no
    generations, so its lines name none.
    """

    def __init__(
        self,
        console: Console | None = None,
        metric: str | None = None,
        bars: bool | None = None,
        budget: float | None = None,
        sampler: str = "evolution",
    ) -> None:
        from biotune.reports import score_name

        super().__init__(metric or "balanced", "final training", console, bars)
        self._budget = budget
        # random search and TPE have no generations: their lines count plans instead
        self._evolution = sampler == "evolution"
        self._score = f"val {score_name(metric)}" if metric else "val score"
        self._search: Any = None
        self._total = self._done = self._seen = 0
        self._start = time.perf_counter()
        self._generation: dict[str, Any] | None = None
        self._last = ""
        self._reranks = 0

    @classmethod
    def for_search(cls, config: Any, **options: Any) -> SearchProgress:
        """The progress of a search of ``config`` (a ``SearchConfig``): its score, cost limit
        and sampler."""
        return cls(
            metric=config.protocol.train.metric,
            budget=config.max_ft_equivalents,
            sampler=config.sampler,
            **options,
        )

    def best_text(self) -> str:
        """'best val balanced accuracy 0.653 (gen 3)', or '' before a generation finished."""
        g = self._generation
        if g is None:
            return ""
        where = f" (gen {g['generation']})" if self._evolution else ""
        return f"best {self._score} {1 - g['best']:.3f}{where}"

    def on_search_start(self, total: int, done: int) -> None:
        self._total, self._done, self._seen = total, done, 0
        self._start = time.perf_counter()
        if self.bars:
            self._search = self._add("search", total, done)
        earlier = f", {done} done earlier" if done else ""
        if self._budget is None:
            self._say(f"search: {total} evaluations{earlier}", always=True)
        else:
            self._say(
                f"search: until its evaluations cost {self._budget:g} FT-equivalents (at most "
                f"{total}){earlier}",
                always=True,
            )

    def on_evaluation(self, record: dict[str, Any]) -> None:
        self._done += 1
        self._seen += 1
        fitness = record["fitness"]
        twin = record.get("reused_from")
        reused = "" if twin is None else f", as candidate {twin} (memoised)"
        where = (
            f"generation {record['generation']}, fold {record['fold']}, {record['role']}"
            if self._evolution
            else f"fold {record['fold']}"
        )
        self._last = (
            f"{where} | last: {record['status']} {1 - fitness:.3f} ({record['seconds']:.1f}s)"
        )
        best = self.best_text()
        self._update(self._search, advance=1, status=self._last + (f" | {best}" if best else ""))
        elapsed = time.perf_counter() - self._start
        later = eta(elapsed, self._seen, self._seen + self._total - self._done)
        count = f"{self._done}/{self._total}"
        if self._budget is not None:  # the cost ends the search: no count to reach, no eta
            count, later = str(self._done), ""
        self._say(
            f"evaluation {count} ({where}): {record['status']}, {self._score} "
            f"{1 - fitness:.4f} in {record['seconds']:.1f}s{reused}"
            + (f" | {best}" if best else "")
            + f" | {duration(elapsed)} elapsed"
            + (f", {later}" if later else "")
        )

    def on_generation(self, summary: dict[str, Any]) -> None:
        self._generation = summary
        self._update(self._search, status=self._last + f" | {self.best_text()}")
        plan = plan_text(summary.get("best_plan") or {})
        head = (
            f"generation {summary['generation']} done: best {self._score} "
            f"{1 - summary['best']:.4f}, mean {1 - summary['mean']:.4f}"
            if self._evolution
            else f"{self._done} plans scored: best {self._score} {1 - summary['best']:.4f}"
        )
        self._say(head + (f"; best plan {plan}" if plan else ""), always=True)

    def _rerank_key(self, rank: int) -> str:
        return f"re-rank {rank + 1}/{self._reranks}"

    def on_rerank_start(self, rank: int, total: int, plan: dict[str, Any], epochs: int) -> None:
        # The search logs which plan each re-ranking run trains; the display adds its epochs.
        self._reranks = total
        self._run_start(self._rerank_key(rank), epochs, line=False)

    def on_rerank_epoch(self, rank: int, epoch: dict[str, float]) -> None:
        self._run_epoch(self._rerank_key(rank), epoch)

    def on_rerank_run(self, record: dict[str, Any]) -> None:
        score = record.get(f"val_{self.metric}", record["val_balanced"])
        status = f"{self._val} {score:.4f} (best epoch {record['best_epoch']})"
        self._run_end(self._rerank_key(record["rank"]), record["epochs_run"], status)

    def on_search_end(self, finished: bool) -> None:
        best = self.best_text()
        state = "done" if finished else "stopped"
        self._update(self._search, status=f"{state}" + (f" | {best}" if best else ""))
        self._say(
            f"search {state} after {duration(time.perf_counter() - self._start)}"
            + (f": {best}" if best else ""),
            always=True,
        )


class CompareProgress(_Reporter):
    """``biotune compare``: a bar over the methods and one over the current method's training
    runs (its learning-rate grid, then the other seeds), or one line per finished method."""

    def __init__(
        self,
        methods: Sequence[str],
        console: Console | None = None,
        bars: bool | None = None,
    ) -> None:
        super().__init__(console, bars)
        self.methods = list(methods)
        self._done = 0
        self._timed = 0  # methods trained here (not kept from an earlier run), for the ETA
        self._start = time.perf_counter()
        self._overall = self._add("compare", len(self.methods)) if self.bars else None
        self._method: Any = None
        self._method_start = self._start

    def method_start(self, method: str, runs: int) -> None:
        self._method_start = time.perf_counter()
        if self.bars:
            self._method = self._add(f"[{method}]", runs)

    def run_done(self) -> None:
        self._update(self._method, advance=1)

    def method_done(self, method: str, row: dict[str, Any], kept: bool = False) -> None:
        self._done += 1
        if not kept:
            self._timed += 1
        self._update(self._overall, advance=1)
        if self._method is not None and self._progress is not None:
            self._progress.remove_task(self._method)
            self._tasks.remove(self._method)
            self._method = None
        t1 = row["test_top1"]
        spent = (
            "kept from an earlier run"
            if kept
            else f"in {duration(time.perf_counter() - self._method_start)}"
        )
        elapsed = time.perf_counter() - self._start
        later = eta(elapsed, self._timed, self._timed + len(self.methods) - self._done)
        self._say(
            f"compare: {method} done ({self._done}/{len(self.methods)}) {spent}: test "
            f"top-1 {t1['mean']:.4f} +- {t1['std']:.4f}" + (f" | {later}" if later else ""),
            always=True,
        )
