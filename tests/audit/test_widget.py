"""The Audit dock widget in a real napari viewer (run under xvfb-run): the audit runs in a worker, the flagged
copy is listed with its source, and picking a pair shows both volumes side by side on one grid."""

from __future__ import annotations

import os
import shutil
import sys

import numpy as np
import pytest

if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
    pytest.skip("napari tests need a display: run under xvfb-run -a", allow_module_level=True)
pytest.importorskip("napari")

pytestmark = pytest.mark.napari


def test_audit_widget_lists_the_copy_and_shows_the_pair(audit_cohort, make_napari_viewer, qtbot, tmp_path):
    from napari_meddiff._napari.widgets.audit import PAIR_KEY, AuditWidget

    synthetic, training = tmp_path / "synthetic", tmp_path / "training"
    synthetic.mkdir()
    training.mkdir()
    copy, (_, source) = next((name, c) for name, c in audit_cohort["copies"].items() if c[0] == "mirror")
    for name in (copy, audit_cohort["new"][0]):
        shutil.copy(audit_cohort["synthetic"] / name, synthetic / name)
    others = sorted(p.name for p in audit_cohort["training"].glob("sub-*_T1w.nii.gz") if p.name != source)
    for name in [source, *others[:2]]:
        shutil.copy(audit_cohort["training"] / name, training / name)
    viewer = make_napari_viewer()
    widget = AuditWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Audit")
    widget.start()  # no folders yet: an error notification, nothing runs
    assert not widget.runner.running
    widget.edits["synthetic"].setText(str(synthetic))
    widget.edits["training"].setText(str(training))
    widget.edits["report"].setText(str(tmp_path / "report"))
    widget.start()
    assert widget.runner.running and not widget.run_button.isEnabled()
    qtbot.waitUntil(lambda: not widget.runner.running, timeout=180_000)
    assert widget.run_button.isEnabled()
    assert widget.pair_list.count() == 1  # the flagged copy only
    assert copy in widget.pair_list.item(0).text() and "FLAGGED" in widget.pair_list.item(0).text()
    assert "1 of 2 synthetic volumes flagged" in widget.summary.text()
    assert (tmp_path / "report" / "report.html").is_file()
    pair = [layer for layer in viewer.layers if PAIR_KEY in layer.metadata]
    assert [layer.name for layer in pair] == [f"training: {source}", f"synthetic: {copy}"]
    assert viewer.grid.enabled and pair[0].data.shape == pair[1].data.shape
    np.testing.assert_allclose(pair[0].affine.affine_matrix, pair[1].affine.affine_matrix)
    correlation = np.corrcoef(pair[0].data.ravel(), pair[1].data.ravel())[0, 1]
    assert correlation > 0.99  # the copy was mirrored: shown mirrored back, it lies on its source
    assert "left: synthetic (mirrored back)" in viewer.text_overlay.text
    widget.show_pair(0)  # picking again replaces the pair, it does not pile layers up
    assert len([layer for layer in viewer.layers if PAIR_KEY in layer.metadata]) == 2
