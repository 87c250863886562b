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
2. *Intensities*, on the common grid: the window from the 0.5th percentile of all voxels to the 99.5th
   percentile of the foreground (voxels above the mean, the usual head-mask rule) is mapped to [0, 1]
   (MONAI, clipped) and quantised to 256 levels. Neither end depends on how the input was stored: ties at
   the minimum (an integer file, a zero-padded field of view) do not move the window.
3. *Storage*: uint8 NIfTI-1 with ``scl_slope = 1/255`` (readers see floats in [0, 1]), the grid's affine as
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
    "lower": f"percentile {LOWER_PERCENTILE} of all voxels on the grid",
    "upper": f"percentile {UPPER_PERCENTILE} of the voxels above the mean",
    "range": [0.0, 1.0],
    "clip": True,
    "levels": LEVELS + 1,
    "dtype": "uint8",
    "scl_slope": f"1/{LEVELS}",
}


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


def moved_to(vol: Volume, grid: ModelGrid, target: tuple[float, float, float]) -> Volume:
    """``vol`` translated by whole ``grid`` voxels towards ``target`` along the axes where it is far from it."""
    offset = np.asarray(target) - np.asarray(foreground_centre(vol))
    voxels = np.linalg.solve(grid.affine[:3, :3], offset)
    spacing = np.sqrt((grid.affine[:3, :3] ** 2).sum(axis=0))
    steps = np.where(np.abs(voxels) * spacing > MOVE_TOLERANCE_MM, np.rint(voxels), 0.0)
    affine = vol.affine.copy()
    affine[:3, 3] += grid.affine[:3, :3] @ steps
    return Volume(np.asarray(vol.array, dtype=np.float32), affine)


def blinded_levels(vol: Volume, grid: ModelGrid, target: tuple[float, float, float]) -> np.ndarray:
    """The case on ``grid``, normalised and quantised by the one rule: uint8 levels 0..255."""
    vol = as_3d(vol)
    moved = moved_to(vol, grid, target)
    fill = float(np.nanmin(moved.array)) if moved.array.size else 0.0
    on_grid = sample_on_grid(moved, grid, default=fill)
    unit = normalise(on_grid, case_window(on_grid))
    return np.rint(np.clip(unit, 0.0, 1.0) * LEVELS).astype(np.uint8)


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
