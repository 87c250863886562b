"""The Segment dock widget: diffusion segmentation of an image layer with an ensemble, plus uncertainty.

Results land in the image's own world space: a Labels layer (majority vote), a probability image for one
class (switchable afterwards), an uncertainty image (normalised vote entropy, 0..1, 'magma') and a table of
class volumes in mL. Progress is shown overall and per ensemble member; Cancel stops within one step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.layers import Image, Labels, Layer
from napari.utils.notifications import show_error
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QFormLayout,
    QGridLayout,
    QHeaderView,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QWidget,
)

from napari_meddiff._napari.layers import AFFINE_KEY, layer_to_volume, show_axial, volume_to_layer_data
from napari_meddiff._napari.widgets.controls import (
    PREVIEW_KEY,
    DevicePicker,
    ModelInfo,
    ModelPicker,
    ProgressRow,
    SamplingControls,
    add_model_rows,
    settings_form,
    stack_vertically,
)
from napari_meddiff._napari.widgets.runner import (
    Machine,
    TaskContext,
    TaskRunner,
    collect_removed_layers,
    is_loaded,
    is_selecting_for_the_user,
    load_model_cached,
    selecting_for_the_user,
    wait_loaded,
    when_loaded,
)
from napari_meddiff.choices import COMBINE_METHODS, DEFAULT_COMBINE
from napari_meddiff.errors import MeddiffError
from napari_meddiff.io.volume import Volume

if TYPE_CHECKING:  # pragma: no cover
    import napari

    from napari_meddiff.tasks.segment import SegmentationResult

RESULT_KEY = "meddiff_segment"  # layer metadata: which output of which image ("labels"/"probability"/"uncertainty")
MAX_MEMBER_BARS = 20
UNCERTAINTY_COLORMAP = "magma"
PROBABILITY_COLORMAP = "viridis"
# tissue-like colours for the first classes (background transparent); others get napari's cycle
CLASS_COLORS = [
    (0, 0, 0, 0),
    (0.25, 0.55, 1.0, 1),
    (1.0, 0.55, 0.1, 1),
    (0.95, 0.95, 0.55, 1),
    (0.3, 0.85, 0.4, 1),
    (0.9, 0.3, 0.8, 1),
    (0.9, 0.2, 0.2, 1),
    (0.3, 0.9, 0.9, 1),
]


@dataclasses.dataclass(frozen=True)
class MembersEvent:
    """How far each ensemble member is (0..1)."""

    fractions: tuple[float, ...]


def segment_task(
    ctx: TaskContext,
    *,
    model_ref: str,
    device: str,
    volume: Volume,
    ensemble: int,
    sampler: str,
    steps: int,
    seed: int,
    axis: str | None,
    combine: str | None = None,
) -> SegmentationResult:
    """Worker-thread body: the ensemble through `segment.segment`, reporting overall and per-member progress."""
    from napari_meddiff.tasks.segment import segment

    model = load_model_cached(model_ref, device)
    total = ensemble * steps  # "member-steps": each member takes `steps` steps over all slices/tiles

    def on_step(p: Any) -> None:
        first, last = p.members[0] + 1, p.members[-1] + 1
        who = f"member {first}/{ensemble}" if first == last else f"members {first}–{last} of {ensemble}"
        ctx.progress(int(round(p.fraction * total)), total, p.eta_seconds, who)
        ctx.emit(MembersEvent(tuple(p.member_fraction)))

    ctx.progress(0, total, None, f"{ensemble} member{'s' if ensemble > 1 else ''}")
    return segment(
        model,
        volume,
        ensemble=ensemble,
        sampler=sampler,
        steps=steps,
        seed=seed,
        axis=axis,
        device=device,
        combine=combine,
        on_step=on_step,
        should_cancel=ctx.should_cancel,
    )


class MemberBars(QWidget):
    """One thin progress bar per ensemble member (up to MAX_MEMBER_BARS; beyond that only the overall bar)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.grid = QGridLayout(self)
        self.grid.setContentsMargins(0, 0, 0, 0)
        self.grid.setSpacing(2)
        self.bars: list[QProgressBar] = []

    def set_count(self, n: int) -> None:
        for bar in self.bars:
            self.grid.removeWidget(bar)
            bar.deleteLater()
        self.bars = []
        if n > MAX_MEMBER_BARS:
            self.setVisible(False)
            return
        columns = 5 if n > 5 else max(n, 1)
        for i in range(n):
            bar = QProgressBar()
            bar.setRange(0, 1000)
            bar.setTextVisible(False)
            bar.setFixedHeight(8)
            bar.setToolTip(f"ensemble member {i + 1}")
            self.grid.addWidget(bar, i // columns, i % columns)
            self.bars.append(bar)
        self.setVisible(n > 1)

    def update_fractions(self, fractions: tuple[float, ...]) -> None:
        for bar, f in zip(self.bars, fractions):
            bar.setValue(int(round(1000 * min(max(f, 0.0), 1.0))))
            bar.setToolTip(f"ensemble member {self.bars.index(bar) + 1}: {100 * f:.0f} %")

    def reset(self) -> None:
        for bar in self.bars:
            bar.setValue(0)


def class_volume_table() -> QTableWidget:
    """An empty, read-only table of class names and volumes in mL (filled after a run)."""
    table = QTableWidget(0, 2)
    table.setHorizontalHeaderLabels(["Class", "Volume (mL)"])
    table.verticalHeader().setVisible(False)
    table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
    table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
    table.horizontalHeader().setSectionResizeMode(1, QHeaderView.ResizeMode.ResizeToContents)
    table.setToolTip("Voxels of each label in the image grid x voxel volume")
    return table


def class_colormap(count: int) -> dict[str, Any]:
    """``colormap=`` for a labels layer of ``count`` classes in CLASS_COLORS; none (napari's cycle) for more."""
    if count > len(CLASS_COLORS):
        return {}
    from napari.utils.colormaps import DirectLabelColormap

    colors = {None: (0, 0, 0, 0)}
    colors.update({c: CLASS_COLORS[c] for c in range(count)})
    return {"colormap": DirectLabelColormap(color_dict=colors)}


def _refill(layer: Layer, array: np.ndarray, meta: dict[str, Any], layer_type: str) -> bool:
    """Give ``layer`` a new result of the same kind on the same grid (data, name, metadata, class names and
    colours); the user's display choices (visibility, opacity) stay. False (nothing changed) when it differs."""
    same_grid = (
        isinstance(layer, {"labels": Labels, "image": Image}[layer_type])
        and layer.data.shape == array.shape
        and layer.metadata.get(AFFINE_KEY) == meta["metadata"].get(AFFINE_KEY)
    )
    if not same_grid:
        return False
    layer.metadata = meta["metadata"]
    layer.data = array
    layer.name = meta["name"]
    for name in ("features", "colormap", "contrast_limits"):
        if name in meta:
            setattr(layer, name, meta[name])
    return True


class SegmentWidget(QWidget):
    """Image layer, model, ensemble size, sampler, steps, seed, slice axis (2D models), device; Segment/Cancel;
    results as layers plus a class-volume table."""

    def __init__(self, napari_viewer: napari.viewer.Viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self._create_editors()
        self.settings = self._settings_form()
        self.segment_button = QPushButton("Segment")
        self.segment_button.setToolTip(
            "Segment the image; results become layers <image> labels / uncertainty / P(class)"
        )
        self.progress = ProgressRow()
        self.member_bars = MemberBars()
        probability_row = self._probability_row()
        self.table = class_volume_table()
        parts = [self.settings, self.segment_button, self.progress, self.member_bars, probability_row, self.table]
        stack_vertically(self, parts)

        self.runner = TaskRunner(self.progress, [self.settings, self.segment_button], title="Segment", parent=self)
        self.result: SegmentationResult | None = None
        self.result_layers: dict[str, Layer] = {}
        self._source_name = ""
        self._settled: set[int] = set()  # the layers there were before the latest insertion (see _on_active_layer)
        self._connect_signals()
        self._refresh_images()
        self._settle()
        self._on_model_changed(self.model_picker.current())
        if not is_loaded():
            self.progress.label.setText("Loading torch and MONAI…")
        when_loaded(self, self._on_loaded)
        collect_removed_layers(self.viewer)

    def _on_loaded(self, machine: Machine) -> None:
        """torch and the tasks are imported (in the background): devices known, Segment enabled."""
        self.device.set_devices(machine.devices, machine.cuda_name)
        if not self.runner.running and self.progress.label.text() == "Loading torch and MONAI…":
            self.progress.label.setText("")
        self._sync_buttons()

    def _create_editors(self) -> None:
        """The settings' editors, with their ranges and tooltips, and the result's "Probability of" choice."""
        self.image_combo = QComboBox()
        self.image_combo.setToolTip("The scan to segment (any size, voxel size and orientation)")
        self.model_picker = ModelPicker(kinds=("segmentation",))
        self.ensemble = QSpinBox()
        self.ensemble.setRange(1, 100)
        self.ensemble.setValue(5)
        self.ensemble.setToolTip(
            "Samples from independent noise, combined into labels and probabilities; the "
            "uncertainty is how spread those probabilities are (1 = no uncertainty). Time grows "
            "linearly."
        )
        self.combine = QComboBox()
        self.combine.addItems(list(COMBINE_METHODS))
        self.combine.setToolTip(
            "How members are combined: the mean of their class probabilities, or their label "
            "votes (the fraction of members voting each class). Default: the model's."
        )
        self.sampling = SamplingControls(self)
        self.axis = QComboBox()
        self.axis.addItems(["axial", "coronal", "sagittal"])
        self.axis.setToolTip("2D models run slice by slice along this world axis")
        self.device = DevicePicker()
        self.probability_class = QComboBox()
        self.probability_class.setToolTip("Which class the probability layer shows")

    def _settings_form(self) -> QWidget:
        settings, form = settings_form()
        form.addRow("Image", self.image_combo)
        self.model_summary = add_model_rows(form, self.model_picker)
        form.addRow("Ensemble", self.ensemble)
        form.addRow("Combine", self.combine)
        self.sampling.add_rows(form)
        form.addRow("Slices", self.axis)
        self._axis_label = form.labelForField(self.axis)
        form.addRow("Device", self.device)
        return settings

    def _probability_row(self) -> QWidget:
        row = QWidget()
        form = QFormLayout(row)
        form.setContentsMargins(0, 0, 0, 0)
        form.addRow("Probability of", self.probability_class)
        return row

    def _connect_signals(self) -> None:
        self.runner.running_changed.connect(self._sync_buttons)
        self.model_picker.changed.connect(self._on_model_changed)
        self.segment_button.clicked.connect(self.run)
        self.probability_class.currentIndexChanged.connect(self._show_probability)
        events = self.viewer.layers.events
        for ev in (events.inserted, events.removed, events.reordered):
            ev.connect(self._refresh_images)
        events.inserted.connect(lambda *_: QTimer.singleShot(0, self._settle))
        self.viewer.layers.selection.events.active.connect(self._on_active_layer)

    # --- image layers ---

    def _candidate_layers(self) -> list[Image]:
        return [
            layer
            for layer in self.viewer.layers
            if isinstance(layer, Image)
            and not layer.rgb
            and layer.ndim in (2, 3)
            and not layer.metadata.get(RESULT_KEY)
            and not layer.metadata.get(PREVIEW_KEY)  # "(generating…)" and inpainting previews
        ]

    def _refresh_images(self, *_: Any) -> None:
        keep = self.image_combo.currentText()
        layers = self._candidate_layers()
        for layer in layers:  # follow renames
            try:
                layer.events.name.disconnect(self._refresh_images)
            except (TypeError, ValueError, RuntimeError):
                pass
            layer.events.name.connect(self._refresh_images)
        blocked = self.image_combo.blockSignals(True)
        self.image_combo.clear()
        self.image_combo.addItems([layer.name for layer in layers])
        active = self.viewer.layers.selection.active
        names = [layer.name for layer in layers]
        if keep in names:
            self.image_combo.setCurrentText(keep)
        elif active in layers:
            self.image_combo.setCurrentText(active.name)
        elif names:
            self.image_combo.setCurrentIndex(len(names) - 1)
        self.image_combo.blockSignals(blocked)
        self._sync_buttons()

    def _settle(self) -> None:
        try:
            self._settled = {id(layer) for layer in self.viewer.layers}
        except RuntimeError:  # pragma: no cover - the viewer closed first
            pass

    def _on_active_layer(self, event: Any) -> None:
        """Follow the layer the user selects in the layer list; not one napari selects because it was just
        added (a "(generating…)" layer, an inpainting result), nor one a widget selects for the user."""
        layer = event.value
        if layer is None or id(layer) not in self._settled or is_selecting_for_the_user():
            return
        if layer in self._candidate_layers() and not self.runner.running:
            self.image_combo.setCurrentText(layer.name)

    def image_layer(self) -> Image | None:
        name = self.image_combo.currentText()
        return next((layer for layer in self._candidate_layers() if layer.name == name), None)

    # --- settings ---

    def _sync_buttons(self, *_: Any) -> None:
        ready = self.model_picker.current() is not None and self.image_combo.count() > 0 and is_loaded()
        self.segment_button.setEnabled(ready and not self.runner.running)
        # the choice refills the last result's layer: not while a run is replacing that result
        self.probability_class.setEnabled(self.result is not None and not self.runner.running)

    def _on_model_changed(self, info: ModelInfo | None) -> None:
        self._sync_buttons()
        if info is None:
            self.model_summary.setText("No segmentation model found. Use “Open model folder…” to pick one.")
            return
        names = (info.config.get("segmentation") or {}).get("class_names") or []
        self.model_summary.setText(f"{info.summary()}\nclasses: {', '.join(map(str, names))}")
        self.sampling.set_defaults(info)
        self.combine.setCurrentText((info.config.get("defaults") or {}).get("combine") or DEFAULT_COMBINE)
        is_2d = info.spatial_dims == 2
        self.axis.setVisible(is_2d)
        self._axis_label.setVisible(is_2d)
        if is_2d:
            axis = int(info.config.get("slice_axis", 2))
            self.axis.setCurrentText({0: "sagittal", 1: "coronal", 2: "axial"}.get(axis, "axial"))

    # --- running ---

    def run(self) -> None:
        """Start segmenting the chosen image with the current settings (no-op while running)."""
        if self.runner.running:
            return
        wait_loaded()  # the button waits for the background import; a direct call waits here
        info = self.model_picker.current()
        layer = self.image_layer()
        if info is None:
            show_error("Segment: choose a segmentation model first (Open model folder…)")
            return
        if layer is None:
            show_error("Segment: open an image first")
            return
        try:
            volume = layer_to_volume(layer)
        except MeddiffError as exc:
            show_error(f"Segment: {exc}")
            return
        volume = Volume(np.array(volume.array, dtype=np.float32), volume.affine, volume.metadata)  # a copy
        sampler, steps, seed = self.sampling.values()
        n = self.ensemble.value()
        task = partial(
            segment_task,
            model_ref=str(info.path),
            device=self.device.device(),
            volume=volume,
            ensemble=n,
            sampler=sampler,
            steps=steps,
            seed=seed,
            axis=self.axis.currentText() if info.spatial_dims == 2 else None,
            combine=self.combine.currentText(),
        )
        self._source_name = layer.name
        self.member_bars.set_count(n)
        self.runner.start(
            task,
            on_event=self._on_event,
            on_result=self._on_result,
            on_stop=self._on_stop,
            text=f"Loading {info.name}…",
        )

    def cancel(self) -> None:
        self.runner.cancel()

    def _on_event(self, event: Any) -> None:
        if isinstance(event, MembersEvent):
            self.member_bars.update_fractions(event.fractions)

    def _on_stop(self, outcome: str) -> None:
        if outcome != "done":
            self.member_bars.reset()
        elif self.result is not None:
            prov = self.result.provenance
            what = "slices" if prov.get("axis") else "tiles"
            self.progress.label.setText(
                f"{prov['ensemble']} member(s) × {prov['tiles']} {what}. {self.progress.label.text()}"
            )

    # --- results ---

    def _replace(self, key: str, data: tuple) -> Layer:
        """Add a result layer, replacing the one this widget made for the same image and output before (refilled
        in place when it is on the same grid: a new napari layer costs the event loop 0.2-0.5 s, issue 37)."""
        array, meta, layer_type = data
        meta.setdefault("metadata", {})[RESULT_KEY] = {"output": key, "source": self._source_name}
        tag = meta["metadata"][RESULT_KEY]
        old = next((lay for lay in self.viewer.layers if lay.metadata.get(RESULT_KEY) == tag), None)
        if old is not None and _refill(old, array, meta, layer_type):
            return old
        index = None
        if old is not None:
            index = self.viewer.layers.index(old)
            self.viewer.layers.remove(old)
        layer = Layer.create(array, meta, layer_type)
        if index is None:
            self.viewer.add_layer(layer)
        else:
            self.viewer.layers.insert(index, layer)
        return layer

    def _on_result(self, result: SegmentationResult) -> Iterator[None]:
        """Show ``result``: a layer per event-loop turn (the runner resumes this; issue 37)."""
        self.result = result
        self.result_layers = {}  # until this run's are in place: nothing for "Probability of" to refill
        names = list(result.volumes_ml)
        base = self._source_name
        before = {id(layer) for layer in self.viewer.layers}
        labels = self._replace(
            "labels",
            volume_to_layer_data(
                result.labels,
                f"{base} labels",
                layer_type="labels",
                opacity=0.5,
                features={"index": list(range(len(names))), "class": names},
                **class_colormap(len(names)),
            ),
        )
        yield
        c = self._offer_probability_classes(names)
        self.result_layers = {"labels": labels}
        self.result_layers["probability"] = self._replace(
            "probability",
            volume_to_layer_data(
                self._probability_volume(c),
                f"{base} P({names[c]})",
                layer_type="image",
                contrast_limits=(0.0, 1.0),
                colormap=PROBABILITY_COLORMAP,
                blending="additive",
                visible=False,
            ),
        )
        yield
        self.result_layers["uncertainty"] = self._replace(
            "uncertainty",
            volume_to_layer_data(
                result.uncertainty,
                f"{base} uncertainty",
                layer_type="image",
                contrast_limits=(0.0, 1.0),
                colormap=UNCERTAINTY_COLORMAP,
                blending="additive",
                opacity=0.8,
            ),
        )
        self._fill_table(result.volumes_ml)
        source = next((lay for lay in self.viewer.layers if lay.name == base), None)
        if source is not None:
            with selecting_for_the_user():
                self.viewer.layers.selection.active = labels
        if len(self.viewer.layers) == 4 and id(labels) not in before:  # the image and our three new layers
            show_axial(self.viewer, labels)

    def _offer_probability_classes(self, names: list[str]) -> int:
        """Put ``names`` in the "Probability of" choice, keeping the class chosen before (else class 1)."""
        keep = self.probability_class.currentText()
        blocked = self.probability_class.blockSignals(True)
        self.probability_class.clear()
        self.probability_class.addItems(names)
        self.probability_class.setCurrentText(keep if keep in names else names[min(1, len(names) - 1)])
        self.probability_class.blockSignals(blocked)
        return self.probability_class.currentIndex()

    def _probability_volume(self, c: int) -> Volume:
        assert self.result is not None
        probs = self.result.probabilities
        return Volume(np.ascontiguousarray(probs.array[..., c]), probs.affine, dict(probs.metadata))

    def _show_probability(self, c: int) -> None:
        layer = self.result_layers.get("probability")
        if self.result is None or layer is None or layer not in self.viewer.layers or c < 0:
            return
        layer.data = self._probability_volume(c).array
        source = (layer.metadata.get(RESULT_KEY) or {}).get("source", self._source_name)
        layer.name = f"{source} P({self.probability_class.currentText()})"

    def _fill_table(self, volumes_ml: dict[str, float]) -> None:
        rows = list(volumes_ml.items())
        fg = [ml for i, (_, ml) in enumerate(rows) if i > 0]
        if fg:
            rows.append(("total (not background)", sum(fg)))
        self.table.setRowCount(len(rows))
        for r, (name, ml) in enumerate(rows):
            self.table.setItem(r, 0, QTableWidgetItem(str(name)))
            item = QTableWidgetItem(f"{ml:,.1f}")
            item.setTextAlignment(0x0002 | 0x0080)  # right | vcenter
            self.table.setItem(r, 1, item)
        self.table.resizeRowsToContents()
        height = self.table.horizontalHeader().height() + sum(self.table.rowHeight(r) for r in range(len(rows))) + 4
        self.table.setFixedHeight(min(height, 320))

    def volumes_text(self) -> str:
        """The class-volume table as tab-separated text."""
        return "\n".join(
            "\t".join(self.table.item(r, c).text() for c in range(2)) for r in range(self.table.rowCount())
        )
