"""The Generate dock widget: sample synthetic scans with a diffusion model, watching the chain live."""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.layers import Image, Labels, Layer
from napari.utils.notifications import show_error, show_info
from qtpy.QtWidgets import QFileDialog, QMessageBox, QPushButton, QSpinBox, QWidget

from napari_meddiff._napari.layers import (
    install_orientation_letters,
    layer_to_volume,
    show_axial,
    volume_to_layer_data,
)
from napari_meddiff._napari.widgets.conditions import ConditionControls
from napari_meddiff._napari.widgets.controls import (
    MAX_SEED,
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
    selecting_for_the_user,
    wait_loaded,
    when_loaded,
)
from napari_meddiff._napari.writer import save_layer_data
from napari_meddiff.errors import MeddiffError
from napari_meddiff.io.volume import Volume

if TYPE_CHECKING:  # pragma: no cover
    import napari

GENERATIVE_KINDS = ("ddpm", "ldm")
DEFAULT_PREVIEW_EVERY = 5


@dataclasses.dataclass(frozen=True)
class PreviewEvent:
    """The current clean-image estimate of a running chain."""

    name: str
    volume: Volume


@dataclasses.dataclass(frozen=True)
class ResultEvent:
    """One finished sample."""

    name: str
    volume: Volume


@dataclasses.dataclass(frozen=True)
class MapEvent:
    """The tissue map a two-stage sample was made on (a label map)."""

    name: str
    volume: Volume


def generate_task(
    ctx: TaskContext,
    *,
    model_ref: str,
    device: str,
    seeds: list[int],
    sampler: str,
    steps: int,
    preview_every: int,
    conditions: dict[str, float] | None = None,
    guidance_scale: float = 1.0,
    labels: Volume | None = None,
) -> int:
    """Worker-thread body: one chain per seed, emitting previews and each result as it is done (a label-map
    model: each on the grid of ``labels``)."""
    from napari_meddiff.tasks.generate import generate, to_volume

    model = load_model_cached(model_ref, device)
    if labels is not None:
        return _generate_from_labels(ctx, model, labels, seeds, sampler, steps, preview_every, device)
    if model.label_map:  # no map given: its generator draws one per seed
        plan = (seeds, sampler, steps, preview_every, device)
        return _generate_two_stage(ctx, model, plan, conditions, guidance_scale)
    total = len(seeds) * steps
    for n, seed in enumerate(seeds):
        name = f"{model.name}_seed{seed}"
        ctx.progress(n * steps, total, None, f"seed {seed}")

        def on_preview(preview: Any, name: str = name) -> None:
            ctx.emit(PreviewEvent(name, to_volume(model, preview.images[0])))

        (vol,) = generate(
            model,
            [seed],
            sampler=sampler,
            steps=steps,
            device=device,
            on_step=ctx.step_callback(n * steps, total, f"seed {seed}"),
            on_preview=on_preview if preview_every else None,
            preview_every=preview_every,
            should_cancel=ctx.should_cancel,
            conditions=conditions,
            guidance_scale=guidance_scale,
        )
        ctx.emit(ResultEvent(name, vol))
    return len(seeds)


def _generate_from_labels(
    ctx: TaskContext, model, labels: Volume, seeds: list[int], sampler: str, steps: int, preview_every: int, device: str
) -> int:
    """`generate_task` for a label-map model: previews and results on the label map's grid."""
    from napari_meddiff.tasks.from_labels import generate_from_labels

    total = len(seeds) * steps
    for n, seed in enumerate(seeds):
        name = f"{model.name}_seed{seed}"
        ctx.progress(n * steps, total, None, f"seed {seed}")
        (vol,) = generate_from_labels(
            model, labels, [seed], sampler=sampler, steps=steps, device=device,
            on_step=ctx.step_callback(n * steps, total, f"seed {seed}"),
            on_preview=lambda preview, name=name: ctx.emit(PreviewEvent(name, preview)),
            preview_every=preview_every, should_cancel=ctx.should_cancel,
        )  # fmt: skip
        ctx.emit(ResultEvent(name, vol))
    return len(seeds)


class _TwoStageProgress:
    """One seed's progress over both chains: the map's steps, then the scan's."""

    def __init__(self, ctx: TaskContext, offset: int, map_steps: int, total: int, seed: int) -> None:
        self.ctx, self.offset, self.map_steps, self.total, self.seed = ctx, offset, map_steps, total, seed
        self.on_step = ctx.step_callback(offset, total, f"seed {seed}: tissue map")
        ctx.progress(offset, total, None, f"seed {seed}: tissue map")

    def on_stage(self, stage: str, _: int) -> None:
        if stage == "scan":
            self.on_step = self.ctx.step_callback(self.offset + self.map_steps, self.total, f"seed {self.seed}: scan")

    def step(self, info: Any) -> None:
        self.on_step(info)


def _generate_two_stage(
    ctx: TaskContext, model, plan: tuple, conditions: dict[str, float] | None, guidance_scale: float
) -> int:
    """`generate_task` for a label-map model without a map: per seed, the map its generator draws (then
    emitted as a `MapEvent`) and the scan made on it, previews on the map's grid."""
    from napari_meddiff.tasks.generate import generate_two_stage
    from napari_meddiff.tasks.two_stage import conditions_model, map_chain_steps

    seeds, sampler, steps, preview_every, device = plan
    map_steps = map_chain_steps(conditions_model(model, None), model)
    total = len(seeds) * (map_steps + steps)
    for n, seed in enumerate(seeds):
        name = f"{model.name}_seed{seed}"
        progress = _TwoStageProgress(ctx, n * (map_steps + steps), map_steps, total, seed)
        (scan,) = generate_two_stage(
            model, [seed], sampler=sampler, steps=steps, device=device, conditions=conditions,
            guidance_scale=guidance_scale, on_step=progress.step, on_stage=progress.on_stage,
            on_preview=lambda preview, name=name: ctx.emit(PreviewEvent(name, preview)),
            preview_every=preview_every, should_cancel=ctx.should_cancel,
        )  # fmt: skip
        tissue_map = scan.metadata.pop("tissue_map")
        ctx.emit(ResultEvent(name, scan))
        ctx.emit(MapEvent(f"{name}_dseg", tissue_map))
    return len(seeds)


def name_labels(layer: Labels, names: dict[int, str]) -> None:
    """Give a Labels layer the model's label names, shown in the status bar under the cursor (its features)."""
    import pandas as pd

    layer.features = pd.DataFrame({"index": list(names), "label": list(names.values())})


class GenerateWidget(QWidget):
    """Model, sampler, steps, seed, number of samples, device, live preview; Generate / Cancel / Save."""

    def __init__(self, napari_viewer: napari.viewer.Viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self._create_editors()
        self.settings = self._settings_form()
        self.generate_button = QPushButton("Generate")
        self.generate_button.setToolTip("Sample new volumes; each becomes an image layer <model>_seed<S>")
        self.progress = ProgressRow()
        self.save_button = QPushButton("Save as NIfTI…")
        self.save_button.setToolTip("Save the selected image or labels layer (world geometry and provenance kept)")
        stack_vertically(self, [self.settings, self.generate_button, self.progress, self.save_button])

        controls = [self.settings, self.generate_button, self.save_button]
        self.runner = TaskRunner(self.progress, controls, title="Generate", parent=self)
        self.runner.running_changed.connect(self._sync_buttons)
        self.model_picker.changed.connect(self._on_model_changed)
        self.generate_button.clicked.connect(self.run)
        self.save_button.clicked.connect(self.save_selected)
        self._info: ModelInfo | None = None
        self._labels: Volume | None = None  # the label map of the running task (a label-map model)
        self._pending: Layer | None = None  # the layer the running chain fills
        self._pending_seeds: list[int] = []
        self._results: list[Layer] = []
        self._maps_made = 0  # tissue maps of a two-stage run, added beside their scans
        self._first_layer = True  # the run's first layer may set the view (axial, through its middle)
        self._on_model_changed(self.model_picker.current())
        if not is_loaded():
            self.progress.label.setText("Loading torch and MONAI…")
        when_loaded(self, self._on_loaded)
        collect_removed_layers(self.viewer)

    def _on_loaded(self, machine: Machine) -> None:
        """torch and the tasks are imported (in the background): devices known, Generate enabled."""
        self.device.set_devices(machine.devices, machine.cuda_name)
        if not self.runner.running and self.progress.label.text() == "Loading torch and MONAI…":
            self.progress.label.setText("")
        self._sync_buttons()

    def _create_editors(self) -> None:
        """The settings' editors, with their ranges and tooltips."""
        self.model_picker = ModelPicker(kinds=GENERATIVE_KINDS)
        self.label_map = LayerCombo(self.viewer, Labels)
        self.label_map.setToolTip(
            "The label map to generate from (a Labels layer: open a tissue map, or segment a scan, and paint); "
            "each scan comes on its grid"
        )
        self.sampling = SamplingControls(self)
        self.conditions = ConditionControls()
        self.num_samples = QSpinBox()
        self.num_samples.setRange(1, 100)
        self.num_samples.setToolTip("Volumes to generate, with seeds seed, seed+1, ...")
        self.device = DevicePicker()
        self.preview_every = QSpinBox()
        self.preview_every.setRange(0, 1000)
        self.preview_every.setValue(DEFAULT_PREVIEW_EVERY)
        self.preview_every.setSpecialValueText("off")
        self.preview_every.setPrefix("every ")
        self.preview_every.setSuffix(" steps")
        self.preview_every.setToolTip("Show the denoising chain every N steps (decoding costs a little time); 0 = off")

    def _settings_form(self) -> QWidget:
        settings, form = settings_form()
        self.model_summary = add_model_rows(form, self.model_picker)
        form.addRow("Label map", self.label_map)
        self._label_map_label = form.labelForField(self.label_map)
        form.addRow(self.conditions)
        self.sampling.add_rows(form)
        form.addRow("Samples", self.num_samples)
        form.addRow("Device", self.device)
        form.addRow("Preview", self.preview_every)
        self._preview_label = form.labelForField(self.preview_every)
        return settings

    # --- settings ---

    def _sync_buttons(self, *_: Any) -> None:
        ready = self.model_picker.current() is not None and is_loaded()
        self.generate_button.setEnabled(ready and not self.runner.running)

    def _on_model_changed(self, info: ModelInfo | None) -> None:
        self._sync_buttons()
        if info is None:
            self.conditions.set_model(None)
            self.label_map.setVisible(False)
            self._label_map_label.setVisible(False)
            self.model_summary.setText("No generative model found. Use “Open model folder…” to pick one.")
            return
        notes = info.geometry_notes
        self.model_summary.setText(
            info.summary() + (f"\n⚠ geometry not stated by the model: {'; '.join(notes)}" if notes else "")
        )
        self.conditions.set_model(self._conditioned(info))
        self.sampling.set_defaults(info)
        for widget in (self.label_map, self._label_map_label):
            widget.setVisible(bool(info.label_map))
        self.label_map.offer_none("None: its generator draws one" if info.map_generator else None)
        is_3d = info.spatial_dims == 3
        self.preview_every.setVisible(is_3d)
        self._preview_label.setVisible(is_3d)

    @staticmethod
    def _conditioned(info: ModelInfo) -> Any:
        """Whose conditions the form offers: a label-map model's generator's (applied when it draws the map)."""
        from napari_meddiff.tasks.two_stage import conditions_model

        try:
            return conditions_model(info, None)
        except MeddiffError as exc:  # its generator is missing or draws other labels: said at Generate
            show_error(f"Generate: {exc}")
            return info

    # --- generation ---

    def run(self) -> None:
        """Start generating with the current settings (no-op while a run is going)."""
        info = self.model_picker.current()
        if info is None:
            show_error("Generate: choose a model first (Open model folder…)")
            return
        if self.runner.running:
            return
        wait_loaded()  # the button waits for the background import; a direct call waits here
        labels = self._label_map_volume(info)
        if info.label_map and labels is None and not info.map_generator:
            return
        sampler, steps, seed = self.sampling.values()
        seeds = list(range(seed, seed + self.num_samples.value()))
        preview_every = self.preview_every.value() if info.spatial_dims == 3 else 1
        task = partial(
            generate_task,
            model_ref=str(info.path),
            device=self.device.device(),
            seeds=seeds,
            sampler=sampler,
            steps=steps,
            preview_every=preview_every,
            conditions=self.conditions.values() or None,
            guidance_scale=self.conditions.guidance_scale(),
            labels=labels,
        )
        self._info, self._pending_seeds, self._results, self._maps_made = info, list(seeds), [], 0
        self._labels = labels
        # the layer for the first volume appears now (napari's layer set-up costs the click, not the run),
        # transparent until its first preview: empty, it would cover the canvas in black
        self._first_layer = True
        self._pending = self._add_pending()
        self.runner.start(task, on_event=self._on_event, on_stop=self._on_stop, text=f"Loading {info.name}…")

    def _label_map_volume(self, info: ModelInfo) -> Volume | None:
        """A label-map model's map: the chosen Labels layer as a volume (a copy: painting may go on), named with
        the model's labels; None (and a message) when there is none or it cannot be read."""
        if not info.label_map:
            return None
        layer = self.label_map.layer()
        if layer is None and info.map_generator:
            return None  # its generator draws one
        if layer is None:
            show_error(
                f"Generate: {info.name} generates from a label map; add a Labels layer (open a tissue map, or "
                "segment a scan) and choose it under Label map"
            )
            return None
        try:
            vol = layer_to_volume(layer)
        except MeddiffError as exc:
            show_error(f"Generate: {exc}")
            return None
        name_labels(layer, info.label_map)
        return Volume(np.array(vol.array), vol.affine, {"source_path": layer.name})

    def cancel(self) -> None:
        self.runner.cancel()

    def _on_event(self, event: Any) -> None:
        if isinstance(event, PreviewEvent):
            self._show_preview(event)
        elif isinstance(event, ResultEvent):
            self._finish_volume(event)
        elif isinstance(event, MapEvent):
            self._add_map(event)

    def _add_pending(self) -> Layer:
        """An empty layer on the model grid for the next seed; previews fill it, the result replaces it."""
        from napari_meddiff.tasks.generate import to_volume

        seed = self._pending_seeds[0]
        if self._labels is not None:  # a label-map model's scans come on the map's grid
            empty = Volume(np.zeros(self._labels.array.shape[:3], np.float32), self._labels.affine)
        else:
            empty = to_volume(self._info, np.zeros(self._info.image_shape, np.float32))  # the model grid
        data, meta, layer_type = volume_to_layer_data(
            empty,
            f"{self._info.name}_seed{seed} (generating…)",
            layer_type="image",
            contrast_limits=self._info.display_window,
        )
        meta["metadata"][PREVIEW_KEY] = True
        meta["opacity"] = 0.0  # nothing to show yet; the first preview makes it opaque
        layer = self.viewer.add_layer(Layer.create(data, meta, layer_type))
        if self._first_layer:  # an empty viewer: axial view through the middle; else the user's view stays
            self._first_layer = False
            if len(self.viewer.layers) == 1:
                show_axial(self.viewer, layer)
            else:
                install_orientation_letters(self.viewer)
        return layer

    def _pending_layer(self) -> Layer:
        if self._pending is None or self._pending not in self.viewer.layers:  # e.g. deleted by the user
            self._pending = self._add_pending()
        return self._pending

    def _show_preview(self, event: PreviewEvent) -> None:
        from napari_meddiff.tasks.from_labels import in_output_units

        layer = self._pending_layer()
        preview = in_output_units(self._info, event.volume)  # a preview is in [0, 1]: shown as the result will be
        layer.data = preview.array if preview.array.ndim == 3 else preview.array[..., None]
        layer.contrast_limits = self._info.display_window
        layer.opacity = 1.0

    def _finish_volume(self, event: ResultEvent) -> None:
        """The pending layer becomes the result (data, name, provenance); a new one waits for the next seed. A
        map generator's result is a label map: a Labels layer takes the pending one's place."""
        layer = self._pending_layer()
        if self._info.label_output:
            self.viewer.layers.remove(layer)
            self._add_labels_layer(event.name, event.volume, self._info.label_output, visible=True)
        else:
            window = self._info.display_window
            data, meta, _ = volume_to_layer_data(event.volume, event.name, layer_type="image", contrast_limits=window)
            layer.name = event.name
            layer.metadata = meta["metadata"]
            layer.data = data
            layer.contrast_limits = window
            layer.opacity = 1.0
            self._results.append(layer)
        self._pending = None
        self._pending_seeds.pop(0)
        if self._pending_seeds:
            self._pending = self._add_pending()

    def _add_map(self, event: MapEvent) -> None:
        """A two-stage sample's tissue map, hidden under its scan (tick it to overlay it, paint it and inpaint
        "what I changed")."""
        self._add_labels_layer(event.name, event.volume, self._info.label_map, visible=False, result=False)
        self._maps_made += 1

    def _add_labels_layer(
        self, name: str, volume: Volume, names: dict[int, str], visible: bool, result: bool = True
    ) -> None:
        """A generated label map as a Labels layer named with the model's labels (``result``: a generated volume,
        not a scan's map)."""
        data, meta, _ = volume_to_layer_data(volume, name, layer_type="labels", visible=visible)
        layer = self.viewer.add_layer(Layer.create(data, meta, "labels"))
        name_labels(layer, names)
        if result:
            self._results.append(layer)

    def _on_stop(self, outcome: str) -> None:
        """Drop the half-made layer (cancel, error) and say what was made."""
        layer, self._pending = self._pending, None
        if layer is not None and layer in self.viewer.layers:
            self.viewer.layers.remove(layer)
        if self._results and self._results[-1] in self.viewer.layers:
            with selecting_for_the_user():
                self.viewer.layers.selection.active = self._results[-1]
        self.viewer.update_status_from_cursor()  # the status bar may still name the "(generating…)" layer
        if outcome == "done":
            maps = " (each with its tissue map)" if self._maps_made else ""
            self.progress.label.setText(f"{len(self._results)} volume(s) generated{maps}. {self.progress.label.text()}")
            self._advance_seed()
        elif outcome == "cancelled" and self._results:
            self.progress.label.setText(f"Cancelled; kept the {len(self._results)} finished volume(s).")

    def _advance_seed(self) -> None:
        """After a run, the seed moves past the seeds used: Generate again makes new volumes, not copies."""
        made = [layer.metadata.get("provenance", {}).get("seed") for layer in self._results]
        used = [s for s in made if isinstance(s, int)]
        if used:
            self.sampling.seed.setValue(min(max(used) + 1, MAX_SEED))
            self.progress.label.setText(f"{self.progress.label.text()} Next seed: {self.sampling.seed.value()}.")

    # --- saving ---

    def layer_to_save(self) -> Layer | None:
        """The selected image/labels layer, else the last generated one."""
        active = self.viewer.layers.selection.active
        if isinstance(active, (Image, Labels)) and not active.metadata.get(PREVIEW_KEY):
            return active
        results = [layer for layer in self._results if layer in self.viewer.layers]
        return results[-1] if results else None

    def ask_save_path(self, suggested: str) -> str:
        """The save dialog (tests replace this); overwriting is confirmed separately."""
        path, _ = QFileDialog.getSaveFileName(
            self, "Save as NIfTI", suggested, "NIfTI (*.nii.gz *.nii)", options=QFileDialog.Option.DontConfirmOverwrite
        )
        return path

    def confirm_overwrite(self, path: Path) -> bool:
        """Ask before replacing a file (tests replace this)."""
        answer = QMessageBox.question(self, "Replace file?", f"{path.name} exists in {path.parent}.\nReplace it?")
        return answer == QMessageBox.StandardButton.Yes

    def save_selected(self) -> None:
        """Save a layer as NIfTI (atomic write in a worker; never replaces a file without asking)."""
        layer = self.layer_to_save()
        if layer is None:
            show_error("Save as NIfTI: select an image or labels layer first")
            return
        chosen = self.ask_save_path(f"{layer.name}.nii.gz")
        if not chosen:
            return
        path = Path(chosen)
        if not path.name.lower().endswith((".nii", ".nii.gz")):
            path = path.with_name(f"{path.name}.nii.gz")
        overwrite = path.exists()
        if overwrite and not self.confirm_overwrite(path):
            return
        try:
            layer_to_volume(layer)  # fail early, in the main thread, on layers NIfTI cannot hold
        except MeddiffError as exc:
            show_error(f"Save as NIfTI: {exc}")
            return
        data, meta, layer_type = layer.as_layer_data_tuple()
        kind = "labels" if layer_type == "labels" else "image"
        data = np.array(data)  # a copy: the layer may be edited while the file is written

        def task(ctx: TaskContext) -> list[str]:
            return save_layer_data(path, data, meta, kind=kind, overwrite=overwrite)

        self.runner.start(task, on_result=lambda paths: show_info(f"Saved {paths[0]}"), text=f"Saving {path.name}…")
