"""Set up a blinded study: real and synthetic scans made alike by one rule, under random ids; the key kept apart.

Layout::

    STUDY/cases.json                 study id, case order, file names, one display window for all
    STUDY/cases/case-XXXXXXXX.nii.gz every case on one grid and field of view, uint8 in [0, 1], same headers
    STUDY/results-<reader>.jsonl     (written while reading, see ``results.py``)
    KEY (outside STUDY)              case id -> source and original path; for the organiser only

How the cases are made alike is in ``blind.py``. Case ids and order come from a fresh random seed per study
(unless the organiser passes one); the seed is recorded in the key only. The key is written with
``--key PATH`` outside the study folder, never over an existing file, and the summary needs it.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import secrets
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from napari_meddiff.errors import MeddiffError
from napari_meddiff.io.files import removed_if_left_empty, write_text_atomic
from napari_meddiff.io.geometry import ModelGrid
from napari_meddiff.io.volume import Volume, read_volume, to_canonical
from napari_meddiff.review.blind import (
    FIELD_OF_VIEW_RULE,
    INTENSITY_RULE,
    blinded_levels,
    common_field_of_view,
    common_grid,
    coverage,
    grid_centre,
    grid_of,
    placed_affine,
    write_case,
)
from napari_meddiff.review.inputs import OnSkip, Scan, find_scans

SOURCES = ("real", "synthetic")
CASES_FILE = "cases.json"
CASES_DIR = "cases"
CASE_LIMITS = (0.0, 1.0)
DISPLAY_RULE = {"contrast_limits": list(CASE_LIMITS), "note": "every case is stored on [0, 1] by one rule"}
KEY_NOTE = (
    "STUDY KEY - readers must NOT see this file. It maps each case id to its source (real or synthetic) and "
    "original path. Keep it outside the study folder; `meddiff review summary STUDY --key KEY` needs it."
)
STUDY_VERSION = 2


@dataclasses.dataclass(frozen=True)
class Case:
    """One blinded case: neutral id, image file (relative to the study) and display window."""

    case_id: str
    file: str
    contrast_limits: tuple[float, float]


@dataclasses.dataclass
class Study:
    """A study folder as the reader sees it (no key)."""

    folder: Path
    cases: list[Case]
    study_id: str = ""

    @classmethod
    def load(cls, folder: str | os.PathLike) -> Study:
        folder = Path(folder)
        path = folder / CASES_FILE
        if not path.is_file():
            raise MeddiffError(f"{folder} is not a review study ({CASES_FILE} missing)")
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            version = doc.get("version")
            cases = [
                Case(c["id"], c["file"], (float(c["contrast_limits"][0]), float(c["contrast_limits"][1])))
                for c in doc["cases"]
            ]
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            raise MeddiffError(f"{path} is damaged ({exc})") from None
        if version != STUDY_VERSION:
            raise MeddiffError(
                f"{folder} was made by an older meddiff whose cases were not blinded (their grids, "
                "intensities and key gave the source away); create it again with meddiff review create"
            )
        if not cases:
            raise MeddiffError(f"{path} lists no cases")
        return cls(folder, cases, str(doc.get("study_id", "")))

    @property
    def ids(self) -> list[str]:
        return [c.case_id for c in self.cases]

    def path(self, case: Case) -> Path:
        return self.folder / case.file

    def read(self, case: Case) -> Volume:
        """The case's volume, with no metadata (nothing that could name its source)."""
        vol = read_volume(self.path(case))
        return Volume(vol.array, vol.affine, {})


def display_array(vol: Volume) -> tuple[np.ndarray, tuple[float, ...]]:
    """Voxels arranged for napari in radiological axial view, and the matching (z, row, col) scale.

    The volume is reoriented to RAS+ and stacked as axial slices (superior along axis 0), each shown with
    anterior up and the patient's right on the left of the screen. A 2D image is treated as one axial slice.
    """
    array = np.asarray(vol.array)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3:
        raise MeddiffError(f"cannot display a {array.ndim}D image")
    canon = to_canonical(Volume(array, vol.affine))
    data = np.transpose(np.asarray(canon.array)[::-1, ::-1, :], (2, 1, 0))
    sx, sy, sz = (list(canon.spacing) + [1.0, 1.0, 1.0])[:3]
    if vol.array.ndim == 2:
        return np.ascontiguousarray(data[0]), (sy, sx)
    return np.ascontiguousarray(data), (sz, sy, sx)


def fresh_seed() -> int:
    """A seed nobody chose: each study gets its own order and ids."""
    return secrets.randbits(63)


def _neutral_ids(rng: np.random.Generator, n: int) -> list[str]:
    ids: list[str] = []
    while len(ids) < n:
        cid = f"case-{int(rng.integers(0, 16**8)):08x}"
        if cid not in ids:
            ids.append(cid)
    return ids


def _write_json(path: Path, doc: Any) -> None:
    """Write a study file's JSON atomically (`files.write_text_atomic`: follows the umask)."""
    write_text_atomic(path, json.dumps(doc, indent=1) + "\n")


def _write_key(path: Path, doc: Any) -> None:
    """Write the key's JSON atomically, never replacing a file; it stays readable by its owner only (mkstemp's
    0600): it is the answer sheet."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)  # atomic, and refuses to replace an existing file
    except FileExistsError:
        raise MeddiffError(f"{path} exists; a study key is never overwritten") from None
    finally:
        Path(tmp).unlink(missing_ok=True)


def _pick(scans: list[Scan], num: int | None, rng: np.random.Generator, label: str) -> list[Scan]:
    if num is None:
        return list(scans)
    if num < 1:
        raise MeddiffError(f"--num must be at least 1, not {num}")
    if num > len(scans):
        raise MeddiffError(f"asked for {num} {label} cases but the {label} folder has only {len(scans)} scans")
    return [scans[i] for i in sorted(rng.choice(len(scans), size=num, replace=False))]


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def check_key_location(key: Path, study: Path) -> None:
    """The key must live outside the study folder (readers open that folder)."""
    if _inside(key, study):
        raise MeddiffError(
            f"the key {key} is inside the study folder {study}, which readers open; "
            "keep it outside (e.g. --key ~/keys/my-study.json)"
        )


def _check_request(real: Path, synthetic: Path, out: Path, key: Path) -> None:
    if real.resolve() == synthetic.resolve():
        raise MeddiffError("--real and --synthetic are the same folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MeddiffError(f"{out} exists and is not empty; choose a new study folder")
    check_key_location(key, out)
    if key.exists():
        raise MeddiffError(f"{key} exists; a study key is never overwritten")
    try:
        key.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MeddiffError(f"cannot create the key's folder {key.parent}: {exc.strerror}") from None
    if not os.access(key.parent, os.W_OK):
        raise MeddiffError(f"cannot write the key: {key.parent} is not writable")


def create_study(
    real: str | os.PathLike,
    synthetic: str | os.PathLike,
    out: str | os.PathLike,
    *,
    key: str | os.PathLike,
    num: int | None = None,
    seed: int | None = None,
    grid: str | os.PathLike | None = None,
    on_case: Callable[[int, int], None] | None = None,
    on_skip: OnSkip | None = None,
) -> Study:
    """Draw ``num`` scans per source (all when None) and write a blinded study to ``out``, its key to ``key``.

    Every case is put on the synthetic scans' grid (or ``grid``, an image on the wanted grid), shown on the
    field of view all cases cover, and normalised and stored by one rule (``blind.py``). ``seed`` None draws a
    fresh one. Label maps, masks and further scans of a subject (``-lesionfree`` variants, other sessions) in
    the folders are skipped and reported to ``on_skip(path, reason)``. ``out`` must not exist or be empty;
    ``key`` must not exist and must lie outside ``out``. ``on_case(done, total)`` is called after each case.
    """
    real, synthetic, out, key = Path(real), Path(synthetic), Path(out), Path(key)
    with removed_if_left_empty(key.parent):  # a failed create leaves no empty key folder
        _check_request(real, synthetic, out, key)
        return _create(real, synthetic, out, key, num=num, seed=seed, grid=grid, on_case=on_case, on_skip=on_skip)


def _create(
    real: Path,
    synthetic: Path,
    out: Path,
    key: Path,
    *,
    num: int | None,
    seed: int | None,
    grid: str | os.PathLike | None,
    on_case: Callable[[int, int], None] | None,
    on_skip: OnSkip | None,
) -> Study:
    scans = {"real": find_scans(real, on_skip), "synthetic": find_scans(synthetic, on_skip)}
    if grid is not None:
        target = grid_of(read_volume(grid))
        centre = grid_centre(target)
    else:
        target = common_grid([s.grid for s in scans["synthetic"]])
        centre = tuple(float(v) for v in np.mean([s.centre for s in scans["synthetic"]], axis=0))
    seed = fresh_seed() if seed is None else int(seed)
    rng = np.random.default_rng(seed)
    drawn = [(src, s) for src in SOURCES for s in _pick(scans[src], num, rng, src)]
    covers = [coverage(placed_affine(s.grid.affine, s.centre, target, centre), s.grid.shape, target) for _, s in drawn]
    fov = common_field_of_view(covers)
    order = rng.permutation(len(drawn))
    ids = _neutral_ids(rng, len(drawn))
    study_id = f"{int(rng.integers(0, 2**62)):016x}"
    created_dir = not out.exists()
    (out / CASES_DIR).mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    try:
        cases, key_cases = [], {}
        for n, (cid, idx) in enumerate(zip(ids, order)):
            source, scan = drawn[idx]
            rel = f"{CASES_DIR}/{cid}.nii.gz"
            levels = blinded_levels(read_volume(scan.path), target, centre, fov)
            written.append(write_case(levels, target, out / rel))
            cases.append({"id": cid, "file": rel, "contrast_limits": list(CASE_LIMITS)})
            key_cases[cid] = {
                "source": source,
                "original": str(scan.path.resolve()),
                "grid_coverage": round(float(covers[idx].mean()), 4),
            }
            if on_case:
                on_case(n + 1, len(order))
        _same_times(written)
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        _write_key(
            key,
            {
                "note": KEY_NOTE,
                "version": STUDY_VERSION,
                "study_id": study_id,
                "study": str(out.resolve()),
                "created": now,
                "seed": seed,
                "num_per_source": num,
                "grid": _grid_doc(target, grid, centre),
                "field_of_view": _fov_doc(fov),
                "intensity_rule": INTENSITY_RULE,
                "cases": key_cases,
            },
        )
        written.append(key)
        _write_json(
            out / CASES_FILE,
            {
                "version": STUDY_VERSION,
                "study_id": study_id,
                "created": now,
                "display_rule": DISPLAY_RULE,
                "cases": cases,
            },
        )
    except BaseException as exc:
        for p in written:
            p.unlink(missing_ok=True)
        _rmdir_quiet(out / CASES_DIR)
        if created_dir:
            _rmdir_quiet(out)
        if isinstance(exc, OSError):
            raise MeddiffError(f"cannot write the study: {exc}") from None
        raise
    return Study.load(out)


def _grid_doc(grid: ModelGrid, reference: str | os.PathLike | None, centre: tuple) -> dict[str, Any]:
    return {
        "from": str(Path(reference).resolve()) if reference is not None else "synthetic cases",
        "shape": list(grid.shape),
        "affine": np.asarray(grid.affine).tolist(),
        "foreground_centre_mm": list(centre),
    }


def _fov_doc(fov: np.ndarray) -> dict[str, Any]:
    index = np.argwhere(fov)
    return {
        "rule": FIELD_OF_VIEW_RULE,
        "voxels": int(fov.sum()),
        "fraction_of_grid": round(float(fov.mean()), 4),
        "box": [index.min(0).tolist(), index.max(0).tolist()],  # its bounding box, first and last voxel
    }


def _same_times(paths: list[Path]) -> None:
    """Give every case file the same time stamps, so the writing order says nothing."""
    stamp = int(datetime.datetime.now(datetime.timezone.utc).timestamp())
    for p in paths:
        os.utime(p, (stamp, stamp))


def _rmdir_quiet(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


def read_key(key: str | os.PathLike, study: Study) -> dict[str, dict[str, str]]:
    """The key of ``study``: case id -> {"source": "real"|"synthetic", "original": path}. For analysis only."""
    path = Path(key)
    check_key_location(path, study.folder)
    if not path.is_file():
        raise MeddiffError(f"key not found: {path} (the summary needs the key written by review create)")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        cases, study_id = doc["cases"], doc.get("study_id")
        bad = {cid for cid, v in cases.items() if v.get("source") not in SOURCES}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise MeddiffError(f"{path} is damaged or not a study key ({exc})") from None
    if study_id != study.study_id or set(cases) != set(study.ids):
        raise MeddiffError(f"{path} is not the key of the study in {study.folder}")
    if bad:
        raise MeddiffError(f"{path}: unknown source for {', '.join(sorted(bad))}")
    return cases
