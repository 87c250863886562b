"""AutoencoderKL training as in the MONAI generative tutorials: L1 reconstruction + KL, plus a patch
adversarial loss (PatchDiscriminator, least-squares) after a warm-up. Perceptual loss is optional and off
by default (its pretrained weights would have to be downloaded)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from napari_meddiff.errors import MeddiffError
from napari_meddiff.models import build_network
from napari_meddiff.training.checkpoints import (
    load_checkpoint,
    load_trainer_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from napari_meddiff.training.data import crop_schedule, random_batch, random_crop
from napari_meddiff.training.device_setup import (
    LAYOUTS,
    autocast,
    grad_scaler,
    processor_identity,
    resolve_layout,
    resolve_precision,
    to_layout,
)
from napari_meddiff.training.distributed import Dist, stop_agreed, unwrap
from napari_meddiff.training.optim import EMA, check_finite, clip_and_step, lr_lambda
from napari_meddiff.training.reporting import progress_bar, psnr, save_grid, save_loss_curve
from napari_meddiff.training.stopping import STOP, Budget, stopped

log = logging.getLogger(__name__)


def kl_loss(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    dims = list(range(1, z_mu.ndim))
    kl = 0.5 * torch.sum(z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2) + 1e-12) - 1, dim=dims)
    return kl.mean()


def generator_step_loss(
    ae: torch.nn.Module, x: torch.Tensor, kl_weight: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L1 + kl_weight * KL, L1, KL, reconstruction) of one autoencoder pass on ``x``."""
    rec, z_mu, z_sigma = ae(x)
    rec = rec.float()
    l1 = F.l1_loss(rec, x.float())
    kl = kl_loss(z_mu.float(), z_sigma.float())
    return l1 + kl_weight * kl, l1, kl, rec


def write_curve(path: Path, history: dict[str, list], val_psnr: list, extra: dict[str, Any]) -> None:
    """The loss and validation-PSNR curve as JSON (replaced atomically)."""
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps({**extra, "val_psnr_db": val_psnr, **history}))
    os.replace(tmp, path)


@torch.no_grad()
def reconstruct(ae: torch.nn.Module, images: torch.Tensor, device: torch.device, batch: int = 2) -> torch.Tensor:
    ae.eval()
    outs = []
    for i in range(0, images.shape[0], batch):
        x = images[i : i + batch].to(device)
        outs.append(ae.decode_stage_2_outputs(ae.encode_stage_2_inputs(x)).float().cpu())
    return torch.cat(outs)


ENCODER_PARTS = ("encoder.", "quant_conv_mu.", "quant_conv_log_sigma.")  # what makes the latents (AutoencoderKL)


def encoder_state(ae: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters and buffers that make an AutoencoderKL's latents."""
    return {k: v for k, v in unwrap(ae).state_dict().items() if k.startswith(ENCODER_PARTS)}


def encoder_sha256(ae: torch.nn.Module) -> str:
    """A digest of what makes the latents: equal digests, equal latents (the latent cache's key)."""
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(encoder_state(ae).items()):
        h.update(k.encode())
        h.update(v.detach().float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def freeze_encoder(ae: torch.nn.Module, ema: EMA | None) -> int:
    """Freeze the encoder for decoder-only training: the live encoder takes the EMA's (the one whose latents
    the diffusion UNet learnt), and neither changes again (no gradients; the EMA skips frozen parameters).
    Returns the number of frozen tensors."""
    if ema is not None:
        unwrap(ae).load_state_dict(encoder_state(ema.module), strict=False)
    frozen = 0
    for name, p in unwrap(ae).named_parameters():
        if name.startswith(ENCODER_PARTS):
            p.requires_grad_(False)
            frozen += 1
    if not frozen:
        raise MeddiffError("freeze_encoder: this autoencoder has no encoder parameters to freeze")
    return frozen


def autoencoder_from_model(folder: Path, cfg: dict[str, Any]) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The autoencoder of an LDM model folder (sha256-checked safetensors) and its training summary, for a run
    that trains only a new diffusion UNet on its latents (``autoencoder_training.from_model``; a conditional
    model on the shipped autoencoder, say). The folder must be an ldm with this config's autoencoder network,
    intensity normalisation and voxel size."""
    from napari_meddiff.models.folder import FORMAT

    where = f"autoencoder_training.from_model: {folder}"
    if not FORMAT.detect(folder):
        raise MeddiffError(f"{where} has no model.json (a meddiff ldm model folder)")
    config = FORMAT.read_config(folder)
    if config["kind"] != "ldm":
        raise MeddiffError(f"{where} is a {config['kind']} model; it needs a latent diffusion model (ldm)")
    theirs, ours = config["networks"]["autoencoder"], cfg["networks"]["autoencoder"]
    differ = sorted(k for k in set(theirs) & set(ours) if theirs[k] != ours[k])
    for key in ("intensity", "voxel_size"):
        if config.get(key) != cfg[key]:
            differ.append(key)
    if differ:
        raise MeddiffError(
            f"{where}: its " + ", ".join(differ) + " differ from this config's (the latents would "
            "not be the ones its autoencoder makes of this data)"
        )
    ae = FORMAT.load_networks(folder, config)["autoencoder"].float()
    cfg["networks"]["autoencoder"] = dict(theirs)  # the exported model.json then describes these weights exactly
    stage = dict((config.get("training") or {}).get("autoencoder") or {})
    weights = config["weights"]["autoencoder"]
    stage.update(
        from_model=str(folder), weights_sha256=weights["sha256"], weights_dtype=weights.get("dtype", "float32")
    )
    stage.setdefault("steps", 0)
    stage["encoder_sha256"] = encoder_sha256(ae)
    return ae, stage


def train_autoencoder(
    cfg: dict[str, Any],
    images: torch.Tensor,
    val_images: torch.Tensor | None,
    *,
    work_dir: Path,
    device: torch.device,
    dist: Dist,
    resume: bool,
    max_minutes: float | None,
    progress: bool = True,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    from monai.losses import PatchAdversarialLoss
    from monai.networks.nets import PatchDiscriminator

    tc = cfg["autoencoder_training"]
    nd = int(cfg["spatial_dims"])
    flip = bool(cfg["data"].get("flip", True))
    precision = resolve_precision(tc["precision"], device)
    torch.manual_seed(int(tc["seed"]) + 1000 * dist.rank)
    gen = torch.Generator().manual_seed(int(tc["seed"]) * 7919 + 17 * dist.rank + 2)
    ae = build_network("autoencoder", cfg["networks"]["autoencoder"]).to(device)
    ema = EMA(ae, tc["ema_decay"], tc["ema_start"]) if float(tc["ema_decay"]) > 0 else None
    disc = PatchDiscriminator(
        spatial_dims=nd,
        num_layers_d=int(tc["disc_layers"]),
        channels=int(tc["disc_channels"]),
        in_channels=1,
        out_channels=1,
        norm="INSTANCE",
    ).to(device)
    adv = PatchAdversarialLoss(criterion="least_squares")
    opt_g = torch.optim.Adam(ae.parameters(), lr=float(tc["lr"]))
    opt_d = torch.optim.Adam(disc.parameters(), lr=float(tc["disc_lr"]))
    sched = torch.optim.lr_scheduler.LambdaLR(opt_g, lr_lambda(int(tc["warmup_steps"])))
    scaler_g = grad_scaler(device, precision)
    scaler_d = grad_scaler(device, precision)
    ckpt_path = work_dir / "autoencoder.pt"
    step, spent, cpu_spent = 0, 0.0, 0.0
    history: dict[str, list] = {"l1": [], "kl": [], "gen_adv": [], "disc": []}
    val_psnr: list = []
    layout_request = str(tc["memory_format"])
    processor = processor_identity(device)
    if resume and ckpt_path.is_file():
        st = load_checkpoint(ckpt_path)
        if layout_request == "auto" and st.get("memory_format") in LAYOUTS:
            if st.get("processor") in (None, processor):  # None: checkpoints from before it was recorded
                layout_request = st["memory_format"]  # keep the run's layout: a switch would change its bits
            elif dist.main:
                log.info(
                    "resumed on another processor (%s, was %s): measuring the layout again", processor, st["processor"]
                )
        ae.load_state_dict(st["model"])
        if ema is not None:
            ema.module.load_state_dict(st["ema"] if st.get("ema") is not None else st["model"])
        disc.load_state_dict(st["discriminator"])
        load_trainer_state(st, {"optimizer": opt_g, "optimizer_d": opt_d, "lr_scheduler": sched}, "autoencoder")
        set_rng_state(gen, st["rng"])
        step, spent, history, val_psnr = int(st["step"]), float(st["minutes"]), st["history"], st["val_psnr"]
        cpu_spent = float(st.get("cpu_minutes", 0.0))
        if dist.main:
            log.info("resumed autoencoder training at step %d (%.1f min spent)", step, spent)
    if tc["freeze_encoder"]:
        n = freeze_encoder(ae, ema)
        if dist.main:
            log.info(
                "autoencoder: decoder only (%d encoder tensors frozen, encoder sha256 %s…)", n, encoder_sha256(ae)[:12]
            )
    total, bs = int(tc["steps"]), int(tc["batch_size"])
    kl_weight = float(tc["kl_weight"])
    first = crop_schedule(tc, step) or list(images.shape[2:])
    layout, layout_times = resolve_layout(
        layout_request, lambda net, x: generator_step_loss(net, x, kl_weight)[0], ae, (bs, 1, *first), device, precision
    )
    if dist.main:
        log.info(
            "autoencoder: %s, %s layout %s",
            precision,
            layout,
            ", ".join(f"{k} {v:.2f} s/step" for k, v in layout_times.items()) or "(as configured)",
        )
    ae, disc = to_layout(ae, layout), to_layout(disc, layout)
    if ema is not None:
        ema.module = to_layout(ema.module, layout)
    dae, ddisc = dist.wrap(ae), dist.wrap(disc)
    budget = Budget(max_minutes, spent, cpu_spent)
    last_ckpt = budget.minutes

    def checkpoint() -> None:
        if dist.main:
            save_checkpoint(
                ckpt_path,
                {
                    "step": step,
                    "minutes": budget.minutes,
                    "cpu_minutes": budget.cpu_minutes,
                    "history": history,
                    "val_psnr": val_psnr,
                    "model": unwrap(ae).state_dict(),
                    "discriminator": unwrap(disc).state_dict(),
                    "ema": ema.module.state_dict() if ema is not None else None,
                    "optimizer": opt_g.state_dict(),
                    "optimizer_d": opt_d.state_dict(),
                    "lr_scheduler": sched.state_dict(),
                    "rng": rng_state(gen),
                    "precision": precision,
                    "memory_format": layout,
                    "processor": processor,
                },
            )
            write_curve(
                work_dir / "autoencoder_curve.json",
                history,
                val_psnr,
                {
                    "step": step,
                    "minutes": round(budget.minutes, 2),
                    "cpu_minutes": round(budget.cpu_minutes, 2),
                    "precision": precision,
                    "memory_format": layout,
                },
            )

    def validate() -> None:
        if val_images is None:
            return
        with torch.random.fork_rng(devices=[]):  # validation leaves the training RNG as it was
            rec = reconstruct(ema.module if ema is not None else unwrap(ae), val_images, device)
        p = float(np.mean([psnr(r.clamp(0, 1), v) for r, v in zip(rec, val_images)]))
        val_psnr.append((step, p))
        save_grid(
            work_dir / "previews" / f"autoencoder_step{step:06d}.png",
            [[v[0].numpy() for v in val_images[:2]], [r[0].clamp(0, 1).numpy() for r in rec[:2]]],
            f"{cfg['name']} AE step {step}: top real, bottom reconstruction; PSNR {p:.2f} dB",
        )
        ae.train()

    bar = progress_bar(total, step, f"{cfg['name']} autoencoder", dist.main and progress)
    ae.train()
    disc.train()
    warm = int(tc["adv_warmup_steps"])
    aw = float(tc["adv_weight"])
    running = None
    with STOP:
        while step < total and not dist.any(budget.exhausted() or STOP.requested):
            x, _ = random_batch(images, None, bs, gen, flip)
            x = to_layout(random_crop(x, crop_schedule(tc, step), gen).to(device), layout)
            use_adv = aw > 0 and step >= warm
            with autocast(device, precision):
                loss_g, l1, kl, rec = generator_step_loss(dae, x, kl_weight)
                if use_adv:
                    logits_fake = ddisc(to_layout(rec, layout))[-1]
                    g_adv = adv(logits_fake, target_is_real=True, for_discriminator=False)
                    loss_g = loss_g + aw * g_adv
            check_finite(loss_g, "autoencoder loss", step, precision)
            clip_and_step(loss_g, dae, opt_g, scaler_g, tc["grad_clip"])
            sched.step()
            if ema is not None:
                ema.update(ae, step)
            if use_adv:
                with autocast(device, precision):
                    lf = ddisc(to_layout(rec.detach(), layout))[-1]
                    lr_ = ddisc(x)[-1]
                    loss_d = 0.5 * (
                        adv(lf, target_is_real=False, for_discriminator=True)
                        + adv(lr_, target_is_real=True, for_discriminator=True)
                    )
                check_finite(loss_d, "discriminator loss", step, precision)
                clip_and_step(aw * loss_d, ddisc, opt_d, scaler_d, tc["grad_clip"])
            step += 1
            l1v = float(l1.detach())
            running = l1v if running is None else 0.98 * running + 0.02 * l1v
            if step % int(tc["log_every"]) == 0 or step == 1:
                history["l1"].append((step, dist.mean(l1v)))
                history["kl"].append((step, float(kl.detach())))
                if use_adv:
                    history["gen_adv"].append((step, float(g_adv.detach())))
                    history["disc"].append((step, float(loss_d.detach())))
            bar.update(1)
            bar.set_postfix(l1=f"{running:.4f}", min=f"{budget.minutes:.1f}", refresh=False)
            if dist.main and tc["val_every"] and step % int(tc["val_every"]) == 0:
                validate()
            if budget.minutes - last_ckpt >= float(tc["checkpoint_minutes"]):
                checkpoint()
                last_ckpt = budget.minutes
                if dist.main and not progress:  # no bar: one line per checkpoint instead
                    log.info("autoencoder: step %d/%d, loss %.4f, %.1f min", step, total, running, budget.minutes)
    bar.close()
    if stop_agreed(dist):
        checkpoint()
        raise stopped("autoencoder training", step, ckpt_path, dist.main)
    if dist.main and (not val_psnr or val_psnr[-1][0] != step):
        validate()
    checkpoint()
    if dist.main:
        save_loss_curve(work_dir / "loss_autoencoder.png", history, f"{cfg['name']} autoencoder ({precision})")
    l1s = [v for _, v in history["l1"]]
    tail = l1s[-max(1, len(l1s) // 10) :] if l1s else [float("nan")]
    summary = {
        "steps": step,
        "minutes": round(budget.minutes, 2),
        "cpu_minutes": round(budget.cpu_minutes, 2),
        "batch_size": bs,
        "patch_size": tc.get("patch_size"),
        "patch_steps": tc.get("patch_steps"),
        "memory_format": layout,
        "ema_decay": float(tc["ema_decay"]),
        "world_size": dist.world,
        "lr": float(tc["lr"]),
        "precision": precision,
        "kl_weight": float(tc["kl_weight"]),
        "adv_weight": aw,
        "adv_warmup_steps": warm,
        "perceptual_weight": float(tc.get("perceptual_weight", 0.0)),
        "freeze_encoder": bool(tc["freeze_encoder"]),
        "final_l1": round(sum(tail) / len(tail), 5),
        "val_psnr_db": round(val_psnr[-1][1], 2) if val_psnr else None,
        "train_items": int(images.shape[0]),
    }
    final = ema.module if ema is not None else unwrap(ae)
    summary["encoder_sha256"] = encoder_sha256(final)
    return to_layout(final, "contiguous").eval(), summary
