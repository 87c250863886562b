"""Reader study widget in a real napari viewer: buttons, keyboard shortcuts, kill and resume, nothing revealed."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from qtpy import sip
from qtpy.QtCore import QPoint, Qt
from qtpy.QtWidgets import QAbstractButton, QApplication, QLabel, QLineEdit, QPlainTextEdit

from napari_meddiff._napari.widgets.review import ReviewWidget
from napari_meddiff.review.results import ResultsLog, read_answers
from napari_meddiff.review.study import create_study, read_key
from napari_meddiff.review.summary import summarize

pytestmark = pytest.mark.napari


@pytest.fixture
def study(tmp_path):
    rng = np.random.default_rng(0)
    for src in ("real", "synthetic"):
        (tmp_path / src).mkdir()
        for i in range(3):
            arr = rng.random((10, 12, 8)) * (1000 if src == "real" else 1)
            nib.save(
                nib.Nifti1Image(arr.astype(np.float32), np.diag([1.0, 1.0, 2.0, 1.0])),
                str(tmp_path / src / f"{src}{i}.nii.gz"),
            )
    return create_study(
        tmp_path / "real", tmp_path / "synthetic", tmp_path / "study", key=tmp_path / "key.json", seed=4
    )


def _texts(widget):
    """Every piece of text the panel shows or holds."""
    kinds = (QLabel, QAbstractButton, QLineEdit, QPlainTextEdit)
    out = [widget.toolTip()]
    for w in widget.findChildren(kinds):
        out += [w.toolTip(), w.toPlainText() if isinstance(w, QPlainTextEdit) else w.text()]
    return " ".join(out).lower()


def _dock(viewer, qtbot):
    widget = ReviewWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Reader study")
    window = viewer.window._qt_window
    qtbot.waitUntil(widget.isVisible, timeout=3000)
    window.activateWindow()
    QApplication.setActiveWindow(window)
    qtbot.waitUntil(lambda: QApplication.activeWindow() is window, timeout=3000)
    return widget


def _start(widget, qtbot, study, reader):
    widget.folder_edit.setText(str(study.folder))
    widget.reader_edit.setText(reader)
    qtbot.mouseClick(widget.start_button, Qt.LeftButton)


def _tick(qtbot, button):
    """Click a radio button / check box on its indicator (its widget may be wider than its hit area)."""
    qtbot.mouseClick(button, Qt.LeftButton, pos=QPoint(8, button.height() // 2))


def _keys(qtbot, target, *keys):
    for k in keys:
        qtbot.keyClick(target, k)


def test_whole_study_with_kill_and_resume(make_napari_viewer, qtbot, study):
    viewer = make_napari_viewer(show=True)
    canvas = viewer.window._qt_viewer.canvas.native
    w = _dock(viewer, qtbot)
    assert "Enter" in w.toolTip() and "R = real" in w.toolTip()
    _start(w, qtbot, study, "Ann")
    ids = study.ids
    assert [layer.name for layer in viewer.layers] == [ids[0]]
    layer = viewer.layers[0]
    assert layer.metadata == {} and tuple(layer.contrast_limits) == (0.0, 1.0)
    assert viewer.dims.ndisplay == 2 and viewer.dims.current_step[0] == layer.data.shape[0] // 2
    assert layer.data.shape == (8, 12, 10) and tuple(layer.scale) == (2.0, 1.0, 1.0)  # axial slices
    assert "Answered 0/6" in w.progress_label.text()

    # the forced choice and realism are required
    assert not w.next_button.isEnabled()
    _keys(qtbot, canvas, Qt.Key_Return)
    assert w.index == 0 and "first" in w.status_label.text()
    assert not ResultsLog(study.folder, "Ann").path.exists()

    # case 1 with the mouse
    _tick(qtbot, w.call_buttons["real"])
    _tick(qtbot, w.realism_buttons[3])
    _tick(qtbot, w.artefact_boxes["blur"])
    assert w.artefact_boxes["blur"].isChecked()
    qtbot.keyClicks(w.comment_edit, "looks fine")
    assert w.next_button.isEnabled()
    qtbot.mouseClick(w.next_button, Qt.LeftButton)
    assert w.index == 1 and viewer.layers[0].name == ids[1] and len(viewer.layers) == 1
    assert w.current_answer() is None and w.comment_edit.text() == ""  # fresh form

    # case 2 from the keyboard, with the image canvas focused: S, 2, N (noise), A (anatomy), C comment, Enter
    _keys(qtbot, canvas, Qt.Key_S, Qt.Key_2, Qt.Key_N, Qt.Key_A, Qt.Key_A, Qt.Key_A, Qt.Key_C)
    assert w.comment_edit.hasFocus()
    qtbot.keyClicks(w.comment_edit, "seams at rim")  # letters go into the text, not to the shortcuts
    assert w.call_buttons["synthetic"].isChecked() and w.realism_buttons[1].isChecked()
    _keys(qtbot, w.comment_edit, Qt.Key_Return)
    assert w.index == 2 and canvas.hasFocus()  # back on the image: arrow keys move through slices

    # case 3, keypad digit; then a half-answered case 4 is on screen when the process "dies"
    _keys(qtbot, canvas, Qt.Key_R, Qt.Key_5)
    qtbot.keyClick(canvas, Qt.Key_Enter, Qt.KeypadModifier)
    assert w.index == 3 and "Answered 3/6" in w.progress_label.text()
    _keys(qtbot, canvas, Qt.Key_S)
    before = ResultsLog(study.folder, "Ann").path.read_bytes()
    viewer.window._qt_window.removeDockWidget(w.parentWidget())
    sip.delete(w)  # no close event, no clean shutdown
    del w

    saved = ResultsLog(study.folder, "ann").load()
    assert list(saved) == ids[:3]
    assert saved[ids[0]].artefacts == ("blur",) and saved[ids[0]].comment == "looks fine"
    assert saved[ids[1]].artefacts == ("noise pattern", "anatomy implausible")
    assert saved[ids[1]].comment == "seams at rim"
    assert saved[ids[2]].real_or_synthetic == "real" and saved[ids[2]].realism == 5

    w2 = _dock(viewer, qtbot)
    _start(w2, qtbot, study, "ann")  # same reader, different spelling -> same file
    assert w2.index == 3 and [layer.name for layer in viewer.layers] == [ids[3]]
    assert "Resuming" in w2.status_label.text() and "Answered 3/6" in w2.progress_label.text()
    assert ResultsLog(study.folder, "Ann").path.read_bytes() == before  # resuming wrote nothing

    # previous shows the saved answer; changing it appends one record, leaving unchanged saves none
    qtbot.mouseClick(w2.prev_button, Qt.LeftButton)
    assert w2.index == 2 and w2.call_buttons["real"].isChecked() and w2.realism_buttons[4].isChecked()
    _keys(qtbot, canvas, Qt.Key_3, Qt.Key_Return)
    for _ in range(3):
        _keys(qtbot, canvas, Qt.Key_S, Qt.Key_1, Qt.Key_Return)
    assert "All 6 cases answered" in w2.status_label.text()
    assert "Answered 6/6" in w2.progress_label.text()

    answers, damaged = read_answers(ResultsLog(study.folder, "Ann").path)
    assert damaged == 0 and len(answers) == 7  # 6 cases + 1 revision, nothing duplicated
    assert [a.case_id for a in answers] == ids[:3] + [ids[2]] + ids[3:]
    latest = ResultsLog(study.folder, "Ann").load()
    assert set(latest) == set(ids) and latest[ids[2]].realism == 3

    # a second reader keeps a separate file; nothing on the panel tells a reader how they are doing
    _start(w2, qtbot, study, "Ben")
    assert w2.index == 0 and "Starting" in w2.status_label.text()
    for _ in range(6):
        _keys(qtbot, canvas, Qt.Key_R, Qt.Key_4, Qt.Key_Return)
    assert not hasattr(w2, "summary_button") and not hasattr(w2, "run_summary")
    text = _texts(w2)
    for word in ("summary", "accuracy", "correct", "%", "kappa"):
        assert word not in text, word
    assert not any(study.folder.glob("*summary*"))
    # the organiser, with the key kept outside the study folder, gets the numbers
    key = read_key(study.folder.parent / "key.json", study)
    summary = summarize(study.folder, study.folder.parent / "key.json")
    n_real = sum(v["source"] == "real" for v in key.values())
    assert summary["readers"]["ben"]["correct"] == n_real  # Ben called everything real


def test_errors_and_enter_in_setup_fields(make_napari_viewer, qtbot, study, tmp_path):
    viewer = make_napari_viewer(show=True)
    w = _dock(viewer, qtbot)
    w.folder_edit.setText(str(tmp_path / "nowhere"))
    w.reader_edit.setText("Ann")
    qtbot.mouseClick(w.start_button, Qt.LeftButton)
    assert "not a review study" in w.status_label.text() and w.study is None
    _keys(qtbot, viewer.window._qt_viewer.canvas.native, Qt.Key_R, Qt.Key_Return)  # harmless before a start
    assert not w.call_buttons["real"].isChecked() and len(viewer.layers) == 0
    w.folder_edit.setText(str(study.folder))
    w.reader_edit.setText("   ")
    qtbot.mouseClick(w.start_button, Qt.LeftButton)
    assert "reader name" in w.status_label.text()
    w.reader_edit.setText("Cy")
    w.reader_edit.setFocus()
    _keys(qtbot, w.reader_edit, Qt.Key_Return)  # Enter in the reader field starts the study
    assert w.study is not None and len(viewer.layers) == 1
