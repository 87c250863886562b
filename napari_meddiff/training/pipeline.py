"""``train(config)``: data -> (autoencoder -> cached latents) -> diffusion -> model folder."""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from napari_meddiff.errors import MeddiffError
from napari_meddiff.io.files import removed_if_left_empty
from napari_meddiff.models import check_model_target
from napari_meddiff.training.checkpoints import load_checkpoint, save_checkpoint
from napari_meddiff.training.conditions import fit_ranges
from napari_meddiff.training.conditions import model_block as conditioning_block
from napari_meddiff.training.conditions import scale as scale_conditions
from napari_meddiff.training.config import Number, check_number, load_config
from napari_meddiff.training.data import (
    Dataset,
    cohort_seeds,
    list_subjects,
    needs_labels,
    split_dataset,
    validation_subjects,
)
from napari_meddiff.training.device_setup import machine_description, setup_device
from napari_meddiff.training.distributed import Dist
from napari_meddiff.training.export import model_config
from napari_meddiff.training.optim import TrainingDiverged
from napari_meddiff.training.reporting import save_grid

log = logging.getLogger(__name__)


def dice_per_class(pred: torch.Tensor, ref: torch.Tensor, num_classes: int) -> list[float]:
    out = []
    for c in range(1, num_classes):
        p, r = pred == c, ref == c
        denom = int(p.sum() + r.sum())
        out.append(float(2 * (p & r).sum() / denom) if denom else float("nan"))
    return out


@torch.no_grad()
def segment_slices(
    model, images: torch.Tensor, *, steps: int, sampler: str = "dpm++", seed: int = 0, batch: int = 16
) -> torch.Tensor:
    """Labels (N, *S) for normalised images (N, C, *S) (C: 1, or the slice and its neighbours) with a
    segmentation diffusion model."""
    from napari_meddiff.diffusion.loop import denoise
    from napari_meddiff.diffusion.seeds import initial_noise, seeded_generators

    n = int(model.config["segmentation"]["num_classes"])
    outs = []
    for i in range(0, images.shape[0], batch):
        cond = images[i : i + batch].to(model.device)
        gens = seeded_generators([seed + i + j for j in range(cond.shape[0])], model.device)
        x = initial_noise((n, *cond.shape[2:]), gens, model.device)
        z = denoise(model, x, sampler=sampler, steps=steps, generators=gens, image_condition=cond)
        outs.append(z.argmax(1).cpu())
    return torch.cat(outs)


def check_no_heldout_seeds(seeds: list[int]) -> None:
    from napari_meddiff.data.mni152 import HELDOUT_SEEDS

    leaked = [s for s in seeds if s in HELDOUT_SEEDS]
    if leaked:
        raise MeddiffError(f"held-out cohort seeds in the training data: {leaked[:5]}; train on TRAIN_SEEDS only")


def plan_training(cfg: dict[str, Any], dev: torch.device, dist: Dist, autoencoder_only: bool = False) -> None:
    """What can be checked of the data and the work before any is loaded or done: the subjects (no held-out
    cohort seed among them), the validation split the config asks for, and that each stage's training step fits
    in the device's free memory."""
    from napari_meddiff.training.footprint import check_steps_fit

    pairs = list_subjects(cfg["data"], needs_labels(cfg))
    check_no_heldout_seeds(cohort_seeds(Path(cfg["data"]["dir"]), [image for image, _ in pairs]))
    _, note = validation_subjects(cfg["data"], len(pairs))
    if note and dist.main:
        log.warning("%s: %s", cfg["name"], note)
    check_steps_fit(cfg, dev, autoencoder_only)


def _data_summary(train: Dataset, val: Dataset | None, cfg: dict[str, Any]) -> dict[str, Any]:
    seeds = list(train.seeds)
    val_seeds = list(val.seeds) if val is not None else []
    check_no_heldout_seeds(seeds + val_seeds)

    def ranges(ss: list[int]) -> str:
        if not ss:
            return "unknown (not a meddiff cohort folder)"
        ss = sorted(ss)
        parts, a, b = [], ss[0], ss[0]
        for s in ss[1:]:
            if s == b + 1:
                b = s
            else:
                parts.append(f"{a}-{b}" if b > a else str(a))
                a = b = s
        parts.append(f"{a}-{b}" if b > a else str(a))
        return ", ".join(parts)

    return {
        "dir": cfg["data"]["dir"],
        "num_subjects": len(train.files),
        "num_val_subjects": len(val.files) if val is not None else 0,
        "num_items": len(train),
        "train_seeds": seeds,
        "val_seeds": val_seeds,
        "seed_summary": ranges(seeds) + (f" (validation {ranges(val_seeds)})" if val_seeds else ""),
    }


CHECKPOINT_FILES = ("autoencoder.pt", "diffusion.pt")


def check_work_dir(work: Path, resume: bool, fresh: bool = False) -> None:
    """The work dir must be a folder; ``resume`` needs a checkpoint in it (never a silent fresh start), and
    checkpoints already there are discarded only when ``fresh`` says so (never a silent loss of a long run)."""
    if work.exists() and not work.is_dir():
        raise MeddiffError(f"work dir {work} exists and is not a folder")
    if resume and fresh:
        raise MeddiffError("--resume and --fresh contradict each other")
    found = [f for f in CHECKPOINT_FILES if (work / f).is_file()]
    if resume and not found:
        raise MeddiffError(
            f"--resume: no checkpoint ({' or '.join(CHECKPOINT_FILES)}) in {work} to resume from; "
            "run without --resume to start afresh, or give --work-dir of the earlier run"
        )
    if found and not resume and not fresh:
        raise MeddiffError(
            f"{work} holds checkpoints of an earlier run ({', '.join(found)}): --resume to continue "
            "it, --fresh to discard them and start again, or another --work-dir"
        )


@contextlib.contextmanager
def removed_unless_used(work: Path):
    """On failure, remove a work dir this run created if it holds only the config copy (nothing to resume)."""
    existed = work.exists()
    with removed_if_left_empty(work):  # then the work dir and the parents this run created (runs/), if empty
        try:
            yield
        except BaseException:
            if not existed and work.is_dir() and {p.name for p in work.iterdir()} <= {"train.yaml"}:
                with contextlib.suppress(OSError):
                    (work / "train.yaml").unlink(missing_ok=True)
            raise


def check_condition_ranges(path: Path, names: list[str], ranges: list[tuple[float, float]], resume: bool) -> None:
    """Keep a conditional run's [0, 1] scale: written at its start, and a resume whose data give other ranges is
    refused (a requested 0.8 would mean other ml than the checkpoint learnt)."""
    import json

    now = {"conditions": names, "ranges_ml": [[round(lo, 4), round(hi, 4)] for lo, hi in ranges]}
    if resume and path.is_file():
        before = json.loads(path.read_text())
        if before != now:
            raise MeddiffError(
                f"{path}: this run's conditions were scaled on {before}, the data now give {now}; "
                "resume on the same training subjects, or start a new run"
            )
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(now) + "\n")


# what train()'s numeric arguments, which override the config's, may hold (None: the config's)
RUN_OPTIONS = {
    "max_minutes": Number(0, low_open=True, nullable=True),
    "steps": Number(1, integer=True, nullable=True),
    "num_threads": Number(1, integer=True, nullable=True),
}


def train(
    config_path: str | Path,
    *,
    out: str | Path | None = None,
    work_dir: str | Path | None = None,
    resume: bool = False,
    max_minutes: float | None = None,
    device: str = "auto",
    num_threads: int | None = None,
    steps: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
    fresh: bool = False,
    autoencoder_only: bool = False,
) -> Path | None:
    """Train the model of a YAML config and write its model folder (returned on the main process).

    ``autoencoder_only`` (an LDM): train the autoencoder stage only, with all of ``max_minutes``, and stop
    there (its checkpoint in the work dir; no model folder); a later ``resume`` goes on from it."""
    config_path = Path(config_path)
    for name, value in (("max_minutes", max_minutes), ("steps", steps), ("num_threads", num_threads)):
        check_number(name, value, RUN_OPTIONS[name])
    cfg = load_config(config_path)
    out, work = _check_request(cfg, config_path, out, work_dir, resume, fresh, overwrite, autoencoder_only)
    with removed_unless_used(work):
        dev = setup_device(device, num_threads or cfg["training"].get("num_threads"))
        dist = Dist(dev)
        if steps is not None:  # each stage's
            for stage in ("training", "autoencoder_training"):
                if stage in cfg:
                    cfg[stage]["steps"] = int(steps)
        ae_minutes, diff_minutes = stage_minutes(cfg, max_minutes, autoencoder_only)
        plan_training(cfg, dev, dist, autoencoder_only)
        if dist.main:
            prepare_work_dir(work, config_path, fresh)
        dist.barrier()
        train_data, val_data = _load_training_data(cfg, dist, dev, progress)
        summary: dict[str, Any] = {"data": _data_summary(train_data, val_data, cfg)}
        conditioning, item_conditions = _scaled_conditions(cfg, train_data, work, dist, resume)
        if cfg["kind"] == "ldm":
            ae, summary["autoencoder"] = _autoencoder_stage(
                cfg, train_data, val_data, work, dev, dist, resume, ae_minutes, progress, autoencoder_only
            )
            if autoencoder_only:
                _stop_after_the_autoencoder(summary["autoencoder"], work, dist)
                return None
            data = _latent_data(cfg, ae, summary["autoencoder"], train_data, item_conditions, work, dev, dist, resume)
        else:
            data = _image_data(cfg, train_data, item_conditions)
        mcfg = model_config(
            cfg, scale_factor=data.scale_factor, latent_shape=data.latent_shape, conditioning=conditioning
        )
        preview = _previewer(cfg, mcfg, data.autoencoder, train_data, val_data, work, dev)
        unet, summary["diffusion"] = _diffusion_stage(
            cfg, data, work, dev, dist, resume, diff_minutes, progress, preview
        )
        if cfg["kind"] == "segmentation" and val_data is not None and dist.main:
            summary["diffusion"]["val_dice"] = _validation_dice(cfg, mcfg, unet, val_data, work, dev)
        summary["machine"] = machine_description(dev, dist.world)
        path = _export(cfg, out, unet, data, summary, config_path, work, overwrite, conditioning) if dist.main else None
        dist.barrier()
        dist.close()
        return path


def _check_request(
    cfg: dict[str, Any],
    config_path: Path,
    out: str | Path | None,
    work_dir: str | Path | None,
    resume: bool,
    fresh: bool,
    overwrite: bool,
    autoencoder_only: bool,
) -> tuple[Path, Path]:
    """What can be checked before any training: the model folder and work dir (defaults ``models/NAME`` and
    ``runs/NAME``, returned), the resume or fresh start, and ``training.init_from``."""
    if autoencoder_only and cfg["kind"] != "ldm":
        raise MeddiffError(f"autoencoder only: {config_path} is a {cfg['kind']} config; only an ldm has an autoencoder")
    out = Path(out) if out is not None else Path("models") / cfg["name"]
    work = Path(work_dir) if work_dir is not None else Path("runs") / cfg["name"]
    if not autoencoder_only:  # it writes no model folder
        check_model_target(out, overwrite)  # before hours of training, not after
    check_work_dir(work, resume, fresh)
    init_from = cfg["training"].get("init_from")
    if init_from and not Path(init_from).exists() and not (resume and (work / "diffusion.pt").is_file()):
        raise MeddiffError(
            f"training.init_from: {init_from} does not exist (a diffusion.pt or a model folder; a "
            "relative path is read from the working directory, then from the config's folder)"
        )
    return out, work


def _diffusion_stage(
    cfg: dict[str, Any],
    data: DiffusionData,
    work: Path,
    dev: torch.device,
    dist: Dist,
    resume: bool,
    max_minutes: float | None,
    progress: bool,
    preview: Callable[[torch.nn.Module, int, Path], None],
) -> tuple[torch.nn.Module, dict[str, Any]]:
    from napari_meddiff.training.diffusion import train_diffusion

    unet, diff_summary = train_diffusion(
        cfg,
        data.x0,
        work_dir=work,
        device=dev,
        dist=dist,
        resume=resume,
        max_minutes=max_minutes,
        condition=data.condition,
        labels=data.labels,
        flip=data.flip,
        preview=preview,
        progress=progress,
        conditions=data.conditions,
    )
    if cfg["kind"] == "ldm":
        diff_summary["latents"] = f"posterior {cfg['training']['latents']}s of the autoencoder"
    return unet, diff_summary


def stage_minutes(
    cfg: dict[str, Any], max_minutes: float | None, autoencoder_only: bool
) -> tuple[float | None, float | None]:
    """The (autoencoder, diffusion) time budgets: the config's, or ``max_minutes`` (the whole run), which an LDM
    that trains its autoencoder splits in the proportion of the config's two budgets."""
    ae_minutes = cfg.get("autoencoder_training", {}).get("max_minutes")
    diff_minutes = cfg["training"].get("max_minutes")
    if max_minutes is not None:
        if autoencoder_only:
            ae_minutes = max_minutes
        elif cfg["kind"] == "ldm" and not cfg["autoencoder_training"].get("from_model"):
            a, d = float(ae_minutes or 1.0), float(diff_minutes or 1.0)
            ae_minutes, diff_minutes = max_minutes * a / (a + d), max_minutes * d / (a + d)
        else:
            diff_minutes = max_minutes
    return ae_minutes, diff_minutes


def prepare_work_dir(work: Path, config_path: Path, fresh: bool) -> None:
    """Create the work dir with a copy of the config; ``fresh`` discards an earlier run's checkpoints."""
    work.mkdir(parents=True, exist_ok=True)
    if config_path.resolve() != (work / "train.yaml").resolve():  # resuming from the run's own copy
        shutil.copyfile(config_path, work / "train.yaml")
    if fresh:
        for f in ("diffusion.pt", "autoencoder.pt", "latents.pt"):
            if (work / f).exists():
                log.warning("--fresh: discarding %s", work / f)
                (work / f).unlink()


def _load_training_data(
    cfg: dict[str, Any], dist: Dist, dev: torch.device, progress: bool
) -> tuple[Dataset, Dataset | None]:
    t0 = time.time()
    train_data, val_data = split_dataset(cfg, progress=progress and dist.main)
    if dist.main:
        log.info(
            "%s: %d training items from %d subjects (+%d validation subjects) in %.0f s; device %s",
            cfg["name"],
            len(train_data),
            len(train_data.files),
            len(val_data.files) if val_data else 0,
            time.time() - t0,
            dev,
        )
    return train_data, val_data


def _scaled_conditions(
    cfg: dict[str, Any], train_data: Dataset, work: Path, dist: Dist, resume: bool
) -> tuple[dict[str, Any] | None, torch.Tensor | None]:
    """A conditional model's conditioning block and each training item's condition values in [0, 1] (the
    ranges fitted on the training subjects); (None, None) for an unconditional one."""
    if cfg["conditioning"] is None:
        return None, None
    names = cfg["conditioning"]["conditions"]
    ranges = fit_ranges(train_data.measures, names)
    if dist.main:
        check_condition_ranges(work / "conditions.json", names, ranges, resume)
    item_conditions = scale_conditions(train_data.measures, ranges)
    conditioning = conditioning_block(cfg["conditioning"], ranges, item_conditions)
    if dist.main:
        log.info("conditions %s", "; ".join(c["description"] for c in conditioning["conditions"]))
    return conditioning, item_conditions


@dataclass
class DiffusionData:
    """What the diffusion stage trains on (`train_diffusion`'s data arguments) and, for an LDM, the frozen
    autoencoder and its latents' scale and shape."""

    x0: torch.Tensor | None  # images, scaled latents or a map generator's maps; None for segmentation
    condition: torch.Tensor | None  # segmentation: the images
    labels: torch.Tensor | None  # segmentation: their labels
    flip: bool  # random left-right flips of the batches
    conditions: torch.Tensor | None  # each item's condition values in [0, 1]
    autoencoder: torch.nn.Module | None = None
    scale_factor: float | None = None
    latent_shape: list[int] | None = None


def _image_data(cfg: dict[str, Any], train_data: Dataset, item_conditions: torch.Tensor | None) -> DiffusionData:
    """A ddpm's diffusion data (its images), or a segmentation model's (the labels, given their images)."""
    flip = bool(cfg["data"].get("flip", True))
    if cfg["kind"] == "segmentation":
        return DiffusionData(None, train_data.images, train_data.labels, flip, item_conditions)
    if cfg.get("label_output") is not None:  # the maps are what is denoised, held as bytes
        return DiffusionData(train_data.labels.unsqueeze(1).to(torch.uint8), None, None, flip, item_conditions)
    return DiffusionData(train_data.images, None, train_data.labels, flip, item_conditions)


def _autoencoder_stage(
    cfg: dict[str, Any],
    train_data: Dataset,
    val_data: Dataset | None,
    work: Path,
    dev: torch.device,
    dist: Dist,
    resume: bool,
    max_minutes: float | None,
    progress: bool,
    autoencoder_only: bool,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """An LDM's autoencoder and its summary: taken from a model folder (``autoencoder_training.from_model``) or
    trained here."""
    from napari_meddiff.training.autoencoder import autoencoder_from_model, train_autoencoder

    source = cfg["autoencoder_training"].get("from_model")
    if not source:
        return train_autoencoder(
            cfg,
            train_data.images,
            val_data.images if val_data is not None else None,
            work_dir=work,
            device=dev,
            dist=dist,
            resume=resume,
            max_minutes=max_minutes,
            progress=progress,
        )
    if autoencoder_only:
        raise MeddiffError(
            "--autoencoder-only: this config takes its autoencoder from a model folder "
            "(autoencoder_training.from_model); there is no autoencoder stage to train"
        )
    ae, ae_summary = autoencoder_from_model(Path(source), cfg)
    ae = ae.to(dev)
    if dist.main:
        log.info("autoencoder from %s (sha256 %s…), not trained here", source, ae_summary["weights_sha256"][:12])
    return ae, ae_summary


def _stop_after_the_autoencoder(ae_summary: dict[str, Any], work: Path, dist: Dist) -> None:
    if dist.main:
        log.info(
            "autoencoder stage stopped at step %d (%.1f min); checkpoint %s",
            ae_summary["steps"],
            ae_summary["minutes"],
            work / "autoencoder.pt",
        )
    dist.close()


def _latent_data(
    cfg: dict[str, Any],
    ae: torch.nn.Module,
    ae_summary: dict[str, Any],
    train_data: Dataset,
    item_conditions: torch.Tensor | None,
    work: Path,
    dev: torch.device,
    dist: Dist,
    resume: bool,
) -> DiffusionData:
    """An LDM's diffusion data: the scaled latents of the training volumes (and of their mirror images), from
    the work dir's cache when the encoder, the files and the latent kind are the same."""
    autoencoder = ae.requires_grad_(False)
    flip = bool(cfg["data"].get("flip", True))
    kind = cfg["training"]["latents"]
    # the latents depend on the encoder only: a decoder-only run (freeze_encoder) keeps them
    cache_key = {
        "encoder_sha256": ae_summary["encoder_sha256"],
        "files": list(train_data.files),
        "flip": flip,
        "latent_kind": kind,
    }
    cache = work / "latents.pt"
    st = load_checkpoint(cache) if (resume and cache.is_file()) else None
    if st is not None:
        st.setdefault("latent_kind", "sample")  # caches written before latent_kind hold draws
    if st is not None and all(st.get(k) == v for k, v in cache_key.items()):
        latents, scale_factor = st["latents"], float(st["scale_factor"])
    else:
        latents, scale_factor = _encode_latents(ae, train_data.images, flip, kind, dev)
        if dist.main:
            save_checkpoint(cache, {"latents": latents, "scale_factor": scale_factor, **cache_key})
    if item_conditions is not None and flip:  # the mirrored latents have their volumes' measures
        item_conditions = torch.cat([item_conditions, item_conditions])
    if dist.main:
        log.info("latents %s (posterior %ss), scale factor %.4f", tuple(latents.shape), kind, scale_factor)
    return DiffusionData(
        latents, None, None, False, item_conditions, autoencoder, scale_factor, list(latents.shape[2:])
    )


def _encode_latents(
    ae: torch.nn.Module, images: torch.Tensor, flip: bool, kind: str, dev: torch.device
) -> tuple[torch.Tensor, float]:
    """The scaled latents of ``images`` (then of their mirror images, with ``flip``) and the scale factor."""
    from napari_meddiff.training.export import latent_scale_factor

    scale_factor, z = latent_scale_factor(ae, images, dev, kind=kind)
    latents = z
    if flip:  # latents of the mirrored volumes too (a flip of a latent is not the latent of a flip)
        _, zf = latent_scale_factor(ae, images.flip(2), dev, kind=kind)
        latents = torch.cat([z, zf])
    latents = latents * scale_factor
    if not bool(torch.isfinite(latents).all()):
        raise TrainingDiverged(
            "the autoencoder encodes the training volumes to non-finite latents "
            f"(scale factor {scale_factor:g}): retrain it, with precision: fp32 or a "
            "lower lr in autoencoder_training"
        )
    return latents, scale_factor


def _previewer(
    cfg: dict[str, Any],
    mcfg: dict[str, Any],
    autoencoder: torch.nn.Module | None,
    train_data: Dataset,
    val_data: Dataset | None,
    work: Path,
    dev: torch.device,
) -> Callable[[torch.nn.Module, int, Path], None]:
    """The diffusion stage's preview: segmentations of validation slices with their Dice, or generated samples
    above real images."""
    from napari_meddiff.training.export import as_diffusion_model

    val_steps = int(cfg["training"]["val_steps"])
    nval = int(cfg["training"]["val_samples"])

    def preview(unet: torch.nn.Module, step: int, path: Path) -> None:
        unet.eval()
        model = as_diffusion_model(mcfg, unet, autoencoder, work, dev)
        if cfg["kind"] == "segmentation":
            if val_data is not None:
                _save_segmentation_preview(model, cfg, val_data, nval, val_steps, step, path)
            return
        if cfg.get("label_map") is not None:
            _save_label_map_preview(model, val_data or train_data, nval, val_steps, dev, step, path)
            return
        if cfg.get("label_output") is not None:
            real = (val_data or train_data).labels.unsqueeze(1).float() / (len(model.label_output) - 1)
            _save_generation_preview(model, cfg, real, nval, val_steps, dev, step, path)
            return
        real = val_data.images if val_data is not None else train_data.images
        _save_generation_preview(model, cfg, real, nval, val_steps, dev, step, path)

    return preview


def _save_segmentation_preview(
    model: Any, cfg: dict[str, Any], val_data: Dataset, nval: int, val_steps: int, step: int, path: Path
) -> None:
    idx = torch.linspace(0, len(val_data) - 1, nval).long()
    imgs, labs = val_data.images[idx], val_data.labels[idx]
    pred = segment_slices(model, imgs, steps=val_steps)
    k = int(cfg["segmentation"]["num_classes"]) - 1
    d = dice_per_class(pred, labs, k + 1)
    save_grid(
        path,
        [
            [i[i.shape[0] // 2].numpy() for i in imgs],
            [lab.numpy() / k for lab in labs],
            [p.numpy() / k for p in pred],
        ],
        f"step {step}: image / reference / predicted; Dice " + " ".join(f"{v:.3f}" for v in d),
    )


def _save_label_map_preview(
    model: Any, data: Dataset, nval: int, val_steps: int, dev: torch.device, step: int, path: Path
) -> None:
    """Label maps of (validation) subjects, the images generated from them, and the subjects' real images."""
    from napari_meddiff.tasks.from_labels import sample_from_label_arrays

    idx = torch.linspace(0, len(data) - 1, min(nval, len(data))).long().unique()
    settings = {"sampler": "dpm++", "steps": val_steps, "eta": 0.0, "precision": "fp32"}
    gens = [torch.Generator().manual_seed(int(i)) for i in range(len(idx))]
    fake = sample_from_label_arrays(model, data.labels[idx], gens, settings, dev)
    k = max(len(model.label_map) - 1, 1)
    save_grid(
        path,
        [
            [lab.numpy() / k for lab in data.labels[idx]],
            [f.numpy() for f in fake],
            [r[0].numpy() for r in data.images[idx]],
        ],
        f"step {step}: label map / generated from it (dpm++ {val_steps} steps) / real",
    )


def _save_generation_preview(
    model: Any,
    cfg: dict[str, Any],
    real: torch.Tensor,
    nval: int,
    val_steps: int,
    dev: torch.device,
    step: int,
    path: Path,
) -> None:
    from napari_meddiff.tasks.generate import generate

    vols = generate(model, list(range(nval)), sampler="dpm++", steps=val_steps, device=str(dev))
    arrs = [np.squeeze(v.array, -1) if cfg["spatial_dims"] == 2 else v.array for v in vols]
    if model.label_output:  # maps, shown as the real ones are (value / largest label)
        arrs = [np.asarray(a, np.float32) / (len(model.label_output) - 1) for a in arrs]
    ridx = torch.linspace(0, real.shape[0] - 1, nval).long()
    save_grid(
        path,
        [arrs, [r[0].numpy() for r in real[ridx]]],
        f"step {step}: top generated (dpm++ {val_steps} steps), bottom real",
    )


def _validation_dice(
    cfg: dict[str, Any],
    mcfg: dict[str, Any],
    unet: torch.nn.Module,
    val_data: Dataset,
    work: Path,
    dev: torch.device,
) -> dict[str, float]:
    """Dice per class of the trained segmentation model on the validation slices, at the default steps."""
    from napari_meddiff.training.export import as_diffusion_model

    model = as_diffusion_model(mcfg, unet, None, work, dev)
    pred = segment_slices(model, val_data.images, steps=int(cfg["defaults"]["steps"]))
    d = dice_per_class(pred, val_data.labels, int(cfg["segmentation"]["num_classes"]))
    return dict(zip(cfg["segmentation"]["class_names"][1:], [round(v, 4) for v in d]))


def _export(
    cfg: dict[str, Any],
    out: Path,
    unet: torch.nn.Module,
    data: DiffusionData,
    summary: dict[str, Any],
    config_path: Path,
    work: Path,
    overwrite: bool,
    conditioning: dict[str, Any] | None,
) -> Path:
    """Write the model folder, with the loss curves of the work dir."""
    from napari_meddiff.training.export import export_model

    extra = {f.name: f for f in (work / "loss_diffusion.png", work / "loss_autoencoder.png") if f.is_file()}
    path = export_model(
        cfg,
        out,
        unet,
        data.autoencoder,
        summary,
        scale_factor=data.scale_factor,
        latent_shape=data.latent_shape,
        config_path=config_path,
        extra_files=extra,
        overwrite=overwrite,
        conditioning=conditioning,
    )
    log.info("wrote %s", path)
    return path
