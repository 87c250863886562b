"""Diffusion segmentation with ensemble uncertainty, through the one denoising loop.

A segmentation model denoises one-hot labels (``{-1, 1}`` per class) with the normalised image concatenated
to the UNet input (``condition``). An *ensemble* runs the chain N times from independent noise. Members are
combined one of two ways (``combine``; the model's ``defaults.combine``, else votes):

- ``votes``: each member's label is the argmax of its denoised class channels; the probabilities are the
  fraction of members voting each class;
- ``probabilities``: each member's class probabilities are ``clip((z + 1) / 2, 0, 1)`` of its denoised class
  channels ``z``, normalised (a model that predicts the one-hot map with an MSE loss outputs its conditional
  mean, i.e. the class posteriors); the probabilities are their mean over members.

Then, per voxel:

- **probabilities**: as above (they sum to 1), blended between overlapping tiles and resampled *linearly* onto
  the input grid;
- **labels**: argmax of the resampled probabilities (with votes: the majority vote; ties go to the lower class
  index), so the labels overlay the image exactly;
- **uncertainty**: the entropy of the model-grid probabilities divided by ``log(num_classes)``, in [0, 1]: with
  votes, 0 where all members agree and 1 only when the votes are spread evenly over all classes (so N=2 tops out
  at ``log 2 / log C``; an ensemble of 1 has no uncertainty); with probabilities, also where one member is
  unsure. Computed on the model grid, resampled linearly;
- **volumes**: voxels of each label in the input grid times the input voxel volume, in mL.

Geometry: any input (size, voxel size, orientation, obliquity) is normalised with the model's intensity spec,
resampled onto a world-aligned model grid at the model's voxel size that covers the content of the scan
(``region="content"``: the bounding box of voxels above 15 % of the intensity window, plus a margin) or the
whole field of view (``region="full"``), and cut into model-sized tiles (2D models: slice by slice along a
world axis, in-plane tiles when the region is wider than the model; 3D models: overlapping 3D tiles when
larger). Outside the model grid everything is class 0 (background).

Randomness: member ``m`` of tile/slice ``i`` starts from noise seeded by ``(seed, m, i)``, so a result does
not depend on the batch size, and members ``0..k-1`` of a larger ensemble are exactly an ensemble of ``k``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from napari_meddiff.choices import COMBINE_METHODS, DEFAULT_COMBINE
from napari_meddiff.diffusion.loop import StepInfo, denoise
from napari_meddiff.diffusion.seeds import check_seed, initial_noise
from napari_meddiff.errors import Cancelled, MeddiffError
from napari_meddiff.io.geometry import (
    ModelGrid,
    grid_to_volume,
    make_grid,
    sample_on_grid,
    slice_axis_order,
    snap_grid,
    world_axis,
    world_box,
)
from napari_meddiff.io.intensity import intensity_window, normalise
from napari_meddiff.io.volume import Volume
from napari_meddiff.models import DiffusionModel
from napari_meddiff.runtime.memory import check_fits
from napari_meddiff.tasks.footprint import check_request_fits
from napari_meddiff.tasks.inputs import as_3d, check_finite_voxels, check_not_constant
from napari_meddiff.tasks.settings import prepare_model, provenance, resolve_settings

DEFAULT_ENSEMBLE = 5
CONTENT_THRESHOLD = 0.15  # of the normalised intensity window: what counts as "content" for region="content"
TILE_OVERLAP = 0.25  # fraction of a tile shared with its neighbour when the region needs several tiles
AUTO_BATCH_VOXELS = {"cpu": 16 * 64 * 64, "cuda": 512 * 64 * 64}  # voxels per network evaluation (auto batch);
# on CPU small batches are faster per sample (measured: 16 slices of 64x64 beat 64 or 128)
PROBABILITY_DEFINITIONS = {
    "votes": "fraction of ensemble members voting each class (argmax of denoised channels)",
    "probabilities": "mean over ensemble members of each member's class probabilities (clip((z + 1) / 2) "
    "of its denoised channels z, normalised)",
}
UNCERTAINTY_DEFINITIONS = {
    "votes": "entropy of the vote fractions / log(num_classes), in [0, 1]",
    "probabilities": "entropy of the mean class probabilities / log(num_classes), in [0, 1]",
}


@dataclasses.dataclass
class SegmentationResult:
    """Everything on the input's own grid (its affine and shape)."""

    labels: Volume  # uint8 (int16 for > 255 classes) class indices
    probabilities: Volume  # float32 (*input shape, num_classes), sums to 1 over the last axis
    uncertainty: Volume  # float32 in [0, 1]
    volumes_ml: dict[str, float]  # class name -> mL (background included)
    provenance: dict

    @property
    def class_names(self) -> list[str]:
        return list(self.volumes_ml)


@dataclasses.dataclass
class SegmentProgress:
    """What ``on_step`` receives after every denoising step of every batch."""

    step: StepInfo  # the step within the running batch
    batch: int  # 1-based index of the running batch
    batches: int
    members: tuple[int, ...]  # ensemble members (0-based) in the running batch
    member_fraction: tuple[float, ...]  # how far each ensemble member is, 0..1
    fraction: float  # overall, 0..1
    elapsed: float  # seconds since the ensemble started

    @property
    def eta_seconds(self) -> float:
        return self.elapsed / self.fraction * (1.0 - self.fraction) if self.fraction > 0 else float("nan")


@dataclasses.dataclass
class SegmentationPlan:
    """Where the model runs: the model grid over the scan and the model-sized tiles (items) cut from it."""

    grid: ModelGrid
    image: np.ndarray  # normalised image on the grid (grid shape)
    tile_shape: tuple[int, ...]  # the model's image shape
    starts: list[tuple[int, ...]]  # per item: tile start on the grid's tiled axes (+ slice index for 2D)
    weights: list[np.ndarray]  # per item: blending weight of the tile (tile shape)
    slicing: bool  # 2D model run slice by slice along grid axis 2
    axis: str | None  # world axis of the slices (2D models)
    window: tuple[float, float]  # intensity window (scanner units) mapped to [0, 1]
    context: int = 0  # 2D: neighbouring slices on each side that go with each slice (the model's context_slices)
    context_image: np.ndarray | None = None  # with context: the image on the grid plus `context` slices either side

    @property
    def num_items(self) -> int:
        return len(self.starts)

    def item_images(self) -> np.ndarray:
        """(num_items, *tile_shape) normalised image tiles; with ``context`` c, (num_items, 2c + 1, *tile_shape):
        each slice tile with the same tile of its c neighbouring slices on either side, read from the scan beyond
        the grid too (zeros only beyond the scan, as in training)."""
        if not self.context:
            return np.stack([self.image[self._index(s)] for s in self.starts]).astype(np.float32)
        wide = self.context_image
        out = np.zeros((self.num_items, 2 * self.context + 1, *self.tile_shape), np.float32)
        for n, (s0, s1, k) in enumerate(self.starts):
            for c in range(2 * self.context + 1):  # slice k + c - context is wide's slice k + c
                out[n, c] = wide[self._index((s0, s1, k + c))]
        return out

    def _index(self, start: tuple[int, ...]) -> tuple:
        t = self.tile_shape
        if self.slicing:
            return (slice(start[0], start[0] + t[0]), slice(start[1], start[1] + t[1]), start[2])
        return tuple(slice(s, s + n) for s, n in zip(start, t))


def class_names(model: DiffusionModel) -> list[str]:
    seg = model.config.get("segmentation") or {}
    n = int(seg.get("num_classes", model.sample_shape[0]))
    names = list(seg.get("class_names") or [])
    return [str(names[c]) if c < len(names) else f"class {c}" for c in range(n)]


def check_segmentation_model(model: DiffusionModel) -> int:
    if model.kind != "segmentation":
        raise MeddiffError(f"{model.name} is a {model.kind} model, not a segmentation model")
    n = int((model.config.get("segmentation") or {}).get("num_classes", model.sample_shape[0]))
    unet = model.config["networks"]["unet"]
    c = model.context_slices
    if c and model.spatial_dims != 2:
        raise MeddiffError(f"{model.name}: context_slices is for 2D models, this one is {model.spatial_dims}D")
    images = 1 + 2 * c
    if int(unet["out_channels"]) != n or int(unet["in_channels"]) != n + images:
        raise MeddiffError(
            f"{model.name}: a segmentation UNet needs num_classes + {images} image channel(s) = {n + images} input "
            f"and {n} output channels, not {unet['in_channels']} and {unet['out_channels']}"
        )
    if model.spatial_dims not in (2, 3) or len(model.image_shape) != model.spatial_dims:
        raise MeddiffError(
            f"{model.name}: image_shape {model.image_shape} does not match spatial_dims {model.spatial_dims}"
        )
    return n


# --- geometry ------------------------------------------------------------------------------------


def _content_box(norm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Voxel index box (inclusive) of the scan's content: planes holding enough voxels above the threshold."""
    fg = norm > CONTENT_THRESHOLD
    lo, hi = np.zeros(3, int), np.array(norm.shape) - 1
    if not fg.any():
        return lo, hi
    for a in range(3):
        counts = fg.sum(axis=tuple(b for b in range(3) if b != a))
        keep = np.nonzero(counts >= max(3, 0.01 * counts.max()))[0]
        if keep.size:
            lo[a], hi[a] = keep[0], keep[-1]
    return lo, hi


def _tile_starts(length: int, tile: int) -> list[int]:
    if length <= tile:
        return [0]
    stride = max(1, int(round(tile * (1.0 - TILE_OVERLAP))))
    n = int(math.ceil((length - tile) / stride)) + 1
    return sorted({int(round(s)) for s in np.linspace(0, length - tile, n)})


def _ramp(tile: int, several: bool) -> np.ndarray:
    """1D blending weight: flat for a single tile, a tent with a floor for overlapping tiles."""
    if not several:
        return np.ones(tile, np.float32)
    ramp = max(1.0, tile * TILE_OVERLAP)
    i = np.arange(tile, dtype=np.float32) + 0.5
    return np.clip(np.minimum(i, tile - i) / ramp, 1e-3, 1.0).astype(np.float32)


def plan_segmentation(
    model: DiffusionModel,
    image: Volume,
    *,
    axis: str | int | None = None,
    region: str = "content",
    window: tuple[float, float] | None = None,
) -> SegmentationPlan:
    """Normalise ``image``, place the model grid over it and cut it into model-sized tiles.

    ``window``: the (low, high) scanner values mapped to 0 and 1; default: the model's intensity spec.
    """
    image = Volume(as_3d(image.array, "the image"), image.affine, dict(image.metadata))
    if region not in ("content", "full"):
        raise MeddiffError(f"region must be 'content' or 'full', not {region!r}")
    arr = np.asarray(image.array, dtype=np.float32)
    check_finite_voxels(arr, "segment")
    if window is None:
        window = intensity_window(arr, model.config.get("intensity"))
    elif not (np.isfinite(window).all() and float(window[1]) > float(window[0])):
        raise MeddiffError(f"intensity window must be two finite numbers low < high, not {window}")
    window = (float(window[0]), float(window[1]))
    norm = normalise(arr, window)
    if region == "content":
        lo, hi = _content_box(norm)
    else:
        lo, hi = np.zeros(3, int), np.array(norm.shape) - 1
    wlo, whi = world_box(image.affine, lo, hi)
    tile = model.image_shape
    slicing = model.spatial_dims == 2
    if slicing:
        if axis is None:
            axis = int(model.config.get("slice_axis", 2))
        a = world_axis(axis)
        order = slice_axis_order(a)
        inplane = [float(v) for v in model.voxel_size]
        thick = float(model.config.get("slice_thickness") or np.mean(inplane))
        voxel = (inplane[0], inplane[1], thick)
        axis_name = {0: "sagittal", 1: "coronal", 2: "axial"}[a]
    else:
        order = (0, 1, 2)
        voxel = tuple(float(v) for v in model.voxel_size)
        axis_name = None
    margin = 2.0 * max(voxel)
    flo, fhi = world_box(image.affine, np.zeros(3, int), np.array(norm.shape) - 1)
    tiled_axes = 2 if slicing else 3
    shape, centre = [0, 0, 0], np.zeros(3)
    for g in range(3):
        w = order[g]
        if g < tiled_axes and whi[w] - wlo[w] <= (tile[g] - 1) * voxel[g]:  # fits one tile: centre it there
            shape[g], centre[w] = tile[g], (wlo[w] + whi[w]) / 2
            continue
        lo, hi = max(wlo[w] - margin, flo[w]), min(whi[w] + margin, fhi[w])  # no further than the scan itself
        shape[g] = int(math.ceil((hi - lo) / voxel[g] - 1e-6)) + 1
        if g < tiled_axes:
            shape[g] = max(shape[g], tile[g])
        centre[w] = (lo + hi) / 2
    check_fits(
        4.0 * (3 + model.sample_shape[0]) * math.prod(float(n) for n in shape),
        f"the model grid over this image ({'x'.join(map(str, shape))} voxels of {voxel} mm)",
        advice="check the voxel size in the image's header",
    )
    grid = snap_grid(make_grid(voxel, shape, centre, order), image)  # no resampling where the lattices agree
    # with context slices, `context` more slices either side: the neighbours of the first and last slices come
    # from the scan where it has them
    context = model.context_slices if slicing else 0
    below = np.eye(4)
    below[2, 3] = -context
    wide = ModelGrid(grid.affine @ below, (shape[0], shape[1], shape[2] + 2 * context))
    wide_image = sample_on_grid(Volume(norm, image.affine), wide, default=0.0)
    grid_image = wide_image[:, :, context : context + shape[2]]

    per_axis = [_tile_starts(shape[g], tile[g]) for g in range(tiled_axes)]
    ramps = [_ramp(tile[g], len(per_axis[g]) > 1) for g in range(tiled_axes)]
    weight = ramps[0]
    for r in ramps[1:]:
        weight = np.multiply.outer(weight, r)
    starts: list[tuple[int, ...]] = []
    if slicing:
        for k in range(shape[2]):
            starts += [(s0, s1, k) for s0, s1 in itertools.product(*per_axis)]
    else:
        starts = [tuple(s) for s in itertools.product(*per_axis)]
    return SegmentationPlan(
        grid=grid,
        image=grid_image,
        tile_shape=tuple(tile),
        starts=starts,
        weights=[weight] * len(starts),
        slicing=slicing,
        axis=axis_name,
        window=window,
        context=context,
        context_image=wide_image if context else None,
    )


# --- the ensemble ---------------------------------------------------------------------------------


def member_seed(seed: int, member: int, item: int) -> int:
    """The noise seed of ensemble member ``member`` on tile/slice ``item``."""
    if seed < 0:
        raise MeddiffError(f"seed must be non-negative, got {seed}")
    state = np.random.SeedSequence([int(seed), int(member), int(item)]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


def auto_batch_size(model: DiffusionModel, device: torch.device) -> int:
    voxels = int(np.prod(model.image_shape))
    return max(1, AUTO_BATCH_VOXELS.get(device.type, AUTO_BATCH_VOXELS["cpu"]) // voxels)


def run_members(
    model: DiffusionModel,
    images: np.ndarray,
    members: Sequence[int],
    *,
    seed: int = 0,
    sampler: str = "dpm++",
    steps: int = 20,
    precision: str = "fp32",
    batch_size: int = 16,
    on_step: Callable[[SegmentProgress], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    probabilities: bool = False,
) -> np.ndarray:
    """Each member's label map for each normalised image tile (``images``: ``(num_items, *tile)``, or
    ``(num_items, channels, *tile)`` with context slices): ``(len(members), num_items, *tile)`` uint8;
    with ``probabilities``, each member's class probabilities instead: ``(len(members), num_items, C, *tile)``
    float16 (`member_probabilities` of its denoised class channels).

    (member, item) pairs are run member-major in batches of ``batch_size`` through `sampling.denoise`.
    """
    if batch_size < 1:
        raise MeddiffError("batch size must be at least 1")
    n_classes = model.sample_shape[0]
    items = images.shape[0]
    tile = tuple(images.shape[-len(model.image_shape) :])
    dev = model.device
    pairs = [(mi, i) for mi in range(len(members)) for i in range(items)]
    if probabilities:
        out = np.zeros((len(members), items, n_classes, *tile), np.float16)
    else:
        out = np.zeros((len(members), items, *tile), np.uint8 if n_classes <= 256 else np.int16)
    batches = int(math.ceil(len(pairs) / batch_size))
    done = np.zeros(len(members), np.int64)  # finished (item, step) evaluations per member
    per_member = max(1, items * steps)
    start = time.perf_counter()
    cond_all = torch.from_numpy(np.ascontiguousarray(images, np.float32))
    if cond_all.ndim == len(tile) + 1:  # one image channel
        cond_all = cond_all.unsqueeze(1)
    for b in range(batches):
        if should_cancel is not None and should_cancel():
            raise Cancelled()
        chunk = pairs[b * batch_size : (b + 1) * batch_size]
        gens = [torch.Generator(device=dev).manual_seed(member_seed(seed, members[mi], i)) for mi, i in chunk]
        x = initial_noise((n_classes, *tile), gens, dev)
        cond = cond_all[[i for _, i in chunk]].to(dev)
        chunk_members = np.array([mi for mi, _ in chunk])
        before = done.copy()

        def hook(info: StepInfo, b=b, chunk_members=chunk_members, before=before) -> None:
            if on_step is None:
                return
            now = before + np.bincount(chunk_members, minlength=len(members)) * info.index
            on_step(
                SegmentProgress(
                    step=info,
                    batch=b + 1,
                    batches=batches,
                    members=tuple(int(members[m]) for m in np.unique(chunk_members)),
                    member_fraction=tuple(float(v) / per_member for v in now),
                    fraction=float(now.sum()) / (per_member * len(members)),
                    elapsed=time.perf_counter() - start,
                )
            )

        z = denoise(
            model,
            x,
            sampler=sampler,
            steps=steps,
            generators=gens,
            image_condition=cond,
            on_step=hook,
            should_cancel=should_cancel,
            precision=precision,
        )
        result = member_probabilities(z) if probabilities else z.argmax(1).to(torch.int16).cpu().numpy()
        for (mi, i), value in zip(chunk, result):
            out[mi, i] = value
        done += np.bincount(chunk_members, minlength=len(members)) * steps
    return out


def member_probabilities(z: torch.Tensor) -> np.ndarray:
    """A member's class probabilities from its denoised class channels ``z`` (B, C, *S) in about [-1, 1]:
    ``clip((z + 1) / 2, 0, 1)`` normalised over classes (uniform where every channel is at -1).

    A model trained to predict the one-hot map (x0, MSE) outputs the conditional mean of it, so ``(z + 1) / 2``
    estimates each class's posterior probability; samplers ending on a sample give nearly one-hot maps."""
    p = ((z.float() + 1.0) / 2.0).clamp_(0.0, 1.0)
    total = p.sum(1, keepdim=True)
    p = torch.where(total > 1e-6, p / total.clamp_min(1e-6), torch.full_like(p, 1.0 / p.shape[1]))
    return p.to(torch.float16).cpu().numpy()


def _blend_tiles(plan: SegmentationPlan, per_item, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Tile class probabilities ``per_item(i) -> (C, *tile)`` blended by the tile weights into ``(C, *grid)``,
    with their normalised entropy ``(*grid)``."""
    acc = np.zeros((num_classes, *plan.grid.shape), np.float32)
    wsum = np.zeros(plan.grid.shape, np.float32)
    for i, start in enumerate(plan.starts):
        idx = plan._index(start)
        w = plan.weights[i]
        acc[(slice(None), *idx)] += per_item(i) * w
        wsum[idx] += w
    probs = acc / np.maximum(wsum, 1e-12)
    probs[0][wsum <= 0] = 1.0  # never happens: tiles cover the grid
    return probs, normalised_entropy(probs)


def combine_probabilities(plan: SegmentationPlan, member_probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-member tile probabilities ``(M, items, C, *tile)`` -> (their mean ``(C, *grid)``, its normalised
    entropy ``(*grid)``) on the model grid, tiles blended by their weights."""
    if member_probs.shape[0] < 1:
        raise MeddiffError("an ensemble needs at least one member")
    return _blend_tiles(plan, lambda i: member_probs[:, i].astype(np.float32).mean(0), member_probs.shape[2])


def combine_votes(plan: SegmentationPlan, member_labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-member tile labels -> (probabilities ``(C, *grid)``, uncertainty ``(*grid)``) on the model grid."""
    m = member_labels.shape[0]
    if m < 1:
        raise MeddiffError("an ensemble needs at least one member")

    def votes(i: int) -> np.ndarray:
        return np.stack([(member_labels[:, i] == c).sum(0) for c in range(num_classes)]).astype(np.float32) / m

    return _blend_tiles(plan, votes, num_classes)


def normalised_entropy(probs: np.ndarray, axis: int = 0) -> np.ndarray:
    """Entropy of class frequencies (classes along ``axis``) divided by log(num_classes), in [0, 1]."""
    c = probs.shape[axis]
    if c < 2:
        return np.zeros(np.delete(probs.shape, axis), np.float32)
    p = np.clip(probs, 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=axis)
    return np.clip(h / math.log(c), 0.0, 1.0).astype(np.float32)


def to_input_grid(
    plan: SegmentationPlan, probs: np.ndarray, uncertainty: np.ndarray, image: Volume
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Model-grid probabilities/uncertainty -> input grid (linear); labels = argmax of the probabilities."""
    ref = Volume(as_3d(image.array, "the image"), image.affine, dict(image.metadata))
    resampled = [grid_to_volume(p, plan.grid, ref).array for p in probs]
    p = np.stack(resampled, axis=-1).astype(np.float32)
    p = np.clip(p, 0.0, 1.0)
    p[..., 0] += np.clip(1.0 - p.sum(-1), 0.0, 1.0)  # outside the model grid: background
    p /= p.sum(-1, keepdims=True)
    u = np.clip(grid_to_volume(uncertainty, plan.grid, ref).array, 0.0, 1.0).astype(np.float32)
    labels = p.argmax(-1).astype(np.uint8 if p.shape[-1] <= 256 else np.int16)
    if np.asarray(image.array).ndim == 2:
        labels, p, u = labels[..., 0], p[..., 0, :], u[..., 0]
    return labels, p, u


def label_volumes_ml(labels: np.ndarray, affine: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    voxel_ml = abs(float(np.linalg.det(np.asarray(affine)[:3, :3]))) / 1000.0
    counts = np.bincount(np.asarray(labels).ravel().astype(np.int64), minlength=len(names))
    return {name: float(counts[c]) * voxel_ml for c, name in enumerate(names)}


def segment(
    model: str | DiffusionModel,
    image: Volume,
    *,
    ensemble: int = DEFAULT_ENSEMBLE,
    sampler: str | None = None,
    steps: int | None = None,
    seed: int = 0,
    axis: str | int | None = None,
    device: str = "auto",
    precision: str | None = None,
    batch_size: int | None = None,
    region: str = "content",
    window: tuple[float, float] | None = None,
    combine: str | None = None,
    on_step: Callable[[SegmentProgress], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> SegmentationResult:
    """Segment ``image`` with a diffusion segmentation model and an ensemble of ``ensemble`` samples.

    ``axis`` (2D models): world axis to slice along, default the model's training axis (axial).
    ``batch_size``: (member, tile) samples per network evaluation; default: as many 64^3 voxels' worth as
    fit (16 slices of 64x64 on CPU, 512 on CUDA). The result does not depend on it.
    ``region``: ``"content"`` (the scan's bright part, plus a margin) or ``"full"`` (its whole field of view).
    ``window``: scanner values mapped to 0 and 1 (default: the model's intensity spec, e.g. percentiles).
    ``combine``: ``"votes"`` (members' label votes) or ``"probabilities"`` (members' mean class probabilities);
    default: the model's ``defaults.combine``, else votes.
    ``on_step`` gets a `SegmentProgress` after every denoising step.
    """
    t0 = time.perf_counter()
    model, dev = prepare_model(model, device)
    n_classes = check_segmentation_model(model)
    if not isinstance(image, Volume):
        raise MeddiffError("image must be a Volume (see napari_meddiff.read_volume)")
    if int(ensemble) < 1:
        raise MeddiffError(f"ensemble size must be at least 1, got {ensemble}")
    settings = resolve_settings(
        model, "segment", dev, sampler=sampler, steps=steps, precision=precision, combine=combine
    )
    combine = settings["combine"] = settings["combine"] or DEFAULT_COMBINE
    if combine not in COMBINE_METHODS:
        raise MeddiffError(f"combine must be one of {', '.join(COMBINE_METHODS)}, not {combine!r}")
    if settings["steps"] < 1:
        raise MeddiffError(f"steps must be a positive integer, got {settings['steps']}")
    batch_size = int(batch_size) if batch_size is not None else auto_batch_size(model, dev)
    seed = check_seed(seed)
    check_not_constant(np.asarray(image.array), "segment")
    plan = plan_segmentation(model, image, axis=axis, region=region, window=window)
    # members' results held until combined: uint8 labels (1/4 of a float32 voxel) or float16 probabilities
    member_voxels = float(np.prod(plan.tile_shape)) * (n_classes / 2 if combine == "probabilities" else 0.25)
    outputs_voxels = (n_classes + 2) * float(np.prod(image.shape[:3]))  # probabilities, labels, uncertainty
    check_request_fits(
        model, batch=batch_size, what=f"an ensemble of {int(ensemble)} members (batch {batch_size})",
        held_voxels=int(ensemble) * len(plan.starts) * member_voxels + outputs_voxels,
    )  # fmt: skip
    members = run_members(
        model, plan.item_images(), list(range(int(ensemble))), seed=seed, sampler=settings["sampler"],
        steps=settings["steps"], precision=settings["precision"], batch_size=batch_size, on_step=on_step,
        should_cancel=should_cancel, probabilities=combine == "probabilities",
    )  # fmt: skip
    if combine == "probabilities":
        probs, unc = combine_probabilities(plan, members)
    else:
        probs, unc = combine_votes(plan, members, n_classes)
    labels, p, u = to_input_grid(plan, probs, unc, image)
    volumes = label_volumes_ml(labels, image.affine, class_names(model))
    record = _segmentation_record(model, dev, plan, settings, ensemble=int(ensemble), seed=seed,
                                  batch_size=batch_size, region=region, volumes=volumes)  # fmt: skip
    record["seconds"] = round(time.perf_counter() - t0, 3)
    meta = {k: v for k, v in image.metadata.items() if k in ("qform_code", "sform_code", "format", "source_path")}

    def output(array: np.ndarray, what: str) -> Volume:
        descrip = f"meddiff segment {model.name} {what}"
        return Volume(array, image.affine.copy(), {**meta, "descrip": descrip, "provenance": record})

    return SegmentationResult(
        labels=output(labels, "labels"), probabilities=output(p, "probabilities"),
        uncertainty=output(u, "uncertainty"), volumes_ml=volumes, provenance=record,
    )  # fmt: skip


def _segmentation_record(model, dev, plan: SegmentationPlan, settings: dict, *, ensemble: int, seed: int,
                         batch_size: int, region: str, volumes: dict[str, float]) -> dict:  # fmt: skip
    """What the segmentation outputs record: the model, the ensemble and its settings, the model grid."""
    combine = settings["combine"]
    return provenance(
        model, dev, task="segment", classes=class_names(model), ensemble=ensemble, seed=seed,
        sampler=settings["sampler"], steps=settings["steps"], precision=settings["precision"], batch_size=batch_size,
        axis=plan.axis, region=region, model_grid_shape=list(plan.grid.shape),
        model_voxel_size=[float(abs(v)) for v in np.sqrt((plan.grid.affine[:3, :3] ** 2).sum(0))],
        tiles=plan.num_items, intensity_window=[float(w) for w in plan.window], combine=combine,
        probabilities=PROBABILITY_DEFINITIONS[combine], uncertainty=UNCERTAINTY_DEFINITIONS[combine],
        volumes_ml={k: round(v, 3) for k, v in volumes.items()},
    )  # fmt: skip
