"""Controls the dock widgets share; no worker threads here (those are in `runner`).

* `ModelInfo` - what a picker knows about a model folder, from ``model.json`` alone.
* `ModelPicker` - models of some kinds found on the model search path, plus "Open model folder...".
* `DevicePicker` - auto / cpu / cuda, showing what this machine has.
* `SamplingControls` - sampler, steps and seed (+ Random) rows for a ``QFormLayout``.
* `Progress` + `ProgressRow` - a task's progress report, and the bar, "12/20 steps · 7 s left" text and
  Cancel button that show it; `format_seconds` for "7 s", "3 min 05 s", "1 h 02 min".
* `settings_form`, `add_model_rows`, `stack_vertically` - the layout every task widget uses: a form of
  settings (its "Model" row with the model's summary under it), then buttons and progress, top to bottom.

A task widget's settings (see ``generate.py``)::

    self.settings, form = settings_form()
    self.model_summary = add_model_rows(form, self.model_picker)  # ModelPicker(kinds=...): .changed, .current()
    self.sampling.add_rows(form)                                  # SamplingControls(self): .set_defaults(info)
    form.addRow("Device", self.device)                            # DevicePicker(): .device() -> "auto"/"cpu"/"cuda"
    stack_vertically(self, [self.settings, self.run_button, self.progress])
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from napari.layers import Labels, Layer
from napari.utils.notifications import show_error
from qtpy.QtCore import QObject, QSize, Qt, Signal
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QFrame,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_meddiff.choices import SAMPLERS, samplers_for
from napari_meddiff.errors import MeddiffError
from napari_meddiff.models import DEFAULT_MODEL, ModelConfigView, available_models, find_model_dir, read_config

if TYPE_CHECKING:  # pragma: no cover
    import napari

logger = logging.getLogger(__name__)


KIND_NAMES = {"ddpm": "pixel diffusion (DDPM)", "ldm": "latent diffusion", "segmentation": "diffusion segmentation"}


OPEN_FOLDER = "__open_model_folder__"


MAX_SEED = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class ModelInfo(ModelConfigView):
    """What a picker knows about a model folder, from ``model.json`` alone (no weights loaded)."""

    name: str
    path: Path
    config: dict[str, Any]

    @classmethod
    def from_path(cls, path: str | Path) -> ModelInfo:
        folder = find_model_dir(path).resolve()
        config = read_config(folder)
        return cls(str(config.get("name", folder.name)), folder, config)

    def summary(self) -> str:
        shape = "×".join(str(s) for s in self.image_shape)
        voxel = "×".join(f"{v:g}" for v in self.voxel_size)
        context = self.context_slices
        dims = f"2.5D (each slice ±{context})" if context else f"{self.spatial_dims}D"
        text = f"{dims} {KIND_NAMES.get(self.kind, self.kind)} · {shape} voxels of {voxel} mm"
        if self.label_map:
            text += " · from a label map: " + ", ".join(f"{k} {v}" for k, v in self.label_map.items())
            if self.map_generator:
                text += f" (or one {self.map_generator} draws)"
        if self.label_output:
            text += " · draws label maps: " + ", ".join(f"{k} {v}" for k, v in self.label_output.items())
        return text


class _RescanningCombo(QComboBox):
    """A combo box that calls ``before_popup`` first, so models installed meanwhile show up."""

    before_popup: Callable[[], None] | None = None

    def showPopup(self) -> None:  # noqa: N802 - Qt name
        if self.before_popup is not None:
            self.before_popup()
        super().showPopup()


class ModelPicker(QWidget):
    """A combo box of installed models of ``kinds`` (and ``spatial_dims``), plus "Open model folder...".

    The list is re-scanned whenever it is opened. ``changed`` carries the selected `ModelInfo`, or None
    when no model is available; it is emitted only when the selection really changes.
    """

    changed = Signal(object)

    def __init__(
        self,
        kinds: Sequence[str] = ("ddpm", "ldm"),
        spatial_dims: Sequence[int] = (2, 3),
        parent: QWidget | None = None,
        default: str = DEFAULT_MODEL,
    ) -> None:
        super().__init__(parent)
        self.kinds, self.spatial_dims, self.default = tuple(kinds), tuple(spatial_dims), default
        self.combo = _RescanningCombo()
        self.combo.before_popup = self.refresh
        self.combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.combo.setMinimumContentsLength(14)
        self.combo.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.combo.setToolTip("Installed models (models/ and $MEDDIFF_MODELS), or open a model folder")
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.combo)
        self._extra: dict[str, ModelInfo] = {}  # folders opened by the user, by path
        self._infos: dict[str, ModelInfo] = {}
        self._previous = 0
        self._emitted: ModelInfo | None = None
        self.refresh()
        self.combo.activated.connect(self._on_activated)
        self.combo.currentIndexChanged.connect(self._on_index_changed)

    def _fits(self, info: ModelInfo) -> bool:
        return info.kind in self.kinds and info.spatial_dims in self.spatial_dims

    def refresh(self) -> None:
        """Re-scan the model search path, keeping the selection when it is still there."""
        keep = self.combo.currentData()
        infos: dict[str, ModelInfo] = {}
        for name, path in available_models().items():
            try:
                info = ModelInfo.from_path(path)
            except MeddiffError as exc:
                logger.warning("skipping model %s: %s", name, exc)
                continue
            if self._fits(info):
                infos[str(info.path)] = info
        infos.update(self._extra)
        self._infos = infos
        blocked = self.combo.blockSignals(True)
        self.combo.clear()
        for key, info in infos.items():
            self.combo.addItem(info.name, key)
            tip = f"{info.summary()}\n{info.path}"
            self.combo.setItemData(self.combo.count() - 1, tip, Qt.ItemDataRole.ToolTipRole)
        if not infos:
            self.combo.addItem("(no models found)", None)
            self.combo.model().item(0).setEnabled(False)
        self.combo.insertSeparator(self.combo.count())
        self.combo.addItem("Open model folder…", OPEN_FOLDER)
        default = next((k for k, i in infos.items() if i.name == self.default), next(iter(infos), None))
        index = self.combo.findData(keep if keep in infos else default)
        self.combo.setCurrentIndex(max(index, 0))
        self._previous = self.combo.currentIndex()
        self.combo.blockSignals(blocked)
        self._emit_if_changed()

    def _emit_if_changed(self) -> None:
        info = self.current()
        if info != self._emitted:
            self._emitted = info
            self.changed.emit(info)

    def current(self) -> ModelInfo | None:
        return self._infos.get(self.combo.currentData())

    def select(self, name_or_path: str | Path) -> ModelInfo:
        """Select a model by name or folder (a folder not on the list is added)."""
        for key, info in self._infos.items():
            if info.name == str(name_or_path) or key == str(Path(name_or_path).resolve()):
                self.combo.setCurrentIndex(self.combo.findData(key))
                return info
        return self.add_folder(name_or_path)

    def add_folder(self, path: str | Path) -> ModelInfo:
        """Add and select a model folder; raises `MeddiffError` when it is not a usable model."""
        info = ModelInfo.from_path(path)
        if not self._fits(info):
            wanted = " or ".join(KIND_NAMES.get(k, k) for k in self.kinds)
            what = f"{info.spatial_dims}D {KIND_NAMES.get(info.kind, info.kind)}"
            raise MeddiffError(f"{info.name} is a {what} model; this tool needs {wanted}")
        self._extra[str(info.path)] = info
        self.refresh()
        self.combo.setCurrentIndex(self.combo.findData(str(info.path)))
        return info

    def ask_folder(self) -> str:
        """The folder dialog (tests replace this)."""
        return QFileDialog.getExistingDirectory(
            self, "Open model folder (model.json or MONAI bundle)", str(Path.home())
        )

    def _on_activated(self, index: int) -> None:
        if self.combo.itemData(index) != OPEN_FOLDER:
            return
        self.combo.setCurrentIndex(self._previous)
        folder = self.ask_folder()
        if not folder:
            return
        try:
            self.add_folder(folder)
        except MeddiffError as exc:
            show_error(f"Cannot use model folder: {exc}")

    def _on_index_changed(self, index: int) -> None:
        if self.combo.itemData(index) == OPEN_FOLDER:
            return
        self._previous = index
        self._emit_if_changed()


class DevicePicker(QComboBox):
    """``auto`` (naming what it picks), ``cpu``, ``cuda`` (greyed out when this machine has none).

    Which devices there are is known once torch is imported (in the background, see ``runner``): until
    `set_devices` is called the list reads "auto (loading…)"; ``auto`` and ``cpu`` can be chosen meanwhile.
    """

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.addItem("auto (loading…)", "auto")
        self.addItem("cpu", "cpu")
        self.addItem("cuda (loading…)", "cuda")
        self.model().item(2).setEnabled(False)
        self.setToolTip("Where the model runs; auto uses a CUDA GPU when there is one")

    def set_devices(self, devices: Sequence[str], cuda_name: str = "") -> None:
        """Name what ``auto`` picks and enable ``cuda`` where this machine has it."""
        auto = "cuda" if "cuda" in devices else "cpu"
        self.setItemText(0, f"auto ({auto})")
        if "cuda" in devices:
            self.setItemText(2, f"cuda ({cuda_name})" if cuda_name else "cuda")
            self.model().item(2).setEnabled(True)
        else:
            self.setItemText(2, "cuda (not available)")

    def device(self) -> str:
        return str(self.currentData())


class SamplingControls(QObject):
    """Sampler, steps and seed (+ Random) editors; `add_rows` puts them in a form."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.sampler = QComboBox()
        self.sampler.addItems(list(SAMPLERS))
        self.sampler.setToolTip("ddpm: ancestral (needs many steps); ddim: deterministic; dpm++: fast, 10-25 steps")
        self.steps = QSpinBox()
        self.steps.setRange(1, 1000)
        self.steps.setToolTip("Denoising steps: more is slower and usually a little better")
        self.seed = QSpinBox()
        self.seed.setRange(0, MAX_SEED)
        self.seed.setToolTip("Same seed + settings + device = the same image")
        self.random_button = QPushButton("Random")
        self.random_button.setToolTip("Pick a random seed")
        self.random_button.clicked.connect(self.randomize_seed)
        self.seed_row = QWidget()
        row = QHBoxLayout(self.seed_row)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.seed, 1)
        row.addWidget(self.random_button)

    def add_rows(self, form: QFormLayout) -> None:
        form.addRow("Sampler", self.sampler)
        form.addRow("Steps", self.steps)
        form.addRow("Seed", self.seed_row)

    def set_defaults(self, info: ModelInfo | None) -> None:
        """Only the samplers that fit the model's training schedule (no ``rflow`` for a DDPM, and the reverse);
        the model's default sampler and number of steps."""
        if info is None:
            return
        fitting = list(samplers_for(info.config.get("scheduler") or {})) or list(SAMPLERS)
        if fitting != [self.sampler.itemText(i) for i in range(self.sampler.count())]:
            self.sampler.clear()
            self.sampler.addItems(fitting)
        defaults = info.sampling_defaults
        if defaults["sampler"] in fitting:
            self.sampler.setCurrentText(defaults["sampler"])
        self.steps.setValue(int(defaults["steps"]))

    def randomize_seed(self) -> None:
        self.seed.setValue(random.randrange(MAX_SEED))

    def values(self) -> tuple[str, int, int]:
        """(sampler, steps, seed)."""
        return self.sampler.currentText(), self.steps.value(), self.seed.value()


def settings_form() -> tuple[QWidget, QFormLayout]:
    """A widget holding an empty form for a task's settings (no margins, editors as wide as the panel)."""
    settings = QWidget()
    form = QFormLayout(settings)
    form.setContentsMargins(0, 0, 0, 0)
    form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
    return settings, form


def add_model_rows(form: QFormLayout, picker: ModelPicker) -> QLabel:
    """Add the "Model" row and, under it, a grey label for the model's summary (returned)."""
    summary = QLabel()
    summary.setWordWrap(True)
    summary.setStyleSheet("color: gray;")
    # as tall as its wrapped text (a form row otherwise gives a word-wrapped label one line: half clipped)
    policy = QSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Minimum)
    policy.setHeightForWidth(True)
    summary.setSizePolicy(policy)
    form.addRow("Model", picker)
    form.addRow("", summary)
    return summary


class _ScrollArea(QScrollArea):
    """A scroll area asking for its content's full size (a plain one asks for about 24 lines), and at least
    `MIN_SCROLL_HEIGHT` of it: docked with others, a widget scrolls instead of shrinking to two rows."""

    def sizeHint(self) -> QSize:  # noqa: N802 - Qt name
        inner = self.widget().sizeHint() if self.widget() is not None else QSize(0, 0)
        bar = self.verticalScrollBar().sizeHint().width()
        return QSize(inner.width() + bar, inner.height())

    def minimumSizeHint(self) -> QSize:  # noqa: N802 - Qt name
        hint = self.sizeHint()
        inner = self.widget().minimumSizeHint() if self.widget() is not None else QSize(0, 0)
        return QSize(inner.width() + self.verticalScrollBar().sizeHint().width(), min(hint.height(), MIN_SCROLL_HEIGHT))


MIN_SCROLL_HEIGHT = 90


def stack_vertically(parent: QWidget, widgets: Sequence[QWidget]) -> QVBoxLayout:
    """Lay ``widgets`` out in ``parent`` top to bottom, the spare room left below them, in a scroll area:
    with several widgets docked, each scrolls rather than growing the window past the screen."""
    content = QWidget()
    layout = QVBoxLayout(content)
    for widget in widgets:
        layout.addWidget(widget)
    layout.addStretch(1)
    scroll = _ScrollArea()
    scroll.setWidget(content)
    scroll.setWidgetResizable(True)
    scroll.setFrameShape(QFrame.Shape.NoFrame)
    scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    outer = QVBoxLayout(parent)
    outer.setContentsMargins(0, 0, 0, 0)
    outer.addWidget(scroll)
    parent.scroll_area = scroll  # type: ignore[attr-defined]
    return layout


def format_seconds(seconds: float) -> str:
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s} s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m} min {s:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


@dataclasses.dataclass(frozen=True)
class Progress:
    """A progress report from a task: ``done`` of ``total`` steps, seconds left when known."""

    done: int
    total: int
    eta_seconds: float | None = None
    text: str = ""


class ProgressRow(QWidget):
    """Progress bar + Cancel button, and a line of text: "seed 3 · 12/20 steps · 7 s left"."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.bar = QProgressBar()
        self.bar.setRange(0, 1)
        self.bar.setValue(0)
        self.bar.setTextVisible(False)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.setToolTip("Stop after the current step; nothing half-made is kept")
        self.label = QLabel("")
        self.label.setWordWrap(True)
        top = QHBoxLayout()
        top.setContentsMargins(0, 0, 0, 0)
        top.addWidget(self.bar, 1)
        top.addWidget(self.cancel_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(top)
        layout.addWidget(self.label)

    def begin(self, text: str) -> None:
        self.bar.setRange(0, 0)  # busy until the first report
        self.label.setText(text)
        self.cancel_button.setEnabled(True)

    def report(self, p: Progress) -> None:
        self.bar.setRange(0, max(p.total, 1))
        self.bar.setValue(min(p.done, p.total))
        parts = [p.text] if p.text else []
        parts.append(f"{p.done}/{p.total} steps")
        if p.eta_seconds is not None and p.done < p.total:
            parts.append(f"{format_seconds(p.eta_seconds)} left")
        self.label.setText(" · ".join(parts))

    def end(self, text: str) -> None:
        self.bar.setRange(0, 1)
        self.bar.setValue(0)
        self.label.setText(text)
        self.cancel_button.setEnabled(False)


# metadata key of the layers a running task shows its chain in ("(generating…)", inpainting previews): not inputs
PREVIEW_KEY = "meddiff_preview"


class LayerCombo(QComboBox):
    """The viewer's layers of one type, kept in sync with the layer list (selection kept by name)."""

    def __init__(self, viewer: napari.viewer.Viewer, layer_type: type, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer, self.layer_type = viewer, layer_type
        self._none_text: str | None = None  # a first entry meaning "no layer" (see `offer_none`)
        self.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.setMinimumContentsLength(12)
        for event in (viewer.layers.events.inserted, viewer.layers.events.removed, viewer.layers.events.moved):
            event.connect(self.refresh)
        self.refresh()

    def candidates(self) -> list[Layer]:
        return [
            layer
            for layer in self.viewer.layers
            if isinstance(layer, self.layer_type) and not layer.metadata.get(PREVIEW_KEY)
        ]

    def refresh(self, *_: Any) -> None:
        keep = self.currentText()
        blocked = self.blockSignals(True)
        self.clear()
        if self._none_text is not None:
            self.addItem(self._none_text)
        for layer in self.candidates():
            self.addItem(layer.name)
            layer.events.name.disconnect(self.refresh)  # no duplicate connections
            layer.events.name.connect(self.refresh)
        index = self.findText(keep)
        self.setCurrentIndex(index if index >= 0 else (self.count() - 1 if self.layer_type is Labels else 0))
        self.blockSignals(blocked)
        self.currentIndexChanged.emit(self.currentIndex())

    def offer_none(self, text: str | None) -> None:
        """Offer a first entry ``text`` that chooses no layer (None: no such entry); chosen when no layer is."""
        if text != self._none_text:
            self._none_text = text
            self.refresh()

    def layer(self) -> Layer | None:
        if self._none_text is not None and self.currentIndex() == 0:
            return None
        name = self.currentText()
        return next((layer for layer in self.candidates() if layer.name == name), None)

    def select(self, layer: Layer) -> None:
        self.setCurrentIndex(self.findText(layer.name))
