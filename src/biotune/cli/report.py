"""``biotune report RUN_DIR``: print a search's winner and write its plots (``biotune.reports``)."""

from __future__ import annotations

import argparse
from typing import Any

from biotune.reports import report, summary_lines


def add_report_parser(subparsers: Any) -> argparse.ArgumentParser:
    """``biotune report``: sets ``func=cmd_report``."""
    p = subparsers.add_parser(
        "report",
        help="plot a search: fitness per generation, blocks chosen, the winning plan",
        description="Read a search's run directory, print the winning plan with its "
        "validation score and, once the final training has run (final.json), its test result, "
        "and write three plots: best and mean validation score per generation, which blocks "
        "were fine-tuned across generations, and the winning plan's per-block learning rates.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory of 'biotune search'")
    p.add_argument("--out", help="where the plots go (default RUN_DIR/report)")
    p.set_defaults(func=cmd_report)
    return p


def cmd_report(args: argparse.Namespace) -> int:
    for line in summary_lines(args.run_dir):
        print(line)
    for path in report(args.run_dir, args.out):
        print(path)
    return 0
