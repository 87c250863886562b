"""Command-line options shared by the commands that sample (generate, inpaint, segment)."""

from __future__ import annotations

import argparse

from napari_meddiff.choices import AUTOENCODER_PASS_ENV, AUTOENCODER_PASSES, DEVICES, PRECISION_CHOICES, SAMPLERS
from napari_meddiff.errors import MeddiffError

PRECISION_HELP = (
    "auto (bf16 autocast on CPUs with native bf16, else fp32), fp32, bf16 (autocast, CPU/CUDA), fp16 (CUDA); "
    "default: the model's"
)


def seed_value(text: str) -> int:
    """argparse type of ``--seed``: an integer from 0 to 2**63-1."""
    from napari_meddiff.diffusion.seeds import check_seed

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    try:
        return check_seed(value)
    except MeddiffError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def eta_value(text: str) -> float:
    """argparse type of ``--eta``: a number from 0 to 1."""
    from napari_meddiff.diffusion.samplers import check_eta

    try:
        return check_eta(float(text))
    except (ValueError, MeddiffError):
        raise argparse.ArgumentTypeError(f"eta must be a number from 0 (deterministic) to 1, got {text!r}") from None


def add_model_option(p: argparse.ArgumentParser, default_model: str) -> None:
    p.add_argument("--model", default=default_model, help=f"model name or folder (default {default_model})")


def add_sampling_options(p: argparse.ArgumentParser, *, eta: bool = True, device_help: str = "") -> None:
    """--sampler, --steps, [--eta], --precision and --device, each defaulting to the model's / auto."""
    p.add_argument("--sampler", choices=SAMPLERS, default=None, help="sampler (default: the model's)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    if eta:
        p.add_argument("--eta", type=eta_value, default=0.0, help="DDIM eta, 0 (deterministic, default) to 1")
    p.add_argument("--precision", choices=PRECISION_CHOICES, default=None, help=PRECISION_HELP)
    p.add_argument("--device", default="auto", help=f"one of {', '.join(DEVICES)} (default auto{device_help})")
    p.add_argument(
        "--decode",
        choices=AUTOENCODER_PASSES,
        default=None,
        action=_AutoencoderPassOption,
        help="latent models' autoencoder pass: auto (default; tiled only when a whole-volume pass would "
        f"not fit in memory), whole, or tiled (exact, memory set by the tiles); sets ${AUTOENCODER_PASS_ENV}",
    )


class _AutoencoderPassOption(argparse.Action):
    """``--decode``: the process-wide autoencoder pass (read by `autoencoder.passes.autoencoder_pass`, workers
    included)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        import os

        os.environ[AUTOENCODER_PASS_ENV] = values
        setattr(namespace, self.dest, values)


def load_model_for(model: str, device, precision: str | None, task: str):
    """Load ``model`` for one command: its UNet held at the precision ``task`` samples at (``--precision``,
    else the task's default for the model; bf16 on CPU halves the weights' memory, `models.load_model`)."""
    from napari_meddiff.models import describe_model, load_model
    from napari_meddiff.runtime.precision import resolve_precision
    from napari_meddiff.tasks.settings import task_defaults

    chosen = resolve_precision(precision or task_defaults(describe_model(model), task)["precision"], device)
    return load_model(model, device=device, precision=chosen)


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """``"1 subject"``, ``"3 subjects"``: a count with its noun in the right number."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"
