"""The run directory: atomic writes, append-only records, and a lock.

Layout: ``config.json`` (what was asked), ``evaluations.jsonl`` (one line per finished
evaluation), ``generations.jsonl`` (one summary per generation), ``state.json`` (the evolution's
state after the last finished step), ``best_plan.json`` and ``final.json``. Every file is either
complete or absent: JSON files are replaced atomically, and a torn last line of a ``.jsonl`` file
(a kill in the middle of a write) is cut off when the run is opened again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from biotune.errors import BioTuneError

CONFIG = "config.json"
EVALUATIONS = "evaluations.jsonl"
GENERATIONS = "generations.jsonl"
STATE = "state.json"
LOCK = ".lock"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write to a temporary file, fsync, then rename over the target: never a half file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


class RunDirectory:
    """One search's directory on disk."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock_file: Any = None

    def exists(self) -> bool:
        return (self.path / CONFIG).exists()

    def prepare(self) -> None:
        """Create the directory, or say clearly why it cannot be written."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise BioTuneError(
                f"run directory {self.path} is not writable: {exc.strerror or exc}"
            ) from None

    @contextlib.contextmanager
    def locked(self) -> Iterator[RunDirectory]:
        """Hold an exclusive lock so that two processes never write one run directory."""
        self.prepare()
        f = open(self.path / LOCK, "a+")  # noqa: SIM115 (held for the whole block)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise BioTuneError(
                f"run directory {self.path} is in use by another biotune process"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield self
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
            f.close()

    # JSON documents
    def write(self, name: str, data: Any) -> None:
        write_json_atomic(self.path / name, data)

    def read(self, name: str) -> Any:
        path = self.path / name
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError) as exc:
            raise BioTuneError(f"{path} is unreadable or corrupt: {exc}") from None

    # append-only records
    def append(self, name: str, record: dict[str, Any]) -> None:
        """Append one JSON line and fsync it: after this returns the record survives a crash."""
        line = json.dumps(record, separators=(",", ":")) + "\n"
        with open(self.path / name, "a") as f:
            _failpoint("append", f, line)
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def records(self, name: str, repair: bool = False) -> list[dict[str, Any]]:
        """All complete records; with ``repair``, a torn last line is cut off the file."""
        path = self.path / name
        if not path.exists():
            return []
        data = path.read_bytes()
        good_end, out = 0, []
        for line in data.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
            good_end += len(line)
        if good_end != len(data):
            if not repair:
                return out
            with open(path, "r+b") as f:
                f.truncate(good_end)
                f.flush()
                os.fsync(f.fileno())
        return out
