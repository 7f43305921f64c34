"""The ``biotune`` command line: search, train, predict, blocks, compare, report.

One module per command (``search.py``, ...: its parser and its ``cmd_*``); ``_fields.py`` makes
options from config dataclass fields (``core.fields.option``) and maps them back, and
``_options.py`` holds the option groups several commands share. Every user error is a
:class:`BioTuneError`: one line on stderr, exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import re
import sys
import warnings
from collections.abc import Sequence

from biotune.errors import BioTuneError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (which option, what was expected), exit 2."""

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        self._argv = list(sys.argv[1:] if args is None else args)  # for ``_negative_value``
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> None:  # type: ignore[override]
        message = self._negative_value(message) or message
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def _negative_value(self, message: str) -> str | None:
        """argparse takes a value such as ``-5%`` after an option for another option and says
        "expected one argument"; say what is wrong with the value instead."""
        found = re.fullmatch(r"argument (\S+): expected one argument", message)
        argv = getattr(self, "_argv", [])
        if found is None:
            return None
        flags = found.group(1).split("/")
        action = next((a for a in self._actions if set(a.option_strings) & set(flags)), None)
        at = next((i for i, token in enumerate(argv) if token in flags), None)
        if action is None or at is None or at + 1 >= len(argv):
            return None
        value = argv[at + 1]
        if not re.match(r"-\.?\d", value):
            return None
        try:
            if callable(action.type):
                action.type(value)
        except argparse.ArgumentTypeError as exc:
            return f"argument {found.group(1)}: {exc}"
        except ValueError:  # argparse's own words for a plain type (int, float)
            name = getattr(action.type, "__name__", "")
            return f"argument {found.group(1)}: invalid {name} value: {value!r}"
        return f"argument {found.group(1)}: a value that starts with '-' goes as {flags[0]}={value}"


def build_parser() -> argparse.ArgumentParser:
    from biotune import __version__
    from biotune.cli.blocks import add_blocks_parser
    from biotune.cli.compare import add_compare_parser
    from biotune.cli.predict import add_predict_parser
    from biotune.cli.report import add_report_parser
    from biotune.cli.search import add_search_parser
    from biotune.cli.train import add_train_parser

    parser = _Parser(
        prog="biotune",
        description="Evolutionary selective fine-tuning (BioTune): search which blocks of a "
        "pretrained image classifier to fine-tune and at what learning rate.",
    )
    parser.add_argument("--version", action="version", version=f"biotune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in (
        add_search_parser,
        add_train_parser,
        add_predict_parser,
        add_blocks_parser,
        add_compare_parser,
        add_report_parser,
    ):
        add(sub)
    return parser


def _one_line_warning(message, category, filename, lineno, line=None) -> str:  # noqa: ANN001
    return f"biotune: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    """Run one command: a user error is one line and exit code 2, Ctrl-C one line and 130."""
    warnings.formatwarning = _one_line_warning
    try:
        args = build_parser().parse_args(argv)
        from biotune.progress import setup_logging

        setup_logging(quiet=getattr(args, "quiet", False))
        return args.func(args)
    except BioTuneError as exc:
        print(f"biotune: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("biotune: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
