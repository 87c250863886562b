"""Generate synthetic scans: seeded noise -> the one denoising loop -> (decode) -> `Volume`."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from napari_meddiff.autoencoder.passes import autoencoder_pass, decode_latents
from napari_meddiff.diffusion.loop import StepInfo, denoise
from napari_meddiff.diffusion.seeds import check_seeds, initial_noise, seeded_generators
from napari_meddiff.errors import MeddiffError
from napari_meddiff.io.volume import Volume
from napari_meddiff.models import DEFAULT_MODEL, DiffusionModel, load_model
from napari_meddiff.tasks.footprint import check_request_fits
from napari_meddiff.tasks.from_labels import in_output_units
from napari_meddiff.tasks.settings import prepare_model, provenance, resolve_settings


@dataclasses.dataclass
class Preview:
    """A decoded look at the chain for the widget's live view: images in [0, 1], one per sample."""

    step: StepInfo
    images: np.ndarray  # (B, *image spatial shape)


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
    dtype = np.uint8 if np.issubdtype(image.dtype, np.integer) else np.float32  # a label map stays integer
    return Volume.from_spacing(np.ascontiguousarray(array, dtype=dtype), spacing, **provenance)


def generated_output(model: DiffusionModel, x: torch.Tensor, precision: str, mode: str | None = None) -> np.ndarray:
    """What the chain's sample ``x`` shows: images in [0, 1] (decoded for an LDM), or a map generator's label maps
    (the argmax of its one-hot channels), ``(B, *spatial)``."""
    if model.label_output:
        return x.argmax(dim=1).to(torch.uint8).cpu().numpy()
    return decode_latents(model, x, precision, mode=mode)[:, 0].clamp(*model.output_clip).cpu().numpy()


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
    guidance_scale: float | None = None,
    release_unet: bool = False,
    labels: Volume | None = None,
) -> list[Volume]:
    """Sample one volume per seed. The same seed, settings, batch size, thread count and device give the same
    volume, bit for bit; another device gives the same volume up to floating-point error (noise is drawn on
    the CPU).

    ``conditions``: the model's named conditions (``model.conditions``), one mapping for every seed or one
    per seed; missing names take their defaults. ``guidance_scale``: classifier-free guidance (1: none; None: the
    model's default, `guidance_default`).
    ``on_preview`` receives decoded previews every ``preview_every`` steps (0: never). ``release_unet``: free
    the model's UNet once the last batch is denoised, before its decoding (`DiffusionModel.release_unet`; for
    a process that samples no more: the command line); the same volumes.
    ``labels``: the label map a label-map model generates from (`generate_from_labels`; each volume on its grid;
    previews through its own ``on_preview``, on the map's grid). Without one, a label-map model with a map
    generator runs both stages (`generate_two_stage`: each scan with its map; ``conditions`` are the
    generator's). A map generator's own volumes are label maps (integers).
    """
    model, dev = prepare_model(model, device)
    if model.kind == "segmentation":
        raise MeddiffError(f"{model.name} is a segmentation model; use `segment`, not `generate`")
    if model.label_map or labels is not None:
        from napari_meddiff.tasks.from_labels import generate_from_labels, require_label_map

        require_label_map(model, labels, generator_may_draw=True)
        if labels is None:  # its map generator draws the maps
            return generate_two_stage(
                model, [seeds] if isinstance(seeds, int) else list(seeds), sampler=sampler, steps=steps,
                device=str(dev), precision=precision, batch_size=batch_size, eta=eta, conditions=conditions,
                guidance_scale=guidance_scale, on_step=on_step, should_cancel=should_cancel,
            )  # fmt: skip
        return generate_from_labels(
            model, labels, seeds, sampler=sampler, steps=steps, device=str(dev), precision=precision,
            batch_size=batch_size, eta=eta, on_step=on_step, should_cancel=should_cancel,
        )  # fmt: skip
    seeds = check_seeds([seeds] if isinstance(seeds, int) else [int(s) for s in seeds])
    if guidance_scale is None:  # (a two-stage run's is its map generator's, resolved there)
        guidance_scale = model.guidance_default
    if batch_size < 1:
        raise MeddiffError("batch size must be at least 1")
    check_request_fits(
        model,
        batch=min(batch_size, len(seeds)),
        held_voxels=len(seeds) * math.prod(model.image_shape),
        what=f"{len(seeds)} volumes at batch size {batch_size}",
        guided=not isinstance(guidance_scale, bool) and guidance_scale != 1,
    )
    settings = resolve_settings(model, "generate", dev, sampler=sampler, steps=steps, eta=eta, precision=precision)
    seed_conditions = per_seed_conditions(model, conditions, len(seeds))
    volumes: list[Volume] = []
    for start in range(0, len(seeds), batch_size):
        last_batch = start + batch_size >= len(seeds)
        chunk = seeds[start : start + batch_size]
        volumes += _generate_batch(
            model, dev, chunk, seed_conditions[start : start + batch_size], settings,
            batch_size=batch_size, guidance_scale=guidance_scale, on_step=on_step, on_preview=on_preview,
            preview_every=preview_every, should_cancel=should_cancel, release_unet=release_unet and last_batch,
        )  # fmt: skip
    return volumes


def generate_two_stage(
    model: DiffusionModel,
    seeds: Sequence[int],
    *,
    sampler: str | None = None,
    steps: int | None = None,
    device: str = "auto",
    precision: str | None = None,
    batch_size: int = 1,
    eta: float = 0.0,
    conditions: ConditionsArg = None,
    guidance_scale: float | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
    on_stage: Callable[[str, int], None] | None = None,
    on_preview: Callable[[Volume], None] | None = None,
    preview_every: int = 0,
    should_cancel: Callable[[], bool] | None = None,
) -> list[Volume]:
    """One scan per seed, each from a map its model's generator draws with that seed and ``conditions`` (the
    generator samples at its own defaults; ``sampler``, ``steps``, ``eta`` and ``precision`` are the scan's).
    ``on_stage(name, index)``: called as stage 1 ("tissue map") and each stage-2 scan begin; ``on_preview``
    receives the scan's previews (stage 2) every ``preview_every`` steps."""
    from napari_meddiff.tasks.from_labels import generate_from_labels
    from napari_meddiff.tasks.two_stage import map_generator_of

    generator = load_model(map_generator_of(model).path, model.device)  # the folder found once, not searched again
    if on_stage is not None:
        on_stage("tissue map", 0)
    maps = generate(
        generator, list(seeds), device=str(model.device), batch_size=batch_size, conditions=conditions,
        guidance_scale=guidance_scale, on_step=on_step, should_cancel=should_cancel,
    )  # fmt: skip
    del generator
    scans = []
    for i, (seed, tissue_map) in enumerate(zip(seeds, maps)):
        if on_stage is not None:
            on_stage("scan", i)
        (scan,) = generate_from_labels(
            model, tissue_map, int(seed), sampler=sampler, steps=steps, device=str(model.device),
            precision=precision, eta=eta, on_step=on_step, on_preview=on_preview, preview_every=preview_every,
            should_cancel=should_cancel,
        )  # fmt: skip
        map_record = dict(tissue_map.metadata["provenance"])
        record = scan.metadata["provenance"]
        record.pop("label_map_sha256")  # not a setting of the cohort: each subject's map is its own
        map_record["voxels"] = record.pop("label_map")["voxels"]
        record["tissue_map"] = map_record
        for key in ("conditions", "guidance_scale"):  # what the cohort was asked for: the generator's
            if key in map_record:
                record[key] = map_record[key]
        record["seconds"] = round(record["seconds"] + map_record["seconds"], 3)
        scan.metadata["tissue_map"] = tissue_map
        scans.append(scan)
    return scans


def _generate_batch(
    model: DiffusionModel,
    dev: torch.device,
    seeds: list[int],
    seed_conditions: list[dict[str, float]],
    settings: dict,
    *,
    batch_size: int,
    guidance_scale: float,
    on_step: Callable[[StepInfo], None] | None,
    on_preview: Callable[[Preview], None] | None,
    preview_every: int,
    should_cancel: Callable[[], bool] | None,
    release_unet: bool,
) -> list[Volume]:
    """One batch of seeds: noise from each seed's generator, the loop, the decoding, one `Volume` per seed."""
    precision = settings["precision"]
    values = None
    if model.conditions:
        values = torch.tensor([list(c.values()) for c in seed_conditions], dtype=torch.float32)
    t0 = time.perf_counter()
    generators = seeded_generators(seeds, dev)
    x = initial_noise(model.sample_shape, generators, dev)

    def step_hook(info: StepInfo) -> None:
        if on_step is not None:
            on_step(info)
        # the last step is not previewed: the final decode below replaces the preview at once
        if on_preview is not None and preview_every and info.index % preview_every == 0 and info.index < info.total:
            images = generated_output(model, info.pred_x0, precision)
            if model.label_output:  # shown as an image: value / largest label
                images = images.astype(np.float32) / max(len(model.label_output) - 1, 1)
            on_preview(Preview(info, images))

    z = denoise(
        model, x, sampler=settings["sampler"], steps=settings["steps"], generators=generators, eta=settings["eta"],
        on_step=step_hook, should_cancel=should_cancel, precision=precision, condition_values=values,
        guidance_scale=guidance_scale, network_inputs=model.network_inputs(len(seeds)),  # e.g. MAISI's spacing
    )  # fmt: skip
    if release_unet:
        model.release_unet()
    decode_pass = autoencoder_pass(model, z) if model.kind == "ldm" else None  # recorded: it changes the bits
    images = generated_output(model, z, precision, mode=decode_pass)
    seconds = (time.perf_counter() - t0) / len(seeds)
    volumes = []
    for seed, image, seed_values in zip(seeds, images, seed_conditions):
        extra = {"autoencoder_pass": decode_pass} if decode_pass is not None else {}
        if model.conditions:
            extra.update(conditions=seed_values, guidance_scale=float(guidance_scale))
        record = provenance(model, dev, task="generate", seed=seed, **settings, batch_size=batch_size, **extra)
        record["seconds"] = round(seconds, 3)
        volumes.append(in_output_units(model, to_volume(model, image, provenance=record)))
    return volumes
