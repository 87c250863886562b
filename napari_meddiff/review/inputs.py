"""Which files in a --real / --synthetic folder are cases: one scan per subject; label maps and masks skipped.

A file is skipped, with a reason, when

- its name looks like a label file (``_dseg``, ``_seg``, ``label``, ``mask``, ``_lesion``) or its voxels are
  integer-valued with at most `MAX_LABEL_VALUES` distinct values (a label map or mask whatever it is called):
  ``sub-01_T1w-lesionfree.nii.gz`` is a scan, ``sub-01_lesion.nii.gz`` is not;
- another scan of the same subject is already a case. The subject is the BIDS ``sub-<label>`` entity of the
  name (what ``meddiff cohort`` writes: ``sub-000001_T1w`` and its ``sub-000001_T1w-lesionfree``); a name
  without one is its own subject unless it is another scan's name plus ``-<word>`` (``scan`` and
  ``scan-defaced``). Of a subject's scans the one with the shortest name is kept (the original, not a
  derived ``-lesionfree``; then the first session by name). Readers would otherwise see near-duplicates.
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
from napari_meddiff.io.files import IMAGE_SUFFIXES, image_stem
from napari_meddiff.io.geometry import ModelGrid
from napari_meddiff.io.volume import read_volume
from napari_meddiff.review.blind import as_3d, foreground_centre, grid_of

# a label map's or mask's name part (BIDS-like: after "_" or at the start); a model name such as
# "brain-t1w-from-labels-3d" in a generated scan's file name is not one
LABEL_NAME = re.compile(r"(?:^|_)(?:dseg|seg|labels?|mask|lesion)(?=[._]|$)", re.IGNORECASE)
BIDS_SUBJECT = re.compile(r"(?:^|_)(sub-[A-Za-z0-9]+)(?=[_.-]|$)")
NAMED_VARIANT = re.compile(r"^(.+)-[A-Za-z]+$")
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


def subjects(paths: list[Path]) -> dict[str, list[Path]]:
    """``paths`` grouped by subject (see the module's docstring), each group in the order of preference."""
    stems = {image_stem(p) for p in paths}
    groups: dict[str, list[Path]] = {}
    for path in paths:
        stem = image_stem(path)
        bids = BIDS_SUBJECT.search(stem)
        if bids:
            subject = bids.group(1)
        else:
            subject = stem
            while (variant := NAMED_VARIANT.match(subject)) and variant.group(1) in stems:
                subject = variant.group(1)
        groups.setdefault(subject, []).append(path)
    return {s: sorted(g, key=lambda p: (len(image_stem(p)), p.name)) for s, g in groups.items()}


def find_scans(folder: str | os.PathLike, on_skip: OnSkip | None = None) -> list[Scan]:
    """One scan per subject in ``folder``, in file-name order; every other image (label map, mask, a
    subject's other scans) is reported to ``on_skip(path, reason)``, in file-name order too."""
    folder = Path(folder)
    files = image_files(folder)
    if not files:
        raise MeddiffError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    skipped: dict[Path, str] = {}
    candidates = []
    for path in files:
        reason = label_reason(path)
        if reason is None:
            candidates.append(path)
        else:
            skipped[path] = reason
    scans = []
    for subject, paths in subjects(candidates).items():
        kept = None
        for path in paths:
            if kept is not None:  # not even read: a derived or repeated scan of a subject already kept
                skipped[path] = (
                    f"another scan of subject {subject} ({kept.name}) is already a case; one scan per "
                    "subject, or readers would see near-duplicates"
                )
                continue
            vol = as_3d(read_volume(path))
            reason = label_reason(path, vol.array)
            if reason is not None:
                skipped[path] = reason
                continue
            kept = path
            scans.append(Scan(path, grid_of(vol), foreground_centre(vol)))
    for path in sorted(skipped):
        _report(on_skip, path, skipped[path])
    if not scans:
        raise MeddiffError(f"no scans in {folder}: all {len(skipped)} image(s) look like label maps or masks")
    return sorted(scans, key=lambda s: s.path)


def _report(on_skip: OnSkip | None, path: Path, reason: str) -> None:
    if on_skip is None:
        warnings.warn(f"skipping {path}: {reason}", stacklevel=3)
    else:
        on_skip(path, reason)
