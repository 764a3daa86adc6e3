"""``hasten check PATH``: which accelerators will engage on a local diffusers model, before any GPU time."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="a local diffusers model folder (with model_index.json), or 'embedded'")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    parser.add_argument("--full", action="store_true",
                        help="load every component (by default text/image encoders and tokenizers are skipped)")


def run(args: argparse.Namespace) -> int:
    from .check import check, check_path

    if args.path == "embedded":
        from ..embedded import load_embedded

        report = check(load_embedded())
    else:
        report = check_path(args.path, light=not args.full)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)
    return 0
