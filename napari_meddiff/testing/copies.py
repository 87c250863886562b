"""Copies of a scan under what a generator or a curator can do to one: the cases the audit's memorization
check must see through (tests and ``benchmarks/bench_audit.py``)."""

from __future__ import annotations

import numpy as np

from napari_meddiff.io.volume import Volume, resample

TRANSFORMATIONS = ("mirror", "shift", "regrid", "reorient", "rescale", "noise", "crop")


def transformed(vol: Volume, kind: str, rng: np.random.Generator) -> Volume:
    """``vol`` under one of `TRANSFORMATIONS` (sizes for a 2 mm cohort subject, white matter about 85)."""
    a, affine = np.asarray(vol.array, dtype=np.float32), vol.affine.copy()
    if kind == "mirror":  # left-right, same header
        return Volume(a[::-1].copy(), affine)
    if kind == "shift":  # content moved by (3, -2, 2) voxels in the same header
        return Volume(np.roll(a, (3, -2, 2), axis=(0, 1, 2)), affine)
    if kind == "regrid":  # another voxel size and grid
        return resample(vol, (3.0, 2.5, 1.5))
    if kind == "reorient":  # the same image stored another way: axes flipped and swapped, header to match
        flip = np.array([[-1, 0, 0, a.shape[0] - 1], [0, -1, 0, a.shape[1] - 1], [0, 0, 1, 0], [0, 0, 0, 1.0]])
        swap = np.array([[1, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1.0]])
        return Volume(np.ascontiguousarray(a[::-1, ::-1].transpose(0, 2, 1)), affine @ flip @ swap)
    if kind == "rescale":
        return Volume(a * 2.5 + 100.0, affine)
    if kind == "noise":  # Gaussian, SD 8
        return Volume(a + rng.normal(0.0, 8.0, a.shape).astype(np.float32), affine)
    if kind == "crop":  # 8, 15 and 25 voxels off the right, back and top (into the brain)
        start = np.array([8, 15, 0])
        affine[:3, 3] = vol.affine[:3, :3] @ start + vol.affine[:3, 3]
        return Volume(a[8:, 15:, : a.shape[2] - 25].copy(), affine)
    raise ValueError(f"unknown transformation {kind!r}; one of {', '.join(TRANSFORMATIONS)}")
