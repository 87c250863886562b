"""Interchangeable samplers: DDPM, DDIM (MONAI) and DPM-Solver++ (2M) over a model's noise schedule, and
rectified flow (MONAI's RFlowScheduler) for models trained with it.

Every sampler has ``timesteps`` (descending: a LongTensor, or floats for a rectified flow's continuous time) and
``step(model_output, t, sample, generator) -> (prev_sample, pred_x0)``, like MONAI's schedulers, plus
``add_noise`` (forward process) used by inpainting to re-noise the known region.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler, Scheduler

from napari_meddiff.choices import SAMPLER_SCHEDULE, SAMPLERS, schedule_type
from napari_meddiff.errors import MeddiffError
from napari_meddiff.models.schema import RFLOW_FIELDS

# the scheduler block's keys for a rectified flow: MONAI RFlowScheduler's arguments, timestep transform included
RFLOW_KEYS = ("num_train_timesteps", *RFLOW_FIELDS)


def _evenly_strided(num_train: int, steps: int) -> torch.Tensor:
    """Descending timesteps with a constant stride (so MONAI DDIM's ``t - T // K`` is the true next step)."""
    stride = num_train // steps
    return (torch.arange(steps - 1, -1, -1) * stride).long()


def _schedule_kwargs(schedule: dict[str, Any]) -> dict[str, Any]:
    kwargs = {k: v for k, v in schedule.items() if k in ("num_train_timesteps", "schedule", "beta_start", "beta_end")}
    kwargs.setdefault("schedule", "scaled_linear_beta")
    return kwargs


def rescale_to_zero_terminal_snr(scheduler: Scheduler) -> Scheduler:
    """Rescale a MONAI scheduler's betas so that the last timestep is pure noise (Lin et al. 2024, "Common
    diffusion noise schedules and sample steps are flawed", algorithm 1; diffusers' ``rescale_betas_zero_snr``):
    sqrt(alphas_cumprod) is shifted to end at 0 and scaled to keep its first value.

    Why: a schedule made for small latents leaves a large volume's coarse content readable at t = T (a 2 mm brain
    map under scaled_linear_beta: whole-brain signal-to-noise 2 at T), so a network learns to read the brain's
    outline off its input there, and from pure noise at sampling time it reads shapes into random fluctuations."""
    root = scheduler.alphas_cumprod.double().sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    alphas_cumprod = root**2
    alphas = torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    scheduler.betas = (1 - alphas).float()
    scheduler.alphas = alphas.float()
    scheduler.alphas_cumprod = alphas_cumprod.float()
    return scheduler


def _schedule(scheduler: Scheduler, schedule: dict[str, Any]) -> Scheduler:
    return rescale_to_zero_terminal_snr(scheduler) if schedule.get("zero_terminal_snr") else scheduler


def noise_scheduler(schedule: dict[str, Any]) -> DDPMScheduler:
    """The training-time (forward process) scheduler of a model."""
    scheduler = DDPMScheduler(
        **_schedule_kwargs(schedule),
        prediction_type=schedule.get("prediction_type", "epsilon"),
        clip_sample=bool(schedule.get("clip_sample", False)),
    )
    return _schedule(scheduler, schedule)


class DDIMSampler:
    """MONAI's DDIM on evenly strided timesteps; ``eta=1`` is ancestral DDPM on the strided chain."""

    def __init__(self, schedule: dict[str, Any], steps: int, eta: float = 0.0) -> None:
        self.scheduler = DDIMScheduler(
            **_schedule_kwargs(schedule),
            prediction_type=schedule.get("prediction_type", "epsilon"),
            clip_sample=bool(schedule.get("clip_sample", False)),
        )
        _schedule(self.scheduler, schedule)
        self.scheduler.set_timesteps(steps)
        self.scheduler.timesteps = _evenly_strided(self.scheduler.num_train_timesteps, steps)
        self.timesteps = self.scheduler.timesteps
        self.eta = float(eta)

    def step(self, model_output: torch.Tensor, t: int, sample: torch.Tensor, generator=None):
        return self.scheduler.step(model_output, int(t), sample, eta=self.eta, generator=generator)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
        return _add_noise(self.scheduler, x0, noise, t)


class DDPMSampler:
    """MONAI's DDPM at the full training length; shorter chains use strided ancestral sampling (DDIM eta=1)."""

    def __init__(self, schedule: dict[str, Any], steps: int) -> None:
        num_train = int(schedule.get("num_train_timesteps", 1000))
        if steps >= num_train:
            self._inner = None
            self.scheduler = noise_scheduler(schedule)
            self.scheduler.set_timesteps(num_train)
            self.timesteps = self.scheduler.timesteps
        else:
            self._inner = DDIMSampler(schedule, steps, eta=1.0)
            self.scheduler = self._inner.scheduler
            self.timesteps = self._inner.timesteps

    def step(self, model_output: torch.Tensor, t: int, sample: torch.Tensor, generator=None):
        if self._inner is not None:
            return self._inner.step(model_output, t, sample, generator)
        return self.scheduler.step(model_output, int(t), sample, generator=generator)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
        return _add_noise(self.scheduler, x0, noise, t)


class DPMSolverPP2MSampler:
    """Multistep DPM-Solver++ (2M, data prediction), Lu et al. 2022, on MONAI's noise schedule.

    MONAI has no DPM-Solver; this follows the update of the reference implementation / diffusers'
    ``DPMSolverMultistepScheduler`` (``algorithm_type="dpmsolver++"``, ``solver_order=2``, midpoint),
    deterministic, with a first-order final step ("lower_order_final").
    """

    def __init__(self, schedule: dict[str, Any], steps: int) -> None:
        self.scheduler: Scheduler = noise_scheduler(schedule)
        self.prediction_type = schedule.get("prediction_type", "epsilon")
        self.clip_sample = bool(schedule.get("clip_sample", False))
        num_train = self.scheduler.num_train_timesteps
        # "trailing"-free linspace spacing, as diffusers' default for DPM-Solver
        self.timesteps = torch.linspace(num_train - 1, 0, steps + 1).round().long()[:-1]
        ac = self.scheduler.alphas_cumprod.double()
        self._alpha = ac.sqrt()
        self._sigma = (1 - ac).sqrt()
        self._lambda = torch.log(self._alpha) - torch.log(self._sigma)
        self._prev_x0: torch.Tensor | None = None
        self._prev_t: int | None = None
        self._index = 0

    def _x0(self, model_output: torch.Tensor, t: int, sample: torch.Tensor) -> torch.Tensor:
        a, s = self._alpha[t].to(sample.dtype), self._sigma[t].to(sample.dtype)
        if self.prediction_type == "epsilon":
            x0 = (sample - s * model_output) / a
        elif self.prediction_type == "v_prediction":
            x0 = a * sample - s * model_output
        else:
            x0 = model_output
        return x0.clamp(-1, 1) if self.clip_sample else x0

    def step(self, model_output: torch.Tensor, t: int, sample: torch.Tensor, generator=None):
        t = int(t)
        x0 = self._x0(model_output, t, sample)
        i = self._index
        last = i == len(self.timesteps) - 1
        if last:
            # the final step lands on the clean data estimate
            prev = x0
        else:
            s = int(self.timesteps[i + 1])
            lam_t, lam_s = self._lambda[t], self._lambda[s]
            h = lam_s - lam_t
            ratio = (self._sigma[s] / self._sigma[t]).to(sample.dtype)
            coeff = (self._alpha[s] * torch.expm1(-h)).to(sample.dtype)
            if self._prev_x0 is None or len(self.timesteps) < 15 and i == len(self.timesteps) - 2:
                d = x0  # first order (DPM-Solver++ 1 == DDIM)
            else:
                h_prev = lam_t - self._lambda[self._prev_t]
                r = (h_prev / h).to(sample.dtype)
                d = x0 + (x0 - self._prev_x0) / (2 * r)
            prev = ratio * sample - coeff * d
        self._prev_x0, self._prev_t = x0, t
        self._index += 1
        return prev, x0

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
        return _add_noise(self.scheduler, x0, noise, t)


class RFlowSampler:
    """Rectified flow with MONAI's `RFlowScheduler`: Euler steps along the predicted velocity from t = T (noise)
    towards 0, the last one onto the clean estimate, as MONAI's inferers and MAISI run it.

    ``spatial_shape``: the sample's spatial sides, for the timestep transform (``use_timestep_transform``: more
    of the steps at the noisy end for a volume larger than ``base_img_size_numel``)."""

    def __init__(self, schedule: dict[str, Any], steps: int, spatial_shape: Sequence[int] | None = None) -> None:
        self.scheduler = RFlowScheduler(**{k: schedule[k] for k in RFLOW_KEYS if k in schedule})
        numel = math.prod(int(s) for s in spatial_shape) if spatial_shape else None
        if self.scheduler.use_timestep_transform and numel is None:
            raise MeddiffError("the rectified flow's timestep transform needs the sample's spatial shape")
        self.scheduler.set_timesteps(steps, input_img_size_numel=numel)
        self.timesteps = self.scheduler.timesteps
        self._index = 0

    def step(self, model_output: torch.Tensor, t: float, sample: torch.Tensor, generator=None):
        i = self._index
        next_t = self.timesteps[i + 1].item() if i + 1 < len(self.timesteps) else 0
        self._index += 1
        return self.scheduler.step(model_output, t, sample, next_t)

    def rewind(self, index: int) -> None:
        self._index = index

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: float) -> torch.Tensor:
        return self.scheduler.add_noise(x0, noise, torch.full((x0.shape[0],), float(t)))


def _add_noise(scheduler: Scheduler, x0: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
    return scheduler.add_noise(x0, noise, torch.full((x0.shape[0],), int(t), dtype=torch.long))


def check_eta(eta: float) -> float:
    """DDIM's eta scales the posterior noise: 0 (deterministic) to 1 (DDPM); anything else diverges."""
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= float(eta) <= 1.0:
        raise MeddiffError(f"eta must be a number from 0 (deterministic DDIM) to 1 (DDPM-like), got {eta!r}")
    return float(eta)


SCHEDULE_NAMES = {"ddpm": "a DDPM noise schedule", "rflow": "rectified flow"}


def check_sampler(name: str, schedule: dict[str, Any], model_name: str = "this model") -> None:
    """A known sampler that fits the schedule the model was trained with (rflow only for rectified flow)."""
    if name not in SAMPLERS:
        raise MeddiffError(f"unknown sampler {name!r} (choose from {', '.join(SAMPLERS)})")
    have, need = schedule_type(schedule), SAMPLER_SCHEDULE[name]
    if have not in SCHEDULE_NAMES:
        raise MeddiffError(f"{model_name}: unknown scheduler type {have!r} (known: {', '.join(SCHEDULE_NAMES)})")
    if have != need:
        fitting = " or ".join(s for s in SAMPLERS if SAMPLER_SCHEDULE[s] == have)
        raise MeddiffError(
            f"sampler {name} is for models trained with {SCHEDULE_NAMES[need]}; {model_name} was trained with "
            f"{SCHEDULE_NAMES[have]}: use {fitting}"
        )


def make_sampler(
    name: str, schedule: dict[str, Any], steps: int, eta: float = 0.0, spatial_shape: Sequence[int] | None = None
):
    """Build a fresh sampler (samplers keep state: one per chain); ``spatial_shape``: the sample's spatial sides
    (a rectified flow's timestep transform needs them)."""
    check_sampler(name, schedule)
    num_train = int(schedule.get("num_train_timesteps", 1000))
    if not isinstance(steps, int) or steps < 1:
        raise MeddiffError(f"steps must be a positive integer, got {steps!r}")
    if steps > num_train:
        raise MeddiffError(f"steps ({steps}) cannot exceed the model's {num_train} training timesteps")
    check_eta(eta)
    if name == "ddpm":
        return DDPMSampler(schedule, steps)
    if name == "ddim":
        return DDIMSampler(schedule, steps, eta)
    if name == "rflow":
        return RFlowSampler(schedule, steps, spatial_shape)
    return DPMSolverPP2MSampler(schedule, steps)
