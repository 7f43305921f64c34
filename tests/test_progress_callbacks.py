"""Progress lines in a log, bars on a terminal, the callback API and the CSV and TensorBoard
loggers built on it."""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_cnn, make_tiny_data, tiny_search_args
from rich.console import Console

from biotune.callbacks import Callback, CSVLogger, TensorBoardLogger, emit
from biotune.core.evolution import BioTuneEvolution, EvolutionConfig
from biotune.data import DatasetSplits
from biotune.models import LoadedModel
from biotune.progress import CompareProgress, SearchProgress, TrainingProgress, eta
from biotune.runner.config import SearchConfig
from biotune.runner.fitness import SearchProtocol
from biotune.runner.search import Search
from biotune.runner.workbench import Workbench
from biotune.training import TrainConfig

# 4 + 1 x (3 x 1 + 3) = 10 evaluations, two generation summaries, two final seeds of 2 epochs.
CONFIG = SearchConfig(
    evolution=EvolutionConfig(population_size=4, generations=1, elite=1),
    protocol=SearchProtocol(
        data_fraction=0.5, seeds=(0,), train=TrainConfig(epochs=1, batch_size=16)
    ),
    final=TrainConfig(epochs=2, patience=5, batch_size=16),
    final_seeds=(0, 1),
)
TOTAL = CONFIG.evolution.total_evaluations


def make_bench() -> Workbench:
    """The same model and data every time, as a resumed search must find them."""
    torch.manual_seed(0)
    model = make_tiny_cnn()
    val = make_tiny_data(24, seed=1)
    splits = DatasetSplits("tiny", ["a", "b", "c"], make_tiny_data(48), val, val, 8)
    loaded = LoadedModel(model, "tiny", 8, (0.0,) * 3, (1.0,) * 3, "none")
    from biotune.blocks import partition_blocks

    return Workbench(loaded, partition_blocks(model), splits)


class Recorder(Callback):
    """Every event, in order."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def on_search_start(self, total, done):  # noqa: ANN001, ANN201
        self.events.append(("search_start", total, done))

    def on_evaluation(self, record):  # noqa: ANN001, ANN201
        self.events.append(("evaluation", record))

    def on_generation(self, summary):  # noqa: ANN001, ANN201
        self.events.append(("generation", summary))

    def on_search_end(self, finished):  # noqa: ANN001, ANN201
        self.events.append(("search_end", finished))

    def on_rerank_start(self, rank, total, plan, epochs):  # noqa: ANN001, ANN201
        self.events.append(("rerank_start", rank, total, plan, epochs))

    def on_rerank_epoch(self, rank, epoch):  # noqa: ANN001, ANN201
        self.events.append(("rerank_epoch", rank, epoch))

    def on_rerank_run(self, record):  # noqa: ANN001, ANN201
        self.events.append(("rerank_run", record))

    def on_final_start(self, seed, epochs):  # noqa: ANN001, ANN201
        self.events.append(("final_start", seed, epochs))

    def on_final_epoch(self, seed, epoch):  # noqa: ANN001, ANN201
        self.events.append(("final_epoch", seed, epoch))

    def on_final_run(self, record):  # noqa: ANN001, ANN201
        self.events.append(("final_run", record))

    def close(self):  # noqa: ANN201
        self.events.append(("close",))


@pytest.fixture(autouse=True)
def restore_logging():
    """The command line sets up the ``biotune`` logger; leave it as it was for other tests."""
    logger = logging.getLogger("biotune")
    handlers, level = list(logger.handlers), logger.level
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """One small search with final training, watched by a recorder and both loggers."""
    run_dir = tmp_path_factory.mktemp("search") / "run"
    recorder = Recorder()
    loggers = [CSVLogger(run_dir / "logs")]
    if TensorBoardLogger.available():
        loggers.append(TensorBoardLogger(run_dir / "logs" / "tensorboard"))
    result = Search(
        CONFIG, run_dir, bench=make_bench(), callbacks=[recorder, *loggers]
    ).run_search()
    return run_dir, recorder.events, result


# --------------------------------------------------------------------------------- callbacks


def test_callbacks_hear_every_event_of_a_search_in_order(searched):
    run_dir, events, result = searched
    kinds = [e[0] for e in events]
    assert kinds[0] == "search_start" and events[0][1:] == (TOTAL, 0)
    assert kinds.count("evaluation") == TOTAL
    assert kinds.count("generation") == CONFIG.evolution.generations + 1
    end = kinds.index("search_end")
    assert events[end][1] is True and set(kinds[:end]) == {
        "search_start",
        "evaluation",
        "generation",
    }
    # The last generation summary names the plan the search returned.
    last = [e[1] for e in events if e[0] == "generation"][-1]
    assert last["best_plan"] == result.best_plan.to_dict()
    assert last["best"] == pytest.approx(result.best_fitness)
    # Then per seed: start, one event per epoch run, the tested run; close comes last.
    finals = kinds[end + 1 : -1]
    runs = [e[1] for e in events if e[0] == "final_run"]
    expected = []
    for run in runs:
        expected += ["final_start"] + ["final_epoch"] * run["epochs_run"] + ["final_run"]
    assert finals == expected and [r["seed"] for r in runs] == [0, 1]
    assert kinds[-1] == "close"
    epoch = next(e[2] for e in events if e[0] == "final_epoch")
    assert {"epoch", "train_loss", "val_balanced", "seconds"} <= set(epoch)


def test_reranking_runs_are_heard_by_epoch_and_the_winners_run_as_seed_0s_final(tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="biotune")
    config = dataclasses.replace(CONFIG, rerank=2, rerank_from="winners")
    recorder = Recorder()
    run_dir = tmp_path / "run"
    loggers = [CSVLogger(run_dir / "logs")]
    if TensorBoardLogger.available():
        loggers.append(TensorBoardLogger(run_dir / "logs" / "tensorboard"))
    Search(
        config,
        run_dir,
        bench=make_bench(),
        callbacks=[recorder, *loggers],
        progress=SearchProgress(metric="balanced", bars=False),
    ).run_search()
    events = recorder.events
    kinds = [e[0] for e in events]
    after = kinds[kinds.index("search_end") + 1 : -1]
    reruns = [e[1] for e in events if e[0] == "rerank_run"]
    assert [r["rank"] for r in reruns] == [0, 1]
    expected = []
    for run in reruns:
        expected += ["rerank_start"] + ["rerank_epoch"] * run["epochs_run"] + ["rerank_run"]
    # The winner's run is seed 0's final run: announced once, not trained again.
    expected += ["final_run", "final_start"]
    assert after[: len(expected)] == expected
    finals = [e[1] for e in events if e[0] == "final_run"]
    assert [r["seed"] for r in finals] == [0, 1]
    winner = max(reruns, key=lambda r: (r["val_balanced"], -r["rank"]))
    assert finals[0]["val_balanced"] == winner["val_balanced"]
    assert [e[2] for e in events if e[0] == "rerank_start"] == [2, 2]
    logs = run_dir / "logs"
    assert [int(r["rank"]) for r in _rows(logs / "rerank_runs.csv")] == [0, 1]
    assert len(_rows(logs / "rerank_epochs.csv")) == sum(r["epochs_run"] for r in reruns)
    assert [int(r["seed"]) for r in _rows(logs / "final_runs.csv")] == [0, 1]
    lines = [r.getMessage() for r in caplog.records if r.name == "biotune.progress"]
    epochs = [x for x in lines if re.match(r"re-rank [12]/2: epoch \d/2, train loss", x)]
    assert len(epochs) == sum(r["epochs_run"] for r in reruns)
    if TensorBoardLogger.available():
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        reader = EventAccumulator(str(logs / "tensorboard"))
        reader.Reload()
        scores = reader.Scalars("rerank/val_balanced")
        assert [s.value for s in scores] == pytest.approx([r["val_balanced"] for r in reruns])
        assert {"rerank/rank_0/train_loss", "rerank/rank_1/val_balanced"} <= set(
            reader.Tags()["scalars"]
        )


def test_a_callback_needs_only_the_methods_it_uses():
    class OnlyEvaluations:
        def __init__(self) -> None:
            self.seen = 0

        def on_evaluation(self, record) -> None:  # noqa: ANN001
            self.seen += 1

    counter = OnlyEvaluations()
    emit([counter], "on_search_start", 3, 0)
    emit([counter], "on_evaluation", {})
    assert counter.seen == 1


# ------------------------------------------------------------------------------------ loggers


def _rows(path):  # noqa: ANN001, ANN202
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_csv_logger_writes_evaluations_generations_and_final_curves(searched):
    run_dir, events, result = searched
    logs = run_dir / "logs"
    evaluations = _rows(logs / "evaluations.csv")
    assert [int(r["candidate"]) for r in evaluations] == [
        e[1]["candidate"] for e in events if e[0] == "evaluation"
    ]
    assert all(float(r["fitness"]) + float(r["val_score"]) == pytest.approx(1) for r in evaluations)
    generations = _rows(logs / "generations.csv")
    assert len(generations) == CONFIG.evolution.generations + 1
    last = generations[-1]
    for block in result.best_plan.blocks:
        assert float(last[f"lr_mult:{block.name}"]) == pytest.approx(
            block.lr_mult if block.train else 0.0
        )
    epochs = _rows(logs / "final_epochs.csv")
    runs = _rows(logs / "final_runs.csv")
    assert [int(r["seed"]) for r in runs] == [0, 1]
    assert len(epochs) == sum(int(r["epochs_run"]) for r in runs)


class _StopAtFinalEpoch:
    """Interrupts the search (as a kill would) after the first epoch of final seed ``seed``."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_final_epoch(self, seed: int, epoch: dict) -> None:
        if seed == self.seed:
            raise KeyboardInterrupt


def test_csv_logs_of_a_search_killed_twice_in_a_training_hold_each_epoch_once(tmp_path):
    whole = tmp_path / "whole"
    Search(CONFIG, whole, bench=make_bench(), callbacks=[CSVLogger(whole / "logs")]).run_search()
    run_dir = tmp_path / "run"
    for attempt in range(3):
        stop = [_StopAtFinalEpoch(1)] if attempt < 2 else []
        search = Search(
            CONFIG, run_dir, bench=make_bench(), callbacks=[CSVLogger(run_dir / "logs"), *stop]
        )
        if stop:
            with pytest.raises(KeyboardInterrupt):
                search.run_search(resume=attempt > 0)
        else:
            search.run_search(resume=True)

    def curves(run: Path, name: str) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in _rows(run / "logs" / name)]

    for name in ("final_epochs.csv", "evaluations.csv", "generations.csv", "final_runs.csv"):
        assert len(curves(run_dir, name)) == len(curves(whole, name)), name
    assert curves(run_dir, "final_epochs.csv") == curves(whole, "final_epochs.csv")
    assert not list((run_dir / "logs").glob(".*.attempt"))


def test_csv_logger_appends_after_a_resume_without_a_second_header(tmp_path):
    class StopAfter:
        def __init__(self, n: int) -> None:
            self.n = n

        def on_evaluation(self, record) -> None:  # noqa: ANN001
            self.n -= 1
            if self.n == 0:
                raise KeyboardInterrupt

    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        Search(
            CONFIG,
            run_dir,
            bench=make_bench(),
            callbacks=[CSVLogger(run_dir / "logs"), StopAfter(4)],
        ).run_search(final=False)
    Search(CONFIG, run_dir, bench=make_bench(), callbacks=[CSVLogger(run_dir / "logs")]).run_search(
        resume=True, final=False
    )
    rows = _rows(run_dir / "logs" / "evaluations.csv")
    assert sorted(int(r["candidate"]) for r in rows) == list(range(TOTAL))


def test_tensorboard_logger_writes_events_tensorboard_reads(searched):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, events, result = searched
    reader = EventAccumulator(str(run_dir / "logs" / "tensorboard"))
    reader.Reload()
    tags = set(reader.Tags()["scalars"])
    fitness = reader.Scalars("search/fitness")
    assert [s.step for s in fitness] == list(range(TOTAL))
    assert [s.value for s in fitness] == pytest.approx(
        [e[1]["fitness"] for e in events if e[0] == "evaluation"], abs=1e-6
    )
    assert len(reader.Scalars("search/best")) == CONFIG.evolution.generations + 1
    assert {f"best_plan/{name}" for name in result.best_plan.names} <= tags
    assert {"final/seed_0/train_loss", "final/seed_1/val_balanced", "final/test_top1"} <= tags


def test_tensorboard_logger_without_tensorboard_is_a_one_line_error(monkeypatch):
    import importlib.util

    from biotune.errors import BioTuneError

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "tensorboard" else real(name, *a),
    )
    with pytest.raises(BioTuneError, match=r"pip install 'biotune\[tensorboard\]'"):
        TensorBoardLogger("somewhere")


# ------------------------------------------------------------------------- progress: no terminal


def test_without_a_terminal_progress_is_one_plain_line_per_event(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="biotune")
    Search(
        CONFIG,
        tmp_path / "run",
        bench=make_bench(),
        progress=SearchProgress(metric="balanced", bars=False),
    ).run_search()
    lines = [r.getMessage() for r in caplog.records if r.name == "biotune.progress"]
    evaluations = [x for x in lines if x.startswith("evaluation ")]
    assert [x.split()[1] for x in evaluations] == [f"{k}/{TOTAL}" for k in range(1, TOTAL + 1)]
    assert "eta" in evaluations[0] and "elapsed" in evaluations[0]
    assert sum(x.startswith("generation ") for x in lines) == CONFIG.evolution.generations + 1
    assert "best val balanced accuracy" in evaluations[-1]
    epochs = [x for x in lines if re.match(r"final training seed \d: epoch \d/2", x)]
    done = [x for x in lines if re.match(r"final training seed \d done in", x)]
    assert len(done) == 2 and len(epochs) >= 2
    assert any(x.startswith("search done after") for x in lines)
    assert not any("..." in x or "\u2026" in x or "\n" in x for x in lines)


def test_bars_show_a_search_and_its_final_seeds_with_an_eta():
    out = io.StringIO()
    progress = SearchProgress(Console(file=out, width=100, force_terminal=True), "balanced")
    progress.on_search_start(10, 0)
    progress.on_evaluation(
        {
            "candidate": 0,
            "generation": 0,
            "fold": 0,
            "role": "initial",
            "status": "ok",
            "fitness": 0.4,
            "seconds": 1.0,
        }
    )
    progress.on_final_start(0, 8)
    assert progress._progress is not None
    progress._progress.refresh()
    progress.close()
    screen = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", out.getvalue())
    assert "search" in screen and "1/10" in screen and "eta" in screen
    assert "final training seed 0" in screen and "0/8" in screen


def test_progress_shows_the_winners_score_when_the_search_ends(caplog):
    """Evaluations are reported before the evolution is told; the last word must still be the
    winner's score (evo.best, best_plan.json), not the previous generation's."""
    caplog.set_level(logging.INFO, logger="biotune")
    out = io.StringIO()
    bars = SearchProgress(Console(file=out, width=300, force_terminal=True), metric="balanced")
    lines = SearchProgress(metric="balanced", bars=False)
    evo = BioTuneEvolution(4, EvolutionConfig(population_size=4, generations=2, elite=1), seed=1)
    rng = np.random.default_rng(0)
    callbacks = [bars, lines]
    emit(callbacks, "on_search_start", evo.config.total_evaluations, 0)
    while not evo.done:
        told = {}
        for c in evo.ask():
            told[c.id] = float(rng.uniform(0.2, 0.8))
            emit(
                callbacks,
                "on_evaluation",
                {
                    "candidate": c.id,
                    "generation": c.generation,
                    "fold": 0,
                    "role": c.role,
                    "status": "ok",
                    "fitness": told[c.id],
                    "seconds": 0.1,
                },
            )
        before = len(evo.history)
        evo.tell(told)
        if len(evo.history) > before:
            emit(callbacks, "on_generation", evo.history[-1])
    emit(callbacks, "on_search_end", evo.done)
    emit(callbacks, "close")
    winner = f"best val balanced accuracy {1 - evo.best[1]:.3f} (gen 2)"
    screen = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", out.getvalue()).strip().splitlines()
    assert winner in screen[-1]
    assert winner in caplog.records[-1].getMessage()


def test_training_and_compare_lines_name_what_finished(caplog):
    caplog.set_level(logging.INFO, logger="biotune")
    training = TrainingProgress("top1", label="training", bars=False)
    training.on_final_start(3, 4)
    training.on_final_epoch(3, {"epoch": 1, "train_loss": 0.5, "val_top1": 0.7, "seconds": 2.0})
    training.on_final_run(
        {
            "seed": 3,
            "test_top1": 0.8,
            "test_balanced": 0.75,
            "best_epoch": 1,
            "epochs_run": 1,
            "seconds": 2.0,
        }
    )
    compare = CompareProgress(["full", "linear"], bars=False)
    compare.method_start("full", 4)
    compare.run_done()
    compare.method_done("full", {"test_top1": {"mean": 0.9, "std": 0.01}})
    lines = [r.getMessage() for r in caplog.records]
    assert "training seed 3: epoch 1/4, train loss 0.5000, val top-1 accuracy 0.7000" in lines[1]
    assert lines[2].startswith("training seed 3 done in 2.0s: test top-1 0.8000")
    assert lines[3].startswith("compare: full done (1/2) in ")
    assert "test top-1 0.9000 +- 0.0100 | eta " in lines[3]


def test_eta_is_the_mean_time_per_item_times_what_is_left():
    assert eta(60.0, 2, 5) == "eta 1m30s"
    assert eta(10.0, 0, 5) == "" and eta(10.0, 5, 5) == ""


def test_command_line_logs_one_line_per_evaluation_and_final_epoch(tmp_path, capsys):
    """`biotune search > log.txt 2>&1`: stderr is no terminal, so plain lines, with times."""
    from biotune.cli import main

    code = main(
        [
            "search",
            "--run-dir",
            str(tmp_path / "run"),
            *tiny_search_args(population=3, final_epochs=2, final_seeds="0"),
            "--rerank",
            "0",  # seed 0's final run trained on its own, with its epochs logged
            "--device",
            "cpu",
            "--precision",
            "32",
            "--threads",
            "1",
        ]
    )
    err = capsys.readouterr().err
    assert code == 0, err
    lines = err.splitlines()
    records = (tmp_path / "run" / "evaluations.jsonl").read_text().splitlines()
    stamp = r"\d\d:\d\d:\d\d "
    # the default's cost limit ends the search: no count to reach, no time left
    assert any(
        re.match(stamp + r"search: until its evaluations cost 10 FT-equivalents", x) for x in lines
    )
    numbered = [x for x in lines if re.match(stamp + r"evaluation \d+ \(fold 0\)", x)]
    assert len(numbered) == len(records) and not any("eta" in x for x in numbered)
    # random search has no generations: its summaries count the plans scored
    assert not any("generation" in x for x in lines)
    assert any(re.match(stamp + r"\d+ plans scored: best val balanced", x) for x in lines)
    assert sum(bool(re.match(stamp + r"final training seed 0: epoch \d/2", x)) for x in lines) >= 1
    assert any(re.match(stamp + "run directory: ", x) for x in lines)
    stored = (tmp_path / "run" / "config.json").read_text()
    assert '"amp": false' in stored and "precision" not in stored
    assert (tmp_path / "run" / "logs" / "evaluations.csv").exists()


def test_quiet_command_line_prints_no_progress(tmp_path, capsys):
    from biotune.cli import main

    code = main(
        [
            "search",
            "--run-dir",
            str(tmp_path / "run"),
            *tiny_search_args(population=3),
            "--no-final",
            "--quiet",
        ]
    )
    err = capsys.readouterr().err
    assert code == 0, err
    assert "evaluation" not in err and "run directory" not in err


def test_compare_logs_a_line_per_method_and_its_searchs_progress(tmp_path, caplog):
    from test_baselines import make_bench as colour_bench

    from biotune.compare import SearchScale, compare
    from biotune.runner.config import DataConfig

    caplog.set_level(logging.INFO, logger="biotune")
    tiny = TrainConfig(epochs=1, patience=1, batch_size=32, eval_batch_size=64)
    compare(
        ["linear", "biotune"],
        DataConfig(),
        tiny,
        seeds=(0, 1),
        lr_grid=(1e-2,),
        out_dir=tmp_path,
        bench=colour_bench(),
        progress=True,
        scales={"biotune": SearchScale(population=3, generations=1, elite=1, epochs=1)},
    )
    lines = [r.getMessage() for r in caplog.records]
    assert any(x.startswith("compare: linear done (1/2) in ") and "| eta " in x for x in lines)
    assert any(x.startswith("compare: biotune done (2/2) in ") for x in lines)
    assert any(re.match(r"evaluation 1 \(fold 0\)", x) for x in lines)
    assert any(x.startswith("[linear] lr 0.01 chosen on validation") for x in lines)
