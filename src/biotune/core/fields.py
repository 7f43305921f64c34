"""``option()``: a config dataclass field that carries its help and command-line flag.

One place holds a setting's default and what it means (the lesson of PEFT's ``LoraConfig``):
the command line (``biotune.cli._fields``) builds its options and their help from this
metadata and maps parsed options back onto the dataclass, so the two cannot drift apart.
Plain data only (strings and tuples), so that ``core`` stays free of argparse.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

#: The metadata keys ``option`` writes; ``biotune.cli._fields`` reads them.
OPTION_KEYS = ("help", "flag", "type", "choices", "metavar", "none", "negatable")


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    flag: str,
    type: str | None = None,
    choices: tuple[str, ...] | None = None,
    metavar: str | None = None,
    none: str | None = None,
    negatable: bool = False,
    default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
) -> Any:
    """A ``dataclasses.field`` with a command-line option ``flag``.

    ``help`` says what the setting does (the default is added from the configs themselves);
    ``type`` names how the command line reads a value ("positive_int", "fraction", "share",
    "megabytes", "int", "float"; by default the default value's type); ``none`` says what a
    default of None means ("all", "the population size"); a boolean field is a switch:
    ``--flag`` sets True, a flag ``--no-...`` sets False, and ``negatable`` gives both
    ``--flag`` and ``--no-flag``.
    """
    metadata = {
        "help": help,
        "flag": flag,
        "type": type,
        "choices": choices,
        "metavar": metavar,
        "none": none,
        "negatable": negatable,
    }
    return dataclasses.field(
        default=default,
        default_factory=default_factory,
        metadata={k: v for k, v in metadata.items() if v},
    )
