"""MONAI Model Zoo bundles as models: a bundle folder translated into this package's config schema.

A bundle (``configs/inference.json`` or ``.yaml``, ``configs/metadata.json``, ``models/*.pt``,
``large_files.yml``) is read as data (`bundle_config`): its ``DiffusionModelUNet``, ``AutoencoderKL`` and
scheduler are found by class (never by key name: the brain LDM's ``network_def`` is its autoencoder), their
arguments resolved to literals. Nothing else in it is looked at, nothing in ``scripts/`` is imported, and
weights are read with ``torch.load(weights_only=True)``, converted from MONAI Generative's key names with
MONAI's own ``load_old_state_dict`` where needed, after their md5 (``large_files.yml``) is checked.

What a bundle does not state comes, in this order, from the user's ``<bundle>/meddiff.json``, the bundle's
files (``metadata.json`` shapes, ranges and ``channel_def``, the ``latent_shape`` literal, the autoencoder's
downsampling), and the documented per-bundle defaults (`bundle_defaults`); geometry that none gives is
recorded as a note that ``meddiff models`` prints. ``meddiff.json`` may hold::

    {"name": "...", "image_shape": [...], "voxel_size": [...], "latent": {"shape": [...], "scale_factor": 1.0},
     "defaults": {"sampler": "ddim", "steps": 50}, "weights": {"unet": "models/model.pt", "autoencoder": "..."},
     "conditioning": {"null": [...], "conditions": {"age": {"low": 0, "high": 1, "default": 0.5}}}}
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from napari_meddiff.errors import MeddiffError
from napari_meddiff.models.boundary import inside_folder, shorten
from napari_meddiff.models.bundle_config import (
    BundleConfig,
    bundle_file,
    find_config_file,
    load_data_file,
    read_bundle_config,
)
from napari_meddiff.models.bundle_schedules import bundle_schedule
from napari_meddiff.models.bundle_weights import (
    WeightsWarning,
    check_weight_file,
    checkpoint_scale_factor,
    load_network,
    read_checkpoint,
    state_dict_in,
)
from napari_meddiff.models.conditions import snake_case
from napari_meddiff.models.model import DEFAULT_SAMPLING, network_roles
from napari_meddiff.models.schema import validate_config
from napari_meddiff.models.zoo_bundles import bundle_defaults

if TYPE_CHECKING:
    import torch

SIDECAR_NAME = "meddiff.json"
SIDECAR_KEYS = (
    "name",
    "image_shape",
    "voxel_size",
    "latent",
    "defaults",
    "weights",
    "conditioning",
    "orientation",
    "variant",  # NV-Generate-CTMR: which of its models the folder opens as (`nv_generate.VARIANTS`)
)


class BundleFormat:
    """A MONAI bundle folder."""

    name = "monai-bundle"

    def detect(self, folder: Path) -> bool:
        return find_config_file(folder) is not None and (folder / "configs" / "metadata.json").is_file()

    def translate(self, folder: Path) -> dict[str, Any]:
        return translate_bundle(folder)

    def config_file(self, folder: Path) -> Path | None:
        """The file the networks are described in (named in errors)."""
        return find_config_file(folder)

    def read_config(self, folder: Path) -> dict[str, Any]:
        try:
            return self.translate(folder)
        except (TypeError, ValueError, AttributeError, KeyError, IndexError, RecursionError) as exc:
            # a value of the wrong type or shape that no check named: one line, naming the files it may be in
            raise MeddiffError(
                f"{folder}: malformed bundle: a value of the wrong type or shape in its inference config, "
                f"metadata.json or meddiff.json ({type(exc).__name__}: {shorten(' '.join(str(exc).split()))})"
            ) from None

    def load_networks(self, folder: Path, config: dict[str, Any]) -> dict[str, torch.nn.Module]:
        """The networks, their weights' md5 compared with the published ones: a file that differs (fine-tuned)
        loads with a `WeightsWarning`, marked ``differs_from_published`` in its ``weights`` entry (outputs
        record it); one the loader cannot use is refused, the md5 named as the likely reason."""
        nets = {}
        for role in network_roles(config):
            entry = config["weights"][role]
            path = weight_path(folder, role, entry["file"])  # again: the folder may have changed
            sha, md5 = check_weight_file(path, entry.get("md5"), folder)
            published = str(entry.get("md5") or "").lower()
            differs = bool(published) and md5 != published
            try:
                checkpoint = read_checkpoint(path)
                state = state_dict_in(checkpoint, role, path)
                nets[role] = load_network(role, config["networks"][role], state, path, str(self.config_file(folder)))
                if role == "unet" and config.get("latent", {}).get("scale_factor_source") == "checkpoint":
                    _checkpoint_scale(config, checkpoint, path)
            except MeddiffError as exc:
                if not differs:
                    raise
                raise MeddiffError(
                    f"{exc} (and its md5 {md5} != {published} in large_files.yml; refusing to load it: damaged, "
                    f"or not the bundle's file)"
                ) from None
            entry["sha256"] = sha
            if differs:
                entry["differs_from_published"] = True
                warnings.warn(
                    f"{path} differs from the published file: fine-tuned or damaged? (md5 {md5}, large_files.yml "
                    f"gives {published}); loaded all the same, and its outputs record weights_differ_from_published",
                    WeightsWarning,
                    stacklevel=2,
                )
        return nets


FORMAT = BundleFormat()


def _checkpoint_scale(config: dict, checkpoint: Any, path: Path) -> None:
    """The latent scale factor the diffusion checkpoint holds (MAISI's ``scale_factor``), into the config."""
    scale = checkpoint_scale_factor(checkpoint)
    if scale is None:
        raise MeddiffError(
            f'{path} holds no scale_factor beside its state dict; give "latent": {{"scale_factor": ...}} in '
            f"{SIDECAR_NAME}"
        )
    config["latent"]["scale_factor"] = scale


# --- translation --------------------------------------------------------------------------------------------


def weight_path(folder: Path, role: str, name: str) -> Path:
    """The file holding the ``role`` network's weights: inside the bundle, symlinks followed."""
    return inside_folder(folder, name, f"{folder}: the {role} weights {shorten(name)!r}")


def read_sidecar(folder: Path) -> dict[str, Any]:
    path = folder / SIDECAR_NAME
    if not path.is_file():
        return {}
    data = load_data_file(bundle_file(folder, SIDECAR_NAME))
    if not isinstance(data, dict):
        raise MeddiffError(f"{path}: must hold a JSON object")
    unknown = sorted(set(data) - set(SIDECAR_KEYS))
    if unknown:
        raise MeddiffError(f"{path}: unknown keys {unknown} (known: {', '.join(SIDECAR_KEYS)})")
    weights = data.get("weights") or {}
    if not isinstance(weights, dict):
        raise MeddiffError(f'{path}: weights must map networks to files, e.g. {{"unet": "models/model.pt"}}')
    for role, name in weights.items():
        inside_folder(folder, name, f"{path}: weights.{role} {shorten(name)!r}")
    return data


def _one(components: dict, role: str, path: Path, required: bool) -> tuple[str, str, dict] | None:
    found = components.get(role, [])
    if len(found) > 1:
        raise MeddiffError(
            f"{path}: several {role} definitions ({', '.join(r for r, _, _ in found)}); "
            "meddiff reads bundles with one of each"
        )
    if not found and required:
        raise MeddiffError(f"{path}: no MONAI DiffusionModelUNet found (the diffusion network)")
    return found[0] if found else None


def _io_formats(metadata: dict) -> tuple[dict, dict]:
    fmt = metadata.get("network_data_format", {}) if isinstance(metadata, dict) else {}
    inputs = fmt.get("inputs", {}) if isinstance(fmt, dict) else {}
    outputs = fmt.get("outputs", {}) if isinstance(fmt, dict) else {}
    return (inputs if isinstance(inputs, dict) else {}), (outputs if isinstance(outputs, dict) else {})


def _int_list(value: Any) -> list[int] | None:
    if (
        isinstance(value, list)
        and value
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        return list(value)
    return None


def _voxel_from_text(text: Any, dims: int) -> list[float] | None:
    """``"T1w head MRI with 1x1x1 mm voxel size"`` -> ``[1.0, 1.0, 1.0]``."""
    match = re.search(r"(\d+(?:\.\d+)?(?:\s*x\s*\d+(?:\.\d+)?)+)\s*mm", str(text or ""))
    if not match:
        return None
    values = [float(v) for v in re.split(r"\s*x\s*", match.group(1))]
    return values[-dims:] if len(values) >= dims else None


class _Geometry:
    """Collects where each property came from, and the notes for what the bundle did not state."""

    def __init__(self) -> None:
        self.notes: list[str] = []

    def pick(self, what: str, *candidates: tuple[str, Any]) -> Any:
        for source, value in candidates:
            if value is not None:
                if source.startswith("default"):
                    self.notes.append(
                        f"{what} {_show(value)} is meddiff's documented default for this bundle "
                        f"(the bundle does not record it)"
                    )
                elif source.startswith("guess"):
                    self.notes.append(
                        f"{what} is UNKNOWN (not in the bundle): {_show(value)} assumed; set it in {SIDECAR_NAME}"
                    )
                return value
        return None


def _show(value: Any) -> str:
    if isinstance(value, list):
        return "x".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return str(value)


def _bundle_sampling(cfg: BundleConfig, cls_name: str | None, schedule: dict) -> dict[str, Any]:
    """The sampler and steps the bundle's own inference runs (read from the text of its set_timesteps call)."""
    steps = None
    for value in cfg.data.values():
        match = re.search(r"set_timesteps\(\s*(?:num_inference_steps\s*=\s*)?(\d+)", str(value))
        if match:
            steps = int(match.group(1))
    if cls_name == "DDIMScheduler":
        return {"sampler": "ddim", "steps": steps or 50}
    return {"sampler": "ddpm", "steps": steps or schedule["num_train_timesteps"]}


def _condition_block(
    cfg: BundleConfig, metadata: dict, unet: dict, sample_channels: int, defaults: dict, sidecar: dict, where: str
) -> dict | None:
    """The ``conditioning`` block: how many values the UNet takes, their names (``channel_def``) and ranges."""
    concat = int(unet.get("in_channels", sample_channels)) - sample_channels
    context = int(unet.get("cross_attention_dim") or 0) if unet.get("with_conditioning") else 0
    labels = unet.get("num_class_embeds")
    counts = {n for n in (concat, context) if n > 0} | ({1} if labels else set())
    if not counts:
        return None
    if len(counts) > 1:
        raise MeddiffError(
            f"{where}: the UNet takes {concat} concatenated and {context} context values; "
            "meddiff needs them to be the same conditions"
        )
    count = counts.pop()
    inputs, _ = _io_formats(metadata)
    entry = next(
        (
            v
            for k, v in inputs.items()
            if isinstance(v, dict)
            and v.get("type") not in ("image", "noise", "timesteps")
            and (v.get("type") == "tabular" or k in ("condition", "conditioning", "context"))
        ),
        {},
    )
    channel_def = entry.get("channel_def", {}) if isinstance(entry.get("channel_def"), dict) else {}
    names = [snake_case(channel_def.get(str(i), f"condition_{i}")) or f"condition_{i}" for i in range(count)]
    value_range = entry.get("value_range")
    low, high = (
        (float(value_range[0]), float(value_range[1]))
        if isinstance(value_range, list) and len(value_range) == 2
        else (0.0, 1.0)
    )
    literal_defaults = _expression_defaults(cfg, count)
    overrides = (sidecar.get("conditioning") or {}).get("conditions", {})
    if not isinstance(overrides, dict):
        raise MeddiffError(f"{SIDECAR_NAME}: conditioning.conditions must map names to {{low, high, default}}")
    specs = []
    for i, name in enumerate(names):
        default = defaults.get("condition_defaults", {}).get(
            name, literal_defaults[i] if literal_defaults else (low + high) / 2
        )
        spec = {
            "name": name,
            "low": low,
            "high": high,
            "default": float(default),
            "description": str(channel_def.get(str(i), name)),
        }
        spec.update(overrides.get(name, {}))
        specs.append(spec)
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise MeddiffError(f"{SIDECAR_NAME}: unknown conditions {unknown} (the bundle's: {', '.join(names)})")
    return {
        "concat": concat > 0,
        "context": context > 0,
        "class_labels": bool(labels),
        "null": (sidecar.get("conditioning") or {}).get("null"),
        "conditions": specs,
    }


def _expression_defaults(cfg: BundleConfig, count: int) -> list[float] | None:
    """Default values from the references of a ``conditioning`` expression's text (read, not evaluated)."""
    text = cfg.data.get("conditioning")
    if not isinstance(text, str):
        return None
    refs = re.findall(r"@(\w+)", text)
    values = [cfg.literal(r) for r in refs if r != "device"]
    if len(values) == count and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return [float(v) for v in values]
    return None


def _weight_files(folder: Path, kind: str, defaults: dict, sidecar: dict, listed: list[str]) -> dict[str, str]:
    """Which file holds which network: meddiff.json, the documented defaults, else by name among
    ``models/*.pt`` and the ``.pt`` files of large_files.yml (``*autoencoder*`` and ``model.pt``)."""
    files = {**defaults.get("weights", {}), **(sidecar.get("weights") or {})}
    if "unet" not in files or (kind == "ldm" and "autoencoder" not in files):
        present = (
            [p.relative_to(folder).as_posix() for p in (folder / "models").glob("*.pt")]
            if (folder / "models").is_dir()
            else []
        )
        found = sorted(set(present) | {f for f in listed if f.endswith(".pt")})
        ae = [f for f in found if "autoencoder" in Path(f).name]
        rest = [f for f in found if f not in ae]
        if kind == "ldm" and ae:
            files.setdefault("autoencoder", ae[0])
        if "models/model.pt" in rest or len(rest) == 1:
            files.setdefault("unet", "models/model.pt" if "models/model.pt" in rest else rest[0])
    roles = ["unet"] + (["autoencoder"] if kind == "ldm" else [])
    missing = [r for r in roles if r not in files]
    if missing:
        raise MeddiffError(
            f"{folder}: cannot tell which models/*.pt holds the {' and '.join(missing)} weights; "
            f'name them in {SIDECAR_NAME} ("weights": {{"unet": "models/..."}})'
        )
    return {r: str(files[r]) for r in roles}


def large_file_entries(folder: Path) -> list[dict]:
    """The entries of the bundle's ``large_files.yml`` (``.yaml``, ``.json``), every one's path checked to stay
    inside the bundle (`meddiff fetch` downloads each to its path); empty without such a file."""
    for name in ("large_files.yml", "large_files.yaml", "large_files.json"):
        if (folder / name).is_file():
            data = load_data_file(bundle_file(folder, name))
            items = (data or {}).get("large_files", []) if isinstance(data, dict) else []
            entries = [item for item in items if isinstance(item, dict)]
            for item in entries:
                inside_folder(folder, item.get("path"), f"{folder / name}: path {shorten(item.get('path'))!r}")
            return entries
    return []


def read_large_files(folder: Path, defaults: dict) -> dict[str, str]:
    """Weight file -> md5, from the bundle's ``large_files.yml`` (else the documented ones)."""
    md5 = dict(defaults.get("large_files", {}))
    for item in large_file_entries(folder):
        if str(item.get("hash_type", "md5")).lower() == "md5" and item.get("hash_val"):
            md5[str(item.get("path"))] = str(item["hash_val"]).lower()
    return md5


@dataclasses.dataclass
class _Sources:
    """Everything a translation reads: the config, metadata.json, meddiff.json and the documented defaults."""

    folder: Path
    cfg: BundleConfig
    metadata: dict
    sidecar: dict
    defaults: dict
    dims: int
    geo: _Geometry

    @property
    def where(self) -> str:
        return str(self.cfg.path)

    def metadata_image_shape(self) -> list[int] | None:
        """The output shape metadata.json gives, when its output is the image (an LDM's UNet outputs latents)."""
        _, outputs = _io_formats(self.metadata)
        pred = next(iter(outputs.values()), {}) if outputs else {}
        shape = _int_list(pred.get("spatial_shape")) if isinstance(pred, dict) and pred.get("type") == "image" else None
        return shape[-self.dims :] if shape and len(shape) >= self.dims else None


def _latent_geometry(src: _Sources, ae: dict) -> tuple[dict, list[int]]:
    """``latent`` block and image shape of an LDM: latent shape from meddiff.json, the config's ``latent_shape``,
    metadata's noise input, metadata's image shape / the autoencoder's downsampling, or the defaults."""
    factor = 2 ** (len(ae.get("channels", (0, 0, 0, 0))) - 1)
    inputs, _ = _io_formats(src.metadata)
    meta_latent = next((v for v in inputs.values() if isinstance(v, dict) and v.get("type") == "noise"), {})
    from_meta = _int_list(meta_latent.get("spatial_shape"))
    literal = _int_list(src.cfg.literal("latent_shape"))
    meta_shape = src.metadata_image_shape()
    derived = [s // factor for s in meta_shape] if meta_shape and all(s % factor == 0 for s in meta_shape) else None
    block = src.sidecar.get("latent") or {}
    spatial = src.geo.pick(
        "latent shape",
        ("sidecar", block.get("shape")),
        ("bundle", literal[-src.dims :] if literal and len(literal) == src.dims + 1 else None),
        ("bundle", from_meta if from_meta and len(from_meta) == src.dims else None),
        ("bundle", derived),
        ("default", src.defaults.get("latent_shape", [None])[1:] or None),
    )
    if spatial is None:
        raise MeddiffError(
            f'{src.where}: the latent shape is not stated; give "latent": {{"shape": [...]}} '
            f"in {src.folder / SIDECAR_NAME}"
        )
    image_shape = src.sidecar.get("image_shape") or [int(s) * factor for s in spatial]
    if meta_shape and meta_shape != image_shape:
        src.geo.notes.append(
            f"metadata.json gives {_show(meta_shape)} (a training patch); the model generates "
            f"{_show(image_shape)} (latent {_show(list(spatial))} x {factor})"
        )
    latent = {
        "channels": int(ae.get("latent_channels", 3)),
        "shape": [int(s) for s in spatial],
        "scale_factor": float(block.get("scale_factor", 1.0)),
    }
    return latent, image_shape


def _pixel_image_shape(src: _Sources) -> list[int]:
    image_size = _int_list(src.cfg.literal("image_size"))
    image_shape = src.geo.pick(
        "image shape",
        ("sidecar", src.sidecar.get("image_shape")),
        ("bundle", src.metadata_image_shape()),
        ("bundle", image_size[-src.dims :] if image_size and len(image_size) >= src.dims else None),
        ("default", src.defaults.get("image_shape")),
    )
    if image_shape is None:
        raise MeddiffError(
            f'{src.where}: the image shape is not stated; give "image_shape" in {src.folder / SIDECAR_NAME}'
        )
    return image_shape


def _voxel_and_orientation(src: _Sources) -> list[float]:
    voxel = src.geo.pick(
        "voxel size (mm)",
        ("sidecar", src.sidecar.get("voxel_size")),
        ("bundle", _voxel_from_text(src.metadata.get("image_classes"), src.dims)),
        ("default", src.defaults.get("voxel_size")),
        ("guess", [1.0] * src.dims),
    )
    orientation = src.geo.pick(
        "orientation",
        ("sidecar", src.sidecar.get("orientation")),
        ("default", src.defaults.get("orientation")),
        ("guess", "RAS"),
    )
    if orientation != "RAS":
        raise MeddiffError(f"{src.folder / SIDECAR_NAME}: only RAS orientation is supported, not {orientation!r}")
    return voxel


def _read_metadata(folder: Path) -> dict:
    metadata = load_data_file(bundle_file(folder, "configs/metadata.json"))
    if not isinstance(metadata, dict):
        raise MeddiffError(f"{folder / 'configs' / 'metadata.json'}: must hold a JSON object")
    return metadata


def _read_sources(
    folder: Path, cfg: BundleConfig, components: dict
) -> tuple[_Sources, dict, dict | None, tuple | None]:
    metadata = _read_metadata(folder)
    _, _, unet = _one(components, "unet", cfg.path, True)
    ae_found = _one(components, "autoencoder", cfg.path, False)
    dims = unet.get("spatial_dims")
    if dims not in (2, 3) or isinstance(dims, bool):
        raise MeddiffError(f"{cfg.path}: the UNet's spatial_dims must be 2 or 3, not {dims!r}")
    src = _Sources(folder, cfg, metadata, read_sidecar(folder), bundle_defaults(folder.name), int(dims), _Geometry())
    return src, unet, (ae_found[2] if ae_found else None), (components.get("scheduler") or [None])[0]


def translate_bundle(folder: Path) -> dict[str, Any]:
    """The bundle as a validated config of this package's schema (``format: "monai-bundle"``); a MAISI bundle
    through `maisi_bundle`."""
    from napari_meddiff.models import maisi_bundle

    cfg = read_bundle_config(folder)
    components = cfg.components()
    if maisi_bundle.is_maisi(components):
        sidecar = read_sidecar(folder)
        sources = {"metadata": _read_metadata(folder), "sidecar": sidecar, "md5": read_large_files(folder, {})}
        config = maisi_bundle.translate_maisi(folder, cfg, components, sources)
        for role, entry in config["weights"].items():
            weight_path(folder, role, entry["file"])  # a models/*.pt may be a link out of the bundle
        return config
    src, unet, ae, scheduler = _read_sources(folder, cfg, components)
    kind = "ldm" if ae is not None else "ddpm"
    config: dict[str, Any] = {
        "name": str(src.sidecar.get("name", folder.name)),
        "format": "monai-bundle",
        "kind": kind,
        "spatial_dims": src.dims,
        "networks": {"unet": unet},
    }
    if kind == "ldm":
        config["latent"], image_shape = _latent_geometry(src, ae)
        config["networks"]["autoencoder"] = ae
        sample_channels = config["latent"]["channels"]
    else:
        image_shape, sample_channels = _pixel_image_shape(src), int(unet.get("out_channels", 1))
    config["image_shape"] = [int(s) for s in image_shape]
    config["voxel_size"] = [float(v) for v in _voxel_and_orientation(src)]
    sched_cls, sched_kwargs = (scheduler[1], scheduler[2]) if scheduler else (None, {})
    config["scheduler"] = bundle_schedule(sched_cls, sched_kwargs)
    config["defaults"] = {**DEFAULT_SAMPLING, **(src.sidecar.get("defaults") or {})}
    config["bundle_sampling"] = _bundle_sampling(src.cfg, sched_cls, config["scheduler"])
    conditioning = _condition_block(src.cfg, src.metadata, unet, sample_channels, src.defaults, src.sidecar, src.where)
    if conditioning is not None:
        config["conditioning"] = conditioning
    md5 = read_large_files(folder, src.defaults)
    config["weights"] = {
        role: {"file": f, **({"md5": md5[f]} if f in md5 else {})}
        for role, f in _weight_files(folder, kind, src.defaults, src.sidecar, list(md5)).items()
    }
    for role, entry in config["weights"].items():
        weight_path(folder, role, entry["file"])  # a models/*.pt may be a link out of the bundle
    config["geometry"] = {"orientation": "RAS", "notes": src.geo.notes}
    config["bundle"] = {
        k: src.metadata.get(k) for k in ("version", "name", "task", "description", "authors") if k in src.metadata
    }
    config["intensity"] = {"range": [0.0, 1.0]}
    return validate_config(config, src.where)
