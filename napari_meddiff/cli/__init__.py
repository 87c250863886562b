"""The ``meddiff`` command: one subcommand module per task, each with ``register(subparsers)``."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
import warnings

from napari_meddiff import __version__
from napari_meddiff.errors import Cancelled, MeddiffError

COMMAND_MODULES = ["models", "fetch", "generate", "train", "cohort", "review", "segment", "inpaint", "audit"]
LEAN_MONAI_COMMANDS = ("generate", "segment", "inpaint")  # they run models: MONAI without its plotting etc.


class Parser(argparse.ArgumentParser):
    """argparse with the project's one-line error: ``meddiff: error: generate: --seed: ...`` (exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        command = self.prog.split(" ", 1)[1] + ": " if " " in self.prog else ""
        print(f"meddiff: error: {command}{one_line(message)} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="meddiff", description="Diffusion models (DDPM, LDM) for 3D medical images in NIfTI.")
    parser.add_argument("--version", action="version", version=f"napari-meddiff {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


@contextlib.contextmanager
def restored_process_state():
    """Options that act process-wide (``--decode`` sets an environment variable for worker processes, the
    thread count follows free cores) are undone when the command returns, so in-process calls (tests, a
    napari session) do not inherit them."""
    from napari_meddiff.choices import AUTOENCODER_PASS_ENV

    env = os.environ.get(AUTOENCODER_PASS_ENV)
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else None
    try:
        yield
    finally:
        if env is None:
            os.environ.pop(AUTOENCODER_PASS_ENV, None)
        else:
            os.environ[AUTOENCODER_PASS_ENV] = env
        if threads is not None and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> int:
    with restored_process_state():
        return _main(argv)


def _main(argv: list[str] | None = None) -> int:
    from napari_meddiff.runtime.threads import configure_waiting

    configure_waiting()  # before anything imports torch
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    warnings.simplefilter("default")
    warnings.formatwarning = lambda msg, cat, *a, **k: f"meddiff: warning: {msg}\n"
    try:
        from napari_meddiff.runtime.threads import use_free_cores

        use_free_cores()  # threads for the cores other processes leave idle (MEDDIFF_THREADS)
        if args.command in LEAN_MONAI_COMMANDS:
            from napari_meddiff.runtime.lean_imports import import_monai_lean

            import_monai_lean()  # 1 s less start-up (issue 15)
        return int(args.func(args) or 0)
    except MeddiffError as exc:
        return error(str(exc))
    except Cancelled:
        print("meddiff: cancelled", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("meddiff: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        return error("out of memory: ask for less (fewer samples, a smaller batch or ensemble)")
    except OSError as exc:  # a file problem the command did not foresee: still one line, never a traceback
        where = f"{exc.filename}: " if exc.filename else ""
        return error(f"{where}{exc.strerror or exc}")
    except Exception as exc:  # last line of defence: one line, the traceback only on request
        if os.environ.get("MEDDIFF_DEBUG"):
            raise
        return error(
            f"unexpected {type(exc).__name__}: {' '.join(str(exc).split())[:300]} "
            "(please report it; MEDDIFF_DEBUG=1 shows the traceback)"
        )


def error(message: str) -> int:
    """Print a one-line ``meddiff: error: ...`` and return the exit code of user errors."""
    print(f"meddiff: error: {one_line(message)}", file=sys.stderr)
    return 2


def one_line(message: str) -> str:
    """``message`` on one line, any word of it over 400 characters cut to 200 and an ellipsis: a long user
    string (a 100,000-character ``--model``) that a message quotes is not echoed whole."""
    from napari_meddiff.models.boundary import shorten

    return " ".join(shorten(word) if len(word) > 400 else word for word in message.split())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
