"""Write the trained networks as a model folder (``save_model_folder``): model.json in the zoo schema,
safetensors weights (fp16 when that changes the outputs negligibly), sha256, and a model card."""

from __future__ import annotations

import copy
import datetime
import logging
from pathlib import Path
from typing import Any

import torch

from napari_meddiff import __version__
from napari_meddiff.models import DiffusionModel, save_model_folder

log = logging.getLogger(__name__)

MEASURED_BEGIN = "<!-- measured:begin -->"
MEASURED_END = "<!-- measured:end -->"


@torch.no_grad()
def latent_scale_factor(
    ae: torch.nn.Module, images: torch.Tensor, device: torch.device, batch: int = 4, kind: str = "sample"
) -> tuple[float, torch.Tensor]:
    """1 / std of the encoder latents over ``images`` (MONAI tutorials) and the unscaled latents: drawn from the
    posterior (``kind="sample"``, as MONAI's ``encode_stage_2_inputs`` and its LatentDiffusionInferer give them in
    training) or its mean (``kind="mean"``)."""
    ae.eval()

    def encode(x: torch.Tensor) -> torch.Tensor:
        return ae.encode_stage_2_inputs(x) if kind == "sample" else ae.encode(x)[0]

    zs = [encode(images[i : i + batch].to(device)).float().cpu() for i in range(0, images.shape[0], batch)]
    z = torch.cat(zs)
    return float(1.0 / z.std()), z


def model_config(
    cfg: dict[str, Any],
    *,
    scale_factor: float | None = None,
    latent_shape: list[int] | None = None,
    conditioning: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The model.json content (zoo schema) for a training config (``conditioning``: its block, for a conditional
    model; `conditions.model_block`)."""
    out: dict[str, Any] = {
        "name": cfg["name"],
        "kind": cfg["kind"],
        "spatial_dims": int(cfg["spatial_dims"]),
        "image_shape": list(cfg["image_shape"]),
        "voxel_size": list(cfg["voxel_size"]),
        "intensity": copy.deepcopy(cfg["intensity"]),
        "scheduler": copy.deepcopy(cfg["scheduler"]),
        "defaults": copy.deepcopy(cfg["defaults"]),
        "networks": {"unet": copy.deepcopy(cfg["networks"]["unet"])},
    }
    if cfg.get("description"):
        out["description"] = cfg["description"]
    if cfg["kind"] == "ldm":
        ae = copy.deepcopy(cfg["networks"]["autoencoder"])
        out["networks"]["autoencoder"] = ae
        down = 2 ** (len(ae["channels"]) - 1)
        out["latent"] = {
            "channels": int(ae["latent_channels"]),
            "shape": latent_shape or [s // down for s in cfg["image_shape"]],
            "scale_factor": float(scale_factor if scale_factor is not None else 1.0),
        }
    if cfg["kind"] == "segmentation":
        out["segmentation"] = copy.deepcopy(cfg["segmentation"])
    for block in ("label_map", "label_output"):
        if cfg.get(block) is not None:
            out[block] = copy.deepcopy(cfg[block])
    if conditioning is not None:
        out["conditioning"] = copy.deepcopy(conditioning)
    if cfg["spatial_dims"] == 2:
        out["slice_axis"] = int(cfg["data"].get("slice_axis", 2))
        out["slice_thickness"] = float(cfg["data"].get("slice_thickness") or cfg["voxel_size"][0])
    out["weights"] = {}
    return out


def as_diffusion_model(
    config: dict[str, Any], unet: torch.nn.Module, autoencoder: torch.nn.Module | None, path: Path, device: torch.device
) -> DiffusionModel:
    """In-memory `DiffusionModel` (for previews during training and for the fp16 check)."""
    return DiffusionModel(
        name=config["name"], path=path, config=config, unet=unet, autoencoder=autoencoder, device=device
    )


@torch.no_grad()
def half_is_lossless(net: torch.nn.Module, example: tuple, tol: float = 2e-3) -> tuple[bool, float]:
    """True when rounding the weights to fp16 changes the outputs by < ``tol`` (relative RMS)."""
    net = copy.deepcopy(net).float().cpu().eval()
    ref = net(*example)
    ref = ref[0] if isinstance(ref, tuple) else ref
    for p in list(net.parameters()) + list(net.buffers()):
        if p.is_floating_point():
            if p.abs().max() > 65000:
                return False, float("inf")
            p.copy_(p.half().float())
    out = net(*example)
    out = out[0] if isinstance(out, tuple) else out
    err = float((out - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-12))
    return err < tol, err


def check_half(config: dict[str, Any], networks: dict[str, torch.nn.Module]) -> tuple[bool, dict[str, float]]:
    torch.manual_seed(0)
    errs: dict[str, float] = {}
    ok = True
    for name, net in networks.items():
        if name == "unet":
            c = int(config["networks"]["unet"]["in_channels"])
            shape = config["latent"]["shape"] if config["kind"] == "ldm" else config["image_shape"]
            x = torch.randn(2, c, *shape)
            example = (x, torch.tensor([10, 500]))
            if config["networks"]["unet"].get("with_conditioning"):  # cross-attention context (B, 1, N)
                example += (torch.rand(2, 1, int(config["networks"]["unet"]["cross_attention_dim"])),)
        else:
            example = (torch.rand(1, 1, *config["image_shape"]),)
        good, err = half_is_lossless(net, example)
        errs[name] = round(err, 6)
        ok = ok and good
    return ok, errs


def fmt_minutes(m: float) -> str:
    return f"{m:.1f} min"


KIND_TEXT = {
    "ddpm": "pixel-space denoising diffusion model (DDPM)",
    "ldm": "latent diffusion model (AutoencoderKL + diffusion UNet on scaled latents)",
    "segmentation": "image-conditioned segmentation diffusion model (denoises one-hot labels given the image)",
}


def model_card(cfg: dict[str, Any], config: dict[str, Any], summary: dict[str, Any]) -> str:
    """MODEL_CARD.md of a trained model: what it is, how it was trained, its limits and a Measured section to fill."""
    kind_text = KIND_TEXT[cfg["kind"]]
    lines = [
        f"# {cfg['name']}",
        "",
        cfg.get("description", "").strip() or f"A {kind_text}.",
        "",
        "## Model",
        "",
        *_model_lines(cfg, config, summary),
        "",
        "## Training",
        "",
        *_training_lines(cfg, summary),
        "",
        "## Intended use and limits",
        "",
        _limits_paragraph(summary),
        "",
        "## Measured",
        "",
        MEASURED_BEGIN,
        "Not measured yet: run `python benchmarks/"
        + ("bench_segment.py --card" if cfg["kind"] == "segmentation" else "evaluate_models.py")
        + "` (it fills this section from its JSON).",
        MEASURED_END,
        "",
    ]
    return "\n".join(lines)


def _model_lines(cfg: dict[str, Any], config: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    """The card's Model section: kind, geometry and intensities, latent / classes / conditions, schedule, weights."""
    intensity = cfg["intensity"]
    lines = [
        f"- Kind: {KIND_TEXT[cfg['kind']]}.",
        f"- Spatial dims: {cfg['spatial_dims']}D, image shape {config['image_shape']} at voxel size "
        f"{config['voxel_size']} mm (RAS), intensities normalised to [0, 1] "
        f"(foreground percentiles {intensity.get('lower')}-{intensity.get('upper')}"
        + (
            f", the upper one mapped to {intensity['upper_value']} to keep bright voxels' contrast"
            if intensity.get("upper_value", 1.0) != 1.0
            else ""
        )
        + ").",
    ]
    if cfg["kind"] == "ldm":
        lat = config["latent"]
        lines.append(
            f"- Latent: {lat['channels']} channels x {lat['shape']}, scale factor {lat['scale_factor']:.4f} "
            "(1/std of the training latents)."
        )
    if cfg["kind"] == "segmentation":
        lines.append(_classes_line(cfg["segmentation"]))
    if config.get("conditioning"):
        lines.append(_conditions_line(config["conditioning"]))
    sch, defaults = cfg["scheduler"], cfg["defaults"]
    weights = config.get("weights")
    lines += [
        f"- Noise schedule: {sch['schedule']}, {sch['num_train_timesteps']} steps, "
        f"beta {sch['beta_start']}-{sch['beta_end']}, prediction type {sch['prediction_type']}. "
        f"Default sampler {defaults['sampler']} with {defaults['steps']} steps"
        + (f"; ensemble members combined by {defaults['combine']}" if defaults.get("combine") else "")
        + ".",
        "- Parameters: " + ", ".join(f"{k} {v['parameters']:,}" for k, v in weights.items())
        if weights
        else "- Parameters: see model.json",
        f"- Weights: {summary['weights_dtype']} safetensors "
        f"(fp16 check: relative output error {summary['half_check']}).",
    ]
    return lines


def _classes_line(seg: dict[str, Any]) -> str:
    context = int(seg.get("context_slices") or 0)
    return (
        f"- Classes: {', '.join(seg['class_names'])}; applied slice by slice (axial) for 2D models"
        + (
            f", each slice given with its {context} neighbouring slice(s) on either side as extra image channels (2.5D)"
            if context
            else ""
        )
        + "."
    )


def _conditions_line(block: dict[str, Any]) -> str:
    how = "cross-attention context" if block["context"] else "constant extra input channels"
    return (
        f"- Conditions ({how}; `--condition NAME=VALUE`, the Generate widget's sliders), each in [0, 1]: "
        + "; ".join(f"`{c['name']}` {c['description']}, default {c['default']}" for c in block["conditions"])
        + f". Trained with condition dropout {block.get('dropout', 0):g} (null condition "
        f"{block['null'][0]:g}), so classifier-free guidance (`--guidance-scale`) works."
    )


def _training_lines(cfg: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    """The card's Training section: data, machine, one line per stage, the config's notes, how to reproduce."""
    data = summary["data"]
    items = "slices" if cfg["spatial_dims"] == 2 else "volumes"
    lines = [
        f"- Data: {data['num_subjects']} synthetic subjects of the meddiff cohort (`napari_meddiff.data.mni152`, "
        f"training seeds only: {data['seed_summary']}), {data['num_items']} training {items}; "
        f"{data.get('num_val_subjects', 0)} further training-seed subjects for previews/validation. "
        "No held-out seed was used.",
        f"- Machine: {summary['machine']}; torch {torch.__version__}; napari-meddiff {__version__}; finished "
        f"{summary['finished']}.",
    ]
    for stage in ("autoencoder", "diffusion"):
        if summary.get(stage):
            lines.append(_stage_line(stage, summary[stage]))
    lines += [f"- Note: {note}" for note in cfg.get("notes", []) or []]
    lines.append(
        f"- Reproduce: `meddiff train {summary.get('config_path', 'train.yaml')}` (the config is saved next to the "
        "weights as `train.yaml`)"
        + (
            ", after the run it starts from (`training.init_from`; the config's header gives both commands)"
            if (summary.get("diffusion") or {}).get("init_from")
            else ""
        )
        + "."
    )
    return lines


def _stage_line(stage: str, s: dict[str, Any]) -> str:
    """One training stage's line: steps, time, batch, lr, precision and what the stage's own summary says."""
    if stage == "autoencoder" and s.get("from_model"):
        trained = (
            f"; its own training: {s['steps']} steps, validation PSNR {s['val_psnr_db']} dB"
            if s.get("val_psnr_db") is not None
            else ""
        )
        return (
            f"- Autoencoder: taken as it is from `{s['from_model']}` ({s['weights_dtype']} sha256 "
            f"{s['weights_sha256'][:12]}…), not trained in this run{trained}."
        )
    extra = _autoencoder_details(s) if stage == "autoencoder" else _diffusion_details(s)
    cpu = f" ({s['cpu_minutes']:.1f} CPU-min)" if s.get("cpu_minutes") is not None else ""
    return (
        f"- {stage.capitalize()}: {s['steps']} steps in {fmt_minutes(s['minutes'])} wall{cpu}, "
        f"batch {s['batch_size']} x {s['world_size']} process(es), lr {s['lr']:g}, {s['precision']}{extra}."
    )


def _autoencoder_details(s: dict[str, Any]) -> str:
    extra = (
        f", L1 + {s['kl_weight']:g} KL + {s['adv_weight']:g} patch-adversarial "
        f"(after {s['adv_warmup_steps']} steps), perceptual weight {s['perceptual_weight']:g}; "
        f"final L1 {s['final_l1']}, validation PSNR {s['val_psnr_db']} dB"
    )
    if s.get("patch_size"):
        extra += f"; random {s['patch_size']} crops"
    return extra


def _diffusion_details(s: dict[str, Any]) -> str:
    extra = f", {s['objective']}, EMA {s['ema_decay']}; loss {s['first_loss']} -> {s['final_loss']}"
    if s.get("patch_size"):
        until = s.get("patch_steps")
        extra += f"; random {'x'.join(map(str, s['patch_size']))} crops" + (
            " throughout" if until is None or s["steps"] <= int(until) else f" for the first {until} steps"
        )
    if s.get("init_from"):
        i = s["init_from"]
        what = (
            f"its UNet weights, {i['weights_dtype']} sha256 {i['weights_sha256'][:12]}…"
            if i.get("weights_sha256")
            else "its EMA weights"
        )
        extra += (
            f"; started from `{i['checkpoint']}` ({what}; its {i['step']} steps and "
            f"{i.get('cpu_minutes', '?')} CPU-min are counted here)"
            + (f", input channels added to {', '.join(i['widened'])} at zero" if i.get("widened") else "")
        )
    if s.get("val_dice"):
        extra += "; Dice on the validation subjects " + ", ".join(f"{k} {v:.3f}" for k, v in s["val_dice"].items())
    return extra


def _limits_paragraph(summary: dict[str, Any]) -> str:
    minutes = sum(float((summary.get(s) or {}).get("minutes", 0.0)) for s in ("autoencoder", "diffusion"))
    return (
        "Research and teaching demo of diffusion models for 3D brain MRI on CPU. Trained on CPU for "
        f"{fmt_minutes(minutes)} on {summary['data']['num_subjects']} synthetic MNI152-derived subjects: it is not a "
        "clinical tool, it has never seen real patient data, and its samples are low-resolution."
    )


def export_model(
    cfg: dict[str, Any],
    out_dir: Path,
    unet: torch.nn.Module,
    autoencoder: torch.nn.Module | None,
    summary: dict[str, Any],
    *,
    scale_factor: float | None = None,
    latent_shape: list[int] | None = None,
    config_path: Path | None = None,
    extra_files: dict[str, Path] | None = None,
    overwrite: bool = False,
    conditioning: dict[str, Any] | None = None,
) -> Path:
    config = model_config(cfg, scale_factor=scale_factor, latent_shape=latent_shape, conditioning=conditioning)
    networks = {"unet": unet.float().cpu()}
    if autoencoder is not None:
        networks["autoencoder"] = autoencoder.float().cpu()
    half_pref = cfg.get("export", {}).get("half", "auto")
    if half_pref == "auto":
        half, errs = check_half(config, networks)
    else:
        half, errs = bool(half_pref), {}
    summary = dict(summary)
    summary["weights_dtype"] = "float16" if half else "float32"
    summary["half_check"] = errs or "skipped"
    summary["finished"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if config_path is not None:
        summary["config_path"] = f"{out_dir}/train.yaml"
    config["training"] = {k: v for k, v in summary.items() if k != "data"}
    config["data"] = summary["data"]
    # the card lists parameter counts: fill weights first through a dry pass
    config["weights"] = {
        n: {"parameters": int(sum(v.numel() for v in net.state_dict().values()))} for n, net in networks.items()
    }
    card = model_card(cfg, config, summary)
    config["weights"] = {}
    files = dict(extra_files or {})
    if config_path is not None:
        files["train.yaml"] = config_path
    return save_model_folder(out_dir, config, networks, card=card, half=half, extra_files=files, overwrite=overwrite)


def write_measured_section(model_dir: str | Path, section: str) -> Path:
    """Replace the Measured section of a model folder's MODEL_CARD.md (between the markers) with ``section``,
    or append one; the rest of the card is kept."""
    card = Path(model_dir) / "MODEL_CARD.md"
    text = card.read_text()
    block = f"{MEASURED_BEGIN}\n{section}\n{MEASURED_END}"
    if MEASURED_BEGIN in text and MEASURED_END in text:
        text = text[: text.index(MEASURED_BEGIN)] + block + text[text.index(MEASURED_END) + len(MEASURED_END) :]
    else:
        text = text.rstrip() + "\n\n## Measured\n\n" + block + "\n"
    card.write_text(text)
    return card
