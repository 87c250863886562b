"""npe2 reader: NIfTI and what SimpleITK reads, placed in RAS world space (see `layers`)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from napari_meddiff._napari.layers import (
    LayerDataTuple,
    install_orientation_letters,
    show_axial,
    volume_to_layer_data,
)
from napari_meddiff.io.files import IMAGE_SUFFIXES, image_stem
from napari_meddiff.io.volume import read_volume

PathOrPaths = str | os.PathLike | Sequence[str | os.PathLike]


def _paths(path: PathOrPaths) -> list[str]:
    return [os.fspath(path)] if isinstance(path, (str, os.PathLike)) else [os.fspath(p) for p in path]


def get_reader(path: PathOrPaths) -> Callable[[PathOrPaths], list[LayerDataTuple]] | None:
    """Our reader when every path has a supported suffix (no file is opened here)."""
    paths = _paths(path)
    if paths and all(p.lower().endswith(IMAGE_SUFFIXES) and not os.path.isdir(p) for p in paths):
        return read_layers
    return None


def read_layers(path: PathOrPaths) -> list[LayerDataTuple]:
    """One layer per file: Image, or Labels for integer files that look like segmentations.

    In a napari session the scans open the way a radiologist looks at them (`show_when_added`)."""
    layers = [volume_to_layer_data(read_volume(p), image_stem(p)) for p in _paths(path)]
    show_when_added(layers)
    return layers


def show_when_added(layers: list[LayerDataTuple]) -> None:
    """Once napari has added these layers to the current viewer: orientation letters on the canvas, and, when
    the viewer held nothing else, an axial slice through the middle of the first (`show_axial`).

    A reader only returns data; napari adds the layers after it returns, so this waits for them on
    ``viewer.layers.events.inserted`` (napari has updated the dims by then). Opening a file into a viewer that
    already shows something keeps that view (plane, slice, zoom): only the letters are added."""
    import sys

    if "napari" not in sys.modules or not layers:  # read outside napari (a script, the CLI): nothing to show
        return
    import napari

    viewer = napari.current_viewer()
    if viewer is None:
        return
    pending = [(data, meta["name"]) for data, meta, _ in layers]
    fresh = len(viewer.layers) == 0
    added: list = []

    def on_inserted(event) -> None:
        layer = event.value
        match = next((p for p in pending if p[0] is layer.data or p[1] == layer.name), None)
        if match is None:
            return
        pending.remove(match)
        added.append(layer)
        if pending:
            return
        viewer.layers.events.inserted.disconnect(on_inserted)
        if fresh and all(la in added for la in viewer.layers):
            show_axial(viewer, added[0])
        else:
            install_orientation_letters(viewer)

    viewer.layers.events.inserted.connect(on_inserted)
