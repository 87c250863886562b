"""The ``meddiff`` command: one subcommand module per task, each with ``register(subparsers)``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings

from .. import __version__
from ..errors import Cancelled, MeddiffError

COMMAND_MODULES = ["models", "generate", "train", "cohort", "review", "segment", "inpaint"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meddiff", description="Diffusion models (DDPM, LDM) for 3D medical images in NIfTI."
    )
    parser.add_argument("--version", action="version", version=f"napari-meddiff {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    warnings.simplefilter("default")
    warnings.formatwarning = lambda msg, cat, *a, **k: f"meddiff: warning: {msg}\n"
    try:
        return int(args.func(args) or 0)
    except MeddiffError as exc:
        print(f"meddiff: error: {exc}", file=sys.stderr)
        return 2
    except Cancelled:
        print("meddiff: cancelled", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("meddiff: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
