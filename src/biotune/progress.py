"""A live view of a search: evaluations done, the generation, the best fitness so far."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from biotune.fitness import Evaluation


class SearchProgress:
    """A rich progress bar on stderr."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self._progress: Progress | None = None
        self._task: Any = None

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

    def update(self, ev: Evaluation, evolution: Any) -> None:
        assert self._progress is not None
        best = ""
        if evolution.history:
            last = evolution.history[-1]
            best = f" | best val acc {1 - last['best']:.3f} (gen {last['generation']})"
        desc = (
            f"gen {ev.generation} fold {ev.fold} | last: {ev.status} "
            f"acc {1 - ev.fitness:.3f} ({ev.seconds:.1f}s){best}"
        )
        self._progress.update(self._task, advance=1, description=desc)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
