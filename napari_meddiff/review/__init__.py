"""Blinded reader study (visual Turing test): set-up, append-only results, summary, napari widget.

The Qt widget lives in ``napari_meddiff.review.widget`` and is not imported here, so the core works
without a display.
"""

from __future__ import annotations

from .results import ARTEFACTS, CALLS, Answer, ResultsLog, read_answers, scan_answers
from .study import Case, Study, create_study
from .summary import summarize

__all__ = ["ARTEFACTS", "CALLS", "Answer", "Case", "ResultsLog", "Study", "create_study", "read_answers", "scan_answers",
           "summarize"]
