"""Inputs a diffusion UNet (and its ControlNet) takes besides the sample, the timestep and the conditions: MAISI's
voxel spacing, body-region indices and modality class, described by a model config's ``network_inputs`` block::

    {"spacing": true, "scale": 100.0, "class_label": 1,
     "body_regions": {"labels": [[22, 120], [28, 29], ...], "default": [2, 2]}}

``spacing``: the voxel size (mm) of the grid the sample lies on, as ``spacing_tensor`` ``(B, 3)``
(``spacing_range``: the [low, high] mm per axis the model takes, where a grid's spacing is kept);
``body_regions``: one list of label values per region, head to foot: the first and last region whose labels a
label map holds, one-hot, as ``top_region_index_tensor`` / ``bottom_region_index_tensor`` ``(B, R)``
(``default``: the (top, bottom) region indices when the map holds none); ``class_label``: a class index (MAISI-v2's
modality) given to the UNet and the ControlNet as ``class_labels`` ``(B,)``. Spacing and region indices are
multiplied by ``scale``, as MAISI's training data were.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

NETWORK_INPUT_KEYS = {"spacing", "spacing_range", "scale", "class_label", "body_regions"}


def body_region_range(label_values: Iterable[int], regions: Sequence[Sequence[int]], default: Sequence[int]) -> tuple:
    """(top, bottom) region indices: the first and last region a label of the map belongs to, else ``default``."""
    present = {int(v) for v in label_values}
    covered = [i for i, labels in enumerate(regions) if present & {int(v) for v in labels}]
    if not covered:
        return int(default[0]), int(default[1])
    return covered[0], covered[-1]


def extra_network_inputs(
    block: dict[str, Any] | None,
    batch: int,
    voxel_size: Sequence[float] | None = None,
    label_values: Iterable[int] = (),
) -> dict[str, dict[str, torch.Tensor]]:
    """``{"unet": {...}, "controlnet": {...}}``: the keyword inputs ``block`` declares, batched for ``batch``
    samples on a grid of ``voxel_size`` mm whose label map holds ``label_values``; empty without a block."""
    import torch

    if not block:
        return {}
    scale = float(block.get("scale", 1.0))
    unet: dict[str, torch.Tensor] = {}
    controlnet: dict[str, torch.Tensor] = {}
    if block.get("spacing"):
        if voxel_size is None:
            raise ValueError("this model takes the voxel spacing of its grid: give voxel_size")
        unet["spacing_tensor"] = torch.tensor([list(voxel_size)], dtype=torch.float32).repeat(batch, 1) * scale
    regions = block.get("body_regions")
    if regions:
        top, bottom = body_region_range(label_values, regions["labels"], regions["default"])
        eye = torch.eye(len(regions["labels"]), dtype=torch.float32) * scale
        unet["top_region_index_tensor"] = eye[top].repeat(batch, 1)
        unet["bottom_region_index_tensor"] = eye[bottom].repeat(batch, 1)
    if block.get("class_label") is not None:
        labels = torch.full((batch,), int(block["class_label"]), dtype=torch.long)
        unet["class_labels"] = controlnet["class_labels"] = labels
    return {"unet": unet, "controlnet": controlnet}
