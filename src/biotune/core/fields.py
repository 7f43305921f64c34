"""``option()``: a config dataclass field that carries its help and command-line flag;
``checked_fields``: a config read from a file, checked against the fields' types.

One place holds a setting's default and what it means (the lesson of PEFT's ``LoraConfig``):
the command line (``biotune.cli._fields``) builds its options and their help from this
metadata and maps parsed options back onto the dataclass, so the two cannot drift apart.
Plain data only (strings and tuples), so that ``core`` stays free of argparse.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from biotune.errors import BioTuneError

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
    "megabytes", "cache_memory", "int", "float"; by default the default value's type);
    ``none`` says what a default of None means ("all", "the population size"); a boolean field
    is a switch: ``--flag`` sets True, a flag ``--no-...`` sets False, and ``negatable`` gives
    both ``--flag`` and ``--no-flag``.
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


def checked_fields(cls: type, data: Any, where: str) -> dict[str, Any]:
    """``data`` (read from a JSON or YAML file) as keyword arguments of dataclass ``cls``.

    Types are checked, not coerced, before anything runs: ``"epochs": 1.5`` or ``"seeds": "0"``
    would otherwise pass and fail deep inside a training. An unknown key is refused with the
    closest known one. ``where`` names the object in the one-line error (``search.protocol``).
    A field holding another dataclass must be an object here; its own ``from_dict`` checks it.
    """
    if not isinstance(data, dict):
        raise BioTuneError(f"{where} must be an object of settings (got {data!r})")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)] + [
        name for name, hint in hints.items() if isinstance(hint, dataclasses.InitVar)
    ]
    refuse_unknown(data, known, where)
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.name not in data:
            raise BioTuneError(f"{where}: '{f.name}' is missing")
    for key, value in data.items():
        expected = hints[key]
        if isinstance(expected, dataclasses.InitVar):
            expected = expected.type
        if not _matches(value, expected):
            raise BioTuneError(f"{where}.{key} must be {_describe(expected)} (got {value!r})")
    return dict(data)


def refuse_unknown(keys: Iterable[Any], known: Sequence[str], where: str) -> None:
    """A one-line error for the first key not in ``known``, with the closest known one."""
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'?" if close else f"known: {', '.join(known)}"
            raise BioTuneError(f"{where}: unknown setting '{key}'; {hint}")


def _matches(value: Any, expected: Any) -> bool:
    """Whether a value read from JSON fits a type hint (an int is a float, a bool is neither,
    a list is a tuple)."""
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if expected is Any:
        return True
    if expected is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin in (tuple, list):  # the homogeneous kind: tuple[int, ...], list[str]
        return isinstance(value, (list, tuple)) and all(_matches(v, args[0]) for v in value)
    if origin is dict or dataclasses.is_dataclass(expected):
        key_type, value_type = args or (Any, Any)
        return isinstance(value, dict) and all(
            _matches(k, key_type) and _matches(v, value_type) for k, v in value.items()
        )
    return isinstance(value, expected) if isinstance(expected, type) else True


def _describe(expected: Any) -> str:
    """A type hint in words: 'a whole number or null', 'a list of whole numbers'."""
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin in (tuple, list):
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict or dataclasses.is_dataclass(expected):
        return "an object"
    words = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}
    return words.get(expected, "null" if expected is type(None) else str(expected))
