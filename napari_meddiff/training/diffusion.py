"""One training loop for pixel DDPM, latent diffusion and image-conditioned segmentation diffusion:
epsilon (or v / sample) prediction MSE on MONAI's DDPMScheduler forward process."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

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
)
from napari_meddiff.training.conditions import drop_conditions, network_conditioning
from napari_meddiff.training.data import crop_schedule, label_count, random_batch, random_crop
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
from napari_meddiff.training.reporting import save_loss_curve
from napari_meddiff.training.stage_loop import Progress, StageLoop, seeded_generator, tail_mean
from napari_meddiff.training.stopping import STOP

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
    run = DiffusionTraining(cfg, device, dist, work_dir, preview)
    so_far, started_from = run.start(resume)
    run.set_layout(crop_schedule(run.tc, so_far.step) or list((condition if run.seg else x0_data).shape[2:]))
    run.loop = StageLoop(
        "diffusion",
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
    if started_from and (so_far.step >= run.loop.total or run.loop.budget.exhausted()):
        raise MeddiffError(
            f"init_from {run.init['checkpoint']} is already at step {so_far.step} after {so_far.minutes:.1f} min: "
            f"steps ({run.loop.total}) and max_minutes ({max_minutes}) count the run it starts from, so nothing "
            "would be trained; raise them"
        )
    if conditions is not None and conditions.shape[0] != x0_data.shape[0]:
        raise MeddiffError(f"{conditions.shape[0]} condition rows for {x0_data.shape[0]} training items")
    run.train(TrainingItems(x0_data, condition, labels, flip, conditions))
    return run.finish(condition if run.seg else x0_data)


class TrainingItems(NamedTuple):
    """What a diffusion stage draws its batches from."""

    x0: torch.Tensor  # images or scaled latents (not for segmentation); a label-map generator: its maps (N, 1, *S)
    condition: torch.Tensor | None  # segmentation: the images the labels belong to
    labels: torch.Tensor | None  # segmentation: the labels to denoise; a label-map model: the images' maps
    flip: bool  # random left-right flips
    conditions: torch.Tensor | None  # each item's condition values in [0, 1] (a conditional model)


class DiffusionTraining:
    """One run of the diffusion stage: the UNet and its EMA, optimiser, noise schedule, and the checkpoint that
    carries them across resumes (or an earlier run's weights it starts from, ``init_from``)."""

    def __init__(
        self,
        cfg: dict[str, Any],
        device: torch.device,
        dist: Dist,
        work_dir: Path,
        preview: Callable[[torch.nn.Module, int, Path], None] | None,
    ) -> None:
        tc = self.tc = cfg["training"]
        self.cfg, self.device, self.dist, self.work_dir, self.preview = cfg, device, dist, work_dir, preview
        self.seg = cfg["kind"] == "segmentation"
        self.from_labels = cfg.get("label_map") is not None  # the image is denoised given its label map
        self.makes_labels = cfg.get("label_output") is not None  # label maps are denoised (x0: the maps)
        self.num_classes = label_count(cfg) if self.seg or self.from_labels or self.makes_labels else 0
        self.precision = resolve_training_precision(tc["precision"], device)
        self.gen = seeded_generator(int(tc["seed"]), dist.rank, stream=1)
        self.net = build_network("unet", cfg["networks"]["unet"]).to(device)
        self.ema = EMA(self.net, tc["ema_decay"], tc["ema_start"])
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=float(tc["lr"]), weight_decay=float(tc["weight_decay"]))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(int(tc["warmup_steps"])))
        self.scaler = grad_scaler(device, self.precision)
        self.scheduler = noise_scheduler(cfg["scheduler"])
        self.checkpoint_path = work_dir / "diffusion.pt"
        self.batch_size = int(tc["batch_size"])
        self.init: dict[str, Any] | None = None  # where the run started from another run's weights (init_from)
        self.layout_request, self.layout = str(tc["memory_format"]), "contiguous"
        self.processor = processor_identity(device)
        self.loop: StageLoop  # set once the run's progress is known

    def start(self, resume: bool) -> tuple[Progress, bool]:
        """Resume from the work dir's checkpoint, or start from ``training.init_from``, or afresh; then wrap the
        UNet for data parallel training. Returns the progress so far and whether this call started from
        ``init_from``."""
        started_from = False
        if resume and self.checkpoint_path.is_file():
            st = load_checkpoint(self.checkpoint_path)
            self.net.load_state_dict(st["model"])
            self.ema.module.load_state_dict(st["ema"])
            optimisers = {"optimizer": self.opt, "lr_scheduler": self.sched, "scaler": self.scaler}
            load_trainer_state(st, optimisers, "diffusion")
            so_far = Progress.resumed(st, self.gen)
            if self.layout_request == "auto" and st.get("memory_format") in LAYOUTS:
                if st.get("processor") == self.processor:  # keep the run's layout: a switch would change its bits
                    self.layout_request = st["memory_format"]
            self.init = st.get("init_from")
            if self.dist.main:
                log.info("resumed diffusion training at step %d (%.1f min spent)", so_far.step, so_far.minutes)
        elif self.tc.get("init_from"):
            started_from = True
            self.init = _init_from(Path(self.tc["init_from"]), self.net, self.ema, self.cfg)
            so_far = Progress(*self.init.pop("state"))
            if self.dist.main:
                log.info(
                    "started from %s at step %d (%.1f min spent); widened: %s",
                    self.init["checkpoint"],
                    so_far.step,
                    so_far.minutes,
                    ", ".join(self.init["widened"]) or "none",
                )
        else:
            so_far = Progress(history={"loss": []})
        self.ema.module.to(self.device)
        return so_far, started_from

    def set_layout(self, first_crop: list[int]) -> None:
        """Put the UNet and its EMA in the memory layout to train in (for ``auto``, the faster on this machine,
        measured on a batch of ``first_crop``), then wrap the UNet for data parallel training."""
        channels = int(self.cfg["networks"]["unet"]["in_channels"])
        conditioned = bool((self.cfg.get("conditioning") or {}).get("conditions"))
        request = "contiguous" if conditioned and self.layout_request == "auto" else self.layout_request
        self.layout, times = resolve_layout(  # (a conditioned UNet would need its conditions to be timed)
            request,
            lambda net, x: net(x, timesteps=torch.zeros(x.shape[0], dtype=torch.long, device=x.device)).pow(2).mean(),
            self.net,
            (self.batch_size, channels, *first_crop),
            self.device,
            self.precision,
        )
        if self.dist.main and times:
            timed = ", ".join(f"{k} {v:.2f} s/step" for k, v in times.items())
            log.info("diffusion: layout %s (%s)", self.layout, timed)
        self.net, self.ema.module = to_layout(self.net, self.layout), to_layout(self.ema.module, self.layout)
        self.dnet = self.dist.wrap(self.net)

    def train(self, items: TrainingItems) -> None:
        """Train until the steps or minutes are spent or a stop is asked for (then checkpoint and raise)."""
        loop = self.loop
        how = network_conditioning(self.cfg["conditioning"]) if items.conditions is not None else None
        loop.open_bar()
        self.net.train()
        with STOP:
            while loop.goes_on():
                loss = self.train_step(items, how)
                loop.step += 1
                self.ema.update(self.net, loop.step)
                lv = float(loss.detach())
                if loop.logs_now():
                    loop.add_to_history(loss=self.dist.mean(lv))
                loop.step_done("loss", lv)
                if self.preview is not None and loop.validates_now():
                    self.preview(self.ema.module, loop.step, self._preview_path(f"diffusion_step{loop.step:06d}"))
                    self.net.train()
                loop.checkpoint_if_due()
        loop.end()

    def train_step(self, items: TrainingItems, how: Any) -> torch.Tensor:
        """One optimiser step on a random batch: noise it at random timesteps and regress the prediction target.
        Returns the loss."""
        step, device = self.loop.step, self.device
        x0, cond, inp_conditions = self._batch(items, step)
        noise = torch.randn(x0.shape, generator=self.gen).to(device)
        t = torch.randint(0, self.scheduler.num_train_timesteps, (x0.shape[0],), generator=self.gen).to(device)
        xt = self.scheduler.add_noise(original_samples=x0, noise=noise, timesteps=t)
        inp = to_layout(xt if cond is None else torch.cat([xt, cond], dim=1), self.layout)
        extra: dict[str, torch.Tensor] = {}
        if inp_conditions is not None:  # as sampling gives them to the UNet
            inp, extra = unet_inputs(inp, network_conditions(how, inp_conditions, inp))
        with autocast(device, self.precision):
            pred = self.dnet(inp, timesteps=t, **extra)
        loss = F.mse_loss(pred.float(), diffusion_target(self.scheduler, x0, noise, t))
        if not torch.isfinite(loss):  # name what went wrong: the data, the network or the loss
            data = "training data (latents)" if self.cfg["kind"] == "ldm" else "training data"
            check_finite(x0, data, step, self.precision)
            check_finite(pred, "network output", step, self.precision)
            check_finite(loss, "loss", step, self.precision)
        clip_and_step(loss, self.dnet, self.opt, self.scaler, self.tc["grad_clip"])
        self.sched.step()
        return loss

    def _batch(self, items: TrainingItems, step: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """A random batch on the device: (x0 to denoise, image condition or None, condition values or None); of
        ``whole_batch_size`` items in the whole-image steps after ``patch_steps`` (when set)."""
        cb = None
        crop = crop_schedule(self.tc, step)
        size = self.batch_size if crop or not self.tc.get("whole_batch_size") else int(self.tc["whole_batch_size"])
        if items.conditions is not None:
            xb, yb, cb = random_batch(items.x0, items.labels, size, self.gen, items.flip, items.conditions)
            cb = drop_conditions(cb, float(self.cfg["conditioning"]["dropout"]), self.gen)
        else:
            source = items.x0 if not self.seg else items.condition
            xb, yb = random_batch(source, items.labels, size, self.gen, items.flip)
        xb, yb = crop_pair(xb, yb, crop, self.gen)
        if self.makes_labels:  # x0 holds the maps, (B, 1, *S) integers
            return onehot_pm1(xb[:, 0], self.num_classes).to(self.device), None, cb
        if self.seg:
            return onehot_pm1(yb, self.num_classes).to(self.device), xb.to(self.device), cb
        if self.from_labels:
            return xb.to(self.device), onehot_pm1(yb, self.num_classes).to(self.device), cb
        return xb.to(self.device), None, cb

    def _preview_path(self, name: str) -> Path:
        return self.work_dir / "previews" / f"{name}.png"

    def checkpoint(self) -> None:
        """Write the checkpoint (main rank)."""
        if self.dist.main:
            state = {
                **self.loop.progress_fields(),
                "model": unwrap(self.net).state_dict(),
                "ema": self.ema.module.state_dict(),
                "optimizer": self.opt.state_dict(),
                "lr_scheduler": self.sched.state_dict(),
                "scaler": self.scaler.state_dict(),
                "rng": rng_state(self.gen),
                "precision": self.precision,
                "init_from": self.init,
                "memory_format": self.layout,
                "processor": self.processor,
            }
            save_checkpoint(self.checkpoint_path, state)

    def finish(self, train_items: torch.Tensor) -> tuple[torch.nn.Module, dict[str, Any]]:
        """Write the last checkpoint, the loss curve and the final preview; the EMA UNet and the stage's summary
        (``train_items``: what the stage drew its batches from)."""
        loop, tc = self.loop, self.tc
        self.checkpoint()
        if self.dist.main:
            title = f"{self.cfg['name']} diffusion ({self.precision})"
            save_loss_curve(self.work_dir / "loss_diffusion.png", loop.history, title)
            if self.preview is not None:
                self.preview(self.ema.module, loop.step, self._preview_path(f"diffusion_final_step{loop.step:06d}"))
        losses = loop.history["loss"]
        summary = {
            **loop.time_spent(),
            "batch_size": self.batch_size,
            "world_size": self.dist.world,
            "lr": float(tc["lr"]),
            "ema_decay": float(tc["ema_decay"]),
            "precision": self.precision,
            "final_loss": tail_mean(losses),
            "first_loss": round(losses[0][1], 5) if losses else None,
            "objective": f"MSE on {self.cfg['scheduler']['prediction_type']} prediction",
            "patch_size": tc.get("patch_size"),
            "patch_steps": tc.get("patch_steps"),
            "train_items": int(train_items.shape[0]),
            "memory_format": self.layout,
        }
        if self.init is not None:
            summary["init_from"] = self.init
        return to_layout(self.ema.module, "contiguous").eval(), summary


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
