"""Validation of a model config (``model.json``, or the one a bundle is translated into).

Every structural problem becomes ``MeddiffError("<file>: <what is wrong>")``, so a malformed file gives one
clear line in every command and widget instead of a ``TypeError`` deep inside a task.
"""

from __future__ import annotations

import math
from typing import Any

from napari_meddiff.choices import COMBINE_METHODS, SCHEDULE_TYPES, schedule_type
from napari_meddiff.errors import MeddiffError
from napari_meddiff.io.intensity import INTENSITY_KEYS, is_upper_value
from napari_meddiff.models.boundary import shorten
from napari_meddiff.models.conditions import parse_conditions
from napari_meddiff.models.model import network_roles
from napari_meddiff.models.network_inputs import NETWORK_INPUT_KEYS

MODEL_KINDS = ("ddpm", "ldm", "segmentation")
REQUIRED_KEYS = ("spatial_dims", "image_shape", "voxel_size", "networks", "scheduler", "weights")
# plausible geometry: a voxel size outside it is a unit mistake or an attack (1e308 mm writes an affine of inf)
VOXEL_MM = (1e-3, 1e3)
MAX_SIDE = 4096  # voxels along one axis of an image or latent
MAX_VOXELS = 1024**3  # in one image: 4 GiB as float32
MAX_TRAIN_TIMESTEPS = 100_000  # the schedule's tables are built whole (10^12 steps: 4 TB)
NOISE_SCHEDULES = ("linear_beta", "scaled_linear_beta", "sigmoid_beta", "cosine")  # MONAI's NoiseSchedules
MONAI_BETAS = (1e-4, 2e-2)  # MONAI's beta_start and beta_end where a config gives none


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))


def _sides(value: Any, key: str, dims: int, where: str) -> None:
    """An image or latent shape: ``dims`` integers in 1..`MAX_SIDE`, at most `MAX_VOXELS` in all."""
    if not (isinstance(value, list) and len(value) == dims and all(_is_int(v) and 1 <= v <= MAX_SIDE for v in value)):
        raise MeddiffError(
            f"{where}: {key} must be a list of {dims} positive integers, at most {MAX_SIDE} each, "
            f"not {shorten(repr(value))}"
        )
    if math.prod(value) > MAX_VOXELS:
        raise MeddiffError(
            f"{where}: {key} {'x'.join(map(str, value))} is {math.prod(value):,} voxels, more than {MAX_VOXELS:,}"
        )


def _voxel_size(value: Any, dims: int, where: str) -> None:
    low, high = VOXEL_MM
    if not (isinstance(value, list) and len(value) == dims and all(_is_number(v) and low <= v <= high for v in value)):
        raise MeddiffError(
            f"{where}: voxel_size must be a list of {dims} numbers in {low:g}..{high:g} (mm), "
            f"not {shorten(repr(value))}"
        )


def _object(value: Any, key: str, where: str) -> dict:
    if not isinstance(value, dict):
        raise MeddiffError(f"{where}: {key} must be an object, not {type(value).__name__} ({str(value)[:40]!r})")
    return value


def validate_config(config: Any, where: str) -> dict:
    """Check the structure and types of a model config; return it unchanged."""
    if not isinstance(config, dict):
        raise MeddiffError(f"{where}: the file must hold a JSON object, not {type(config).__name__}")
    kind = config.get("kind")
    if kind not in MODEL_KINDS:
        raise MeddiffError(f"{where}: model kind must be one of {MODEL_KINDS}, not {kind!r}")
    for key in REQUIRED_KEYS:
        if key not in config:
            raise MeddiffError(f"{where} lacks {key!r}")
    dims = config["spatial_dims"]
    if dims not in (2, 3) or not _is_int(dims):
        raise MeddiffError(f"{where}: spatial_dims must be 2 or 3, not {dims!r}")
    _sides(config["image_shape"], "image_shape", dims, where)
    _voxel_size(config["voxel_size"], dims, where)
    networks = _object(config["networks"], "networks", where)
    needed = network_roles(config)
    for name in needed:
        if name not in networks:
            raise MeddiffError(f"{where}: networks lacks {name!r}")
        _object(networks[name], f"networks.{name}", where)
    weights = _object(config["weights"], "weights", where)
    for name in needed:
        entry = weights.get(name)
        if entry is None:
            raise MeddiffError(f"{where} has no weights entry for {name!r}")
        _object(entry, f"weights.{name}", where)
        if not isinstance(entry.get("file"), str) or not entry["file"]:
            raise MeddiffError(f"{where}: weights.{name} lacks 'file' (the weight file's name)")
        if "sha256" in entry and not isinstance(entry["sha256"], str):
            raise MeddiffError(f"{where}: weights.{name}.sha256 must be a string")
    if kind == "ldm":
        latent = _object(config.get("latent"), "latent", where)
        channels, shape = latent.get("channels"), latent.get("shape")
        if not _is_int(channels) or channels < 1:
            raise MeddiffError(f"{where}: latent.channels must be a positive integer, not {channels!r}")
        _sides(shape, "latent.shape", dims, where)
        if not _is_number(latent.get("scale_factor", 1.0)) or float(latent.get("scale_factor", 1.0)) <= 0:
            raise MeddiffError(f"{where}: latent.scale_factor must be a positive number")
    _check_fields(_object(config["scheduler"], "scheduler", where), SCHEDULER_FIELDS, "scheduler", where)
    _check_schedule_keys(config["scheduler"], where)
    if "controlnet" in networks:
        _check_controlnet(config, where)
    for block, fields in OPTIONAL_BLOCKS.items():
        if block in config:
            _check_fields(_object(config[block], block, where), fields, block, where)
            known = CLOSED_BLOCKS.get(block)
            unknown = sorted(set(config[block]) - known) if known is not None else []
            if unknown:
                raise MeddiffError(
                    f"{where}: {block}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})"
                )
    if "label_map" in config:
        _check_label_map(config["label_map"], where)
    if "label_output" in config:
        _check_label_output(config, where)
    if "name" in config and not isinstance(config["name"], str):
        raise MeddiffError(f"{where}: name must be a string, not {config['name']!r}")
    conditioning, specs = parse_conditions(config.get("conditioning"), where)
    if conditioning.class_labels:
        _check_class_labels(config["networks"].get("unet", {}), conditioning, specs, where)
    return config


def _check_label_map(block: dict, where: str) -> None:
    """Labels named by value: one-hot maps name every value 0..K-1; binary-coded maps (8 bits) any of 0..255."""
    if "labels" not in block:
        raise MeddiffError(f"{where}: label_map lacks 'labels' (the name of each label value)")
    labels = block["labels"]
    if block.get("encoding", "one_hot") == "one_hot":
        if sorted(labels) != sorted(str(i) for i in range(len(labels))):
            raise MeddiffError(
                f'{where}: label_map.labels must be an object naming every label value 0..K-1 ({{"0": "background", '
                '"1": ...}})'
            )
    elif not all(k.isdigit() and int(k) < 2**BINARY_LABEL_BITS for k in labels) or "0" not in labels:
        raise MeddiffError(f"{where}: label_map.labels of a binary-coded map must be 0 and values up to 255")
    body = block.get("body_label")
    if body is not None and (not _is_int(body) or str(body) not in labels):
        raise MeddiffError(f"{where}: label_map.body_label must be one of its label values, not {shorten(repr(body))}")


def _check_label_output(config: dict, where: str) -> None:
    """A map generator names every label value 0..K-1, one UNet output channel each, and takes no label map."""
    block = config["label_output"]
    labels = block.get("labels")
    if not isinstance(labels, dict) or sorted(labels) != sorted(str(i) for i in range(len(labels))):
        raise MeddiffError(
            f'{where}: label_output.labels must be an object naming every label value 0..K-1 ({{"0": "background", '
            '"1": ...}})'
        )
    if "label_map" in config or config.get("kind") != "ddpm":
        raise MeddiffError(f"{where}: label_output is for ddpm models that generate label maps (and take none)")
    unet = config["networks"].get("unet", {})
    if unet.get("out_channels") != len(labels):
        raise MeddiffError(
            f"{where}: label_output names {len(labels)} labels but networks.unet.out_channels is "
            f"{shorten(repr(unet.get('out_channels')))} (one channel per label)"
        )


def _check_class_labels(unet: dict, conditioning: Any, specs: list, where: str) -> None:
    """The class-label condition (the first) and its null value must index the UNet's class embedding."""
    n = unet.get("num_class_embeds") if isinstance(unet, dict) else None
    if not _is_int(n) or n < 1:
        raise MeddiffError(
            f"{where}: class_labels conditioning needs networks.unet.num_class_embeds (a positive integer), not {n!r}"
        )
    first = specs[0]
    values = [first.low, first.high] + ([conditioning.null[0]] if conditioning.null else [])
    if any(v < 0 or v > n - 1 for v in values):
        raise MeddiffError(
            f"{where}: class label {first.name} must lie in 0..{n - 1} (num_class_embeds {n}), "
            f"range [{first.low:g}, {first.high:g}]" + (f", null {conditioning.null[0]:g}" if conditioning.null else "")
        )


def _positive_int(v: Any) -> bool:
    return _is_int(v) and v > 0


def _check_fields(block: dict, fields: dict, name: str, where: str) -> None:
    for key, (check, what) in fields.items():
        if key in block and not check(block[key]):
            raise MeddiffError(f"{where}: {name}.{key} must be {what}, not {shorten(repr(block[key]))}")


def _check_schedule_keys(scheduler: dict, where: str) -> None:
    """A noise schedule's keys, or a rectified flow's (MONAI's RFlowScheduler arguments), never the other's."""
    kind = schedule_type(scheduler)
    foreign = sorted(set(scheduler) & (RFLOW_ONLY_KEYS if kind == "ddpm" else DDPM_ONLY_KEYS))
    if foreign:
        what = "a rectified flow (type rflow)" if kind == "rflow" else "a DDPM noise schedule (no type rflow)"
        verb = "does" if len(foreign) == 1 else "do"
        raise MeddiffError(f"{where}: scheduler: {', '.join(foreign)} {verb} not apply to {what}")
    if kind == "ddpm":
        _check_betas(scheduler, where)
        if scheduler.get("zero_terminal_snr") and scheduler.get("prediction_type", "epsilon") == "epsilon":
            raise MeddiffError(
                f"{where}: scheduler: zero_terminal_snr needs prediction_type v_prediction or sample (at the last "
                "timestep the input is pure noise: an epsilon prediction says nothing of the image)"
            )


def _check_controlnet(config: dict, where: str) -> None:
    """A ControlNet must give the residuals the UNet takes, from a conditioning image at image resolution."""
    unet, net = config["networks"]["unet"], _object(config["networks"]["controlnet"], "networks.controlnet", where)

    def levels(block: dict) -> list:
        res, channels = block.get("num_res_blocks", 2), block.get("channels") or block.get("num_channels")
        return [channels, res if isinstance(res, list) else [res] * len(channels or [])]

    for key in ("spatial_dims", "in_channels", "space_to_depth"):
        if net.get(key) != unet.get(key):
            raise MeddiffError(
                f"{where}: networks.controlnet.{key} ({net.get(key)}) must be the UNet's ({unet.get(key)})"
            )
    if levels(net) != levels(unet):
        raise MeddiffError(f"{where}: networks.controlnet's channels and num_res_blocks must be the UNet's")
    embedding = net.get("conditioning_embedding_num_channels", [16, 32, 96, 256])
    factor = 2 ** (len(embedding) - 1) if isinstance(embedding, list) and embedding else None
    grid = int(unet.get("space_to_depth") or 1)
    if config["kind"] == "ldm":
        grid = config["image_shape"][0] // config["latent"]["shape"][0]
    if factor != grid:
        raise MeddiffError(
            f"{where}: networks.controlnet.conditioning_embedding_num_channels must have log2({grid}) + 1 entries: "
            f"its conditioning image is at image resolution, {grid}x the UNet's grid"
        )


def _check_betas(scheduler: dict, where: str) -> None:
    """The betas a schedule is built from: rising (MONAI's defaults stand in for one not given); none for cosine."""
    given = [k for k in ("beta_start", "beta_end") if k in scheduler]
    if scheduler.get("schedule") == "cosine":
        if given:
            raise MeddiffError(f"{where}: scheduler: the cosine schedule takes no beta_start or beta_end")
        return
    start, end = scheduler.get("beta_start", MONAI_BETAS[0]), scheduler.get("beta_end", MONAI_BETAS[1])
    if given and start >= end:
        shown = [
            f"{v:g}" + ("" if k in scheduler else ", MONAI's default")
            for k, v in (("beta_start", start), ("beta_end", end))
        ]
        raise MeddiffError(f"{where}: scheduler.beta_start ({shown[0]}) must be below beta_end ({shown[1]})")


def _beta(v: Any) -> bool:
    return _is_number(v) and 0 < v < 1


RFLOW_FIELDS = {  # MONAI RFlowScheduler's arguments, its timestep transform's included
    "use_discrete_timesteps": (lambda v: isinstance(v, bool), "true or false"),
    "sample_method": (lambda v: v in ("uniform", "logit-normal"), "uniform or logit-normal"),
    "loc": (_is_number, "a number"),
    "scale": (lambda v: _is_number(v) and v > 0, "a positive number"),
    "use_timestep_transform": (lambda v: isinstance(v, bool), "true or false"),
    "transform_scale": (lambda v: _is_number(v) and v > 0, "a positive number"),
    "steps_offset": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "base_img_size_numel": (_positive_int, "a positive integer (voxels)"),
    "spatial_dim": (lambda v: v in (2, 3) and _is_int(v), "2 or 3"),
}
RFLOW_ONLY_KEYS = set(RFLOW_FIELDS)
DDPM_ONLY_KEYS = {"schedule", "beta_start", "beta_end", "prediction_type", "clip_sample", "zero_terminal_snr"}
SCHEDULER_FIELDS = {
    "type": (lambda v: v in SCHEDULE_TYPES, " or ".join(SCHEDULE_TYPES)),
    "num_train_timesteps": (
        lambda v: _is_int(v) and 1 <= v <= MAX_TRAIN_TIMESTEPS,
        f"a positive integer, at most {MAX_TRAIN_TIMESTEPS:,}",
    ),
    "schedule": (lambda v: v in NOISE_SCHEDULES, "one of " + ", ".join(NOISE_SCHEDULES)),
    "beta_start": (_beta, "a number in (0, 1)"),
    "beta_end": (_beta, "a number in (0, 1)"),
    "prediction_type": (lambda v: v in ("epsilon", "v_prediction", "sample"), "epsilon, v_prediction or sample"),
    "clip_sample": (lambda v: isinstance(v, bool), "true or false"),
    "zero_terminal_snr": (lambda v: isinstance(v, bool), "true or false"),
    **RFLOW_FIELDS,
}
# blocks whose unknown keys are refused, and the keys they take: a misspelt key would silently fall back to a
# default (the intensity keys the training configs take, and bundles' informative "range")
BINARY_LABEL_BITS = 8  # MAISI's binarize_labels: a label value as 8 bit channels
CLOSED_BLOCKS = {
    "intensity": INTENSITY_KEYS | {"range", "output_range", "output_clip", "background_value"},
    "label_map": {"labels", "encoding", "body_label", "generator"},
    "label_output": {"labels"},
    "network_inputs": NETWORK_INPUT_KEYS,
}
OPTIONAL_BLOCKS = {
    "defaults": {
        "sampler": (lambda v: isinstance(v, str), "a sampler name"),
        "steps": (_positive_int, "a positive integer"),
        "precision": (lambda v: isinstance(v, str), "a precision name"),
        "combine": (lambda v: v in COMBINE_METHODS, " or ".join(COMBINE_METHODS) + " (segmentation ensembles)"),
        "guidance_scale": (
            lambda v: _is_number(v) and 0 <= v <= 100,
            "a number from 0 to 100 (classifier-free guidance; 1: none)",
        ),
    },
    "intensity": {
        "method": (lambda v: isinstance(v, str), "a string"),
        "lower": (_is_number, "a number (percentile)"),
        "upper": (_is_number, "a number (percentile)"),
        "upper_value": (is_upper_value, "a number in (0, 1] (what the upper percentile maps to)"),
        "foreground_only": (lambda v: isinstance(v, bool), "true or false"),
        "range": (
            lambda v: isinstance(v, list) and len(v) == 2 and all(_is_number(x) for x in v),
            "[low, high] (the model's intensity range; informative)",
        ),
        "output_range": (
            lambda v: isinstance(v, list) and len(v) == 2 and all(_is_number(x) for x in v) and v[0] < v[1],
            "[low, high]: the scanner units of the model's output 0 and 1 (MAISI: [-1000, 1000] HU)",
        ),
        "output_clip": (
            lambda v: (
                isinstance(v, list)
                and len(v) == 2
                and all(x is None or _is_number(x) for x in v)
                and (None in v or v[0] < v[1])
            ),
            "[low, high] in the model's [0, 1] output (null: open; NV-Generate-CTMR's MR: [0, null])",
        ),
        "background_value": (_is_number, "a number: the value written where a label map is background"),
    },
    "segmentation": {
        "num_classes": (_positive_int, "a positive integer"),
        "class_names": (lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v), "a list of strings"),
        "context_slices": (
            lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
            "a non-negative integer (2D models: neighbouring slices on each side given as channels)",
        ),
    },
    "inpaint": {},
    "label_map": {
        "labels": (
            lambda v: isinstance(v, dict) and len(v) > 1 and all(isinstance(n, str) and n for n in v.values()),
            'an object naming every label value ({"0": "background", "1": ...})',
        ),
        "encoding": (lambda v: v in ("one_hot", "binary"), "one_hot or binary"),
        "generator": (lambda v: isinstance(v, str) and bool(v), "a model name (the map generator of a two-stage run)"),
    },
    "label_output": {
        "labels": (
            lambda v: isinstance(v, dict) and len(v) > 1 and all(isinstance(n, str) and n for n in v.values()),
            'an object naming every label value ({"0": "background", "1": ...})',
        ),
    },
    "network_inputs": {
        "spacing": (lambda v: isinstance(v, bool), "true or false"),
        "spacing_range": (
            lambda v: (
                isinstance(v, list)
                and all(isinstance(r, list) and len(r) == 2 and all(_is_number(x) for x in r) for r in v)
                and all(0 < r[0] <= r[1] for r in v)
            ),
            "[[low, high] mm, ...] per axis",
        ),
        "scale": (lambda v: _is_number(v) and v > 0, "a positive number"),
        "class_label": (lambda v: _is_int(v) and v >= 0, "a class index"),
        "body_regions": (
            lambda v: (
                isinstance(v, dict)
                and isinstance(v.get("labels"), list)
                and all(isinstance(r, list) and all(_is_int(x) for x in r) for r in v["labels"])
                and isinstance(v.get("default"), list)
                and len(v["default"]) == 2
                and all(_is_int(i) and 0 <= i < len(v["labels"]) for i in v["default"])
            ),
            '{"labels": [[label values of a region], ...], "default": [top, bottom]}',
        ),
    },
    "geometry": {"notes": (lambda v: isinstance(v, list), "a list")},
}
