"""The first step of every task: refuse, in one line, inputs a model cannot use."""

from __future__ import annotations

import numpy as np

from napari_meddiff.errors import MeddiffError


def as_3d(array: np.ndarray, what: str) -> np.ndarray:
    """``array`` as 3D: trailing singleton axes dropped, a 2D slice given a third axis of 1."""
    array = np.asarray(array)
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        return array[..., None]
    if array.ndim != 3:
        raise MeddiffError(f"{what} must be 2D or 3D, got shape {array.shape}")
    return array


def check_scan_values(array: np.ndarray, task: str) -> None:
    """Refuse a scan a model cannot work from: `check_finite_voxels` and `check_not_constant`."""
    check_finite_voxels(array, task)
    check_not_constant(array, task)


def check_finite_voxels(array: np.ndarray, task: str) -> None:
    """Refuse NaN or infinite voxels: a model would invent anatomy there."""
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        raise MeddiffError(
            f"the image has {bad} NaN or infinite voxels: replace them first (e.g. with the background value); "
            f"a model would {task} them with invented values"
        )


def check_not_constant(array: np.ndarray, task: str) -> None:
    """Refuse an empty image or one value everywhere: no anatomy and no intensity scale to work from."""
    if array.size == 0:
        raise MeddiffError(f"the image is empty: there is nothing to {task}")
    if float(np.nanmax(array)) == float(np.nanmin(array)):
        raise MeddiffError(f"the image is constant ({float(array.flat[0])} everywhere): there is nothing to {task}")
