"""The one denoising loop behind every task (generate, inpaint, segment) and every sampler.

Hooks: ``image_condition`` (image channels concatenated to the UNet input: segmentation's scan),
``condition_values`` / ``guidance_scale`` (a model's named conditions, classifier-free guidance),
``controlnet_cond`` / ``controlnet_scale`` (a model's ControlNet: its down/mid residuals added in the UNet),
``network_inputs`` (further keyword inputs of the UNet and the ControlNet that the model provides, e.g. MAISI's
voxel spacing: `DiffusionModel.network_inputs`), ``known``
(known-region replacement after each step, for inpainting), ``on_step`` (progress / preview) and ``should_cancel``
(checked before every network evaluation). A batch holds one sampler state and one random generator per sample, so a
seed gives the same chain whatever the batch it runs in (bitwise for batches of 2+; batch 1 may differ by ~1e-6 on
CPU, where oneDNN blocks a single sample's attention and convolutions differently).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from napari_meddiff.diffusion.conditioning import ConditionInputs, condition_inputs, unet_inputs
from napari_meddiff.diffusion.samplers import RFlowSampler, make_sampler
from napari_meddiff.diffusion.seeds import initial_noise
from napari_meddiff.errors import Cancelled, MeddiffError
from napari_meddiff.models import DiffusionModel
from napari_meddiff.runtime.cpu_kernels import bf16_weights_once
from napari_meddiff.runtime.memory import release_free_heap
from napari_meddiff.runtime.precision import autocast_context


@dataclasses.dataclass
class StepInfo:
    """What the loop reports after each step."""

    index: int  # 1-based count of finished steps
    total: int
    timestep: int | float  # a float on a rectified flow's continuous time
    pred_x0: torch.Tensor  # current estimate of the clean sample (latent space for an LDM)
    elapsed: float  # seconds since the chain started

    @property
    def eta_seconds(self) -> float:
        return self.elapsed / self.index * (self.total - self.index)


class KnownRegionHook(Protocol):
    def __call__(
        self, x: torch.Tensor, t_next: int | None, samplers: Sequence, generators: Sequence
    ) -> torch.Tensor: ...


def _draws_noise(chain) -> bool:
    """Does this sampler's step draw noise (DDPM; DDIM with eta > 0)?"""
    from napari_meddiff.diffusion.samplers import DDPMSampler

    return isinstance(chain, DDPMSampler) or float(getattr(chain, "eta", 0.0)) > 0


def _step(chain, out: torch.Tensor, t: int | float, x: torch.Tensor, generator: torch.Generator):
    """One sampler step; a stochastic step runs where its generator is (the CPU), so its noise is the device's."""
    if generator.device == x.device or not _draws_noise(chain):
        return chain.step(out, t, x, generator)
    prev, x0 = chain.step(out.to(generator.device), t, x.to(generator.device), generator)
    return prev.to(x.device), x0.to(x.device)


@dataclasses.dataclass
class ControlInputs:
    """A ControlNet at every network evaluation (MONAI's ``ControlNet``, or ``ControlNetMaisi``: the same call):
    the noisy input, the timestep and ``cond`` (the conditioning image, batched as the UNet's input) give down/mid
    residuals, scaled by ``scale``, that the UNet adds to its skip connections and middle block."""

    net: torch.nn.Module
    cond: torch.Tensor
    scale: float

    def residuals(self, net_in: torch.Tensor, t_batch: torch.Tensor, kwargs: dict) -> dict:
        down, mid = self.net(
            net_in, timesteps=t_batch, controlnet_cond=self.cond, conditioning_scale=self.scale, **kwargs
        )
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}


def _control_inputs(
    model: DiffusionModel, cond: torch.Tensor | None, scale: float, x: torch.Tensor, guided: bool
) -> ControlInputs | None:
    """The ControlNet's inputs for samples ``x`` (both branches of classifier-free guidance get the image)."""
    net = getattr(model, "controlnet", None)
    if cond is None:
        if net is not None:
            raise MeddiffError(f"{model.name} has a ControlNet: give it its conditioning image (controlnet_cond)")
        return None
    if net is None:
        raise MeddiffError(f"{model.name} has no ControlNet to take a conditioning image (controlnet_cond)")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise MeddiffError(f"the ControlNet's conditioning scale must be a number, got {scale!r}")
    if cond.ndim != x.ndim or cond.shape[0] != x.shape[0]:
        raise MeddiffError(f"the ControlNet's conditioning image must be (B, C, *spatial) for {x.shape[0]} samples")
    cond = cond.to(device=x.device, dtype=torch.float32)
    return ControlInputs(net, torch.cat([cond, cond]) if guided else cond, float(scale))


def _unconditional(model: DiffusionModel, batch: int) -> torch.Tensor:
    null = model.conditioning.null
    if null is None:
        raise MeddiffError(
            f"{model.name} declares no unconditional (null) condition, so classifier-free guidance cannot be used: "
            "it needs a model trained with condition dropout (set conditioning.null); use guidance scale 1"
        )
    return torch.tensor(null, dtype=torch.float32).expand(batch, len(null))


def _network_inputs(
    inputs: dict[str, dict[str, torch.Tensor]] | None, x: torch.Tensor, guided: bool
) -> dict[str, dict[str, torch.Tensor]]:
    """``{"unet": {...}, "controlnet": {...}}`` keyword tensors, one row per sample of ``x``, on its device (both
    guidance branches get the same)."""
    checked: dict[str, dict[str, torch.Tensor]] = {"unet": {}, "controlnet": {}}
    for net, kwargs in (inputs or {}).items():
        if net not in checked:
            raise MeddiffError(f"network inputs are for the unet or the controlnet, not {net!r}")
        for name, value in kwargs.items():
            if value.shape[0] != x.shape[0]:
                raise MeddiffError(f"network input {name} must have one row per sample ({x.shape[0]})")
            value = value.to(x.device)
            checked[net][name] = torch.cat([value, value]) if guided else value
    return checked


def _predict(
    model: DiffusionModel,
    net_in: torch.Tensor,
    t: int | float,
    cond: ConditionInputs,
    precision: str,
    guidance_scale: float | None,
    control: ControlInputs | None = None,
    extra: dict[str, dict[str, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """The UNet's output at timestep ``t`` (with the ControlNet's residuals and ``extra`` keyword inputs of each
    network); with a guidance scale, both branches as one batch, then combined."""
    if guidance_scale is not None:
        net_in = torch.cat([net_in, net_in])
    t_type = torch.long if isinstance(t, int) else torch.float32
    t_batch = torch.full((net_in.shape[0],), t, device=net_in.device, dtype=t_type)
    net_in, kwargs = unet_inputs(net_in, cond)
    extra = extra or {}
    with autocast_context(net_in.device, precision):
        unet_kwargs = {**kwargs, **extra.get("unet", {})}
        if control is not None:
            control_kwargs = {**kwargs, **extra.get("controlnet", {})}
            unet_kwargs.update(control.residuals(net_in, t_batch, control_kwargs))
        out = model.unet(net_in, timesteps=t_batch, **unet_kwargs).float()
    if guidance_scale is None:
        return out
    out_cond, out_uncond = out.chunk(2)
    return out_uncond + float(guidance_scale) * (out_cond - out_uncond)


def denoise(
    model: DiffusionModel,
    x: torch.Tensor,
    *,
    sampler: str = "dpm++",
    steps: int = 20,
    generators: Sequence[torch.Generator],
    eta: float = 0.0,
    image_condition: torch.Tensor | None = None,
    known: KnownRegionHook | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    precision: str = "fp32",
    jump_length: int = 1,
    jump_n: int = 1,
    condition_values: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    controlnet_cond: torch.Tensor | None = None,
    controlnet_scale: float = 1.0,
    network_inputs: dict[str, dict[str, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """Run the reverse diffusion chain from ``x`` (noise, shape ``(B, *model.sample_shape)``) to a clean sample.

    ``image_condition``: image channels concatenated to the input (segmentation). ``condition_values``: the
    model's named condition values ``(B, N)`` (default: the model's defaults), given as it declares
    (concatenated channels, cross-attention context, class labels). ``guidance_scale`` != 1: classifier-free
    guidance, ``uncond + s * (cond - uncond)`` with the model's null condition (both branches in one batch).
    ``controlnet_cond``: the conditioning image ``(B, C, *S)`` of the model's ControlNet (needed when it has one),
    at the resolution its conditioning embedding takes; its residuals, times ``controlnet_scale``, go into the
    UNet at every network evaluation (both guidance branches get the same image). ``network_inputs``: further
    keyword tensors ``{"unet": {...}, "controlnet": {...}}``, one row per sample (`DiffusionModel.network_inputs`).

    ``jump_n > 1`` adds RePaint resampling (Lugmayr et al. 2022): every ``jump_length`` steps the chain is
    re-noised ``jump_length`` steps back (forward process, noise from each sample's generator) and re-run,
    ``jump_n - 1`` times (see `repaint_schedule`); ``on_step`` then counts every network evaluation.
    """
    _check_inputs(model, x, generators, guidance_scale, precision)
    guided = float(guidance_scale) != 1.0
    cond = condition_inputs(model, condition_values, x)
    if guided:
        cond = cond.cat(condition_inputs(model, _unconditional(model, x.shape[0]), x))
    control = _control_inputs(model, controlnet_cond, controlnet_scale, x, guided)
    extra = _network_inputs(network_inputs, x, guided)
    schedule = model.config["scheduler"]
    chains = [make_sampler(sampler, schedule, steps, eta, x.shape[2:]) for _ in range(x.shape[0])]
    if jump_n > 1 and isinstance(chains[0], RFlowSampler):
        raise MeddiffError("RePaint resampling (jump_n > 1) needs a DDPM noise schedule, not a rectified flow")
    timesteps = chains[0].timesteps
    moves = repaint_schedule(len(timesteps), jump_length, jump_n)
    total = sum(1 for a, b in moves if b == a + 1)
    start = time.perf_counter()
    done = 0
    with torch.inference_mode(), _bf16_weights(model, control, precision, x.device):
        for i, i_to in moves:
            if i_to < i:
                x = _jump_back(x, chains, generators, i, i_to)
                continue
            if should_cancel is not None and should_cancel():
                raise Cancelled()
            t = timesteps[i].item()  # an int, or a float on a rectified flow's continuous time
            net_in = x if image_condition is None else torch.cat([x, image_condition.to(x.dtype)], dim=1)
            out = _predict(model, net_in, t, cond, precision, guidance_scale if guided else None, control, extra)
            stepped = [
                _step(chain, out[b : b + 1], t, x[b : b + 1], gen)
                for b, (chain, gen) in enumerate(zip(chains, generators))
            ]
            x = torch.cat([s[0] for s in stepped])
            if known is not None:
                x = known(x, timesteps[i + 1].item() if i + 1 < len(timesteps) else None, chains, generators)
            done += 1
            if on_step is not None:
                pred_x0 = torch.cat([s[1] for s in stepped])
                on_step(StepInfo(done, total, t, pred_x0, time.perf_counter() - start))
    if x.device.type == "cpu":
        release_free_heap()  # what the chain freed (its bf16 weight copies too), before a decoding allocates its own
    return x


@contextlib.contextmanager
def _bf16_weights(model: DiffusionModel, control: ControlInputs | None, precision: str, device: torch.device):
    """`bf16_weights_once` for the UNet and the ControlNet in use."""
    with contextlib.ExitStack() as stack:
        for net in (model.unet, control.net if control is not None else None):
            if net is not None:
                stack.enter_context(bf16_weights_once(net, precision, device))
        yield


def _check_inputs(
    model: DiffusionModel, x: torch.Tensor, generators: Sequence[torch.Generator], guidance_scale, precision: str
) -> None:
    if len(generators) != x.shape[0]:
        raise MeddiffError("one random generator per sample is needed")
    if model.unet is None:
        raise MeddiffError(f"{model.name}'s UNet was released after its last sample (release_unet); load it again")
    scale_ok = isinstance(guidance_scale, (int, float)) and not isinstance(guidance_scale, bool)
    if not scale_ok or not math.isfinite(guidance_scale):
        raise MeddiffError(f"guidance scale must be a number, got {guidance_scale!r}")
    if model.unet_precision is not None and precision != model.unet_precision:
        raise MeddiffError(
            f"{model.name} was loaded to sample in {model.unet_precision} only (its UNet weights are held in "
            f"{model.unet_precision}, half the memory); load it with load_model(..., precision={precision!r}) "
            f"to sample in {precision}"
        )


def _jump_back(x: torch.Tensor, chains: Sequence, generators: Sequence[torch.Generator], i: int, i_to: int):
    """RePaint jump: x at chain position ``i`` (clean when ``i`` is the chain's length) re-noised to ``i_to``."""
    timesteps = chains[0].timesteps
    alphas_cumprod = chains[0].scheduler.alphas_cumprod
    a_from = alphas_cumprod[int(timesteps[i])] if i < len(timesteps) else torch.tensor(1.0)
    ratio = float(alphas_cumprod[int(timesteps[i_to])] / a_from)
    noise = initial_noise(x.shape[1:], generators, x.device)
    for chain in chains:
        _rewind(chain, i_to)
    return ratio**0.5 * x + (1.0 - ratio) ** 0.5 * noise


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
