"""The options made from config dataclass fields cannot drift: every field with a flag is in the
matching ``--help`` with the default its config holds, and parsing its flag sets that field."""

from __future__ import annotations

import argparse
import re

import pytest

from biotune.cli import build_parser
from biotune.cli._fields import cli_fields, flag_of, is_switch, show
from biotune.cli._options import MACHINE, RECIPE, data_config, train_config
from biotune.cli.compare import RECIPE as COMPARE_RECIPE
from biotune.cli.search import search_config
from biotune.core.budget import BudgetConfig
from biotune.core.evolution import EvolutionConfig
from biotune.presets import FINAL_TRAINING, default, evolution, paper
from biotune.runner.config import DataConfig, SearchConfig
from biotune.runner.fitness import PruneConfig, SearchProtocol
from biotune.training import TrainConfig

PRESETS = {"default preset": default(), "paper preset": paper()}

#: Where each config of ``biotune search`` sits in a SearchConfig, the flags' prefix and the
#: fields with that prefix (None: all). The machine options (--precision, --channels-last) are
#: one switch for every training: the final training's recipe has --final-epochs and the like.
SEARCH = [
    (SearchConfig, "", lambda c: c, None),
    (DataConfig, "", lambda c: c.data, None),
    (EvolutionConfig, "", lambda c: c.evolution, None),
    (SearchProtocol, "", lambda c: c.protocol, None),
    (PruneConfig, "", lambda c: c.protocol.prune, None),
    (BudgetConfig, "", lambda c: c.budget, None),
    (TrainConfig, "", lambda c: c.protocol.train, None),
    (TrainConfig, "final-", lambda c: c.final, RECIPE),
    (TrainConfig, "", lambda c: c.final, MACHINE),
]

#: A value to give each field's flag that no preset holds: (text on the command line, value).
SAMPLES = {
    "seed": ("5", 5),
    "rerank": ("3", 3),
    "rerank_from": ("last", "last"),
    "model": ("resnet18", "resnet18"),
    "dataset": ("digits", "digits"),
    "data_root": ("somewhere", "somewhere"),
    "checkpoint": ("w.pt", "w.pt"),
    "image_size": ("48", 48),
    "train_size": ("7", 7),
    "val_size": ("8", 8),
    "test_size": ("9", 9),
    "split_seed": ("4", 4),
    "bad_images": ("error", "error"),
    "population_size": ("12", 12),
    "generations": ("5", 5),
    "elite": ("4", 4),
    "initial_size": ("20", 20),
    "objective": ("pareto", "pareto"),
    "data_fraction": ("1/4", 0.25),
    "cache_memory": ("12.5", 12.5),
    "cpu_threads": ("2", 2),
    "quantile": ("0.25", 0.25),
    "max_trainable": ("10%", 0.1),
    "max_memory_mb": ("100", 100.0),
    "pareto_cost": ("memory", "memory"),
    "pareto_final": ("3", 3),
    "epochs": ("4", 4),
    "patience": ("4", 4),
    "min_epochs_share": ("3/4", 0.75),
    "promote": ("3", 3),
    "promote_epochs": ("3", 3),
    "sampler": ("random", "random"),
    "max_ft_equivalents": ("2.5", 2.5),
    "fold_policy": ("rotate", "rotate"),
    "anchor_set": ("basic", "basic"),
    "batch_size": ("16", 16),
    "base_lr": ("0.02", 0.02),
    "optimizer": ("sgd", "sgd"),
    "precision": ("bf16", "bf16"),
}


#: What a sample value needs beside it to be a valid configuration.
NEEDS: dict[str, list[str]] = {}


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _help_of(parser: argparse.ArgumentParser, flag: str) -> str:
    """The help of ``flag`` as ``--help`` prints it, on one line."""
    action = next(a for a in parser._actions if flag in a.option_strings)
    return " ".join((action.help % {}).split())


def _argv(field, prefix: str, base) -> list[str]:
    """Command-line words that set ``field`` to a value other than ``base``'s."""
    flag = flag_of(field, prefix)
    if isinstance(field.default, bool):
        if is_switch(field):
            return [flag]
        return [flag if not getattr(base, field.name) else "--no-" + flag.removeprefix("--")]
    return [flag, SAMPLES[field.name][0], *NEEDS.get(field.name, [])]


def _expected(field, base):
    if isinstance(field.default, bool):
        return (not field.default) if is_switch(field) else not getattr(base, field.name)
    return SAMPLES[field.name][1]


def _search_cases():
    return [
        pytest.param(cls, prefix, where, f, id=f"{prefix}{cls.__name__}.{name}")
        for cls, prefix, where, names in SEARCH
        for name, f in cli_fields(cls).items()
        if names is None or name in names
    ]


def test_every_config_field_with_a_flag_is_a_search_option():
    classes = {cls for cls, *_ in SEARCH}
    every = {(cls, name) for cls in classes for name in cli_fields(cls)}
    assert every == {(p.values[0], p.values[3].name) for p in _search_cases()}
    shown = " ".join(_subparser("search").format_help().split())
    for param in _search_cases():
        cls, prefix, _, f = param.values
        assert flag_of(f, prefix) in shown, f"{cls.__name__}.{f.name}"


@pytest.mark.parametrize(("cls", "prefix", "where", "field"), _search_cases())
def test_search_help_quotes_each_presets_default(cls, prefix, where, field):
    text = _help_of(_subparser("search"), flag_of(field, prefix))
    assert text.startswith(" ".join(field.metadata["help"].split()))
    if is_switch(field):
        return
    for label, config in PRESETS.items():
        owner = where(config) if where(config) is not None else cls()
        assert show(field, getattr(owner, field.name)) in text, label
    assert "default" in text


@pytest.mark.parametrize(("cls", "prefix", "where", "field"), _search_cases())
def test_parsing_a_search_flag_sets_its_field(cls, prefix, where, field):
    base = evolution()  # every field of the evolution's search can change alone
    owner = where(base) if where(base) is not None else cls()
    assert _expected(field, owner) != getattr(owner, field.name)  # else the test cannot fail
    args = build_parser().parse_args(["search", *_argv(field, prefix, owner)])
    config = search_config(args, base)
    assert getattr(where(config), field.name) == pytest.approx(_expected(field, owner))


@pytest.mark.parametrize(("command", "names"), [("train", RECIPE), ("compare", COMPARE_RECIPE)])
def test_train_and_compare_quote_the_final_recipe_and_set_it(command, names):
    parser = _subparser(command)
    train_fields = cli_fields(TrainConfig)
    for name in (*names, "precision"):
        f = train_fields[name]
        assert show(f, getattr(FINAL_TRAINING, name)) in _help_of(parser, flag_of(f))
        args = build_parser().parse_args(
            [
                command,
                *(["--plan", "full"] if command == "train" else []),
                *_argv(f, "", FINAL_TRAINING),
            ]
        )
        assert getattr(train_config(args, "", FINAL_TRAINING), name) == pytest.approx(
            _expected(f, FINAL_TRAINING)
        )
    for f in cli_fields(DataConfig).values():
        if not is_switch(f):
            assert re.search(
                r"\(default " + re.escape(show(f, getattr(DataConfig(), f.name))),
                _help_of(parser, flag_of(f)),
            )
        args = build_parser().parse_args(
            [
                command,
                *(["--plan", "full"] if command == "train" else []),
                *_argv(f, "", DataConfig()),
            ]
        )
        assert getattr(data_config(args, DataConfig()), f.name) == _expected(f, DataConfig())
