"""The run directory: the one place that knows its files, writes them atomically, appends
records durably, and holds the lock.

Layout (the names below are the only ones a search writes; ``finetuned.py`` owns the format of
the saved model, ``model.safetensors`` and ``finetuned.json``):

* ``config.json`` (what was asked), ``blocks.json`` (block sizes), ``partition.json`` (the
  model's blocks, fingerprinted);
* ``evaluations.jsonl`` (one ``Evaluation`` per finished evaluation), ``generations.json`` (one
  summary per generation), ``state.json`` (the evolution's state after the last finished step),
  ``sessions.json`` (how long each invocation searched);
* ``best_plan.json``, ``search_summary.json``, ``rerank.jsonl`` (re-ranked plans),
  ``final_runs.jsonl`` (one ``FinalRun`` per seed) and ``final.json``;
* with the Pareto objective, ``pareto.json``, ``pareto_runs.jsonl``, ``pareto.png``, ``pareto.md``.

Every file is either complete or absent: JSON files are replaced atomically, a torn last line of
a ``.jsonl`` file (a kill in the middle of a write) is cut off when the run is opened again, and
a corrupt line elsewhere is skipped with a warning, keeping every other record.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from biotune.core.records import EVALUATION_KEYS, FinalRun
from biotune.errors import BioTuneError

CONFIG = "config.json"
BLOCKS = "blocks.json"
PARTITION = "partition.json"
EVALUATIONS = "evaluations.jsonl"
GENERATIONS = "generations.json"
STATE = "state.json"
SESSIONS = "sessions.json"
BEST_PLAN = "best_plan.json"
SEARCH_SUMMARY = "search_summary.json"
RERANK = "rerank.jsonl"
PROMOTE = "promote.jsonl"
FINAL_RUNS = "final_runs.jsonl"
FINAL = "final.json"
PARETO = "pareto.json"
PARETO_RUNS = "pareto_runs.jsonl"
PARETO_PLOT = "pareto.png"
PARETO_TABLE = "pareto.md"
LOCK = ".lock"
#: What every stored final run holds (``cached_prefix`` is missing from early run directories).
_FINAL_RUN_KEYS = tuple(k for k in FinalRun.__dataclass_fields__ if k != "cached_prefix")


def write_json_atomic(path: Path, data: Any) -> None:
    """Write to a temporary file, fsync, then rename over the target: never a half file."""
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """``write_json_atomic`` for any text (a CSV of predictions, ...)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _failpoint(where: str, f: Any, line: str) -> None:
    """Crash-test hook: with BIOTUNE_FAILPOINT=append:N the N-th append writes half its line,
    then the process kills itself with SIGKILL (what a power cut or ``kill -9`` would leave)."""
    spec = os.environ.get("BIOTUNE_FAILPOINT", "")
    if not spec.startswith(where + ":"):
        return
    global _appends
    _appends += 1
    if _appends == int(spec.split(":", 1)[1]):
        f.write(line[: len(line) // 2])
        f.flush()
        os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)


_appends = 0


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """A full disk, a read-only file system or a denied permission: one line, not a traceback."""
    try:
        yield
    except OSError as exc:
        raise BioTuneError(f"cannot write {path}: {exc.strerror or exc}") from None


class RunDirectory:
    """One search's directory on disk."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.created = False  # the last prepare() made the directory (so it may remove it)

    def exists(self) -> bool:
        return (self.path / CONFIG).exists()

    def prepare(self) -> None:
        """Create the directory, or say clearly why it cannot be written."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.path.mkdir()
                self.created = True
            except FileExistsError:
                self.created = False
            probe = self.path / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise BioTuneError(
                f"run directory {self.path} is not writable: {exc.strerror or exc}"
            ) from None

    @contextlib.contextmanager
    def locked(self) -> Iterator[RunDirectory]:
        """Hold an exclusive lock so that two processes never write one run directory.

        ``filelock`` (an OS lock on every platform): a process that dies releases it."""
        from filelock import FileLock, Timeout

        self.prepare()
        lock = FileLock(self.path / LOCK)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            self.created = False  # the holder decides what happens to the directory
            raise BioTuneError(
                f"run directory {self.path} is in use by another biotune process"
            ) from None
        try:
            yield self
        finally:
            lock.release()

    def discard(self, names: Iterable[str]) -> None:
        """Remove files this process wrote, then the directory if it made it and it is now empty.

        Call it holding the lock: a directory another process holds is never touched, and
        ``rmdir`` leaves a directory with anything else in it alone.
        """
        for name in names:
            for path in (self.path / name, self.path / f".{name}.tmp"):
                with contextlib.suppress(OSError):
                    path.unlink()
        if not self.created:
            return
        with contextlib.suppress(OSError):
            if all(p.name == LOCK for p in self.path.iterdir()):
                (self.path / LOCK).unlink()
                self.path.rmdir()

    # JSON documents
    def write(self, name: str, data: Any) -> None:
        with _writing(self.path / name):
            write_json_atomic(self.path / name, data)

    def read(self, name: str) -> Any:
        path = self.path / name
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise BioTuneError(f"{path} is unreadable or corrupt: {exc}") from None

    # append-only records
    def append(self, name: str, record: dict[str, Any]) -> None:
        """Append one JSON line and fsync it: after this returns the record survives a crash.

        A failed write is cut off again, so the file never ends in a partial line of ours.
        """
        path = self.path / name
        line = json.dumps(record, separators=(",", ":")) + "\n"
        with _writing(path), open(path, "a") as f:
            size = f.tell()
            try:
                _failpoint("append", f, line)
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            except OSError:
                with contextlib.suppress(OSError):
                    f.truncate(size)
                raise

    def records(
        self, name: str, repair: bool = False, required: Iterable[str] = ()
    ) -> list[dict[str, Any]]:
        """All complete records, in file order; with ``repair``, a torn last line is cut off.

        A corrupt line, or a last line cut short (by a kill during its write, or by hand), is
        skipped with one warning (the other records are kept; a resumed search computes what it
        held again); a record without a ``required`` key is a one-line error naming file and line.
        """
        path = self.path / name
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise BioTuneError(f"cannot read {path}: {exc.strerror or exc}") from None
        lines = data.splitlines(keepends=True)
        torn = bool(lines) and not lines[-1].endswith(b"\n")
        cut_short: list[int] = []
        if torn:
            last = lines.pop()
            try:
                complete = isinstance(json.loads(last), dict)
            except ValueError:
                complete = False
            if complete:  # complete but for its newline
                lines.append(last + b"\n")
            else:
                cut_short.append(len(lines) + 1)
        required = tuple(required)
        out, corrupt = [], []
        for number, line in enumerate(lines, start=1):
            try:
                record = json.loads(line)
            except ValueError:  # JSONDecodeError and UnicodeDecodeError
                record = None
            if not isinstance(record, dict):
                corrupt.append(number)
                continue
            missing = [key for key in required if key not in record]
            if missing:
                raise BioTuneError(
                    f"{path} line {number}: the record has no {', '.join(map(repr, missing))}"
                )
            out.append(record)
        corrupt += cut_short
        if corrupt:
            where = ", ".join(map(str, corrupt[:5])) + (", ..." if len(corrupt) > 5 else "")
            warnings.warn(
                f"{path}: skipped {len(corrupt)} corrupt or cut-short line(s) (line {where}); "
                "kept the other records (a resumed search computes what they held again)",
                stacklevel=2,
            )
        if torn and repair:
            kept = b"".join(lines)
            with _writing(path), open(path, "r+b") as f:
                f.truncate(min(len(kept), len(data)))
                f.seek(0, os.SEEK_END)
                f.write(kept[len(data) :])  # the newline of a complete last record
                f.flush()
                os.fsync(f.fileno())
        return out

    # typed records
    def evaluations(self) -> list[dict[str, Any]]:
        """The evaluation records, in file order (a torn last line cut off)."""
        return self.records(EVALUATIONS, repair=True, required=EVALUATION_KEYS)

    def append_evaluation(self, record: dict[str, Any]) -> None:
        """An ``Evaluation.to_dict()`` (plus its ``cost`` under a budget), durably."""
        self.append(EVALUATIONS, record)

    def final_runs(self) -> dict[int, FinalRun]:
        """The final runs of the search's plan, by seed."""
        records = self.records(FINAL_RUNS, repair=True, required=_FINAL_RUN_KEYS)
        return {r["seed"]: FinalRun.from_dict(r) for r in records}

    def append_final_run(self, run: FinalRun) -> None:
        self.append(FINAL_RUNS, run.to_dict())

    def rerank_runs(self) -> dict[int, dict[str, Any]]:
        """The re-ranked plans' runs by candidate: a ``FinalRun`` with the candidate, its rank
        and search fitness, its plan and its work."""
        return {
            r["candidate"]: r for r in self.records(RERANK, repair=True, required=("candidate",))
        }

    def append_rerank(self, record: dict[str, Any]) -> None:
        self.append(RERANK, record)
