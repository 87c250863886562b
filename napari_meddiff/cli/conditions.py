"""``--condition NAME=VALUE`` / ``NAME=FROM:TO`` (a sweep over a cohort's seeds) and ``--guidance-scale``."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from napari_meddiff.errors import MeddiffError
from napari_meddiff.models import ModelConfigView
from napari_meddiff.models.conditions import parse_condition_text


def add_condition_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--condition",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a condition of the model (repeatable; `meddiff models` lists them), e.g. --condition age=0.7; "
        "NAME=FROM:TO sweeps it evenly over the seeds of a cohort; unnamed conditions take their defaults",
    )
    p.add_argument(
        "--guidance-scale",
        type=float,
        default=None,
        metavar="S",
        help="classifier-free guidance scale (default: the model's, else 1: none; needs a model trained with "
        "condition dropout)",
    )


def parse_condition_args(texts: list[str]) -> dict[str, tuple[float, float | None]]:
    parsed: dict[str, tuple[float, float | None]] = {}
    for text in texts:
        name, start, stop = parse_condition_text(text)
        if name in parsed:
            raise MeddiffError(f"--condition {name} is given twice")
        parsed[name] = (start, stop)
    return parsed


def seed_conditions(
    model: ModelConfigView, texts: list[str], seeds: list[int], guidance_scale: float
) -> Callable[[int], dict[str, float]]:
    """The conditions of each seed of the cohort ``seeds`` (a sweep runs from the first seed to the last),
    every value checked against the model's declared names and ranges up front."""
    if not math.isfinite(guidance_scale):
        raise MeddiffError(f"--guidance-scale must be a finite number, got {guidance_scale}")
    if guidance_scale != 1.0 and model.conditioning.null is None:
        raise MeddiffError(
            f"{model.name} was not trained with condition dropout (no null condition declared): "
            "--guidance-scale needs one; leave it at 1"
        )
    parsed = parse_condition_args(texts)
    index = {seed: i for i, seed in enumerate(seeds)}
    last = max(1, len(seeds) - 1)

    def for_seed(seed: int) -> dict[str, float]:
        i = index[seed]
        values = {n: a if b is None else a + (b - a) * i / last for n, (a, b) in parsed.items()}
        return model.condition_values(values)

    for name, (start, stop) in parsed.items():  # both ends of a sweep, named and in range, before any work
        model.condition_values({name: start})
        if stop is not None:
            model.condition_values({name: stop})
    return for_seed


def add_fixed_condition_option(p: argparse.ArgumentParser) -> None:
    """``--condition NAME=VALUE`` for commands that make one result (inpaint): no sweeps, no guidance."""
    p.add_argument(
        "--condition",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a condition of the model (repeatable; `meddiff models` lists them); others take their defaults",
    )


def fixed_conditions(texts: list[str]) -> dict[str, float] | None:
    parsed = parse_condition_args(texts)
    sweeps = [n for n, (_, stop) in parsed.items() if stop is not None]
    if sweeps:
        raise MeddiffError(f"--condition {sweeps[0]}: a sweep (FROM:TO) is for cohorts (`meddiff generate --num N`)")
    return {n: start for n, (start, _) in parsed.items()} or None
