"""Make every case look alike except for its anatomy: one grid, one intensity rule, one way of storing.

The rule, the same for every case whatever its source:

1. *Grid*: along each grid axis where the centre of the case's foreground (voxels above a quarter of its
   intensity window, see 2.) is more than `MOVE_TOLERANCE_MM` from the *target*, the case is moved by whole
   grid voxels to the target (a scan in another world frame, e.g. MNI space vs a model's origin-centred
   grid); smaller offsets (anatomy varies by a few mm) are left alone, so no case is cropped or padded for
   nothing. Then it is resampled onto the common grid (linear, SimpleITK via `geometry.sample_on_grid`;
   outside the scan: the scan's minimum). The common grid is the synthetic scans' grid and the target the
   mean foreground centre of the synthetic scans (where the model puts the anatomy); with a grid the
   organiser gives, the target is that grid's centre. A case already on the grid is moved by whole voxels
   only, so it is not interpolated at all.
2. *Field of view*: every case shows the same one, the grid voxels that *every* case of the study covers
   (its voxels' extent, once moved; `common_field_of_view`). Voxels outside it are level 0 in every case. A
   scan whose field of view stops short of the grid (a real scan cut below the cerebellum, a model grid
   smaller than a ``--grid`` reference) would otherwise show empty border planes that only its source has,
   and one feature (where the non-zero voxels end) would tell the sources apart. Masking rather than
   cropping the grid keeps the same anatomy (the intersection is all any case can show), keeps the grid the
   organiser chose (the model's, or ``--grid``, headers unchanged) and works for scans oblique to the grid.
3. *Intensities*, inside that field of view: the window from the 0.5th percentile of all its voxels to the
   99.5th percentile of the foreground (voxels above the mean, the usual head-mask rule) is mapped to [0, 1]
   (MONAI, clipped) and quantised to 256 levels. Neither end depends on how the input was stored: ties at
   the minimum (an integer file, a zero-padded field of view) do not move the window.
4. *Storage*: uint8 NIfTI-1 with ``scl_slope = 1/255`` (readers see floats in [0, 1]), the grid's affine as
   qform (code 1) and sform (code 2), units mm/s, ``cal_min/cal_max`` 0/1, empty description, no extensions,
   gzip level 6 with no name and no time stamp. Headers are byte-identical for every case.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np

from napari_meddiff.errors import MeddiffError
from napari_meddiff.io.files import write_atomic
from napari_meddiff.io.geometry import ModelGrid, sample_on_grid
from napari_meddiff.io.intensity import normalise
from napari_meddiff.io.volume import Volume

LEVELS = 255
FOREGROUND_FRACTION = 0.25
MOVE_TOLERANCE_MM = 10.0
GZIP_LEVEL = 6
NIFTI1_OFFSET = 352  # 348-byte header + 4-byte empty extension flag
LOWER_PERCENTILE, UPPER_PERCENTILE = 0.5, 99.5
INTENSITY_RULE = {
    "lower": f"percentile {LOWER_PERCENTILE} of all voxels in the common field of view",
    "upper": f"percentile {UPPER_PERCENTILE} of the voxels above the mean",
    "range": [0.0, 1.0],
    "clip": True,
    "levels": LEVELS + 1,
    "dtype": "uint8",
    "scl_slope": f"1/{LEVELS}",
    "outside_field_of_view": 0,
}
FIELD_OF_VIEW_RULE = "grid voxels inside every case's voxel extent (after its whole-voxel move); level 0 outside"
EDGE_TOLERANCE = 1e-3  # voxels: a grid voxel on the very edge of a scan's extent counts as outside


def as_3d(vol: Volume) -> Volume:
    """A 2D image as a one-slice 3D volume (same affine); 3D volumes unchanged."""
    if vol.array.ndim == 2:
        return Volume(np.asarray(vol.array)[:, :, None], vol.affine, vol.metadata)
    if vol.array.ndim != 3:
        raise MeddiffError(f"{vol.metadata.get('source_path', 'image')}: only 2D and 3D images can be reviewed")
    return vol


def grid_of(vol: Volume) -> ModelGrid:
    vol = as_3d(vol)
    return ModelGrid(np.asarray(vol.affine, dtype=np.float64), tuple(int(s) for s in vol.shape[:3]))


def grid_centre(grid: ModelGrid) -> tuple[float, float, float]:
    centre = grid.affine @ np.append((np.array(grid.shape) - 1) / 2, 1.0)
    return tuple(float(v) for v in centre[:3])  # type: ignore[return-value]


def common_grid(grids: list[ModelGrid], what: str = "synthetic") -> ModelGrid:
    """The one grid all ``grids`` are (e.g. one model's output); an error when they are several."""
    groups: dict[tuple, ModelGrid] = {}
    for g in grids:
        groups.setdefault((g.shape, tuple(np.round(g.affine, 3).ravel())), g)
    if len(groups) > 1:
        shown = "; ".join(_describe(g) for g in list(groups.values())[:3])
        raise MeddiffError(
            f"the {what} cases are on {len(groups)} different grids ({shown}); "
            "pass --grid REFERENCE (an image on the grid every case should be resampled onto)"
        )
    return next(iter(groups.values()))


def _describe(grid: ModelGrid) -> str:
    spacing = np.sqrt((grid.affine[:3, :3] ** 2).sum(axis=0))
    return f"shape {grid.shape}, voxel {' x '.join(f'{s:g}' for s in spacing)} mm"


def case_window(array: np.ndarray) -> tuple[float, float]:
    """The intensities that map to 0 and 1: 0.5th percentile of all voxels, 99.5th of those above the mean."""
    values = np.asarray(array, dtype=np.float32).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    lo = float(np.percentile(values, LOWER_PERCENTILE))
    fg = values[values > values.mean()]
    hi = float(np.percentile(fg, UPPER_PERCENTILE)) if fg.size else float(values.max())
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def foreground_centre(vol: Volume) -> tuple[float, float, float]:
    """World position (mm) of the centre of the voxels above a quarter of the intensity window."""
    array = np.asarray(vol.array, dtype=np.float32)
    lo, hi = case_window(array)
    fg = np.argwhere(array > lo + FOREGROUND_FRACTION * (hi - lo))
    index = fg.mean(axis=0) if len(fg) else (np.array(array.shape) - 1) / 2
    centre = vol.affine @ np.append(index, 1.0)
    return tuple(float(v) for v in centre[:3])  # type: ignore[return-value]


def placed_affine(
    affine: np.ndarray, centre: tuple[float, float, float], grid: ModelGrid, target: tuple[float, float, float]
) -> np.ndarray:
    """A scan's affine moved by whole ``grid`` voxels from its foreground ``centre`` towards ``target``, along
    the axes where it is more than `MOVE_TOLERANCE_MM` away."""
    offset = np.asarray(target) - np.asarray(centre)
    voxels = np.linalg.solve(grid.affine[:3, :3], offset)
    spacing = np.sqrt((grid.affine[:3, :3] ** 2).sum(axis=0))
    steps = np.where(np.abs(voxels) * spacing > MOVE_TOLERANCE_MM, np.rint(voxels), 0.0)
    moved = np.array(affine, dtype=np.float64)
    moved[:3, 3] += grid.affine[:3, :3] @ steps
    return moved


def moved_to(vol: Volume, grid: ModelGrid, target: tuple[float, float, float]) -> Volume:
    """``vol`` translated by whole ``grid`` voxels towards ``target`` along the axes where it is far from it."""
    affine = placed_affine(vol.affine, foreground_centre(vol), grid, target)
    return Volume(np.asarray(vol.array, dtype=np.float32), affine)


def coverage(affine: np.ndarray, shape: tuple[int, ...], grid: ModelGrid) -> np.ndarray:
    """Which ``grid`` voxels lie inside a scan's field of view (the extent of its voxels, [-0.5, n - 0.5] in
    voxel units along each axis, as the resampler sees it; a voxel on the very edge counts as outside)."""
    shape3 = (tuple(int(s) for s in shape) + (1, 1, 1))[:3]
    to_scan = np.linalg.inv(np.asarray(affine, dtype=np.float64)) @ np.asarray(grid.affine, dtype=np.float64)
    lo = -0.5 + EDGE_TOLERANCE
    hi = np.array(shape3, dtype=np.float64)[:, None] - 0.5 - EDGE_TOLERANCE
    j, k = (a.ravel() for a in np.indices(grid.shape[1:]))
    inside = np.empty(grid.shape, dtype=bool)
    for i in range(grid.shape[0]):  # plane by plane: a 1 mm grid would need gigabytes at once
        index = to_scan[:3, :3] @ np.stack([np.full_like(j, i), j, k]).astype(np.float64) + to_scan[:3, 3:]
        inside[i] = np.all((index > lo) & (index < hi), axis=0).reshape(grid.shape[1:])
    return inside


def common_field_of_view(coverages: list[np.ndarray]) -> np.ndarray:
    """The grid voxels every case covers; an error when the cases have none in common."""
    if not coverages:
        raise MeddiffError("internal error: no cases to find a common field of view for")
    common = np.logical_and.reduce(coverages)
    if not common.any():
        raise MeddiffError(
            "the cases have no field of view in common on the study grid (no voxel lies inside every scan); "
            "check that the real and synthetic scans show the same body part, or pass --grid"
        )
    return common


def blinded_levels(
    vol: Volume, grid: ModelGrid, target: tuple[float, float, float], fov: np.ndarray | None = None
) -> np.ndarray:
    """The case on ``grid``, normalised and quantised by the one rule: uint8 levels 0..255.

    ``fov`` is the study's common field of view (a boolean array on the grid; None: what this case covers):
    the window is taken inside it and every voxel outside it is 0.
    """
    vol = as_3d(vol)
    moved = moved_to(vol, grid, target)
    covered = coverage(moved.affine, moved.shape, grid)
    if fov is None:
        fov = covered
    elif fov.shape != grid.shape or np.any(fov & ~covered):
        raise MeddiffError("internal error: the common field of view reaches outside a case")
    if not fov.any():
        raise MeddiffError("the scan does not overlap the study grid")
    fill = float(np.nanmin(moved.array)) if moved.array.size else 0.0
    on_grid = sample_on_grid(moved, grid, default=fill)
    unit = normalise(on_grid, case_window(on_grid[fov]))
    levels = np.rint(np.clip(unit, 0.0, 1.0) * LEVELS).astype(np.uint8)
    levels[~fov] = 0
    return levels


def case_header(grid: ModelGrid) -> nib.Nifti1Header:
    """The header every case of a study gets (it depends on the grid only)."""
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.uint8)
    hdr.set_data_shape(grid.shape)
    hdr.set_qform(grid.affine, code=1)
    hdr.set_sform(grid.affine, code=2)
    hdr.set_xyzt_units("mm", "sec")
    hdr.set_slope_inter(1.0 / LEVELS, 0.0)
    hdr["cal_min"], hdr["cal_max"] = 0.0, 1.0
    hdr.set_data_offset(NIFTI1_OFFSET)
    return hdr


def write_case(levels: np.ndarray, grid: ModelGrid, path: Path) -> Path:
    """Write ``levels`` (uint8, grid shape) as a gzipped NIfTI-1 file, atomically; never replaces a file."""
    if levels.dtype != np.uint8 or tuple(levels.shape) != grid.shape:
        raise MeddiffError(f"internal error: case levels {levels.dtype} {levels.shape} do not fit {grid.shape}")
    raw = case_header(grid).binaryblock + b"\0" * 4 + np.asarray(levels).tobytes(order="F")
    data = gzip.compress(raw, compresslevel=GZIP_LEVEL, mtime=0)
    return write_atomic(path, lambda tmp: tmp.write_bytes(data), overwrite=False)
