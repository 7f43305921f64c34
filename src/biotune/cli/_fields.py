"""Options made from config dataclass fields, and parsed options mapped back onto the configs.

A field declared with ``core.fields.option`` carries its flag and help; ``add_field_options``
turns it into an argparse option whose help ends with the default read from the configs the
command starts from (``defaults_text``), and ``field_changes`` reads the parsed values back
as ``dataclasses.replace`` changes, so nothing maps a flag onto a field by hand.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def fraction(text: str) -> float:
    """'0.5' or '1/2' -> 0.5; SearchProtocol checks that it is 1/k."""
    try:
        if "/" in text:
            num, den = text.split("/")
            return int(num) / int(den)
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(
            f"expected a share such as 0.5 or 1/3, got {text!r}"
        ) from None


def share(text: str) -> float:
    """'10%' or '10' -> 0.1: a share of the parameters, given in percent."""
    try:
        value = float(text.strip().removesuffix("%"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a percentage such as 10%, got {text!r}"
        ) from None
    if not 0 < value <= 100:
        raise argparse.ArgumentTypeError(f"expected a percentage in (0, 100], got {text!r}")
    return value / 100


def positive_float(text: str, unit: str = "") -> float:
    """A finite number > 0; ``unit`` (e.g. " of MB") goes into the error."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a positive number{unit}, got {text!r}")
    return value


def megabytes(text: str) -> float:
    return positive_float(text, " of MB")


def cache_memory(text: str) -> str | float:
    """'auto' or a number of MB (0 or more): the feature cache's budget."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected 'auto' or a number of MB, got {text!r}"
        ) from None
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number of MB >= 0, got {text!r}")
    return value


def floats(text: str) -> tuple[float, ...]:
    """'0.5,0.65,0.8' -> (0.5, 0.65, 0.8): a short grid of numbers."""
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers such as 1e-3,1e-2, got {text!r}"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one number, got {text!r}")
    return values


#: How the command line reads a value, by the name ``option(type=...)`` gives.
TYPES: dict[str, Callable[[str], Any]] = {
    "positive_int": positive_int,
    "positive_float": positive_float,
    "fraction": fraction,
    "share": share,
    "megabytes": megabytes,
    "cache_memory": cache_memory,
    "int": int,
    "float": float,
    "floats": floats,
    "str": str,
}


def cli_fields(cls: type) -> dict[str, dataclasses.Field]:
    """The fields of config dataclass ``cls`` that have a command-line option, by name."""
    return {f.name: f for f in dataclasses.fields(cls) if "flag" in f.metadata}


def flag_of(f: dataclasses.Field, prefix: str = "") -> str:
    """'--lr', or with prefix 'final-' '--final-lr'; a '--no-' flag keeps it in front."""
    flag = f.metadata["flag"].removeprefix("--")
    if flag.startswith("no-"):
        return f"--no-{prefix}{flag.removeprefix('no-')}"
    return f"--{prefix}{flag}"


def dest_of(f: dataclasses.Field, prefix: str = "") -> str:
    """Where argparse puts the value: named after the flag ('--final-lr': 'final_lr';
    '--no-pretrained': 'pretrained'), so two options never share one."""
    return flag_of(f, prefix).removeprefix("--no-").removeprefix("--").replace("-", "_")


def is_switch(f: dataclasses.Field) -> bool:
    """A boolean field given as a bare flag (``--download``, ``--no-pretrained``)."""
    return isinstance(f.default, bool) and not f.metadata.get("negatable")


def show(f: dataclasses.Field, value: Any) -> str:
    """A default as the help shows it."""
    if value is None:
        return f.metadata.get("none", "none")
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return ",".join(show(f, v) for v in value)
    return str(value)


def defaults_text(f: dataclasses.Field, defaults: Mapping[str, Any], note: str = "") -> str:
    """' (default 8)' or ' (default preset: 2; paper preset: 30)', read from the configs;
    ``note`` goes inside the parentheses."""
    values = {label: show(f, getattr(config, f.name)) for label, config in defaults.items()}
    if len(set(values.values())) == 1:
        return f" (default {next(iter(values.values()))}{note})"
    return " (" + "; ".join(f"{label}: {v}" for label, v in values.items()) + f"{note})"


def add_field_options(
    group: Any,
    cls: type,
    names: Iterable[str],
    defaults: Mapping[str, Any],
    prefix: str = "",
    notes: Mapping[str, str] | None = None,
) -> None:
    """Add the options of fields ``names`` of ``cls``; ``defaults`` names the configs (of type
    ``cls``) whose values the help quotes, e.g. ``{"default preset": ..., "paper preset": ...}``;
    ``notes`` adds what only the command line knows to a field's default. Every option defaults
    to None: "not given", so the config's own value stays."""
    fields = cli_fields(cls)
    for name in names:
        f = fields[name]
        meta = f.metadata
        help_text = meta["help"]
        kwargs: dict[str, Any] = {"dest": dest_of(f, prefix), "default": None}
        if isinstance(f.default, bool):
            if meta.get("negatable"):
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs["action"] = "store_false" if flag_of(f).startswith("--no-") else "store_true"
        else:
            kwargs["type"] = (
                TYPES[meta.get("type", type(f.default).__name__)] if "choices" not in meta else None
            )
            kwargs["choices"] = meta.get("choices")
            kwargs["metavar"] = meta.get("metavar")
        note = (notes or {}).get(name, "")
        help_text += note if is_switch(f) else defaults_text(f, defaults, note)
        kwargs["help"] = help_text.replace("%", "%%")
        group.add_argument(
            flag_of(f, prefix),
            **{k: v for k, v in kwargs.items() if v is not None or k == "default"},
        )


def field_changes(
    args: argparse.Namespace,
    cls: type,
    names: Iterable[str] | None = None,
    prefix: str = "",
) -> dict[str, Any]:
    """The fields of ``cls`` whose options were given, as ``replace`` changes."""
    fields = cli_fields(cls)
    changes = {}
    for name in fields if names is None else names:
        value = getattr(args, dest_of(fields[name], prefix), None)
        if value is not None:
            changes[name] = value
    return changes


def apply_fields(
    args: argparse.Namespace,
    config: Any,
    names: Iterable[str] | None = None,
    prefix: str = "",
) -> Any:
    """``config`` with the options of its fields ``names`` (default: all of them) applied."""
    changes = field_changes(args, type(config), names, prefix)
    return dataclasses.replace(config, **changes) if changes else config
