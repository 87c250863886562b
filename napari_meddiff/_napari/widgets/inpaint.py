"""The Inpaint dock widget: paint a region in a Labels layer, let a diffusion model fill it.

Everything outside the painted region stays exactly as it was. Each candidate becomes a new image layer on
the scan's world grid (pick the one you like, save it with File > Save Selected Layer). The live preview
shows the chain's current estimate inside the mask on a copy of the scan.

A label-map model (a scan from a tissue map) also takes the scan's tissue map: "Edit a copy" duplicates it to
paint on (a lesion, say), and "regenerate what I changed" fills only where the copy differs from the original.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.layers import Image, Labels, Layer
from napari.utils.notifications import show_error
from qtpy.QtWidgets import QCheckBox, QComboBox, QPushButton, QSpinBox, QWidget

from napari_meddiff._napari.layers import layer_to_volume, volume_to_layer_data
from napari_meddiff._napari.widgets.conditions import ConditionControls
from napari_meddiff._napari.widgets.controls import (
    PREVIEW_KEY,
    DevicePicker,
    LayerCombo,
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
    load_model_cached,
    wait_loaded,
    when_loaded,
)
from napari_meddiff.errors import MeddiffError
from napari_meddiff.io.volume import Volume
from napari_meddiff.models import DEFAULT_INPAINT_MODEL

if TYPE_CHECKING:  # pragma: no cover
    import napari

AXES = ("axial", "coronal", "sagittal")
MAX_CANDIDATES = 16


@dataclasses.dataclass(frozen=True)
class PreviewEvent:
    """The current estimate of candidate ``candidate`` (0-based) inside the mask: ``patch`` goes at ``region``."""

    candidate: int
    region: tuple
    patch: np.ndarray


@dataclasses.dataclass(frozen=True)
class ResultEvent:
    """One finished candidate."""

    name: str
    volume: Volume


def inpaint_task(
    ctx: TaskContext,
    *,
    model_ref: str,
    device: str,
    image: Volume,
    mask: Volume,
    label: int | None,
    base_name: str,
    sampler: str,
    steps: int,
    seed: int,
    candidates: int,
    axis: str,
    jump_length: int,
    jump_n: int,
    feather_voxels: int,
    preview: bool,
    conditions: dict[str, float] | None = None,
    labels: Volume | None = None,
) -> int:
    """Worker-thread body: inpaint all candidates, emitting previews and then each result."""
    from napari_meddiff.tasks.inpaint import inpaint

    model = load_model_cached(model_ref, device)
    text = f"{candidates} candidate{'s' if candidates > 1 else ''}"

    def on_step(info: Any) -> None:
        ctx.progress(info.index, info.total, info.elapsed / info.index * (info.total - info.index), text)

    def on_preview(p: Any) -> None:
        ctx.emit(PreviewEvent(p.candidate, p.region, p.patch))

    volumes = inpaint(
        model,
        image,
        mask,
        label=label,
        labels=labels,
        sampler=sampler,
        steps=steps,
        seed=seed,
        candidates=candidates,
        axis=axis,
        jump_length=jump_length,
        jump_n=jump_n,
        feather_voxels=feather_voxels,
        device=device,
        on_step=on_step,
        on_preview=on_preview if preview else None,
        should_cancel=ctx.should_cancel,
        conditions=conditions,
    )
    for c, vol in enumerate(volumes):
        ctx.emit(ResultEvent(f"{base_name} inpainted s{seed + c}", vol))
    return len(volumes)


class InpaintWidget(QWidget):
    """Image, mask (labels layer + label value), model, sampler, steps, seed, candidates, preview; Inpaint / Cancel."""

    def __init__(self, napari_viewer: napari.viewer.Viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self._create_mask_editors()
        self._create_map_editors()
        self.model_picker = ModelPicker(kinds=("ddpm", "ldm"), default=DEFAULT_INPAINT_MODEL)
        self.conditions = ConditionControls(guidance=False)
        self.sampling = SamplingControls(self)
        self._create_fill_editors()
        self.device = DevicePicker()
        self.settings = self._settings_form()
        self.inpaint_button = QPushButton("Inpaint")
        self.inpaint_button.setToolTip("Fill the masked region; outside the mask nothing changes")
        self.progress = ProgressRow()
        stack_vertically(self, [self.settings, self.inpaint_button, self.progress])

        self.runner = TaskRunner(self.progress, [self.settings, self.inpaint_button], title="Inpaint", parent=self)
        self._connect_signals()
        self._preview_layer: Layer | None = None
        self._results: list[Layer] = []
        self._source: Layer | None = None
        # an edited copy's unique_id (not id(): a plugin's viewer hands out proxies) -> the map it was copied from
        self._map_originals: dict[str, Volume] = {}
        self._on_model_changed(self.model_picker.current())
        if not is_loaded():
            self.progress.label.setText("Loading torch and MONAI…")
        when_loaded(self, self._on_loaded)
        collect_removed_layers(self.viewer)

    def _on_loaded(self, machine: Machine) -> None:
        """torch and the tasks are imported (in the background): devices, the model's inpainting defaults."""
        self.device.set_devices(machine.devices, machine.cuda_name)
        if not self.runner.running and self.progress.label.text() == "Loading torch and MONAI…":
            self.progress.label.setText("")
        self._apply_task_defaults(self.model_picker.current())
        self._sync()

    def _create_mask_editors(self) -> None:
        """The scan, the Labels layer with the region and which label value it is, and "New mask"."""
        self.image_combo = LayerCombo(self.viewer, Image)
        self.image_combo.setToolTip("The scan to fill")
        self.labels_combo = LayerCombo(self.viewer, Labels)
        self.labels_combo.setToolTip("The Labels layer holding the region to fill (paint it with the brush)")
        self.new_mask_button = QPushButton("New mask")
        self.new_mask_button.setToolTip("Add an empty Labels layer on the scan's grid and start painting")
        self.label_value = QSpinBox()
        self.label_value.setRange(0, 2**31 - 1)
        self.label_value.setSpecialValueText("all non-zero")
        self.label_value.setToolTip("Which label value is the region to fill (all non-zero: every painted voxel)")

    def _create_map_editors(self) -> None:
        """A label-map model's tissue map of the scan, "Edit a copy" and "regenerate what I changed"."""
        self.map_combo = LayerCombo(self.viewer, Labels)
        self.map_combo.setToolTip("The scan's tissue map (a Labels layer): the fill follows it as edited")
        self.edit_map_button = QPushButton("Edit a copy")
        self.edit_map_button.setToolTip("Duplicate the tissue map to paint on; the original stays as it was")
        self.changed_only = QCheckBox("regenerate what I changed")
        self.changed_only.setToolTip(
            "Fill only where the edited copy differs from the map it was copied from (and one voxel around), "
            "instead of a painted mask"
        )

    def _create_fill_editors(self) -> None:
        """Candidates, slice axis, RePaint resampling, feathering and the live preview switch."""
        self.candidates = QSpinBox()
        self.candidates.setRange(1, MAX_CANDIDATES)
        self.candidates.setToolTip("Fills to choose from, with seeds seed, seed+1, ...; each becomes a layer")
        self.axis = QComboBox()
        self.axis.addItems(AXES)
        self.axis.setToolTip("2D models fill slice by slice along this axis (only the slices the mask touches)")
        self.jump_n = QSpinBox()
        self.jump_n.setRange(1, 20)
        self.jump_n.setSpecialValueText("off")
        self.jump_n.setToolTip(
            "RePaint resampling: re-run each stretch of the chain this many times (slower, better blended); off = 1"
        )
        self.jump_length = QSpinBox()
        self.jump_length.setRange(1, 100)
        self.jump_length.setPrefix("every ")
        self.jump_length.setSuffix(" steps")
        self.feather = QSpinBox()
        self.feather.setRange(0, 10)
        self.feather.setSuffix(" voxels")
        self.feather.setToolTip("Blend the fill's border with the original over this many voxels, inside the mask only")
        self.preview = QCheckBox("live preview")
        self.preview.setChecked(True)
        self.preview.setToolTip("Show the current estimate while the model runs (on a copy of the scan)")

    def _settings_form(self) -> QWidget:
        settings, form = settings_form()
        form.addRow("Image", self.image_combo)
        form.addRow("Mask", self.labels_combo)
        form.addRow("", self.new_mask_button)
        form.addRow("Label", self.label_value)
        self.model_summary = add_model_rows(form, self.model_picker)
        form.addRow("Tissue map", self.map_combo)
        form.addRow("", self.edit_map_button)
        form.addRow("", self.changed_only)
        self._map_rows = [form.labelForField(self.map_combo), self.map_combo, self.edit_map_button, self.changed_only]
        form.addRow(self.conditions)
        self.sampling.add_rows(form)
        form.addRow("Candidates", self.candidates)
        form.addRow("Slice axis", self.axis)
        self._axis_label = form.labelForField(self.axis)
        form.addRow("Resampling", self.jump_n)
        form.addRow("", self.jump_length)
        form.addRow("Feather", self.feather)
        form.addRow("Device", self.device)
        form.addRow("", self.preview)
        return settings

    def _connect_signals(self) -> None:
        self.runner.running_changed.connect(self._sync)
        self.model_picker.changed.connect(self._on_model_changed)
        self.image_combo.currentIndexChanged.connect(self._sync)
        self.labels_combo.currentIndexChanged.connect(self._sync)
        self.map_combo.currentIndexChanged.connect(self._sync)
        self.changed_only.toggled.connect(self._sync)
        self.edit_map_button.clicked.connect(self.edit_map_copy)
        self.jump_n.valueChanged.connect(self._sync)
        self.new_mask_button.clicked.connect(self.new_mask)
        self.inpaint_button.clicked.connect(self.run)

    # --- settings ---

    def _sync(self, *_: Any) -> None:
        info = self.model_picker.current()
        by_map = bool(info is not None and info.label_map)
        changed_only = by_map and self.changed_only.isChecked()
        ready = (
            info is not None
            and self.image_combo.layer() is not None
            and (changed_only or self.labels_combo.layer() is not None)
            and (not by_map or self.map_combo.layer() is not None)
        )
        self.inpaint_button.setEnabled(ready and is_loaded() and not self.runner.running)
        self.new_mask_button.setEnabled(self.image_combo.layer() is not None and not changed_only)
        self.edit_map_button.setEnabled(self.map_combo.layer() is not None)
        self.labels_combo.setEnabled(not changed_only)  # the edit is the region: no mask to choose
        self.label_value.setEnabled(not changed_only)
        self.jump_length.setEnabled(self.jump_n.value() > 1)

    def _on_model_changed(self, info: ModelInfo | None) -> None:
        self._sync()
        self.conditions.set_model(info)
        if info is None:
            self.model_summary.setText("No generative model found. Use “Open model folder…” to pick one.")
            return
        self.model_summary.setText(info.summary())
        for widget in self._map_rows:
            widget.setVisible(bool(info.label_map))
        self.sampling.set_defaults(info)
        if is_loaded():  # else once torch is in (`_on_loaded`)
            self._apply_task_defaults(info)
        is_2d = info.spatial_dims == 2
        self.axis.setVisible(is_2d)
        self._axis_label.setVisible(is_2d)

    def _apply_task_defaults(self, info: ModelInfo | None) -> None:
        """The model's RePaint jumps and feathering (imports torch: called once the background import is done)."""
        from napari_meddiff.tasks.settings import task_defaults

        if info is None:
            return
        defaults = task_defaults(info, "inpaint")
        self.jump_length.setValue(int(defaults["jump_length"]))
        self.jump_n.setValue(int(defaults["jump_n"]))
        self.feather.setValue(int(defaults["feather_voxels"]))

    def new_mask(self) -> Labels | None:
        """An empty Labels layer on the selected image's grid (same transform), selected for painting."""
        image = self.image_combo.layer()
        if image is None:
            show_error("Inpaint: open a scan first")
            return None
        shape = np.shape(image.data)[-3:] if image.ndim >= 3 else np.shape(image.data)
        layer = self._labels_like(image, np.zeros(shape, np.uint8), f"{image.name} mask")
        layer.selected_label = 1
        self.labels_combo.select(layer)
        return layer

    def edit_map_copy(self) -> Labels | None:
        """A copy of the chosen tissue map to paint on (the original kept for "regenerate what I changed"),
        selected for painting with the lesion label when the model has one."""
        source = self.map_combo.layer()
        if source is None:
            show_error("Inpaint: choose the scan's tissue map first")
            return None
        try:
            original = layer_to_volume(source)
        except MeddiffError as exc:
            show_error(f"Inpaint: {exc}")
            return None
        layer = self._labels_like(source, np.array(source.data, copy=True), f"{source.name} edited")
        if len(getattr(source, "features", ())):
            layer.features = source.features.copy()
        info = self.model_picker.current()
        names = info.label_map if info is not None else {}
        layer.selected_label = next((k for k, v in names.items() if v == "lesion"), 1)
        self._map_originals[layer.unique_id] = Volume(np.array(original.array, copy=True), original.affine)
        self.map_combo.select(layer)
        self.changed_only.setChecked(True)
        return layer

    def _labels_like(self, source: Layer, data: np.ndarray, name: str) -> Labels:
        """A Labels layer holding ``data`` with ``source``'s world transform, in paint mode."""
        layer = self.viewer.add_labels(
            data,
            name=name,
            scale=source.scale,
            translate=source.translate,
            rotate=source.rotate,
            shear=source.shear,
            affine=source.affine.affine_matrix,
            metadata={k: v for k, v in source.metadata.items() if k != PREVIEW_KEY},
            **({"units": source.units} if hasattr(source, "units") else {}),  # else napari warns of mixed units
        )
        layer.mode = "paint"
        return layer

    # --- running ---

    def run(self) -> None:
        """Start inpainting with the current settings (no-op while a run is going)."""
        info = self.model_picker.current()
        image_layer = self.image_combo.layer()
        if info is None or image_layer is None:
            show_error("Inpaint: choose an image, a labels layer with the region painted, and a model")
            return
        if self.runner.running:
            return
        wait_loaded()  # the button waits for the background import; a direct call waits here
        try:
            image = layer_to_volume(image_layer)
            # copies: the user may keep painting or editing while the model runs
            image = Volume(np.array(image.array), image.affine, image.metadata)
            labels = self._tissue_map() if info.label_map else None
            mask = self._region(labels)
        except MeddiffError as exc:
            show_error(f"Inpaint: {exc}")
            return
        sampler, steps, seed = self.sampling.values()
        label = self.label_value.value() or None
        task = partial(
            inpaint_task,
            model_ref=str(info.path),
            device=self.device.device(),
            image=image,
            mask=mask,
            label=label,
            base_name=image_layer.name,
            sampler=sampler,
            steps=steps,
            seed=seed,
            candidates=self.candidates.value(),
            axis=self.axis.currentText(),
            jump_length=self.jump_length.value(),
            jump_n=self.jump_n.value(),
            feather_voxels=self.feather.value(),
            preview=self.preview.isChecked(),
            conditions=self.conditions.values() or None,
            labels=labels,
        )
        self._preview_layer, self._results, self._source = None, [], image_layer
        self.runner.start(
            task,
            on_event=self._on_event,
            on_result=self._on_result,
            on_stop=self._on_stop,
            text=f"Loading {info.name}…",
        )

    def _tissue_map(self) -> Volume:
        """A copy of the chosen tissue map (a label-map model's condition)."""
        layer = self.map_combo.layer()
        if layer is None:
            raise MeddiffError(f"{self.model_picker.current().name} fills under the scan's tissue map: choose it")
        vol = layer_to_volume(layer)
        return Volume(np.array(vol.array, copy=True), vol.affine)

    def _region(self, labels: Volume | None) -> Volume:
        """What to fill: where the edited map differs from its original, or the painted mask."""
        from napari_meddiff.tasks.from_labels import changed_labels_mask

        if labels is not None and self.changed_only.isChecked():
            original = self._map_originals.get(self.map_combo.layer().unique_id)
            if original is None:
                raise MeddiffError("to regenerate what you changed, press “Edit a copy” and paint on the copy")
            return Volume(changed_labels_mask(original, labels, 1).astype(np.uint8), labels.affine)
        layer = self.labels_combo.layer()
        if layer is None:
            raise MeddiffError("choose the labels layer with the region painted")
        mask = layer_to_volume(layer)
        return Volume(np.array(mask.array), mask.affine, {})

    def cancel(self) -> None:
        self.runner.cancel()

    def _on_event(self, event: Any) -> None:
        if isinstance(event, PreviewEvent):
            self._show_preview(event)
        elif isinstance(event, ResultEvent):
            self._add_result(event)

    def _layer_kwargs(self) -> dict[str, Any]:
        source = self._source
        if source is None or source not in self.viewer.layers:
            return {}
        return {"contrast_limits": tuple(source.contrast_limits), "colormap": source.colormap.name}

    def _show_preview(self, event: PreviewEvent) -> None:
        layer = self._preview_layer
        name = f"inpaint preview (candidate {event.candidate + 1})"
        if layer is None or layer not in self.viewer.layers:
            source = self._source
            if source is None or source not in self.viewer.layers:
                return
            data, meta, _ = source.as_layer_data_tuple()
            meta = {
                k: meta[k]
                for k in (
                    "scale",
                    "translate",
                    "rotate",
                    "shear",
                    "affine",
                    "contrast_limits",
                    "colormap",
                    "axis_labels",
                    "units",
                )
                if k in meta
            }
            self._preview_layer = layer = self.viewer.add_image(
                np.array(data, copy=True), name=name, metadata={PREVIEW_KEY: True}, **meta
            )
        data = layer.data
        view = data[..., None] if data.ndim == 2 else data
        view[event.region] = event.patch
        layer.name = name
        layer.refresh()

    def _add_result(self, event: ResultEvent) -> None:
        data, meta, layer_type = volume_to_layer_data(
            event.volume, event.name, layer_type="image", **self._layer_kwargs()
        )
        layer = self.viewer.add_layer(Layer.create(data, meta, layer_type))
        self._results.append(layer)

    def _remove_preview(self) -> None:
        layer, self._preview_layer = self._preview_layer, None
        if layer is not None and layer in self.viewer.layers:
            self.viewer.layers.remove(layer)

    def _on_result(self, count: int) -> None:
        self._remove_preview()
        if self._results:
            for layer in self._results[1:]:
                layer.visible = False  # one candidate at a time; toggle to compare
            self.viewer.layers.selection.active = self._results[0]

    def _on_stop(self, outcome: str) -> None:
        self._remove_preview()
        if outcome == "done":
            self.progress.label.setText(f"{len(self._results)} candidate(s) added. {self.progress.label.text()}")
