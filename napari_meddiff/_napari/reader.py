"""npe2 reader: NIfTI and what SimpleITK reads, placed in RAS world space (see `layers`)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from napari_meddiff._napari.layers import NIFTI_SUFFIXES, LayerDataTuple, layer_name, volume_to_layer_data
from napari_meddiff.io.volume import read_volume

PathOrPaths = str | os.PathLike | Sequence[str | os.PathLike]


def _paths(path: PathOrPaths) -> list[str]:
    return [os.fspath(path)] if isinstance(path, (str, os.PathLike)) else [os.fspath(p) for p in path]


def get_reader(path: PathOrPaths) -> Callable[[PathOrPaths], list[LayerDataTuple]] | None:
    """Our reader when every path has a supported suffix (no file is opened here)."""
    paths = _paths(path)
    if paths and all(p.lower().endswith(NIFTI_SUFFIXES) and not os.path.isdir(p) for p in paths):
        return read_layers
    return None


def read_layers(path: PathOrPaths) -> list[LayerDataTuple]:
    """One layer per file: Image, or Labels for integer files that look like segmentations."""
    return [volume_to_layer_data(read_volume(p), layer_name(p)) for p in _paths(path)]
