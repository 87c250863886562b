"""Screenshot of the Generate widget after a run (``xvfb-run -a python examples/generate_screenshot.py``).

Uses the shipped default model (two stages: a drawn tissue map, then the scan on it) when it is installed, else a
tiny random model (whose output is noise). ``--outline`` shows the drawn map's borders over the scan. Writes
``examples/screenshots/generate_widget.png``. A conditional model's sliders:

    xvfb-run -a python examples/generate_screenshot.py --model runs/brain-ldm-3d-conditional \\
        --condition brain_volume=0.9 --out examples/screenshots/generate_conditional.png
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "screenshots" / "generate_widget.png"


def _close_toasts(viewer) -> None:
    """Hide napari's notification pop-ups so they do not cover the image."""
    try:
        from napari._qt.dialogs.qt_notification import NapariQtNotification
    except ImportError:
        return
    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
        toast.close_with_fade = lambda *a, **k: None
        toast.hide()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model name or folder (default: the default model)")
    parser.add_argument("--outline", action="store_true", help="show a two-stage run's tissue map as borders")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--condition",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set a condition slider of a conditional model (repeatable)",
    )
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_meddiff.models import DEFAULT_MODEL, available_models
    from napari_meddiff.testing.tiny_models import make_tiny_model

    app = QApplication.instance() or QApplication([])
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1400, 860)
    _, widget = viewer.window.add_plugin_dock_widget("napari-meddiff", "Generate")
    for _ in range(10):  # let the window lay out before the first layer sets the view
        app.processEvents()
        time.sleep(0.02)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or (DEFAULT_MODEL if DEFAULT_MODEL in available_models() else None)
        if model is None:
            print(f"{DEFAULT_MODEL} is not installed; using a tiny random model (its output is noise)")
            model = make_tiny_model(Path(tmp) / "tiny-ldm-3d", "ldm", 3, image_shape=(32, 32, 32))
        widget.model_picker.select(model)
        if args.steps:
            widget.sampling.steps.setValue(args.steps)
        widget.sampling.seed.setValue(args.seed)
        for item in args.condition:
            name, _, value = item.partition("=")
            widget.conditions.rows[name].set_value(float(value))
        t0 = time.perf_counter()
        widget.run()
        while widget.runner.running:
            app.processEvents()
            time.sleep(0.02)
        print(f"{widget.progress.label.text()} ({time.perf_counter() - t0:.1f} s)")
        maps = [layer for layer in viewer.layers if layer.name.endswith("_dseg")]
        if args.outline and maps:
            maps[-1].visible, maps[-1].contour, maps[-1].opacity = True, 1, 0.7
        for _ in range(20):
            app.processEvents()
            time.sleep(0.02)
        _close_toasts(viewer)
        app.processEvents()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        viewer.screenshot(str(args.out), canvas_only=False)
        print(f"wrote {args.out}")
    viewer.close()


if __name__ == "__main__":
    main()
