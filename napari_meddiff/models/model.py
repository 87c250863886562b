"""The one model interface every task sees, whatever format the model came from (`DiffusionModel`)."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from napari_meddiff.choices import schedule_type
from napari_meddiff.errors import MeddiffError
from napari_meddiff.models.conditions import Conditioning, ConditionSpec, condition_values, parse_conditions

if TYPE_CHECKING:
    import torch

NETWORK_NAMES = ("unet", "autoencoder", "controlnet")
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
    def label_map(self) -> dict[int, str]:
        """A model that generates an image from a label map: its labels by value (0: background); else empty."""
        labels = (self.config.get("label_map") or {}).get("labels") or {}
        return {int(k): str(v) for k, v in labels.items()}

    @property
    def map_generator(self) -> str | None:
        """A label-map model's map generator (a model name): it draws the map when none is given (two-stage)."""
        return (self.config.get("label_map") or {}).get("generator")

    @property
    def label_output(self) -> dict[int, str]:
        """A model that generates label maps (a tissue-map generator): their labels by value; else empty."""
        labels = (self.config.get("label_output") or {}).get("labels") or {}
        return {int(k): str(v) for k, v in labels.items()}

    @property
    def label_encoding(self) -> str:
        """How a label map reaches the network: ``one_hot`` (a channel per label, in {-1, 1}) or ``binary`` (the
        label value's 8 bits as channels in {0, 1}, as MAISI's ControlNet takes it)."""
        return str((self.config.get("label_map") or {}).get("encoding", "one_hot"))

    @property
    def body_label(self) -> int | None:
        """The label value of "body, no organ" that the model expects in a map (MAISI: 200), or None."""
        value = (self.config.get("label_map") or {}).get("body_label")
        return None if value is None else int(value)

    @property
    def takes_spacing(self) -> bool:
        """Does the UNet take its grid's voxel size (MAISI's ``spacing_tensor``)? It then generates at any."""
        return bool((self.config.get("network_inputs") or {}).get("spacing"))

    @property
    def spacing_range(self) -> list[tuple[float, float]] | None:
        """The voxel sizes (mm, [low, high] per axis) a model that takes its spacing was trained on, or None."""
        ranges = (self.config.get("network_inputs") or {}).get("spacing_range")
        return [(float(lo), float(hi)) for lo, hi in ranges] if ranges else None

    @property
    def sampling_defaults(self) -> dict[str, Any]:
        """Sampler, steps and precision used when not given: the config's ``defaults`` over the package's (whose
        sampler, for a rectified-flow model, is rflow)."""
        package = dict(DEFAULT_SAMPLING)
        if schedule_type(self.config.get("scheduler", {})) == "rflow":
            package.update(sampler="rflow", steps=30)
        return {**package, **self.config.get("defaults", {})}

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape (C, *spatial) of what the diffusion UNet denoises (latents for an LDM)."""
        if self.kind == "ldm":
            lat = self.config["latent"]
            return (int(lat["channels"]), *[int(s) for s in lat["shape"]])
        channels = int(self.config["networks"]["unet"]["out_channels"])
        return (channels, *self.image_shape)

    @property
    def output_range(self) -> tuple[float, float] | None:
        """The units of the model's output 0 and 1 (``intensity.output_range``: MAISI's CT in HU, NV-Generate's MR
        in 0..1000), or None for a normalised output."""
        given = (self.config.get("intensity") or {}).get("output_range")
        return (float(given[0]), float(given[1])) if given else None

    @property
    def output_clip(self) -> tuple[float | None, float | None]:
        """Where the model's [0, 1] output is clipped (``intensity.output_clip``; None: open). [0, 1] unless
        the config says otherwise: NV-Generate-CTMR clips its MR only below 0 (above 1 is brighter than 1000)."""
        given = (self.config.get("intensity") or {}).get("output_clip")
        if not given:
            return (0.0, 1.0)
        return tuple(None if v is None else float(v) for v in given)  # type: ignore[return-value]

    @property
    def display_window(self) -> tuple[float, float]:
        """Contrast limits to show the model's output with: CT in HU in a soft-tissue window (level 40, width 400
        HU, as a radiologist first reads an abdomen), other units over their range, a normalised output over
        [0, 1]."""
        units = self.output_range
        if units is None:
            return (0.0, 1.0)
        if units[0] <= -1000.0:  # Hounsfield units
            return (-160.0, 240.0)
        return units

    @property
    def guidance_default(self) -> float:
        """The classifier-free guidance scale used when none is given: the config's (NV-Generate-CTMR's MR models
        name theirs), else 1 (none)."""
        return float(self.config.get("defaults", {}).get("guidance_scale", 1.0))

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
    """A loaded model: its config, MONAI networks (eval mode) and folder. ``controlnet``: a ControlNet whose
    residuals the UNet takes at every step, given a conditioning image (e.g. a label map)."""

    name: str
    path: Path
    config: dict[str, Any]
    unet: torch.nn.Module | None  # None once `release_unet` freed it
    autoencoder: torch.nn.Module | None = None
    device: torch.device = dataclasses.field(default_factory=lambda: _torch().device("cpu"))
    unet_precision: str | None = None  # the one precision the UNet samples at (bf16-held weights); None: any
    controlnet: torch.nn.Module | None = None

    @property
    def scale_factor(self) -> float:
        return float(self.config.get("latent", {}).get("scale_factor", 1.0))

    @property
    def weights_sha256(self) -> str:
        """One digest naming these weights (sha256 over the per-file digests, in name order)."""
        parts = [self.config["weights"][k]["sha256"] for k in sorted(self.config["weights"])]
        return hashlib.sha256("".join(parts).encode()).hexdigest()

    @property
    def weights_differ_from_published(self) -> list[str]:
        """The weight files whose md5 differs from the one their bundle publishes (fine-tuned, or damaged in a way
        the loader did not notice): loaded with a warning, recorded in what the model generates."""
        entries = self.config["weights"].values()
        return sorted(str(w["file"]) for w in entries if isinstance(w, dict) and w.get("differs_from_published"))

    def network_inputs(
        self, batch: int, voxel_size: Sequence[float] | None = None, label_values: Iterable[int] = ()
    ) -> dict[str, dict[str, torch.Tensor]]:
        """The extra keyword inputs of the UNet and the ControlNet (`network_inputs.extra_network_inputs`) for
        ``batch`` samples on a grid of ``voxel_size`` mm (default: the model's) whose map holds ``label_values``."""
        from napari_meddiff.models.network_inputs import extra_network_inputs

        spacing = self.voxel_size if voxel_size is None else voxel_size
        return extra_network_inputs(self.config.get("network_inputs"), batch, spacing, label_values)

    def num_parameters(self) -> int:
        nets = [n for n in (self.unet, self.autoencoder, self.controlnet) if n is not None]
        return sum(p.numel() for net in nets for p in net.parameters())

    def release_unet(self) -> None:
        """Free the diffusion UNet (the model can decode, but no longer sample): for a process that has denoised
        its last sample, so that decoding does not hold the UNet's weights too (the Zoo brain LDM's: 1.1 GB)."""
        import gc
        import weakref

        from napari_meddiff.runtime.cpu_kernels import drop_kernel_choices
        from napari_meddiff.runtime.memory import release_free_heap

        if self.unet is None:
            return
        if self.controlnet is not None:  # it serves the UNet only
            drop_kernel_choices(self.controlnet)
            self.controlnet = None
        drop_kernel_choices(self.unet)  # the reference cycles that would keep it until a garbage collection
        unet = weakref.ref(self.unet)
        self.unet = None
        if unet() is not None:  # another cycle still holds it
            gc.collect()
        release_free_heap()

    def to(self, device: str | torch.device) -> DiffusionModel:
        self.device = _torch().device(device)
        for net in (self.unet, self.autoencoder, self.controlnet):
            if net is not None:
                net.to(self.device)
                adapt_to_device(net, self.device)
        return self


#: ``monai_class`` values a network config may name: MONAI's MAISI networks (`maisi_class`)
MAISI_CLASSES = {
    "DiffusionModelUNetMaisi": ("diffusion_model_unet_maisi", "unet"),
    "AutoencoderKlMaisi": ("autoencoderkl_maisi", "autoencoder"),
    "ControlNetMaisi": ("controlnet_maisi", "controlnet"),
}


def maisi_class(name: str, class_name: str, where: str) -> type:
    """MONAI's MAISI network class ``class_name`` for the ``name`` role (only these three are ever built)."""
    import importlib

    module, role = MAISI_CLASSES.get(class_name, (None, None))
    if module is None or role != name:
        raise MeddiffError(f"{where + ': ' if where else ''}{name}.monai_class {class_name!r} is not a MAISI {name}")
    return getattr(importlib.import_module(f"monai.apps.generation.maisi.networks.{module}"), class_name)


def maisi_build_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """A MAISI network's arguments as built here: one convolution split (``num_splits``, a GPU memory device that
    fails on a latent side shorter than the split count; the tiled autoencoder pass bounds memory instead), and
    no flash attention where no CUDA device is present (MONAI refuses it then). The weights are the same."""
    import torch

    adapted = {**kwargs, **({"num_splits": 1} if "num_splits" in kwargs else {})}
    if not torch.cuda.is_available():
        adapted["use_flash_attention"] = False
    return adapted


def adapt_to_device(net: torch.nn.Module, device: torch.device) -> None:
    """Off a CUDA device, MAISI's GPU-only settings off: float16 group norms (no CPU kernel takes their output
    with the float32 convolutions after them) and flash attention."""
    if device.type == "cuda":
        return
    for module in net.modules():
        if getattr(module, "norm_float16", False):
            module.norm_float16 = False
        if getattr(module, "use_flash_attention", False):
            module.use_flash_attention = False


def build_network(name: str, net_config: dict[str, Any], where: str = "") -> torch.nn.Module:
    """Instantiate a MONAI network from its keyword arguments (``where``: the config file, for errors).
    ``monai_class`` (a MAISI network's class name) picks MONAI's MAISI class, with `maisi_build_kwargs`."""
    from monai.networks.nets import AutoencoderKL, ControlNet, DiffusionModelUNet

    from napari_meddiff.models.networks import SpaceToDepthControlNet, SpaceToDepthUNet

    kwargs = copy.deepcopy(net_config)
    cls = {"unet": DiffusionModelUNet, "autoencoder": AutoencoderKL, "controlnet": ControlNet}.get(name)
    if net_config.get("space_to_depth") is not None:
        cls = {"unet": SpaceToDepthUNet, "controlnet": SpaceToDepthControlNet}.get(name, cls)
    if "monai_class" in kwargs:
        cls = maisi_class(name, str(kwargs.pop("monai_class")), where)
        kwargs = maisi_build_kwargs(kwargs)
    if cls is None:
        raise MeddiffError(f"unknown network {name!r}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, AssertionError, KeyError, IndexError, ZeroDivisionError, RuntimeError) as exc:
        raise MeddiffError(f"{where + ': ' if where else ''}bad {name} network config: {str(exc)[:200]}") from None


def build_loaded_network(
    name: str, net_config: dict[str, Any], state: dict[str, torch.Tensor], where: str = "", *, old_keys: bool = False
) -> torch.nn.Module:
    """The network with its parameters taken from ``state`` (no copy, no random initialisation first).

    Built on the meta device and given the state's own tensors (``load_state_dict(assign=True)``): a 550 M
    parameter UNet's kaiming initialisation alone took 8 s on a 2-core CPU, and a copy would double the
    weights' memory while loading. ``old_keys``: the state may use MONAI Generative's key names, renamed by
    MONAI's own ``load_old_state_dict``. Raises RuntimeError / KeyError when the state does not fit; a parameter
    or buffer missing from it is an error rather than left uninitialised."""
    torch = _torch()
    with torch.device("meta"):
        net = build_network(name, net_config, where)
    persistent = set(net.state_dict())
    if any(n not in persistent for n, _ in net.named_buffers()):  # non-persistent buffers: computed, not stored
        net = build_network(name, net_config, where)
        if old_keys:
            net.load_old_state_dict(state)
        else:
            net.load_state_dict(state)
        return net
    if old_keys and set(state) != persistent:
        state = renamed_old_state(net, state)
    net.load_state_dict(state, assign=True)
    left = [n for n, t in itertools.chain(net.named_parameters(), net.named_buffers()) if t.is_meta]
    if left:
        raise KeyError(f"not in the weights: {left[:3]}")
    return net


def renamed_old_state(net: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with MONAI Generative's key names renamed as MONAI's ``load_old_state_dict`` renames them; the
    keys it did not use stay in ``state`` (as with MONAI's method, which pops what it uses)."""
    renamed: dict[str, torch.Tensor] = {}

    def capture(new_state, strict=True, assign=False):  # MONAI's method ends by loading what it renamed
        renamed.update(new_state)

    net.load_state_dict = capture
    try:
        net.load_old_state_dict(state)
    finally:
        del net.load_state_dict
    if not renamed:
        raise KeyError("MONAI's load_old_state_dict loaded nothing it renamed")
    return renamed


def network_roles(config: dict[str, Any]) -> list[str]:
    """The networks a model config needs: the UNet, an LDM's autoencoder, a declared ControlNet."""
    networks = config.get("networks")
    controlnet = isinstance(networks, dict) and "controlnet" in networks
    return ["unet"] + (["autoencoder"] if config.get("kind") == "ldm" else []) + (["controlnet"] if controlnet else [])


def count_parameters(config: dict[str, Any]) -> int:
    """Parameters of a config's networks, counted on the meta device (no memory, no weights read)."""
    needed = network_roles(config)
    import torch

    with torch.device("meta"):
        return sum(p.numel() for n in needed for p in build_network(n, config["networks"][n]).parameters())
