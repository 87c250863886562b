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
from napari_meddiff.training.checkpoints import load_checkpoint, load_trainer_state, rng_state, save_checkpoint
from napari_meddiff.training.data import crop_schedule, random_batch, random_crop
from napari_meddiff.training.device_setup import (
    LAYOUTS,
    autocast,
    grad_scaler,
    processor_identity,
    resolve_layout,
    resolve_training_precision,
    to_layout,
)
from napari_meddiff.training.distributed import Dist, unwrap
from napari_meddiff.training.optim import EMA, check_finite, clip_and_step, lr_lambda
from napari_meddiff.training.reporting import psnr, save_grid, save_loss_curve
from napari_meddiff.training.stage_loop import Progress, StageLoop, seeded_generator, tail_mean
from napari_meddiff.training.stopping import STOP

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
    """Train the autoencoder of ``cfg`` on ``images`` (validated on ``val_images``), from the checkpoint in
    ``work_dir`` when ``resume``. Returns the (EMA) autoencoder, contiguous and in eval mode, and a summary."""
    run = AutoencoderTraining(cfg, device, dist, work_dir)
    if resume and run.checkpoint_path.is_file():
        so_far = run.resume(load_checkpoint(run.checkpoint_path))
    else:
        so_far = Progress(history={"l1": [], "kl": [], "gen_adv": [], "disc": []})
    if run.tc["freeze_encoder"]:
        run.train_decoder_only()
    run.set_layout(crop_schedule(run.tc, so_far.step) or list(images.shape[2:]))
    run.loop = StageLoop(
        "autoencoder",
        cfg["name"],
        run.tc,
        dist,
        so_far,
        max_minutes=max_minutes,
        checkpoint_path=run.checkpoint_path,
        save=run.checkpoint,
        show_progress=progress,
        log=log,
    )
    run.train(images, val_images)
    return run.finish(images, val_images)


class AutoencoderTraining:
    """One run of the autoencoder stage: the AutoencoderKL (and its EMA), the patch discriminator, their optimisers,
    and the checkpoint that carries them across resumes."""

    def __init__(self, cfg: dict[str, Any], device: torch.device, dist: Dist, work_dir: Path) -> None:
        from monai.losses import PatchAdversarialLoss
        from monai.networks.nets import PatchDiscriminator

        tc = self.tc = cfg["autoencoder_training"]
        self.cfg, self.device, self.dist, self.work_dir = cfg, device, dist, work_dir
        self.flip = bool(cfg["data"].get("flip", True))
        self.precision = resolve_training_precision(tc["precision"], device)
        self.gen = seeded_generator(int(tc["seed"]), dist.rank, stream=2)
        self.ae = build_network("autoencoder", cfg["networks"]["autoencoder"]).to(device)
        self.ema = EMA(self.ae, tc["ema_decay"], tc["ema_start"]) if float(tc["ema_decay"]) > 0 else None
        self.disc = PatchDiscriminator(
            spatial_dims=int(cfg["spatial_dims"]),
            num_layers_d=int(tc["disc_layers"]),
            channels=int(tc["disc_channels"]),
            in_channels=1,
            out_channels=1,
            norm="INSTANCE",
        ).to(device)
        self.adv = PatchAdversarialLoss(criterion="least_squares")
        self.opt_g = torch.optim.Adam(self.ae.parameters(), lr=float(tc["lr"]))
        self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=float(tc["disc_lr"]))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt_g, lr_lambda(int(tc["warmup_steps"])))
        self.scaler_g = grad_scaler(device, self.precision)
        self.scaler_d = grad_scaler(device, self.precision)
        self.checkpoint_path = work_dir / "autoencoder.pt"
        self.val_psnr: list = []
        self.layout_request = str(tc["memory_format"])
        self.processor = processor_identity(device)
        self.batch_size, self.kl_weight = int(tc["batch_size"]), float(tc["kl_weight"])
        self.adv_weight, self.adv_warmup = float(tc["adv_weight"]), int(tc["adv_warmup_steps"])
        self.layout: str  # set_layout
        self.loop: StageLoop  # set once the run's progress and layout are known

    def resume(self, st: dict[str, Any]) -> Progress:
        """Load checkpoint ``st``: networks, EMA, optimisers, RNG, validation PSNRs and (for ``auto``, on the same
        processor) the run's memory layout. Returns its progress."""
        if self.layout_request == "auto" and st.get("memory_format") in LAYOUTS:
            if st.get("processor") in (None, self.processor):  # None: checkpoints from before it was recorded
                self.layout_request = st["memory_format"]  # keep the run's layout: a switch would change its bits
            elif self.dist.main:
                log.info(
                    "resumed on another processor (%s, was %s): measuring the layout again",
                    self.processor,
                    st["processor"],
                )
        self.ae.load_state_dict(st["model"])
        if self.ema is not None:
            self.ema.module.load_state_dict(st["ema"] if st.get("ema") is not None else st["model"])
        self.disc.load_state_dict(st["discriminator"])
        optimisers = {"optimizer": self.opt_g, "optimizer_d": self.opt_d, "lr_scheduler": self.sched}
        load_trainer_state(st, optimisers, "autoencoder")
        so_far = Progress.resumed(st, self.gen)
        self.val_psnr = st["val_psnr"]
        if self.dist.main:
            log.info("resumed autoencoder training at step %d (%.1f min spent)", so_far.step, so_far.minutes)
        return so_far

    def train_decoder_only(self) -> None:
        """Freeze the encoder (`freeze_encoder`) so that the latents stay as they are."""
        n = freeze_encoder(self.ae, self.ema)
        if self.dist.main:
            log.info(
                "autoencoder: decoder only (%d encoder tensors frozen, encoder sha256 %s…)",
                n,
                encoder_sha256(self.ae)[:12],
            )

    def set_layout(self, first_crop: list[int]) -> None:
        """Put the networks in the memory layout to train in (measured on crops of ``first_crop`` for ``auto``)
        and wrap them for data parallel training."""
        self.layout, layout_times = resolve_layout(
            self.layout_request,
            lambda net, x: generator_step_loss(net, x, self.kl_weight)[0],
            self.ae,
            (self.batch_size, 1, *first_crop),
            self.device,
            self.precision,
        )
        if self.dist.main:
            log.info(
                "autoencoder: %s, %s layout %s",
                self.precision,
                self.layout,
                ", ".join(f"{k} {v:.2f} s/step" for k, v in layout_times.items()) or "(as configured)",
            )
        self.ae, self.disc = to_layout(self.ae, self.layout), to_layout(self.disc, self.layout)
        if self.ema is not None:
            self.ema.module = to_layout(self.ema.module, self.layout)
        self.dae, self.ddisc = self.dist.wrap(self.ae), self.dist.wrap(self.disc)

    def train(self, images: torch.Tensor, val_images: torch.Tensor | None) -> None:
        """Train until the steps or minutes are spent or a stop is asked for (then checkpoint and raise)."""
        loop = self.loop
        loop.open_bar()
        self.ae.train()
        self.disc.train()
        with STOP:
            while loop.goes_on():
                l1, kl, g_adv, loss_d = self.train_step(images)
                loop.step += 1
                l1v = float(l1.detach())
                if loop.logs_now():
                    loop.add_to_history(l1=self.dist.mean(l1v), kl=float(kl.detach()))
                    if g_adv is not None:
                        loop.add_to_history(gen_adv=float(g_adv.detach()), disc=float(loss_d.detach()))
                loop.step_done("l1", l1v)
                if loop.validates_now():
                    self.validate(val_images)
                loop.checkpoint_if_due()
        loop.end()

    def train_step(
        self, images: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """One generator step (and, after the adversarial warm-up, one discriminator step) on a random batch.
        Returns the L1 and KL terms and the adversarial losses (None before the warm-up ends)."""
        step, tc, layout = self.loop.step, self.tc, self.layout
        x, _ = random_batch(images, None, self.batch_size, self.gen, self.flip)
        x = to_layout(random_crop(x, crop_schedule(tc, step), self.gen).to(self.device), layout)
        use_adv = self.adv_weight > 0 and step >= self.adv_warmup
        with autocast(self.device, self.precision):
            loss_g, l1, kl, rec = generator_step_loss(self.dae, x, self.kl_weight)
            if use_adv:
                logits_fake = self.ddisc(to_layout(rec, layout))[-1]
                g_adv = self.adv(logits_fake, target_is_real=True, for_discriminator=False)
                loss_g = loss_g + self.adv_weight * g_adv
        check_finite(loss_g, "autoencoder loss", step, self.precision)
        clip_and_step(loss_g, self.dae, self.opt_g, self.scaler_g, tc["grad_clip"])
        self.sched.step()
        if self.ema is not None:
            self.ema.update(self.ae, step)
        if not use_adv:
            return l1, kl, None, None
        with autocast(self.device, self.precision):
            lf = self.ddisc(to_layout(rec.detach(), layout))[-1]
            lr_ = self.ddisc(x)[-1]
            loss_d = 0.5 * (
                self.adv(lf, target_is_real=False, for_discriminator=True)
                + self.adv(lr_, target_is_real=True, for_discriminator=True)
            )
        check_finite(loss_d, "discriminator loss", step, self.precision)
        clip_and_step(self.adv_weight * loss_d, self.ddisc, self.opt_d, self.scaler_d, tc["grad_clip"])
        return l1, kl, g_adv, loss_d

    def trained(self) -> torch.nn.Module:
        """The autoencoder that validation and export use: the EMA when there is one."""
        return self.ema.module if self.ema is not None else unwrap(self.ae)

    def validate(self, val_images: torch.Tensor | None) -> None:
        """PSNR of the validation reconstructions (kept with the step) and a preview PNG of two of them."""
        if val_images is None:
            return
        step = self.loop.step
        with torch.random.fork_rng(devices=[]):  # validation leaves the training RNG as it was
            rec = reconstruct(self.trained(), val_images, self.device)
        p = float(np.mean([psnr(r.clamp(0, 1), v) for r, v in zip(rec, val_images)]))
        self.val_psnr.append((step, p))
        save_grid(
            self.work_dir / "previews" / f"autoencoder_step{step:06d}.png",
            [[v[0].numpy() for v in val_images[:2]], [r[0].clamp(0, 1).numpy() for r in rec[:2]]],
            f"{self.cfg['name']} AE step {step}: top real, bottom reconstruction; PSNR {p:.2f} dB",
        )
        self.ae.train()

    def checkpoint(self) -> None:
        """Write the checkpoint and the loss curve JSON (main rank)."""
        if not self.dist.main:
            return
        loop = self.loop
        state = {
            **loop.progress_fields(),
            "val_psnr": self.val_psnr,
            "model": unwrap(self.ae).state_dict(),
            "discriminator": unwrap(self.disc).state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "optimizer": self.opt_g.state_dict(),
            "optimizer_d": self.opt_d.state_dict(),
            "lr_scheduler": self.sched.state_dict(),
            "rng": rng_state(self.gen),
            "precision": self.precision,
            "memory_format": self.layout,
            "processor": self.processor,
        }
        save_checkpoint(self.checkpoint_path, state)
        curve_header = {
            "step": loop.step,
            "minutes": round(loop.budget.minutes, 2),
            "cpu_minutes": round(loop.budget.cpu_minutes, 2),
            "precision": self.precision,
            "memory_format": self.layout,
        }
        write_curve(self.work_dir / "autoencoder_curve.json", loop.history, self.val_psnr, curve_header)

    def finish(self, images: torch.Tensor, val_images: torch.Tensor | None) -> tuple[torch.nn.Module, dict[str, Any]]:
        """Validate at the last step, write the last checkpoint and the loss curve; the trained autoencoder and
        the stage's summary."""
        loop, tc = self.loop, self.tc
        if self.dist.main and (not self.val_psnr or self.val_psnr[-1][0] != loop.step):
            self.validate(val_images)
        self.checkpoint()
        if self.dist.main:
            title = f"{self.cfg['name']} autoencoder ({self.precision})"
            save_loss_curve(self.work_dir / "loss_autoencoder.png", loop.history, title)
        summary = {
            **loop.time_spent(),
            "batch_size": self.batch_size,
            "patch_size": tc.get("patch_size"),
            "patch_steps": tc.get("patch_steps"),
            "memory_format": self.layout,
            "ema_decay": float(tc["ema_decay"]),
            "world_size": self.dist.world,
            "lr": float(tc["lr"]),
            "precision": self.precision,
            "kl_weight": float(tc["kl_weight"]),
            "adv_weight": self.adv_weight,
            "adv_warmup_steps": self.adv_warmup,
            "perceptual_weight": float(tc.get("perceptual_weight", 0.0)),
            "freeze_encoder": bool(tc["freeze_encoder"]),
            "final_l1": tail_mean(loop.history["l1"]),
            "val_psnr_db": round(self.val_psnr[-1][1], 2) if self.val_psnr else None,
            "train_items": int(images.shape[0]),
        }
        final = self.trained()
        summary["encoder_sha256"] = encoder_sha256(final)
        return to_layout(final, "contiguous").eval(), summary
