"""Mask-based inpainting (lesion filling, tissue insertion, artefact repair) with DDPM and latent models.

Everything outside the mask is returned exactly as it came in: the model works on its own grid (voxel size,
field of view, intensity range) and only voxels inside the mask are ever written back.

How it works, for an image of any size and voxel size:

1. The mask is brought onto the image grid (nearest neighbour when it has another grid over the same world
   region) and its label picked. The intensity window comes from the image's own intensities (the model's
   ``intensity`` spec, as in training).
2. A model grid is placed over the image: the model's field of view and voxel size, centred on the
   foreground like the training data, shifted just enough to hold the mask plus a margin. 3D models use one
   such grid; 2D models run slice by slice along ``axis`` (in-plane grid of the model, the image's own
   spacing through-plane), and only on the slices the mask touches. Only the part of the image under the
   grid is resampled, so a 256^3 scan with a small mask costs about what one model sample costs.
3. The known region is pasted into the chain after every step through the one denoising loop's ``known``
   hook: for pixel models it is re-noised to the current timestep (RePaint, with optional resampling
   jumps); for latent models the normalised grid image is encoded (mean latents) and the known latents are
   re-noised and blended outside the mask, downsampled to the latent grid and dilated by one latent voxel,
   then the result is decoded.
   A label-map model also takes the (edited) tissue map, resampled onto the same grid (nearest neighbour),
   as generating from a map gives it (`from_labels.map_inputs`): the fill follows the new labels.
4. The generated grid image is resampled back onto the bounding box of the mask only, converted back to
   scanner units and written inside the mask (optionally feathered over a few voxels, inside the mask
   only, towards the original values).
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from napari_meddiff.autoencoder.passes import decode_latents, encode_images
from napari_meddiff.diffusion.loop import StepInfo, denoise, repaint_schedule
from napari_meddiff.diffusion.samplers import make_sampler
from napari_meddiff.diffusion.seeds import initial_noise, seed_range, seeded_generators
from napari_meddiff.errors import MeddiffError
from napari_meddiff.io.geometry import (
    ModelGrid,
    index_box,
    make_grid,
    slice_axis_order,
    slice_grid,
    snap_grid,
    world_axis,
    world_box,
    world_centre,
)
from napari_meddiff.io.intensity import denormalise, intensity_window, normalise
from napari_meddiff.io.volume import Volume, resample_like, world_extent_overlaps
from napari_meddiff.models import DEFAULT_INPAINT_MODEL, DiffusionModel
from napari_meddiff.tasks.footprint import check_request_fits
from napari_meddiff.tasks.from_labels import checked_label_map, labels_on_grid, map_inputs, require_label_map
from napari_meddiff.tasks.inputs import as_3d, check_scan_values
from napari_meddiff.tasks.settings import prepare_model, provenance, resolve_settings

# Sampling, RePaint and feathering defaults: `napari_meddiff.tasks.settings.task_defaults`.
MARGIN_MODEL_VOXELS = 3  # known context kept around the mask inside the model's field of view
MAX_WINDOW_VOXELS = 2_000_000  # intensity window estimated on a regular subsample of at most this size


@dataclasses.dataclass
class InpaintPreview:
    """A look at candidate ``candidate`` during sampling: ``patch`` replaces ``image[region]``."""

    step: StepInfo
    candidate: int  # 0-based
    region: tuple[slice, ...]  # in the input array's index space
    patch: np.ndarray  # input dtype; the original outside the mask


# --- mask ----------------------------------------------------------------------------------------


def _select(array: np.ndarray, label: float | None) -> np.ndarray:
    if label is None:
        return np.asarray(array != 0) & ~np.isnan(array) if np.issubdtype(array.dtype, np.floating) else array != 0
    return array == label


def mask_on_image(image: Volume, mask: Volume | np.ndarray, label: float | None = None) -> np.ndarray:
    """The boolean mask (``label``, or every non-zero voxel) on ``image``'s grid, or a clear error.

    A mask array must have the image's shape. A mask `Volume` on another grid is resampled onto the image
    grid with nearest neighbour when their world extents overlap; one that does not overlap is refused.
    """
    if label is not None:
        if isinstance(label, bool) or not isinstance(label, (int, float, np.integer, np.floating)):
            raise MeddiffError(f"label must be a number, got {label!r}")
        if label == 0:
            raise MeddiffError("label 0 is the background; choose the label value to fill (or none for all non-zero)")
    shape = as_3d(image.array, "the image").shape
    ivol = _geometry_only(image.affine, shape)
    if isinstance(mask, Volume):
        marr = as_3d(mask.array, "the mask")
        if marr.shape == shape and np.allclose(mask.affine, image.affine, atol=1e-4):
            selected = _select(marr, label)
            resampled = False
        else:
            mvol = _geometry_only(mask.affine, marr.shape)
            if not world_extent_overlaps(mvol, ivol):
                raise MeddiffError(
                    "the mask does not overlap the image in world space (another scan, or a wrong affine); "
                    "draw the mask on this image"
                )
            if not _same_extent(mvol, ivol):
                warnings.warn(
                    "the mask covers another world region than the image; only the overlap is used",
                    stacklevel=3,
                )
            sel = _select(marr, label).astype(np.float32)
            selected = resample_like(Volume(sel, mask.affine), ivol, labels=True).array > 0.5
            resampled = True
    else:
        marr = as_3d(mask, "the mask")
        if marr.shape != shape:
            raise MeddiffError(
                f"mask shape {tuple(np.shape(mask))} differs from the image shape {tuple(image.shape)}; "
                "pass the mask as a Volume (with its affine) to resample it onto the image"
            )
        selected = _select(marr, label)
        resampled = False
    if not selected.any():
        if label is not None and np.any(_select(marr, None)):
            present = [v for v in np.unique(marr).tolist() if v != 0][:10]
            raise MeddiffError(
                f"no voxel of the mask has label {label:g} (labels present: {', '.join(f'{v:g}' for v in present)})"
            )
        where = " after resampling onto the image grid" if resampled else ""
        raise MeddiffError(f"the mask is empty{where}: paint the region to fill")
    if selected.all():
        raise MeddiffError("the mask covers the whole image: nothing is left to inpaint from (use generate instead)")
    return np.ascontiguousarray(selected)


def _geometry_only(affine: np.ndarray, shape: Sequence[int]) -> Volume:
    """A volume standing for a grid (shape and affine), with no memory behind its array."""
    return Volume(np.broadcast_to(np.float32(0), tuple(shape)), affine)


def _same_extent(a: Volume, b: Volume) -> bool:
    ea = world_box(a.affine, (-0.5,) * 3, np.array(a.shape[:3]) - 0.5)
    eb = world_box(b.affine, (-0.5,) * 3, np.array(b.shape[:3]) - 0.5)
    tol = 0.51 * max(max(a.spacing), max(b.spacing))
    return bool(np.allclose(ea[0], eb[0], atol=tol) and np.allclose(ea[1], eb[1], atol=tol))


# --- geometry ------------------------------------------------------------------------------------


def _bbox(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) index bounds of the non-zero voxels, hi exclusive (cheap: projections, no argwhere)."""
    lo, hi = [], []
    for ax in range(mask.ndim):
        proj = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(mask.ndim) if a != ax)))
        lo.append(int(proj[0]))
        hi.append(int(proj[-1]) + 1)
    return np.array(lo), np.array(hi)


def _crop(vol: Volume, lo: Sequence[int], hi: Sequence[int]) -> Volume:
    """A view of ``vol`` on the index box [lo, hi) with the matching affine."""
    shift = np.eye(4)
    shift[:3, 3] = lo
    region = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    return Volume(vol.array[region], vol.affine @ shift)


def _grid_world_box(grid: ModelGrid) -> tuple[np.ndarray, np.ndarray]:
    return world_box(grid.affine, (0, 0, 0), np.array(grid.shape) - 1)


def _fit_centre(centre: np.ndarray, world_axes: Sequence[int], half: Sequence[float], need_lo, need_hi) -> np.ndarray:
    """Shift ``centre`` along ``world_axes`` so [need_lo, need_hi] lies within centre +- half."""
    centre = np.array(centre, dtype=float)
    names = "x (left-right)", "y (posterior-anterior)", "z (inferior-superior)"
    for w, h in zip(world_axes, half):
        if need_hi[w] - need_lo[w] > 2 * h + 1e-6:
            raise MeddiffError(
                f"the mask (with a margin) spans {need_hi[w] - need_lo[w]:.0f} mm along {names[w]}, more than the "
                f"model's field of view of {2 * h:.0f} mm; inpaint a smaller region at a time"
            )
        centre[w] = float(np.clip(centre[w], need_hi[w] - h, need_lo[w] + h))
    return centre


def _foreground_centre(image: Volume, window: tuple[float, float], stride: int) -> np.ndarray:
    """World centre of the foreground's bounding box (normalised intensity > 0.02, as the training data)."""
    sub = np.asarray(image.array[::stride, ::stride, ::stride])
    fg = sub > window[0] + 0.02 * (window[1] - window[0])
    if not fg.any():
        return world_centre(image)
    lo, hi = _bbox(fg)
    centre_idx = (lo + hi - 1) / 2 * stride
    return (image.affine @ np.append(centre_idx, 1.0))[:3]


@dataclasses.dataclass
class _Plan:
    grid: ModelGrid  # the model grid (for 2D: in-plane x in-plane x the slices that are inpainted)
    grid_mask: np.ndarray  # bool on grid: voxels generated (the rest is known)
    slices: list[int]  # 2D: grid slice indices with mask (in the sub-grid); 3D: []
    slice_ids: list[int]  # 2D: the same slices' indices in the full slice grid (seed the chains)
    known: np.ndarray  # normalised image on the grid, float32 [0, 1]
    labels: np.ndarray | None = None  # a label-map model: the map on the grid (int64)


def _grid_mask(mask: np.ndarray, affine: np.ndarray, grid: ModelGrid, inplane_only: bool) -> np.ndarray:
    """Grid voxels whose value reaches a mask voxel when the grid is linearly resampled back (plus reach)."""
    from scipy import ndimage

    idx = np.argwhere(mask).astype(np.float64)
    m = np.linalg.inv(grid.affine) @ affine
    g = idx @ m[:3, :3].T + m[:3, 3]
    out = np.zeros(grid.shape, bool)
    f = np.floor(g)
    frac = g - f
    eps = 1e-3
    for corner in range(8):
        d = np.array([(corner >> a) & 1 for a in range(3)])
        pick = np.ones(len(g), bool)
        for a in range(3):
            # near-integer coordinates touch one grid voxel, others the two around them
            if d[a] == 0:
                pick &= frac[:, a] <= 1 - eps
            else:
                pick &= frac[:, a] >= eps
        c = (f[pick] + d).astype(np.int64)
        inside = np.all((c >= 0) & (c < np.array(grid.shape)), axis=1)
        c = c[inside]
        out[c[:, 0], c[:, 1], c[:, 2]] = True
    # a coarser input spreads each input voxel (lesion included) over several grid voxels: widen accordingly
    in_spacing = np.sqrt((affine[:3, :3] ** 2).sum(0)).max()
    grid_spacing = np.sqrt((grid.affine[:3, :3] ** 2).sum(0))
    grid_spacing = grid_spacing[:2] if inplane_only else grid_spacing
    reach = max(0, math.ceil(in_spacing / grid_spacing.min() - 1e-6) - 1)
    if reach:
        structure = np.ones((3, 3, 1 if inplane_only else 3), bool)
        out = ndimage.binary_dilation(out, structure=structure, iterations=reach)
    return out


def _plan(
    model: DiffusionModel, image: Volume, mask: np.ndarray, window: tuple[float, float], axis, stride: int
) -> _Plan:
    lo, hi = _bbox(mask)
    mlo, mhi = world_box(image.affine, lo - 0.5, hi - 0.5)
    centre = _foreground_centre(image, window, stride)
    vox = np.array(model.voxel_size, dtype=float)
    shape = np.array(model.image_shape)
    if model.spatial_dims == 3:
        margin = MARGIN_MODEL_VOXELS * vox
        half = (shape - 1) / 2 * vox
        centre = _fit_centre(centre, (0, 1, 2), half, mlo - margin, mhi + margin)
        grid = snap_grid(make_grid(vox, shape, centre), image)  # no resampling where the lattices agree
        grid_mask = _grid_mask(mask, image.affine, grid, inplane_only=False)
        slices: list[int] = []
        slice_ids: list[int] = []
    else:
        order = slice_axis_order(axis)
        a = order[2]
        dominant = np.abs(image.affine[:3, :3]).argmax(axis=0)  # world axis of each array axis
        if any(image.shape[i] < 2 for i in range(3) if dominant[i] != a):
            raise MeddiffError(
                f"the image is a single slice across the {['sagittal', 'coronal', 'axial'][a]} axis; "
                "choose the axis its slices were acquired along"
            )
        margin = _axes_margin(order, MARGIN_MODEL_VOXELS * vox)
        half = (shape - 1) / 2 * vox
        centre = _fit_centre(centre, order[:2], half, mlo - margin, mhi + margin)
        centre[a] = world_centre(image)[a]
        full = snap_grid(slice_grid(image, vox, shape, axis, centre=centre), image)
        full_mask = _grid_mask(mask, image.affine, full, inplane_only=True)
        touched = np.flatnonzero(full_mask.any(axis=(0, 1)))
        if touched.size == 0:
            raise MeddiffError("the mask falls outside the model's field of view")
        k0, k1 = int(touched[0]), int(touched[-1]) + 1
        shift = np.eye(4)
        shift[2, 3] = k0
        grid = ModelGrid(full.affine @ shift, (full.shape[0], full.shape[1], k1 - k0))
        grid_mask = full_mask[:, :, k0:k1]
        slices = [int(k) - k0 for k in touched]
        slice_ids = [int(k) for k in touched]
    known = _known_on_grid(image, grid, window)
    return _Plan(grid, grid_mask, slices, slice_ids, known)


def _axes_margin(order: Sequence[int], margin: np.ndarray) -> np.ndarray:
    out = np.zeros(3)
    out[order[0]], out[order[1]] = margin[0], margin[1]
    return out


def _known_on_grid(image: Volume, grid: ModelGrid, window: tuple[float, float]) -> np.ndarray:
    """The image resampled onto ``grid`` (linear, only the part under the grid read) and normalised."""
    wlo, whi = _grid_world_box(grid)
    lo, hi = index_box(image.affine, image.shape[:3], wlo, whi)
    if np.any(hi <= lo):
        raise MeddiffError("the model's field of view does not overlap the image")
    crop = _crop(image, lo, hi)
    crop.array = np.asarray(crop.array, dtype=np.float32)
    arr = resample_like(crop, grid.empty_volume(), labels=False, default=window[0]).array
    return normalise(arr, window)


# --- sampling ------------------------------------------------------------------------------------


def _known_hook(x0_known: torch.Tensor, keep: torch.Tensor):
    """RePaint's known-region step: the known part re-noised to ``t_next`` (exact at the end) is pasted in."""

    def hook(x: torch.Tensor, t_next: int | None, chains: Sequence, generators: Sequence) -> torch.Tensor:
        if t_next is None:
            target = x0_known
        else:
            noise = initial_noise(x.shape[1:], generators, x.device)
            target = torch.cat(
                [chains[b].add_noise(x0_known[b : b + 1], noise[b : b + 1], t_next) for b in range(x.shape[0])]
            )
        return torch.where(keep > 0.5, target.to(x.dtype), x)

    return hook


def _encode_mean(model: DiffusionModel, images: torch.Tensor, precision: str) -> torch.Tensor:
    """Normalised images -> scaled mean latents (deterministic, unlike sampling from the posterior); tiled
    (exactly) when a whole pass would not fit in memory."""
    return encode_images(model, images, precision, sample=False)


def _latent_keep(model: DiffusionModel, grid_mask: torch.Tensor) -> torch.Tensor:
    """(B, 1, *image) generated-region mask -> (B, 1, *latent) known mask (region pooled, dilated one voxel)."""
    import torch.nn.functional as F

    latent = model.sample_shape[1:]
    factor = [i // s for i, s in zip(grid_mask.shape[2:], latent)]
    pool = F.max_pool3d if grid_mask.ndim == 5 else F.max_pool2d
    gen = pool(grid_mask.float(), kernel_size=factor, stride=factor)
    gen = pool(gen, kernel_size=3, stride=1, padding=1)
    return 1.0 - gen


def _fill_for_encoding(known: np.ndarray, grid_mask: np.ndarray) -> np.ndarray:
    """The region to regenerate filled with its surroundings' mean, so it leaks nothing into known latents."""
    from scipy import ndimage

    shell = ndimage.binary_dilation(grid_mask, iterations=2) & ~grid_mask
    out = known.copy()
    out[grid_mask] = float(known[shell].mean()) if shell.any() else float(known[~grid_mask].mean())
    return out


class _Runner:
    """Runs the chains for one inpainting job: 3D grids batch candidates, 2D grids batch (candidate, slice)."""

    def __init__(self, model, plan, settings: dict, *, device, should_cancel, conditions: dict[str, float] | None):
        self.model, self.plan, self.device = model, plan, device
        self.conditions = torch.tensor([list(conditions.values())], dtype=torch.float32) if conditions else None
        keys = ("sampler", "steps", "eta", "jump_length", "jump_n", "precision")
        self.kw = {k: settings[k] for k in keys} | {"should_cancel": should_cancel}
        self.precision = settings["precision"]
        jumps = repaint_schedule(settings["steps"], settings["jump_length"], settings["jump_n"])
        self.evals = sum(1 for a, b in jumps if b == a + 1)

    def units(self, candidates: int, seed: int) -> list[tuple[int, int | None, int]]:
        """(candidate, slice or None, chain seed) per chain."""
        if self.model.spatial_dims == 3:
            return [(c, None, seed + c) for c in range(candidates)]
        out = []
        for c in range(candidates):
            for k, kid in zip(self.plan.slices, self.plan.slice_ids):
                chain_seed = int(np.random.SeedSequence([seed + c, kid]).generate_state(1)[0])
                out.append((c, k, chain_seed))
        return out

    def _arrays(self, units) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised known images and generated-region masks, (B, 1, *model image) each."""
        known, gmask = self.plan.known, self.plan.grid_mask
        if self.model.spatial_dims == 3:
            k = np.stack([known] * len(units))
            m = np.stack([gmask] * len(units))
        else:
            k = np.stack([known[:, :, u[1]] for u in units])
            m = np.stack([gmask[:, :, u[1]] for u in units])
        return (torch.from_numpy(k[:, None]).to(self.device), torch.from_numpy(m[:, None]).to(self.device))

    def _map_condition(self, units) -> dict[str, Any]:
        """A label-map model's map for the batch, as generating from a map gives it (`map_inputs`)."""
        labels = self.plan.labels
        if labels is None:  # the UNet's own inputs (e.g. MAISI's spacing), as generating gives them
            return {"network_inputs": self.model.network_inputs(len(units))}
        maps = torch.from_numpy(np.stack([labels if u[1] is None else labels[:, :, u[1]] for u in units]))
        return map_inputs(self.model, maps, self.device, self.plan.grid.spacing)

    def run(self, units, on_step, release_unet: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample a batch; returns (images in [0, 1] composited with the known grid, known, generated mask).
        ``release_unet``: free the UNet before decoding (the last batch of a process that samples no more)."""
        model = self.model
        known, gmask = self._arrays(units)
        if model.kind == "ldm":
            encode_in = torch.from_numpy(
                np.stack([_fill_for_encoding(k[0], m[0]) for k, m in zip(known.cpu().numpy(), gmask.cpu().numpy())])[
                    :, None
                ]
            ).to(self.device)
            x0_known = _encode_mean(model, encode_in, self.precision)
            keep = _latent_keep(model, gmask)
        else:
            x0_known = known
            keep = 1.0 - gmask.float()
        generators = seeded_generators([u[2] for u in units], self.device)
        x = initial_noise(model.sample_shape, generators, self.device)
        cond = None if self.conditions is None else self.conditions.expand(x.shape[0], -1)
        z = denoise(
            model,
            x,
            generators=generators,
            known=_known_hook(x0_known, keep),
            on_step=on_step,
            condition_values=cond,
            **self._map_condition(units),
            **self.kw,
        )
        if release_unet:
            model.release_unet()
        images = decode_latents(model, z, self.precision).clamp(*model.output_clip)
        return torch.where(gmask, images, known), known, gmask

    def preview(self, pred_x0: torch.Tensor, known: torch.Tensor, gmask: torch.Tensor) -> np.ndarray:
        images = decode_latents(self.model, pred_x0, self.precision).clamp(*self.model.output_clip)
        return torch.where(gmask, images, known)[:, 0].cpu().numpy()


# --- writing back --------------------------------------------------------------------------------


class _Paster:
    """Brings generated grid images back into the input, inside the mask only."""

    def __init__(self, image: Volume, mask: np.ndarray, grid: ModelGrid, window, feather_voxels: int) -> None:
        from scipy import ndimage

        lo, hi = _bbox(mask)
        self.region = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        self.ref = _crop(image, lo, hi)
        self.mask = mask[self.region]
        self.original = np.asarray(image.array)[self.region]
        self.grid, self.window = grid, window
        self.weight = np.ones(self.mask.shape, np.float32)
        if feather_voxels and feather_voxels > 0:
            # distance (voxels) to the nearest known voxel: the mask one voxel beyond its box (all known
            # unless at the image border, which does not count as known)
            plo, phi = np.maximum(lo - 1, 0), np.minimum(hi + 1, mask.shape)
            grown = mask[tuple(slice(int(a), int(b)) for a, b in zip(plo, phi))]
            pad = [(1 - (lo[i] - plo[i]), 1 - (phi[i] - hi[i])) for i in range(3)]
            padded = np.pad(grown, pad, mode="edge")
            dist = ndimage.distance_transform_edt(padded)[1:-1, 1:-1, 1:-1]
            self.weight = np.minimum(1.0, dist / (feather_voxels + 1)).astype(np.float32)

    def patch(self, grid_image: np.ndarray) -> np.ndarray:
        """A grid image (normalised) -> the input's values on ``region`` (original outside the mask)."""
        back = resample_like(Volume(np.asarray(grid_image, np.float32), self.grid.affine), self.ref).array
        values = denormalise(back, self.window)
        w = self.weight
        blended = w * values + (1.0 - w) * self.original.astype(np.float32)
        out = self.original.copy()
        dtype = out.dtype
        if np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            blended = np.clip(np.rint(blended), info.min, info.max)
        elif dtype == np.bool_:
            blended = blended > 0.5
        out[self.mask] = blended[self.mask].astype(dtype)
        return out


# --- entry point ---------------------------------------------------------------------------------


def inpaint(
    model: str | DiffusionModel = DEFAULT_INPAINT_MODEL,
    image: Volume | None = None,
    mask: Volume | np.ndarray | None = None,
    *,
    label: float | None = None,
    labels: Volume | None = None,
    sampler: str | None = None,
    steps: int | None = None,
    seed: int = 0,
    candidates: int = 1,
    axis: int | str = "axial",
    jump_length: int | None = None,
    jump_n: int | None = None,
    feather_voxels: int | None = None,
    eta: float = 0.0,
    batch_size: int = 8,
    device: str = "auto",
    precision: str | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
    on_preview: Callable[[InpaintPreview], None] | None = None,
    preview_every: int | None = None,
    should_cancel: Callable[[], bool] | None = None,
    conditions: Mapping[str, float] | None = None,
    release_unet: bool = False,
) -> list[Volume]:
    """Fill the masked region of ``image`` with the model; one `Volume` per candidate, on the input's grid.

    ``conditions``: a conditional model's named conditions (missing ones take their defaults).
    ``labels``: a label-map model's tissue map of the scan (as edited: the fill follows it; see
    `changed_labels_mask` to regenerate only what was changed), any grid over the scan's region.
    ``release_unet``: free the model's UNet once the last batch is denoised, before its decoding
    (`DiffusionModel.release_unet`, as `generate`'s option: for a process that samples no more); the same result.

    ``mask``: an array of the image's shape or a `Volume` (resampled with nearest neighbour when on another
    grid over the same region); ``label`` picks one value (None: every non-zero voxel). Voxels outside the
    mask are returned bit for bit (same dtype; integers are rounded inside the mask).

    ``axis`` (2D models only): the world axis to run slices along, ``axial`` (default), ``coronal``,
    ``sagittal`` or 0/1/2; only the slices the mask touches are sampled, ``batch_size`` at a time.
    ``jump_length``/``jump_n``: RePaint resampling (``jump_n=1``: none). ``feather_voxels``: blend the
    border of the fill over this many voxels, inside the mask only. Candidate ``c`` uses seed ``seed + c``
    (2D: one chain per slice, seeded from ``(seed + c, slice)``). ``on_step`` gets task-wide progress
    (``index``/``total`` over all chains); ``on_preview`` an `InpaintPreview` every ``preview_every``
    network evaluations (default: about ten per chain).
    """
    t_start = time.perf_counter()
    _check_request(image, mask, candidates=candidates, batch_size=batch_size, seed=seed)
    model, dev = prepare_model(model, device)
    if model.kind not in ("ddpm", "ldm"):
        raise MeddiffError(f"{model.name} is a {model.kind} model; inpainting needs a ddpm or ldm model")
    ax = world_axis(axis)  # validates the axis for every model
    settings = resolve_settings(
        model, "inpaint", dev, sampler=sampler, steps=steps, eta=eta, precision=precision,
        jump_length=jump_length, jump_n=jump_n, feather_voxels=feather_voxels,
    )  # fmt: skip
    _check_settings(model, settings)
    condition_values = model.condition_values(conditions)  # validates names and ranges up front
    require_label_map(model, labels)
    labels, digest = checked_label_map(model, labels) if labels is not None else (None, None)
    img3 = Volume(as_3d(image.array, "the image"), image.affine)
    selected = _checked_scan_and_mask(model, img3, mask, label)
    check_request_fits(
        model, batch=batch_size, held_voxels=(candidates + 1) * float(img3.array.size),
        what=f"{candidates} candidates of a {'x'.join(map(str, img3.shape))} image (batch {batch_size})",
    )  # fmt: skip
    stride = max(1, math.ceil((img3.array.size / MAX_WINDOW_VOXELS) ** (1 / 3)))
    sub = np.asarray(img3.array[::stride, ::stride, ::stride], dtype=np.float32)
    window = intensity_window(sub, model.config.get("intensity"))
    plan = _plan(model, img3, selected, window, ax if model.spatial_dims == 2 else axis, stride)
    if labels is not None:
        plan.labels = _labels_on_grid(model, labels, plan.grid)
    runner = _Runner(model, plan, settings, device=dev, should_cancel=should_cancel, conditions=condition_values)
    paster = _Paster(img3, selected, plan.grid, window, settings["feather_voxels"])
    progress = _Progress(model, runner, paster, on_step, on_preview, preview_every, t_start)
    grids = _sample_candidates(runner, plan, candidates, seed, batch_size, progress, release_unet)
    record = provenance(
        model, dev, task="inpaint", seed=int(seed), **_settings_record(settings, runner, label, selected),
        **({"conditions": condition_values} if condition_values else {}),
        **({"label_map_sha256": digest} if digest else {}),
        axis=["sagittal", "coronal", "axial"][ax] if model.spatial_dims == 2 else None,
        slices=len(plan.slices) if model.spatial_dims == 2 else None,
        intensity_window=[float(window[0]), float(window[1])],
        model_grid_affine=plan.grid.affine.tolist(), model_grid_shape=list(plan.grid.shape),
    )  # fmt: skip
    record.update(source=image.metadata.get("source_path"), seconds=round(time.perf_counter() - t_start, 3))
    return [_candidate_volume(image, paster, grid, record, model.name, int(seed), c) for c, grid in enumerate(grids)]


def _labels_on_grid(model: DiffusionModel, labels: Volume, grid: ModelGrid) -> np.ndarray:
    """The label map on the inpainting grid (nearest neighbour; background beyond the map; a body label derived
    where the model expects one and the map has none)."""
    if not world_extent_overlaps(labels, grid.empty_volume()):
        raise MeddiffError("the label map does not overlap the region to fill: give the scan's own tissue map")
    return labels_on_grid(model, labels, grid)[0]


def _check_request(image, mask, *, candidates, batch_size, seed) -> None:
    """Inputs of the right types and counts, before a model is loaded or any work is planned."""
    if image is None or mask is None:
        raise MeddiffError("inpaint needs an image and a mask")
    if not isinstance(image, Volume):
        raise MeddiffError("image must be a Volume (use read_volume, or Volume(array, affine))")
    for name, value, least in (("candidates", candidates, 1), ("batch_size", batch_size, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
            raise MeddiffError(f"{name} must be an integer >= {least}, got {value!r}")
    seed_range(int(seed), int(candidates))  # every candidate's seed in range


def _check_settings(model: DiffusionModel, settings: dict) -> None:
    """The resolved settings as integers where they count, checked before any work: feathering, the RePaint
    schedule, the sampler and its steps."""
    for name in ("jump_length", "jump_n", "feather_voxels"):
        settings[name] = int(settings[name])
    if settings["feather_voxels"] < 0:
        raise MeddiffError(f"feather_voxels must be >= 0, got {settings['feather_voxels']}")
    repaint_schedule(settings["steps"], settings["jump_length"], settings["jump_n"])
    spatial = model.sample_shape[1:]  # a rectified flow's timestep transform depends on the sample's size
    make_sampler(settings["sampler"], model.config["scheduler"], settings["steps"], settings["eta"], spatial)


def _checked_scan_and_mask(model: DiffusionModel, img3: Volume, mask, label: float | None) -> np.ndarray:
    """The voxels to fill on the image's grid, once the image is known to be usable by the model."""
    if not np.issubdtype(img3.array.dtype, np.number) and img3.array.dtype != np.bool_:
        raise MeddiffError(f"image has non-numeric dtype {img3.array.dtype}")
    if model.spatial_dims == 3 and min(img3.shape) < 2:
        raise MeddiffError("a 3D model needs a 3D image; this image is a single slice (use a 2D model)")
    selected = mask_on_image(img3, mask, label)
    check_scan_values(img3.array, "inpaint")
    return selected


def _settings_record(settings: dict, runner: _Runner, label: float | None, selected: np.ndarray) -> dict:
    """The settings part of an inpainted volume's provenance."""
    s = settings
    return {
        "sampler": s["sampler"], "steps": s["steps"], "eta": s["eta"], "jump_length": s["jump_length"],
        "jump_n": s["jump_n"], "network_evaluations_per_chain": runner.evals, "feather_voxels": s["feather_voxels"],
        "label": None if label is None else float(label), "mask_voxels": int(np.count_nonzero(selected)),
        "precision": s["precision"],
    }  # fmt: skip


class _Progress:
    """Task-wide progress over every batch of chains, and previews of the candidates they belong to."""

    def __init__(self, model, runner: _Runner, paster: _Paster, on_step, on_preview, preview_every, t_start):
        self.model, self.runner, self.paster = model, runner, paster
        self.on_step, self.on_preview, self.t_start = on_step, on_preview, t_start
        self.every = preview_every if preview_every else max(1, runner.evals // 10)
        self.done = 0
        self.total = 0

    def hook(self, batch, grids: list[np.ndarray]) -> Callable[[StepInfo], None]:
        """The loop's step hook for one batch of (candidate, slice, seed) units."""
        arrays = self.runner._arrays(batch) if self.on_preview is not None else None
        base = self.done

        def step_hook(info: StepInfo) -> None:
            elapsed = time.perf_counter() - self.t_start
            overall = StepInfo(base + info.index, self.total, info.timestep, info.pred_x0, elapsed)
            if self.on_step is not None:
                self.on_step(overall)
            if self.on_preview is not None and (info.index % self.every == 0 or info.index == info.total):
                self._previews(batch, grids, self.runner.preview(info.pred_x0, *arrays), overall)

        return step_hook

    def _previews(self, batch, grids: list[np.ndarray], images: np.ndarray, info: StepInfo) -> None:
        for c in sorted({u[0] for u in batch}):
            if self.model.spatial_dims == 3:
                grid_img = images[[i for i, u in enumerate(batch) if u[0] == c][0]]
            else:
                grid_img = grids[c].copy()
                for i, u in enumerate(batch):
                    if u[0] == c:
                        grid_img[:, :, u[1]] = images[i]
            self.on_preview(InpaintPreview(info, c, self.paster.region, self.paster.patch(grid_img)))


def _sample_candidates(
    runner: _Runner, plan: _Plan, candidates: int, seed: int, batch_size: int, progress: _Progress, release_unet: bool
) -> list[np.ndarray]:
    """Every candidate's model-grid image: its chains (one, or one per slice) run ``batch_size`` at a time."""
    units = runner.units(candidates, seed)
    batches = [units[i : i + batch_size] for i in range(0, len(units), batch_size)]
    progress.total = len(batches) * runner.evals
    grids = [plan.known.copy() for _ in range(candidates)]  # current grid image per candidate
    for number, batch in enumerate(batches, 1):
        images, _, _ = runner.run(batch, progress.hook(batch, grids), release_unet and number == len(batches))
        images = images[:, 0].cpu().numpy()
        for i, (c, k, _) in enumerate(batch):
            if k is None:
                grids[c] = images[i]
            else:
                grids[c][:, :, k] = images[i]
        progress.done += runner.evals
    return grids


def _candidate_volume(
    image: Volume, paster: _Paster, grid: np.ndarray, record: dict, model_name: str, seed: int, c: int
) -> Volume:
    """Candidate ``c``: the input with its masked region replaced; the input's geometry and metadata."""
    result = np.array(image.array, copy=True)
    view = result[..., None] if image.array.ndim == 2 else result
    view[paster.region] = paster.patch(grid)
    meta = {k: v for k, v in image.metadata.items() if k not in ("source_path", "provenance")}
    meta["provenance"] = {**record, "candidate": c + 1, "candidate_seed": seed + c}
    meta["descrip"] = f"meddiff inpaint {model_name} seed {seed + c}"
    return Volume(result, image.affine.copy(), meta)
