"""Screenshot of the Segment widget on the real MNI152 T1 template at 1 mm (nilearn's copy; not a cohort subject).

    xvfb-run -a python examples/segment_screenshot.py [--model brain-tissue-segdiff-2d] [--ensemble 5]

The template is segmented through the widget (as a user would: image layer, model, ensemble, Segment) with the
shipped tissue model, or with a random tiny model when that is not installed (the picture then shows the
plumbing, not a segmentation). Shows the labels and the uncertainty over the image, the per-member progress
and the class-volume table. Writes ``examples/screenshots/segment_mni152.png``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "screenshots" / "segment_mni152.png"
MODEL = "brain-tissue-segdiff-2d"


def _close_toasts(viewer) -> None:
    """Close napari's notification pop-ups so they do not cover the image."""
    try:
        from napari._qt.dialogs.qt_notification import NapariQtNotification
    except ImportError:
        return
    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
        toast.close_with_fade = lambda *a, **k: None
        toast.hide()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--ensemble", type=int, default=5)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--z", type=float, default=12.0, help="world z (mm) of the axial slice shown")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    import napari
    from napari.layers import Layer
    from nilearn.datasets import load_mni152_template
    from qtpy.QtWidgets import QApplication

    from napari_meddiff._napari.layers import show_axial, volume_to_layer_data
    from napari_meddiff._napari.sample_data import volume_from_nibabel
    from napari_meddiff._napari.widgets.segment import SegmentWidget
    from napari_meddiff.errors import MeddiffError
    from napari_meddiff.models import find_model_dir

    tmp = tempfile.TemporaryDirectory()
    try:
        model_dir = find_model_dir(args.model)
    except MeddiffError:
        from napari_meddiff.testing.tiny_models import make_tiny_model

        print(f"{args.model} is not installed; using a random tiny model (the labels will be noise)")
        model_dir = make_tiny_model(Path(tmp.name) / "tiny-seg-2d (untrained)", "segmentation", 2, image_shape=(64, 64))

    image = volume_from_nibabel(load_mni152_template(resolution=1))
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1500, 950)
    data, meta, kind = volume_to_layer_data(image, "MNI152 T1 1mm", layer_type="image")
    layer = viewer.add_layer(Layer.create(data, meta, kind))
    show_axial(viewer, layer)
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment", area="right")
    widget.model_picker.select(model_dir)
    widget.ensemble.setValue(args.ensemble)
    if args.steps:
        widget.sampling.steps.setValue(args.steps)
    t0 = time.perf_counter()
    widget.run()
    while widget.runner.running:
        QApplication.processEvents()
        time.sleep(0.05)
    print(f"segmented in {time.perf_counter() - t0:.0f} s: {widget.progress.label.text()}")
    if widget.result is None:
        raise SystemExit("segmentation failed; see the messages above")
    for name, ml in widget.result.volumes_ml.items():
        print(f"  {name}: {ml:.1f} mL")
    viewer.dims.set_point(viewer.dims.ndim - 1, args.z)
    viewer.layers.selection.active = viewer.layers[f"{layer.name} labels"]
    for _ in range(30):
        QApplication.processEvents()
    _close_toasts(viewer)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(args.out), canvas_only=False)
    viewer.close()
    tmp.cleanup()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
