"""Widgets that mislead (issue 37): Segment's image follows only the user's choice and never a preview
layer; Generate again makes a new volume; the "(generating…)" layer is transparent until its first
preview; the model summary is not clipped; docked widgets scroll rather than growing the window."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")

from napari_meddiff._napari.widgets.generate import PREVIEW_KEY, GenerateWidget  # noqa: E402
from napari_meddiff._napari.widgets.segment import SegmentWidget  # noqa: E402

TIMEOUT_MS = 180_000


def _generate_widget(make_napari_viewer, model_dir):
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-meddiff", "Generate")
    assert isinstance(widget, GenerateWidget)
    widget.model_picker.add_folder(model_dir)
    return viewer, widget


def test_segment_image_skips_previews_and_follows_only_the_user(make_napari_viewer, qtbot, models_env):
    viewer = make_napari_viewer()
    scan = viewer.add_image(np.random.rand(8, 8, 8).astype(np.float32), name="scan")
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment")
    qtbot.wait(20)
    assert widget.image_combo.currentText() == "scan"

    # a "(generating…)" layer, added (and so made active by napari) while another widget runs
    viewer.add_image(np.zeros((8, 8, 8), np.float32), name="x (generating…)", metadata={PREVIEW_KEY: True})
    assert "x (generating…)" not in [widget.image_combo.itemText(i) for i in range(widget.image_combo.count())]
    assert widget.image_combo.currentText() == "scan"

    # a new image napari selects as it is added: not the user's choice, the box stays
    other = viewer.add_image(np.random.rand(8, 8, 8).astype(np.float32), name="other")
    assert viewer.layers.selection.active is other
    assert widget.image_combo.currentText() == "scan"

    # the user picks a layer in the layer list: the box follows
    qtbot.wait(20)
    viewer.layers.selection.active = scan
    viewer.layers.selection.active = other
    assert widget.image_combo.currentText() == "other"


def test_generate_again_makes_a_new_volume(make_napari_viewer, qtbot, tiny_models):
    viewer, widget = _generate_widget(make_napari_viewer, tiny_models["ddpm2d"])
    widget.sampling.steps.setValue(2)
    widget.sampling.seed.setValue(3)
    for _ in range(2):
        widget.generate_button.click()
        qtbot.waitUntil(lambda: not widget.runner.running, timeout=TIMEOUT_MS)
    assert [layer.name for layer in viewer.layers] == ["tiny-ddpm-2d_seed3", "tiny-ddpm-2d_seed4"]
    assert widget.sampling.seed.value() == 5
    assert not np.array_equal(viewer.layers[0].data, viewer.layers[1].data)
    assert "Next seed: 5" in widget.progress.label.text()


def test_generating_layer_is_transparent_until_the_first_preview(make_napari_viewer, qtbot, tiny_models):
    viewer, widget = _generate_widget(make_napari_viewer, tiny_models["ldm3d"])
    widget.sampling.steps.setValue(400)
    widget.preview_every.setValue(2)
    widget.generate_button.click()
    (layer,) = viewer.layers
    assert layer.metadata.get(PREVIEW_KEY) and layer.opacity == 0.0  # empty: it must not paint the canvas black
    qtbot.waitUntil(lambda: widget.progress.bar.value() >= 3, timeout=TIMEOUT_MS)
    assert layer.opacity == 1.0 and float(np.max(layer.data)) > 0.0  # the first preview shows
    widget.cancel()
    qtbot.waitUntil(lambda: not widget.runner.running, timeout=TIMEOUT_MS)


@pytest.mark.parametrize("name", ["Generate", "Inpaint"])
def test_model_summary_is_not_clipped(make_napari_viewer, qtbot, models_env, name):
    viewer = make_napari_viewer(show=True)
    _, widget = viewer.window.add_plugin_dock_widget("napari-meddiff", name)
    widget.model_picker.select("tiny-ldm-3d")
    qtbot.wait(100)
    label = widget.model_summary
    assert label.text() and label.wordWrap()
    assert label.height() >= label.heightForWidth(label.width()), (label.height(), label.heightForWidth(label.width()))


def test_four_docked_widgets_scroll_instead_of_growing_the_window(make_napari_viewer, qtbot, models_env):
    viewer = make_napari_viewer(show=True)
    widgets = [
        viewer.window.add_plugin_dock_widget("napari-meddiff", name)[1] for name in ("Generate", "Inpaint", "Segment")
    ]
    qtbot.wait(100)
    for widget in widgets:
        assert widget.scroll_area.widgetResizable()
        assert widget.minimumSizeHint().height() <= 200  # docked with others, it scrolls
    screen = viewer.window._qt_window.screen().availableGeometry().height()
    assert viewer.window._qt_window.height() <= screen
