"""The names the tasks accept for their settings (devices, samplers, precisions, autoencoder passes,
ensemble combines).

Importable without torch or MONAI, so parsers, `meddiff --help` and widgets can offer them cheaply; the
modules that act on them (`devices`, `samplers`, `sampling`) re-export them.
"""

from __future__ import annotations

DEVICES = ("auto", "cpu", "cuda")
SAMPLERS = ("ddpm", "ddim", "dpm++")
PRECISIONS = ("fp32", "bf16", "fp16")
PRECISION_CHOICES = ("auto", *PRECISIONS)
AUTOENCODER_PASSES = ("auto", "whole", "tiled")
AUTOENCODER_PASS_ENV = "MEDDIFF_AUTOENCODER_PASS"  # the default pass of this process (`meddiff ... --decode`)
COMBINE_METHODS = ("votes", "probabilities")  # how a segmentation ensemble's members are combined
DEFAULT_COMBINE = "votes"  # for models whose defaults name none
