"""The ``hasten`` command line: one subcommand per job, each defined next to the code it runs."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module relative to the hasten package, help). Each module defines
# ``add_arguments(parser)`` and ``run(args) -> int``.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("web.app", "open the Gradio side-by-side comparison app"),
    "bench": ("bench.cli", "measure speed-up vs. quality of accelerators on the embedded model"),
    "generate": ("embedded.generate", "generate digits with the embedded model (optionally accelerated)"),
    "train-embedded": ("embedded.train", "train the embedded digit model from scikit-learn's digits"),
    "bench-kernels": ("kernels.bench", "time attention kernels (dense, block-sparse, SDPA)"),
    "calibrate-guidance": ("samplers.calibrate", "fit LinearAG coefficients on calibration trajectories"),
}


def _load(module: str):
    return importlib.import_module(f"{__package__}.{module}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hasten", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        try:
            mod = _load(module)
        except ImportError as exc:  # a subcommand whose module is not built / installed yet
            p.set_defaults(_missing=f"`hasten {name}` is unavailable: {exc}")
            continue
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "_missing", None):
        print(args._missing, file=sys.stderr)
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
