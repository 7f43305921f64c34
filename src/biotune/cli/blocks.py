"""``biotune blocks``: how a model is split into blocks."""

from __future__ import annotations

import argparse
from typing import Any

from biotune.cli._fields import positive_int


def add_blocks_parser(sub: Any) -> argparse.ArgumentParser:
    """``biotune blocks``: sets ``func=cmd_blocks``."""
    b = sub.add_parser(
        "blocks",
        help="show how a model is split into blocks",
        description="Print a model's blocks with parameter counts and shares.",
    )
    b.add_argument(
        "model",
        nargs="?",
        default="efficientnet_lite0",
        help="model name, as biotune search --model takes it (default efficientnet_lite0)",
    )
    b.add_argument(
        "--num-classes",
        type=positive_int,
        default=1000,
        help="classes of the new head (default 1000)",
    )
    b.set_defaults(func=cmd_blocks)
    return b


def cmd_blocks(args: argparse.Namespace) -> int:
    from biotune.blocks import describe_blocks, partition_blocks
    from biotune.models import load_model

    loaded = load_model(args.model, num_classes=args.num_classes, pretrained=False)
    print(f"{loaded.name} ({args.num_classes}-class head)")
    print(describe_blocks(partition_blocks(loaded.model)))
    return 0
