"""The one model interface every task sees, whatever format the model came from (`DiffusionModel`)."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from ..errors import MeddiffError
from .conditions import ConditionSpec, Conditioning, condition_values, parse_conditions

if TYPE_CHECKING:
    import torch

NETWORK_NAMES = ("unet", "autoencoder")
DEFAULT_SAMPLING: dict[str, Any] = {"sampler": "dpm++", "steps": 20, "precision": "auto"}


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class ModelConfigView:
    """Read-only views of a validated model config held in ``self.config`` (shared by loaded models and pickers)."""

    config: dict[str, Any]

    @property
    def kind(self) -> str:
        return self.config["kind"]

    @property
    def format(self) -> str:
        """Where the model came from: ``"meddiff"`` (a model folder) or ``"monai-bundle"``."""
        return str(self.config.get("format", "meddiff"))

    @property
    def spatial_dims(self) -> int:
        return int(self.config["spatial_dims"])

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.config["image_shape"])

    @property
    def voxel_size(self) -> tuple[float, ...]:
        return tuple(float(s) for s in self.config["voxel_size"])

    @property
    def context_slices(self) -> int:
        """Neighbouring slices on each side that a 2D segmentation model takes with its slice (extra image
        channels); 0 = none."""
        return int((self.config.get("segmentation") or {}).get("context_slices") or 0)

    @property
    def sampling_defaults(self) -> dict[str, Any]:
        """Sampler, steps and precision used when not given: the config's ``defaults`` over the package's."""
        return {**DEFAULT_SAMPLING, **self.config.get("defaults", {})}

    @property
    def conditioning(self) -> Conditioning:
        return parse_conditions(self.config.get("conditioning"), self.name)[0]

    @property
    def conditions(self) -> list[ConditionSpec]:
        return parse_conditions(self.config.get("conditioning"), self.name)[1]

    @property
    def geometry_notes(self) -> list[str]:
        """What of the geometry was not stated by the model's own files (defaults, guesses), one line each."""
        return [str(n) for n in self.config.get("geometry", {}).get("notes", [])]

    def condition_values(self, values: Mapping[str, float] | None = None) -> dict[str, float]:
        """Every condition of the model: ``values`` (checked against the ranges) over the defaults."""
        return condition_values(self.conditions, values, self.name)


def _torch():
    import torch  # imported when a model is loaded, not when configs are read (`meddiff models` stays quick)

    return torch


@dataclasses.dataclass
class DiffusionModel(ModelConfigView):
    """A loaded model: its config, MONAI networks (eval mode) and folder."""

    name: str
    path: Path
    config: dict[str, Any]
    unet: torch.nn.Module
    autoencoder: torch.nn.Module | None = None
    device: torch.device = dataclasses.field(default_factory=lambda: _torch().device("cpu"))

    @property
    def scale_factor(self) -> float:
        return float(self.config.get("latent", {}).get("scale_factor", 1.0))

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape (C, *spatial) of what the diffusion UNet denoises (latents for an LDM)."""
        if self.kind == "ldm":
            lat = self.config["latent"]
            return (int(lat["channels"]), *[int(s) for s in lat["shape"]])
        channels = int(self.config["networks"]["unet"]["out_channels"])
        return (channels, *self.image_shape)

    @property
    def weights_sha256(self) -> str:
        """One digest naming these weights (sha256 over the per-file digests, in name order)."""
        parts = [self.config["weights"][k]["sha256"] for k in sorted(self.config["weights"])]
        return hashlib.sha256("".join(parts).encode()).hexdigest()

    def num_parameters(self) -> int:
        nets = [self.unet] + ([self.autoencoder] if self.autoencoder is not None else [])
        return sum(p.numel() for net in nets for p in net.parameters())

    def to(self, device: str | torch.device) -> "DiffusionModel":
        self.device = _torch().device(device)
        self.unet.to(self.device)
        if self.autoencoder is not None:
            self.autoencoder.to(self.device)
        return self


def build_network(name: str, net_config: dict[str, Any], where: str = "") -> torch.nn.Module:
    """Instantiate a MONAI network from its keyword arguments (``where``: the config file, for errors)."""
    from monai.networks.nets import AutoencoderKL, DiffusionModelUNet

    cls = {"unet": DiffusionModelUNet, "autoencoder": AutoencoderKL}.get(name)
    if cls is None:
        raise MeddiffError(f"unknown network {name!r}")
    try:
        return cls(**copy.deepcopy(net_config))
    except (TypeError, ValueError, AssertionError, KeyError, IndexError, ZeroDivisionError, RuntimeError) as exc:
        raise MeddiffError(f"{where + ': ' if where else ''}bad {name} network config: {str(exc)[:200]}") from None


def count_parameters(config: dict[str, Any]) -> int:
    """Parameters of a config's networks, counted on the meta device (no memory, no weights read)."""
    needed = ["unet"] + (["autoencoder"] if config["kind"] == "ldm" else [])
    import torch

    with torch.device("meta"):
        return sum(p.numel() for n in needed for p in build_network(n, config["networks"][n]).parameters())
