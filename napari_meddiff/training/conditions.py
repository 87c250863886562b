"""Training a conditional model: scalar conditions measured from each subject's labels, scaled to [0, 1].

A config's ``conditioning`` block names them (like the Zoo's brain LDM, which takes age, sex, ventricular and
brain volume as cross-attention context)::

    conditioning:
      input: context        # context: cross-attention (B, 1, N); concat: constant extra input channels
      dropout: 0.15         # share of training items whose conditions become the null values (CFG)
      conditions: [brain_volume, csf_volume, lesion_load]

Each measure is in ml, read from the subject's label files next to its image (the cohort's ``_dseg`` tissue
labels and ``_lesion`` mask). The training subjects' range maps to [0, 1] (0 = smallest, 1 = largest); the
exported model declares each condition with that range in ml, so a requested 0.8 means a known volume. The
null condition (-1 for every value, outside [0, 1]) is what dropout trains and classifier-free guidance uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_meddiff.errors import MeddiffError

if TYPE_CHECKING:
    import torch

    from napari_meddiff.models.conditions import Conditioning

NULL_VALUE = -1.0
INPUTS = ("context", "concat")
# name -> (description, label file suffix replacing "_T1w", label values counted); tissue labels of the cohort:
# 1 CSF, 2 grey matter, 3 white matter
MEASURES: dict[str, tuple[str, str, tuple[int, ...]]] = {
    "brain_volume": ("brain (grey + white matter) volume", "_dseg", (2, 3)),
    "csf_volume": ("CSF (ventricular and sulcal) volume", "_dseg", (1,)),
    "lesion_load": ("lesion volume", "_lesion", (1,)),
}


def validate_block(block: Any, kind: str) -> dict[str, Any] | None:
    """The config's ``conditioning`` block, checked, with defaults (None when absent)."""
    if block is None:
        return None
    if kind not in ("ddpm", "ldm"):
        raise MeddiffError(f"conditioning is for generators (ddpm, ldm), not {kind}")
    if not isinstance(block, dict):
        raise MeddiffError("conditioning must be a mapping (input, dropout, conditions)")
    unknown = set(block) - {"input", "dropout", "conditions"}
    if unknown:
        raise MeddiffError(f"conditioning: unknown keys {sorted(unknown)} (input, dropout, conditions)")
    names = block.get("conditions")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise MeddiffError(f"conditioning.conditions must be a list of names out of {sorted(MEASURES)}")
    bad = [n for n in names if n not in MEASURES]
    if bad or len(set(names)) != len(names):
        raise MeddiffError(f"conditioning.conditions: {bad or names} (each once, out of {sorted(MEASURES)})")
    how = block.get("input", "context")
    if how not in INPUTS:
        raise MeddiffError(f"conditioning.input must be one of {INPUTS}, not {how!r}")
    dropout = block.get("dropout", 0.15)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= float(dropout) < 1.0:
        raise MeddiffError(f"conditioning.dropout must be a number in [0, 1), not {dropout!r}")
    return {"input": how, "dropout": float(dropout), "conditions": list(names)}


def unet_options(block: dict[str, Any] | None) -> dict[str, Any]:
    """What the UNet needs for the conditions: cross-attention (context) or extra input channels (concat)."""
    if block is None:
        return {}
    n = len(block["conditions"])
    if block["input"] == "context":
        return {"with_conditioning": True, "cross_attention_dim": n}
    return {"extra_in_channels": n}


def measure_subject(image_path: Path, names: Sequence[str]) -> list[float]:
    """The subject's measures (ml) from the label files next to its image; no lesion file means no lesion."""
    from napari_meddiff.io.volume import read_volume

    out, cache = [], {}
    for name in names:
        _, suffix, values = MEASURES[name]
        path = image_path.with_name(image_path.name.replace("_T1w", suffix))
        if path == image_path:
            raise MeddiffError(f"{image_path.name}: cannot name its label files (no '_T1w' in the name)")
        if not path.is_file():
            if suffix == "_lesion":
                out.append(0.0)
                continue
            raise MeddiffError(f"condition {name}: no label file {path.name} for {image_path.name}")
        if path not in cache:
            vol = read_volume(path)
            cache[path] = (np.asarray(vol.array), float(np.prod(vol.spacing)) / 1000.0)
        arr, voxel_ml = cache[path]
        counted = arr > 0 if suffix == "_lesion" else np.isin(np.rint(arr), values)  # a mask may be 1 or 255
        out.append(float(counted.sum()) * voxel_ml)
    return out


def fit_ranges(values: torch.Tensor, names: Sequence[str]) -> list[tuple[float, float]]:
    """Each measure's (low, high) in ml over the training subjects: the [0, 1] scale of the model."""
    ranges = []
    for k, name in enumerate(names):
        lo, hi = float(values[:, k].min()), float(values[:, k].max())
        if hi <= lo:
            raise MeddiffError(f"condition {name}: every training subject has {lo:g} ml; nothing to condition on")
        ranges.append((lo, hi))
    return ranges


def scale(values: torch.Tensor, ranges: Sequence[tuple[float, float]]) -> torch.Tensor:
    """ml -> [0, 1] on the training range (validation subjects may fall slightly outside; clipped)."""
    import torch

    lo = torch.tensor([r[0] for r in ranges], dtype=torch.float32)
    hi = torch.tensor([r[1] for r in ranges], dtype=torch.float32)
    return ((values.float() - lo) / (hi - lo)).clamp(0.0, 1.0)


def drop_conditions(values: torch.Tensor, dropout: float, gen: torch.Generator) -> torch.Tensor:
    """Replace the conditions of a random share ``dropout`` of the batch by the null values."""
    import torch

    if dropout <= 0:
        return values
    drop = torch.rand(values.shape[0], generator=gen) < dropout
    out = values.clone()
    out[drop] = NULL_VALUE
    return out


def network_conditioning(block: dict[str, Any]) -> Conditioning:
    """How the UNet takes a config's conditions, as sampling reads it from the exported model."""
    from napari_meddiff.models.conditions import Conditioning

    return Conditioning(
        concat=block["input"] == "concat",
        context=block["input"] == "context",
        null=(NULL_VALUE,) * len(block["conditions"]),
    )


def model_block(block: dict[str, Any], ranges: Sequence[tuple[float, float]], train_scaled: torch.Tensor) -> dict:
    """The model.json ``conditioning`` block: the conditions in [0, 1], their ml range, default = training mean."""
    conditions = []
    for k, name in enumerate(block["conditions"]):
        lo, hi = ranges[k]
        what = MEASURES[name][0]
        conditions.append(
            {
                "name": name,
                "low": 0.0,
                "high": 1.0,
                "default": round(float(train_scaled[:, k].mean()), 4),
                "unit": "ml",
                "unit_low": round(lo, 2),
                "unit_high": round(hi, 2),
                "description": f"{what}: 0 = {lo:.0f} ml, 1 = {hi:.0f} ml (the training subjects' range)",
            }
        )
    how = network_conditioning(block)
    return {
        "concat": how.concat,
        "context": how.context,
        "class_labels": how.class_labels,
        "null": list(how.null),
        "dropout": block["dropout"],
        "conditions": conditions,
    }
