"""napari dock widget for a blinded reader study: one case at a time, every answer saved at once.

It shows the reader nothing about the truth: no accuracy, no summary (the organiser runs
``meddiff review summary STUDY --key KEY``, which needs the key kept outside the study folder).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from qtpy.QtCore import Qt
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

from napari_meddiff.errors import MeddiffError
from napari_meddiff.review.results import ARTEFACTS, CALLS, Answer, ResultsLog
from napari_meddiff.review.study import Study, display_array

if TYPE_CHECKING:
    import napari

ARTEFACT_KEYS = dict(zip(ARTEFACTS, "BNAIEO"))
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
        form.addRow(self.start_button)
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
                sc = QShortcut(QKeySequence(int(seq)), self)
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
            seq = shortcut.key()[0]
            key = int(seq) & ~int(Qt.KeyboardModifierMask)
            mods = Qt.KeyboardModifiers(int(seq) & int(Qt.KeyboardModifierMask))
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
            self._message(f"All {len(self.study.cases)} cases answered — thank you! You may still revise answers.")
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
        self.index = index
        # intensities are shown on the case's display window mapped to 0..1, so the value read-out and the
        # contrast slider carry no scanner units that could tell the sources apart
        self.layer = self.viewer.add_image(
            data, name=case.case_id, scale=scale, contrast_limits=(0.0, 1.0), colormap="gray", metadata={}
        )
        dims = self.viewer.dims
        dims.ndisplay = 2
        dims.order = tuple(range(dims.ndim))
        if data.ndim == 3 and dims.ndim == 3:
            dims.axis_labels = ("axial slice", "A-P", "R-L")
            dims.set_current_step(0, data.shape[0] // 2)
        self.viewer.reset_view()
        self._fill(self.answers.get(case.case_id))
        self._update_progress()
        self._focus_canvas()

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
