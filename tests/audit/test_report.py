"""The report: audit.json holds what the issue lists, report.html is one self-contained page with its figures,
nothing is overwritten unless asked, and ``md.audit`` is callable however the package was imported."""

from __future__ import annotations

import base64
import importlib
import io
import json
import re
import shutil
from pathlib import Path

import pytest

from napari_meddiff.errors import MeddiffError


def test_audit_json_holds_the_decisions_and_the_blocks(audited):
    doc = json.loads((audited["out"] / "audit.json").read_text())
    assert len(doc["synthetic"]) == len(audited["copies"]) + len(audited["new"])
    for row in doc["synthetic"]:
        assert set(row) >= {"file", "nearest_training", "similarity", "memorized", "mirrored"}
        assert Path(row["file"]).parent == audited["synthetic"]
        assert Path(row["nearest_training"]).parent == audited["training"]
    assert doc["memorization"]["flagged"] == len(audited["copies"])
    assert set(doc["diversity"]) >= {"synthetic_ms_ssim", "real_ms_ssim"}
    assert set(doc["two_sample"]) >= {"accuracy", "ci95", "p_value"}
    assert doc["thresholds"]["memorization"]["source"] == "real"
    assert doc["inputs"]["training"]["volumes"] == 5  # the cohort's label maps were left out


def test_report_html_is_self_contained_with_readable_figures(audited):
    from PIL import Image

    page = (audited["out"] / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert not re.search(r"<script|<link|src=\"(?!data:)", page)
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 4  # similarities, flagged pairs, diversity, intensities
    sizes = [Image.open(io.BytesIO(base64.b64decode(data))).size for data in images]
    assert all(w > 300 and h > 100 for w, h in sizes), sizes
    assert f"{len(audited['copies'])} of {len(audited['copies']) + len(audited['new'])} flagged" in page
    for name in audited["copies"]:
        assert name in page


def test_an_existing_report_is_kept_unless_asked(audited, tmp_path):
    import napari_meddiff as md
    from napari_meddiff.audit.report import write_report

    before = (audited["out"] / "audit.json").read_bytes()
    with pytest.raises(MeddiffError, match="exists; not overwriting"):
        md.audit(audited["synthetic"], audited["training"], out=audited["out"])  # refused before any reading
    assert (audited["out"] / "audit.json").read_bytes() == before
    copy = tmp_path / "again"
    shutil.copytree(audited["out"], copy)
    with pytest.raises(MeddiffError, match="exists; not overwriting"):
        write_report(audited["result"], copy)
    write_report(audited["result"], copy, overwrite=True)
    assert json.loads((copy / "audit.json").read_text()) == json.loads(before)


def test_md_audit_is_callable_whichever_way_it_was_imported():
    import napari_meddiff as md

    importlib.import_module("napari_meddiff.audit.report")
    assert callable(md.audit) and callable(importlib.import_module("napari_meddiff.audit"))
    with pytest.raises(MeddiffError, match="not a folder"):
        md.audit("/nonexistent/synthetic", "/nonexistent/training")
