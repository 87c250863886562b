"""Generate synthetic scans: seeded noise -> the one denoising loop -> (decode) -> `Volume`."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from napari_meddiff import __version__
from napari_meddiff.autoencoder.passes import autoencoder_pass, decode_latents
from napari_meddiff.diffusion.loop import StepInfo, denoise
from napari_meddiff.diffusion.seeds import check_seeds, initial_noise, seeded_generators
from napari_meddiff.errors import MeddiffError
from napari_meddiff.io.volume import Volume
from napari_meddiff.models import DEFAULT_MODEL, DiffusionModel, load_model
from napari_meddiff.runtime.devices import resolve_device
from napari_meddiff.runtime.precision import resolve_precision
from napari_meddiff.tasks.footprint import check_request_fits


@dataclasses.dataclass
class Preview:
    """A decoded look at the chain for the widget's live view: images in [0, 1], one per sample."""

    step: StepInfo
    images: np.ndarray  # (B, *image spatial shape)


def default_sampling(model: DiffusionModel) -> dict:
    return model.sampling_defaults


ConditionsArg = Mapping[str, float] | Sequence[Mapping[str, float]] | None


def per_seed_conditions(model: DiffusionModel, conditions: ConditionsArg, count: int) -> list[dict[str, float]]:
    """Every condition of the model for each of ``count`` seeds: one mapping for all, or one per seed,
    each checked against the model's declared names and ranges and completed with its defaults."""
    if conditions is None or isinstance(conditions, Mapping):
        values = model.condition_values(conditions)
        return [dict(values) for _ in range(count)]
    conditions = list(conditions)
    if len(conditions) != count:
        raise MeddiffError(f"{len(conditions)} sets of conditions for {count} seeds")
    return [model.condition_values(c) for c in conditions]


def to_volume(model: DiffusionModel, image: np.ndarray, **provenance) -> Volume:
    """Wrap a generated image (spatial dims only) as an RAS volume at the model's voxel size.

    2D images become (X, Y, 1) volumes so every output is a valid 3D NIfTI.
    """
    spacing = tuple(model.voxel_size) + (1.0,) * (3 - len(model.voxel_size))
    array = image[..., None] if image.ndim == 2 else image
    return Volume.from_spacing(np.ascontiguousarray(array, dtype=np.float32), spacing, **provenance)


def generate(
    model: str | DiffusionModel = DEFAULT_MODEL,
    seeds: Sequence[int] | int = 0,
    *,
    sampler: str | None = None,
    steps: int | None = None,
    device: str = "auto",
    precision: str | None = None,
    batch_size: int = 1,
    eta: float = 0.0,
    on_step: Callable[[StepInfo], None] | None = None,
    on_preview: Callable[[Preview], None] | None = None,
    preview_every: int = 0,
    should_cancel: Callable[[], bool] | None = None,
    conditions: ConditionsArg = None,
    guidance_scale: float = 1.0,
    release_unet: bool = False,
) -> list[Volume]:
    """Sample one volume per seed. The same seed, settings, batch size, thread count and device give the same
    volume, bit for bit; another device gives the same volume up to floating-point error (noise is drawn on
    the CPU).

    ``conditions``: the model's named conditions (``model.conditions``), one mapping for every seed or one
    per seed; missing names take their defaults. ``guidance_scale``: classifier-free guidance (1: none).
    ``on_preview`` receives decoded previews every ``preview_every`` steps (0: never). ``release_unet``: free
    the model's UNet once the last batch is denoised, before its decoding (`DiffusionModel.release_unet`; for
    a process that samples no more: the command line); the same volumes.
    """
    dev = resolve_device(device)
    if not isinstance(model, DiffusionModel):
        model = load_model(model, device=dev)
    elif model.device != dev:
        model.to(dev)
    if model.kind == "segmentation":
        raise MeddiffError(f"{model.name} is a segmentation model; use `segment`, not `generate`")
    seeds = [seeds] if isinstance(seeds, int) else [int(s) for s in seeds]
    if batch_size < 1:
        raise MeddiffError("batch size must be at least 1")
    seeds = check_seeds(seeds)
    check_request_fits(
        model,
        batch=min(batch_size, len(seeds)),
        held_voxels=len(seeds) * math.prod(model.image_shape),
        what=f"{len(seeds)} volumes at batch size {batch_size}",
        guided=not isinstance(guidance_scale, bool) and guidance_scale != 1,
    )
    defaults = default_sampling(model)
    sampler = sampler or defaults["sampler"]
    steps = int(steps if steps is not None else defaults["steps"])
    precision = resolve_precision(precision or defaults["precision"], dev)
    seed_conditions = per_seed_conditions(model, conditions, len(seeds))
    volumes: list[Volume] = []
    for start in range(0, len(seeds), batch_size):
        chunk = seeds[start : start + batch_size]
        chunk_conditions = seed_conditions[start : start + batch_size]
        values = (
            torch.tensor([list(c.values()) for c in chunk_conditions], dtype=torch.float32)
            if model.conditions
            else None
        )
        t0 = time.perf_counter()
        generators = seeded_generators(chunk, dev)
        x = initial_noise(model.sample_shape, generators, dev)

        def step_hook(info: StepInfo) -> None:
            if on_step is not None:
                on_step(info)
            # the last step is not previewed: the final decode below replaces the preview at once
            if on_preview is not None and preview_every and info.index % preview_every == 0 and info.index < info.total:
                images = decode_latents(model, info.pred_x0, precision)[:, 0].clamp(0, 1).cpu().numpy()
                on_preview(Preview(info, images))

        z = denoise(
            model,
            x,
            sampler=sampler,
            steps=steps,
            generators=generators,
            eta=eta,
            on_step=step_hook,
            should_cancel=should_cancel,
            precision=precision,
            conditions=values,
            guidance_scale=guidance_scale,
        )
        if release_unet and start + batch_size >= len(seeds):
            model.release_unet()
        decode_pass = autoencoder_pass(model, z) if model.kind == "ldm" else None  # recorded: it changes the bits
        images = decode_latents(model, z, precision, mode=decode_pass)[:, 0].clamp(0, 1).cpu().numpy()
        seconds = (time.perf_counter() - t0) / len(chunk)
        for seed, image, seed_values in zip(chunk, images, chunk_conditions):
            provenance = {
                "model": model.name,
                "model_sha256": model.weights_sha256,
                "seed": seed,
                "sampler": sampler,
                "steps": steps,
                "eta": eta,
                "precision": precision,
                "device": str(dev),
                "batch_size": batch_size,
                "package_version": __version__,
                "seconds": round(seconds, 3),
            }
            if decode_pass is not None:
                provenance["autoencoder_pass"] = decode_pass
            if model.conditions:
                provenance["conditions"] = seed_values
                provenance["guidance_scale"] = float(guidance_scale)
            volumes.append(to_volume(model, image, provenance=provenance))
    return volumes
