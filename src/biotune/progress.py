"""A live view of a search: evaluations done, the generation, the best plan's score so far."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from biotune.fitness import Evaluation


class SearchProgress:
    """A rich progress bar on stderr.

    Its "best" is the evolution's (``BioTuneEvolution.best``): the best of the latest finished
    generation, the plan the search would return now. The runner reports an evaluation before
    telling the evolution, so ``stop()`` shows it once more: the last line on screen is the
    winner's score, the one in ``best_plan.json``. ``metric`` (the protocol's) names the score.
    """

    def __init__(self, console: Console | None = None, metric: str | None = None) -> None:
        from biotune.reports import score_name

        self.console = console or Console(stderr=True)
        self._score = f"val {score_name(metric)}" if metric else "val score"
        self._progress: Progress | None = None
        self._task: Any = None
        self._evolution: Any = None
        self._last = ""

    def start(self, total: int, done: int) -> None:
        self._progress = Progress(
            TextColumn("[bold]search[/bold]"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.description}"),
            console=self.console,
            transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task("", total=total, completed=done)

    def best_text(self) -> str:
        """' | best val balanced accuracy 0.653 (gen 3)', or '' before a generation finished."""
        history = self._evolution.history if self._evolution is not None else []
        if not history:
            return ""
        last = history[-1]
        return f" | best {self._score} {1 - last['best']:.3f} (gen {last['generation']})"

    def update(self, ev: Evaluation, evolution: Any) -> None:
        assert self._progress is not None
        self._evolution = evolution
        self._last = (
            f"gen {ev.generation} fold {ev.fold} | last: {ev.status} "
            f"{1 - ev.fitness:.3f} ({ev.seconds:.1f}s)"
        )
        self._progress.update(self._task, advance=1, description=self._last + self.best_text())

    def stop(self) -> None:
        if self._progress is not None:
            if self._evolution is not None:
                done = "done" if self._evolution.done else self._last
                self._progress.update(self._task, description=done + self.best_text())
            self._progress.stop()
            self._progress = None
