"""Condition inputs for conditional models: one slider + value box per named condition, and the guidance
scale where the model was trained with condition dropout (shared by the Generate and Inpaint widgets)."""

from __future__ import annotations

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QDoubleSpinBox, QFormLayout, QHBoxLayout, QLabel, QSlider, QWidget

from napari_meddiff._napari.widgets.controls import ModelInfo
from napari_meddiff.models import ConditionSpec

SLIDER_STEPS = 1000


class ConditionRow(QWidget):
    """A slider and a spin box, kept in step, for one named condition, and what the value stands for in the
    model's unit (e.g. "1790 ml") where it declares one. ``whole``: the value is a class label (whole numbers)."""

    def __init__(self, spec: ConditionSpec, parent: QWidget | None = None, *, whole: bool = False) -> None:
        super().__init__(parent)
        self.spec = spec
        self.steps = int(spec.high - spec.low) if whole else SLIDER_STEPS  # a class label: one slider step each
        self.slider = QSlider(Qt.Horizontal)
        self.slider.setRange(0, max(self.steps, 1))
        self.box = QDoubleSpinBox()
        self.box.setRange(spec.low, spec.high)
        self.box.setDecimals(0 if whole else 3)
        self.box.setSingleStep(1.0 if whole else (spec.high - spec.low) / 100)
        tip = f"{spec.description or spec.name}: {spec.low:g} to {spec.high:g} (default {spec.default:g})"
        self.slider.setToolTip(tip)
        self.box.setToolTip(tip)
        self.unit = QLabel("")
        self.unit.setToolTip(tip)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.slider, 1)
        layout.addWidget(self.box)
        if spec.in_units(spec.low) is not None:
            widest = max(abs(spec.in_units(spec.low)), abs(spec.in_units(spec.high)))
            self.unit.setMinimumWidth(self.unit.fontMetrics().horizontalAdvance(self._unit_text(-widest)))
            layout.addWidget(self.unit)
        self.slider.valueChanged.connect(self._from_slider)
        self.box.valueChanged.connect(self._from_box)
        self.box.valueChanged.connect(self._show_unit)
        self.set_value(spec.default)

    def _from_slider(self, position: int) -> None:
        value = self.spec.low + (self.spec.high - self.spec.low) * position / max(self.steps, 1)
        blocked = self.box.blockSignals(True)
        self.box.setValue(value)
        self.box.blockSignals(blocked)
        self._show_unit(self.box.value())

    def _from_box(self, value: float) -> None:
        span = self.spec.high - self.spec.low
        blocked = self.slider.blockSignals(True)
        self.slider.setValue(round((value - self.spec.low) / span * self.steps) if span else 0)
        self.slider.blockSignals(blocked)

    def _unit_text(self, physical: float) -> str:
        digits = 0 if abs(self.spec.unit_high - self.spec.unit_low) >= 50 else 1
        return f"≈ {physical:.{digits}f} {self.spec.unit}".rstrip()

    def _show_unit(self, value: float) -> None:
        physical = self.spec.in_units(value)
        self.unit.setText("" if physical is None else self._unit_text(physical))

    def set_value(self, value: float) -> None:
        self.box.setValue(value)
        self._from_box(self.box.value())
        self._show_unit(self.box.value())

    def value(self) -> float:
        return float(self.box.value())


class ConditionControls(QWidget):
    """One `ConditionRow` per condition the selected model declares, and its guidance scale (hidden for a
    model without conditions; the scale only for models trained with condition dropout)."""

    def __init__(self, parent: QWidget | None = None, *, guidance: bool = True) -> None:
        super().__init__(parent)
        self.offers_guidance = guidance  # False where the task has no guidance (inpainting)
        self.form = QFormLayout(self)
        self.form.setContentsMargins(0, 0, 0, 0)
        self.rows: dict[str, ConditionRow] = {}
        self.guidance: QDoubleSpinBox | None = None
        self.setVisible(False)

    def set_model(self, info: ModelInfo | None) -> None:
        while self.form.rowCount():
            self.form.removeRow(0)  # deletes the row's widgets
        self.rows, self.guidance = {}, None
        specs = info.conditions if info is not None else []
        for spec in specs:
            row = ConditionRow(spec, whole=info.conditioning.class_labels and spec is specs[0])
            self.rows[spec.name] = row
            self.form.addRow(spec.label, row)
        if specs and self.offers_guidance and info.conditioning.null is not None:
            self.guidance = QDoubleSpinBox()
            self.guidance.setRange(0.0, 100.0)  # as a model's default may be (the schema's bound)
            self.guidance.setSingleStep(0.5)
            self.guidance.setValue(info.guidance_default)
            self.guidance.setToolTip("Classifier-free guidance scale (1: none)")
            self.form.addRow("Guidance", self.guidance)
        self.setVisible(bool(specs))

    def values(self) -> dict[str, float]:
        return {name: row.value() for name, row in self.rows.items()}

    def guidance_scale(self) -> float:
        return float(self.guidance.value()) if self.guidance is not None else 1.0
