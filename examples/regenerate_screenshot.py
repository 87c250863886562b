"""Screenshots of "edit the anatomy": paint a lesion into a copy of a scan's tissue map, regenerate what changed.

``xvfb-run -a python examples/regenerate_screenshot.py``: a held-out cohort subject's T1w and tissue map open in
napari; the Inpaint widget's "Edit a copy" duplicates the map, a lesion (label 4) is painted into its right white
matter, and "regenerate what I changed" fills only that region with the label-map model (default
``brain-t1w-from-labels-3d``). Writes ``examples/screenshots/regenerate_what_changed.png`` (the viewer) and
``regenerate_what_changed_planes.png`` (original, result and their difference in three planes, one scale).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "examples" / "screenshots" / "regenerate_what_changed.png"


def subject(folder: Path, seed: int):
    """The held-out subject's T1w and tissue map (RAS volumes), written by the cohort generator."""
    from napari_meddiff.data.mni152 import write_cohort
    from napari_meddiff.io.volume import read_volume, to_canonical

    if not any(folder.glob(f"sub-{seed:06d}_T1w.nii.gz")):
        write_cohort(folder, 1, seed=seed, progress=False)
    scan = to_canonical(read_volume(next(folder.glob(f"sub-{seed:06d}_T1w.nii.gz"))))
    tissue = to_canonical(read_volume(next(folder.glob(f"sub-{seed:06d}_dseg.nii.gz"))))
    tissue.array = np.rint(np.asarray(tissue.array)).astype(np.uint8)
    return scan, tissue


def paint_lesion(labels: np.ndarray, radius: float = 3.5) -> np.ndarray:
    """A ball of label 4 in the right white matter, above the centre (RAS +x, +z), inside the brain only."""
    wm = np.argwhere(labels == 3)
    centre = wm[np.argmin(np.abs(wm - wm.mean(0) - np.array([12, 10, 6])).sum(1))]
    idx = np.indices(labels.shape)
    ball = sum((i - c) ** 2 for i, c in zip(idx, centre)) <= radius**2
    out = labels.copy()
    out[ball & (labels > 0)] = 4
    return out


def planes_figure(original: np.ndarray, result: np.ndarray, changed: np.ndarray, path: Path, title: str) -> None:
    """Original | regenerated | difference through the change's centre, axial, coronal, sagittal, one scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = np.argwhere(changed).mean(0).round().astype(int)
    cuts = {
        "axial": lambda a: a[:, :, c[2]].T,
        "coronal": lambda a: a[:, c[1], :].T,
        "sagittal": lambda a: a[c[0], :, :].T,
    }
    vmax = float(np.percentile(original, 99.5))
    fig, axes = plt.subplots(3, 3, figsize=(9, 9.6))
    for row, (plane, cut) in enumerate(cuts.items()):
        for col, (name, arr, kw) in enumerate(
            (
                ("original", original, {"cmap": "gray", "vmin": 0, "vmax": vmax}),
                ("regenerated", result, {"cmap": "gray", "vmin": 0, "vmax": vmax}),
                ("difference", result - original, {"cmap": "seismic", "vmin": -vmax / 2, "vmax": vmax / 2}),
            )
        ):
            ax = axes[row, col]
            ax.imshow(cut(arr), origin="lower", **kw)
            ax.contour(cut(changed.astype(float)), levels=[0.5], colors="yellow", linewidths=0.6)
            ax.set_title(f"{name}: {plane}", fontsize=9)
            ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="brain-t1w-from-labels-3d")
    parser.add_argument("--seed", type=int, default=100005, help="held-out cohort subject")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_meddiff._napari.layers import show_axial, volume_to_layer_data

    app = QApplication.instance() or QApplication([])
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1500, 900)
    _, widget = viewer.window.add_plugin_dock_widget("napari-meddiff", "Inpaint")
    scan, tissue = subject(ROOT / "data" / "screenshot-subject", args.seed)
    from napari.layers import Layer

    viewer.add_layer(Layer.create(*volume_to_layer_data(scan, "T1w", layer_type="image")))
    tissue_layer = viewer.add_layer(Layer.create(*volume_to_layer_data(tissue, "tissue map", layer_type="labels")))
    widget.model_picker.select(args.model)
    widget.image_combo.select(viewer.layers["T1w"])
    widget.map_combo.select(tissue_layer)
    copy = widget.edit_map_copy()
    copy.data = paint_lesion(tissue.array)
    t0 = time.perf_counter()
    widget.run()
    while widget.runner.running:
        app.processEvents()
        time.sleep(0.02)
    seconds = time.perf_counter() - t0
    print(f"{widget.progress.label.text()} ({seconds:.1f} s)")
    result = next(layer for layer in viewer.layers if "inpainted" in layer.name)
    tissue_layer.visible = False
    copy.contour, copy.opacity, copy.show_selected_label = 1, 1.0, True  # the painted lesion's outline only
    viewer.layers.move(viewer.layers.index(copy), len(viewer.layers))
    changed = copy.data != tissue.array
    show_axial(viewer, result)
    world = tissue.affine @ np.append(np.argwhere(changed).mean(0), 1.0)
    viewer.dims.set_point(2, float(world[2]))
    for _ in range(30):
        app.processEvents()
        time.sleep(0.02)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(args.out), canvas_only=False)
    print(f"wrote {args.out}")
    planes = args.out.with_name(args.out.stem + "_planes.png")
    title = f"{args.model}: lesion painted into the map of held-out subject {args.seed}, regenerated ({seconds:.0f} s)"
    planes_figure(np.asarray(scan.array, np.float32), np.asarray(result.data, np.float32), changed, planes, title)
    print(f"wrote {planes}")
    viewer.close()


if __name__ == "__main__":
    main()
