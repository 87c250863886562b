"""The names the tasks accept for their settings (devices, samplers, precisions, autoencoder passes,
ensemble combines).

Importable without torch or MONAI, so parsers, `meddiff --help` and widgets can offer them cheaply; the
modules that act on them (`devices`, `samplers`, `sampling`) re-export them.
"""

from __future__ import annotations

DEVICES = ("auto", "cpu", "cuda")
SAMPLERS = ("ddpm", "ddim", "dpm++", "rflow")
# the noise schedule each sampler needs: a model's ``scheduler.type`` (``ddpm`` when absent; ``rflow``: rectified
# flow, MONAI's RFlowScheduler)
SCHEDULE_TYPES = ("ddpm", "rflow")
SAMPLER_SCHEDULE = {"ddpm": "ddpm", "ddim": "ddpm", "dpm++": "ddpm", "rflow": "rflow"}
PRECISIONS = ("fp32", "bf16", "fp16")
PRECISION_CHOICES = ("auto", *PRECISIONS)
AUTOENCODER_PASSES = ("auto", "whole", "tiled")
AUTOENCODER_PASS_ENV = "MEDDIFF_AUTOENCODER_PASS"  # the default pass of this process (`meddiff ... --decode`)
COMBINE_METHODS = ("votes", "probabilities")  # how a segmentation ensemble's members are combined
DEFAULT_COMBINE = "votes"  # for models whose defaults name none


def schedule_type(schedule: dict) -> str:
    """What a model's ``scheduler`` block trained it with: ``ddpm`` (a noise schedule) or ``rflow``."""
    return str(schedule.get("type", "ddpm"))


def samplers_for(schedule: dict) -> tuple[str, ...]:
    """The samplers that fit a model's ``scheduler`` block."""
    return tuple(s for s in SAMPLERS if SAMPLER_SCHEDULE[s] == schedule_type(schedule))
