"""``biotune compare`` writes a fair table and a plot; ``biotune report`` plots a search."""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
from test_baselines import make_bench

from biotune.cli._options import seeds_from
from biotune.cli.compare import add_compare_parser, options_from_args, scales_from_args
from biotune.cli.report import add_report_parser, cmd_report
from biotune.compare import ALL_METHODS, LABELS, SearchScale, compare, compare_method
from biotune.errors import BioTuneError
from biotune.reports import REPORT_FILES, report
from biotune.runner.config import DataConfig
from biotune.training import TrainConfig

PNG = b"\x89PNG\r\n\x1a\n"
TINY = TrainConfig(epochs=1, patience=1, batch_size=32, eval_batch_size=64)
TINY_SEARCH = SearchScale(population=3, generations=1, elite=1, seeds=(0,), epochs=1)


def _quiet(_: str) -> None:
    pass


def test_compare_runs_every_method_with_one_recipe_and_writes_all_outputs(tmp_path):
    bench = make_bench()
    grid = (1e-3, 1e-2)
    methods = [m for m in ALL_METHODS if m not in ("llrd", "lpft")]  # tested apart, below
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = compare(
            methods,
            DataConfig(),
            TINY,
            seeds=(0, 1),
            lr_grid=grid,
            out_dir=tmp_path,
            bench=bench,
            scales={"biotune": TINY_SEARCH, "biotune-paper": TINY_SEARCH},
            options={"lora_rank": 2},
            meta={"command": "pytest"},
            log=_quiet,
        )
    assert [r["method"] for r in rows] == methods
    for r in rows:
        assert r["lr"] in grid and set(r["val_by_lr"]) == {"0.001", "0.01"}
        assert [run["seed"] for run in r["runs"]] == [0, 1]
        assert 0.0 <= r["test_top1"]["mean"] <= 1.0 and r["test_top1"]["std"] >= 0.0
        assert 0.0 < r["trainable_pct"] <= 100.0
        assert (r["search"] is not None) == r["method"].startswith("biotune")
    by_method = {r["method"]: r for r in rows}
    assert by_method["full"]["trainable_pct"] == pytest.approx(100.0)
    assert by_method["linear"]["trainable_pct"] < 10.0
    search = by_method["biotune-paper"]["search"]
    assert search["evaluations"] == 3 + 1 * (3 * 1 + 2)
    assert search["ft_equivalents"] > 0 and "population 3" in search["scaling"]

    md = (tmp_path / "compare.md").read_text()
    for method in methods:
        assert LABELS[method] in md
    assert "scaled to fit the budget: population 3, generations 1" in md
    with open(tmp_path / "compare.csv") as f:
        table = list(csv.DictReader(f))
    assert [t["method"] for t in table] == methods
    assert table[0]["search_ft_equivalents"] == "" and table[-1]["search_ft_equivalents"] != ""
    stored = json.loads((tmp_path / "compare.json").read_text())
    assert stored["command"] == "pytest" and stored["lr_grid"] == list(grid)
    assert len(stored["rows"]) == len(methods) and stored["machine"]
    assert (tmp_path / "compare.png").read_bytes().startswith(PNG)

    for r in rows:  # epochs count from 1, like epochs_run
        assert all(1 <= run["best_epoch"] <= run["epochs_run"] for run in r["runs"])
    assert 0.0 <= search["val_score"] == pytest.approx(1 - search["best_fitness"])

    # the search's run directory is a normal run: it reports, and a rerun resumes it
    paths = report(tmp_path / "search-biotune")
    assert [p.name for p in paths] == list(REPORT_FILES)
    assert all(p.read_bytes().startswith(PNG) for p in paths)
    evaluations = (tmp_path / "search-biotune" / "evaluations.jsonl").read_text()
    # its row and runs were made with other seeds and grid
    (tmp_path / "rows" / "biotune.json").unlink()
    shutil.rmtree(tmp_path / "runs" / "biotune")
    compare(
        ["biotune"],
        DataConfig(),
        TINY,
        seeds=(0,),
        lr_grid=(1e-2,),
        out_dir=tmp_path,
        bench=bench,
        scales={"biotune": TINY_SEARCH},
        log=_quiet,
    )
    assert (tmp_path / "search-biotune" / "evaluations.jsonl").read_text() == evaluations


def _counting_compare_method(monkeypatch, interrupt_at: str | None = None) -> list[str]:
    """Record which methods ``compare`` trains; Ctrl-C when it reaches ``interrupt_at``."""
    import biotune.compare as compare_module

    trained: list[str] = []

    def counting(method, *args, **kwargs):
        if method == interrupt_at:
            raise KeyboardInterrupt
        trained.append(method)
        return compare_method(method, *args, **kwargs)

    monkeypatch.setattr(compare_module, "compare_method", counting)
    return trained


def test_compare_keeps_each_finished_row_and_a_rerun_skips_it(tmp_path, monkeypatch):
    bench = make_bench()
    args = {
        "data": DataConfig(),
        "config": TINY,
        "seeds": (0,),
        "lr_grid": (1e-2,),
        "out_dir": tmp_path,
        "bench": bench,
        "log": _quiet,
    }
    trained = _counting_compare_method(monkeypatch, interrupt_at="linear")
    with pytest.raises(KeyboardInterrupt):
        compare(["full", "linear"], **args)
    assert trained == ["full"]
    kept = json.loads((tmp_path / "rows" / "full.json").read_text())
    assert kept["settings"]["seeds"] == [0] and kept["row"]["method"] == "full"

    trained = _counting_compare_method(monkeypatch)
    rows = compare(["full", "linear"], **args)
    assert trained == ["linear"]  # full was finished: its row is reused as stored
    assert rows[0] == kept["row"] and [r["method"] for r in rows] == ["full", "linear"]
    assert sorted(p.name for p in (tmp_path / "rows").iterdir()) == ["full.json", "linear.json"]


def test_compare_logs_every_training_run_and_keeps_it_across_an_interrupt(tmp_path, monkeypatch):
    import biotune.baselines

    real = biotune.baselines.run_baseline
    trained: list[tuple[float, int]] = []

    def stop_at_third(name, bench, config, seed, *args, **kwargs):
        if len(trained) == 2:
            raise KeyboardInterrupt
        trained.append((config.base_lr, seed))
        return real(name, bench, config, seed, *args, **kwargs)

    args = {
        "data": DataConfig(),
        "config": TINY,
        "seeds": (0, 1),
        "lr_grid": (1e-3, 1e-2, 3e-2),
        "bench": make_bench(),
    }
    lines: list[str] = []
    monkeypatch.setattr(biotune.baselines, "run_baseline", stop_at_third)
    with pytest.raises(KeyboardInterrupt):
        compare(["full"], out_dir=tmp_path / "stopped", log=lines.append, **args)
    assert trained == [(1e-3, 0), (1e-2, 0)]
    assert [line.split(":")[0] for line in lines[1:]] == [
        "[full] lr 0.001, seed 0 (1/4)",
        "[full] lr 0.01, seed 0 (2/4)",
    ]
    assert sorted(p.name for p in (tmp_path / "stopped" / "runs" / "full").iterdir()) == [
        "lr0.001-seed0.json",
        "lr0.01-seed0.json",
    ]

    monkeypatch.setattr(biotune.baselines, "run_baseline", real)
    trained.clear()
    lines.clear()
    resumed = compare(["full"], out_dir=tmp_path / "stopped", log=lines.append, **args)
    assert sum("kept from" in line for line in lines) == 2
    uninterrupted = compare(["full"], out_dir=tmp_path / "whole", log=_quiet, **args)
    for key in ("val_by_lr", "lr", "test_top1", "test_balanced"):
        assert resumed[0][key] == uninterrupted[0][key], key


def test_compare_refuses_a_stored_row_made_with_other_settings(tmp_path, monkeypatch):
    args = {
        "data": DataConfig(),
        "config": TINY,
        "lr_grid": (1e-2,),
        "out_dir": tmp_path,
        "bench": make_bench(),
        "log": _quiet,
    }
    compare(["linear"], seeds=(0,), **args)
    trained = _counting_compare_method(monkeypatch)
    with pytest.raises(
        BioTuneError,
        match=r"rows/linear.json was made with other settings "
        r"\(seeds: \[0\] -> \[0, 1\]\)",
    ):
        compare(["full", "linear"], seeds=(0, 1), **args)
    assert trained == []  # refused before anything trained


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"methods": ["full", "dora"]}, "unknown method 'dora'"),
        ({"lr_grid": ()}, "needs positive numbers"),
        ({"lr_grid": (0.0,)}, "needs positive numbers"),
        ({"seeds": ()}, "at least one seed"),
        ({"options": {"lora_rnak": 4}}, "unknown method option"),
        ({"scales": {"full": SearchScale(population=2)}}, "applies to"),
        (
            {"scales": {"biotune-paper": SearchScale(population=2)}},
            "given for 'biotune-paper', which is not among the methods compared",
        ),
        (
            {
                "methods": ["full", "biotune"],
                "scales": {"biotune": SearchScale(population=2, elite=2)},
            },
            "elite must be smaller",
        ),
    ],
)
def test_compare_rejects_bad_requests_before_training(tmp_path, kwargs, message):
    args = {
        "methods": ["full"],
        "data": DataConfig(),
        "config": TINY,
        "out_dir": tmp_path,
        "bench": make_bench(),
        "log": _quiet,
        **kwargs,
    }
    with pytest.raises(BioTuneError, match=message):
        compare(**args)


def _fake_run(path: Path) -> None:
    """A run directory as ``biotune search`` leaves it, written by hand."""
    names = ["stem", "blocks.0", "blocks.1", "head"]
    path.mkdir()
    (path / "config.json").write_text(
        json.dumps({"biotune": "0.1.0", "search": {"protocol": {"train": {"metric": "balanced"}}}})
    )
    (path / "blocks.json").write_text(
        json.dumps(
            [
                {"name": n, "params": p, "share": p / 1000}
                for n, p in zip(names, [100, 300, 500, 100], strict=True)
            ]
        )
    )
    records, history = [], []
    for generation in range(3):
        fitness = []
        for k in range(4):
            train = [(k + b + generation) % 3 != 0 for b in range(len(names))]
            f = 0.5 - 0.1 * generation - 0.01 * k
            fitness.append(f)
            records.append(
                {
                    "candidate": 4 * generation + k,
                    "generation": generation,
                    "role": "child",
                    "plan": {
                        "blocks": [
                            {"name": n, "train": t, "lr_mult": 1.0}
                            for n, t in zip(names, train, strict=True)
                        ]
                    },
                    "fitness": f,
                    "status": "ok",
                }
            )
        history.append(
            {
                "generation": generation,
                "best": min(fitness),
                "mean": sum(fitness) / 4,
                "fitness": sorted(fitness),
                "best_id": 0,
            }
        )
    (path / "evaluations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (path / "generations.json").write_text(json.dumps(history))
    (path / "best_plan.json").write_text(
        json.dumps(
            {
                "blocks": [
                    {"name": "stem", "train": False, "lr_mult": 1.0},
                    {"name": "blocks.0", "train": True, "lr_mult": 0.2},
                    {"name": "blocks.1", "train": True, "lr_mult": 3.0},
                    {"name": "head", "train": True, "lr_mult": 9.5},
                ],
                "fitness": 0.27,
                "candidate": 11,
            }
        )
    )


def test_report_writes_three_plots_for_a_run_directory(tmp_path):
    _fake_run(tmp_path / "run")
    paths = report(tmp_path / "run", tmp_path / "plots")
    assert paths == [tmp_path / "plots" / name for name in REPORT_FILES]
    assert all(p.read_bytes().startswith(PNG) for p in paths)


def test_report_on_a_folder_that_is_not_a_run_is_a_clear_error(tmp_path):
    with pytest.raises(BioTuneError, match="not a biotune search run directory"):
        report(tmp_path)
    with pytest.raises(BioTuneError, match="not a directory"):
        report(tmp_path / "missing")


def test_command_line_parsers_route_to_their_handlers(tmp_path):
    parser = argparse.ArgumentParser(prog="biotune")
    sub = parser.add_subparsers(dest="command", required=True)
    add_compare_parser(sub)
    add_report_parser(sub)

    args = parser.parse_args(
        [
            "compare",
            "--methods",
            "full,lora,biotune-paper",
            "--num-seeds",
            "2",
            "--lr-grid",
            "1e-3,1e-2",
            "--lora-rank",
            "4",
            "--paper-population",
            "4",
            "--paper-generations",
            "2",
            "--epochs",
            "3",
        ]
    )
    assert args.methods == ["full", "lora", "biotune-paper"]
    assert seeds_from(args) == (0, 1) and args.lr_grid == (1e-3, 1e-2) and args.epochs == 3
    assert options_from_args(args) == {"lora_rank": 4}
    assert scales_from_args(args) == {"biotune-paper": SearchScale(population=4, generations=2)}
    with pytest.raises(SystemExit):
        parser.parse_args(["compare", "--methods", "full,bitfit"])

    _fake_run(tmp_path / "run")
    args = parser.parse_args(["report", str(tmp_path / "run")])
    assert args.func(args) == 0
    assert all((tmp_path / "run" / "report" / name).exists() for name in REPORT_FILES)


def test_compare_help_quotes_the_recipe_it_uses(monkeypatch, capsys):
    """The defaults in --help are read from FINAL_TRAINING, so they cannot drift from it."""
    import biotune.presets

    monkeypatch.setattr(biotune.presets, "FINAL_TRAINING", TrainConfig(epochs=11, patience=5))
    parser = argparse.ArgumentParser(prog="biotune")
    add_compare_parser(parser.add_subparsers(dest="command"))
    with pytest.raises(SystemExit):
        parser.parse_args(["compare", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--epochs EPOCHS maximum epochs (default 11)" in text
    assert "before stopping (default 5)" in text and "(default 96)" in text  # batch size


def test_compare_options_are_the_methods_keywords_and_quote_the_presets(capsys):
    """Baseline options come from ``BaselineOptions``, whose fields must be exactly the keyword
    options the methods take and the grids they are tuned over (LLRD's decays); the scaling
    options quote each preset's own values."""
    import dataclasses

    from biotune.baselines import METHODS, BaselineOptions, tuning_options

    taken = {o for m in METHODS for o in tuning_options(m) if o != "plan"}
    assert {f.name for f in dataclasses.fields(BaselineOptions)} == taken
    parser = argparse.ArgumentParser(prog="biotune")
    add_compare_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["compare", "--sp-beta", "0.1", "--rgn-batches", "2"])
    assert options_from_args(args) == {"sp_beta": 0.1, "rgn_batches": 2}
    with pytest.raises(SystemExit):
        parser.parse_args(["compare", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--paper-epochs PAPER_EPOCHS epochs per evaluation (default 30)" in text
    assert "--biotune-population BIOTUNE_POPULATION population size (default 6)" in text
    assert "L1-SP pull toward the pretrained weights (default 0.0001)" in text


def _history_with_a_better_old_fold(path: Path) -> None:
    """A search still running: no best_plan.json; generation 0 holds the lowest fitness of all
    (0.40 on its fold) but the latest finished generation's best is candidate 7 (0.45)."""
    _fake_run(path)
    (path / "best_plan.json").unlink()
    records = [json.loads(x) for x in (path / "evaluations.jsonl").read_text().splitlines()]
    for r in records:
        r["fitness"] = {0: 0.40, 7: 0.45}.get(r["candidate"], 0.6)
    (path / "evaluations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    history = [
        {"generation": g, "best": b, "mean": 0.6, "fitness": [b], "best_id": i}
        for g, b, i in ((0, 0.40, 0), (1, 0.45, 7))
    ]
    (path / "generations.json").write_text(json.dumps(history))


def test_report_of_a_running_search_shows_the_latest_generations_best(tmp_path):
    from biotune.reports import load_run, summary_lines, winner

    _history_with_a_better_old_fold(tmp_path / "run")
    best = winner(load_run(tmp_path / "run"))
    assert (best["candidate"], best["fitness"], best["generation"]) == (7, 0.45, 1)
    lines = summary_lines(tmp_path / "run")
    assert "generation 1" in lines[0] and "validation balanced accuracy 0.5500" in lines[2]
    assert report(tmp_path / "run")[2].read_bytes().startswith(PNG)


def test_report_quotes_the_re_ranked_score_the_search_ended_with(tmp_path, capsys):
    """One winner, one validation score: the final recipe's, as the search printed it, with
    the short evaluation's beside it, named as such."""
    _fake_run(tmp_path / "run")
    plan = json.loads((tmp_path / "run" / "best_plan.json").read_text())
    runs = [
        {"candidate": 3, "rank": 0, "val_balanced": 0.9302, "fitness": 0.27, "plan": plan},
        {"candidate": 5, "rank": 1, "val_balanced": 0.9181, "fitness": 0.48, "plan": plan},
    ]
    (tmp_path / "run" / "rerank.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs))
    args = argparse.Namespace(run_dir=str(tmp_path / "run"), out=str(tmp_path / "plots"))
    assert cmd_report(args) == 0
    out = capsys.readouterr().out
    assert (
        "validation balanced accuracy 0.9302 after the final recipe (the best of 2 re-ranked "
        "plans); balanced accuracy 0.7300 in the search's short evaluation"
    ) in out


def test_report_shows_the_final_test_result_when_there_is_one(tmp_path, capsys):
    _fake_run(tmp_path / "run")
    args = argparse.Namespace(run_dir=str(tmp_path / "run"), out=str(tmp_path / "plots"))
    assert cmd_report(args) == 0
    out = capsys.readouterr().out
    assert "validation balanced accuracy 0.7300" in out and "final training: not run yet" in out
    (tmp_path / "run" / "final.json").write_text(
        json.dumps(
            {
                "test_top1": {"mean": 0.9231, "std": 0.0035},
                "test_balanced": {"mean": 0.9233, "std": 0.0032},
                "runs": [{}, {}, {}],
            }
        )
    )
    assert cmd_report(args) == 0
    out = capsys.readouterr().out
    assert "test top-1 0.9231 +- 0.0035, balanced 0.9233 +- 0.0032 (3 seeds)" in out
    assert "not run yet" not in out


def test_compare_tunes_llrd_decay_with_the_lr_and_lpft_head_lr_like_linear_probing(tmp_path):
    bench = make_bench()
    recipe = replace(TINY, epochs=2, patience=2)
    rows = compare(
        ["llrd", "lpft"],
        DataConfig(),
        recipe,
        seeds=(0, 1),
        lr_grid=(1e-3, 1e-2),
        out_dir=tmp_path,
        bench=bench,
        options={"llrd_decays": (0.5, 0.9)},
        log=_quiet,
    )
    llrd, lpft = rows
    assert len(llrd["val_by_lr"]) == 4  # two decays x two learning rates
    assert llrd["tuned"]["llrd_decay"] in (0.5, 0.9)
    assert llrd["trainable_pct"] == pytest.approx(100.0)
    assert set(lpft["info"]["head_val_by_lr"]) == {"0.001", "0.01"}
    head = lpft["info"]["phases"][0]
    assert head["lr"] in (1e-3, 1e-2) and head["epochs"] == 1
    best_head = max(lpft["info"]["head_val_by_lr"].items(), key=lambda kv: kv[1])
    assert (
        head["lr"] == float(best_head[0])
        or lpft["info"]["head_val_by_lr"][f"{head['lr']:g}"] == best_head[1]
    )
    md = (tmp_path / "compare.md").read_text()
    assert "Layer-wise lr decay" in md and "LP-FT: the head alone for the first 1 epochs" in md
