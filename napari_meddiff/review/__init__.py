"""Blinded reader study (visual Turing test): set-up, append-only results, summary, napari widget.

The Qt widget lives in ``napari_meddiff._napari.widgets.review`` and is not imported here, so the core works
without a display.
"""

from __future__ import annotations

from napari_meddiff.review.results import ARTEFACTS, CALLS, Answer, ResultsLog, read_answers, scan_answers
from napari_meddiff.review.study import Case, Study, create_study
from napari_meddiff.review.summary import summarize

__all__ = [
    "ARTEFACTS",
    "CALLS",
    "Answer",
    "Case",
    "ResultsLog",
    "Study",
    "create_study",
    "read_answers",
    "scan_answers",
    "summarize",
]
