"""The model registry: find model folders, read their configs and load them, whatever their format."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from napari_meddiff.errors import MeddiffError
from napari_meddiff.models.boundary import shorten
from napari_meddiff.models.bundle import FORMAT as BUNDLE_FORMAT
from napari_meddiff.models.folder import FORMAT as FOLDER_FORMAT
from napari_meddiff.models.model import (
    DiffusionModel,
    ModelConfigView,
)
from napari_meddiff.models.nv_generate import FORMAT as NV_GENERATE_FORMAT

if TYPE_CHECKING:
    import torch

DEFAULT_LABEL_MODEL = "brain-t1w-from-labels-3d"  # what generates from a tissue map when no model is named
# what `generate` runs when no model is named; the two-stage default (DEFAULT_LABEL_MODEL without a map) waits for
# its map generator: at step 975 its maps had no ventricles and a blobby outline (models/brain-tissue-maps-3d)
DEFAULT_MODEL = "brain-ldm-3d"
DEFAULT_INPAINT_MODEL = "brain-ldm-3d"  # what inpaints a scan when no model (and no tissue map) is given


class ModelFormat(Protocol):
    name: str

    def detect(self, folder: Path) -> bool: ...

    def read_config(self, folder: Path) -> dict[str, Any]: ...

    def load_networks(self, folder: Path, config: dict[str, Any]) -> dict[str, torch.nn.Module]: ...


FORMATS: tuple[ModelFormat, ...] = (FOLDER_FORMAT, BUNDLE_FORMAT, NV_GENERATE_FORMAT)


def format_of(model_dir: Path) -> ModelFormat | None:
    """The format of a folder, or None when it is no model; a MeddiffError when it cannot be looked into
    (no permission, a name too long)."""
    for fmt in FORMATS:
        try:
            if fmt.detect(model_dir):
                return fmt
        except OSError as exc:
            raise MeddiffError(f"{shorten(model_dir)}: cannot be read ({exc.strerror or exc})") from None
    return None


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # no permission to look, a name too long
        return False


def model_search_path() -> list[Path]:
    """Folders searched for model names: ``$MEDDIFF_MODELS`` (os.pathsep-separated), then shipped ones."""
    paths = [Path(p) for p in os.environ.get("MEDDIFF_MODELS", "").split(os.pathsep) if p]
    here = Path(__file__).resolve().parent.parent
    if (here.parent / "pyproject.toml").is_file():
        paths.append(here.parent / "models")  # source checkout / editable install
    paths.append(Path(sys.prefix) / "share" / "napari-meddiff" / "models")  # installed wheel (setup.py data_files)
    return [p for p in paths if _is_dir(p)]


def _model_folders(root: Path) -> list[Path]:
    """The model folders in ``root``, and the folders that cannot be looked into (`read_config` then says why:
    one unreadable folder is reported, never the end of a listing)."""
    try:
        subs = sorted(root.iterdir())
    except OSError:
        return []
    found = []
    for sub in subs:
        if sub.name.startswith("."):
            continue
        try:
            if sub.is_dir() and format_of(sub) is not None:
                found.append(sub)
        except (OSError, MeddiffError):
            found.append(sub)
    return found


def find_model_dir(name_or_path: str | os.PathLike) -> Path:
    candidate = Path(name_or_path).expanduser()
    if format_of(candidate) is not None:
        return candidate
    if _is_dir(candidate):
        raise MeddiffError(
            f"{shorten(candidate)} is a folder but no model: it has no model.json and is no MONAI bundle "
            "(configs/inference.json + configs/metadata.json)"
        )
    for root in model_search_path():
        if format_of(root / str(name_or_path)) is not None:
            return root / str(name_or_path)
    known = ", ".join(sorted(available_models())) or "none"
    raise MeddiffError(f"unknown model {shorten(repr(str(name_or_path)))} (available: {known})")


def available_models() -> dict[str, Path]:
    """Names of all model folders on the search path (the first folder with a given name wins).

    Folders are listed whether or not their config is valid: `read_config` says what is wrong with one."""
    found: dict[str, Path] = {}
    for root in model_search_path():
        for sub in _model_folders(root):
            found.setdefault(sub.name, sub)
    return found


@dataclasses.dataclass(frozen=True)
class BrokenModel:
    path: Path
    problem: str


def broken_models() -> list[BrokenModel]:
    """The folders of `available_models` whose config cannot be read, each with the reason."""
    broken = []
    for path in available_models().values():
        problem = _config_problem(path)
        if problem is not None:
            broken.append(BrokenModel(path, problem))
    return broken


def _config_problem(path: Path) -> str | None:
    """Why the config of a listed folder cannot be read, or None: whatever one folder holds, a listing goes on."""
    try:
        read_config(path)
    except MeddiffError as exc:
        return str(exc)
    except Exception as exc:  # a case no check foresaw: reported with the folder, never the end of the listing
        return f"unexpected {type(exc).__name__}: {shorten(' '.join(str(exc).split()))} (please report it)"
    return None


def read_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The validated config of a model folder in this package's schema (a bundle's is translated)."""
    model_dir = Path(model_dir)
    fmt = format_of(model_dir)
    if fmt is None:
        raise MeddiffError(f"{model_dir} is no model folder")
    return fmt.read_config(model_dir)


@dataclasses.dataclass(frozen=True)
class ModelDescription(ModelConfigView):
    """A model as its config describes it (no weights read): name, folder, validated config."""

    name: str
    path: Path
    config: dict[str, Any]


def describe_model(name_or_path: str | os.PathLike) -> ModelDescription:
    """Find a model and read its config only (cheap: for listings, pickers and checking options up front)."""
    model_dir = find_model_dir(name_or_path)
    config = read_config(model_dir)
    return ModelDescription(str(config.get("name", model_dir.name)), model_dir, config)


def load_model(
    name_or_path: str | os.PathLike = DEFAULT_MODEL, device: str | torch.device = "cpu", *, precision: str | None = None
) -> DiffusionModel:
    """Find a model by name (shipped, or under ``$MEDDIFF_MODELS``) or folder, verify and load it.

    ``precision``: the one precision this model will sample at (``auto`` resolved as the tasks resolve it), for
    a process that runs one task (the CLI); None (default): any. With ``bf16`` on CPU the UNet's convolution
    and linear weights are held in bf16 (`cpu_kernels.hold_bf16_weights`: the same results, half the memory)
    and the model then samples in bf16 only."""
    from napari_meddiff.runtime.cpu_kernels import (
        hold_bf16_weights,
        prefer_channels_last,
        prefer_onednn,
        thread_invariant_linear,
    )
    from napari_meddiff.runtime.devices import native_bf16

    model_dir = find_model_dir(name_or_path)
    fmt = format_of(model_dir)
    config = fmt.read_config(model_dir)
    nets = {
        k: thread_invariant_linear(prefer_onednn(v.eval().requires_grad_(False)))
        for k, v in fmt.load_networks(model_dir, config).items()
    }
    model = DiffusionModel(
        name=str(config.get("name", model_dir.name)),
        path=model_dir,
        config=config,
        unet=nets["unet"],
        autoencoder=nets.get("autoencoder"),
        controlnet=nets.get("controlnet"),
    ).to(device)
    if precision is not None:
        from napari_meddiff.runtime.precision import resolve_precision

        if resolve_precision(precision, model.device) == "bf16" and model.device.type == "cpu":
            for net in (model.unet, model.controlnet):
                if net is not None:
                    hold_bf16_weights(net)  # before the layout change: it then copies half the bytes
            model.unet_precision = "bf16"
    if model.device.type == "cpu" and model.spatial_dims == 3 and native_bf16(model.device):
        for net in nets.values():
            prefer_channels_last(net)  # oneDNN's blocked (AMX) kernels; the same bits for any thread count
    return model
