"""The widgets' TaskRunner showing a result in turns, and the garbage collector's freeze (issue 37)."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest

pytest.importorskip("napari")

pytestmark = pytest.mark.napari


@pytest.fixture
def runner(qtbot):
    from qtpy.QtWidgets import QWidget

    from napari_meddiff._napari.widgets.controls import ProgressRow
    from napari_meddiff._napari.widgets.runner import TaskRunner

    parent = QWidget()
    qtbot.addWidget(parent)
    progress = ProgressRow(parent)
    runner = TaskRunner(progress, [], title="Test", parent=parent)
    yield runner
    del progress, parent  # held until the test is done


def test_a_result_shown_in_turns_cannot_be_cancelled_and_an_error_in_it_fails_the_run(runner, qtbot):
    stops, seen = [], []

    def show(result):
        seen.append(("first", runner.progress.cancel_button.isEnabled()))
        yield
        seen.append(("second", runner.running))
        raise ValueError("the second layer could not be made")

    runner.start(lambda ctx: 5, on_result=show, on_stop=stops.append)
    qtbot.waitUntil(lambda: not runner.running, timeout=30_000)
    assert seen == [("first", False), ("second", True)]  # Cancel is off once the result is being shown
    assert stops == ["error"] and runner.progress.label.text().startswith("Failed: ValueError: the second layer")


def test_a_layer_alive_when_the_objects_were_frozen_is_freed_once_removed(make_napari_viewer, qtbot):
    """The background import freezes what is alive (`gc.freeze`), a scan the user opened before included; a
    widget's viewer collects again when a layer is removed, so that scan's memory is given back."""
    from napari_meddiff._napari.widgets.runner import collect_removed_layers

    viewer = make_napari_viewer()
    layer = viewer.add_image(np.zeros((64, 64, 64), np.float32), name="opened before the first widget")
    collect_removed_layers(viewer)
    collect_removed_layers(viewer)  # connected once
    freed = weakref.ref(layer)
    gc.freeze()
    try:
        del layer
        viewer.layers.remove("opened before the first widget")
        qtbot.waitUntil(lambda: freed() is None, timeout=10_000)
        assert gc.get_freeze_count() > 0  # frozen again
    finally:
        gc.unfreeze()
