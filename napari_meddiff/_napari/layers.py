"""The one place where a `Volume` becomes a napari layer data tuple and back.

World space is RAS millimetres: a layer's data axes are the volume's (i, j, k) and its transform is the
NIfTI affine (``scale`` + ``translate`` when axis-aligned, a full ``affine`` otherwise). The header
information needed to write the same file geometry back rides along in ``layer.metadata``.
"""

from __future__ import annotations

import weakref
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_meddiff.errors import MeddiffError
from napari_meddiff.io.intensity import intensity_window
from napari_meddiff.io.volume import Volume

if TYPE_CHECKING:  # pragma: no cover
    import napari
    from napari.layers import Layer

LayerDataTuple = tuple[np.ndarray, dict[str, Any], str]

AFFINE_KEY = "meddiff_affine"  # 4x4 voxel-to-RAS affine of the file the layer came from (list of lists)
HEADER_KEY = "nifti"  # header fields `write_volume` uses to give back the same file
HEADER_FIELDS = (
    "source_path",
    "format",
    "qform_code",
    "sform_code",
    "qform",
    "descrip",
    "xyzt_units",
    "original_dtype",
    "is_label_like",
)
AXIS_LABELS = ("x (R)", "y (A)", "z (S)")
UNITS = ("mm", "mm", "mm")
LABEL_NAME_HINTS = ("_seg", "_dseg", "label", "mask")
MAX_LABEL_VALUES = 64  # integer images with at most this many distinct values open as Labels


def world_kwargs(affine: np.ndarray) -> dict[str, Any]:
    """napari transform keywords for a 4x4 voxel-to-world affine.

    Axis-aligned affines (flips allowed) become ``scale`` + ``translate`` so 2D slicing stays exact;
    rotated, sheared or permuted ones become a full ``affine``.
    """
    affine = np.asarray(affine, dtype=np.float64)
    linear = affine[:3, :3]
    diag = np.diag(linear)
    off = linear - np.diag(diag)
    if np.all(np.abs(diag) > 0) and np.abs(off).max() <= 1e-6 * np.abs(diag).max():
        return {"scale": tuple(float(s) for s in diag), "translate": tuple(float(t) for t in affine[:3, 3])}
    return {"affine": affine.copy()}


def looks_like_labels(array: np.ndarray, name: str = "") -> bool:
    """Integer images with few distinct values, or integer images named like a segmentation."""
    if not np.issubdtype(array.dtype, np.integer) or array.size == 0:
        return False
    if any(hint in name.lower() for hint in LABEL_NAME_HINTS):
        return True
    lo, hi = int(array.min()), int(array.max())
    if hi - lo > 1 << 20:
        return False
    counts = np.bincount((np.asarray(array, dtype=np.int64) - lo).ravel())
    return int(np.count_nonzero(counts)) <= MAX_LABEL_VALUES


def robust_contrast(array: np.ndarray) -> tuple[float, float]:
    """Contrast limits from foreground percentiles (0.5, 99.5) of a ~1M-voxel subsample."""
    step = max(1, int(round((array.size / 1e6) ** (1 / max(array.ndim, 1)))))
    sub = np.asarray(array[(slice(None, None, step),) * array.ndim], dtype=np.float32)
    lo, hi = intensity_window(sub)
    return float(lo), float(hi)


def volume_metadata(vol: Volume) -> dict[str, Any]:
    """Layer metadata for ``vol``: affine + NIfTI header fields, other metadata (e.g. provenance) as is."""
    header = {k: vol.metadata[k] for k in HEADER_FIELDS if k in vol.metadata}
    rest = {k: v for k, v in vol.metadata.items() if k not in HEADER_FIELDS}
    return {**rest, AFFINE_KEY: vol.affine.tolist(), HEADER_KEY: header}


def volume_to_layer_data(
    vol: Volume,
    name: str,
    *,
    layer_type: str | None = None,
    contrast_limits: tuple[float, float] | None = None,
    **kwargs: Any,
) -> LayerDataTuple:
    """A napari layer data tuple for ``vol`` in RAS world space (2D arrays become one-slice volumes).

    ``layer_type`` is ``"image"``, ``"labels"`` or None (guess with `looks_like_labels`). Extra keywords go
    to the layer (e.g. ``colormap``, ``opacity``).
    """
    array = np.asarray(vol.array)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise MeddiffError(f"{name}: expected a 2D or 3D image, got shape {array.shape}")
    if layer_type is None:
        layer_type = "labels" if looks_like_labels(array, name) else "image"
    meta: dict[str, Any] = {
        "name": name,
        "metadata": volume_metadata(vol),
        "axis_labels": AXIS_LABELS,
        "units": UNITS,
        **world_kwargs(vol.affine),
    }
    if layer_type == "labels":
        if not np.issubdtype(array.dtype, np.integer):
            array = np.rint(array).astype(np.int32)
    elif layer_type == "image":
        meta.update(rgb=False, colormap="gray", contrast_limits=contrast_limits or robust_contrast(array))
    else:
        raise MeddiffError(f"layer type must be 'image' or 'labels', not {layer_type!r}")
    meta.update(kwargs)
    return array, meta, layer_type


def world_affine(meta: dict[str, Any], ndim: int) -> np.ndarray:
    """The (ndim+1)-square data-to-world matrix of a layer from its state dict (as napari composes it)."""
    from napari.utils.transforms import Affine

    data2physical = Affine(
        scale=meta.get("scale", [1.0] * ndim),
        translate=meta.get("translate", [0.0] * ndim),
        rotate=meta.get("rotate"),
        shear=meta.get("shear"),
        ndim=ndim,
    ).affine_matrix
    physical2world = np.asarray(meta.get("affine", np.eye(ndim + 1)), dtype=np.float64)
    return physical2world @ data2physical


def layer_data_to_volume(data: Any, meta: dict[str, Any]) -> Volume:
    """A `Volume` from a layer data tuple's data and state (its current world placement, header kept)."""
    if meta.get("multiscale"):
        data = data[0]
    if meta.get("rgb"):
        raise MeddiffError("RGB images cannot be saved as NIfTI volumes")
    array = np.asarray(data)
    if array.ndim not in (2, 3):
        raise MeddiffError(f"only 2D and 3D layers can be saved as NIfTI (this one has shape {array.shape})")
    metadata = dict(meta.get("metadata") or {})
    header = dict(metadata.pop(HEADER_KEY, None) or {})
    original = metadata.pop(AFFINE_KEY, None)
    matrix = world_affine(meta, array.ndim)
    if array.ndim == 3:
        affine = matrix
    else:  # a plain 2D layer: in-plane geometry from napari, the third axis from the file (if any)
        affine = np.asarray(original, dtype=np.float64) if original is not None else np.eye(4)
        affine[:2, :2], affine[:2, 3] = matrix[:2, :2], matrix[:2, 2]
    return Volume(array, affine, {**header, **metadata})


def layer_to_volume(layer: Layer) -> Volume:
    """The `Volume` a layer would be saved as (see `layer_data_to_volume`)."""
    data, meta, _ = layer.as_layer_data_tuple()
    return layer_data_to_volume(data, meta)


def _camera(viewer: napari.Viewer):
    return viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera


def show_axial(viewer: napari.Viewer, layer: Layer, *, reset_view: bool = True) -> None:
    """2D axial view through the middle of ``layer``, radiological: anterior up, patient right on screen left.

    The canvas edges get orientation letters (`install_orientation_letters`) that follow later changes of plane.
    """
    ndim = viewer.dims.ndim
    if ndim < 3:
        return
    viewer.dims.ndisplay = 2
    viewer.dims.order = (*range(ndim - 3), ndim - 1, ndim - 2, ndim - 3)  # slice along world z
    _camera(viewer).orientation2d = ("up", "left")  # world y (anterior) up, world x (right) towards screen left
    extent = np.asarray(layer.extent.world, dtype=float)
    viewer.dims.set_point(ndim - 1, float(extent[:, -1].mean()))
    if reset_view:
        viewer.reset_view(layers=[layer])
    install_orientation_letters(viewer)


# --- orientation letters on the canvas edges ----------------------------------------------------------------

# layers that state their anatomical axes (`set_axis_letters`), kept off their metadata (which is saved)
_AXIS_LETTERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
RAS_LETTERS = (("R", "L"), ("A", "P"), ("S", "I"))  # world x, y, z of a layer placed by `volume_to_layer_data`
LETTER_POSITIONS = {"top": "top_center", "bottom": "bottom_center", "left": "middle_left", "right": "middle_right"}
LETTER_OVERLAY = "meddiff_orientation_{}"  # keys in viewer.canvas.overlays


def set_axis_letters(layer: Layer, letters: tuple[tuple[str, str], ...]) -> None:
    """State ``layer``'s anatomical axes: per data axis, the letters its increasing and decreasing ends point
    to (the reader study's reoriented cases: ``(("S", "I"), ("P", "A"), ("L", "R"))``)."""
    _AXIS_LETTERS[layer] = tuple((str(p), str(n)) for p, n in letters)


def axis_letters(layer: Layer) -> tuple[tuple[str, str], ...] | None:
    """Anatomical letters of ``layer``'s last axes, or None when its world axes are not anatomical.

    Layers from `volume_to_layer_data` (their metadata holds the file's affine) sit in RAS world space; others
    may state theirs with `set_axis_letters`."""
    if layer in _AXIS_LETTERS:
        return _AXIS_LETTERS[layer]
    meta = layer.metadata or {}
    if AFFINE_KEY in meta and layer.ndim >= 3:
        return RAS_LETTERS
    return None


def orientation_letters(viewer: napari.Viewer) -> dict[str, str] | None:
    """The letters for the canvas edges (``top``, ``bottom``, ``left``, ``right``) of the 2D view now shown.

    They come from the top-most visible layer with anatomical axes (`axis_letters`), the two world axes on
    screen (``viewer.dims.displayed``: rows, then columns) and the camera's 2D orientation (which way each
    of them increases). None in 3D, or when no visible layer has anatomical axes."""
    dims = viewer.dims
    if dims.ndisplay != 2:
        return None
    letters = next((a for la in reversed(viewer.layers) if la.visible and (a := axis_letters(la))), None)
    if letters is None:
        return None
    offset = dims.ndim - len(letters)  # napari aligns a layer's axes with the last world axes
    rows, cols = (d - offset for d in dims.displayed[-2:])
    if min(rows, cols) < 0:
        return None
    vertical, horizontal = _camera(viewer).orientation2d
    (row_up, row_down), (col_up, col_down) = letters[rows], letters[cols]
    top, bottom = (row_up, row_down) if str(vertical) == "up" else (row_down, row_up)
    left, right = (col_up, col_down) if str(horizontal) == "left" else (col_down, col_up)
    return {"top": top, "bottom": bottom, "left": left, "right": right}


def update_orientation_letters(viewer: napari.Viewer, *_: Any) -> None:
    """Write `orientation_letters` into the four text overlays (hidden when there are none)."""
    overlays = viewer.canvas.overlays
    letters = orientation_letters(viewer) or {}
    for edge in LETTER_POSITIONS:
        key = LETTER_OVERLAY.format(edge)
        if key in overlays:
            overlays[key].text = letters.get(edge, "")
            overlays[key].visible = edge in letters


def install_orientation_letters(viewer: napari.Viewer) -> None:
    """Orientation letters (L/R, A/P, S/I) on the four canvas edges, kept right as the plane, the camera's
    orientation or the layers change. Once per viewer; later calls only refresh them.

    They are napari canvas overlays (`TextOverlay`, one per edge: napari 0.9 places them at the edge centres
    and draws them in the canvas, so they are in screenshots and exports too, which a Qt label over the canvas
    would not be; ``viewer.text_overlay`` holds one string in one corner)."""
    from napari.components.overlays import TextOverlay

    overlays = viewer.canvas.overlays
    if LETTER_OVERLAY.format("top") not in overlays:
        for edge, position in LETTER_POSITIONS.items():
            overlays[LETTER_OVERLAY.format(edge)] = TextOverlay(
                text="", position=position, color="yellow", font_size=14, visible=False
            )
        update = partial(update_orientation_letters, viewer)
        for emitter in (
            viewer.dims.events.order,
            viewer.dims.events.ndisplay,
            viewer.dims.events.ndim,
            _camera(viewer).events.orientation,
            viewer.layers.events.removed,
            viewer.layers.events.moved,
        ):
            emitter.connect(update)

        def follow(layer: Layer) -> None:
            layer.events.visible.connect(update)
            layer.events.metadata.connect(update)

        def inserted(event: Any) -> None:
            follow(event.value)
            update()

        viewer.layers.events.inserted.connect(inserted)
        for layer in viewer.layers:
            follow(layer)
    update_orientation_letters(viewer)
