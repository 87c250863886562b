"""npe2 writers: image and labels layers to NIfTI with their world geometry (atomic; JSON sidecar for provenance).

napari's save dialog has already asked before replacing a file, so these writers overwrite; the
widgets' own "Save as NIfTI..." asks first and calls `save_layer_data` with ``overwrite`` accordingly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from napari_meddiff._napari.layers import layer_data_to_volume
from napari_meddiff.io.files import image_stem, write_text_atomic
from napari_meddiff.io.volume import write_volume


def sidecar_path(path: str | os.PathLike) -> Path:
    """``scan.nii.gz`` -> ``scan.json`` (as written by ``meddiff generate``)."""
    return Path(path).with_name(f"{image_stem(path)}.json")


def _description(provenance: dict[str, Any] | None) -> str | None:
    if not provenance:
        return None
    return f"meddiff {provenance.get('model', '')} seed {provenance.get('seed', '')}".strip()


def save_layer_data(
    path: str | os.PathLike, data: Any, meta: dict[str, Any], *, kind: str, overwrite: bool = False
) -> list[str]:
    """Write one layer (data + state dict) as NIfTI; a ``provenance`` in its metadata also goes to a sidecar."""
    vol = layer_data_to_volume(data, meta)
    provenance = vol.metadata.get("provenance")
    out = write_volume(
        vol, path, kind=kind, overwrite=overwrite, description=_description(provenance), allow_nonfinite=True
    )  # the user's own layer, written as it is
    written = [str(out)]
    if provenance:
        side = sidecar_path(out)
        write_text_atomic(side, json.dumps({"image": out.name, **provenance}, indent=2, default=str) + "\n")
        written.append(str(side))
    return written


def write_image(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """npe2 writer for one image layer (float32 NIfTI)."""
    return save_layer_data(path, data, meta, kind="image", overwrite=True)


def write_labels(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """npe2 writer for one labels layer (smallest fitting integer NIfTI)."""
    return save_layer_data(path, data, meta, kind="labels", overwrite=True)
