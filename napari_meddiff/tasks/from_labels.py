"""Generate a scan from a label map (a tissue map: 0 background, 1 CSF, 2 GM, 3 WM, 4 lesion, as the model's
``label_map`` names them): the map, one-hot, is the image condition of the one denoising loop (channels beside
the image, or the conditioning image of the model's ControlNet when it has one), and the scan comes back on the
map's own grid (its affine, shape and orientation)."""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from napari_meddiff.diffusion.loop import StepInfo, denoise
from napari_meddiff.diffusion.seeds import check_seeds, initial_noise, seeded_generators
from napari_meddiff.errors import MeddiffError
from napari_meddiff.io.geometry import ModelGrid, grid_to_volume, make_grid, sample_on_grid, snap_grid, world_box
from napari_meddiff.io.volume import Volume
from napari_meddiff.models import DiffusionModel, ModelConfigView
from napari_meddiff.tasks.footprint import check_request_fits
from napari_meddiff.tasks.inputs import as_3d
from napari_meddiff.tasks.settings import prepare_model, provenance, resolve_settings


def grid_divisor(model: DiffusionModel) -> int:
    """What every side of the image grid must be divisible by: the UNet's levels and space-to-depth factor, and a
    latent model's autoencoder downsampling."""
    unet = model.config["networks"]["unet"]
    levels = len(unet.get("channels") or unet.get("num_channels"))
    return latent_factor(model) * int(unet.get("space_to_depth") or 1) * 2 ** (levels - 1)


def latent_factor(model: DiffusionModel) -> int:
    """How many image voxels a latent voxel spans per side (1: a pixel model)."""
    return model.image_shape[0] // model.sample_shape[1] if model.kind == "ldm" else 1


def map_spacing(labels: Volume) -> np.ndarray:
    """The map's voxel size along R, A and S (each voxel axis to the world axis it runs closest to; an oblique map
    whose axes do not sort so takes its mean spacing)."""
    columns = np.asarray(labels.affine, dtype=float)[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    nearest = np.argmax(np.abs(columns) / spacing, axis=0)
    if sorted(nearest) != [0, 1, 2]:
        return np.full(3, spacing.mean())
    voxel = np.empty(3)
    voxel[nearest] = spacing
    return voxel


def require_label_map(model: ModelConfigView, labels: object | None, *, generator_may_draw: bool = False) -> None:
    """A label-map model needs a map (unless ``generator_may_draw`` and its map generator draws one: generate),
    and a map needs a label-map model: one line saying which is missing."""
    if labels is None and model.label_map and not (generator_may_draw and model.map_generator):
        raise MeddiffError(
            f"{model.name} generates a scan from a label map: give one (--labels MAP.nii.gz; in napari, a Labels "
            "layer), with values " + ", ".join(f"{k} {v}" for k, v in model.label_map.items())
        )
    if labels is not None and not model.label_map:
        raise MeddiffError(f"{model.name} does not generate from a label map; choose a model that declares one")


def checked_label_values(model: DiffusionModel, array: np.ndarray, where: str = "the label map") -> np.ndarray:
    """The map as integers, refused when it holds values the model has no label for (or fractions)."""
    names = model.label_map
    if not names:
        raise MeddiffError(f"{model.name} does not generate from a label map (it declares no label_map)")
    values = np.unique(array)
    if not np.all(np.isfinite(values)) or np.any(values != np.round(values)):
        raise MeddiffError(f"{where} holds non-integer values; a label map holds whole label numbers")
    unknown = sorted(int(v) for v in values if int(v) not in names)
    if unknown:
        known = ", ".join(f"{k} {v}" for k, v in names.items())
        raise MeddiffError(f"{where} holds label(s) {unknown} that {model.name} does not know (it knows {known})")
    if values.max(initial=0) == 0:
        raise MeddiffError(f"{where} is all background (0): nothing to generate an image of")
    return np.asarray(array).astype(np.int64)


def label_map_sha256(values: np.ndarray, affine: np.ndarray) -> str:
    """What a label map is, whatever file or layer it came from: its values (as int16) and its affine."""
    digest = hashlib.sha256(np.ascontiguousarray(values, dtype=np.int16).tobytes())
    digest.update(np.ascontiguousarray(affine, dtype=np.float64).tobytes())
    digest.update(str(tuple(values.shape)).encode())
    return digest.hexdigest()


def checked_label_map(model: DiffusionModel, labels: Volume) -> tuple[Volume, str]:
    """The map as a 3D volume of whole label numbers the model knows, and its `label_map_sha256`."""
    labels = Volume(as_3d(labels.array, "the label map"), labels.affine, dict(labels.metadata))
    values = checked_label_values(model, labels.array)
    return Volume(values, labels.affine, labels.metadata), label_map_sha256(values, labels.affine)


def label_grid(model: DiffusionModel, labels: Volume) -> ModelGrid:
    """A RAS grid at the model's voxel size, centred on the map's labelled voxels and covering them: the model's
    image shape, larger where the labels need it (the UNet is fully convolutional), sides divisible as it needs.
    A model that takes its grid's spacing (`takes_spacing`: MAISI) gets the map's spacing (within the range it
    was trained on), and the covering shape alone."""
    index = np.argwhere(np.asarray(labels.array) > 0)
    lo, hi = world_box(labels.affine, index.min(0), index.max(0))
    voxel = np.asarray(model.voxel_size, dtype=float)
    if model.takes_spacing:
        voxel = map_spacing(labels)
        if model.spacing_range:
            voxel = np.clip(voxel, *np.asarray(model.spacing_range, dtype=float).T)
    div = grid_divisor(model)
    need = np.ceil((hi - lo) / voxel).astype(int) + 3
    least = [div] * 3 if model.takes_spacing else model.image_shape
    shape = [max(int(s), int(math.ceil(n / div) * div)) for s, n in zip(least, need)]
    return snap_grid(make_grid(voxel, shape, (lo + hi) / 2), labels)


def one_hot_condition(label_arrays: torch.Tensor, num_labels: int) -> torch.Tensor:
    """(B, *S) label values -> (B, K, *S) one-hot in {-1, 1}: the channels the UNet takes beside the image, or
    the ControlNet's conditioning image."""
    return F.one_hot(label_arrays.long(), num_labels).movedim(-1, 1).float() * 2.0 - 1.0


def binary_condition(label_arrays: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """(B, *S) label values -> (B, bits, *S): each value's bits in {0, 1}, lowest first (MAISI's
    ``binarize_labels``)."""
    masks = 2 ** torch.arange(bits, device=label_arrays.device)
    values = label_arrays.long().unsqueeze(1)
    shape = (1, bits) + (1,) * (values.ndim - 2)
    return (values & masks.reshape(shape)).ne(0).float()


def label_condition(model: DiffusionModel, label_arrays: torch.Tensor) -> torch.Tensor:
    """The map as the model takes it: one-hot (`one_hot_condition`) or binary-coded (`binary_condition`)."""
    if model.label_encoding == "binary":
        return binary_condition(label_arrays)
    return one_hot_condition(label_arrays, len(model.label_map))


def map_inputs(
    model: DiffusionModel, label_arrays: torch.Tensor, device: torch.device, voxel_size: Sequence[float] | None
) -> dict[str, Any]:
    """`denoise`'s keyword inputs for label maps ``(B, *S)`` on a grid of ``voxel_size`` mm (default: the model's):
    the map as the model takes it (`label_condition`), into its ControlNet or beside the image, and the extra
    network inputs the model asks for (MAISI's spacing and body regions)."""
    condition = label_condition(model, label_arrays).to(device)
    key = "controlnet_cond" if model.controlnet is not None else "image_condition"
    extra = model.network_inputs(label_arrays.shape[0], voxel_size, torch.unique(label_arrays).tolist())
    return {key: condition, "network_inputs": extra}


def labels_on_grid(model: DiffusionModel, labels: Volume, grid: ModelGrid) -> tuple[np.ndarray, int]:
    """The map on ``grid`` (nearest neighbour, background beyond it) with a body label derived where the model
    expects one the map lacks (`with_body_label`): the map's int64 values and the voxels so derived."""
    as_float = Volume(np.asarray(labels.array).astype(np.float32), labels.affine)
    return with_body_label(model, np.rint(sample_on_grid(as_float, grid, labels=True)).astype(np.int64))


def sample_from_label_arrays(
    model: DiffusionModel,
    label_arrays: torch.Tensor,
    generators: Sequence[torch.Generator],
    settings: dict,
    device: torch.device,
    *,
    on_step: Callable[[StepInfo], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    voxel_size: Sequence[float] | None = None,
    decode: str | None = None,
) -> torch.Tensor:
    """Images in [0, 1], ``(B, *S)``, for label maps ``(B, *S)`` on a grid of ``voxel_size`` mm (default: the
    model's), one generator each. A model with a ControlNet takes the map there (``controlnet_cond``), else beside
    the image; a latent model denoises latents and decodes them; the model's `network_inputs` (MAISI's spacing,
    body regions) come from the grid and the map; ``decode``: its autoencoder pass (`decode_latents`)."""
    from napari_meddiff.autoencoder.passes import decode_latents

    factor = latent_factor(model)
    shape = (model.sample_shape[0], *[s // factor for s in label_arrays.shape[1:]])
    x = initial_noise(shape, generators, device)
    x0 = denoise(
        model, x, sampler=settings["sampler"], steps=settings["steps"], generators=generators, eta=settings["eta"],
        on_step=on_step, should_cancel=should_cancel, precision=settings["precision"],
        **map_inputs(model, label_arrays, device, voxel_size),
    )  # fmt: skip
    if model.kind == "ldm":
        x0 = decode_latents(model, x0, settings["precision"], mode=decode)
    return x0[:, 0].clamp(*model.output_clip).cpu()


def generate_from_labels(
    model: str | DiffusionModel,
    labels: Volume,
    seeds: Sequence[int] | int = 0,
    *,
    sampler: str | None = None,
    steps: int | None = None,
    device: str = "auto",
    precision: str | None = None,
    batch_size: int = 1,
    eta: float = 0.0,
    on_step: Callable[[StepInfo], None] | None = None,
    on_preview: Callable[[Volume], None] | None = None,
    preview_every: int = 0,
    should_cancel: Callable[[], bool] | None = None,
) -> list[Volume]:
    """One scan per seed for the label map ``labels``, each on the map's grid (intensities in [0, 1], the
    model's normalised range, or in the units its ``intensity.output_range`` names: MAISI's HU). The same seed,
    map and settings give the same scan. ``on_preview`` receives the chain's current estimate of a batch's first
    scan, on the map's grid, every ``preview_every`` steps."""
    model, dev = prepare_model(model, device)
    labels, digest = checked_label_map(model, labels)
    values = labels.array
    seeds = check_seeds([seeds] if isinstance(seeds, int) else [int(s) for s in seeds])
    if batch_size < 1:
        raise MeddiffError("batch size must be at least 1")
    grid = label_grid(model, labels)
    on_grid, derived = labels_on_grid(model, labels, grid)
    on_grid = torch.from_numpy(on_grid)
    voxel = list(grid.spacing)
    settings = resolve_settings(model, "generate", dev, sampler=sampler, steps=steps, eta=eta, precision=precision)
    present = {model.label_map[int(v)]: int(np.count_nonzero(values == v)) for v in np.unique(values)}
    source = {"file": labels.metadata.get("source_path"), "voxels": present}
    if derived:
        source["body_label_derived"] = derived
    check_request_fits(
        model, batch=batch_size, held_voxels=len(seeds) * float(values.size) + float(np.prod(grid.shape)),
        what=f"{len(seeds)} scan(s) from a {'x'.join(map(str, values.shape))} label map (model grid "
        f"{'x'.join(map(str, grid.shape))}, batch {batch_size})", image_shape=grid.shape,
    )  # fmt: skip
    background = background_on_map(model, values)
    decode = _decode_pass(model, grid.shape, batch_size, dev)
    if decode is not None:
        on_preview = None  # previews would need a decode per preview: the result comes decoded
    out: list[Volume] = []
    for start in range(0, len(seeds), batch_size):
        chunk = seeds[start : start + batch_size]
        t0 = time.perf_counter()
        maps = on_grid.expand(len(chunk), *grid.shape)
        hook = _with_previews(
            on_step, on_preview, preview_every, lambda x0: _on_map_grid(x0[0, 0], grid, labels, model.output_clip)
        )
        images = sample_from_label_arrays(
            model, maps, seeded_generators(chunk, dev), settings, dev, on_step=hook, should_cancel=should_cancel,
            voxel_size=voxel, decode=decode,
        ).numpy()  # fmt: skip
        seconds = (time.perf_counter() - t0) / len(chunk)
        for seed, image in zip(chunk, images):
            vol = in_output_units(model, _on_map_grid(image, grid, labels, model.output_clip), background)
            record = provenance(
                model, dev, task="generate", seed=seed, **settings, batch_size=batch_size,
                label_map_sha256=digest, label_map=source, **({"autoencoder_pass": decode} if decode else {}),
            )  # fmt: skip
            record["seconds"] = round(seconds, 3)
            vol.metadata = {**labels.metadata, "provenance": record}
            out.append(vol)
    return out


def _decode_pass(model: DiffusionModel, grid_shape: Sequence[int], batch: int, device: torch.device) -> str | None:
    """A latent model's autoencoder pass for a batch on this grid (recorded: it changes the bits), else None."""
    if model.kind != "ldm":
        return None
    from napari_meddiff.autoencoder.passes import autoencoder_pass

    sides = [int(s) // latent_factor(model) for s in grid_shape]
    return autoencoder_pass(model, torch.empty((batch, model.sample_shape[0], *sides), device=device))


def derived_body_region(values: np.ndarray) -> np.ndarray:
    """The body as a map without a body label implies it: the closed, hole-filled region of its labels."""
    from scipy import ndimage

    inside = ndimage.binary_closing(values > 0, structure=np.ones((3, 3, 3), bool), iterations=2, border_value=0)
    return ndimage.binary_fill_holes(inside | (values > 0))


def with_body_label(model: DiffusionModel, values: np.ndarray) -> tuple[np.ndarray, int]:
    """A map for a model that expects a body label (MAISI: 200, body voxels no organ takes): a map without it gets
    it where the body is taken to be, the closed, hole-filled region of its other labels (a warning says so).
    Returns the map and the voxels so labelled (0: none derived)."""
    import warnings

    body = model.body_label
    if body is None or np.any(values == body):
        return values, 0
    gaps = derived_body_region(values) & (values == 0)
    warnings.warn(
        f"the label map has no body label {body} ({model.label_map[body]}), which {model.name} expects around the "
        f"organs: {int(gaps.sum())} background voxels inside the labelled region were given it",
        UserWarning,
        stacklevel=3,
    )
    out = values.copy()
    out[gaps] = body
    return out, int(gaps.sum())


def background_on_map(model: DiffusionModel, values: np.ndarray) -> np.ndarray | None:
    """Where a map on its own grid is background (outside the derived body too, when the model expects a body
    label the map lacks), for a model that writes a set value there (``intensity.background_value``: MAISI
    writes air outside the labelled body); else None."""
    if "background_value" not in (model.config.get("intensity") or {}):
        return None
    background = values == 0
    if model.body_label is not None and not np.any(values == model.body_label):
        background &= ~derived_body_region(values)
    return background


def in_output_units(model: ModelConfigView, vol: Volume, background: np.ndarray | None = None) -> Volume:
    """A [0, 1] scan in the units the model's output stands for (`output_range`: MAISI's HU), with
    ``intensity.background_value`` where ``background``; else as it is (a normalised MR intensity)."""
    spec = model.config.get("intensity") or {}
    if model.output_range is not None:
        lo, hi = model.output_range
        vol.array = (lo + np.asarray(vol.array, np.float32) * (hi - lo)).astype(np.float32)
    if background is not None and "background_value" in spec:
        vol.array[background] = float(spec["background_value"])
    return vol


def _on_map_grid(
    image: np.ndarray | torch.Tensor, grid: ModelGrid, labels: Volume, clip: tuple[float | None, float | None]
) -> Volume:
    """An image in [0, 1] (within ``clip``: `ModelConfigView.output_clip`) on the model's grid, brought onto the
    label map's grid."""
    image = np.asarray(torch.as_tensor(image).clamp(*clip).cpu())
    vol = grid_to_volume(image, grid, labels)
    vol.array = np.clip(np.asarray(vol.array, np.float32), *clip)
    return vol


def _with_previews(
    on_step: Callable[[StepInfo], None] | None,
    on_preview: Callable[[Volume], None] | None,
    every: int,
    to_volume: Callable[[torch.Tensor], Volume],
) -> Callable[[StepInfo], None] | None:
    """The loop's step hook: progress, and every ``every`` steps (not the last: the result follows) a preview."""
    if on_preview is None or not every:
        return on_step

    def hook(info: StepInfo) -> None:
        if on_step is not None:
            on_step(info)
        if info.index % every == 0 and info.index < info.total:
            on_preview(to_volume(info.pred_x0))

    return hook


def changed_labels_mask(before: Volume, after: Volume, margin_voxels: int = 1) -> np.ndarray:
    """Where an edited label map differs from the original (both on one grid), grown by ``margin_voxels``: the
    region "regenerate what I changed" fills (the margin takes in the partial-volume border around a change)."""
    from scipy import ndimage

    a, b = as_3d(before.array, "the original label map"), as_3d(after.array, "the edited label map")
    if a.shape != b.shape or not np.allclose(before.affine, after.affine, atol=1e-4):
        raise MeddiffError(
            f"the edited label map ({'x'.join(map(str, b.shape))}) is not on the original's grid "
            f"({'x'.join(map(str, a.shape))}, same affine): edit a copy of the map itself"
        )
    if int(margin_voxels) < 0:
        raise MeddiffError(f"the margin must be >= 0 voxels, got {margin_voxels}")
    changed = np.asarray(a) != np.asarray(b)
    if not changed.any():
        raise MeddiffError("the edited label map is the same as the original: nothing was changed to regenerate")
    if margin_voxels:
        changed = ndimage.binary_dilation(changed, structure=np.ones((3, 3, 3), bool), iterations=int(margin_voxels))
    return changed
