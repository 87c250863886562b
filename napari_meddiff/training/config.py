"""Training configs (YAML): load, fill defaults, validate. See ``examples/train/*.yaml``."""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from napari_meddiff.errors import MeddiffError
from napari_meddiff.io.intensity import DEFAULT_INTENSITY, INTENSITY_KEYS, check_upper_value
from napari_meddiff.models import MODEL_KINDS
from napari_meddiff.training.conditions import unet_options as conditioning_unet_options
from napari_meddiff.training.conditions import validate_block as validate_conditioning

# v-prediction by default: with minutes of CPU training, epsilon-prediction models predict the noise well but
# their x0 estimates at high noise (alpha_bar_T ~ 1e-4, errors amplified ~80x) stay wrong for thousands of
# steps, so few-step samplers produced saturated noise; v-prediction learns x0 directly at high noise.
DEFAULT_SCHEDULER = {
    "num_train_timesteps": 1000,
    "schedule": "scaled_linear_beta",
    "beta_start": 0.0015,
    "beta_end": 0.0195,
    "prediction_type": "v_prediction",
    "clip_sample": False,
}

DEFAULT_DATA = {
    "dir": None,  # folder of NIfTI images
    "images": "*_T1w.nii.gz",  # glob inside dir
    "labels_replace": ["_T1w", "_dseg"],  # label file = image name with this replacement (segmentation, label_map)
    # label_map models: a lesion mask (image name with this replacement), where it exists, painted into the label
    # map as label `lesion_label`
    "lesion_replace": None,
    "lesion_label": None,
    "max_subjects": None,
    # last N subjects: validation previews / PSNR (still training-seed data); null: DEFAULT_VAL_SUBJECTS where at
    # least one subject is left to train on, else none (said in the log); a number the data cannot give is refused
    "val_subjects": None,
    "slice_axis": 2,  # 2D models: axial slices of the RAS volume
    "slice_thickness": None,  # 2D models: mm between slices (default: in-plane voxel size)
    "min_brain_fraction": 0.15,  # 2D models: keep slices with at least this fraction of foreground
    "flip": True,  # random left-right flips
}

DEFAULT_VAL_SUBJECTS = 2

LATENT_KINDS = ("sample", "mean")

DEFAULT_TRAINING = {
    "steps": 100_000,
    "max_minutes": 30.0,
    "batch_size": 8,
    "lr": 2e-4,
    "weight_decay": 0.0,
    "warmup_steps": 100,
    "grad_clip": 1.0,
    "ema_decay": 0.999,
    "ema_start": 200,
    "precision": "auto",  # auto: bf16 autocast on a bf16 CPU / fp16 on CUDA; fp32; bf16; fp16
    # ldm: what the UNet learns of each image's latent posterior: "sample" (a draw, as MONAI's
    # LatentDiffusionInferer) or "mean" (its mean: for an autoencoder whose unused latent channels have collapsed
    # to the prior, a draw is mostly noise that no UNet can learn)
    "latents": "sample",
    "checkpoint_minutes": 3.0,
    "val_every": 500,
    "val_samples": 4,
    "val_steps": 20,
    "seed": 0,
    "num_threads": None,
    "log_every": 10,
    "patch_size": None,  # random crops of this size (null: whole images; fully convolutional UNets only)
    "patch_steps": None,  # crops for the first N steps only, whole images after (null: crops throughout)
    "whole_batch_size": None,  # the batch of the whole-image steps after patch_steps (null: batch_size)
    # 3D on CPU: auto (the faster, measured at start; a resume on the same processor keeps it), contiguous or
    # channels_last_3d
    "memory_format": "auto",
    # a diffusion.pt of an earlier run to start from: its EMA weights, steps and minutes (max_minutes and
    # --max-minutes then count the earlier run's minutes too)
    "init_from": None,
}

DEFAULT_AE_TRAINING = {
    "steps": 100_000,
    "max_minutes": 25.0,
    "batch_size": 2,
    "lr": 2e-4,
    "disc_lr": 2e-4,
    "kl_weight": 1e-6,
    "adv_weight": 0.01,
    "adv_warmup_steps": 300,
    "disc_layers": 2,
    "disc_channels": 16,
    "perceptual_weight": 0.0,  # needs downloadable weights; off
    "patch_size": None,  # random crops of this size (null: whole volumes)
    "patch_steps": None,  # crops for the first N steps only, whole volumes after (null: crops throughout)
    "precision": "auto",
    # auto (the faster, measured at start; a resume on the same processor keeps it), contiguous or channels_last_3d
    "memory_format": "auto",
    # an ldm model folder whose autoencoder this run uses as it is (no autoencoder stage): e.g. a conditional
    # diffusion UNet trained on the latents of a shipped model's autoencoder
    "from_model": None,
    # train the decoder only: the encoder (and its quant convs) stays as the checkpoint's EMA has it, so the
    # latents, and a diffusion UNet trained on them, stay valid while reconstructions improve (as Stability's
    # ft-MSE VAE decoders were fine-tuned for Stable Diffusion)
    "freeze_encoder": False,
    "checkpoint_minutes": 3.0,
    "val_every": 200,
    "seed": 0,
    "num_threads": None,
    "log_every": 10,
    "grad_clip": 1.0,
    "ema_decay": 0.0,  # > 0: validate and export an EMA of the weights
    "ema_start": 0,
    "warmup_steps": 50,
}


def load_config(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise MeddiffError(f"cannot read training config {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise MeddiffError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise MeddiffError(f"{path}: a training config is a YAML mapping")
    return validate(raw, base_dir=path.parent)


MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


@dataclass(frozen=True)
class Number:
    """What a numeric setting may hold: a finite number from ``low`` to ``high`` (``low_open``: above ``low``),
    an integer where ``integer``, and null where ``nullable`` (then the code's default or "off")."""

    low: float = -math.inf
    high: float = math.inf
    integer: bool = False
    low_open: bool = False
    high_open: bool = False
    nullable: bool = False

    def describe(self) -> str:
        if self.high == math.inf:
            if self.low == 0 and self.low_open or self.integer and self.low == 1:
                return "positive"
            return f"{'>' if self.low_open else '>='} {_shown(self.low)}"
        return (
            f"in {'(' if self.low_open else '['}{_shown(self.low)}, {_shown(self.high)}{')' if self.high_open else ']'}"
        )


def _shown(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"


POSITIVE = Number(0, low_open=True)
NON_NEGATIVE = Number(0)
COUNT = Number(1, integer=True)
NON_NEGATIVE_COUNT = Number(0, integer=True)
MAX_TRAINING_SEED = 2**32 - 1  # the seeds of the batch generators are derived from it by multiplication

# every number of a training section (both stages; a key absent from a section is not checked)
TRAINING_NUMBERS = {
    "steps": COUNT,
    "batch_size": COUNT,
    "whole_batch_size": Number(1, integer=True, nullable=True),
    "lr": POSITIVE,
    "disc_lr": POSITIVE,
    "max_minutes": Number(0, low_open=True, nullable=True),  # null: no time limit
    "checkpoint_minutes": POSITIVE,
    "warmup_steps": NON_NEGATIVE_COUNT,
    "ema_start": NON_NEGATIVE_COUNT,
    "ema_decay": Number(0, 1, high_open=True),  # 1 would keep the initial weights
    "weight_decay": NON_NEGATIVE,
    "kl_weight": NON_NEGATIVE,
    "adv_weight": NON_NEGATIVE,
    "perceptual_weight": NON_NEGATIVE,
    "grad_clip": Number(0, nullable=True),  # null: no clipping
    "val_every": Number(0, integer=True, nullable=True),  # 0 or null: never
    "val_samples": NON_NEGATIVE_COUNT,
    "val_steps": NON_NEGATIVE_COUNT,
    "adv_warmup_steps": NON_NEGATIVE_COUNT,
    "disc_layers": COUNT,
    "disc_channels": COUNT,
    "seed": Number(0, MAX_TRAINING_SEED, integer=True),
    "num_threads": Number(1, integer=True, nullable=True),
    "log_every": COUNT,
}
DATA_NUMBERS = {
    "val_subjects": Number(0, integer=True, nullable=True),  # null: DEFAULT_VAL_SUBJECTS when the data allow
    "max_subjects": Number(1, integer=True, nullable=True),  # null: all
    "slice_axis": Number(0, 2, integer=True),
    "slice_thickness": Number(0, low_open=True, nullable=True),
    "min_brain_fraction": Number(0, 1),
    "foreground_threshold": Number(),
}
SCHEDULER_NUMBERS = {
    "num_train_timesteps": COUNT,
    "beta_start": Number(0, 1, low_open=True),
    "beta_end": Number(0, 1, low_open=True),
}
NETWORK_COUNTS = ("channels", "num_res_blocks", "num_head_channels", "norm_num_groups", "latent_channels")


def check_number(where: str, value: Any, spec: Number) -> Any:
    """``value`` when ``spec`` allows it, else a `MeddiffError` naming ``where`` (NaN and infinities never pass)."""
    if value is None and spec.nullable:
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise MeddiffError(f"{where} must be a number, got {value!r}")
    if spec.integer and value != int(value):
        raise MeddiffError(f"{where} must be an integer, got {value!r}")
    below = value <= spec.low if spec.low_open else value < spec.low
    above = value >= spec.high if spec.high_open else value > spec.high
    if below or above:
        raise MeddiffError(f"{where} must be {spec.describe()}, got {value!r}")
    return value


def validate(raw: dict[str, Any], base_dir: str | Path = ".") -> dict[str, Any]:
    """Fill defaults and check a training config; relative data paths are resolved against the cwd
    first, then ``base_dir`` (the config's folder). Any malformed value is a `MeddiffError`."""
    try:
        cfg = _validate(raw, base_dir)
        for section in ("training", "autoencoder_training"):
            _check_numbers(section, cfg.get(section), TRAINING_NUMBERS)
            _check_patch(section, cfg.get(section), cfg["image_shape"])
        _check_numbers("data", cfg["data"], DATA_NUMBERS)
        if not isinstance(cfg["data"]["flip"], bool):
            raise MeddiffError(f"data.flip must be true or false, got {cfg['data']['flip']!r}")
        _check_numbers("scheduler", cfg["scheduler"], SCHEDULER_NUMBERS)
        _check_numbers("defaults", cfg["defaults"], {"steps": COUNT})
        for name, net in cfg["networks"].items():
            _check_network(name, net)
        return cfg
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, OverflowError) as exc:
        raise MeddiffError(f"malformed training config: {type(exc).__name__}: {exc}") from None


def _check_numbers(section: str, values: dict[str, Any] | None, specs: dict[str, Number]) -> None:
    if values is None:
        return
    if not isinstance(values, dict):
        raise MeddiffError(f"{section} must be a mapping of settings")
    for key, spec in specs.items():
        if key in values:
            check_number(f"{section}.{key}", values[key], spec)


def _check_network(name: str, net: Any) -> None:
    """A network's sizes (a number or a list, one per level): positive integers."""
    if not isinstance(net, dict):
        raise MeddiffError(f"networks.{name} must be a mapping of settings")
    for key in NETWORK_COUNTS:
        value = net.get(key)
        if value is None:
            continue
        for v in value if isinstance(value, (list, tuple)) else [value]:
            check_number(f"networks.{name}.{key}", v, COUNT)


def _check_patch(section: str, values: dict[str, Any] | None, image_shape: list[int]) -> None:
    """``patch_size``: one positive integer per image axis, no larger than ``image_shape``."""
    patch = (values or {}).get("patch_size")
    if patch is None:
        return
    if (
        not isinstance(patch, (list, tuple))
        or len(patch) != len(image_shape)
        or any(isinstance(p, bool) or not isinstance(p, int) or not 0 < p <= n for p, n in zip(patch, image_shape))
    ):
        raise MeddiffError(
            f"{section}.patch_size must be {len(image_shape)} positive integers no larger than "
            f"image_shape {image_shape}, got {patch!r}"
        )
    steps = values.get("patch_steps")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
        raise MeddiffError(f"{section}.patch_steps must be a non-negative integer or null, got {steps!r}")


def _validate(raw: dict[str, Any], base_dir: str | Path = ".") -> dict[str, Any]:
    cfg = copy.deepcopy(raw)
    _check_top_level(cfg)
    nd = int(cfg["spatial_dims"])
    if nd not in (2, 3):
        raise MeddiffError("spatial_dims must be 2 or 3")
    for key, spec in (("image_shape", COUNT), ("voxel_size", POSITIVE)):
        if not isinstance(cfg[key], (list, tuple)) or len(cfg[key]) != nd:
            raise MeddiffError(f"{key} needs {nd} values")
        for value in cfg[key]:
            check_number(key, value, spec)
    cfg["image_shape"] = [int(s) for s in cfg["image_shape"]]
    cfg["voxel_size"] = [float(s) for s in cfg["voxel_size"]]
    _fill_sections(cfg)
    nets = cfg["networks"]
    if "unet" not in nets:
        raise MeddiffError("networks.unet is required")
    unet = nets["unet"]
    unet["spatial_dims"] = nd
    if cfg["kind"] == "ldm":
        _check_ldm(cfg, nd)
    elif cfg["kind"] == "segmentation":
        _check_segmentation(cfg, nd)
    else:
        unet["in_channels"] = unet["out_channels"] = 1
    if cfg.get("label_map") is not None:
        _check_label_map(cfg)
    if cfg.get("label_output") is not None:
        _check_label_output(cfg)
    cfg["conditioning"] = validate_conditioning(cfg.get("conditioning"), cfg["kind"])
    options = conditioning_unet_options(cfg["conditioning"])
    unet["in_channels"] += options.pop("extra_in_channels", 0)
    unet.update(options)
    _resolve_paths(cfg, base_dir)
    return cfg


def _check_top_level(cfg: dict[str, Any]) -> None:
    """A plain name, mappings where mappings belong, the required keys and a known kind."""
    name = cfg.get("name")
    if name is not None and not (isinstance(name, str) and MODEL_NAME.match(name)):
        raise MeddiffError(f"name must be a plain folder name (letters, digits, '.', '_', '-'), not {name!r}")
    for key in ("networks", "data", "training", "intensity", "scheduler", "defaults"):
        if key in cfg and not isinstance(cfg[key], dict):
            raise MeddiffError(f"{key} must be a mapping, not {type(cfg[key]).__name__}")
    for key in ("name", "kind", "spatial_dims", "image_shape", "voxel_size", "networks"):
        if key not in cfg:
            raise MeddiffError(f"training config lacks {key!r}")
    if cfg["kind"] not in MODEL_KINDS:
        raise MeddiffError(f"kind must be one of {MODEL_KINDS}, not {cfg['kind']!r}")


def _fill_sections(cfg: dict[str, Any]) -> None:
    """Defaults into intensity, scheduler, defaults, data and training, checking what they can hold."""
    cfg["intensity"] = {**DEFAULT_INTENSITY, **cfg.get("intensity", {})}
    unknown = sorted(set(cfg["intensity"]) - INTENSITY_KEYS)
    if unknown:
        raise MeddiffError(
            f"intensity: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(INTENSITY_KEYS))})"
        )
    check_upper_value(cfg["intensity"].get("upper_value", 1.0))
    cfg["scheduler"] = {**DEFAULT_SCHEDULER, **cfg.get("scheduler", {})}
    if cfg["scheduler"]["prediction_type"] not in ("epsilon", "v_prediction", "sample"):
        raise MeddiffError("scheduler.prediction_type must be epsilon, v_prediction or sample")
    cfg["defaults"] = {"sampler": "dpm++", "steps": 20, "precision": "fp32", **cfg.get("defaults", {})}
    cfg["data"] = {**DEFAULT_DATA, **cfg.get("data", {})}
    cfg["training"] = {**DEFAULT_TRAINING, **cfg.get("training", {})}


def _check_ldm(cfg: dict[str, Any], nd: int) -> None:
    """An ldm's autoencoder (its latent channels are the UNet's), its training section and latent kind."""
    nets = cfg["networks"]
    if "autoencoder" not in nets:
        raise MeddiffError("an ldm config needs networks.autoencoder")
    ae = nets["autoencoder"]
    ae.setdefault("in_channels", 1)
    ae.setdefault("out_channels", 1)
    ae["spatial_dims"] = nd
    lc = int(ae["latent_channels"])
    nets["unet"]["in_channels"] = nets["unet"]["out_channels"] = lc
    down = 2 ** (len(ae["channels"]) - 1)
    if any(s % down for s in cfg["image_shape"]):
        raise MeddiffError(f"image_shape must be divisible by {down} for this autoencoder")
    cfg["autoencoder_training"] = {**DEFAULT_AE_TRAINING, **cfg.get("autoencoder_training", {})}
    if not isinstance(cfg["autoencoder_training"]["freeze_encoder"], bool):
        raise MeddiffError("autoencoder_training.freeze_encoder must be true or false")
    if cfg["training"]["latents"] not in LATENT_KINDS:
        raise MeddiffError(
            f"training.latents must be one of {', '.join(LATENT_KINDS)}, not {cfg['training']['latents']!r}"
        )


def _check_segmentation(cfg: dict[str, Any], nd: int) -> None:
    """The segmentation block's defaults; the UNet denoises the classes given the image and its context slices."""
    seg = cfg.setdefault("segmentation", {})
    seg.setdefault("num_classes", 4)
    seg.setdefault("class_names", ["background", "CSF", "GM", "WM"][: seg["num_classes"]])
    seg.setdefault("context_slices", 0)
    check_number("segmentation.num_classes", seg["num_classes"], Number(2, integer=True))
    context = seg["context_slices"]
    if isinstance(context, bool) or not isinstance(context, int) or context < 0:
        raise MeddiffError(f"segmentation.context_slices must be a non-negative integer, got {context!r}")
    if context and nd != 2:
        raise MeddiffError("segmentation.context_slices is for 2D models (neighbouring slices as channels)")
    n = int(seg["num_classes"])
    unet = cfg["networks"]["unet"]
    unet["in_channels"], unet["out_channels"] = n + 1 + 2 * context, n


def _label_names(block: Any, where: str, known: set[str]) -> dict[int, str]:
    """A block's ``labels`` (each value 0..K-1 named, 0: background), normalised in place to string keys; no
    keys but ``known``."""
    labels = block.get("labels") if isinstance(block, dict) else None
    if not isinstance(labels, dict) or not labels:
        raise MeddiffError(f"{where}.labels must map each label value (0, 1, ...) to its name")
    try:
        named = {int(k): v for k, v in labels.items()}
    except (TypeError, ValueError):
        raise MeddiffError(f"{where}.labels: keys must be integers, got {sorted(map(str, labels))}") from None
    if sorted(named) != list(range(len(named))) or not all(isinstance(v, str) and v for v in named.values()):
        raise MeddiffError(f"{where}.labels must name every value 0..K-1 (0: background), each with a string")
    block["labels"] = {str(k): named[k] for k in sorted(named)}
    unknown = sorted(set(block) - known)
    if unknown:
        raise MeddiffError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return named


def _check_lesion_label(cfg: dict[str, Any], named: dict[int, str], where: str) -> None:
    lesion = cfg["data"].get("lesion_label")
    if cfg["data"].get("lesion_replace") is not None and (lesion is None or int(lesion) not in named):
        raise MeddiffError(f"data.lesion_label must be one of {where}.labels' values, not {lesion!r}")


def _check_label_map(cfg: dict[str, Any]) -> None:
    """A ddpm that generates an image from a label map: its label dictionary (values 0..K-1, each named), given
    to the UNet as K one-hot channels beside the noisy image; the lesion label the data paints, if any."""
    if cfg["kind"] != "ddpm":
        raise MeddiffError(f"label_map is for ddpm models (an image generated from a label map), not {cfg['kind']}")
    named = _label_names(cfg["label_map"], "label_map", {"labels", "generator"})
    _check_model_name(cfg["label_map"], "generator", "label_map")
    _check_lesion_label(cfg, named, "label_map")
    cfg["networks"]["unet"]["in_channels"] += len(named)


def _check_model_name(block: dict[str, Any], key: str, where: str) -> None:
    value = block.get(key)
    if value is not None and not (isinstance(value, str) and MODEL_NAME.match(value)):
        raise MeddiffError(f"{where}.{key} must be a model name, not {value!r}")


def _check_label_output(cfg: dict[str, Any]) -> None:
    """A ddpm that generates label maps (a tissue-map generator): K one-hot channels in {-1, 1} are denoised and
    the map is their argmax."""
    if cfg["kind"] != "ddpm" or cfg.get("label_map") is not None:
        raise MeddiffError("label_output is for ddpm models that generate label maps (and take none)")
    block = cfg["label_output"]
    named = _label_names(block, "label_output", {"labels"})
    _check_lesion_label(cfg, named, "label_output")
    unet = cfg["networks"]["unet"]
    unet["in_channels"] = unet["out_channels"] = len(named)


def _resolve_paths(cfg: dict[str, Any], base_dir: str | Path) -> None:
    """data.dir, autoencoder_training.from_model and training.init_from found from the cwd or the config's folder."""
    if cfg["data"]["dir"] is None:
        raise MeddiffError("data.dir (a folder of NIfTI images) is required")
    cfg["data"]["dir"] = _resolve(cfg["data"]["dir"], base_dir)
    for section, key, what in (
        ("autoencoder_training", "from_model", "an ldm model folder"),
        ("training", "init_from", "a diffusion.pt or a model folder"),
    ):
        value = (cfg.get(section) or {}).get(key)
        if value is not None:
            if not isinstance(value, str) or not value:
                raise MeddiffError(f"{section}.{key} must be the path of {what}, got {value!r}")
            cfg[section][key] = _resolve(value, base_dir)


def _resolve(path: str, base_dir: str | Path) -> str:
    """A relative path from the working directory, else from the config's folder when it exists there."""
    p = Path(path).expanduser()
    if not p.is_absolute() and not p.exists() and (Path(base_dir) / p).exists():
        p = Path(base_dir) / p
    return str(p)
