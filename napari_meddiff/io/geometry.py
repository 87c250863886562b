"""Model grids: where a model's fixed-size, fixed-voxel image sits in a scan's world space.

Tasks bring any input (any size, voxel size, orientation) onto a model grid with `sample_on_grid`, run
the model there, and bring the result back onto the input's own grid with `grid_to_volume`. Both go
through SimpleITK resampling (`volume.resample_like`), so world coordinates are kept exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from napari_meddiff.errors import MeddiffError
from napari_meddiff.io.volume import Volume, resample_like

WORLD_AXES = {"sagittal": 0, "coronal": 1, "axial": 2, 0: 0, 1: 1, 2: 2, "x": 0, "y": 1, "z": 2}


@dataclasses.dataclass(frozen=True)
class ModelGrid:
    """A voxel grid (shape + 4x4 voxel-to-RAS affine) aligned with the world axes."""

    affine: np.ndarray
    shape: tuple[int, int, int]

    def empty_volume(self) -> Volume:
        return Volume(np.zeros(self.shape, np.float32), self.affine.copy())

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along each grid axis (length of each affine column), as `Volume.spacing`."""
        return tuple(float(z) for z in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))


def index_box_corners(lo, hi) -> np.ndarray:
    """The 8 corners of the index box [lo, hi] as homogeneous coordinates, (8, 4)."""
    return np.array([[a, b, c, 1.0] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])


def world_box(affine: np.ndarray, lo, hi) -> tuple[np.ndarray, np.ndarray]:
    """The world bounding box (min, max corners) of the index box [lo, hi] under ``affine``."""
    world = (affine @ index_box_corners(lo, hi).T).T[:, :3]
    return world.min(0), world.max(0)


def index_box(affine: np.ndarray, shape, world_lo, world_hi, pad: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """The index box [lo, hi) of a grid (``affine``, ``shape``) that covers the world box, ``pad`` voxels more,
    clipped to the grid."""
    idx = (np.linalg.inv(affine) @ index_box_corners(world_lo, world_hi).T).T[:, :3]
    lo = np.clip(np.floor(idx.min(0)).astype(int) - pad, 0, np.array(shape))
    hi = np.clip(np.ceil(idx.max(0)).astype(int) + pad + 1, 0, np.array(shape))
    return lo, hi


def world_centre(vol: Volume, mask: np.ndarray | None = None) -> np.ndarray:
    """World (RAS mm) centre of the volume's field of view, or of the bounding box of ``mask``."""
    if mask is not None and np.any(mask):
        idx = np.argwhere(mask)
        centre_idx = (idx.min(0) + idx.max(0)) / 2
    else:
        centre_idx = (np.array(vol.shape[:3]) - 1) / 2
    return (vol.affine @ np.append(centre_idx[:3], 1.0))[:3]


def world_axis(axis: int | str) -> int:
    try:
        return WORLD_AXES[axis]
    except KeyError:
        raise MeddiffError(f"axis must be one of axial/coronal/sagittal or 0/1/2, not {axis!r}") from None


def make_grid(
    voxel_size: Sequence[float],
    shape: Sequence[int],
    centre: Sequence[float],
    axis_order: Sequence[int] = (0, 1, 2),
) -> ModelGrid:
    """A world-aligned grid centred on ``centre``; grid axis ``n`` runs along world axis ``axis_order[n]``.

    With ``axis_order=(0, 1, 2)`` the grid is RAS+ (what 3D models and axial 2D slices use).
    """
    affine = np.zeros((4, 4))
    affine[3, 3] = 1.0
    for grid_axis, w_axis in enumerate(axis_order):
        affine[w_axis, grid_axis] = float(voxel_size[grid_axis])
    half = (np.array(shape, dtype=float) - 1) / 2
    affine[:3, 3] = np.asarray(centre, dtype=float) - affine[:3, :3] @ half
    return ModelGrid(affine, tuple(int(s) for s in shape))


def snap_grid(grid: ModelGrid, vol: Volume, rtol: float = 1e-3) -> ModelGrid:
    """``grid`` shifted (under half a voxel per axis) so that its voxel centres fall on ``vol``'s.

    Only along grid axes that share a lattice with ``vol``: the world axis is also an axis of ``vol``'s grid,
    with the same spacing. There, resampling onto the grid and back copies values; a half-voxel offset would
    blur thin structures (sulcal CSF at 2 mm) by linear interpolation on the way in and again on the way out.
    """
    m = np.asarray(vol.affine, dtype=float)[:3, :3]
    index = np.linalg.solve(m, grid.affine[:3, 3] - np.asarray(vol.affine, dtype=float)[:3, 3])
    shift = np.zeros(3)
    for g in range(3):
        step = grid.affine[:3, g]
        w = int(np.abs(step).argmax())
        for i in range(3):
            col = m[:, i]
            aligned = np.abs(np.delete(col, w)).max() <= rtol * abs(col[w])
            if aligned and abs(abs(col[w]) - abs(step[w])) <= rtol * abs(step[w]):
                shift[w] -= (index[i] - np.round(index[i])) * col[w]
    affine = grid.affine.copy()
    affine[:3, 3] += shift
    return ModelGrid(affine, grid.shape)


def slice_axis_order(axis: int | str) -> tuple[int, int, int]:
    """Grid axes for slice-by-slice 2D models: the two in-plane world axes first, the slicing axis last."""
    a = world_axis(axis)
    return tuple([w for w in (0, 1, 2) if w != a] + [a])  # type: ignore[return-value]


def slice_grid(
    vol: Volume,
    inplane_voxel: Sequence[float],
    inplane_shape: Sequence[int],
    axis: int | str = "axial",
    centre: Sequence[float] | None = None,
) -> ModelGrid:
    """A grid for running a 2D model slice by slice along world ``axis`` over ``vol``'s field of view.

    In-plane: the model's voxel size and shape; through-plane: the input's own spacing along that axis.
    """
    order = slice_axis_order(axis)
    a = order[2]
    # through-plane spacing: the input voxel extent along world axis a
    spacing_along = float(np.abs(vol.affine[a, :3]).max())
    corners = np.array(
        [[i, j, k, 1] for i in (0, vol.shape[0] - 1) for j in (0, vol.shape[1] - 1) for k in (0, vol.shape[2] - 1)]
    )
    world = (vol.affine @ corners.T).T[:, :3]
    extent = world[:, a].max() - world[:, a].min()
    n_slices = int(round(extent / spacing_along)) + 1
    centre = world_centre(vol) if centre is None else np.asarray(centre, dtype=float)
    voxel = (float(inplane_voxel[0]), float(inplane_voxel[1]), spacing_along)
    shape = (int(inplane_shape[0]), int(inplane_shape[1]), n_slices)
    return make_grid(voxel, shape, centre, order)


def sample_on_grid(vol: Volume, grid: ModelGrid, *, labels: bool = False, default: float = 0.0) -> np.ndarray:
    """Resample ``vol`` onto ``grid`` (linear for images, nearest for labels); outside the scan: ``default``."""
    if vol.array.ndim != 3:
        raise MeddiffError(f"expected a 3D volume, got shape {vol.shape}")
    return resample_like(vol, grid.empty_volume(), labels=labels, default=default).array


def grid_to_volume(array: np.ndarray, grid: ModelGrid, reference: Volume, *, labels: bool = False) -> Volume:
    """Bring an array on ``grid`` back onto ``reference``'s own grid (its affine and shape)."""
    if tuple(array.shape[:3]) != grid.shape:
        raise MeddiffError(f"array shape {array.shape} does not match grid {grid.shape}")
    out = resample_like(Volume(np.asarray(array, np.float32), grid.affine), reference, labels=labels)
    out.metadata = dict(reference.metadata)
    return out
