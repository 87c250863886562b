"""Screenshot of the reader-study widget on a tiny study (run: ``xvfb-run -a python examples/review_screenshot.py``).

"Real" cases are synthetic MNI152 subjects from ``napari_meddiff.data.mni152`` (smooth random blobs if that module
is unavailable); "synthetic" ones are the same kind of image, smoothed, to stand in for a generator's output, or,
with ``--synthetic DIR``, the scans a model wrote there (``meddiff generate --num 2 --out DIR``; their tissue maps
are left out of the study). Writes ``examples/screenshots/review_widget.png`` (``--out``).

    meddiff generate --num 2 --seed 0 --out /tmp/two-stage
    xvfb-run -a python examples/review_screenshot.py --synthetic /tmp/two-stage \
        --out examples/screenshots/review_two_stage.png
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
from scipy import ndimage

from napari_meddiff.io.volume import Volume, write_volume

OUT = Path(__file__).resolve().parent / "screenshots" / "review_widget.png"


def _image(seed: int) -> Volume:
    try:
        from napari_meddiff.data.mni152 import make_subject

        return make_subject(seed, resolution_mm=2.0, lesion=False).image
    except Exception:  # noqa: BLE001 - the cohort module is optional here
        rng = np.random.default_rng(seed)
        blobs = ndimage.gaussian_filter(rng.random((64, 72, 56)), 4) * 1000
        return Volume.from_spacing(blobs.astype(np.float32), (2.0, 2.0, 2.0))


def build_study(root: Path, synthetic: Path | None = None) -> Path:
    from napari_meddiff.review.study import create_study

    for i, src in enumerate(("real", "synthetic") * 2):
        if src == "synthetic" and synthetic is not None:
            continue
        vol = _image(100000 + i if synthetic is not None else i)  # beside a model's scans: held-out subjects
        if src == "synthetic":
            vol = Volume(ndimage.gaussian_filter(vol.array, 1.0).astype(np.float32), vol.affine)
        write_volume(vol, root / src / f"{src}-{i}.nii.gz")
    fakes = synthetic if synthetic is not None else root / "synthetic"
    return create_study(root / "real", fakes, root / "study", key=root / "study-key.json", seed=0).folder


def _close_toasts(viewer) -> None:
    """Close napari's notification pop-ups (e.g. its PyQt5 deprecation notice) so they do not cover the image."""
    try:
        from napari._qt.dialogs.qt_notification import NapariQtNotification
    except ImportError:
        return
    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
        toast.close_with_fade = lambda *a, **k: None
        toast.hide()


def main() -> None:
    import argparse

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_meddiff._napari.widgets.review import ReviewWidget

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synthetic", type=Path, default=None, help="a folder of generated scans (the model's)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        study = build_study(Path(tmp), args.synthetic)
        viewer = napari.Viewer(show=True)
        viewer.window.resize(1500, 950)
        widget = ReviewWidget(viewer)
        viewer.window.add_dock_widget(widget, name="Reader study", area="right")
        widget.folder_edit.setText(str(study))
        widget.reader_edit.setText("Dr. A. Reader")
        widget.start()
        widget.call_buttons["real"].setChecked(True)  # answer the first case, then half-answer the second
        widget.realism_buttons[3].setChecked(True)
        widget.next_case()
        if args.synthetic is not None:  # a model's scans: answer on until one of them is on the canvas
            sources = json.loads((Path(tmp) / "study-key.json").read_text())["cases"]
            while sources[widget.study.cases[widget.index].case_id]["source"] != "synthetic":
                widget.call_buttons["real"].setChecked(True)
                widget.realism_buttons[4].setChecked(True)
                widget.next_case()
        widget.call_buttons["synthetic"].setChecked(True)
        if args.synthetic is None:
            widget.realism_buttons[2].setChecked(True)
            widget.artefact_boxes["blur"].setChecked(True)
            widget.comment_edit.setText("cortex too smooth")
        else:  # what a reader says of the two-stage scans of step 975
            widget.realism_buttons[0].setChecked(True)
            for artefact in ("noise pattern", "anatomy implausible"):
                widget.artefact_boxes[artefact].setChecked(True)
            widget.comment_edit.setText("no ventricles, lumpy outline, noisy background")
        for _ in range(20):
            QApplication.processEvents()
        _close_toasts(viewer)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        viewer.screenshot(str(args.out), canvas_only=False)
        viewer.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
