"""The Audit dock widget: `napari_meddiff.audit` of a synthetic folder against the training (and real) folders,
run in a worker, then the flagged pairs (else the closest) one at a time, side by side.

A pair is shown as two image layers in napari's grid mode (one cell each, cameras and slicing linked), both
on the audit's aligned 2 mm box with one affine, so the same slice shows the same place in both; a synthetic
volume that matched its training volume mirrored is shown mirrored back. The report files are written when a
report folder is given.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.utils.notifications import show_error
from qtpy.QtWidgets import (
    QCheckBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from napari_meddiff._napari.layers import show_axial, volume_to_layer_data
from napari_meddiff._napari.widgets.controls import ProgressRow
from napari_meddiff._napari.widgets.runner import TaskContext, TaskRunner
from napari_meddiff.io.volume import Volume

if TYPE_CHECKING:  # pragma: no cover
    import napari

FOLDERS = {
    "synthetic": "folder of synthetic volumes",
    "training": "folder of the generator's training volumes",
    "real": "held-out real scans (optional: they set the threshold)",
    "report": "report folder for audit.json and report.html (optional)",
}
PAIR_KEY = "meddiff_audit_pair"  # layer metadata of the pair layers this widget shows (replaced on each pick)
VIEW_MM = 2.0


@dataclasses.dataclass
class ShownPair:
    """A pair to look at: its summary row and both volumes on the aligned box (synthetic mirrored back)."""

    row: dict
    synthetic: np.ndarray
    training: np.ndarray


def run_audit(ctx: TaskContext, folders: dict[str, str], overwrite: bool) -> tuple[Any, list[ShownPair]]:
    """The widget's task (worker thread): the audit, and the views of the pairs worth a look."""
    from napari_meddiff.audit import audit
    from napari_meddiff.audit.grid import view
    from napari_meddiff.audit.report import pairs_to_show

    result = audit(
        folders["synthetic"],
        folders["training"],
        folders["real"] or None,
        folders["report"] or None,
        overwrite=overwrite,
        on_progress=lambda stage, done, total: ctx.progress(done, total, text=stage),
        should_cancel=ctx.should_cancel,
    )
    pairs, _ = pairs_to_show(result)
    shown = []
    for i, (synthetic, training, row) in enumerate(pairs):
        ctx.progress(i, len(pairs), text="views of the pairs")
        left = view(synthetic, VIEW_MM)
        shown.append(ShownPair(row, left[::-1].copy() if row["mirrored"] else left, view(training, VIEW_MM)))
    return result, shown


class AuditWidget(QWidget):
    """Audit panel: folders, Run, then a list of pairs; picking one shows it side by side."""

    def __init__(self, napari_viewer: napari.viewer.Viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.result: Any = None
        self.shown: list[ShownPair] = []
        self.setToolTip(
            "<b>Audit</b>: is a synthetic set memorized, diverse, realistic? Each synthetic volume's nearest "
            "training volume is found and flagged when it is closer than real subjects come. Same as "
            "<code>meddiff audit</code>."
        )
        root = QVBoxLayout(self)
        root.addWidget(self._folder_box())
        self.run_button = QPushButton("Run audit")
        self.run_button.clicked.connect(self.start)
        root.addWidget(self.run_button)
        self.progress = ProgressRow()
        root.addWidget(self.progress)
        self.summary = QLabel("")
        self.summary.setWordWrap(True)
        root.addWidget(self.summary)
        self.pair_list = QListWidget()
        self.pair_list.setMinimumHeight(120)
        self.pair_list.setToolTip("pick a pair to see it side by side: synthetic left, training right")
        self.pair_list.currentRowChanged.connect(self.show_pair)
        root.addWidget(self.pair_list, 1)
        self.runner = TaskRunner(self.progress, [self.folder_box, self.run_button], title="Audit", parent=self)

    def _folder_box(self) -> QGroupBox:
        self.folder_box = QGroupBox("Folders")
        form = QFormLayout(self.folder_box)
        self.edits: dict[str, QLineEdit] = {}
        for name, tip in FOLDERS.items():
            edit = self.edits[name] = QLineEdit()
            edit.setPlaceholderText(tip)
            browse = QPushButton("…")
            browse.setToolTip(f"choose the {tip}")
            browse.clicked.connect(partial(self._browse, name))
            row = QHBoxLayout()
            row.addWidget(edit, 1)
            row.addWidget(browse)
            form.addRow(name, row)
        self.overwrite = QCheckBox("replace an existing report")
        form.addRow(self.overwrite)
        return self.folder_box

    def _browse(self, name: str) -> None:
        folder = QFileDialog.getExistingDirectory(self, f"Choose the {FOLDERS[name]}", self.edits[name].text())
        if folder:
            self.edits[name].setText(folder)

    def start(self) -> None:
        """Run the audit of the chosen folders in a worker."""
        folders = {name: edit.text().strip() for name, edit in self.edits.items()}
        missing = [name for name in ("synthetic", "training") if not folders[name]]
        if missing:
            show_error(f"Audit: choose the {' and '.join(missing)} folder")
            return
        self.summary.setText("")
        self.pair_list.clear()
        task = partial(run_audit, folders=folders, overwrite=self.overwrite.isChecked())
        self.runner.start(task, on_result=self._on_result, text="Reading volumes…")

    def _on_result(self, output: tuple[Any, list[ShownPair]]) -> None:
        from napari_meddiff.audit.report import summary_lines

        self.result, self.shown = output
        self.summary.setText(summary_lines(self.result.summary, list_flagged=False).replace("\n", "<br>"))
        for pair in self.shown:
            row = pair.row
            verdict = "FLAGGED" if row["memorized"] else "closest, not flagged"
            name, nearest = Path(row["file"]).name, Path(row["nearest_training"]).name
            self.pair_list.addItem(f"{name} ~ {nearest}: {row['similarity']:.4f} ({verdict})")
            self.pair_list.item(self.pair_list.count() - 1).setToolTip(f"{row['file']}\n~ {row['nearest_training']}")
        if self.shown:
            self.pair_list.setCurrentRow(0)

    def show_pair(self, index: int) -> None:
        """Show pair ``index`` side by side (grid mode), replacing the pair shown before."""
        if not 0 <= index < len(self.shown):
            return
        pair = self.shown[index]
        for layer in [layer for layer in self.viewer.layers if PAIR_KEY in layer.metadata]:
            self.viewer.layers.remove(layer)
        layers = []
        for which, array, path in (
            ("training", pair.training, pair.row["nearest_training"]),
            ("synthetic", pair.synthetic, pair.row["file"]),
        ):
            vol = Volume.from_spacing(array, (VIEW_MM,) * 3)
            data, meta, _ = volume_to_layer_data(vol, f"{which}: {Path(path).name}", contrast_limits=(0.0, 1.0))
            layers.append(self.viewer.add_image(data, **meta))
            layers[-1].metadata[PAIR_KEY] = which
        self.viewer.grid.enabled = True  # the last layer (synthetic) takes the first cell, on the left
        self.viewer.grid.shape = (1, 2)
        show_axial(self.viewer, layers[-1])
        self.viewer.reset_view()  # both cells in view
        mirrored = " (mirrored back)" if pair.row["mirrored"] else ""
        overlay = self.viewer.text_overlay
        overlay.text = f"left: synthetic{mirrored}\nright: training\nsimilarity {pair.row['similarity']:.4f}"
        overlay.position, overlay.font_size, overlay.visible = "top_left", 10, True
