"""MONAI Model Zoo's ``maisi_ct_generative`` (MAISI: CT from a label map) read as a latent ControlNet model.

Both layouts are read from their files, as data: 0.4.x (a DDPM of 1000 steps whose UNet takes the voxel
spacing and the top/bottom body region) and 1.0.0 (rectified flow, 30 steps: MONAI's ``RFlowScheduler``, which
the bundle ships a copy of as ``scripts/rectified_flow.py``; the UNet takes the spacing and a modality class).
Of the config's networks the image ones are taken by class: ``DiffusionModelUNetMaisi``, the
``AutoencoderKlMaisi`` that maps one channel to one (the other is the mask generator's) and ``ControlNetMaisi``;
the mask generator, its candidate-mask database and the example data are not needed. Weight files are named by
the text of the ``trained_*_path`` expressions (read, never run); the latent ``scale_factor`` is the one the
diffusion checkpoint holds beside ``unet_state_dict`` (set when the weights load). The label vocabulary is
``configs/label_dict.json`` (name -> value), named also from ``label_dict_124_to_132.json`` where it ships, plus
200 "body" (MAISI's label for body without an organ), added when the dictionary lacks it. The ControlNet takes a
map as its values' 8 bits (``binarize_labels``); the UNet the grid's spacing, and the body regions and modality
as `network_inputs` describes them (values from ``scripts/utils.py`` and ``scripts/sample.py``, not imported).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from napari_meddiff.errors import MeddiffError
from napari_meddiff.models.boundary import shorten
from napari_meddiff.models.bundle_config import BundleConfig, bundle_file, load_data_file
from napari_meddiff.models.bundle_schedules import bundle_schedule
from napari_meddiff.models.schema import validate_config

BODY_LABEL = 200  # MAISI's masks: body voxels that no organ label takes
SPACING_SCALE = 100.0  # MAISI multiplies spacing and region indices by 1e2 (sample.py, training transforms)
#: get_body_region_index_from_mask (scripts/utils.py): label values of head/neck, thorax, abdomen, pelvis/lower
BODY_REGIONS = [[22, 120], [28, 29, 30, 31, 32], [1, 2, 3, 4, 5, 14], [93, 94]]
REGION_NAMES = {"head": 0, "chest": 1, "thorax": 1, "chest/thorax": 1, "abdomen": 2, "pelvis": 3, "lower": 3}
#: the voxel sizes MAISI's check_input (scripts/sample.py) accepts: 0.5..3 mm in plane, 0.5..5 mm along S
SPACING_RANGE = [[0.5, 3.0], [0.5, 3.0], [0.5, 5.0]]
CT_MODALITY = 1  # MAISI 1.0.0 trained on CT only, class 1 ("modality": 1 in its inference configs)
LABEL_DICT = "configs/label_dict.json"
LABEL_REMAP = "configs/label_dict_124_to_132.json"
WEIGHT_KEYS = {
    "unet": "trained_diffusion_path",
    "autoencoder": "trained_autoencoder_path",
    "controlnet": "trained_controlnet_path",
}


def is_maisi(components: dict[str, list[tuple[str, str, dict]]]) -> bool:
    return any(cls == "DiffusionModelUNetMaisi" for _, cls, _ in components.get("unet", []))


def _pick(components: dict, role: str, cls: str, where: str, fits=lambda kwargs: True) -> tuple[str, dict]:
    """The one ``cls`` component of ``role`` that ``fits``: (config id, keyword arguments)."""
    found = [(ref, kwargs) for ref, c, kwargs in components.get(role, []) if c == cls and fits(kwargs)]
    if len(found) != 1:
        names = ", ".join(ref for ref, _ in found) or "none"
        raise MeddiffError(f"{where}: meddiff reads a MAISI bundle with one image {cls} ({names} found)")
    return found[0]


def _networks(components: dict, where: str, controlnet: bool = True) -> dict[str, dict]:
    """The image UNet, autoencoder (1 channel to 1: not the mask generator's) and ControlNet, as configs."""
    _, unet = _pick(components, "unet", "DiffusionModelUNetMaisi", where)
    _, ae = _pick(
        components,
        "autoencoder",
        "AutoencoderKlMaisi",
        where,
        lambda kw: kw.get("in_channels") == kw.get("out_channels"),
    )
    nets = {
        "unet": {**unet, "monai_class": "DiffusionModelUNetMaisi"},
        "autoencoder": {**ae, "monai_class": "AutoencoderKlMaisi"},
    }
    if controlnet:
        nets["controlnet"] = {
            **_pick(components, "controlnet", "ControlNetMaisi", where)[1],
            "monai_class": "ControlNetMaisi",
        }
    return nets


def _scheduler(cfg: BundleConfig, components: dict) -> tuple[str, dict, bool]:
    """(class, kwargs, from scripts/) of the image scheduler (``noise_scheduler``, not the mask generator's)."""
    found = [(ref, cls, kw) for ref, cls, kw in components.get("scheduler", []) if "mask" not in ref]
    if not found:
        raise MeddiffError(f"{cfg.path}: no noise_scheduler (a MONAI DDPMScheduler or RFlowScheduler) found")
    ref, cls, kwargs = next((f for f in found if f[0] == "noise_scheduler"), found[0])
    target = str(cfg.get_raw(ref).get("_target_", ""))
    return cls, kwargs, target.startswith("scripts.")


def _weight_files(folder: Path, cfg: BundleConfig, sidecar: dict, roles: list[str]) -> dict[str, str]:
    """Role -> file: meddiff.json, else the file each ``trained_*_path`` expression names (its text, not run)."""
    files = dict(sidecar.get("weights") or {})
    for role, key in WEIGHT_KEYS.items():
        if role not in roles:
            continue
        text = str(cfg.data.get(key, ""))
        match = re.search(r"@(model_dir|bundle_root)\s*\+\s*['\"]/?([^'\"]+\.pt)['\"]", text)
        if role not in files and match:
            files[role] = ("models/" if match.group(1) == "model_dir" else "") + match.group(2)
        elif role not in files and text.endswith(".pt") and not text.startswith(("$", "@", "%")):
            files[role] = text.removeprefix("./")  # a plain path (NV-Generate-CTMR's environment files)
    missing = [role for role in roles if role not in files]
    if missing:
        raise MeddiffError(
            f"{folder}: cannot tell which file holds the {' and '.join(missing)} weights; name them in "
            f'meddiff.json ("weights": {{"{missing[0]}": "models/..."}})'
        )
    return {role: str(files[role]) for role in roles}


def _named_values(folder: Path, rel: str, pick) -> dict[int, str]:
    """``{value: name}`` from a ``{name: ...}`` JSON file of the bundle (``pick``: the value of an entry)."""
    data = load_data_file(bundle_file(folder, rel))
    if not isinstance(data, dict):
        raise MeddiffError(f"{folder / rel}: must map label names to values")
    named = {}
    for name, entry in data.items():
        value = pick(entry)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 256:
            raise MeddiffError(f"{folder / rel}: {shorten(repr(name))} has no label value in 1..255")
        named.setdefault(value, str(name))
    return named


def label_vocabulary(folder: Path, notes: list[str]) -> dict[str, str]:
    """Label value -> name: label_dict.json, names only the 124->132 remap gives, 200 "body" when absent."""
    if not (folder / LABEL_DICT).is_file():
        raise MeddiffError(
            f"{folder / LABEL_DICT} is missing: a MAISI bundle's label names (in its large_files.yml); "
            f"run `meddiff fetch {folder.name} --dir {folder.parent}` or put the file there"
        )
    names = _named_values(folder, LABEL_DICT, lambda value: value)
    if (folder / LABEL_REMAP).is_file():  # {name: [mask-generator channel, label value]}
        remapped = _named_values(folder, LABEL_REMAP, lambda pair: pair[1] if isinstance(pair, list) else None)
        names.update({v: n for v, n in remapped.items() if v not in names})
    if BODY_LABEL not in names:
        names[BODY_LABEL] = "body"
        notes.append(
            f"label {BODY_LABEL} 'body' (body without an organ label, as in MAISI's masks) is not in label_dict.json: "
            "added; a map without it gets it derived from its other labels"
        )
    return {"0": "background", **{str(v): names[v] for v in sorted(names)}}


def _network_inputs(cfg: BundleConfig, unet: dict) -> dict[str, Any]:
    """The ``network_inputs`` block of the UNet's extra inputs (spacing, body regions, modality)."""
    block: dict[str, Any] = {"spacing": bool(unet.get("include_spacing_input")), "scale": SPACING_SCALE}
    if block["spacing"]:
        block["spacing_range"] = SPACING_RANGE
    if unet.get("include_top_region_index_input") or unet.get("include_bottom_region_index_input"):
        given = cfg.literal("body_region")
        regions = [REGION_NAMES[r] for r in given if r in REGION_NAMES] if isinstance(given, list) else []
        default = [min(regions), max(regions)] if regions else [REGION_NAMES["abdomen"]] * 2
        block["body_regions"] = {"labels": BODY_REGIONS, "default": default}
    if unet.get("num_class_embeds"):
        modality = cfg.literal("modality")
        valid = isinstance(modality, int) and not isinstance(modality, bool)
        block["class_label"] = modality if valid else CT_MODALITY
    return block


def _sampling(cfg: BundleConfig, schedule: dict, sidecar: dict) -> tuple[dict, dict]:
    """(defaults, the bundle's own sampling): rflow with its steps; a DDPM keeps the package's dpm++ default."""
    from napari_meddiff.models.model import DEFAULT_SAMPLING

    steps = cfg.literal("num_inference_steps")
    steps = steps if isinstance(steps, int) and not isinstance(steps, bool) and steps > 0 else None
    if schedule.get("type") == "rflow":
        own = {"sampler": "rflow", "steps": steps or 30}
        return {**DEFAULT_SAMPLING, **own, **(sidecar.get("defaults") or {})}, own
    own = {"sampler": "ddpm", "steps": steps or int(schedule["num_train_timesteps"])}
    return {**DEFAULT_SAMPLING, **(sidecar.get("defaults") or {})}, own


def _geometry(
    cfg: BundleConfig, ae: dict, sidecar: dict, notes: list[str], from_maps: bool = True
) -> tuple[list[int], list[float], dict]:
    """(image shape, voxel size, latent block) from ``output_size``, ``spacing`` and the autoencoder."""
    factor = 2 ** (len(ae.get("num_channels", [0, 0, 0])) - 1)
    shape = sidecar.get("image_shape") or cfg.literal("output_size")
    voxel = sidecar.get("voxel_size") or cfg.literal("spacing")
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(s, int) for s in shape)):
        raise MeddiffError(f'{cfg.path}: no output_size literal; give "image_shape" in meddiff.json')
    if not (isinstance(voxel, list) and len(voxel) == 3):
        raise MeddiffError(f'{cfg.path}: no spacing literal; give "voxel_size" in meddiff.json')
    scale = (sidecar.get("latent") or {}).get("scale_factor")
    latent = {
        "channels": int(ae.get("latent_channels", 4)),
        "shape": [int(s) // factor for s in shape],
        "scale_factor": float(scale or 1.0),
    }
    if scale is None:
        latent["scale_factor_source"] = "checkpoint"
        notes.append("latent scale_factor: read from the diffusion checkpoint when the weights load")
    size = f"{'x'.join(map(str, shape))} at {voxel} mm"
    notes.append(
        f"generates at any voxel size and shape (its UNet takes the spacing); from a label map, on a grid "
        f"covering the map at the map's spacing; {size} otherwise"
        if from_maps
        else f"generates {size} (its UNet takes the spacing)"
    )
    return [int(s) for s in shape], [float(v) for v in voxel], latent


def translate_maisi(folder: Path, cfg: BundleConfig, components: dict, sources: dict) -> dict[str, Any]:
    """The MAISI bundle as a validated config of this package's schema (``sources``: metadata.json as
    ``metadata``, meddiff.json as ``sidecar``, large_files.yml's md5s as ``md5``). Without a ControlNet in the
    config (NV-Generate-CTMR's MR models) it generates without a map: see `_unconditional_mr`."""
    sidecar, notes = sources["sidecar"], []
    from_maps = any(c == "ControlNetMaisi" for _, c, _ in components.get("controlnet", []))
    networks = _networks(components, str(cfg.path), controlnet=from_maps)
    image_shape, voxel, latent = _geometry(cfg, networks["autoencoder"], sidecar, notes, from_maps)
    sched_cls, sched_kwargs, from_scripts = _scheduler(cfg, components)
    schedule = bundle_schedule(sched_cls, sched_kwargs, from_scripts)
    defaults, own = _sampling(cfg, schedule, sidecar)
    weights = _weight_files(folder, cfg, sidecar, list(networks))
    config = {
        "name": str(sidecar.get("name", folder.name)),
        "format": "monai-bundle",
        "kind": "ldm",
        "spatial_dims": 3,
        "networks": networks,
        "latent": latent,
        "image_shape": image_shape,
        "voxel_size": voxel,
        "scheduler": schedule,
        "defaults": defaults,
        "bundle_sampling": own,
        "network_inputs": _network_inputs(cfg, networks["unet"]),
        "weights": {
            r: {"file": f, **({"md5": sources["md5"][f]} if f in sources["md5"] else {})} for r, f in weights.items()
        },
        "geometry": {"orientation": "RAS", "notes": notes},
        "bundle": {
            k: sources["metadata"].get(k)
            for k in ("version", "name", "task", "description")
            if k in sources["metadata"]
        },
        # MAISI's [0, 1] is CT's -1000..1000 HU, and where the map is background its pipeline writes air
        "intensity": {"range": [0.0, 1.0], "output_range": [-1000.0, 1000.0], "background_value": -1000.0},
    }
    if from_maps:
        config["label_map"] = {
            "labels": label_vocabulary(folder, notes),
            "encoding": "binary",
            "body_label": BODY_LABEL,
        }
    else:
        _unconditional_mr(config, cfg)
    return validate_config(config, str(cfg.path))


MR_MODALITY_MIN = 8  # NV-Generate-CTMR: modality classes 1-7 are CT, 8 and above MR (diff_model_infer.py)


def _unconditional_mr(config: dict[str, Any], cfg: BundleConfig) -> None:
    """A MAISI UNet without a ControlNet (NV-Generate-CTMR's ``rflow-mr``, ``rflow-mr-brain``): generated from noise
    with its modality as a class-label condition, class 0 the unconditional one of classifier-free guidance at
    the config's ``cfg_guidance_scale`` (their ``s * (cond - uncond) + uncond``; 0 there means none: 1 here).
    MR intensities: [0, 1] is 0..1000, clipped below 0 only (their diff_model_infer.py), CT's -1000..1000 HU."""
    inputs = config["network_inputs"]
    modality = int(inputs.pop("class_label", CT_MODALITY))
    config["intensity"] = {"range": [0.0, 1.0]}
    if modality >= MR_MODALITY_MIN:  # their MR is clipped below 0 only; CT to -1000..1000 HU
        config["intensity"].update(output_range=[0.0, 1000.0], output_clip=[0.0, None])
    else:
        config["intensity"]["output_range"] = [-1000.0, 1000.0]
    if not config["networks"]["unet"].get("num_class_embeds"):
        return  # a UNet without class embeddings takes no modality
    config["conditioning"] = {
        "class_labels": True,
        "null": [0.0],
        "conditions": [
            {
                "name": "modality",
                "low": 0.0,
                "high": float(config["networks"]["unet"].get("num_class_embeds") or 128) - 1,
                "default": float(modality),
                "description": "the modality class the UNet was trained with (NV-Generate-CTMR: 1-7 CT, 8+ MR)",
            }
        ],
    }
    scale = cfg.literal("cfg_guidance_scale")
    if isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale > 0:
        config["defaults"].setdefault("guidance_scale", float(scale))  # meddiff.json's defaults come first
