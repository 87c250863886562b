"""Adding the first widget, and its first run, must not freeze napari (issue 37). Measured in a fresh process,
where nothing heavy is imported and nothing is built yet, with a 10 ms heartbeat in the event loop
(`napari_meddiff._napari.event_loop.Heartbeat`: each gap's wall time, and the GUI thread's own CPU in it):

* adding the Generate widget: torch, MONAI and the tasks are imported in a background thread; the longest gap
  from the moment the widget is added until that import is done;
* its first Generate (a tiny model, a preview every step) in the empty viewer: pint's unit registry, which napari
  builds at the first layer a viewer gets, was built in the background; what is left is napari's own: the
  viewer's first layer, the axial view and its orientation letters, and their first drawing.

Wall-clock gaps are asserted where other processes leave the cores free (CI: 2 cores, no other load); the GUI
thread's own CPU per gap always.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("napari")

MAX_STALL_S = 1.0
# the first run in an empty viewer: the click's gap, napari making the viewer's first layer, the axial view and its
# letters, took 0.75 s of GUI-thread CPU on a loaded 2-core EPYC (llvmpipe); before issue 37 it also built pint's
# unit registry there (3 s more under the same load)
MAX_FIRST_RUN_STALL_S = 1.0
QUIET_CORES = 0.25  # wall-clock gaps are asserted on a machine whose other processes keep at most this busy

SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import napari
    from qtpy.QtCore import QTimer
    from napari_meddiff._napari.event_loop import Heartbeat

    viewer = napari.Viewer(show=True)
    beat = Heartbeat(10).start()
    res = {}
    held = {}

    def add():
        res["torch_before"] = "torch" in sys.modules
        t0 = res["t0"] = time.perf_counter()
        _, widget = viewer.window.add_plugin_dock_widget("napari-meddiff", "Generate")
        res["add_s"] = time.perf_counter() - t0
        res["torch_after_add"] = "torch" in sys.modules
        held["widget"] = widget
        QTimer.singleShot(20, wait)

    def wait():
        runner = sys.modules["napari_meddiff._napari.widgets.runner"]
        loaded = getattr(runner, "is_loaded", lambda: True)()
        if not loaded and time.perf_counter() - res["t0"] < 240:
            QTimer.singleShot(20, wait)
            return
        QTimer.singleShot(200, loaded_and_settled)

    def loaded_and_settled():
        widget = held["widget"]
        gaps = beat.gaps(res["t0"], time.perf_counter())
        res["max_gap_s"] = max(g.seconds for g in gaps)
        res["max_gap_cpu_s"] = max(g.cpu for g in gaps)  # the GUI thread's own work between two ticks
        res["loaded_s"] = time.perf_counter() - res["t0"]
        res["device_text"] = widget.device.itemText(0)
        res["generate_enabled"] = widget.generate_button.isEnabled()
        widget.model_picker.select("tiny-ldm-3d")
        widget.sampling.steps.setValue(8)
        widget.preview_every.setValue(1)
        QTimer.singleShot(500, click)

    def click():
        import pint
        from pint.registry import LazyRegistry

        widget = held["widget"]
        res["registry_lazy_at_click"] = isinstance(pint.get_application_registry().get(), LazyRegistry)
        res["click"] = time.perf_counter()
        widget.generate_button.click()
        res["click_s"] = time.perf_counter() - res["click"]
        QTimer.singleShot(20, wait_run)

    def wait_run():
        widget = held["widget"]
        if widget.runner.running and time.perf_counter() - res["click"] < 240:
            QTimer.singleShot(20, wait_run)
            return
        res["run_s"] = time.perf_counter() - res["click"]
        QTimer.singleShot(200, finish)

    def finish():
        beat.stop()
        res["others_busy"] = beat.others_busy()
        gaps = sorted(beat.gaps(res["click"], time.perf_counter()), key=lambda g: -g.seconds)
        res["run_gaps"] = [(round(g.at - res["click"], 3), round(g.seconds, 3), round(g.cpu, 3)) for g in gaps[:4]]
        res["run_max_gap_s"] = gaps[0].seconds
        res["run_max_gap_cpu_s"] = max(g.cpu for g in gaps)
        res["layers"] = [layer.name for layer in viewer.layers]
        print("RESULT " + json.dumps(res), flush=True)
        viewer.close()

    QTimer.singleShot(1500, add)
    napari.run()
    """
)


@pytest.fixture(scope="module")
def first_session(tiny_models):
    """One fresh napari process: add the Generate widget, wait for its import, then generate once."""
    if not os.environ.get("DISPLAY") and sys.platform.startswith("linux"):
        pytest.skip("needs a display")
    env = {
        **os.environ,
        "QT_QPA_PLATFORM": os.environ.get("QT_QPA_PLATFORM", "xcb"),
        "MEDDIFF_MODELS": str(tiny_models["ldm3d"].parent),
    }
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=540, env=env)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line is not None, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(line[len("RESULT ") :]), proc.stdout + proc.stderr


def test_adding_the_first_widget_keeps_the_event_loop_responsive(first_session):
    res, output = first_session
    print(
        f"\nfirst widget: add {res['add_s']:.2f} s, longest event-loop gap {res['max_gap_s']:.2f} s (most GUI-thread "
        f"CPU in one gap {res['max_gap_cpu_s']:.2f} s), loaded after {res['loaded_s']:.1f} s; other processes kept "
        f"{res['others_busy']} cores busy"
    )
    assert not res["torch_before"]
    assert not res["torch_after_add"], "adding the widget imported torch on the GUI thread"
    # once the background import is done the widget knows its devices and can run
    assert res["device_text"] in ("auto (cpu)", "auto (cuda)") and res["generate_enabled"], res
    assert "PyQt5 backend is deprecated" not in output
    assert res["max_gap_cpu_s"] <= MAX_STALL_S, res  # the GUI thread's own work, whatever the load
    if res["others_busy"] is not None and res["others_busy"] > QUIET_CORES:
        pytest.skip(f"other processes kept {res['others_busy']:.1f} cores busy: the wall-clock gap says little")
    assert res["max_gap_s"] <= MAX_STALL_S, res


def test_the_first_run_finds_built_what_could_be_built_before(first_session):
    res, _ = first_session
    print(
        f"\nfirst Generate in an empty viewer: click {res['click_s']:.2f} s, run {res['run_s']:.1f} s, longest "
        f"gaps (s after the click, wall s, GUI-thread CPU s): {res['run_gaps']}; other processes kept "
        f"{res['others_busy']} cores busy"
    )
    assert res["layers"] == ["tiny-ldm-3d_seed0"], res
    assert not res["registry_lazy_at_click"], "napari's first layer would build pint's unit registry on the click"
    assert res["run_max_gap_cpu_s"] <= MAX_FIRST_RUN_STALL_S, res  # the GUI thread's own work, whatever the load
    if res["others_busy"] is not None and res["others_busy"] > QUIET_CORES:
        pytest.skip(f"other processes kept {res['others_busy']:.1f} cores busy: the wall-clock gap says little")
    assert res["run_max_gap_s"] <= MAX_FIRST_RUN_STALL_S, res


IMPORTED_AFTER_LOADING = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from napari_meddiff._napari.widgets import runner

    runner._Loader()._run()  # what the first widget starts in its background thread
    import gc
    frozen, tracked = gc.get_freeze_count(), len(gc.get_objects())
    from vispy.visuals.line import dash_atlas

    dash_patterns = dash_atlas._make_pattern.cache_info().currsize  # computed at napari's first Labels layer
    before = set(sys.modules)
    from napari.layers import Labels
    from napari_meddiff import Volume
    from napari_meddiff.io.volume import resample_like

    vol = Volume(np.zeros((8, 8, 8), np.float32), np.eye(4))
    resample_like(vol, vol)  # a task's first step: its input on the model's grid
    Labels(np.zeros((4, 4, 4), np.uint8), features={"index": [0, 1], "class": ["a", "b"]})  # a result layer
    new = sorted({name.split(".")[0] for name in set(sys.modules) - before})
    print("NEW " + json.dumps({"modules": new, "frozen": frozen, "tracked": tracked, "dash_patterns": dash_patterns}))
    """
)


def test_the_background_import_leaves_no_heavy_import_to_a_task_or_its_results():
    """SimpleITK's library (70 ms with the GIL held, at a task's first resample) and pandas (270 ms on the GUI
    thread, at the first result layer with class names) were imported where they froze the viewer; and a full
    garbage collection (0.3 s with the GIL held) scanned every object of torch, MONAI and napari."""
    proc = subprocess.run([sys.executable, "-c", IMPORTED_AFTER_LOADING], capture_output=True, text=True, timeout=300)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("NEW ")), None)
    assert line is not None, proc.stdout[-2000:] + proc.stderr[-4000:]
    found = json.loads(line[len("NEW ") :])
    assert not set(found["modules"]) & {"SimpleITK", "pandas", "skimage"}, found
    # what is alive once torch and MONAI are in is frozen: a full garbage collection does not scan it again
    assert found["frozen"] > 10 * found["tracked"], found
    assert found["dash_patterns"] > 0, found  # vispy's, for the first Labels layer's polygon overlay
