"""Model folders: ``model.json`` + ``*.safetensors`` + ``MODEL_CARD.md``; find, verify, load, save.

A model is never unpickled: networks are built from the MONAI configs in ``model.json`` and weights are
read from safetensors after their sha256 has been checked.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from .cpu_kernels import prefer_onednn
from .errors import MeddiffError

MODEL_KINDS = ("ddpm", "ldm", "segmentation")
DEFAULT_MODEL = "brain-ldm-3d"
NETWORK_NAMES = ("unet", "autoencoder")


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_search_path() -> list[Path]:
    """Folders searched for model names: ``$MEDDIFF_MODELS`` (os.pathsep-separated), then shipped ones."""
    paths = [Path(p) for p in os.environ.get("MEDDIFF_MODELS", "").split(os.pathsep) if p]
    here = Path(__file__).resolve().parent
    if (here.parent / "pyproject.toml").is_file():
        paths.append(here.parent / "models")  # source checkout / editable install
    paths.append(Path(sys.prefix) / "share" / "napari-meddiff" / "models")  # installed wheel (setup.py data_files)
    return [p for p in paths if p.is_dir()]


def find_model_dir(name_or_path: str | os.PathLike) -> Path:
    candidate = Path(name_or_path).expanduser()
    if (candidate / "model.json").is_file():
        return candidate
    if candidate.is_dir():
        raise MeddiffError(f"{candidate} is a folder but has no model.json")
    for root in model_search_path():
        if (root / str(name_or_path) / "model.json").is_file():
            return root / str(name_or_path)
    known = ", ".join(sorted(available_models())) or "none"
    raise MeddiffError(f"unknown model {str(name_or_path)!r} (available: {known})")


def available_models() -> dict[str, Path]:
    """Names of all models on the search path (the first folder with a given name wins)."""
    found: dict[str, Path] = {}
    for root in model_search_path():
        for sub in sorted(root.iterdir()):
            if (sub / "model.json").is_file():
                found.setdefault(sub.name, sub)
    return found


def read_config(model_dir: Path) -> dict[str, Any]:
    try:
        config = json.loads((model_dir / "model.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MeddiffError(f"cannot read {model_dir / 'model.json'}: {exc}") from None
    kind = config.get("kind")
    if kind not in MODEL_KINDS:
        raise MeddiffError(f"{model_dir}: model kind must be one of {MODEL_KINDS}, not {kind!r}")
    for key in ("spatial_dims", "image_shape", "voxel_size", "networks", "scheduler", "weights"):
        if key not in config:
            raise MeddiffError(f"{model_dir}/model.json lacks {key!r}")
    return config


DEFAULT_SAMPLING: dict[str, Any] = {"sampler": "dpm++", "steps": 20, "precision": "auto"}


class ModelConfigView:
    """Read-only views of a ``model.json`` dict held in ``self.config`` (shared by loaded models and pickers)."""

    config: dict[str, Any]

    @property
    def kind(self) -> str:
        return self.config["kind"]

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
    def sampling_defaults(self) -> dict[str, Any]:
        """Sampler, steps and precision used when not given: model.json ``defaults`` over the package's."""
        return {**DEFAULT_SAMPLING, **self.config.get("defaults", {})}


@dataclasses.dataclass
class DiffusionModel(ModelConfigView):
    """A loaded model: its config, MONAI networks (eval mode) and folder."""

    name: str
    path: Path
    config: dict[str, Any]
    unet: torch.nn.Module
    autoencoder: torch.nn.Module | None = None
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

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
        self.device = torch.device(device)
        self.unet.to(self.device)
        if self.autoencoder is not None:
            self.autoencoder.to(self.device)
        return self


def build_network(name: str, net_config: dict[str, Any]) -> torch.nn.Module:
    """Instantiate a MONAI network from its keyword arguments."""
    from monai.networks.nets import AutoencoderKL, DiffusionModelUNet

    cls = {"unet": DiffusionModelUNet, "autoencoder": AutoencoderKL}.get(name)
    if cls is None:
        raise MeddiffError(f"unknown network {name!r}")
    try:
        return cls(**copy.deepcopy(net_config))
    except TypeError as exc:
        raise MeddiffError(f"bad {name} config in model.json: {exc}") from None


def load_model(name_or_path: str | os.PathLike = DEFAULT_MODEL, device: str | torch.device = "cpu") -> DiffusionModel:
    """Find a model by name (shipped, or under ``$MEDDIFF_MODELS``) or folder, verify and load it."""
    from safetensors.torch import load_file

    model_dir = find_model_dir(name_or_path)
    config = read_config(model_dir)
    nets: dict[str, torch.nn.Module] = {}
    needed = ["unet"] + (["autoencoder"] if config["kind"] == "ldm" else [])
    for net_name in needed:
        entry = config["weights"].get(net_name)
        if entry is None:
            raise MeddiffError(f"{model_dir}/model.json has no weights entry for {net_name!r}")
        weight_file = model_dir / entry["file"]
        if not weight_file.is_file():
            raise MeddiffError(f"missing weight file {weight_file}")
        if not weight_file.name.endswith(".safetensors"):
            raise MeddiffError(f"{weight_file}: only .safetensors weights are loaded")
        digest = sha256_file(weight_file)
        if digest != entry["sha256"]:
            raise MeddiffError(
                f"{weight_file} is corrupt or was changed: sha256 {digest[:12]}... != {entry['sha256'][:12]}... "
                "in model.json; refusing to load it"
            )
        net = build_network(net_name, config["networks"][net_name])
        state = {k: v.float() for k, v in load_file(str(weight_file)).items()}
        try:
            net.load_state_dict(state)
        except RuntimeError as exc:
            raise MeddiffError(f"{weight_file} does not fit the {net_name} config: {str(exc)[:200]}") from None
        nets[net_name] = prefer_onednn(net.eval().requires_grad_(False))
    model = DiffusionModel(
        name=str(config.get("name", model_dir.name)),
        path=model_dir,
        config=config,
        unet=nets["unet"],
        autoencoder=nets.get("autoencoder"),
    )
    return model.to(device)


MODEL_FOLDER_FILES = ("model.json", "MODEL_CARD.md", "train.yaml")
MODEL_FOLDER_SUFFIXES = (".safetensors", ".png")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def foreign_files(folder: Path) -> list[str]:
    """Entries of ``folder`` that a model folder written by this package would not hold."""
    return sorted(
        p.name for p in folder.iterdir()
        if not (p.is_file() and (p.name in MODEL_FOLDER_FILES or p.suffix in MODEL_FOLDER_SUFFIXES))
    )


def check_model_target(out_dir: Path, overwrite: bool) -> None:
    """Refuse a model folder target that would lose data: an existing path without ``overwrite``, a file,
    a folder that is not a model folder, or one holding files this package did not write."""
    if not out_dir.exists() and not out_dir.is_symlink():
        return
    if not out_dir.is_dir():
        raise MeddiffError(f"{out_dir} exists and is not a folder; choose another output folder")
    if not overwrite:
        raise MeddiffError(f"{out_dir} exists; not overwriting (choose another folder, or --overwrite to replace "
                           "an earlier model folder)")
    if not (out_dir / "model.json").is_file():
        raise MeddiffError(f"{out_dir} exists and is not a model folder (no model.json); refusing to replace it")
    foreign = foreign_files(out_dir)
    if foreign:
        raise MeddiffError(f"{out_dir} holds files a model folder does not ({', '.join(foreign[:5])}); "
                           "refusing to delete them: move them or choose another folder")


def save_model_folder(
    out_dir: str | os.PathLike,
    config: dict[str, Any],
    networks: dict[str, torch.nn.Module],
    *,
    card: str,
    half: bool = False,
    extra_files: dict[str, str | os.PathLike] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a complete model folder atomically: weights (safetensors, sha256 in model.json), config, card."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    check_model_target(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700: a model folder follows the umask like every output
        config = copy.deepcopy(config)
        config["weights"] = {}
        for net_name, net in networks.items():
            state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
            if half:
                state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
            file_name = f"{net_name}.safetensors"
            save_file(state, str(tmp / file_name))
            config["weights"][net_name] = {
                "file": file_name,
                "sha256": sha256_file(tmp / file_name),
                "dtype": "float16" if half else "float32",
                "parameters": int(sum(v.numel() for v in state.values())),
            }
        (tmp / "model.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "MODEL_CARD.md").write_text(card)
        for name, src in (extra_files or {}).items():
            shutil.copyfile(src, tmp / name)
        if out_dir.exists():
            check_model_target(out_dir, overwrite)  # again: it may have changed while the weights were written
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
