"""One training loop for pixel DDPM, latent diffusion and image-conditioned segmentation diffusion:
epsilon (or v / sample) prediction MSE on MONAI's DDPMScheduler forward process."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from napari_meddiff.diffusion.conditioning import network_conditions, unet_inputs
from napari_meddiff.diffusion.samplers import noise_scheduler
from napari_meddiff.errors import MeddiffError
from napari_meddiff.models import build_network
from napari_meddiff.training.checkpoints import (
    load_checkpoint,
    load_trainer_state,
    load_widened,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from napari_meddiff.training.conditions import drop_conditions, network_conditioning
from napari_meddiff.training.data import crop_schedule, random_batch, random_crop
from napari_meddiff.training.device_setup import autocast, grad_scaler, resolve_precision
from napari_meddiff.training.distributed import Dist, stop_agreed, unwrap
from napari_meddiff.training.optim import EMA, check_finite, clip_and_step, lr_lambda
from napari_meddiff.training.reporting import progress_bar, save_loss_curve
from napari_meddiff.training.stopping import STOP, Budget, stopped

log = logging.getLogger(__name__)


def onehot_pm1(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, *S) int labels -> (B, K, *S) one-hot mapped to {-1, 1} (what the segmentation UNet denoises)."""
    oh = F.one_hot(labels.long(), num_classes).movedim(-1, 1).float()
    return oh * 2.0 - 1.0


def crop_pair(
    x: torch.Tensor, labels: torch.Tensor | None, size: list[int] | None, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The same random window of images ``(B, C, *S)`` and their labels ``(B, *S)`` (unchanged when size is null)."""
    if not size:
        return x, labels
    if labels is None:
        return random_crop(x, size, gen), None
    both = random_crop(torch.cat([x, labels.unsqueeze(1).to(x.dtype)], dim=1), size, gen)
    return both[:, :-1].contiguous(), both[:, -1].round().to(labels.dtype)


def diffusion_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    pt = scheduler.prediction_type
    if pt == "epsilon":
        return noise
    if pt == "sample":
        return x0
    return scheduler.get_velocity(x0, noise, t)


def train_diffusion(
    cfg: dict[str, Any],
    x0_data: torch.Tensor,
    *,
    work_dir: Path,
    device: torch.device,
    dist: Dist,
    resume: bool,
    max_minutes: float | None,
    progress: bool = True,
    condition: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    flip: bool = True,
    preview: Callable[[torch.nn.Module, int, Path], None] | None = None,
    conditions: torch.Tensor | None = None,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train the diffusion UNet of ``cfg`` on ``x0_data`` (images or scaled latents; for segmentation
    ``labels`` are denoised and ``condition`` images are concatenated; ``conditions``: each item's named
    condition values in [0, 1], given to the UNet as the config's ``conditioning`` says, with condition dropout).
    Returns the EMA UNet and a summary."""
    tc = cfg["training"]
    seg = cfg["kind"] == "segmentation"
    num_classes = int(cfg.get("segmentation", {}).get("num_classes", 0))
    precision = resolve_precision(tc["precision"], device)
    torch.manual_seed(int(tc["seed"]) + 1000 * dist.rank)
    gen = torch.Generator().manual_seed(int(tc["seed"]) * 7919 + 17 * dist.rank + 1)

    net = build_network("unet", cfg["networks"]["unet"]).to(device)
    ema = EMA(net, tc["ema_decay"], tc["ema_start"])
    opt = torch.optim.AdamW(net.parameters(), lr=float(tc["lr"]), weight_decay=float(tc["weight_decay"]))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(int(tc["warmup_steps"])))
    scaler = grad_scaler(device, precision)
    scheduler = noise_scheduler(cfg["scheduler"])
    ckpt_path = work_dir / "diffusion.pt"
    step, spent, cpu_spent, history = 0, 0.0, 0.0, {"loss": []}
    init: dict[str, Any] | None = None  # where a run started from another run's weights (init_from)
    started_from = False  # this call starts from init_from (not a resume)
    if resume and ckpt_path.is_file():
        st = load_checkpoint(ckpt_path)
        net.load_state_dict(st["model"])
        ema.module.load_state_dict(st["ema"])
        load_trainer_state(st, {"optimizer": opt, "lr_scheduler": sched, "scaler": scaler}, "diffusion")
        set_rng_state(gen, st["rng"])
        step, spent, history = int(st["step"]), float(st["minutes"]), st["history"]
        cpu_spent = float(st.get("cpu_minutes", 0.0))
        init = st.get("init_from")
        if dist.main:
            log.info("resumed diffusion training at step %d (%.1f min spent)", step, spent)
    elif tc.get("init_from"):
        started_from = True
        init = _init_from(Path(tc["init_from"]), net, ema, cfg)
        step, spent, cpu_spent, history = init.pop("state")
        if dist.main:
            log.info(
                "started from %s at step %d (%.1f min spent); widened: %s",
                init["checkpoint"],
                step,
                spent,
                ", ".join(init["widened"]) or "none",
            )
    ema.module.to(device)
    dnet = dist.wrap(net)
    budget = Budget(max_minutes, spent, cpu_spent)
    total = int(tc["steps"])
    if started_from and (step >= total or budget.exhausted()):
        raise MeddiffError(
            f"init_from {init['checkpoint']} is already at step {step} after {spent:.1f} min: steps "
            f"({total}) and max_minutes ({max_minutes}) count the run it starts from, so nothing "
            "would be trained; raise them"
        )
    bs = int(tc["batch_size"])
    if conditions is not None and conditions.shape[0] != x0_data.shape[0]:
        raise MeddiffError(f"{conditions.shape[0]} condition rows for {x0_data.shape[0]} training items")
    how = network_conditioning(cfg["conditioning"]) if conditions is not None else None
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
                    "model": unwrap(net).state_dict(),
                    "ema": ema.module.state_dict(),
                    "optimizer": opt.state_dict(),
                    "lr_scheduler": sched.state_dict(),
                    "scaler": scaler.state_dict(),
                    "rng": rng_state(gen),
                    "precision": precision,
                    "init_from": init,
                },
            )

    bar = progress_bar(total, step, f"{cfg['name']} diffusion", dist.main and progress)
    running = None
    net.train()
    with STOP:
        while step < total and not dist.any(budget.exhausted() or STOP.requested):
            if conditions is not None:
                xb, yb, cb = random_batch(x0_data, None, bs, gen, flip, conditions)
                cb = drop_conditions(cb, float(cfg["conditioning"]["dropout"]), gen)
            else:
                xb, yb = random_batch(x0_data if not seg else condition, labels, bs, gen, flip)
            xb, yb = crop_pair(xb, yb, crop_schedule(tc, step), gen)
            if seg:
                cond, x0 = xb.to(device), onehot_pm1(yb, num_classes).to(device)
            else:
                cond, x0 = None, xb.to(device)
            noise = torch.randn(x0.shape, generator=gen).to(device)
            t = torch.randint(0, scheduler.num_train_timesteps, (x0.shape[0],), generator=gen).to(device)
            xt = scheduler.add_noise(original_samples=x0, noise=noise, timesteps=t)
            inp = xt if cond is None else torch.cat([xt, cond], dim=1)
            extra: dict[str, torch.Tensor] = {}
            if conditions is not None:  # as sampling gives them to the UNet
                inp, extra = unet_inputs(inp, network_conditions(how, cb, inp))
            with autocast(device, precision):
                pred = dnet(inp, timesteps=t, **extra)
            loss = F.mse_loss(pred.float(), diffusion_target(scheduler, x0, noise, t))
            if not torch.isfinite(loss):  # name what went wrong: the data, the network or the loss
                check_finite(
                    x0, "training data (latents)" if cfg["kind"] == "ldm" else "training data", step, precision
                )
                check_finite(pred, "network output", step, precision)
                check_finite(loss, "loss", step, precision)
            clip_and_step(loss, dnet, opt, scaler, tc["grad_clip"])
            sched.step()
            step += 1
            ema.update(net, step)
            lv = float(loss.detach())
            running = lv if running is None else 0.98 * running + 0.02 * lv
            if step % int(tc["log_every"]) == 0 or step == 1:
                history["loss"].append((step, dist.mean(lv)))
            bar.update(1)
            bar.set_postfix(loss=f"{running:.4f}", min=f"{budget.minutes:.1f}", refresh=False)
            if dist.main and preview is not None and tc["val_every"] and step % int(tc["val_every"]) == 0:
                preview(ema.module, step, work_dir / "previews" / f"diffusion_step{step:06d}.png")
                net.train()
            if budget.minutes - last_ckpt >= float(tc["checkpoint_minutes"]):
                checkpoint()
                last_ckpt = budget.minutes
                if dist.main and not progress:  # no bar: one line per checkpoint instead
                    log.info("diffusion: step %d/%d, loss %.4f, %.1f min", step, total, running, budget.minutes)
    bar.close()
    checkpoint()
    if stop_agreed(dist):
        raise stopped("diffusion training", step, ckpt_path, dist.main)
    if dist.main:
        save_loss_curve(work_dir / "loss_diffusion.png", history, f"{cfg['name']} diffusion ({precision})")
        if preview is not None:
            preview(ema.module, step, work_dir / "previews" / f"diffusion_final_step{step:06d}.png")
    losses = [v for _, v in history["loss"]]
    tail = losses[-max(1, len(losses) // 10) :] if losses else [float("nan")]
    summary = {
        "steps": step,
        "minutes": round(budget.minutes, 2),
        "cpu_minutes": round(budget.cpu_minutes, 2),
        "batch_size": bs,
        "world_size": dist.world,
        "lr": float(tc["lr"]),
        "ema_decay": float(tc["ema_decay"]),
        "precision": precision,
        "final_loss": round(sum(tail) / len(tail), 5),
        "first_loss": round(losses[0], 5) if losses else None,
        "objective": f"MSE on {cfg['scheduler']['prediction_type']} prediction",
        "patch_size": tc.get("patch_size"),
        "patch_steps": tc.get("patch_steps"),
        "train_items": int((condition if seg else x0_data).shape[0]),
    }
    if init is not None:
        summary["init_from"] = init
    return ema.module.eval(), summary


def _init_from(path: Path, net: torch.nn.Module, ema: EMA, cfg: dict[str, Any]) -> dict[str, Any]:
    """Start from the EMA weights of an earlier run's ``diffusion.pt``, or from a model folder's UNet (its steps,
    minutes and loss history carry on; a fresh optimiser warms up again). A segmentation model may take more
    context slices than the earlier one: its image channels go to the middle, the new neighbours start at zero."""
    st = _model_folder_state(path, cfg) if path.is_dir() else load_checkpoint(path)
    n = int(cfg.get("segmentation", {}).get("num_classes", 0))
    new_in = int(cfg["networks"]["unet"]["in_channels"])
    old_in = int(st["ema"]["conv_in.conv.weight"].shape[1]) if "conv_in.conv.weight" in st["ema"] else new_in
    shift = (new_in - old_in) // 2 if cfg["kind"] == "segmentation" else 0

    def channel_map(i: int) -> int:  # labels keep their channels; image channels move to the middle
        return i if i < n else i + shift

    widened = load_widened(net, st["ema"], channel_map)
    ema.module.load_state_dict(net.state_dict())
    state = (int(st["step"]), float(st["minutes"]), float(st.get("cpu_minutes", 0.0)), st["history"])
    return {
        "checkpoint": str(path),
        "step": state[0],
        "minutes": round(state[1], 2),
        "cpu_minutes": round(state[2], 2),
        "widened": widened,
        **st.get("source", {}),
        "state": state,
    }


def _model_folder_state(folder: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """A model folder (``model.json`` + safetensors, sha256-checked) read as the parts of a ``diffusion.pt`` that
    ``init_from`` uses: its UNet's weights and the steps and minutes its training took (no loss history: a folder
    keeps none). The folder must be the same kind of model with the same UNet (but for a segmentation model's
    input channels) and noise schedule; the image shape and voxel size may differ."""
    from napari_meddiff.models.folder import FORMAT

    if not FORMAT.detect(folder):
        raise MeddiffError(f"init_from: {folder} has no model.json; give a diffusion.pt or a meddiff model folder")
    config = FORMAT.read_config(folder)
    where = f"init_from: {folder}"
    if config["kind"] != cfg["kind"]:
        raise MeddiffError(f"{where} is a {config['kind']} model; this config trains a {cfg['kind']} model")
    if config["kind"] == "ldm":
        raise MeddiffError(
            f"{where}: a latent model's UNet belongs to its own autoencoder's latent space, which "
            "this run would train anew; start from a ddpm or segmentation folder, or a diffusion.pt"
        )
    ignore = {"in_channels"} if cfg["kind"] == "segmentation" else set()
    for part, theirs, ours in (
        ("networks.unet", config["networks"]["unet"], cfg["networks"]["unet"]),
        ("scheduler", config.get("scheduler", {}), cfg.get("scheduler", {})),
    ):
        differ = sorted(k for k in set(theirs) & set(ours) - ignore if theirs[k] != ours[k])
        if differ:
            raise MeddiffError(
                f"{where}: its {part} differs from this config's in "
                + ", ".join(f"{k} ({theirs[k]!r} there, {ours[k]!r} here)" for k in differ)
            )
    unet = FORMAT.load_networks(folder, config)["unet"]
    stage = (config.get("training") or {}).get("diffusion") or {}
    weights = config["weights"]["unet"]
    return {
        "ema": unet.state_dict(),
        "step": int(stage.get("steps", 0)),
        "minutes": float(stage.get("minutes", 0.0)),
        "cpu_minutes": float(stage.get("cpu_minutes", 0.0)),
        "history": {"loss": []},
        "source": {"weights_sha256": weights["sha256"], "weights_dtype": weights.get("dtype", "float32")},
    }
