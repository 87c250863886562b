"""Reader answers: one JSON line per answer, appended, flushed and fsynced the moment it is given.

``STUDY/results-<reader>.jsonl`` is only ever appended to. Re-answering a case appends a new record and
the latest record per case wins when reading. A line cut short by a killed process is skipped on read
(and terminated before the next append, so it cannot swallow the next record).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from napari_meddiff.errors import MeddiffError

CALLS = ("real", "synthetic")
ARTEFACTS = ("blur", "noise pattern", "anatomy implausible", "intensity", "seams/edges", "other")
RESULTS_PREFIX = "results-"
RESULTS_SUFFIX = ".jsonl"


@dataclasses.dataclass(frozen=True)
class Answer:
    """One reader's answer for one case."""

    case_id: str
    reader: str
    real_or_synthetic: str
    realism: int
    artefacts: tuple[str, ...] = ()
    comment: str = ""
    timestamp: str = ""

    def __post_init__(self) -> None:
        if self.real_or_synthetic not in CALLS:
            raise MeddiffError(f"real_or_synthetic must be one of {CALLS}, not {self.real_or_synthetic!r}")
        if isinstance(self.realism, bool) or not isinstance(self.realism, int) or not 1 <= self.realism <= 5:
            raise MeddiffError(f"realism must be an integer 1-5, not {self.realism!r}")
        unknown = set(self.artefacts) - set(ARTEFACTS)
        if unknown:
            raise MeddiffError(f"unknown artefacts {sorted(unknown)}; choose from {ARTEFACTS}")
        object.__setattr__(self, "artefacts", tuple(a for a in ARTEFACTS if a in self.artefacts))

    def same_answer(self, other: Answer | None) -> bool:
        """True when ``other`` says the same thing (ignoring time and reader)."""
        return other is not None and (self.real_or_synthetic, self.realism, self.artefacts, self.comment) == (
            other.real_or_synthetic,
            other.realism,
            other.artefacts,
            other.comment,
        )

    def to_record(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "artefacts": list(self.artefacts)}

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> Answer:
        return cls(
            str(rec["case_id"]),
            str(rec["reader"]),
            rec["real_or_synthetic"],
            rec["realism"],
            tuple(rec.get("artefacts") or ()),
            str(rec.get("comment") or ""),
            str(rec.get("timestamp", "")),
        )


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def sanitise_reader(name: str) -> str:
    """A file-name-safe, case-folded reader id: letters, digits, '.', '_' and '-' only."""
    clean = re.sub(r"[^a-z0-9._-]+", "_", name.strip().lower()).strip("._-")[:64]
    if not clean:
        raise MeddiffError("enter a reader name (letters or digits)")
    return clean


def results_path(study: str | os.PathLike, reader: str) -> Path:
    return Path(study) / f"{RESULTS_PREFIX}{sanitise_reader(reader)}{RESULTS_SUFFIX}"


@dataclasses.dataclass
class AnswerLines:
    """A results file as read: every answer with its line number (1-based), and the damaged lines."""

    answers: list[tuple[int, Answer]]
    damaged_lines: list[int]


def scan_answers(path: str | os.PathLike) -> AnswerLines:
    """All answers in file order with their line numbers; lines that are not an answer are listed as damaged."""
    path = Path(path)
    if not path.exists():
        return AnswerLines([], [])
    answers, damaged = [], []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                answers.append((number, Answer.from_record(json.loads(raw.decode("utf-8")))))
            except (ValueError, KeyError, TypeError, AttributeError, MeddiffError):
                damaged.append(number)
    return AnswerLines(answers, damaged)


def read_answers(path: str | os.PathLike) -> tuple[list[Answer], int]:
    """All answers in file order, and the number of damaged lines skipped (e.g. a truncated last line)."""
    lines = scan_answers(path)
    return [a for _, a in lines.answers], len(lines.damaged_lines)


def latest(answers: Iterable[Answer]) -> dict[str, Answer]:
    """The latest answer per case (later records replace earlier ones)."""
    out: dict[str, Answer] = {}
    for a in answers:
        out[a.case_id] = a
    return out


class ResultsLog:
    """The append-only answer file of one reader in one study."""

    def __init__(self, study: str | os.PathLike, reader: str) -> None:
        self.reader = reader.strip()
        self.path = results_path(study, reader)
        self.damaged = 0

    def load(self) -> dict[str, Answer]:
        """Latest answer per case id."""
        answers, self.damaged = read_answers(self.path)
        return latest(answers)

    def append(self, answer: Answer) -> Answer:
        """Write ``answer`` (timestamped now if it has none) durably before returning it."""
        if not answer.timestamp:
            answer = dataclasses.replace(answer, timestamp=now_utc())
        line = (json.dumps(answer.to_record(), ensure_ascii=False) + "\n").encode("utf-8")
        created = not self.path.exists()
        try:
            with open(self.path, "ab") as f:
                if not created and f.tell() > 0 and not _ends_with_newline(self.path):
                    line = b"\n" + line  # close a line cut short by a killed process
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            if created:
                _fsync_dir(self.path.parent)
        except OSError as exc:
            raise MeddiffError(f"cannot save the answer to {self.path}: {exc.strerror}") from None
        return answer


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
