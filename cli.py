"""The hasten command line: one subcommand per job, each defined next to the code it runs.

Only the chosen subcommand's module is imported, so `hasten --help` starts at once. User errors (bad
arguments, unsupported models, unwritable output) print one line, not a traceback; set HASTEN_DEBUG=1
to see the traceback anyway.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
from pathlib import Path

# subcommand -> (module relative to the hasten package, help). Each module defines
# ``add_arguments(parser)`` and ``run(args) -> int``; its top-level imports stay light.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("web.app", "open the Gradio side-by-side comparison app"),
    "bench": ("bench.cli", "measure speed-up vs. quality of accelerators on the embedded model"),
    "generate": ("embedded.generate", "generate digits with the embedded model (optionally accelerated)"),
    "train-embedded": ("embedded.train", "train the embedded digit model from scikit-learn's digits"),
    "check": ("pipelines.check_cli", "say which accelerators will engage on a model folder, and why not"),
    "bench-kernels": ("kernels.bench", "time attention kernels (dense, block-sparse, SDPA)"),
    "calibrate-guidance": ("samplers.calibrate", "fit LinearAG coefficients on calibration trajectories"),
    "tune": ("tune.cli", "search the fastest accelerator stack that keeps a quality floor; write a preset"),
}


class UserError(Exception):
    """A mistake in how a command was called: printed as one line, exit status 2."""


# --- argument types shared by the subcommands -------------------------------------------------------

def _whole(text: str, lo: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not lo <= value < 2**63:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {lo}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (steps, seeds, repeats, threads)."""
    return _whole(text, 1)


def nonneg_int(text: str) -> int:
    """An integer in [0, 2**63) (seed values)."""
    return _whole(text, 0)


def nonneg_float(text: str) -> float:
    """A finite number >= 0 (guidance scale, thresholds)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def writable_dir(path: str | Path) -> Path:
    """Create ``path`` (a folder) now and check it is writable, so a long run cannot end in a lost result."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / ".hasten-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write to output folder {p}: {exc.strerror or exc}") from None
    return p


def writable_file(path: str | Path) -> Path:
    """Check the file ``path`` can be written (its folder is created) before a long run starts."""
    p = Path(path)
    if p.exists() and p.is_dir():
        raise UserError(f"{p} is a folder; give a file name")
    writable_dir(p.parent if str(p.parent) else ".")
    if p.exists() and not os.access(p, os.W_OK):
        raise UserError(f"cannot overwrite {p}: permission denied")
    return p


# --- the command ------------------------------------------------------------------------------------

def _load(module: str):
    return importlib.import_module(f"{__package__}.{module}")


# A flag that hands a subcommand to another module: `hasten train-embedded --video` trains the video model.
VARIANTS: dict[tuple[str, str], str] = {("train-embedded", "--video"): "embedded.video_train"}


def build_parser(command: str | None = None, argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module (if given) is imported to add its arguments."""
    parser = argparse.ArgumentParser(
        prog="hasten",
        description="Training-free acceleration for diffusion models: benches, the compare app, the embedded model.",
        epilog="`hasten COMMAND --help` shows a command's options. Set HASTEN_DEBUG=1 for tracebacks.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        if name != command:
            continue
        module = next((m for (c, flag), m in VARIANTS.items() if c == name and flag in (argv or ())), module)
        try:
            mod = _load(module)
        except ImportError as exc:  # a subcommand whose optional extra is not installed
            p.set_defaults(_missing=f"`hasten {name}` is unavailable: {exc}")
            continue
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def _command_of(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(_command_of(argv), argv).parse_args(argv)
    if getattr(args, "_missing", None):
        print(f"hasten: {args._missing}", file=sys.stderr)
        return 2
    from .errors import UnsupportedModelError

    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print(f"hasten {args.command}: interrupted", file=sys.stderr)
        return 130
    except (UserError, UnsupportedModelError, FileNotFoundError) as exc:
        if os.environ.get("HASTEN_DEBUG"):
            raise
        print(f"hasten {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
