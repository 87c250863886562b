"""A scan opened through the plugin's reader shows an axial slice, radiological, with orientation letters on
the canvas edges that follow the plane on screen (issue 37)."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest

pytestmark = [
    pytest.mark.napari,
    pytest.mark.skipif(
        not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")), reason="run under xvfb-run"
    ),
]

SHAPE = (40, 48, 30)


def lps_scan(path):
    """A LPS-stored scan (i towards the left, j towards posterior) with a bright cube at the patient's
    right-anterior of the middle axial slice, and a dimmer body around it."""
    array = np.zeros(SHAPE, np.float32)
    array[4:36, 4:44, 4:26] = 100.0
    k = SHAPE[2] // 2
    array[5:12, 5:12, k - 2 : k + 3] = 1000.0  # small i = right, small j = anterior (x and y flipped)
    affine = np.diag([-2.0, -2.0, 2.0, 1.0])
    affine[:3, 3] = (40.0, 50.0, -30.0)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def letters(viewer):
    overlays = viewer.canvas.overlays
    keys = {edge: f"meddiff_orientation_{edge}" for edge in ("top", "bottom", "left", "right")}
    return {edge: overlays[key].text for edge, key in keys.items() if key in overlays and overlays[key].visible}


def test_a_scan_opens_axial_radiological_with_letters(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer(show=True)
    viewer.open(str(lps_scan(tmp_path / "scan.nii.gz")), plugin="napari-meddiff")
    (layer,) = viewer.layers
    assert viewer.dims.ndisplay == 2 and tuple(viewer.dims.order) == (2, 1, 0)  # slicing along world z
    assert tuple(str(o) for o in viewer.scene.camera.orientation2d) == ("up", "left")
    z_extent = np.asarray(layer.extent.world)[:, 2]
    assert viewer.dims.point[2] == pytest.approx(z_extent.mean(), abs=2.0)  # the middle of the volume
    assert letters(viewer) == {"top": "A", "bottom": "P", "left": "R", "right": "L"}

    qtbot.wait(50)
    shot = np.asarray(viewer.screenshot(canvas_only=True, flash=False))[..., :3].astype(float).mean(-1)
    rows, cols = np.nonzero(shot > 0.9 * shot.max())  # the cube: patient right-anterior
    height, width = shot.shape
    assert rows.mean() < height / 2 and cols.mean() < width / 2, "right-anterior should be top-left on screen"

    viewer.dims.order = (1, 2, 0)  # coronal
    assert letters(viewer) == {"top": "S", "bottom": "I", "left": "R", "right": "L"}
    viewer.dims.order = (0, 2, 1)  # sagittal
    assert letters(viewer) == {"top": "S", "bottom": "I", "left": "A", "right": "P"}
    viewer.scene.camera.orientation2d = ("down", "right")  # the user flips the view: the letters follow
    assert letters(viewer) == {"top": "I", "bottom": "S", "left": "P", "right": "A"}
    viewer.dims.ndisplay = 3
    assert letters(viewer) == {}  # no edge letters on a rotatable 3D view
    viewer.dims.ndisplay = 2
    layer.visible = False
    assert letters(viewer) == {}  # nothing anatomical on screen


def test_opening_into_a_busy_viewer_keeps_its_view_and_adds_letters(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((5, 6, 7), np.float32), name="other")
    viewer.dims.set_current_step(0, 1)
    viewer.open(str(lps_scan(tmp_path / "scan.nii.gz")), plugin="napari-meddiff")
    assert len(viewer.layers) == 2 and tuple(viewer.dims.order) == (0, 1, 2)
    assert set(letters(viewer)) == {"top", "bottom", "left", "right"}


def test_reading_outside_napari_needs_no_viewer(tmp_path):
    from napari_meddiff._napari.reader import read_layers

    ((data, meta, kind),) = read_layers(lps_scan(tmp_path / "scan.nii.gz"))
    assert kind == "image" and data.shape == SHAPE and meta["scale"] == (-2.0, -2.0, 2.0)
