"""Set up a blinded study: real and synthetic scans copied under neutral IDs, the key kept apart.

Layout of a study folder::

    STUDY/cases.json          case order, file names and display windows (what the reader's tools read)
    STUDY/key.json            case id -> source and original path (the reader must not open it)
    STUDY/cases/case-XXXXXX.nii.gz
    STUDY/results-<reader>.jsonl   (written while reading, see ``results.py``)

Every image is re-written through `read_volume`/`write_volume` as float32 NIfTI with a fresh header
(empty description, no extensions, same qform/sform codes), never byte-copied, so nothing in the file
says where it came from. Voxels and the affine are kept as they are: nothing is resampled or cropped.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import MeddiffError
from ..volume import Volume, read_volume, to_canonical, write_volume

SOURCES = ("real", "synthetic")
IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
CASES_FILE = "cases.json"
KEY_FILE = "key.json"
CASES_DIR = "cases"
DISPLAY_RULE = {"method": "percentile", "lower": 0.5, "upper": 99.5, "foreground_only": True}
KEY_NOTE = (
    "STUDY KEY - readers must NOT open this file. It maps each neutral case id to its source "
    "(real or synthetic) and original path; open it only for the analysis, after all readers have finished."
)
STUDY_VERSION = 1


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

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "Study":
        folder = Path(folder)
        path = folder / CASES_FILE
        if not path.is_file():
            raise MeddiffError(f"{folder} is not a review study ({CASES_FILE} missing)")
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            cases = [Case(c["id"], c["file"], (float(c["contrast_limits"][0]), float(c["contrast_limits"][1])))
                     for c in doc["cases"]]
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise MeddiffError(f"{path} is damaged ({exc})") from None
        if not cases:
            raise MeddiffError(f"{path} lists no cases")
        return cls(folder, cases)

    @property
    def ids(self) -> list[str]:
        return [c.case_id for c in self.cases]

    def path(self, case: Case) -> Path:
        return self.folder / case.file

    def read(self, case: Case) -> Volume:
        """The case's volume, with no metadata (nothing that could name its source)."""
        vol = read_volume(self.path(case))
        return Volume(vol.array, vol.affine, {})


def find_images(folder: str | os.PathLike) -> list[Path]:
    """Image files directly inside ``folder`` (hidden and temporary files skipped), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MeddiffError(f"not a folder: {folder}")
    files = [p for p in folder.iterdir()
             if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(IMAGE_SUFFIXES)]
    if not files:
        raise MeddiffError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return sorted(files)


def display_window(array: np.ndarray, rule: dict[str, Any] | None = None) -> tuple[float, float]:
    """Display contrast limits by one rule for every case: percentiles of the finite (foreground) voxels."""
    rule = {**DISPLAY_RULE, **(rule or {})}
    values = np.asarray(array, dtype=np.float32).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    if rule["foreground_only"]:
        fg = values[values > values.min()]
        values = fg if fg.size > 0.01 * values.size else values
    lo, hi = (float(v) for v in np.percentile(values, [rule["lower"], rule["upper"]]))
    lo, hi = float(f"{lo:.6g}"), float(f"{hi:.6g}")
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


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


def _neutral_ids(rng: np.random.Generator, n: int) -> list[str]:
    ids: list[str] = []
    while len(ids) < n:
        cid = f"case-{int(rng.integers(0, 16**6)):06x}"
        if cid not in ids:
            ids.append(cid)
    return ids


def _write_json(path: Path, doc: Any) -> None:
    """Write JSON atomically (temporary file, fsync, rename)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _pick(files: list[Path], num: int | None, rng: np.random.Generator, label: str) -> list[Path]:
    if num is None:
        return list(files)
    if num < 1:
        raise MeddiffError(f"--num must be at least 1, not {num}")
    if num > len(files):
        raise MeddiffError(f"asked for {num} {label} cases but {label} folder has only {len(files)} images")
    return [files[i] for i in sorted(rng.choice(len(files), size=num, replace=False))]


def create_study(
    real: str | os.PathLike,
    synthetic: str | os.PathLike,
    out: str | os.PathLike,
    *,
    num: int | None = None,
    seed: int = 0,
    on_case: Callable[[int, int], None] | None = None,
) -> Study:
    """Draw ``num`` cases per source (all when None), shuffle with ``seed`` and write a blinded study to ``out``.

    ``out`` must not exist or be an empty folder. ``on_case(done, total)`` is called after each image.
    """
    real, synthetic, out = Path(real), Path(synthetic), Path(out)
    if real.resolve() == synthetic.resolve():
        raise MeddiffError("--real and --synthetic are the same folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MeddiffError(f"{out} exists and is not empty; choose a new study folder")
    rng = np.random.default_rng(seed)
    drawn = [(src, p) for src, folder in zip(SOURCES, (real, synthetic))
             for p in _pick(find_images(folder), num, rng, src)]
    order = rng.permutation(len(drawn))
    ids = _neutral_ids(rng, len(drawn))
    created_dir = not out.exists()
    (out / CASES_DIR).mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    try:
        cases, key = [], {}
        grids: dict[str, set] = {src: set() for src in SOURCES}
        for n, (cid, idx) in enumerate(zip(ids, order)):
            source, original = drawn[idx]
            vol = read_volume(original)
            if vol.array.ndim not in (2, 3):
                raise MeddiffError(f"{original}: only 2D and 3D images can be reviewed")
            array = np.asarray(vol.array, dtype=np.float32)
            rel = f"{CASES_DIR}/{cid}.nii.gz"
            written.append(write_volume(Volume(array, vol.affine, {}), out / rel, description=""))
            cases.append({"id": cid, "file": rel, "contrast_limits": list(display_window(array))})
            key[cid] = {"source": source, "original": str(original.resolve())}
            grids[source].add((array.shape, tuple(round(z, 3) for z in vol.spacing)))
            if on_case:
                on_case(n + 1, len(order))
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        written.append(out / KEY_FILE)
        _write_json(out / KEY_FILE, {"note": KEY_NOTE, "version": STUDY_VERSION, "created": now, "seed": seed,
                                     "num_per_source": num, "cases": key})
        written.append(out / CASES_FILE)
        _write_json(out / CASES_FILE, {"version": STUDY_VERSION, "created": now, "display_rule": DISPLAY_RULE,
                                       "cases": cases})
    except BaseException:
        for p in written:
            p.unlink(missing_ok=True)
        _rmdir_quiet(out / CASES_DIR)
        if created_dir:
            _rmdir_quiet(out)
        raise
    if not grids["real"] & grids["synthetic"]:
        warnings.warn("real and synthetic cases are on different grids (shape or voxel size), which readers can "
                      "see; consider resampling both sources to a common grid before creating the study", stacklevel=2)
    return Study.load(out)


def _rmdir_quiet(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


def read_key(folder: str | os.PathLike) -> dict[str, dict[str, str]]:
    """The study key: case id -> {"source": "real"|"synthetic", "original": path}. For analysis only."""
    path = Path(folder) / KEY_FILE
    if not path.is_file():
        raise MeddiffError(f"{path} not found: the study key is needed for the summary")
    try:
        key = json.loads(path.read_text(encoding="utf-8"))["cases"]
    except (ValueError, KeyError, TypeError) as exc:
        raise MeddiffError(f"{path} is damaged ({exc})") from None
    bad = {cid for cid, v in key.items() if v.get("source") not in SOURCES}
    if bad:
        raise MeddiffError(f"{path}: unknown source for {', '.join(sorted(bad))}")
    return key
