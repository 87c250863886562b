"""The Segment dock widget in a real napari viewer (run under xvfb-run): results in the image's world space,
per-member progress, the class-volume table, switching the probability class, cancel."""

from __future__ import annotations

import numpy as np
import pytest
from qtpy.QtCore import Qt

from napari_meddiff._napari.layers import layer_to_volume, volume_to_layer_data
from napari_meddiff.io.volume import Volume
from napari_meddiff.testing.tiny_models import make_tiny_model

pytestmark = pytest.mark.napari


@pytest.fixture(scope="module")
def seg_model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("segwidget")
    return make_tiny_model(root / "tiny-seg-2d", "segmentation", 2, image_shape=(16, 16))


@pytest.fixture
def widget_and_viewer(make_napari_viewer, seg_model_dir, monkeypatch, qtbot):
    from napari.layers import Layer

    from napari_meddiff._napari.widgets.segment import SegmentWidget

    monkeypatch.setenv("MEDDIFF_MODELS", str(seg_model_dir.parent))
    viewer = make_napari_viewer()
    rng = np.random.default_rng(0)
    idx = np.indices((14, 12, 8)).astype(np.float32)
    arr = np.where(((idx - np.array([6.5, 5.5, 3.5])[:, None, None, None]) ** 2).sum(0) < 20, 80.0, 0.0)
    arr = (arr + rng.random(arr.shape) * 5).astype(np.float32)
    theta = np.deg2rad(15)
    affine = np.eye(4)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    affine[:3, :3] = rot @ np.diag([-3.0, 3.0, 4.0])
    affine[:3, 3] = (20.0, -10.0, 5.0)
    data, meta, kind = volume_to_layer_data(Volume(arr, affine), "scan", layer_type="image")
    image = viewer.add_layer(Layer.create(data, meta, kind))
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment")
    widget.model_picker.select("tiny-seg-2d")
    widget.ensemble.setValue(3)
    widget.sampling.sampler.setCurrentText("ddim")
    widget.sampling.steps.setValue(2)
    widget.sampling.seed.setValue(1)
    return widget, viewer, image


def test_segment_widget_results_overlay_the_image(widget_and_viewer, qtbot):
    widget, viewer, image = widget_and_viewer
    assert widget.image_combo.currentText() == "scan"
    assert widget.model_picker.current().kind == "segmentation"
    assert widget.axis.isVisibleTo(widget)  # a 2D model: slice axis shown
    assert widget.segment_button.isEnabled()
    assert not widget.probability_class.isEnabled()  # nothing to show the probability of yet
    qtbot.mouseClick(widget.segment_button, Qt.LeftButton)
    assert widget.runner.running
    qtbot.waitUntil(lambda: not widget.runner.running, timeout=180_000)
    assert widget.result is not None and widget.probability_class.isEnabled()
    assert widget.progress.label.text().startswith("3 member(s) × ") and "Done in" in widget.progress.label.text()
    names = [layer.name for layer in viewer.layers]
    assert names == ["scan", "scan labels", "scan P(CSF)", "scan uncertainty"]
    labels, prob, unc = viewer.layers["scan labels"], viewer.layers["scan P(CSF)"], viewer.layers["scan uncertainty"]
    src = layer_to_volume(image)
    for layer in (labels, prob, unc):
        vol = layer_to_volume(layer)
        np.testing.assert_allclose(vol.affine, src.affine, atol=1e-9)
        assert vol.shape == src.shape
    assert np.issubdtype(labels.data.dtype, np.integer)
    np.testing.assert_array_equal(labels.data, widget.result.labels.array)
    assert list(labels.features["class"]) == ["background", "CSF", "GM", "WM"]
    assert unc.colormap.name == "magma" and tuple(unc.contrast_limits) == (0.0, 1.0)
    np.testing.assert_array_equal(unc.data, widget.result.uncertainty.array)
    np.testing.assert_array_equal(prob.data, widget.result.probabilities.array[..., 1])
    # every member finished, and the table holds each class + the non-background total
    assert len(widget.member_bars.bars) == 3 and all(b.value() == 1000 for b in widget.member_bars.bars)
    assert widget.table.rowCount() == 5
    table = widget.volumes_text().splitlines()
    assert table[0].startswith("background") and table[-1].startswith("total")
    gm_ml = float(table[2].split("\t")[1].replace(",", ""))
    assert gm_ml == pytest.approx(widget.result.volumes_ml["GM"], abs=0.06)
    # switch the probability layer to another class
    widget.probability_class.setCurrentText("WM")
    assert prob.name == "scan P(WM)"
    np.testing.assert_array_equal(prob.data, widget.result.probabilities.array[..., 3])
    # running again replaces the three result layers rather than piling them up
    widget.probability_class.setCurrentText("GM")
    viewer.dims.order = (0, 2, 1)  # the user looks along another axis meanwhile
    layers = list(viewer.layers)
    widget.run()
    assert not widget.probability_class.isEnabled()  # it would refill the layers this run is replacing
    qtbot.waitUntil(lambda: not widget.runner.running, timeout=180_000)
    assert [layer.name for layer in viewer.layers] == ["scan", "scan labels", "scan P(GM)", "scan uncertainty"]
    assert widget.image_combo.count() == 1  # result images are not offered as inputs
    # ...refilling them in place (a new napari layer costs the event loop 0.2-0.5 s), and the view stays
    assert list(viewer.layers) == layers and tuple(viewer.dims.order) == (0, 2, 1)
    np.testing.assert_array_equal(labels.data, widget.result.labels.array)
    np.testing.assert_array_equal(prob.data, widget.result.probabilities.array[..., 2])
    assert widget.result_layers == {"labels": labels, "probability": prob, "uncertainty": unc}


def test_segment_widget_adds_its_result_layers_one_event_loop_turn_apart(widget_and_viewer, qtbot):
    """Each new napari layer costs the GUI thread 0.1-0.3 s: three at once froze the viewer for 0.6 s (issue 37).
    The run ends with its last layer."""
    from qtpy.QtCore import QTimer

    widget, viewer, _ = widget_and_viewer
    turns = [0]
    ticker = QTimer()
    ticker.setInterval(0)
    ticker.timeout.connect(lambda: turns.__setitem__(0, turns[0] + 1))
    added = []
    viewer.layers.events.inserted.connect(
        lambda event: added.append((event.value.name, turns[0], widget.runner.running))
    )
    ticker.start()
    widget.run()
    qtbot.waitUntil(lambda: not widget.runner.running, timeout=180_000)
    ticker.stop()
    assert [name for name, _, _ in added] == ["scan labels", "scan P(CSF)", "scan uncertainty"]
    assert added[0][1] < added[1][1] < added[2][1], added  # the event loop ran between them
    assert all(running for _, _, running in added)  # Segment is not available again before its results are shown


def test_segment_widget_combine_follows_the_model_and_reaches_segment(widget_and_viewer, qtbot, tmp_path):
    import json

    widget, viewer, image = widget_and_viewer
    assert widget.combine.currentText() == "votes"  # the tiny model names no default combine
    folder = make_tiny_model(tmp_path / "tiny-seg-prob", "segmentation", 2, image_shape=(16, 16))
    cfg = json.loads((folder / "model.json").read_text())
    cfg["defaults"]["combine"] = "probabilities"
    (folder / "model.json").write_text(json.dumps(cfg))
    widget.model_picker.add_folder(folder)
    assert widget.combine.currentText() == "probabilities"
    widget.model_picker.select("tiny-seg-2d")
    widget.combine.setCurrentText("probabilities")
    widget.run()
    qtbot.waitUntil(lambda: not widget.runner.running, timeout=180_000)
    assert widget.result.provenance["combine"] == "probabilities"
    from napari_meddiff.tasks.segment import segment

    sampler, steps, seed = widget.sampling.values()  # the model's defaults again, after switching models
    kwargs = dict(ensemble=widget.ensemble.value(), sampler=sampler, steps=steps, seed=seed, axis="axial", device="cpu")
    volume = layer_to_volume(image)
    direct = {
        c: segment(str(widget.model_picker.current().path), volume, combine=c, **kwargs).probabilities.array
        for c in ("probabilities", "votes")
    }
    np.testing.assert_array_equal(widget.result.probabilities.array, direct["probabilities"])
    assert not np.array_equal(direct["probabilities"], direct["votes"])


def test_a_task_takes_the_free_cores_as_the_cli_below_the_gui(widget_and_viewer, qtbot, monkeypatch):
    """Issue 37: a widget's task had cores - 1 threads (3.5x slower than the CLI on 2 cores); now the free cores,
    as the CLI, in a thread below the GUI's priority, and the same result as with one thread."""
    import os
    import threading

    import torch

    from napari_meddiff.runtime import threads
    from napari_meddiff.tasks import segment as segment_module

    widget, viewer, image = widget_and_viewer
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # a shell's own setting would win (as it should)
    monkeypatch.delenv(threads.THREADS_ENV, raising=False)
    monkeypatch.setattr(threads, "others_busy_cores", lambda: 0.0)  # a quiet machine
    seen = {}
    real = segment_module.segment

    def spy(*args, **kwargs):
        seen["threads"] = torch.get_num_threads()
        seen["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        return real(*args, **kwargs)

    monkeypatch.setattr(segment_module, "segment", spy)
    gui_nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    widget.run()
    qtbot.waitUntil(lambda: not widget.runner.running, timeout=180_000)
    assert seen["threads"] == threads.usable_cores()
    assert seen["nice"] == min(19, gui_nice + threads.TASK_NICE)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == gui_nice  # the GUI thread keeps its own
    torch.set_num_threads(1)
    sampler, steps, seed = widget.sampling.values()
    one_thread = real(
        str(widget.model_picker.current().path), layer_to_volume(image), ensemble=widget.ensemble.value(),
        sampler=sampler, steps=steps, seed=seed, axis="axial", device="cpu", combine=widget.combine.currentText(),
    )  # fmt: skip
    np.testing.assert_array_equal(widget.result.probabilities.array, one_thread.probabilities.array)


def test_segment_widget_cancel(widget_and_viewer, qtbot):
    widget, viewer, _ = widget_and_viewer
    widget.ensemble.setValue(4)
    widget.sampling.steps.setValue(50)
    widget.run()
    qtbot.waitUntil(lambda: widget.progress.bar.maximum() > 1, timeout=60_000)  # first report arrived
    widget.cancel()
    qtbot.waitUntil(lambda: not widget.runner.running, timeout=60_000)
    assert widget.progress.label.text() == "Cancelled."
    assert [layer.name for layer in viewer.layers] == ["scan"]
    assert widget.result is None
    assert widget.segment_button.isEnabled()


def test_model_summary_names_a_2p5d_model(tmp_path):
    from napari_meddiff._napari.widgets.controls import ModelInfo

    plain = ModelInfo.from_path(make_tiny_model(tmp_path / "plain", "segmentation", 2, image_shape=(16, 16)))
    ctx = ModelInfo.from_path(
        make_tiny_model(tmp_path / "ctx", "segmentation", 2, image_shape=(16, 16), context_slices=2)
    )
    assert plain.summary().startswith("2D ") and ctx.summary().startswith("2.5D (each slice ±2) ")
