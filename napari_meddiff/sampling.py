"""The one denoising loop behind every task (generate, inpaint, segment) and every sampler.

Hooks: ``condition`` (channels concatenated to the UNet input), ``conditions`` / ``guidance_scale`` (a
model's named conditions, classifier-free guidance), ``known`` (known-region replacement after
each step, for inpainting), ``on_step`` (progress / preview) and ``should_cancel`` (checked before every
network evaluation). A batch holds one sampler state and one random generator per sample, so a seed gives
the same chain whatever the batch it runs in (bitwise for batches of 2+; batch 1 may differ by ~1e-6 on CPU,
where oneDNN blocks a single sample's attention and convolutions differently).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from typing import Callable, Protocol, Sequence

import torch

from .choices import AUTOENCODER_PASS_ENV, AUTOENCODER_PASSES, PRECISION_CHOICES, PRECISIONS  # noqa: F401
from .cpu_kernels import bf16_weights_once
from .devices import free_memory_bytes, native_bf16
from .errors import Cancelled, MeddiffError
from .samplers import make_sampler
from .zoo import DiffusionModel
from .zoo.conditions import Conditioning

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def seeded_generators(seeds: Sequence[int], device: torch.device | None = None) -> list[torch.Generator]:
    """One CPU generator per seed, whatever the device the chain runs on (``device`` is where the noise goes).

    Noise is drawn on the CPU and moved to the device, as diffusers' ``randn_tensor`` does: a seed gives the
    same initial noise, and the same noise in stochastic steps, on every device, so CPU and CUDA give the same
    sample up to floating-point error."""
    return [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]


def initial_noise(shape: Sequence[int], generators: Sequence[torch.Generator], device: torch.device) -> torch.Tensor:
    """Standard normal noise of ``(len(generators), *shape)`` on ``device``, each sample from its own generator
    (drawn where the generator lives, then moved)."""
    return torch.stack([torch.randn(tuple(shape), generator=g, device=g.device) for g in generators]).to(device)


def _draws_noise(chain) -> bool:
    """Does this sampler's step draw noise (DDPM; DDIM with eta > 0)?"""
    from .samplers import DDPMSampler

    return isinstance(chain, DDPMSampler) or float(getattr(chain, "eta", 0.0)) > 0


def _step(chain, out: torch.Tensor, t: int, x: torch.Tensor, generator: torch.Generator):
    """One sampler step; a stochastic step runs where its generator is (the CPU), so its noise is the device's."""
    if generator.device == x.device or not _draws_noise(chain):
        return chain.step(out, t, x, generator)
    prev, x0 = chain.step(out.to(generator.device), t, x.to(generator.device), generator)
    return prev.to(x.device), x0.to(x.device)


@dataclasses.dataclass
class ConditionInputs:
    """A batch's condition values as the UNet takes them (see `napari_meddiff.zoo.Conditioning`)."""

    channels: torch.Tensor | None = None  # (B, N, *spatial), concatenated to the input
    context: torch.Tensor | None = None  # (B, 1, N), cross-attention
    class_labels: torch.Tensor | None = None  # (B,), long

    def cat(self, other: "ConditionInputs") -> "ConditionInputs":
        join = (lambda a, b: None if a is None else torch.cat([a, b]))
        return ConditionInputs(join(self.channels, other.channels), join(self.context, other.context),
                               join(self.class_labels, other.class_labels))


def condition_inputs(model: DiffusionModel, values: torch.Tensor | None, x: torch.Tensor) -> ConditionInputs:
    """Condition values ``(B, N)`` -> the UNet's extra channels / context / class labels for samples ``x``."""
    how = model.conditioning
    if not how.used:
        if values is not None and values.numel():
            raise MeddiffError(f"{model.name} takes no conditions")
        return ConditionInputs()
    if values is None:  # the model's defaults, e.g. for inpainting with a conditional model
        defaults = [s.default for s in model.conditions]
        values = torch.tensor(defaults, dtype=torch.float32).expand(x.shape[0], len(defaults))
    if values.ndim != 2 or values.shape != (x.shape[0], len(model.conditions)):
        raise MeddiffError(f"conditions must be ({x.shape[0]}, {len(model.conditions)}), got {tuple(values.shape)}")
    return network_conditions(how, values, x)


def network_conditions(how: Conditioning, values: torch.Tensor, x: torch.Tensor) -> ConditionInputs:
    """Checked condition values ``(B, N)`` in the form ``how`` says the UNet takes them, for inputs ``x``
    (sampling and training alike)."""
    values = values.to(device=x.device, dtype=torch.float32)
    spatial = x.shape[2:]
    channels = values.reshape(*values.shape, *[1] * len(spatial)).expand(*values.shape, *spatial) if how.concat else None
    context = values.unsqueeze(1) if how.context else None
    labels = values[:, 0].round().long() if how.class_labels else None
    return ConditionInputs(channels, context, labels)


def unet_inputs(net_in: torch.Tensor, cond: ConditionInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(input with the condition channels concatenated, the UNet's context / class-label keyword arguments)."""
    if cond.channels is not None:
        net_in = torch.cat([net_in, cond.channels.to(net_in.dtype)], dim=1)
    kwargs = {}
    if cond.context is not None:
        kwargs["context"] = cond.context
    if cond.class_labels is not None:
        kwargs["class_labels"] = cond.class_labels
    return net_in, kwargs


def _unconditional(model: DiffusionModel, batch: int) -> torch.Tensor:
    null = model.conditioning.null
    if null is None:
        raise MeddiffError(
            f"{model.name} declares no unconditional (null) condition, so classifier-free guidance cannot be used: "
            "it needs a model trained with condition dropout (set conditioning.null); use guidance scale 1"
        )
    return torch.tensor(null, dtype=torch.float32).expand(batch, len(null))


def _predict(model: DiffusionModel, net_in: torch.Tensor, t_batch: torch.Tensor, cond: ConditionInputs,
             precision: str) -> torch.Tensor:
    net_in, kwargs = unet_inputs(net_in, cond)
    with autocast_context(net_in.device, precision):
        return model.unet(net_in, timesteps=t_batch, **kwargs).float()


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 autocast on CPUs that compute bf16 natively (AVX-512 BF16 or AMX), else fp32.

    Chosen by measurement (benchmarks/bench_speed.py, bench_quality.py): on such a CPU bf16 sampling was
    1.8-3x faster and not measurably worse; on CPUs without it bf16 is emulated (some 1000x slower); on an
    H200 the shipped networks are launch-bound, and autocast's casts made bf16/fp16 steps 20-25 % slower."""
    if precision == "auto":
        return "bf16" if device.type == "cpu" and native_bf16(device) else "fp32"
    if precision not in PRECISIONS:
        raise MeddiffError(f"precision must be one of {PRECISION_CHOICES}, not {precision!r}")
    return precision


def autocast_context(device: torch.device, precision: str):
    if precision not in PRECISIONS:
        raise MeddiffError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    if device.type == "cpu" and precision == "fp16":
        raise MeddiffError("fp16 is for CUDA; use bf16 on CPU")
    return torch.autocast(device_type=device.type, dtype=PRECISION_DTYPES[precision])


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
    jump_length: int = 1,
    jump_n: int = 1,
    conditions: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """Run the reverse diffusion chain from ``x`` (noise, shape ``(B, *model.sample_shape)``) to a clean sample.

    ``condition``: image channels concatenated to the input (segmentation). ``conditions``: the model's named
    condition values ``(B, N)`` (default: the model's defaults), given as it declares (concatenated channels,
    cross-attention context, class labels). ``guidance_scale`` != 1: classifier-free guidance, ``uncond + s *
    (cond - uncond)`` with the model's null condition (the two branches run as one batch).

    ``jump_n > 1`` adds RePaint resampling (Lugmayr et al. 2022): every ``jump_length`` steps the chain is
    re-noised ``jump_length`` steps back (forward process, noise from each sample's generator) and re-run,
    ``jump_n - 1`` times (see `repaint_schedule`); ``on_step`` then counts every network evaluation.
    """
    if len(generators) != x.shape[0]:
        raise MeddiffError("one random generator per sample is needed")
    if model.unet is None:
        raise MeddiffError(f"{model.name}'s UNet was released after its last sample (release_unet); load it again")
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale):
        raise MeddiffError(f"guidance scale must be a number, got {guidance_scale!r}")
    if model.unet_precision is not None and precision != model.unet_precision:
        raise MeddiffError(
            f"{model.name} was loaded to sample in {model.unet_precision} only (its UNet weights are held in "
            f"{model.unet_precision}, half the memory); load it with load_model(..., precision={precision!r}) "
            f"to sample in {precision}"
        )
    cond = condition_inputs(model, conditions, x)
    guided = float(guidance_scale) != 1.0
    if guided:
        cond = cond.cat(condition_inputs(model, _unconditional(model, x.shape[0]), x))
    chains = [make_sampler(sampler, model.config["scheduler"], steps, eta) for _ in range(x.shape[0])]
    timesteps = chains[0].timesteps
    moves = repaint_schedule(len(timesteps), jump_length, jump_n)
    total = sum(1 for a, b in moves if b == a + 1)
    alphas_cumprod = chains[0].scheduler.alphas_cumprod
    device = x.device
    start = time.perf_counter()
    done = 0
    with torch.inference_mode(), bf16_weights_once(model.unet, precision, device):
        for i, i_to in moves:
            if i_to < i:  # RePaint jump: x at timesteps[i] (clean when i == len) -> x at timesteps[i_to]
                a_from = alphas_cumprod[int(timesteps[i])] if i < len(timesteps) else torch.tensor(1.0)
                ratio = float(alphas_cumprod[int(timesteps[i_to])] / a_from)
                noise = initial_noise(x.shape[1:], generators, device)
                x = ratio**0.5 * x + (1.0 - ratio) ** 0.5 * noise
                for chain in chains:
                    _rewind(chain, i_to)
                continue
            t = timesteps[i]
            if should_cancel is not None and should_cancel():
                raise Cancelled()
            net_in = x if condition is None else torch.cat([x, condition.to(x.dtype)], dim=1)
            if guided:
                net_in = torch.cat([net_in, net_in])
            t_batch = torch.full((net_in.shape[0],), int(t), device=device, dtype=torch.long)
            out = _predict(model, net_in, t_batch, cond, precision)
            if guided:
                out_cond, out_uncond = out.chunk(2)
                out = out_uncond + float(guidance_scale) * (out_cond - out_uncond)
            stepped = [_step(chain, out[b : b + 1], int(t), x[b : b + 1], gen) for b, (chain, gen) in enumerate(zip(chains, generators))]
            x = torch.cat([s[0] for s in stepped])
            pred_x0 = torch.cat([s[1] for s in stepped])
            t_next = int(timesteps[i + 1]) if i + 1 < len(timesteps) else None
            if known is not None:
                x = known(x, t_next, chains, generators)
            done += 1
            if on_step is not None:
                on_step(StepInfo(done, total, int(t), pred_x0, time.perf_counter() - start))
    if device.type == "cpu":
        from .memory import release_free_heap

        release_free_heap()  # what the chain freed (its bf16 weight copies too), before a decoding allocates its own
    return x


def repaint_schedule(steps: int, jump_length: int = 1, jump_n: int = 1) -> list[tuple[int, int]]:
    """The moves of a chain of ``steps`` steps with RePaint resampling, as ``(from, to)`` chain positions.

    Position ``i`` is the state at ``timesteps[i]`` (``steps``: the clean sample). ``(i, i + 1)`` is one
    denoising step; ``(i, i - jump_length)`` re-noises back. Jumps start from positions ``steps``,
    ``steps - jump_length``, ... (>= ``jump_length``), each ``jump_n - 1`` times, as in RePaint's
    ``get_schedule_jump``. ``jump_n == 1`` gives the plain chain.
    """
    for name, value in (("steps", steps), ("jump_length", jump_length), ("jump_n", jump_n)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise MeddiffError(f"{name} must be a positive integer, got {value!r}")
    left = {i: jump_n - 1 for i in range(steps, jump_length - 1, -jump_length)} if jump_n > 1 else {}
    moves: list[tuple[int, int]] = []
    i = 0
    while i < steps:
        moves.append((i, i + 1))
        i += 1
        if left.get(i, 0) > 0:
            left[i] -= 1
            moves.append((i, i - jump_length))
            i -= jump_length
    return moves


def _rewind(chain, index: int) -> None:
    """Put a sampler back at chain position ``index`` (after a RePaint jump).

    MONAI's DDPM/DDIM steps depend only on ``t``; a multistep sampler keeps a position and a history, which
    is reset (its next step is first order).
    """
    rewind = getattr(chain, "rewind", None)
    if callable(rewind):
        rewind(index)
    elif hasattr(chain, "_index"):  # DPM-Solver++ 2M
        chain._index = index
        chain._prev_x0 = None
        chain._prev_t = None


WHOLE_PASS_SHARE = 0.5  # a whole pass runs when its estimate is within this share of the free memory


def autoencoder_pass(
    model: DiffusionModel, x: torch.Tensor, requested: str | None = None, *, encode: bool = False
) -> str:
    """``"whole"`` or ``"tiled"``: how to run the autoencoder over ``x`` (latents, or images when ``encode``).

    ``requested`` None: ``$MEDDIFF_AUTOENCODER_PASS``, else ``auto``. ``auto`` tiles when a whole pass is estimated
    (`tiling.whole_pass_bytes`) at more than `WHOLE_PASS_SHARE` of the memory free on the device (``MemAvailable``
    on CPU, free CUDA memory on a GPU)."""
    import os

    requested = requested or os.environ.get(AUTOENCODER_PASS_ENV) or "auto"
    if requested not in AUTOENCODER_PASSES:
        raise MeddiffError(f"the autoencoder pass must be one of {', '.join(AUTOENCODER_PASSES)}, not {requested!r}")
    if requested != "auto":
        return requested
    from . import tiling

    ae = model.autoencoder
    try:
        steps = tiling.encoder_steps(ae)[0] if encode else tiling.decoder_steps(ae)[0]
    except MeddiffError:  # not tileable (attention): the whole pass is the only one
        return "whole"
    need = tiling.whole_pass_bytes(steps, x.shape[0], x.shape[2:])
    return "whole" if need <= WHOLE_PASS_SHARE * free_memory_bytes(x.device) else "tiled"


def decode_latents(
    model: DiffusionModel, z: torch.Tensor, precision: str = "fp32", mode: str | None = None, tile: int | None = None
) -> torch.Tensor:
    """Scaled latents -> image through the model's autoencoder (identity for pixel models).

    ``mode``: ``whole`` (MONAI's one pass), ``tiled`` (`napari_meddiff.tiling`: the same result to floating-point
    error, memory set by the tiles; ``tile`` voxels per side) or ``auto`` (tiled only when a whole pass would not
    fit in memory); None: the process default (`autoencoder_pass`)."""
    if model.kind != "ldm":
        return z
    mode = autoencoder_pass(model, z, mode)
    z = z / model.scale_factor
    with torch.inference_mode(), autocast_context(z.device, precision):
        if mode == "whole":
            img = model.autoencoder.decode_stage_2_outputs(z)
        else:
            from .tiling import tiled_decode

            img = tiled_decode(model.autoencoder, z, tile=tile, ram_bytes=WHOLE_PASS_SHARE * free_memory_bytes(z.device))
    return img.float()


def encode_images(
    model: DiffusionModel, images: torch.Tensor, precision: str = "fp32", *, sample: bool = False,
    generator: torch.Generator | None = None, mode: str | None = None, tile: int | None = None,
) -> torch.Tensor:
    """Images (normalised) -> scaled latents (identity for pixel models): the posterior mean, or with ``sample``
    a posterior sample (as MONAI's ``encode_stage_2_inputs``) drawn with ``generator`` (required: the same seed
    gives the same latents). ``mode`` / ``tile`` as in `decode_latents`."""
    if sample and generator is None:
        raise MeddiffError("encode_images(sample=True) needs a generator (seeded draws, never the global RNG)")
    if model.kind != "ldm":
        return images
    mode = autoencoder_pass(model, images, mode, encode=True)
    ae = model.autoencoder
    with torch.inference_mode(), autocast_context(images.device, precision):
        if mode == "whole":
            z_mu, z_sigma = ae.encode(images)
        else:
            from .tiling import tiled_encode

            budget = WHOLE_PASS_SHARE * free_memory_bytes(images.device)
            z_mu, z_sigma = tiled_encode(ae, images, tile=tile, ram_bytes=budget)
        if sample:
            eps = torch.randn(z_mu.shape, generator=generator, device=generator.device, dtype=torch.float32)
            z = z_mu + z_sigma * eps.to(z_mu.device, z_mu.dtype)
        else:
            z = z_mu
    return z.float() * model.scale_factor
