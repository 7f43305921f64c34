"""A run directory stays usable through interruptions, bad input, full disks and damaged files."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import warnings
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_cnn, make_tiny_data

from biotune.blocks import Block, BlockPartition, partition_blocks
from biotune.core.evolution import EvolutionConfig
from biotune.data import DatasetSplits
from biotune.errors import BioTuneError
from biotune.models import LoadedModel
from biotune.runner import fitness as fitness_module
from biotune.runner import rundir as rundir_module
from biotune.runner.config import SearchConfig
from biotune.runner.fitness import SearchProtocol
from biotune.runner.rundir import EVALUATIONS, PARTITION, SESSIONS, RunDirectory
from biotune.runner.search import Search
from biotune.runner.workbench import Workbench
from biotune.training import TrainConfig

# Two folds, cached frozen prefixes, memoisation: a resumed search must rebuild the same cache.
CONFIG = SearchConfig(
    evolution=EvolutionConfig(population_size=4, generations=2, elite=1),
    protocol=SearchProtocol(
        data_fraction=0.5,
        seeds=(0,),
        train=TrainConfig(epochs=1, batch_size=16),
        cache_features=True,
    ),
)
SMALL = SearchConfig(
    evolution=EvolutionConfig(population_size=2, generations=1, elite=1),
    protocol=SearchProtocol(data_fraction=1.0, seeds=(0,), train=TrainConfig(epochs=1)),
)
TIME_KEYS = {"seconds", "wall_seconds"}


def make_bench(train_size: int = 48, partition: BlockPartition | None = None) -> Workbench:
    """The same model and data every time, as a resumed search must find them."""
    torch.manual_seed(0)
    model = make_tiny_cnn()
    val = make_tiny_data(24, seed=1)
    splits = DatasetSplits("tiny", ["a", "b", "c"], make_tiny_data(train_size), val, val, 8)
    loaded = LoadedModel(model, "tiny", 8, (0.0,) * 3, (1.0,) * 3, "none")
    return Workbench(loaded, partition or partition_blocks(model), splits)


class StopAfter:
    """A callback that interrupts the search after ``n`` recorded evaluations."""

    def __init__(self, n: int, interrupt=None) -> None:  # noqa: ANN001
        self.n, self.seen = n, 0
        self.interrupt = interrupt or self._raise

    @staticmethod
    def _raise() -> None:
        raise KeyboardInterrupt

    def on_evaluation(self, record: dict) -> None:
        self.seen += 1
        if self.seen == self.n:
            self.interrupt()


def _lines(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / EVALUATIONS).read_text().splitlines()]


def _without_seconds(records: list[dict]) -> list[dict]:
    return sorted(
        ({k: v for k, v in r.items() if k != "seconds"} for r in records),
        key=lambda r: r["candidate"],
    )


def _counted(run_dir: Path) -> dict:
    cost = json.loads((run_dir / "search_summary.json").read_text())["cost"]
    return {k: v for k, v in cost.items() if k not in TIME_KEYS}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("whole") / "run"
    Search(CONFIG, run_dir, bench=make_bench()).run_search(final=False)
    return run_dir


# ------------------------------------------------------------------ resumed = uninterrupted (14)


def test_resumed_search_summary_counts_what_an_uninterrupted_one_does(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        Search(CONFIG, run_dir, bench=make_bench(), progress=StopAfter(6)).run_search(final=False)
    assert len(_lines(run_dir)) == 6
    Search(CONFIG, run_dir, bench=make_bench()).run_search(resume=True, final=False)

    whole = _lines(uninterrupted)
    assert any(r["cached_prefix"] > 0 for r in whole[6:]), "the test should reuse cached features"
    # Every record, cache work included, is what the uninterrupted search wrote.
    assert _without_seconds(_lines(run_dir)) == _without_seconds(whole)
    assert _counted(run_dir) == _counted(uninterrupted)
    sessions = json.loads((run_dir / SESSIONS).read_text())
    assert len(sessions) == 2 and all(s["seconds"] > 0 for s in sessions)
    cost = json.loads((run_dir / "search_summary.json").read_text())["cost"]
    assert cost["wall_seconds"] == pytest.approx(sum(s["seconds"] for s in sessions))


def test_sigterm_stops_a_search_like_ctrl_c_and_it_resumes(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    before = signal.getsignal(signal.SIGTERM)
    stop = StopAfter(3, lambda: os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(KeyboardInterrupt):
        Search(CONFIG, run_dir, bench=make_bench(), progress=stop).run_search(final=False)
    assert signal.getsignal(signal.SIGTERM) is before
    assert len(_lines(run_dir)) == 3
    Search(CONFIG, run_dir, bench=make_bench()).run_search(resume=True, final=False)
    assert _without_seconds(_lines(run_dir)) == _without_seconds(_lines(uninterrupted))


# -------------------------------------------------------------------- the block partition (5)


def _interrupted_small(run_dir: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        Search(SMALL, run_dir, bench=make_bench(), progress=StopAfter(1)).run_search(final=False)


def _moved_partition(merge: bool) -> BlockPartition:
    """The tiny CNN's blocks with block 1's BatchNorm moved into block 0 (or 0 and 1 merged)."""
    b0, b1, *rest = partition_blocks(make_tiny_cnn()).blocks
    if merge:
        both = Block(
            "0+1",
            b0.param_names + b1.param_names,
            b0.module_names + b1.module_names,
            b0.num_params + b1.num_params,
        )
        return BlockPartition((both, *rest))
    moved = b1.param_names[2:]
    return BlockPartition(
        (
            Block(b0.name, b0.param_names + moved, b0.module_names, b0.num_params + 16),
            Block(b1.name, b1.param_names[:2], b1.module_names, b1.num_params - 16),
            *rest,
        )
    )


@pytest.mark.parametrize("merge", [False, True], ids=["same-count", "other-count"])
def test_resume_on_other_blocks_is_refused_up_front(tmp_path, merge):
    run_dir = tmp_path / "run"
    _interrupted_small(run_dir)
    assert json.loads((run_dir / PARTITION).read_text())["fingerprint"]
    records = (run_dir / EVALUATIONS).read_text()
    search = Search(SMALL, run_dir, bench=make_bench(partition=_moved_partition(merge)))
    with pytest.raises(BioTuneError, match="blocks changed") as err:
        search.run_search(resume=True, final=False)
    message = str(err.value)
    assert "\n" not in message
    assert ("removed 0, 1; added 0+1" if merge else "changed 0, 1") in message
    assert (run_dir / EVALUATIONS).read_text() == records


def test_resume_with_other_weights_of_the_same_model_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    _interrupted_small(run_dir)
    other = make_bench()
    with torch.no_grad():
        other.model[1][0].weight.add_(0.01)  # the same architecture, one weight moved
    records = (run_dir / EVALUATIONS).read_text()
    with pytest.raises(BioTuneError, match="the model's weights .* changed") as err:
        Search(SMALL, run_dir, bench=other).run_search(resume=True, final=False)
    assert "\n" not in str(err.value)
    assert (run_dir / EVALUATIONS).read_text() == records
    head = make_bench()
    with torch.no_grad():
        head.model[4].weight.add_(0.01)  # the new head is re-drawn per seed: it does not count
    result = Search(SMALL, run_dir, bench=head).run_search(resume=True, final=False)
    assert len(result.evaluations) == SMALL.evolution.total_evaluations


def test_run_directory_without_a_stored_partition_still_resumes(tmp_path):
    run_dir = tmp_path / "run"
    _interrupted_small(run_dir)
    (run_dir / PARTITION).unlink()
    with pytest.raises(BioTuneError, match="blocks changed"):  # the records name the old blocks
        Search(SMALL, run_dir, bench=make_bench(partition=_moved_partition(True))).run_search(
            resume=True, final=False
        )
    result = Search(SMALL, run_dir, bench=make_bench()).run_search(resume=True, final=False)
    assert len(result.evaluations) == SMALL.evolution.total_evaluations
    assert (run_dir / PARTITION).exists()


# ------------------------------------------------------------- two searches, one new directory (11)


def test_the_search_that_loses_the_lock_never_deletes_the_directory(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    winner = RunDirectory(run_dir)
    held = contextlib.ExitStack()
    real_prepare = RunDirectory.prepare

    def prepare_after_the_winner(self: RunDirectory) -> None:
        # The loser reaches the lock just after the winner created the directory and took it
        # (the winner is still loading its data: nothing is written yet).
        if self is not winner and not held._exit_callbacks:
            held.enter_context(winner.locked())
        real_prepare(self)

    monkeypatch.setattr(RunDirectory, "prepare", prepare_after_the_winner)
    with held:
        with pytest.raises(BioTuneError, match="in use"):
            Search(SMALL, run_dir, bench=make_bench()).run_search(final=False)
        assert (run_dir / ".lock").exists()
        winner.write("config.json", {"search": "the winner's"})
    assert json.loads((run_dir / "config.json").read_text()) == {"search": "the winner's"}


# ------------------------------------------------ failures before the first record (13)


def test_bad_sizes_fail_before_anything_is_written(tmp_path):
    run_dir = tmp_path / "run"
    config = SearchConfig(evolution=SMALL.evolution, protocol=CONFIG.protocol)  # 2 folds
    with pytest.raises(BioTuneError, match="cannot make 2 folds of 1 items"):
        Search(config, run_dir, bench=make_bench(train_size=1)).run_search(final=False)
    assert not run_dir.exists()
    run_dir.mkdir()  # a directory the user made stays, empty, and a search can use it
    with pytest.raises(BioTuneError, match="cannot make 2 folds"):
        Search(config, run_dir, bench=make_bench(train_size=1)).run_search(final=False)
    assert [p.name for p in run_dir.iterdir() if p.name != ".lock"] == []
    Search(config, run_dir, bench=make_bench()).run_search(final=False)


def test_failure_before_the_first_record_leaves_the_directory_usable(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise BioTuneError("cannot read image 7")

    monkeypatch.setattr(fitness_module.Evaluator, "evaluate", broken)
    for run_dir, made in ((tmp_path / "new", False), (tmp_path / "made", True)):
        if made:
            run_dir.mkdir()
        with pytest.raises(BioTuneError, match="image 7"):
            Search(SMALL, run_dir, bench=make_bench()).run_search(final=False)
        assert run_dir.exists() == made
        assert not list(run_dir.glob("*.json*")) if made else True
    monkeypatch.undo()
    result = Search(SMALL, tmp_path / "made", bench=make_bench()).run_search(final=False)
    assert len(result.evaluations) == SMALL.evolution.total_evaluations


def test_out_of_memory_is_one_line_and_the_search_resumes(tmp_path, monkeypatch):
    real = fitness_module.Evaluator.evaluate
    calls = []

    def failing(self, *args, **kwargs):  # noqa: ANN001
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried 9 GB")
        return real(self, *args, **kwargs)

    run_dir = tmp_path / "run"
    monkeypatch.setattr(fitness_module.Evaluator, "evaluate", failing)
    with pytest.raises(BioTuneError, match="out of memory: DefaultCPUAllocator") as err:
        Search(SMALL, run_dir, bench=make_bench()).run_search(final=False)
    assert "\n" not in str(err.value) and "--resume" in str(err.value)
    monkeypatch.setattr(
        fitness_module.Evaluator, "evaluate", lambda *a, **k: (_ for _ in ()).throw(MemoryError())
    )
    with pytest.raises(BioTuneError, match="out of memory: MemoryError"):
        Search(SMALL, run_dir, bench=make_bench()).run_search(resume=True, final=False)
    monkeypatch.undo()
    result = Search(SMALL, run_dir, bench=make_bench()).run_search(resume=True, final=False)
    assert len(result.evaluations) == SMALL.evolution.total_evaluations


# ---------------------------------------------------------------- write errors (13)


@pytest.mark.parametrize(
    "code", [errno.ENOSPC, errno.EROFS, errno.EACCES], ids=["ENOSPC", "EROFS", "EACCES"]
)
def test_write_errors_are_one_line(tmp_path, monkeypatch, code):
    run = RunDirectory(tmp_path / "run")
    run.prepare()
    run.append(EVALUATIONS, {"candidate": 0})

    def fail(fd: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(rundir_module.os, "fsync", fail)
    with pytest.raises(BioTuneError) as err:
        run.append(EVALUATIONS, {"candidate": 1})
    assert str(err.value) == f"cannot write {run.path / EVALUATIONS}: {os.strerror(code)}"
    assert (run.path / EVALUATIONS).read_text() == '{"candidate":0}\n'  # no partial line
    with pytest.raises(BioTuneError, match=f"cannot write .*state.json: {os.strerror(code)}"):
        run.write("state.json", {})
    assert sorted(p.name for p in run.path.iterdir()) == [EVALUATIONS]


def test_a_full_disk_stops_the_search_with_one_line(tmp_path, monkeypatch):
    real_fsync = os.fsync

    def full_after_one_record(fd: int) -> None:
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        if path.name == EVALUATIONS and path.read_text().count("\n") > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(rundir_module.os, "fsync", full_after_one_record)
    run_dir = tmp_path / "run"
    with pytest.raises(BioTuneError, match="evaluations.jsonl: No space left on device"):
        Search(SMALL, run_dir, bench=make_bench()).run_search(final=False)
    assert len(_lines(run_dir)) == 1


# ---------------------------------------------------------------- damaged records (16)


def test_a_corrupt_middle_line_keeps_the_later_records_and_warns_once(tmp_path):
    run = RunDirectory(tmp_path)
    for i in range(4):
        run.append(EVALUATIONS, {"candidate": i})
    path = tmp_path / EVALUATIONS
    lines = path.read_text().splitlines(keepends=True)
    lines[1] = '{"candid\x00\x00te": \n'
    path.write_text("".join(lines) + '{"candidate": 4')  # and a torn last line
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = run.records(EVALUATIONS, repair=True)
    assert [r["candidate"] for r in records] == [0, 2, 3]
    assert len(caught) == 1
    assert str(path) in str(caught[0].message) and "line 2" in str(caught[0].message)
    assert path.read_text() == "".join(lines)  # only the torn tail was cut


@pytest.mark.parametrize("damage", ["cut-short last line", "corrupt middle line"])
def test_a_damaged_record_of_a_finished_search_is_evaluated_again_on_resume(
    uninterrupted, tmp_path, damage
):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    path = run_dir / EVALUATIONS
    lines = path.read_text().splitlines(keepends=True)
    if damage == "cut-short last line":
        lines[-1] = lines[-1][: len(lines[-1]) // 2]
    else:
        lines[3] = lines[3][:20] + "\x00\n"
    path.write_text("".join(lines))
    with pytest.warns(UserWarning, match="skipped 1 corrupt"):
        result = Search(CONFIG, run_dir, bench=make_bench()).run_search(resume=True, final=False)
    assert len(result.evaluations) == CONFIG.evolution.total_evaluations
    with warnings.catch_warnings():  # a corrupt middle line stays where it was, skipped
        warnings.simplefilter("ignore")
        records = RunDirectory(run_dir).evaluations()
    assert _without_seconds(records) == _without_seconds(_lines(uninterrupted))
    assert _counted(run_dir) == _counted(uninterrupted)


def test_a_record_without_genes_is_a_one_line_error(tmp_path):
    run_dir = tmp_path / "run"
    _interrupted_small(run_dir)
    record = _lines(run_dir)[0]
    del record["genes"]
    (run_dir / EVALUATIONS).write_text(json.dumps(record) + "\n")
    with pytest.raises(BioTuneError, match=r"evaluations.jsonl line 1: the record has no 'genes'"):
        Search(SMALL, run_dir, bench=make_bench()).run_search(resume=True, final=False)
