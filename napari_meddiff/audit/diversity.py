"""Diversity: the mean pairwise MS-SSIM within a set of volumes on the audit grid (MONAI's
`MultiScaleSSIMMetric`, 3D). Higher is less diverse: a collapsed generator scores above real subjects.

The scales follow the grid: as many as keep the coarsest at least `MIN_COARSE_VOXELS` across (3 at 4 mm,
where the box is 48 voxels wide), with the standard MS-SSIM weights of those scales renormalised to sum to 1,
a Gaussian kernel of `KERNEL_SIZE` voxels. Large sets are scored on `max_pairs` random pairs.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
KERNEL_SIZE = 5
MIN_COARSE_VOXELS = 2 * KERNEL_SIZE
MAX_PAIRS = 200
BATCH = 8


def ms_ssim_settings(shape: tuple[int, ...]) -> dict:
    """Kernel size and weights valid for images of ``shape`` (see the module's docstring)."""
    smallest = min(shape)
    scales = 1
    for n in range(2, len(MS_SSIM_WEIGHTS) + 1):
        coarse_ok = smallest / 2 ** (n - 1) >= MIN_COARSE_VOXELS
        monai_ok = smallest // max(1, n - 1) ** 2 > KERNEL_SIZE - 1  # MONAI's own size check
        if coarse_ok and monai_ok:
            scales = n
    weights = np.array(MS_SSIM_WEIGHTS[:scales])
    return {"kernel_size": KERNEL_SIZE, "weights": tuple(float(w) for w in weights / weights.sum())}


def pairs(n: int, max_pairs: int = MAX_PAIRS, seed: int = 0) -> list[tuple[int, int]]:
    """All pairs of ``n`` items, or ``max_pairs`` of them drawn at random (seeded)."""
    every = list(itertools.combinations(range(n), 2))
    if len(every) <= max_pairs:
        return every
    rng = np.random.default_rng(seed)
    return [every[i] for i in sorted(rng.choice(len(every), size=max_pairs, replace=False))]


def mean_pairwise_ms_ssim(
    images: list[np.ndarray],
    max_pairs: int = MAX_PAIRS,
    seed: int = 0,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Mean (and SD) of the MS-SSIM of pairs of ``images`` (3D arrays on one grid, clipped to [0, 1])."""
    import torch
    from monai.metrics import MultiScaleSSIMMetric

    chosen = pairs(len(images), max_pairs, seed)
    if not chosen:
        return {"ms_ssim": None, "sd": None, "pairs": 0, "volumes": len(images)}
    settings = ms_ssim_settings(images[0].shape)
    metric = MultiScaleSSIMMetric(spatial_dims=3, data_range=1.0, **settings)
    stack = torch.from_numpy(np.clip(np.stack(images), 0.0, 1.0).astype(np.float32))[:, None]
    values = []
    for start in range(0, len(chosen), BATCH):
        block = np.array(chosen[start : start + BATCH])
        with torch.no_grad():
            values.append(metric(stack[block[:, 0]], stack[block[:, 1]]).flatten().numpy())
        if on_progress is not None:
            on_progress(min(start + BATCH, len(chosen)), len(chosen))
    values = np.concatenate(values).astype(np.float64)
    return {
        "ms_ssim": float(values.mean()),
        "sd": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
        "pairs": len(values),
        "volumes": len(images),
        "kernel_size": settings["kernel_size"],
        "scales": len(settings["weights"]),
    }
