"""napari dock widget for a blinded reader study: one case at a time, every answer saved at once.

It shows the reader nothing about the truth: no accuracy, no summary (the organiser runs
``meddiff review summary STUDY --key KEY``, which needs the key kept outside the study folder).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from qtpy.QtCore import QEvent, Qt
from qtpy.QtGui import QKeyEvent, QKeySequence
from qtpy.QtWidgets import (
    QAbstractSpinBox,
    QApplication,
    QButtonGroup,
    QCheckBox,
    QFileDialog,
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QRadioButton,
    QShortcut,
    QTextEdit,
    QVBoxLayout,
    QWidget,
)

from napari_meddiff._napari.layers import install_orientation_letters, set_axis_letters
from napari_meddiff.errors import MeddiffError
from napari_meddiff.review.results import ARTEFACTS, CALLS, Answer, ResultsLog
from napari_meddiff.review.study import Study, display_array

if TYPE_CHECKING:
    import napari

ARTEFACT_KEYS = dict(zip(ARTEFACTS, "BNAIEO"))
CASE_WINDOW = (0.0, 1.0)  # the study's one display window: every case is mapped onto it (`_show`)
# the case array's axes (`display_array`): superior, posterior, patient left as the index grows
CASE_AXES = (("S", "I"), ("P", "A"), ("L", "R"))
SHORTCUT_HELP = (
    "Keys: R / S real / synthetic · 1-5 realism<br>B N A I E O artefacts · C comment (Esc leaves it)<br>"
    "Enter save + next · P previous"
)
TOOLTIP = (
    "<b>Blinded reader study</b><br>Choose the study folder and your name, then Start (resumes at your first "
    "unanswered case). Every answer is saved to disk the moment you go on.<br><br><b>Keyboard</b><br>"
    "R = real, S = synthetic<br>1-5 = realism (1 clearly artificial, 5 fully realistic)<br>"
    "B blur, N noise pattern, A anatomy implausible, I intensity, E seams/edges, O other (toggle)<br>"
    "C = type a comment, Esc = leave the comment box<br>Enter = save and next case, P = previous case<br>"
    "The image is shown as axial slices (radiological: patient right on screen left); "
    "scroll or use the slider to move through slices.<br><br>Results are analysed by the organiser only."
)
_TEXT_INPUTS = (QLineEdit, QAbstractSpinBox, QTextEdit, QPlainTextEdit)


class ReviewWidget(QWidget):
    """Reader-study panel: reader name, one blinded case at a time, forced choice and realism score."""

    def __init__(self, napari_viewer: napari.viewer.Viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.study: Study | None = None
        self.log: ResultsLog | None = None
        self.answers: dict[str, Answer] = {}
        self.index = 0
        self.layer = None
        self._canvas: _CanvasTakeover | None = None  # what the study hid while it holds the canvas
        self.setToolTip(TOOLTIP)
        self.setFocusPolicy(Qt.StrongFocus)
        self._build()
        self._shortcuts()
        self._set_enabled(False)

    # --- layout -------------------------------------------------------------------------------------

    def _build(self) -> None:
        root = QVBoxLayout(self)
        root.addWidget(self._study_box())
        self.progress_label = QLabel("No study open")
        self.progress_label.setStyleSheet("font-weight: bold")
        self.progress_bar = QProgressBar()
        self.progress_bar.setTextVisible(False)
        self.progress_bar.setMaximumHeight(8)
        root.addWidget(self.progress_label)
        root.addWidget(self.progress_bar)
        root.addWidget(self._call_box())
        root.addWidget(self._realism_box())
        root.addWidget(self._artefact_box())
        self.comment_edit = QLineEdit()
        self.comment_edit.setPlaceholderText("comment (C), optional")
        root.addWidget(self.comment_edit)
        root.addLayout(self._navigation_row())
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)
        root.addWidget(self.status_label)
        keys = QLabel(SHORTCUT_HELP)
        keys.setWordWrap(True)
        keys.setStyleSheet("color: gray")
        root.addWidget(keys)
        root.addStretch(1)
        for b in [*self.call_buttons.values(), *self.realism_buttons]:
            b.toggled.connect(self._update_buttons)

    def _study_box(self) -> QGroupBox:
        """Study folder (+ Browse), reader name and Start / resume."""
        setup = QGroupBox("Study")
        form = QFormLayout(setup)
        self.folder_edit = QLineEdit()
        self.folder_edit.setPlaceholderText("study folder")
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse)
        row = QHBoxLayout()
        row.addWidget(self.folder_edit, 1)
        row.addWidget(browse)
        form.addRow("Folder", row)
        self.reader_edit = QLineEdit()
        self.reader_edit.setPlaceholderText("your name or initials")
        form.addRow("Reader", self.reader_edit)
        self.start_button = QPushButton("Start / resume")
        self.start_button.clicked.connect(self.start)
        self.close_button = QPushButton("Close study")
        self.close_button.setToolTip("Answers are already saved; gives the viewer back as it was")
        self.close_button.clicked.connect(self.close_study)
        buttons = QHBoxLayout()
        buttons.addWidget(self.start_button, 1)
        buttons.addWidget(self.close_button)
        form.addRow(buttons)
        return setup

    def _call_box(self) -> QGroupBox:
        """The forced choice: real or synthetic."""
        box = QGroupBox("Real or synthetic?")
        self.call_group = QButtonGroup(self)
        self.call_buttons: dict[str, QRadioButton] = {}
        row = QHBoxLayout(box)
        for call in CALLS:
            button = QRadioButton(f"{call.capitalize()} ({call[0].upper()})")
            self.call_group.addButton(button)
            self.call_buttons[call] = button
            row.addWidget(button)
        return box

    def _realism_box(self) -> QGroupBox:
        """Realism 1-5, with what the ends of the scale mean under them."""
        box = QGroupBox("Realism")
        self.realism_group = QButtonGroup(self)
        self.realism_buttons: list[QRadioButton] = []
        grid = QGridLayout(box)
        for r in range(1, 6):
            button = QRadioButton(str(r))
            self.realism_group.addButton(button, r)
            self.realism_buttons.append(button)
            grid.addWidget(button, 0, r - 1)
        for text, col, align in (("clearly artificial", 0, Qt.AlignLeft), ("fully realistic", 3, Qt.AlignRight)):
            hint = QLabel(text)
            hint.setStyleSheet("color: gray")
            grid.addWidget(hint, 1, col, 1, 2, align)
        return box

    def _artefact_box(self) -> QGroupBox:
        """One check box per artefact, two columns."""
        box = QGroupBox("Artefacts (optional)")
        grid = QGridLayout(box)
        self.artefact_boxes: dict[str, QCheckBox] = {}
        for n, art in enumerate(ARTEFACTS):
            check = QCheckBox(f"{art[0].upper()}{art[1:]} ({ARTEFACT_KEYS[art]})")
            self.artefact_boxes[art] = check
            grid.addWidget(check, n // 2, n % 2)
        return box

    def _navigation_row(self) -> QHBoxLayout:
        """Previous, and Save && next (the default button)."""
        nav = QHBoxLayout()
        self.prev_button = QPushButton("◀ Previous (P)")
        self.next_button = QPushButton("Save && next (Enter) ▶")
        self.next_button.setDefault(True)
        nav.addWidget(self.prev_button)
        nav.addWidget(self.next_button, 1)
        self.prev_button.clicked.connect(self.previous_case)
        self.next_button.clicked.connect(self.next_case)
        return nav

    def _shortcuts(self) -> None:
        keys: list[tuple[list, Callable[[], None]]] = [
            ([Qt.Key_R], lambda: self._choose("real")),
            ([Qt.Key_S], lambda: self._choose("synthetic")),
            ([Qt.Key_P], self.previous_case),
            ([Qt.Key_C], self._focus_comment),
            ([Qt.Key_Return, Qt.Key_Enter, Qt.KeypadModifier | Qt.Key_Enter], self._enter),
        ]
        for r in range(1, 6):
            digit = getattr(Qt, f"Key_{r}")
            keys.append(([digit, Qt.KeypadModifier | digit], lambda r=r: self._realism(r)))
        for art, letter in ARTEFACT_KEYS.items():
            keys.append(([getattr(Qt, f"Key_{letter}")], lambda art=art: self._toggle(art)))
        self._shortcut_objects = []
        for seqs, action in keys:
            for seq in seqs:
                sc = QShortcut(_key_sequence(seq), self)
                sc.setContext(Qt.WindowShortcut)  # also works while the canvas has focus
                sc.activated.connect(lambda sc=sc, action=action: self._dispatch(sc, action))
                self._shortcut_objects.append(sc)
        esc = QShortcut(QKeySequence(Qt.Key_Escape), self.comment_edit)
        esc.setContext(Qt.WidgetShortcut)
        esc.activated.connect(self._focus_canvas)

    def _dispatch(self, shortcut: QShortcut, action: Callable[[], None]) -> None:
        """Run ``action``, unless a text field outside this panel has focus: then hand it the key."""
        focus = QApplication.focusWidget()
        if focus is not None and isinstance(focus, _TEXT_INPUTS) and not self.isAncestorOf(focus):
            key, mods = _key_and_modifiers(shortcut.key()[0])
            text = QKeySequence(key).toString().lower() if key < Qt.Key_Escape else ""
            for kind in (QKeyEvent.KeyPress, QKeyEvent.KeyRelease):
                QApplication.sendEvent(focus, QKeyEvent(kind, key, mods, text))
            return
        action()

    # --- actions --------------------------------------------------------------------------------------

    def _browse(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Choose the study folder", self.folder_edit.text())
        if folder:
            self.folder_edit.setText(folder)

    def start(self) -> None:
        """Open the study for this reader and show the first unanswered case."""
        try:
            study = Study.load(self.folder_edit.text().strip())
            log = ResultsLog(study.folder, self.reader_edit.text())
            answers = log.load()
        except MeddiffError as exc:
            self._message(str(exc), error=True)
            return
        self.study, self.log, self.answers = study, log, answers
        self._set_enabled(True)
        todo = self._first_unanswered()
        note = f" ({log.damaged} damaged line(s) in {log.path.name} skipped)" if log.damaged else ""
        if todo is None:
            self._show(0)
            self._message(f"All {len(study.cases)} cases answered; you may revise any of them.{note}")
        else:
            self._show(todo)
            verb = "Resuming" if answers else "Starting"
            self._message(f"{verb} as {log.reader!r}: saving to {log.path.name}{note}")

    def next_case(self) -> None:
        """Save the answer on screen (real/synthetic and realism required) and go to the next case."""
        if self.study is None or not self.save():
            return
        if self.index + 1 < len(self.study.cases):
            self._show(self.index + 1)
            return
        todo = self._first_unanswered()
        if todo is None:
            self.release_canvas()
            self._message(
                f"All {len(self.study.cases)} cases answered — thank you! The viewer is as it was before the study; "
                "Previous (P) goes back to revise an answer."
            )
        else:
            self._show(todo)
            self._message("Back to the first case you have not answered yet.")

    def previous_case(self) -> None:
        """Go back one case (a complete answer on screen is saved first)."""
        if self.study is None:
            return
        if self.current_answer() is not None and not self.save():
            return
        if self.index > 0:
            self._show(self.index - 1)

    def close_study(self) -> None:
        """Stop reading (every answer is already on disk) and give the viewer back as it was."""
        self.release_canvas()
        self.study, self.log, self.answers, self.index = None, None, {}, 0
        self._set_enabled(False)
        self.progress_label.setText("No study open")
        self.progress_bar.setValue(0)
        self._message("Study closed; your answers are saved.")

    def release_canvas(self) -> None:
        """Remove the case and give the viewer back: the layers the study hid are shown again, the plane,
        camera orientation and layer list as they were."""
        taken, self._canvas = self._canvas, None
        if taken is None:
            return
        with contextlib.suppress(RuntimeError, ValueError):  # the viewer may be closing
            taken.give_back(self.layer)
        self.layer = None

    def save(self) -> bool:
        """Append the answer on screen to the results file unless it is unchanged; False when incomplete."""
        if self.study is None or self.log is None:
            return False
        answer = self.current_answer()
        if answer is None:
            self._message("Choose real or synthetic (R/S) and a realism score (1-5) first.", error=True)
            return False
        cid = answer.case_id
        if not answer.same_answer(self.answers.get(cid)):
            try:
                self.answers[cid] = self.log.append(answer)
            except MeddiffError as exc:
                self._message(str(exc), error=True)
                return False
            self._update_progress()
        self._message("")
        return True

    def current_answer(self) -> Answer | None:
        """The answer on screen, or None while the forced choice or realism is missing."""
        if self.study is None or self.log is None:
            return None
        call = next((c for c, b in self.call_buttons.items() if b.isChecked()), None)
        realism = self.realism_group.checkedId()
        if call is None or realism < 1:
            return None
        arts = tuple(a for a, cb in self.artefact_boxes.items() if cb.isChecked())
        cid = self.study.cases[self.index].case_id
        return Answer(cid, self.log.reader, call, realism, arts, self.comment_edit.text().strip())

    # --- helpers --------------------------------------------------------------------------------------

    def _first_unanswered(self) -> int | None:
        assert self.study is not None
        return next((i for i, c in enumerate(self.study.cases) if c.case_id not in self.answers), None)

    def _show(self, index: int) -> None:
        """Display case ``index`` (replacing the previous one) and fill the form with its saved answer."""
        assert self.study is not None
        case = self.study.cases[index]
        try:
            data, scale = display_array(self.study.read(case))
        except MeddiffError as exc:
            self._message(f"{case.case_id}: {exc}", error=True)
            return
        lo, hi = case.contrast_limits
        data = ((data.astype(np.float32) - lo) / np.float32(hi - lo)).astype(np.float32)
        ids = set(self.study.ids)  # the previous case, also one left behind by an earlier widget
        for old in [la for la in self.viewer.layers if la is self.layer or la.name in ids]:
            self.viewer.layers.remove(old)
        if self._canvas is None:
            self._canvas = _CanvasTakeover(self.viewer)
        self.index = index
        # intensities are shown on the case's display window mapped to 0..1, so the value read-out and the
        # contrast slider carry no scanner units that could tell the sources apart
        with self._canvas.adding():
            self.layer = self.viewer.add_image(
                data,
                name=case.case_id,
                scale=scale,
                contrast_limits=CASE_WINDOW,
                colormap="gray",
                units=("mm",) * data.ndim,  # as the scans' layers: no "inconsistent units" warning
                metadata={},
            )
        set_axis_letters(self.layer, CASE_AXES if data.ndim == 3 else CASE_AXES[1:])
        self._show_case_alone()
        self._fill(self.answers.get(case.case_id))
        self._update_progress()
        self._focus_canvas()

    def _show_case_alone(self) -> None:
        """The case alone, axial (superior along its first axis), radiological, in the study's one display
        window, the camera fitted to it; letters on the canvas edges."""
        layer, viewer = self.layer, self.viewer
        assert layer is not None and self._canvas is not None
        self._canvas.hide_others(layer)
        layer.visible, layer.opacity, layer.contrast_limits = True, 1.0, CASE_WINDOW
        dims = viewer.dims
        dims.ndisplay = 2
        dims.order = tuple(range(dims.ndim))  # the case's axes are the last world axes: slice along its first
        _camera(viewer).orientation2d = ("down", "right")  # the array is stored radiological (`display_array`)
        if layer.ndim == 3:
            first = dims.ndim - 3
            labels = list(dims.axis_labels)
            labels[first:] = ["axial slice", "A-P", "R-L"]
            dims.axis_labels = tuple(labels)
            # the middle slice in world units: hidden layers may widen the slider's range beyond the case's
            middle = layer.data.shape[0] // 2
            dims.set_point(first, float(middle * layer.scale[0] + layer.translate[0]))
            for axis in range(first):  # extra axes of hidden layers: their first index
                dims.set_current_step(axis, 0)
        viewer.reset_view(layers=[layer])
        install_orientation_letters(viewer)
        self.viewer.layers.selection.active = layer

    def event(self, event: QEvent) -> bool:  # noqa: D401 - Qt override
        """Removed from the viewer (napari un-parents a dock widget it removes): give the viewer back."""
        if event.type() == QEvent.ParentChange and self.parent() is None and self._canvas is not None:
            self.release_canvas()
        return super().event(event)

    def closeEvent(self, event) -> None:  # noqa: N802 - Qt override
        self.release_canvas()
        super().closeEvent(event)

    def _fill(self, answer: Answer | None) -> None:
        for group in (self.call_group, self.realism_group):
            group.setExclusive(False)
            for b in group.buttons():
                b.setChecked(False)
            group.setExclusive(True)
        for art, cb in self.artefact_boxes.items():
            cb.setChecked(answer is not None and art in answer.artefacts)
        self.comment_edit.setText(answer.comment if answer else "")
        if answer is not None:
            self.call_buttons[answer.real_or_synthetic].setChecked(True)
            self.realism_buttons[answer.realism - 1].setChecked(True)
        self._update_buttons()

    def _update_progress(self) -> None:
        assert self.study is not None
        n, done = len(self.study.cases), sum(c in self.answers for c in self.study.ids)
        cid = self.study.cases[self.index].case_id
        state = " · answered" if cid in self.answers else ""
        self.progress_label.setText(f"Answered {done}/{n}  ·  case {self.index + 1} of {n}{state}")
        self.progress_bar.setRange(0, n)
        self.progress_bar.setValue(done)

    def _update_buttons(self, *_: object) -> None:
        self.next_button.setEnabled(self.current_answer() is not None)
        self.prev_button.setEnabled(self.study is not None and self.index > 0)

    def _set_enabled(self, on: bool) -> None:
        for w in [*self.call_buttons.values(), *self.realism_buttons, *self.artefact_boxes.values(), self.comment_edit]:
            w.setEnabled(on)
        self.close_button.setEnabled(on)
        self._update_buttons()

    def _message(self, text: str, error: bool = False) -> None:
        self.status_label.setStyleSheet("color: #e04040" if error else "")
        self.status_label.setText(text)

    def _choose(self, call: str) -> None:
        if self.study is not None:
            self.call_buttons[call].setChecked(True)

    def _realism(self, r: int) -> None:
        if self.study is not None:
            self.realism_buttons[r - 1].setChecked(True)

    def _toggle(self, art: str) -> None:
        if self.study is not None:
            self.artefact_boxes[art].toggle()

    def _focus_canvas(self) -> None:
        """Give the keyboard to the image (napari's arrow keys move through slices); else to this panel."""
        qt_viewer = getattr(self.viewer.window, "_qt_viewer", None)  # private napari API, used defensively
        native = getattr(getattr(qt_viewer, "canvas", None), "native", None)
        if isinstance(native, QWidget) and native.isVisible():
            native.setFocus()
        else:
            self.setFocus()

    def _focus_comment(self) -> None:
        if self.study is not None:
            self.comment_edit.setFocus()

    def _enter(self) -> None:
        if QApplication.focusWidget() in (self.folder_edit, self.reader_edit):
            self.start()
        else:
            self.next_case()


class _CanvasTakeover:
    """While a study shows its cases, nothing else is visible: every other layer hidden (and any layer added
    meanwhile), the layer list (its names could hint at a source) hidden. `give_back` restores what was."""

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        self.viewer = viewer
        self.hidden: list = []  # layers that were visible: visible again on give_back
        self._adding = False
        dims, camera = viewer.dims, _camera(viewer)
        self.view = (dims.ndisplay, tuple(dims.order), tuple(dims.axis_labels), tuple(camera.orientation2d))
        self.point = tuple(dims.point)
        self.layer_list = _layer_list_dock(viewer)
        self.layer_list_was_visible = self.layer_list is not None and self.layer_list.isVisible()
        if self.layer_list is not None:
            self.layer_list.setVisible(False)
        viewer.layers.events.inserted.connect(self._on_inserted)

    @contextlib.contextmanager
    def adding(self):
        """The study's own case is being added: not hidden."""
        self._adding = True
        try:
            yield
        finally:
            self._adding = False

    def hide_others(self, case) -> None:
        for layer in list(self.viewer.layers):
            if layer is not case and layer.visible:
                layer.visible = False
                self.hidden.append(layer)

    def _on_inserted(self, event) -> None:
        layer = event.value
        if not self._adding and layer.visible:
            layer.visible = False
            self.hidden.append(layer)

    def give_back(self, case) -> None:
        viewer = self.viewer
        viewer.layers.events.inserted.disconnect(self._on_inserted)
        if case is not None and case in viewer.layers:
            viewer.layers.remove(case)
        for layer in self.hidden:
            if layer in viewer.layers:
                layer.visible = True
        ndisplay, order, labels, orientation = self.view
        dims = viewer.dims
        dims.ndisplay = ndisplay
        if len(order) == dims.ndim:
            dims.order = order
        if len(labels) == dims.ndim:
            dims.axis_labels = labels
        if len(self.point) == dims.ndim:  # the slice each axis was on
            for axis, value in enumerate(self.point):
                dims.set_point(axis, value)
        _camera(viewer).orientation2d = orientation
        if self.layer_list is not None and self.layer_list_was_visible:
            self.layer_list.setVisible(True)
        if len(viewer.layers):
            viewer.reset_view()


def _camera(viewer: napari.viewer.Viewer):
    return viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera


def _layer_list_dock(viewer: napari.viewer.Viewer) -> QWidget | None:
    """napari's layer list dock (private API, used defensively: None where it is not found)."""
    qt_viewer = getattr(getattr(viewer, "window", None), "_qt_viewer", None)
    dock = getattr(qt_viewer, "dockLayerList", None)
    return dock if isinstance(dock, QWidget) else None


def _key_sequence(seq) -> QKeySequence:
    """A key sequence from a key or key + modifier: an int under Qt 5, a `Qt.Key` or QKeyCombination under Qt 6."""
    try:
        return QKeySequence(seq)
    except TypeError:
        return QKeySequence(int(seq))


def _key_and_modifiers(combo) -> tuple[int, Qt.KeyboardModifier]:
    """The key code and modifiers of a key sequence's first key (QKeyCombination under Qt 6, an int under Qt 5)."""
    if hasattr(combo, "keyboardModifiers"):
        key = combo.key()
        return int(getattr(key, "value", key)), combo.keyboardModifiers()
    code = int(combo)
    mask = int(Qt.KeyboardModifierMask)
    return code & ~mask, Qt.KeyboardModifiers(code & mask)
