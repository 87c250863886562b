"""The reader study takes over the canvas: the case alone, axial, in the study's window, fitted; the viewer is
given back as it was when the study is closed, finished or its widget removed (issue 37)."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest
from qtpy.QtCore import Qt

from napari_meddiff.review.study import create_study

pytestmark = [
    pytest.mark.napari,
    pytest.mark.skipif(
        not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")), reason="run under xvfb-run"
    ),
]


@pytest.fixture
def study(tmp_path):
    rng = np.random.default_rng(0)
    for src in ("real", "synthetic"):
        (tmp_path / src).mkdir()
        for i in range(2):
            arr = rng.random((10, 12, 8)) * (1000 if src == "real" else 1)
            affine = np.diag([1.0, 1.0, 2.0, 1.0])
            nib.save(nib.Nifti1Image(arr.astype(np.float32), affine), str(tmp_path / src / f"{src}{i}.nii.gz"))
    return create_study(
        tmp_path / "real", tmp_path / "synthetic", tmp_path / "study", key=tmp_path / "key.json", seed=4
    )


def cluttered_viewer(make_napari_viewer):
    """A viewer already holding a scan far from the origin, a segmentation on top, and a hidden layer."""
    viewer = make_napari_viewer(show=True)
    scan = viewer.add_image(
        np.full((30, 30, 30), 5.0, np.float32), name="real_subject_T1w", translate=(-75, 200, 0), scale=(3, 1, 1)
    )
    seg = viewer.add_labels(np.ones((30, 30, 30), np.int32), name="synthetic_seed3_seg", translate=(-40, 0, 0))
    off = viewer.add_image(np.zeros((4, 4, 4), np.float32), name="already hidden", visible=False)
    viewer.dims.order = (2, 1, 0)
    viewer.dims.set_point(0, -20.0)
    viewer.scene.camera.orientation2d = ("up", "left")
    return viewer, scan, seg, off


def start(viewer, qtbot, study):
    _, widget = viewer.window.add_plugin_dock_widget("napari-meddiff", "Review (reader study)")
    widget.folder_edit.setText(str(study.folder))
    widget.reader_edit.setText("Ann")
    qtbot.mouseClick(widget.start_button, Qt.LeftButton)
    return widget


def visible(viewer):
    return [layer.name for layer in viewer.layers if layer.visible]


def assert_case_alone(viewer, widget, study, index):
    case = widget.layer
    assert case is not None and case.name == study.ids[index]
    assert visible(viewer) == [case.name]  # case 1 and 2 showed the segmentation on top before
    assert tuple(case.contrast_limits) == (0.0, 1.0) and case.opacity == 1.0
    assert viewer.dims.ndisplay == 2 and tuple(viewer.dims.order) == (0, 1, 2)
    assert tuple(str(o) for o in viewer.scene.camera.orientation2d) == ("down", "right")
    middle = case.data.shape[0] // 2  # the case's middle slice is on screen, wherever the hidden layers lie
    assert viewer.dims.point[0] == pytest.approx(middle * case.scale[0])
    shown = np.asarray(case._slice.image.raw)  # what napari sliced for the canvas (private, in a test)
    np.testing.assert_allclose(shown, case.data[middle])
    lo, hi = np.asarray(case.extent.world)[:, 1:]  # the camera is on the case, not on the other layers
    assert np.all(np.asarray(viewer.scene.camera.center)[-2:] >= lo) and np.all(
        np.asarray(viewer.scene.camera.center)[-2:] <= hi
    )
    dock = viewer.window._qt_viewer.dockLayerList
    assert not dock.isVisible()  # the other layers' names (which hint at sources) are not on screen
    overlays = viewer.canvas.overlays
    assert overlays["meddiff_orientation_top"].text == "A" and overlays["meddiff_orientation_left"].text == "R"


def assert_given_back(viewer, scan, seg, off):
    assert [layer.name for layer in viewer.layers] == [scan.name, seg.name, off.name]
    assert scan.visible and seg.visible and not off.visible
    assert tuple(viewer.dims.order) == (2, 1, 0) and viewer.dims.point[0] == pytest.approx(-20.0, abs=1.5)
    assert tuple(str(o) for o in viewer.scene.camera.orientation2d) == ("up", "left")
    assert viewer.window._qt_viewer.dockLayerList.isVisible()


def test_the_study_takes_over_the_canvas_and_gives_it_back_when_closed(make_napari_viewer, qtbot, study):
    viewer, scan, seg, off = cluttered_viewer(make_napari_viewer)
    widget = start(viewer, qtbot, study)
    assert_case_alone(viewer, widget, study, 0)
    late = viewer.add_image(np.ones((3, 3, 3), np.float32), name="added during the study")
    assert not late.visible  # nothing else appears while the study runs
    widget._choose("real")
    widget._realism(4)
    qtbot.mouseClick(widget.next_button, Qt.LeftButton)
    assert_case_alone(viewer, widget, study, 1)
    qtbot.mouseClick(widget.close_button, Qt.LeftButton)
    assert late.visible
    viewer.layers.remove(late)
    assert_given_back(viewer, scan, seg, off)
    assert widget.study is None and not widget.next_button.isEnabled()


def test_finishing_the_study_gives_the_viewer_back(make_napari_viewer, qtbot, study):
    viewer, scan, seg, off = cluttered_viewer(make_napari_viewer)
    widget = start(viewer, qtbot, study)
    for index in range(len(study.cases)):
        assert_case_alone(viewer, widget, study, index)
        widget._choose("synthetic")
        widget._realism(2)
        widget.next_case()
    assert "All 4 cases answered" in widget.status_label.text()
    assert_given_back(viewer, scan, seg, off)
    widget.previous_case()  # revising takes the canvas again
    assert_case_alone(viewer, widget, study, 2)


def test_removing_the_widget_gives_the_viewer_back(make_napari_viewer, qtbot, study):
    viewer, scan, seg, off = cluttered_viewer(make_napari_viewer)
    widget = start(viewer, qtbot, study)
    assert_case_alone(viewer, widget, study, 0)
    viewer.window.remove_dock_widget(widget)
    assert_given_back(viewer, scan, seg, off)
