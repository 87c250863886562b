"""Intensity normalisation between scanner units and a model's [0, 1] range (MONAI transforms)."""

from __future__ import annotations

from typing import Any

import numpy as np

DEFAULT_INTENSITY = {"method": "percentile", "lower": 0.5, "upper": 99.5, "foreground_only": True}
INTENSITY_KEYS = frozenset(DEFAULT_INTENSITY) | {"upper_value"}


def intensity_window(array: np.ndarray, spec: dict[str, Any] | None = None) -> tuple[float, float]:
    """The (low, high) scanner values that map to 0 and 1 for this image.

    The ``lower`` percentile maps to 0 and the ``upper`` one to ``upper_value`` (default 1). An ``upper_value``
    below 1 leaves headroom: voxels brighter than the upper percentile (a hyperintense lesion, which is only a
    fraction of a percent of the voxels) keep their contrast up to 1 instead of all clipping at it."""
    spec = {**DEFAULT_INTENSITY, **(spec or {})}
    values = np.asarray(array, dtype=np.float32)
    if spec.get("foreground_only", True):
        fg = values[values > values.min()]
        values = fg if fg.size > 0.01 * values.size else values
    lo = float(np.percentile(values, spec["lower"])) if spec["lower"] > 0 else float(values.min())
    hi = float(np.percentile(values, spec["upper"]))
    if not np.isfinite([lo, hi]).all() or hi <= lo:
        hi = lo + 1.0
    return lo, lo + (hi - lo) / check_upper_value(spec.get("upper_value", 1.0))


def is_upper_value(value: Any) -> bool:
    """Whether ``value`` can be ``intensity.upper_value``: a number in (0, 1]."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0.0 < float(value) <= 1.0


def check_upper_value(value: Any) -> float:
    """``intensity.upper_value`` as a float, or a MeddiffError."""
    from napari_meddiff.errors import MeddiffError

    if not is_upper_value(value):
        raise MeddiffError(f"intensity.upper_value must be a number in (0, 1], got {value!r}")
    return float(value)


def normalise(array: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Scanner values -> model range [0, 1] (clipped), via MONAI's ScaleIntensityRange."""
    from monai.transforms import ScaleIntensityRange

    lo, hi = window
    out = ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)(np.asarray(array, np.float32))
    return np.asarray(out, dtype=np.float32)


def denormalise(array: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Model range [0, 1] -> scanner values (inverse of `normalise` inside the window)."""
    lo, hi = window
    return (np.asarray(array, np.float32) * (hi - lo) + lo).astype(np.float32)
