"""The command line's options mean what their help says: seeds, data fractions, --resume,
``biotune train``'s checks before training, Ctrl-C, and what a finished search prints."""

from __future__ import annotations

import json

import pytest
from test_cli_errors import SMALL, _assert_one_line_error, _run

import biotune.runner.final
import biotune.runner.workbench
from biotune.cli import EXIT_INTERRUPTED, build_parser, main
from biotune.cli._options import seeds_from
from biotune.cli.search import search_config
from biotune.errors import BioTuneError
from biotune.presets import preset


def _parse(*argv: str):
    return build_parser().parse_args(list(argv))


@pytest.mark.parametrize(
    ("argv", "seeds"),
    [
        (["--seeds", "7"], (7,)),
        (["--seeds", "0"], (0,)),
        (["--seeds", "0,3,7"], (0, 3, 7)),
        (["--num-seeds", "3"], (0, 1, 2)),
        (["--num-seeds", "1"], (0,)),
        ([], None),
    ],
)
def test_seeds_are_a_list_and_a_count_is_num_seeds(argv, seeds):
    for command in (["search"], ["train", "--plan", "head"], ["compare"]):
        assert seeds_from(_parse(*command, *argv)) == seeds
    args = _parse("search", *[a.replace("--", "--final-") for a in argv])
    assert seeds_from(args, "final-") == seeds
    if seeds is not None:
        config = search_config(_parse("search", *argv), preset("default"))
        assert config.protocol.seeds == seeds


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--seeds", "1,1"], "repeat"),
        (["--seeds", "-1"], ">= 0"),
        (["--num-seeds", "0"], "0"),
        (["--seeds", "3", "--num-seeds", "2"], "not allowed with"),
        (["--seeds", "a"], "0,3,7"),
    ],
)
def test_bad_seed_options_are_one_line_usage_errors(argv, needle, capsys):
    code, err = _run(["search", *argv], capsys)
    _assert_one_line_error(code, err, needle)


@pytest.mark.parametrize(("text", "folds"), [("1", 1), ("0.5", 2), ("1/3", 3), ("0.25", 4)])
def test_data_fraction_one_over_k_gives_k_folds(text, folds):
    config = search_config(_parse("search", "--data-fraction", text), preset("default"))
    assert config.protocol.folds == folds
    assert config.protocol.data_fraction == pytest.approx(1 / folds)


def test_rerank_option_reaches_the_configuration_and_a_negative_one_is_refused(tmp_path, capsys):
    assert preset("default").rerank != 3
    assert search_config(_parse("search", "--rerank", "3"), preset("default")).rerank == 3
    assert search_config(_parse("search"), preset("default")).rerank == preset("default").rerank
    code, err = _run(["search", "--run-dir", str(tmp_path / "run"), "--rerank", "-1"], capsys)
    _assert_one_line_error(code, err, "rerank", "-1")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text", ["0.7", "0.9", "0.4", "0.3"])
def test_data_fraction_that_is_not_one_over_k_is_refused(text, tmp_path, capsys):
    code, err = _run(
        ["search", "--run-dir", str(tmp_path / "run"), "--data-fraction", text], capsys
    )
    _assert_one_line_error(code, err, "1/k", text)
    assert not (tmp_path / "run").exists()


def test_data_fraction_help_says_one_over_k(capsys):
    with pytest.raises(SystemExit):
        _parse("search", "--help")
    text = " ".join(capsys.readouterr().out.split())
    assert "1/k for a whole number k (1, 0.5, 1/3, 0.25, ...)" in text


# -- --resume ------------------------------------------------------------------------------------


def test_resume_refuses_another_run_dir_and_a_preset(tmp_path, capsys):
    code, err = _run(
        ["search", "--resume", str(tmp_path / "a"), "--run-dir", str(tmp_path / "b")], capsys
    )
    _assert_one_line_error(code, err, "--run-dir", "drop --run-dir")
    code, err = _run(["search", "--resume", str(tmp_path / "a"), "--preset", "paper"], capsys)
    _assert_one_line_error(code, err, "--preset", "stored")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_resume_accepts_its_own_directory_as_run_dir(tmp_path, capsys):
    code, err = _run(["search", "--resume", str(tmp_path), "--run-dir", f"{tmp_path}/."], capsys)
    _assert_one_line_error(code, err, "no search found")


# -- Ctrl-C --------------------------------------------------------------------------------------


def _interrupt(*_args, **_kwargs):
    raise KeyboardInterrupt


def test_ctrl_c_before_the_search_starts_offers_no_resume_and_leaves_nothing(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(biotune.runner.workbench, "prepare", _interrupt)  # while loading the data
    run_dir = tmp_path / "run"
    code, err = _run(["search", "--run-dir", str(run_dir), "--quiet", *SMALL], capsys)
    assert code == EXIT_INTERRUPTED
    assert err.splitlines() == ["biotune: interrupted before the search started: nothing to resume"]
    assert not run_dir.exists()


def test_ctrl_c_during_the_search_prints_the_resume_command(tmp_path, capsys, monkeypatch):
    import biotune.runner.executors

    monkeypatch.setattr(biotune.runner.executors.InProcessExecutor, "run", _interrupt)
    run_dir = tmp_path / "run"
    code, err = _run(["search", "--run-dir", str(run_dir), "--quiet", *SMALL], capsys)
    assert code == EXIT_INTERRUPTED
    assert err.splitlines() == [
        "biotune: interrupted; everything finished is saved, resume with: "
        f"biotune search --resume {run_dir}"
    ]
    assert (run_dir / "config.json").exists()


def test_ctrl_c_during_start_up_is_one_line(capsys, monkeypatch):
    monkeypatch.setattr("biotune.cli.build_parser", _interrupt)
    code = main(["search"])
    err = capsys.readouterr().err
    assert code == EXIT_INTERRUPTED
    assert err.strip() == "biotune: interrupted"


# -- biotune train checks before it trains -------------------------------------------------------


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if a model is trained; count data loads."""
    loads = []
    real_prepare = biotune.runner.workbench.prepare

    def counting_prepare(*args, **kwargs):
        loads.append(args)
        return real_prepare(*args, **kwargs)

    def refuse(*_args, **_kwargs):
        raise AssertionError("trained although the command was bound to fail")

    monkeypatch.setattr(biotune.runner.workbench, "prepare", counting_prepare)
    monkeypatch.setattr(biotune.runner.final, "final_training_run", refuse)
    return loads


def test_train_refuses_a_plan_file_with_wrong_types_before_loading_data(
    tmp_path, capsys, no_training
):
    plan = tmp_path / "best_plan.json"
    plan.write_text(json.dumps({"blocks": [{"name": "stem", "train": "false", "lr_mult": 1}]}))
    code, err = _run(["train", "--plan", str(plan), *SMALL], capsys)
    _assert_one_line_error(code, err, str(plan), "block 0 'stem'", '"train" must be true or false')
    assert no_training == []


def test_train_refuses_an_unwritable_out_before_loading_data(tmp_path, capsys, no_training):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, err = _run(
        ["train", "--plan", "head", "--out", str(blocker / "out.json"), *SMALL], capsys
    )
    _assert_one_line_error(code, err, "--out", "not a directory")
    code, err = _run(["train", "--plan", "head", "--out", str(tmp_path), *SMALL], capsys)
    _assert_one_line_error(code, err, "--out", "is a directory")
    assert no_training == []


def test_train_refuses_a_plan_for_another_model_before_training(tmp_path, capsys, no_training):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"blocks": [{"name": "layer1", "train": True, "lr_mult": 1}]}))
    code, err = _run(["train", "--plan", str(plan), *SMALL], capsys)
    _assert_one_line_error(code, err, "plan.json", "does not fit")
    assert no_training == []  # refused from the architecture alone: no data, no weights loaded


# -- what a finished search prints ---------------------------------------------------------------


def test_search_reports_the_winners_validation_accuracy_not_its_fitness(
    tmp_path, capsys, monkeypatch
):
    from biotune.core.plan import FineTunePlan
    from biotune.runner.search import Search, SearchResult

    def finished(self, resume=False, final=True):
        self.run.path.mkdir(parents=True)
        (self.run.path / "search_summary.json").write_text(
            json.dumps({"cost": {"evaluations": 9, "seconds": 3.0, "ft_equivalents": 1.5}})
        )
        return SearchResult(self.run.path, FineTunePlan.full(["stem", "head"]), 0.3467, [], None)

    monkeypatch.setattr(Search, "run_search", finished)
    assert main(["search", "--run-dir", str(tmp_path / "run"), "--quiet", "--no-final"]) == 0
    out = capsys.readouterr().out
    assert "validation balanced accuracy 0.6533" in out
    assert "fitness" not in out


def test_a_reranked_search_reports_the_winners_final_recipe_score(tmp_path, capsys, monkeypatch):
    from biotune.core.plan import FineTunePlan
    from biotune.runner.search import Search, SearchResult

    def finished(self, resume=False, final=True):
        self.run.path.mkdir(parents=True)
        cost = {"evaluations": 9, "seconds": 3.0, "ft_equivalents": 2.5, "rerank": {"plans": 2}}
        (self.run.path / "search_summary.json").write_text(json.dumps({"cost": cost}))
        runs = [(3, 0, 0.71), (5, 1, 0.82)]  # (candidate, rank, val balanced)
        (self.run.path / "rerank.jsonl").write_text(
            "".join(
                json.dumps({"candidate": c, "rank": r, "val_balanced": v}) + "\n"
                for c, r, v in runs
            )
        )
        return SearchResult(self.run.path, FineTunePlan.full(["stem", "head"]), 0.3467, [], None)

    monkeypatch.setattr(Search, "run_search", finished)
    assert main(["search", "--run-dir", str(tmp_path / "run"), "--quiet", "--no-final"]) == 0
    out = capsys.readouterr().out
    assert (
        "validation balanced accuracy 0.8200 after the final recipe (the best of 2 re-ranked "
        "plans); balanced accuracy 0.6533 in the search's short evaluation"
    ) in out
    assert "2 re-ranking runs included" in out


def test_a_search_configuration_file_in_config_json_schema(tmp_path):
    """--config takes a run's config.json (whole or its "search" part); options change it."""
    import json

    from biotune.cli import build_parser
    from biotune.cli.search import read_config, search_config
    from biotune.presets import default

    stored = {"biotune": "0.2.0", "search": default().to_dict()}
    stored["search"]["evolution"]["population_size"] = 9
    path = tmp_path / "config.json"
    path.write_text(json.dumps(stored))
    assert read_config(str(path)).evolution.population_size == 9
    (tmp_path / "inner.json").write_text(json.dumps(stored["search"]))
    assert read_config(str(tmp_path / "inner.json")) == read_config(str(path))
    args = build_parser().parse_args(["search", "--config", str(path), "--elite", "3"])
    config = search_config(args, read_config(args.config))
    assert (config.evolution.population_size, config.evolution.elite) == (9, 3)

    (tmp_path / "bad.json").write_text('{"search": {"data": {}}}')
    with pytest.raises(BioTuneError, match="bad.json: search: 'evolution' is missing"):
        read_config(str(tmp_path / "bad.json"))
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(BioTuneError, match="broken.json: malformed JSON"):
        read_config(str(tmp_path / "broken.json"))
    assert main(["search", "--config", str(path), "--preset", "paper"]) == 2
    assert main(["search", "--resume", str(tmp_path), "--config", str(path)]) == 2


def _config_file(tmp_path, change):
    """A run's config.json (the default preset) with ``change`` applied to it."""
    import json

    from biotune.presets import default

    stored = {"biotune": "0.2.0", "search": default().to_dict()}
    change(stored)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(stored))
    return path


@pytest.mark.parametrize(
    "change, needle",
    [
        (
            lambda c: c["search"]["protocol"]["train"].update(epochs=1.5),
            "search.protocol.train.epochs must be a whole number (got 1.5)",
        ),
        (
            lambda c: c["search"]["protocol"].update(seeds="0"),
            "search.protocol.seeds must be a list of whole numbers (got '0')",
        ),
        (lambda c: c["search"].update(final_seeds=[0, "1"]), "search.final_seeds must be"),
        (lambda c: c["search"]["data"].update(image_size="32"), "search.data.image_size must be"),
        (lambda c: c["search"]["final"].update(amp="yes"), "search.final.amp must be"),
        (lambda c: c.update(serch={}), "unknown setting 'serch'; did you mean 'search'?"),
        (
            lambda c: c["search"]["evolution"].update(populaton_size=3),
            "search.evolution: unknown setting 'populaton_size'; did you mean 'population_size'?",
        ),
        (
            lambda c: c["search"]["protocol"]["train"].update(epoch=3),
            "search.protocol.train: unknown setting 'epoch'; did you mean 'epochs'?",
        ),
        (lambda c: c["search"].update(budget={"max_memory": 9}), "did you mean 'max_memory_mb'?"),
    ],
)
def test_a_configuration_file_is_checked_up_front_in_one_line(tmp_path, change, needle):
    from biotune.cli.search import read_config

    path = _config_file(tmp_path, change)
    with pytest.raises(BioTuneError) as caught:
        read_config(str(path))
    message = str(caught.value)
    assert message.startswith(f"--config {path}: ") and needle in message
    assert "\n" not in message and "__init__" not in message


def test_a_configuration_file_error_exits_2_before_anything_is_written(tmp_path, capsys):
    path = _config_file(tmp_path, lambda c: c["search"]["protocol"].update(seeds="0"))
    run_dir = tmp_path / "run"
    code, err = _run(["search", "--config", str(path), "--run-dir", str(run_dir)], capsys)
    _assert_one_line_error(code, err, "search.protocol.seeds")
    assert not run_dir.exists()


def test_a_malformed_yaml_configuration_is_one_line(tmp_path):
    from biotune.cli.search import read_config

    path = tmp_path / "config.yaml"
    path.write_text("search:\n  data: [1,\n  seed: {\n")
    with pytest.raises(BioTuneError, match="config.yaml: malformed YAML at line") as caught:
        read_config(str(path))
    assert "\n" not in str(caught.value)


def test_a_population_above_the_presets_initial_size_raises_it_unless_given():
    from dataclasses import replace

    base = preset("default")
    base = replace(base, evolution=replace(base.evolution, initial_size=10))
    assert search_config(_parse("search", "--population", "12"), base).evolution.initial_size == 12
    assert search_config(_parse("search", "--population", "8"), base).evolution.initial_size == 10
    assert search_config(_parse("search"), base).evolution.initial_size == 10
    paper = search_config(_parse("search", "--population", "3", "--elite", "1"), preset("paper"))
    assert (paper.evolution.population_size, paper.evolution.elite) == (3, 1)
    with pytest.raises(BioTuneError, match="initial_size"):
        search_config(_parse("search", "--population", "12", "--initial-size", "11"), base)


def test_rotating_folds_make_a_presets_rerank_from_best_pick_winners_unless_given():
    with pytest.raises(BioTuneError, match="rotating folds need the evolution .--preset evolution"):
        search_config(_parse("search", "--fold-policy", "rotate"), preset("default"))
    base = preset("evolution")
    assert base.rerank_from == "structures" and base.protocol.fold_policy == "fixed"
    assert search_config(_parse("search"), base).rerank_from == "structures"
    rotated = search_config(_parse("search", "--fold-policy", "rotate"), base)
    assert (rotated.protocol.fold_policy, rotated.rerank_from) == ("rotate", "winners")
    with pytest.raises(BioTuneError, match="--rerank-from best .* --fold-policy fixed"):
        search_config(_parse("search", "--fold-policy", "rotate", "--rerank-from", "best"), base)


def test_rerank_below_two_drops_a_presets_middle_rung_unless_given():
    base = preset("default")
    assert base.promote > base.rerank >= 2
    assert search_config(_parse("search", "--rerank", "0"), base).promote == 0
    assert search_config(_parse("search", "--rerank", "1"), base).promote == 0
    assert search_config(_parse("search", "--rerank", "3"), base).promote == base.promote
    with pytest.raises(BioTuneError, match="--promote 4 needs --rerank 2 or more"):
        search_config(_parse("search", "--rerank", "1", "--promote", "4"), base)
