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

import contextlib
import hashlib
import inspect
import io
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from ..errors import MeddiffError
from .bundle_config import BundleConfig, find_config_file, load_data_file, read_bundle_config
from .bundle_defaults import bundle_defaults
from .conditions import snake_case
from .model import DEFAULT_SAMPLING, build_network
from .schema import validate_config

SIDECAR_NAME = "meddiff.json"
SIDECAR_KEYS = ("name", "image_shape", "voxel_size", "latent", "defaults", "weights", "conditioning", "orientation")
#: checkpoint keys under which nested state dicts are looked for, per network
NESTED_KEYS = {
    "unet": ("unet_state_dict", "diffusion_state_dict", "diffusion", "unet", "model_state_dict", "state_dict", "model",
             "network", "net"),
    "autoencoder": ("autoencoder_state_dict", "autoencoder", "vae", "model_state_dict", "state_dict", "model",
                    "network", "net"),
}


class BundleFormat:
    """A MONAI bundle folder."""

    name = "monai-bundle"

    def detect(self, folder: Path) -> bool:
        return find_config_file(folder) is not None and (folder / "configs" / "metadata.json").is_file()

    def read_config(self, folder: Path) -> dict[str, Any]:
        return translate_bundle(folder)

    def load_networks(self, folder: Path, config: dict[str, Any]) -> dict[str, torch.nn.Module]:
        nets = {}
        for role in ["unet"] + (["autoencoder"] if config["kind"] == "ldm" else []):
            entry = config["weights"][role]
            path = folder / entry["file"]
            entry["sha256"] = check_weight_file(path, entry.get("md5"), folder)
            net = build_network(role, config["networks"][role], str(find_config_file(folder)))
            load_weights(net, read_state_dict(path, role), path)
            nets[role] = net
        return nets


FORMAT = BundleFormat()


# --- translation --------------------------------------------------------------------------------------------


def read_sidecar(folder: Path) -> dict[str, Any]:
    path = folder / SIDECAR_NAME
    if not path.is_file():
        return {}
    data = load_data_file(path)
    if not isinstance(data, dict):
        raise MeddiffError(f"{path}: must hold a JSON object")
    unknown = sorted(set(data) - set(SIDECAR_KEYS))
    if unknown:
        raise MeddiffError(f"{path}: unknown keys {unknown} (known: {', '.join(SIDECAR_KEYS)})")
    return data


def _one(components: dict, role: str, path: Path, required: bool) -> tuple[str, str, dict] | None:
    found = components.get(role, [])
    if len(found) > 1:
        raise MeddiffError(f"{path}: several {role} definitions ({', '.join(r for r, _, _ in found)}); "
                           "meddiff reads bundles with one of each")
    if not found and required:
        raise MeddiffError(f"{path}: no MONAI DiffusionModelUNet found (the diffusion network)")
    return found[0] if found else None


def _io_formats(metadata: dict) -> tuple[dict, dict]:
    fmt = metadata.get("network_data_format", {}) if isinstance(metadata, dict) else {}
    inputs = fmt.get("inputs", {}) if isinstance(fmt, dict) else {}
    outputs = fmt.get("outputs", {}) if isinstance(fmt, dict) else {}
    return (inputs if isinstance(inputs, dict) else {}), (outputs if isinstance(outputs, dict) else {})


def _int_list(value: Any) -> list[int] | None:
    if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
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
                    self.notes.append(f"{what} {_show(value)} is meddiff's documented default for this bundle "
                                      f"(the bundle does not record it)")
                elif source.startswith("guess"):
                    self.notes.append(f"{what} is UNKNOWN (not in the bundle): {_show(value)} assumed; "
                                      f"set it in {SIDECAR_NAME}")
                return value
        return None


def _show(value: Any) -> str:
    if isinstance(value, list):
        return "x".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return str(value)


def _schedule(cls_name: str | None, kwargs: dict) -> dict[str, Any]:
    """A bundle scheduler's arguments -> this package's schedule dict, MONAI's class defaults filled in."""
    from monai.networks import schedulers

    cls = getattr(schedulers, cls_name or "DDPMScheduler")
    params = inspect.signature(cls.__init__).parameters
    schedule = {
        "num_train_timesteps": int(kwargs.get("num_train_timesteps", params["num_train_timesteps"].default)),
        "schedule": str(kwargs.get("schedule", params["schedule"].default)),
        "prediction_type": str(kwargs.get("prediction_type", params["prediction_type"].default)),
        "clip_sample": bool(kwargs.get("clip_sample", params["clip_sample"].default)),
    }
    for key in ("beta_start", "beta_end"):
        if key in kwargs:
            schedule[key] = float(kwargs[key])
    return schedule


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


def _condition_block(cfg: BundleConfig, metadata: dict, unet: dict, sample_channels: int, defaults: dict,
                     sidecar: dict, where: str) -> dict | None:
    """The ``conditioning`` block: how many values the UNet takes, their names (``channel_def``) and ranges."""
    concat = int(unet.get("in_channels", sample_channels)) - sample_channels
    context = int(unet.get("cross_attention_dim") or 0) if unet.get("with_conditioning") else 0
    labels = unet.get("num_class_embeds")
    counts = {n for n in (concat, context) if n > 0} | ({1} if labels else set())
    if not counts:
        return None
    if len(counts) > 1:
        raise MeddiffError(f"{where}: the UNet takes {concat} concatenated and {context} context values; "
                           "meddiff needs them to be the same conditions")
    count = counts.pop()
    inputs, _ = _io_formats(metadata)
    entry = next((v for k, v in inputs.items() if isinstance(v, dict) and v.get("type") not in ("image", "noise", "timesteps")
                  and (v.get("type") == "tabular" or k in ("condition", "conditioning", "context"))), {})
    channel_def = entry.get("channel_def", {}) if isinstance(entry.get("channel_def"), dict) else {}
    names = [snake_case(channel_def.get(str(i), f"condition_{i}")) or f"condition_{i}" for i in range(count)]
    value_range = entry.get("value_range")
    low, high = (float(value_range[0]), float(value_range[1])) if isinstance(value_range, list) and len(value_range) == 2 else (0.0, 1.0)
    literal_defaults = _expression_defaults(cfg, count)
    overrides = (sidecar.get("conditioning") or {}).get("conditions", {})
    if not isinstance(overrides, dict):
        raise MeddiffError(f"{SIDECAR_NAME}: conditioning.conditions must map names to {{low, high, default}}")
    specs = []
    for i, name in enumerate(names):
        default = defaults.get("condition_defaults", {}).get(name, literal_defaults[i] if literal_defaults else (low + high) / 2)
        spec = {"name": name, "low": low, "high": high, "default": float(default),
                "description": str(channel_def.get(str(i), name))}
        spec.update(overrides.get(name, {}))
        specs.append(spec)
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise MeddiffError(f"{SIDECAR_NAME}: unknown conditions {unknown} (the bundle's: {', '.join(names)})")
    return {"concat": concat > 0, "context": context > 0, "class_labels": bool(labels),
            "null": (sidecar.get("conditioning") or {}).get("null"), "conditions": specs}


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
        present = [p.relative_to(folder).as_posix() for p in (folder / "models").glob("*.pt")] if (folder / "models").is_dir() else []
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
        raise MeddiffError(f"{folder}: cannot tell which models/*.pt holds the {' and '.join(missing)} weights; "
                           f"name them in {SIDECAR_NAME} (\"weights\": {{\"unet\": \"models/...\"}})")
    return {r: str(files[r]) for r in roles}


def read_large_files(folder: Path, defaults: dict) -> dict[str, str]:
    """Weight file -> md5, from the bundle's ``large_files.yml`` (else the documented ones)."""
    md5 = dict(defaults.get("large_files", {}))
    for name in ("large_files.yml", "large_files.yaml", "large_files.json"):
        if (folder / name).is_file():
            data = load_data_file(folder / name)
            for item in (data or {}).get("large_files", []) if isinstance(data, dict) else []:
                if isinstance(item, dict) and str(item.get("hash_type", "md5")).lower() == "md5" and item.get("hash_val"):
                    md5[str(item.get("path"))] = str(item["hash_val"]).lower()
            break
    return md5


def translate_bundle(folder: Path) -> dict[str, Any]:
    """The bundle as a validated config of this package's schema (``format: "monai-bundle"``)."""
    cfg = read_bundle_config(folder)
    where = str(cfg.path)
    metadata = load_data_file(folder / "configs" / "metadata.json")
    if not isinstance(metadata, dict):
        raise MeddiffError(f"{folder / 'configs' / 'metadata.json'}: must hold a JSON object")
    sidecar = read_sidecar(folder)
    defaults = bundle_defaults(folder.name)
    components = cfg.components()
    _, _, unet = _one(components, "unet", cfg.path, True)
    ae_found = _one(components, "autoencoder", cfg.path, False)
    sched_found = (components.get("scheduler") or [None])[0]
    ae = ae_found[2] if ae_found else None
    kind = "ldm" if ae is not None else "ddpm"
    dims = int(unet.get("spatial_dims", 0))
    if dims not in (2, 3):
        raise MeddiffError(f"{where}: the UNet's spatial_dims must be 2 or 3, not {unet.get('spatial_dims')!r}")
    inputs, outputs = _io_formats(metadata)
    pred = next(iter(outputs.values()), {}) if outputs else {}
    is_image = isinstance(pred, dict) and pred.get("type") == "image"  # an LDM's UNet outputs latents ("feature")
    meta_shape = _int_list(pred.get("spatial_shape")) if is_image else None
    meta_shape = meta_shape[-dims:] if meta_shape and len(meta_shape) >= dims else None
    geo = _Geometry()
    latent_block = sidecar.get("latent") or {}
    config: dict[str, Any] = {
        "name": str(sidecar.get("name", folder.name)),
        "format": "monai-bundle",
        "kind": kind,
        "spatial_dims": dims,
        "networks": {"unet": unet},
    }
    if kind == "ldm":
        factor = 2 ** (len(ae.get("channels", (0, 0, 0, 0))) - 1)
        lat_ch = int(ae.get("latent_channels", 3))
        meta_latent = next((v for v in inputs.values() if isinstance(v, dict) and v.get("type") == "noise"), {})
        from_meta = _int_list(meta_latent.get("spatial_shape"))
        literal = _int_list(cfg.literal("latent_shape"))
        derived = [s // factor for s in meta_shape] if meta_shape and all(s % factor == 0 for s in meta_shape) else None
        spatial = geo.pick(
            "latent shape",
            ("sidecar", latent_block.get("shape")),
            ("bundle", literal[-dims:] if literal and len(literal) == dims + 1 else None),
            ("bundle", from_meta if from_meta and len(from_meta) == dims else None),
            ("bundle", derived),
            ("default", defaults.get("latent_shape", [None])[1:] or None),
        )
        if spatial is None:
            raise MeddiffError(f"{where}: the latent shape is not stated; give \"latent\": {{\"shape\": [...]}} "
                               f"in {folder / SIDECAR_NAME}")
        image_shape = sidecar.get("image_shape") or [int(s) * factor for s in spatial]
        if meta_shape and meta_shape != image_shape:
            geo.notes.append(f"metadata.json gives {_show(meta_shape)} (a training patch); the model generates "
                             f"{_show(image_shape)} (latent {_show(list(spatial))} x {factor})")
        config["networks"]["autoencoder"] = ae
        config["latent"] = {"channels": lat_ch, "shape": [int(s) for s in spatial],
                            "scale_factor": float(latent_block.get("scale_factor", 1.0))}
        sample_channels = lat_ch
    else:
        image_size = _int_list(cfg.literal("image_size"))
        image_shape = geo.pick(
            "image shape",
            ("sidecar", sidecar.get("image_shape")),
            ("bundle", meta_shape),
            ("bundle", image_size[-dims:] if image_size and len(image_size) >= dims else None),
            ("default", defaults.get("image_shape")),
        )
        if image_shape is None:
            raise MeddiffError(f"{where}: the image shape is not stated; give \"image_shape\" in {folder / SIDECAR_NAME}")
        sample_channels = int(unet.get("out_channels", 1))
    config["image_shape"] = [int(s) for s in image_shape]
    config["voxel_size"] = [float(v) for v in geo.pick(
        "voxel size (mm)",
        ("sidecar", sidecar.get("voxel_size")),
        ("bundle", _voxel_from_text(metadata.get("image_classes"), dims)),
        ("default", defaults.get("voxel_size")),
        ("guess", [1.0] * dims),
    )]
    orientation = geo.pick("orientation", ("sidecar", sidecar.get("orientation")),
                           ("default", defaults.get("orientation")), ("guess", "RAS"))
    if orientation != "RAS":
        raise MeddiffError(f"{folder / SIDECAR_NAME}: only RAS orientation is supported, not {orientation!r}")
    sched_cls, sched_kwargs = (sched_found[1], sched_found[2]) if sched_found else (None, {})
    config["scheduler"] = _schedule(sched_cls, sched_kwargs)
    config["defaults"] = {**DEFAULT_SAMPLING, **(sidecar.get("defaults") or {})}
    config["bundle_sampling"] = _bundle_sampling(cfg, sched_cls, config["scheduler"])
    conditioning = _condition_block(cfg, metadata, unet, sample_channels, defaults, sidecar, where)
    if conditioning is not None:
        config["conditioning"] = conditioning
    md5 = read_large_files(folder, defaults)
    config["weights"] = {role: {"file": f, **({"md5": md5[f]} if f in md5 else {})}
                         for role, f in _weight_files(folder, kind, defaults, sidecar, list(md5)).items()}
    config["geometry"] = {"orientation": "RAS", "notes": geo.notes}
    config["bundle"] = {k: metadata.get(k) for k in ("version", "name", "task", "description", "authors") if k in metadata}
    config["intensity"] = {"range": [0.0, 1.0]}
    return validate_config(config, where)


# --- weights ------------------------------------------------------------------------------------------------


def file_digests(path: Path) -> tuple[str, str]:
    md5, sha = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            md5.update(chunk)
            sha.update(chunk)
    return md5.hexdigest(), sha.hexdigest()


def check_weight_file(path: Path, md5: str | None, folder: Path) -> str:
    """The file's sha256, after checking it exists and matches its md5 (when the bundle gives one)."""
    if not path.is_file():
        expected = f" (md5 {md5})" if md5 else ""
        raise MeddiffError(f"missing weight file {path}{expected}: run `meddiff fetch {folder.name} --dir "
                           f"{folder.parent}` with internet, or put the file there")
    got_md5, sha = file_digests(path)
    if md5 and got_md5 != md5.lower():
        raise MeddiffError(f"{path} is corrupt or not the bundle's file: md5 {got_md5} != {md5} in large_files.yml; "
                           "refusing to load it")
    return sha


def read_state_dict(path: Path, role: str) -> dict[str, torch.Tensor]:
    """Tensors only (``weights_only=True``), the state dict found inside a nested checkpoint if need be."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()
        raise MeddiffError(
            f"refusing {path}: it holds pickled Python objects, not only tensors, and meddiff never unpickles "
            f"them (torch.load weights_only=True: {first[-1][:160] if first else exc})"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise MeddiffError(f"cannot read {path} as PyTorch weights: {str(exc)[:200]}") from None
    state = _find_state_dict(obj, role)
    if state is None:
        raise MeddiffError(f"{path}: no state dict of tensors found (top-level keys: {list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__})")
    if state and all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items())


def _find_state_dict(obj: Any, role: str, depth: int = 0) -> dict | None:
    if _is_state_dict(obj):
        return obj
    if not isinstance(obj, dict) or depth > 2:
        return None
    for key in NESTED_KEYS[role]:
        if key in obj:
            found = _find_state_dict(obj[key], role, depth + 1)
            if found is not None:
                return found
    candidates = [v for v in obj.values() if _is_state_dict(v)]
    return candidates[0] if len(candidates) == 1 else None


def load_weights(net: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Current MONAI key names load directly; MONAI Generative's go through MONAI's ``load_old_state_dict``."""
    expected = net.state_dict()
    try:
        if set(state) == set(expected):
            net.load_state_dict(state)
            return
        remaining = dict(state)
        with contextlib.redirect_stdout(io.StringIO()):  # MONAI prints its progress
            net.load_old_state_dict(remaining)
    except (RuntimeError, KeyError) as exc:
        raise MeddiffError(f"{path} does not fit the network its bundle config describes: {str(exc)[:200]}") from None
    unused = [k for k in remaining if "proj_attn" not in k]  # proj_attn is dropped where include_fc is false
    consumed = len(state) - len(remaining)
    if unused or consumed < len(expected):
        raise MeddiffError(f"{path} does not fit the network its bundle config describes: "
                           f"{len(expected) - consumed} parameters not in the file, unused keys {unused[:3]}")
