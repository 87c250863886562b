"""Every audited volume on one world grid: found in its folder, read, aligned and normalised by one rule.

The rule, the same for every volume whatever its grid, orientation or intensity scale:

1. *Centre*: the world position of the voxels above a quarter of the intensity window of a smoothed copy
   (smoothing first, so that noise in the background does not pull the centre away from the head).
2. *Grid*: a RAS box of `BOX_MM` around that centre, `SEARCH_MM` more on each side, read at half the audit
   spacing (SimpleITK, linear, world coordinates kept) and averaged in 2x2x2 blocks to the audit spacing
   (4 mm by default), so that voxel noise averages out. Voxels outside the scan's field of view are 0 and
   are left out of every comparison.
3. *Intensities*: the window of `review.blind.case_window` (0.5th percentile of the field of view to the
   99.5th of the voxels above the mean) mapped to [0, 1], clipped to [0, `CLIP_HIGH`]: a rescaled copy is the
   same image.
4. *Alignment*: each volume is moved (translation, up to `SEARCH_MM`, to a fraction of a voxel) to best match
   a left-right symmetric reference made of the first training volumes, by normalised cross-correlation of
   smoothed images inside their foreground. A shifted or cropped copy lands where its source does, and a
   mirrored copy lands on its source's mirror image, because the reference is symmetric.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from napari_meddiff.errors import MeddiffError
from napari_meddiff.io.geometry import ModelGrid, sample_on_grid
from napari_meddiff.io.volume import Volume, read_volume

SPACING_MM = 4.0
BOX_MM = (192.0, 224.0, 192.0)
SEARCH_MM = 40.0
FOREGROUND_LEVEL = 0.25
CLIP_HIGH = 2.0
REFERENCE_VOLUMES = 8


@dataclasses.dataclass
class Prepared:
    """One volume on the audit grid: ``image`` (normalised), ``smooth`` (smoothed by one voxel, for the
    similarity), ``mask`` (its foreground, dilated, inside its field of view) and the grid's ``affine``."""

    path: Path
    image: np.ndarray
    smooth: np.ndarray
    mask: np.ndarray
    affine: np.ndarray


@dataclasses.dataclass
class Reference:
    """What volumes are aligned to: a smoothed image and its mask on the audit grid (no padding)."""

    smooth: np.ndarray
    mask: np.ndarray


def find_volumes(folder: str | os.PathLike, *, one_per_subject: bool, on_skip=None) -> list[Path]:
    """The scans in ``folder`` (label maps and masks left out, by name). ``one_per_subject``: a subject's
    further scans (a cohort's ``-lesionfree`` variant) are left out too, so that no subject is its own
    nearest neighbour."""
    from napari_meddiff.review.inputs import image_files, label_reason, subjects

    folder = Path(folder)
    files = image_files(folder)
    kept = []
    for path in files:
        reason = label_reason(path)
        if reason is None:
            kept.append(path)
        elif on_skip is not None:
            on_skip(path, reason)
    if one_per_subject:
        groups = subjects(kept)
        kept = sorted(paths[0] for paths in groups.values())
        for subject, paths in groups.items():
            for path in paths[1:]:
                if on_skip is not None:
                    on_skip(path, f"another scan of subject {subject} ({paths[0].name}) is used")
    if not kept:
        raise MeddiffError(f"no scans in {folder} (NIfTI, NRRD, MHA; label maps and masks are left out)")
    return kept


def read_scan(path: Path) -> Volume:
    """``path`` as a 3D image; a 2D image or a label map is a `MeddiffError`."""
    from napari_meddiff.review.inputs import label_reason

    vol = read_volume(path)
    if vol.array.ndim != 3 or min(vol.shape) < 2:
        raise MeddiffError(f"{path}: the audit compares 3D volumes, this image has shape {vol.shape}")
    if reason := label_reason(path, vol.array):
        raise MeddiffError(f"{path}: not a scan: {reason}")
    if not np.isfinite(vol.array).all():
        raise MeddiffError(f"{path}: the image has NaN or infinite voxels")
    return vol


def foreground_centre(vol: Volume) -> np.ndarray:
    """World position (mm) of the voxels above a quarter of the intensity window, on a copy at about the audit
    spacing, smoothed by one voxel."""
    from scipy import ndimage

    from napari_meddiff.review.blind import case_window

    spacing = np.sqrt((vol.affine[:3, :3] ** 2).sum(axis=0))
    step = np.maximum(1, np.round(SPACING_MM / spacing)).astype(int)
    coarse = np.asarray(vol.array, dtype=np.float32)[:: step[0], :: step[1], :: step[2]]
    coarse = ndimage.gaussian_filter(coarse, 1.0)
    lo, hi = case_window(coarse)
    index = np.argwhere(coarse > lo + FOREGROUND_LEVEL * (hi - lo))
    centre = index.mean(axis=0) * step if len(index) else (np.array(vol.shape) - 1) / 2
    return (vol.affine @ np.append(centre, 1.0))[:3]


def box_shape(spacing: float, pad: int = 0) -> tuple[int, int, int]:
    """Voxels of the audit box at ``spacing`` mm, ``pad`` more on each side."""
    return tuple(int(round(b / spacing)) + 2 * pad for b in BOX_MM)  # type: ignore[return-value]


def box_affine(centre: np.ndarray, spacing: float, shape: tuple[int, ...]) -> np.ndarray:
    """The RAS affine of a box of ``shape`` voxels of ``spacing`` mm centred on ``centre``."""
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = np.asarray(centre) - (np.array(shape) - 1) / 2 * spacing
    return affine


def block_mean(array: np.ndarray, factor: int = 2) -> np.ndarray:
    """Means of ``factor``-voxel blocks (the shape a multiple of ``factor``)."""
    s = [d // factor for d in array.shape]
    return array.reshape(s[0], factor, s[1], factor, s[2], factor).mean(axis=(1, 3, 5))


def padded_arrays(vol: Volume, centre: np.ndarray, spacing: float, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """The normalised image and its field of view on the padded box at ``spacing`` (read at half of it)."""
    from napari_meddiff.review.blind import case_window, coverage

    shape = box_shape(spacing, pad)
    fine = tuple(2 * s for s in shape)
    grid = ModelGrid(box_affine(centre, spacing / 2, fine), fine)
    array = sample_on_grid(Volume(np.asarray(vol.array, dtype=np.float32), vol.affine), grid)
    fov = coverage(vol.affine, vol.shape, grid)
    if not fov.any():
        raise MeddiffError(f"{vol.metadata.get('source_path', 'volume')}: no voxel inside the audit box")
    lo, hi = case_window(array[fov])
    array = np.clip((array - lo) / (hi - lo), 0.0, CLIP_HIGH)
    array[~fov] = 0.0
    return block_mean(array).astype(np.float32), block_mean(fov.astype(np.float32)) > 0.999


def smooth_and_mask(image: np.ndarray, fov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The image smoothed by one voxel, and where it is compared: its foreground (above `FOREGROUND_LEVEL`)
    dilated by two voxels, inside the field of view less one voxel (smoothing reaches across the edge)."""
    from scipy import ndimage

    smooth = ndimage.gaussian_filter(image, 1.0).astype(np.float32)
    foreground = ndimage.binary_dilation(smooth > FOREGROUND_LEVEL, iterations=2)
    return smooth, foreground & ndimage.binary_erosion(fov, iterations=1, border_value=1)


def prepare(path: Path, spacing: float = SPACING_MM, reference: Reference | None = None) -> Prepared:
    """Read ``path`` and bring it onto the audit grid (see the module's docstring); aligned to ``reference``
    when one is given, else centred on its foreground."""
    from scipy import ndimage

    vol = read_scan(path)
    centre = foreground_centre(vol)
    pad = int(np.ceil(SEARCH_MM / spacing))
    image, fov = padded_arrays(vol, centre, spacing, pad)
    smooth, mask = smooth_and_mask(image, fov)
    offset = np.zeros(3)
    if reference is not None:
        offset = align(smooth, mask, reference, pad)
        smooth, mask = shifted(smooth, mask, offset)
        image = ndimage.shift(image, -offset, order=1) if np.any(offset) else image
    window = tuple(slice(pad, pad + n) for n in box_shape(spacing))
    affine = box_affine(centre + offset * spacing, spacing, box_shape(spacing))
    return Prepared(path, image[window].copy(), smooth[window].copy(), mask[window].copy(), affine)


def make_reference(prepared: Iterable[Prepared]) -> Reference:
    """A left-right symmetric reference: the mean of ``prepared`` (centred, not aligned) and its mirror."""
    items = list(prepared)
    smooth = np.mean([p.smooth for p in items], axis=0)
    mask = np.mean([p.mask for p in items], axis=0) >= 0.5
    return Reference((smooth + smooth[::-1]) / 2, mask | mask[::-1])


def ncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Normalised cross-correlation of ``a`` and ``b`` over ``mask``."""
    x, y = a[mask].astype(np.float64), b[mask].astype(np.float64)
    if x.size < 2:
        return -1.0
    x -= x.mean()
    y -= y.mean()
    denominator = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denominator) if denominator > 0 else -1.0


def align(smooth: np.ndarray, mask: np.ndarray, reference: Reference, pad: int, steps=(4, 2, 1)) -> np.ndarray:
    """The offset (voxels, fractional) of the padded ``smooth`` image that best matches ``reference``: a
    hill climb over whole voxels (``steps``), then a parabola through each axis's neighbours."""
    shape = reference.smooth.shape

    def score(offset: tuple[int, ...]) -> float:
        if max(abs(o) for o in offset) > pad:
            return -2.0
        window = tuple(slice(pad + o, pad + o + n) for o, n in zip(offset, shape))
        return ncc(smooth[window], reference.smooth, mask[window] & reference.mask)

    best, value, cache = (0, 0, 0), score((0, 0, 0)), {}
    for step in steps:
        moved = True
        while moved:
            moved = False
            for axis in range(3):
                for sign in (-step, step):
                    trial = tuple(b + sign * (i == axis) for i, b in enumerate(best))
                    if trial not in cache:
                        cache[trial] = score(trial)
                    if cache[trial] > value + 1e-9:
                        best, value, moved = trial, cache[trial], True
    return np.array(best, dtype=float) + _parabola_offsets(best, value, score)


def _parabola_offsets(best: tuple[int, ...], value: float, score) -> np.ndarray:
    """Sub-voxel refinement of ``best``: the vertex of the parabola through each axis's three scores."""
    out = np.zeros(3)
    for axis in range(3):
        lo, hi = (score(tuple(b + d * (i == axis) for i, b in enumerate(best))) for d in (-1, 1))
        curvature = lo + hi - 2 * value
        if curvature < 0:
            out[axis] = float(np.clip(0.5 * (lo - hi) / curvature, -0.5, 0.5))
    return out


def shifted(smooth: np.ndarray, mask: np.ndarray, offset: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``smooth`` and ``mask`` moved so that what was at ``index + offset`` is at ``index`` (linear)."""
    from scipy import ndimage

    if not np.any(offset):
        return smooth, mask
    moved = ndimage.shift(smooth, -np.asarray(offset), order=1)
    return moved, ndimage.shift(mask.astype(np.float32), -np.asarray(offset), order=1) > 0.5


def view(item: Prepared, spacing: float = 2.0) -> np.ndarray:
    """``item`` read again onto its audit box at ``spacing`` mm (finer than the audit grid, for figures),
    normalised like the audit grid."""
    from napari_meddiff.review.blind import case_window, coverage

    vol = read_scan(item.path)
    centre = item.affine @ np.append((np.array(item.image.shape) - 1) / 2, 1.0)
    shape = box_shape(spacing)
    grid = ModelGrid(box_affine(centre[:3], spacing, shape), shape)
    array = sample_on_grid(Volume(np.asarray(vol.array, dtype=np.float32), vol.affine), grid)
    fov = coverage(vol.affine, vol.shape, grid)
    lo, hi = case_window(array[fov]) if fov.any() else (0.0, 1.0)
    array = np.clip((array - lo) / (hi - lo), 0.0, 1.0)
    array[~fov] = 0.0
    return array
