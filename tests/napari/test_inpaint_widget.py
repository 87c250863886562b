"""The Inpaint dock widget with tiny models: candidates as layers, preview, cancel, errors (run under xvfb-run)."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
    pytest.skip("napari tests need a display: run under xvfb-run -a", allow_module_level=True)
pytest.importorskip("napari")

from napari.utils.notifications import NotificationSeverity, notification_manager  # noqa: E402

from napari_meddiff import Volume  # noqa: E402
from napari_meddiff._napari.layers import layer_to_volume, volume_to_layer_data  # noqa: E402
from napari_meddiff._napari.widgets.inpaint import PREVIEW_KEY, InpaintWidget  # noqa: E402

pytestmark = pytest.mark.napari
TIMEOUT_MS = 120_000


def scan() -> Volume:
    rng = np.random.default_rng(0)
    shape = (24, 22, 20)
    idx = np.indices(shape).astype(float)
    c = (np.array(shape) - 1) / 2
    r = (((idx - c[:, None, None, None]) / (np.array(shape)[:, None, None, None] * 0.4)) ** 2).sum(0)
    arr = (10 + 70 * (r < 1) + rng.normal(0, 3, shape)).astype(np.float32)
    affine = np.diag([-3.0, 3.0, 3.5, 1.0])  # a flipped x axis, as in LPS-stored files
    affine[:3, 3] = [40.0, -30.0, -20.0]
    return Volume(arr, affine)


def open_widget(make_napari_viewer, model_dir, *, with_mask=True):
    from napari.layers import Layer

    viewer = make_napari_viewer()
    image = scan()
    layer = viewer.add_layer(Layer.create(*volume_to_layer_data(image, "scan", layer_type="image")))
    widget = InpaintWidget(viewer)  # as napari builds it from the manifest (napari_viewer keyword)
    viewer.window.add_dock_widget(widget, name="Inpaint")
    widget.model_picker.add_folder(model_dir)
    widget.sampling.steps.setValue(2)
    mask = None
    if with_mask:
        mask = widget.new_mask()
        mask.data[10:14, 9:13, 8:12] = 2
        mask.data[2:4, 2:4, 2:4] = 1
        mask.refresh()
    return viewer, widget, layer, mask


def run_and_wait(qtbot, widget: InpaintWidget) -> None:
    widget.inpaint_button.click()
    assert widget.runner.running
    qtbot.waitUntil(lambda: not widget.runner.running, timeout=TIMEOUT_MS)


def assert_usable(widget: InpaintWidget) -> None:
    assert widget.settings.isEnabled() and widget.inpaint_button.isEnabled()
    assert not widget.progress.cancel_button.isEnabled() and not widget.runner.running


@pytest.mark.parametrize("kind", ["ldm3d", "ddpm2d"])
def test_inpaint_candidates_become_layers(make_napari_viewer, qtbot, tiny_models, kind):
    viewer, widget, image_layer, mask_layer = open_widget(make_napari_viewer, tiny_models[kind])
    assert widget.labels_combo.layer() is mask_layer and widget.image_combo.layer() is image_layer
    assert widget.axis.isVisibleTo(widget) == (kind == "ddpm2d")
    widget.label_value.setValue(2)
    widget.candidates.setValue(2)
    widget.sampling.seed.setValue(4)
    previews = []
    viewer.layers.events.inserted.connect(
        lambda e: previews.append(e.value.name) if e.value.metadata.get(PREVIEW_KEY) else None
    )
    run_and_wait(qtbot, widget)
    assert previews, "no live preview was shown"
    names = [layer.name for layer in viewer.layers]
    assert names == ["scan", "scan mask", "scan inpainted s4", "scan inpainted s5"], names
    original = layer_to_volume(image_layer)
    filled = mask_layer.data == 2
    for name in names[2:]:
        result = layer_to_volume(viewer.layers[name])
        np.testing.assert_allclose(result.affine, original.affine)
        assert np.array_equal(result.array[~filled], original.array[~filled])
        assert not np.array_equal(result.array[filled], original.array[filled])
        assert result.metadata["provenance"]["label"] == 2
    assert viewer.layers["scan inpainted s4"].visible and not viewer.layers["scan inpainted s5"].visible
    assert widget.progress.bar.maximum() == 1 and "2 candidate(s)" in widget.progress.label.text()
    assert_usable(widget)


def test_cancel_and_errors(make_napari_viewer, qtbot, tiny_models):
    viewer, widget, image_layer, mask_layer = open_widget(make_napari_viewer, tiny_models["ddpm3d"])
    widget.sampling.steps.setValue(300)
    widget.inpaint_button.click()
    qtbot.waitUntil(lambda: widget.progress.bar.value() >= 2, timeout=TIMEOUT_MS)
    widget.progress.cancel_button.click()
    qtbot.waitUntil(lambda: not widget.runner.running, timeout=TIMEOUT_MS)
    assert [layer.name for layer in viewer.layers] == ["scan", "scan mask"]  # no preview, no half-made fill
    assert widget.progress.label.text() == "Cancelled."
    assert_usable(widget)

    mask_layer.data[:] = 0  # an empty mask: a clear one-line error, the widget stays usable
    widget.sampling.steps.setValue(2)
    before = len(notification_manager.records)
    run_and_wait(qtbot, widget)
    errors = [n.message for n in notification_manager.records[before:] if n.severity == NotificationSeverity.ERROR]
    assert len(errors) == 1 and errors[0].startswith("Inpaint failed:") and "empty" in errors[0], errors
    assert_usable(widget)
    assert len(viewer.layers) == 2


def test_needs_image_and_mask(make_napari_viewer, tiny_models):
    viewer, widget, image_layer, _ = open_widget(make_napari_viewer, tiny_models["ldm3d"], with_mask=False)
    assert widget.labels_combo.layer() is None and not widget.inpaint_button.isEnabled()
    mask = widget.new_mask()
    assert mask.data.shape == image_layer.data.shape and widget.inpaint_button.isEnabled()
    np.testing.assert_allclose(layer_to_volume(mask).affine, layer_to_volume(image_layer).affine)
    viewer.layers.remove(mask)
    assert not widget.inpaint_button.isEnabled()
    mask.name = "renamed"  # a removed layer no longer drives the combo
    viewer.layers.remove(image_layer)
    assert widget.image_combo.count() == 0 and not widget.new_mask_button.isEnabled()


def test_conditional_model_shows_condition_sliders_and_uses_them(make_napari_viewer, qtbot, tiny_models, tmp_path):
    from tests.helpers import conditional_model as _conditional_model

    viewer, widget, image_layer, mask_layer = open_widget(make_napari_viewer, tiny_models["ldm3d"])
    assert not widget.conditions.isVisibleTo(widget)  # an unconditional model: no sliders
    widget.model_picker.add_folder(_conditional_model(tmp_path / "tiny-cond-2d"))
    assert widget.conditions.isVisibleTo(widget) and list(widget.conditions.rows) == ["age", "lesion_load"]
    assert widget.conditions.guidance is None  # inpainting has no guidance
    widget.conditions.rows["age"].set_value(0.9)
    widget.sampling.steps.setValue(2)
    widget.label_value.setValue(2)
    run_and_wait(qtbot, widget)
    result = layer_to_volume(viewer.layers["scan inpainted s0"])
    assert result.metadata["provenance"]["conditions"] == {"age": 0.9, "lesion_load": 0.0}
    assert_usable(widget)


def test_edit_a_copy_of_the_tissue_map_and_regenerate_what_changed(make_napari_viewer, qtbot, tmp_path):
    """A label-map model shows the Tissue map rows; "Edit a copy" duplicates the map on its grid for painting
    (the lesion label picked); the result changes only where the copy was painted (and one voxel around), as
    the core's inpaint under the edited map makes it, bit for bit; unchanged copies are a message."""
    from napari.layers import Layer

    from napari_meddiff.models import load_model
    from napari_meddiff.tasks.from_labels import changed_labels_mask
    from napari_meddiff.tasks.inpaint import inpaint
    from napari_meddiff.testing.tiny_models import make_tiny_model
    from tests.tasks.test_from_labels import LABELS, edited, scan_of, tissue_map

    folder = make_tiny_model(tmp_path / "tiny-from-labels-3d", "ddpm", 3, label_map=LABELS)
    viewer = make_napari_viewer()
    labels = tissue_map()
    scan_vol = scan_of(labels)
    viewer.add_layer(Layer.create(*volume_to_layer_data(scan_vol, "scan", layer_type="image")))
    tissue = viewer.add_labels(labels.array, affine=labels.affine, name="tissue")
    _, widget = viewer.window.add_plugin_dock_widget("napari-meddiff", "Inpaint")  # its viewer hands out proxies
    widget.model_picker.add_folder(folder)
    widget.sampling.steps.setValue(2)
    widget.sampling.seed.setValue(3)
    assert widget.map_combo.isVisibleTo(widget) and widget.map_combo.layer().unique_id == tissue.unique_id
    copy = widget.edit_map_copy()
    assert widget.map_combo.layer().unique_id == copy.unique_id and copy.selected_label == 4
    assert widget.changed_only.isChecked()
    np.testing.assert_allclose(copy.data_to_world((1, 2, 3)), tissue.data_to_world((1, 2, 3)))
    with notification_manager:
        widget.run()  # nothing painted yet
    assert not widget.runner.running and any("nothing was changed" in str(n.message)
                                             for n in notification_manager.records)  # fmt: skip
    after = edited(labels)
    copy.data = after.array
    run_and_wait(qtbot, widget)
    (result,) = [layer for layer in viewer.layers if "inpainted" in layer.name]
    np.testing.assert_array_equal(tissue.data, labels.array)  # the original map is untouched
    region = changed_labels_mask(labels, after, 1)
    (ref,) = inpaint(load_model(folder), scan_vol, region, labels=after, steps=2, seed=3, device="cpu")
    np.testing.assert_array_equal(result.data, ref.array)
    np.testing.assert_array_equal(result.data[~region], scan_vol.array[~region])
    assert_usable(widget)
