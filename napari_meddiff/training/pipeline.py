"""``train(config)``: data -> (autoencoder -> cached latents) -> diffusion -> model folder."""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
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
from napari_meddiff.training.config import load_config
from napari_meddiff.training.data import Dataset, split_dataset
from napari_meddiff.training.device_setup import machine_description, setup_device
from napari_meddiff.training.distributed import Dist
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
        z = denoise(model, x, sampler=sampler, steps=steps, generators=gens, condition=cond)
        outs.append(z.argmax(1).cpu())
    return torch.cat(outs)


def _data_summary(train: Dataset, val: Dataset | None, cfg: dict[str, Any]) -> dict[str, Any]:
    from napari_meddiff.data.mni152 import HELDOUT_SEEDS

    seeds = list(train.seeds)
    val_seeds = list(val.seeds) if val is not None else []
    leaked = [s for s in seeds + val_seeds if s in HELDOUT_SEEDS]
    if leaked:
        raise MeddiffError(f"held-out cohort seeds in the training data: {leaked[:5]}; train on TRAIN_SEEDS only")

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
    from napari_meddiff.tasks.generate import generate
    from napari_meddiff.training.autoencoder import autoencoder_from_model, train_autoencoder
    from napari_meddiff.training.diffusion import train_diffusion
    from napari_meddiff.training.export import as_diffusion_model, export_model, latent_scale_factor, model_config

    config_path = Path(config_path)
    cfg = load_config(config_path)
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
    with removed_unless_used(work):
        tc = cfg["training"]
        dev = setup_device(device, num_threads or tc.get("num_threads"))
        dist = Dist(dev)
        if steps is not None:
            tc["steps"] = int(steps)
            if "autoencoder_training" in cfg:
                cfg["autoencoder_training"]["steps"] = int(steps)
        # budget: --max-minutes is the whole run; an LDM splits it like its stages' max_minutes
        ae_minutes = cfg.get("autoencoder_training", {}).get("max_minutes")
        diff_minutes = tc.get("max_minutes")
        if max_minutes is not None:
            if autoencoder_only:
                ae_minutes = max_minutes
            elif cfg["kind"] == "ldm" and not cfg["autoencoder_training"].get("from_model"):
                a, d = float(ae_minutes or 1.0), float(diff_minutes or 1.0)
                ae_minutes, diff_minutes = max_minutes * a / (a + d), max_minutes * d / (a + d)
            else:
                diff_minutes = max_minutes
        if dist.main:
            work.mkdir(parents=True, exist_ok=True)
            if config_path.resolve() != (work / "train.yaml").resolve():  # resuming from the run's own copy
                shutil.copyfile(config_path, work / "train.yaml")
            if fresh:
                for f in ("diffusion.pt", "autoencoder.pt", "latents.pt"):
                    if (work / f).exists():
                        log.warning("--fresh: discarding %s", work / f)
                        (work / f).unlink()
        dist.barrier()
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
        summary: dict[str, Any] = {"data": _data_summary(train_data, val_data, cfg)}
        conditioning, item_conditions = None, None
        if cfg["conditioning"] is not None:
            ranges = fit_ranges(train_data.measures, cfg["conditioning"]["conditions"])
            if dist.main:
                check_condition_ranges(work / "conditions.json", cfg["conditioning"]["conditions"], ranges, resume)
            item_conditions = scale_conditions(train_data.measures, ranges)
            conditioning = conditioning_block(cfg["conditioning"], ranges, item_conditions)
            if dist.main:
                log.info("conditions %s", "; ".join(c["description"] for c in conditioning["conditions"]))
        flip = bool(cfg["data"].get("flip", True))
        autoencoder = None
        scale_factor = None
        latent_shape = None

        if cfg["kind"] == "ldm":
            source = cfg["autoencoder_training"].get("from_model")
            if source:
                if autoencoder_only:
                    raise MeddiffError(
                        "--autoencoder-only: this config takes its autoencoder from a model folder "
                        "(autoencoder_training.from_model); there is no autoencoder stage to train"
                    )
                ae, ae_summary = autoencoder_from_model(Path(source), cfg)
                ae = ae.to(dev)
                if dist.main:
                    log.info(
                        "autoencoder from %s (sha256 %s…), not trained here", source, ae_summary["weights_sha256"][:12]
                    )
            else:
                ae, ae_summary = train_autoencoder(
                    cfg,
                    train_data.images,
                    val_data.images if val_data is not None else None,
                    work_dir=work,
                    device=dev,
                    dist=dist,
                    resume=resume,
                    max_minutes=ae_minutes,
                    progress=progress,
                )
            summary["autoencoder"] = ae_summary
            if autoencoder_only:
                if dist.main:
                    log.info(
                        "autoencoder stage stopped at step %d (%.1f min); checkpoint %s",
                        ae_summary["steps"],
                        ae_summary["minutes"],
                        work / "autoencoder.pt",
                    )
                dist.close()
                return None
            autoencoder = ae.requires_grad_(False)
            cache = work / "latents.pt"
            st = load_checkpoint(cache) if (resume and cache.is_file()) else None
            if st is not None:
                st.setdefault("latent_kind", "sample")  # caches written before latent_kind hold draws
            # the latents depend on the encoder only: a decoder-only run (freeze_encoder) keeps them
            kind = tc["latents"]
            cache_key = {
                "encoder_sha256": ae_summary["encoder_sha256"],
                "files": list(train_data.files),
                "flip": flip,
                "latent_kind": kind,
            }
            if st is not None and all(st.get(k) == v for k, v in cache_key.items()):
                latents, scale_factor = st["latents"], float(st["scale_factor"])
            else:
                scale_factor, z = latent_scale_factor(ae, train_data.images, dev, kind=kind)
                latents = z
                if flip:  # latents of the mirrored volumes too (a flip of a latent is not the latent of a flip)
                    _, zf = latent_scale_factor(ae, train_data.images.flip(2), dev, kind=kind)
                    latents = torch.cat([z, zf])
                latents = latents * scale_factor
                if not bool(torch.isfinite(latents).all()):
                    raise TrainingDiverged(
                        "the autoencoder encodes the training volumes to non-finite latents "
                        f"(scale factor {scale_factor:g}): retrain it, with precision: fp32 or a "
                        "lower lr in autoencoder_training"
                    )
                if dist.main:
                    save_checkpoint(cache, {"latents": latents, "scale_factor": scale_factor, **cache_key})
            if item_conditions is not None and flip:  # the mirrored latents have their volumes' measures
                item_conditions = torch.cat([item_conditions, item_conditions])
            latent_shape = list(latents.shape[2:])
            if dist.main:
                log.info("latents %s (posterior %ss), scale factor %.4f", tuple(latents.shape), kind, scale_factor)
            x0_data, cond, labels, flip_batches = latents, None, None, False
        elif cfg["kind"] == "segmentation":
            x0_data, cond, labels, flip_batches = None, train_data.images, train_data.labels, flip
        else:
            x0_data, cond, labels, flip_batches = train_data.images, None, None, flip

        mcfg = model_config(cfg, scale_factor=scale_factor, latent_shape=latent_shape, conditioning=conditioning)
        val_steps = int(tc["val_steps"])
        nval = int(tc["val_samples"])

        def preview(unet: torch.nn.Module, step: int, path: Path) -> None:
            unet.eval()
            model = as_diffusion_model(mcfg, unet, autoencoder, work, dev)
            if cfg["kind"] == "segmentation":
                if val_data is None:
                    return
                idx = torch.linspace(0, len(val_data) - 1, nval).long()
                imgs, labs = val_data.images[idx], val_data.labels[idx]
                pred = segment_slices(model, imgs, steps=val_steps)
                k = int(cfg["segmentation"]["num_classes"]) - 1
                d = dice_per_class(pred, labs, k + 1)
                save_grid(
                    path,
                    [
                        [i[i.shape[0] // 2].numpy() for i in imgs],
                        [l.numpy() / k for l in labs],
                        [p.numpy() / k for p in pred],
                    ],
                    f"step {step}: image / reference / predicted; Dice " + " ".join(f"{v:.3f}" for v in d),
                )
            else:
                vols = generate(model, list(range(nval)), sampler="dpm++", steps=val_steps, device=str(dev))
                arrs = [np.squeeze(v.array, -1) if cfg["spatial_dims"] == 2 else v.array for v in vols]
                real = val_data.images if val_data is not None else train_data.images
                ridx = torch.linspace(0, real.shape[0] - 1, nval).long()
                save_grid(
                    path,
                    [arrs, [r[0].numpy() for r in real[ridx]]],
                    f"step {step}: top generated (dpm++ {val_steps} steps), bottom real",
                )

        unet, diff_summary = train_diffusion(
            cfg,
            x0_data,
            work_dir=work,
            device=dev,
            dist=dist,
            resume=resume,
            max_minutes=diff_minutes,
            condition=cond,
            labels=labels,
            flip=flip_batches,
            preview=preview,
            progress=progress,
            conditions=item_conditions,
        )
        summary["diffusion"] = diff_summary
        if cfg["kind"] == "ldm":
            summary["diffusion"]["latents"] = f"posterior {tc['latents']}s of the autoencoder"
        if cfg["kind"] == "segmentation" and val_data is not None and dist.main:
            model = as_diffusion_model(mcfg, unet, None, work, dev)
            pred = segment_slices(model, val_data.images, steps=int(cfg["defaults"]["steps"]))
            d = dice_per_class(pred, val_data.labels, int(cfg["segmentation"]["num_classes"]))
            summary["diffusion"]["val_dice"] = dict(
                zip(cfg["segmentation"]["class_names"][1:], [round(v, 4) for v in d])
            )
        summary["machine"] = machine_description(dev, dist.world)
        path = None
        if dist.main:
            extra = {f.name: f for f in (work / "loss_diffusion.png", work / "loss_autoencoder.png") if f.is_file()}
            path = export_model(
                cfg,
                out,
                unet,
                autoencoder,
                summary,
                scale_factor=scale_factor,
                latent_shape=latent_shape,
                config_path=config_path,
                extra_files=extra,
                overwrite=overwrite,
                conditioning=conditioning,
            )
            log.info("wrote %s", path)
        dist.barrier()
        dist.close()
        return path
