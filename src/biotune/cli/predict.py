"""``biotune predict``: classify images with a fine-tuned model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from biotune.cli._fields import positive_int
from biotune.cli._options import add_device_option, check_writable, write_text


def add_predict_parser(sub: Any) -> argparse.ArgumentParser:
    """``biotune predict``: sets ``func=cmd_predict``."""
    from biotune.runner.config import BAD_IMAGES

    pr = sub.add_parser(
        "predict",
        help="classify images with a fine-tuned model",
        description="Load a fine-tuned model (a search's run directory or a "
        "train --save folder) and print the class and its probability for each "
        "image (folders are searched recursively).",
    )
    pr.add_argument("model_dir", help="run directory or folder holding finetuned.json")
    pr.add_argument("images", nargs="+", help="image files or folders")
    pr.add_argument("--csv", help="write file,class,index,probability rows here instead")
    add_device_option(pr, "classify")
    pr.add_argument(
        "--batch-size",
        type=positive_int,
        default=64,
        help="images read and classified at a time (default: 64)",
    )
    pr.add_argument(
        "--bad-images",
        choices=BAD_IMAGES,
        default="skip",
        help="image files that cannot be read (corrupt, truncated, or over PIL's "
        "decompression-bomb limit): skip them with a warning (default) or stop with an error",
    )
    pr.set_defaults(func=cmd_predict)
    return pr


def cmd_predict(args: argparse.Namespace) -> int:
    import csv
    import io

    from biotune.finetuned import image_files, load_finetuned, predict_files
    from biotune.training import default_device, resolve_device

    out = Path(args.csv) if args.csv else None
    if out is not None:  # before any image is classified
        check_writable(out, "--csv")
    device = resolve_device(args.device) if args.device else default_device()
    files = image_files(args.images)
    finetuned = load_finetuned(args.model_dir, device=device)
    rows = predict_files(finetuned, files, batch_size=args.batch_size, bad_images=args.bad_images)
    if out is not None:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=["file", "class", "index", "probability"])
        writer.writeheader()
        writer.writerows(rows)
        write_text(out, text.getvalue(), "--csv")
        print(f"{len(rows)} predictions written to {out}", file=sys.stderr)
    else:
        for r in rows:
            print(f"{r['file']}\t{r['class']}\t{r['probability']:.4f}")
    return 0
