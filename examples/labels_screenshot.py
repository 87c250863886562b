"""Screenshot of "paint the anatomy, generate" (``xvfb-run -a python examples/labels_screenshot.py``).

A held-out cohort subject's tissue map opens as a Labels layer, a lesion (label 4) is painted into its right white
matter, and the Generate widget's label-map model (default ``brain-t1w-from-labels-3d``) makes a T1w scan on the
map's grid; the map is shown as an outline over the scan. Writes ``examples/screenshots/generate_from_labels.png``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "examples" / "screenshots" / "generate_from_labels.png"


def painted_map(folder: Path, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The subject's tissue map (RAS array, affine) with a 10 mm ball of label 4 in its right white matter."""
    from napari_meddiff.data.mni152 import write_cohort
    from napari_meddiff.io.volume import read_volume, to_canonical

    write_cohort(folder, 1, seed=seed, progress=False)
    vol = to_canonical(read_volume(next(folder.glob("sub-*_dseg.nii.gz"))))
    labels = np.rint(np.asarray(vol.array)).astype(np.uint8)
    wm = np.argwhere(labels == 3)
    centre = wm[np.argmin(np.abs(wm - wm.mean(0) - np.array([12, 10, 6])).sum(1))]  # right (RAS +x), above
    idx = np.indices(labels.shape)
    ball = sum((i - c) ** 2 for i, c in zip(idx, centre)) <= 2.5**2
    labels[ball & (labels > 0)] = 4
    return labels, vol.affine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="brain-t1w-from-labels-3d")
    parser.add_argument("--seed", type=int, default=100003, help="held-out cohort subject whose map is painted")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    import napari
    from qtpy.QtWidgets import QApplication

    app = QApplication.instance() or QApplication([])
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1500, 900)
    _, widget = viewer.window.add_plugin_dock_widget("napari-meddiff", "Generate")
    labels, affine = painted_map(ROOT / "data" / "screenshot-subject", args.seed)
    layer = viewer.add_labels(labels, affine=affine, name="tissue map (lesion painted)")
    widget.model_picker.select(args.model)
    widget.label_map.select(layer)
    t0 = time.perf_counter()
    widget.run()
    while widget.runner.running:
        app.processEvents()
        time.sleep(0.02)
    print(f"{widget.progress.label.text()} ({time.perf_counter() - t0:.1f} s)")
    layer.contour = 1
    layer.opacity = 0.6
    viewer.layers.move(viewer.layers.index(layer), len(viewer.layers))  # the outline over the scan
    lesion = np.argwhere(labels == 4).mean(0)
    world = affine @ np.append(lesion, 1.0)
    viewer.dims.set_point(2, float(world[2]))
    for _ in range(30):
        app.processEvents()
        time.sleep(0.02)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(args.out), canvas_only=False)
    print(f"wrote {args.out}")
    viewer.close()


if __name__ == "__main__":
    main()
