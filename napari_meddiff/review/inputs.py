"""Which files in a --real / --synthetic folder are scans: label maps and masks are skipped, with a reason.

A file is skipped when its name looks like a label file (``_dseg``, ``_seg``, ``label``, ``mask``,
``_lesion``) or when its voxels are integer-valued with at most `MAX_LABEL_VALUES` distinct values (a label
map or mask whatever it is called). ``sub-01_T1w-lesionfree.nii.gz`` is a scan, ``sub-01_lesion.nii.gz`` is not.
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from napari_meddiff.errors import MeddiffError
from napari_meddiff.io.geometry import ModelGrid
from napari_meddiff.io.volume import read_volume
from napari_meddiff.review.blind import as_3d, foreground_centre, grid_of

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
LABEL_NAME = re.compile(r"_dseg|_seg|label|mask|_lesion(?=[._]|$)", re.IGNORECASE)
MAX_LABEL_VALUES = 64

OnSkip = Callable[[Path, str], None]


@dataclasses.dataclass(frozen=True)
class Scan:
    """An input scan, the grid it is stored on and the world position (mm) of its foreground centre."""

    path: Path
    grid: ModelGrid
    centre: tuple[float, float, float]


def image_files(folder: Path) -> list[Path]:
    """Image files directly inside ``folder`` (hidden and temporary files skipped), sorted by name."""
    if not folder.is_dir():
        raise MeddiffError(f"not a folder: {folder}")
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(IMAGE_SUFFIXES)
    )


def label_reason(path: Path, array: np.ndarray | None = None) -> str | None:
    """Why ``path`` is not a scan (a label map or mask), or None when it is one."""
    if LABEL_NAME.search(path.name):
        return "its name looks like a label map or mask"
    if array is None:
        return None
    values = np.asarray(array).ravel()
    values = values[np.isfinite(values)] if np.issubdtype(values.dtype, np.floating) else values
    if values.size and np.array_equal(values, np.rint(values)):
        distinct = np.unique(values).size
        if distinct <= MAX_LABEL_VALUES:
            return f"its voxels are integers with only {distinct} distinct value(s) (a label map or mask)"
    return None


def find_scans(folder: str | os.PathLike, on_skip: OnSkip | None = None) -> list[Scan]:
    """The scans in ``folder``; every other image (label map, mask) is reported to ``on_skip(path, reason)``."""
    folder = Path(folder)
    files = image_files(folder)
    if not files:
        raise MeddiffError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    scans, skipped = [], 0
    for path in files:
        reason = label_reason(path)
        vol = None
        if reason is None:
            vol = as_3d(read_volume(path))
            reason = label_reason(path, vol.array)
        if reason is not None:
            skipped += 1
            _report(on_skip, path, reason)
            continue
        scans.append(Scan(path, grid_of(vol), foreground_centre(vol)))
    if not scans:
        raise MeddiffError(f"no scans in {folder}: all {skipped} image(s) look like label maps or masks")
    return scans


def _report(on_skip: OnSkip | None, path: Path, reason: str) -> None:
    if on_skip is None:
        warnings.warn(f"skipping {path}: {reason}", stacklevel=3)
    else:
        on_skip(path, reason)
