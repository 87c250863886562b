"""The one denoising loop behind every task (generate, inpaint, segment) and every sampler.

Hooks: ``condition`` (channels concatenated to the UNet input), ``known`` (known-region replacement after
each step, for inpainting), ``on_step`` (progress / preview) and ``should_cancel`` (checked before every
network evaluation). A batch holds one sampler state and one random generator per sample, so a seed gives
the same chain whatever the batch it runs in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Callable, Protocol, Sequence

import torch

from .errors import Cancelled, MeddiffError
from .samplers import make_sampler
from .zoo import DiffusionModel

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclasses.dataclass
class StepInfo:
    """What the loop reports after each step."""

    index: int  # 1-based count of finished steps
    total: int
    timestep: int
    pred_x0: torch.Tensor  # current estimate of the clean sample (latent space for an LDM)
    elapsed: float  # seconds since the chain started

    @property
    def eta_seconds(self) -> float:
        return self.elapsed / self.index * (self.total - self.index)


class KnownRegionHook(Protocol):
    def __call__(self, x: torch.Tensor, t_next: int | None, samplers: Sequence, generators: Sequence) -> torch.Tensor:
        ...


def seeded_generators(seeds: Sequence[int], device: torch.device) -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def initial_noise(shape: Sequence[int], generators: Sequence[torch.Generator], device: torch.device) -> torch.Tensor:
    """Standard normal noise of ``(len(generators), *shape)``, each sample from its own generator."""
    return torch.stack([torch.randn(tuple(shape), generator=g, device=device) for g in generators])


def autocast_context(device: torch.device, precision: str):
    if precision not in PRECISIONS:
        raise MeddiffError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if device.type == "cpu" and precision == "fp16":
        raise MeddiffError("fp16 is for CUDA; use bf16 on CPU")
    return torch.autocast(device_type=device.type, dtype=dtype)


def denoise(
    model: DiffusionModel,
    x: torch.Tensor,
    *,
    sampler: str = "dpm++",
    steps: int = 20,
    generators: Sequence[torch.Generator],
    eta: float = 0.0,
    condition: torch.Tensor | None = None,
    known: KnownRegionHook | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    precision: str = "fp32",
) -> torch.Tensor:
    """Run the reverse diffusion chain from ``x`` (noise, shape ``(B, *model.sample_shape)``) to a clean sample."""
    if len(generators) != x.shape[0]:
        raise MeddiffError("one random generator per sample is needed")
    chains = [make_sampler(sampler, model.config["scheduler"], steps, eta) for _ in range(x.shape[0])]
    timesteps = chains[0].timesteps
    device = x.device
    start = time.perf_counter()
    with torch.inference_mode():
        for i, t in enumerate(timesteps):
            if should_cancel is not None and should_cancel():
                raise Cancelled()
            net_in = x if condition is None else torch.cat([x, condition.to(x.dtype)], dim=1)
            t_batch = torch.full((x.shape[0],), int(t), device=device, dtype=torch.long)
            with autocast_context(device, precision):
                out = model.unet(net_in, timesteps=t_batch)
            out = out.float()
            stepped = [chain.step(out[b : b + 1], int(t), x[b : b + 1], gen) for b, (chain, gen) in enumerate(zip(chains, generators))]
            x = torch.cat([s[0] for s in stepped])
            pred_x0 = torch.cat([s[1] for s in stepped])
            t_next = int(timesteps[i + 1]) if i + 1 < len(timesteps) else None
            if known is not None:
                x = known(x, t_next, chains, generators)
            if on_step is not None:
                on_step(StepInfo(i + 1, len(timesteps), int(t), pred_x0, time.perf_counter() - start))
    return x


def decode_latents(model: DiffusionModel, z: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """Scaled latents -> image through the model's autoencoder (identity for pixel models)."""
    if model.kind != "ldm":
        return z
    with torch.inference_mode(), autocast_context(z.device, precision):
        img = model.autoencoder.decode_stage_2_outputs(z / model.scale_factor)
    return img.float()


def encode_images(model: DiffusionModel, images: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """Images (normalised) -> scaled latents (identity for pixel models)."""
    if model.kind != "ldm":
        return images
    with torch.inference_mode(), autocast_context(images.device, precision):
        z = model.autoencoder.encode_stage_2_inputs(images)
    return z.float() * model.scale_factor
