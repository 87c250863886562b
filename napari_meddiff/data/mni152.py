"""A synthetic brain cohort derived from the real MNI152 2009c template that ships with nilearn.

Every subject is the template T1 (and its grey/white-matter probability maps and brain mask) under a random
smooth deformation (small rotation/scaling/translation plus an elastic field), followed by random intensity
changes of the image only (bias field, gamma/contrast, global gain, Rician noise). Tissue labels are derived
after warping, from the warped probability maps, so they lie exactly on the warped image. Some subjects get a
lesion: a smoothed random ellipsoid of altered intensity, preferably in white matter.

All randomness comes from MONAI transforms (seeded with ``set_random_state``) and NumPy generators seeded from
the subject seed, so a seed always gives the same, bit-identical subject.

Evaluation hygiene: models are trained only on subjects from :data:`TRAIN_SEEDS`; evaluation uses subjects from
:data:`HELDOUT_SEEDS`, which no training run may touch (use :func:`check_split` to enforce it).

Intensities keep a fixed, template-derived scale: nilearn's template (0..1) times :data:`INTENSITY_SCALE`, so
white matter is about 85, grey matter about 65, background 0 (plus noise). Nothing is normalised per subject.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import json
import logging
import os
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from napari_meddiff.errors import MeddiffError
from napari_meddiff.io.files import check_csv_is_ours, ensure_folder, write_text_atomic
from napari_meddiff.io.volume import Volume, read_volume, write_volume

log = logging.getLogger(__name__)

TRAIN_SEEDS = range(0, 100_000)
"""Seeds of subjects that models may be trained on."""
HELDOUT_SEEDS = range(100_000, 100_100)
"""Seeds of subjects reserved for evaluation; never train on them."""

RESOLUTIONS_MM = (1.0, 2.0)
INTENSITY_SCALE = 100.0
"""nilearn's template is stored as 0..1; it is multiplied by this fixed factor (no per-subject normalisation)."""

LABELS = {0: "background", 1: "csf", 2: "grey_matter", 3: "white_matter"}
GENERATOR_VERSION = 1
MANIFEST = "cohort.csv"
PARAMS_FILE = "cohort.json"
FILE_KINDS = ("image", "labels", "lesion_mask", "lesion_free")
# the columns of cohort.csv before it recorded the files' sha256s (such a manifest is still read, and completed)
LEGACY_MANIFEST_FIELDS = ("subject", "seed", "split", "has_lesion", *FILE_KINDS, "lesion_volume_ml")
# a resumed run compares each file with its sha256 here, and writes a subject again whose files do not match
SHA256_FIELDS = tuple(f"{kind}_sha256" for kind in FILE_KINDS)
MANIFEST_FIELDS = LEGACY_MANIFEST_FIELDS + SHA256_FIELDS

# Deformation parameters, in mm so both resolutions get the same anatomy-scale warps.
_ELASTIC_SIGMA_MM = (10.0, 14.0)  # smoothing of the random displacement field
_ELASTIC_RMS_MM = (1.5, 3.0)  # RMS displacement per axis at the mean sigma (before the affine part)
_ROTATE_RAD = 0.08  # ~4.6 degrees about each axis
_SCALE = 0.06  # +-6 % per axis
_TRANSLATE_MM = 4.0
# Smoothed uniform(-1, 1) noise has std ~ 0.0865 * sigma**-1.5 (3D Gaussian, sigma in voxels).
_SMOOTHED_NOISE_STD = 0.0865


# --- template ------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def load_template(resolution_mm: float = 2.0) -> dict[str, np.ndarray]:
    """The MNI152 2009 template maps shipped with nilearn (no download), cached.

    Returns ``{"t1", "gm", "wm", "mask", "affine"}``: float32 arrays (T1 scaled by :data:`INTENSITY_SCALE`,
    GM/WM probabilities 0..1, brain mask 0/1) on the template grid, and its 4x4 RAS affine. Read-only arrays.
    """
    resolution = _check_resolution(resolution_mm)
    try:
        from nilearn import datasets
    except ImportError as exc:  # pragma: no cover - nilearn is a dependency
        raise MeddiffError(f"the synthetic cohort needs nilearn ({exc})") from None
    res = int(resolution)
    images = {
        "t1": datasets.load_mni152_template(resolution=res),
        "gm": datasets.load_mni152_gm_template(resolution=res),
        "wm": datasets.load_mni152_wm_template(resolution=res),
        "mask": datasets.load_mni152_brain_mask(resolution=res),
    }
    affine = np.asarray(images["t1"].affine, dtype=np.float64)
    out: dict[str, np.ndarray] = {}
    for name, img in images.items():
        if not np.allclose(img.affine, affine) or img.shape != images["t1"].shape:
            raise MeddiffError(f"nilearn's MNI152 {name} map is not on the T1 template grid")
        arr = np.asarray(img.get_fdata(dtype=np.float32))
        arr = np.clip(arr, 0.0, None)  # the stored maps contain -0.0
        if name == "t1":
            arr = arr * np.float32(INTENSITY_SCALE)
        out[name] = arr
    out["affine"] = affine
    for arr in out.values():
        arr.setflags(write=False)
    return out


def _check_resolution(resolution_mm: float) -> float:
    try:
        res = float(resolution_mm)
    except (TypeError, ValueError):
        raise MeddiffError(f"resolution must be a number of mm, got {resolution_mm!r}") from None
    if res not in RESOLUTIONS_MM:
        raise MeddiffError(f"resolution must be 1 or 2 mm (the MNI152 template grids), got {resolution_mm}")
    return res


# --- splits and seeds ----------------------------------------------------------------------------


def split_of(seed: int) -> str:
    """``"train"`` or ``"heldout"`` for a subject seed; any other seed is an error."""
    seed = int(seed)
    if seed in TRAIN_SEEDS:
        return "train"
    if seed in HELDOUT_SEEDS:
        return "heldout"
    raise MeddiffError(
        f"subject seed {seed} is outside the cohort: train seeds are {TRAIN_SEEDS.start}..{TRAIN_SEEDS.stop - 1}, "
        f"held-out seeds {HELDOUT_SEEDS.start}..{HELDOUT_SEEDS.stop - 1}"
    )


def check_split(seeds: Iterable[int], split: str) -> None:
    """Raise `MeddiffError` unless every seed belongs to ``split`` ("train" or "heldout")."""
    if split not in ("train", "heldout"):
        raise MeddiffError(f"split must be 'train' or 'heldout', not {split!r}")
    wrong = [int(s) for s in seeds if int(s) not in (TRAIN_SEEDS if split == "train" else HELDOUT_SEEDS)]
    if wrong:
        shown = ", ".join(str(s) for s in wrong[:5]) + (", ..." if len(wrong) > 5 else "")
        raise MeddiffError(f"{len(wrong)} seed(s) are not in the {split} split: {shown}")


def _seed_streams(seed: int) -> dict[str, int]:
    """Independent 32-bit seeds for each random part of a subject (for MONAI's set_random_state)."""
    if int(seed) < 0:
        raise MeddiffError(f"subject seed must be non-negative, got {seed}")
    state = np.random.SeedSequence([int(seed), 0x6D656464]).generate_state(5)
    return dict(zip(("lesion_choice", "spatial", "intensity", "lesion", "noise"), (int(s) for s in state)))


def subject_has_lesion(seed: int, lesion_fraction: float = 0.3) -> bool:
    """Whether subject ``seed`` gets a lesion when none is forced (a fraction ``lesion_fraction`` of seeds)."""
    if not 0.0 <= float(lesion_fraction) <= 1.0:
        raise MeddiffError(f"lesion fraction must be between 0 and 1, got {lesion_fraction}")
    u = np.random.default_rng(_seed_streams(seed)["lesion_choice"]).random()
    return bool(u < float(lesion_fraction))


# --- subjects ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Subject:
    """One synthetic subject; all volumes share the template affine."""

    image: Volume  # float32 T1
    labels: Volume  # uint8: 0 background, 1 CSF, 2 GM, 3 WM
    lesion_mask: Volume | None  # uint8 0/1, lesion subjects only
    lesion_free: Volume | None  # the same image without the lesion, lesion subjects only
    seed: int
    has_lesion: bool

    @property
    def split(self) -> str:
        return split_of(self.seed)

    @property
    def lesion_volume_ml(self) -> float:
        if self.lesion_mask is None:
            return 0.0
        voxel_ml = float(abs(np.linalg.det(self.image.affine[:3, :3]))) / 1000.0
        return float(np.count_nonzero(self.lesion_mask.array)) * voxel_ml


def _spatial_transform(resolution: float):
    from monai.transforms import Rand3DElasticd

    sigma_vox = tuple(s / resolution for s in _ELASTIC_SIGMA_MM)
    mid = sum(sigma_vox) / 2
    magnitude = tuple(r / resolution * mid**1.5 / _SMOOTHED_NOISE_STD for r in _ELASTIC_RMS_MM)
    return Rand3DElasticd(
        keys=["image", "gm", "wm", "mask"],
        sigma_range=sigma_vox,
        magnitude_range=magnitude,
        prob=1.0,
        rotate_range=(_ROTATE_RAD,) * 3,
        scale_range=(_SCALE,) * 3,
        translate_range=(_TRANSLATE_MM / resolution,) * 3,
        mode="bilinear",
        padding_mode="zeros",
    )


def _intensity_transform():
    from monai.transforms import Compose, RandAdjustContrastd, RandBiasFieldd, RandScaleIntensityd

    return Compose(
        [
            RandBiasFieldd(keys=["image"], degree=3, coeff_range=(-0.08, 0.08), prob=1.0),
            RandAdjustContrastd(keys=["image"], gamma=(0.75, 1.35), prob=1.0),
            RandScaleIntensityd(keys=["image"], factors=0.1, prob=1.0),  # scanner gain, +-10 %
        ]
    )


def _noise_transform():
    from monai.transforms import RandRicianNoised

    # sample_std: noise std ~ U(0, 2.5) on the ~0..100 scale (white matter ~85): SNR >= ~35
    return RandRicianNoised(keys=["image"], prob=1.0, mean=0.0, std=2.5, sample_std=True, relative=False)


def _as_numpy(x) -> np.ndarray:
    import torch

    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float32)[0]


def _derive_labels(gm: np.ndarray, wm: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """0 outside the mask; inside, argmax over (CSF = clip(mask - gm - wm), GM, WM) + 1."""
    csf = np.clip(mask - gm - wm, 0.0, 1.0)
    labels = (np.argmax(np.stack([csf, gm, wm]), axis=0) + 1).astype(np.uint8)
    labels[mask < 0.5] = 0
    return labels


def _lesion_blob(
    rng: np.random.Generator, labels: np.ndarray, wm: np.ndarray, resolution: float
) -> tuple[np.ndarray, float]:
    """A smooth weight map in [0, 1] (exactly 0 far from the blob) and the intensity factor of the lesion."""
    from scipy import ndimage
    from scipy.spatial.transform import Rotation

    radii_mm = rng.uniform(4.0, 12.0, size=3)
    # centre: deep white matter first (distance to the WM border >= the smallest radius), else any WM, else brain
    dist_mm = ndimage.distance_transform_edt(labels == 3) * resolution
    for candidates in (dist_mm >= radii_mm.min(), (labels == 3) & (wm > 0.5), labels > 0):
        idx = np.flatnonzero(candidates)
        if idx.size:
            break
    else:  # pragma: no cover - the warped template always has a brain
        raise MeddiffError("cannot place a lesion: the warped brain is empty")
    centre = np.array(np.unravel_index(idx[rng.integers(idx.size)], labels.shape), dtype=float)
    rotation = Rotation.random(random_state=rng).as_matrix()
    sigma_vox = 1.5 / resolution  # edge blur, 1.5 mm
    half = int(np.ceil((radii_mm.max() * 1.4) / resolution + 4 * sigma_vox + 2))
    lo = np.maximum(centre.astype(int) - half, 0)
    hi = np.minimum(centre.astype(int) + half + 1, labels.shape)
    grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"), axis=-1)
    local = (grid - centre) * resolution @ rotation  # mm, in the ellipsoid's frame
    q = np.sqrt(((local / radii_mm) ** 2).sum(-1))
    # irregular border: modulate the radius with smooth noise
    bumps = ndimage.gaussian_filter(rng.standard_normal(q.shape), sigma=2.0 / resolution, mode="nearest")
    bumps *= 0.2 / max(float(bumps.std()), 1e-6)
    inside = (q * np.exp(np.clip(bumps, -0.5, 0.5))) < 1.0  # radius varies within x0.6..x1.65
    components, _ = ndimage.label(inside)
    core = components[tuple(np.round(centre).astype(int) - lo)]
    if core:  # one blob: drop islands the bumps may have cut off
        inside = ndimage.binary_fill_holes(components == core)
    weight = np.zeros(labels.shape, dtype=np.float32)
    blurred = ndimage.gaussian_filter(inside.astype(np.float32), sigma=sigma_vox, mode="constant", truncate=4.0)
    blurred[blurred < 0.01] = 0.0  # compact support: the image is untouched a few voxels away
    weight[tuple(slice(a, b) for a, b in zip(lo, hi))] = blurred
    weight *= labels > 0  # only brain tissue changes
    hypo = rng.random() < 0.6  # T1 "black hole" / necrotic tumour, else hyperintense (enhancing-like)
    factor = float(rng.uniform(0.4, 0.7) if hypo else rng.uniform(1.2, 1.45))
    return weight, factor


def make_subject(
    seed: int,
    resolution_mm: float = 2.0,
    lesion: bool | None = None,
    lesion_fraction: float = 0.3,
    noise: bool = True,
) -> Subject:
    """Synthesize subject ``seed``: deterministic (bit-identical for the same arguments).

    ``lesion`` forces a lesion (True) or none (False); by default a fraction ``lesion_fraction`` of seeds get
    one (:func:`subject_has_lesion`). ``noise=False``: the same subject without its Rician noise (everything
    else identical; for measuring what noise costs). About 1-2.5 s at 2 mm on one CPU core; about a minute at 1 mm.
    """
    seed = int(seed)
    streams = _seed_streams(seed)
    has_lesion = subject_has_lesion(seed, lesion_fraction) if lesion is None else bool(lesion)
    resolution = _check_resolution(resolution_mm)
    tpl = load_template(resolution)
    affine = tpl["affine"]

    spatial = _spatial_transform(resolution)
    spatial.set_random_state(seed=streams["spatial"])
    warped = spatial(
        {k: tpl[n][None].copy() for k, n in (("image", "t1"), ("gm", "gm"), ("wm", "wm"), ("mask", "mask"))}
    )
    image = np.clip(_as_numpy(warped["image"]), 0.0, None)
    gm, wm, mask = (np.clip(_as_numpy(warped[k]), 0.0, 1.0) for k in ("gm", "wm", "mask"))
    labels = _derive_labels(gm, wm, mask)

    intensity = _intensity_transform()
    intensity.set_random_state(seed=streams["intensity"])
    clean = _as_numpy(intensity({"image": image[None]})["image"])

    def add_noise(arr: np.ndarray) -> np.ndarray:
        if not noise:
            return arr.copy()
        noise_transform = _noise_transform()
        noise_transform.set_random_state(seed=streams["noise"])  # same draws for the lesion and lesion-free images
        return _as_numpy(noise_transform({"image": arr[None].copy()})["image"])

    meta = {"descrip": f"meddiff synthetic MNI152 subject seed={seed}", "seed": seed, "qform_code": 4, "sform_code": 4}
    lesion_mask = lesion_free = None
    if has_lesion:
        weight, factor = _lesion_blob(np.random.default_rng(streams["lesion"]), labels, wm, resolution)
        lesioned = clean * (1.0 + weight * np.float32(factor - 1.0))
        final = add_noise(lesioned)
        lesion_free = Volume(add_noise(clean), affine.copy(), dict(meta, lesion_free=True))
        lesion_mask = Volume(((weight >= 0.5) & (labels > 0)).astype(np.uint8), affine.copy(), dict(meta))
        meta["lesion_intensity_factor"] = factor
    else:
        final = add_noise(clean)
    return Subject(
        image=Volume(final.astype(np.float32), affine.copy(), dict(meta)),
        labels=Volume(labels, affine.copy(), dict(meta)),
        lesion_mask=lesion_mask,
        lesion_free=lesion_free,
        seed=seed,
        has_lesion=has_lesion,
    )


# --- writing a cohort ----------------------------------------------------------------------------


def subject_files(seed: int) -> dict[str, str]:
    """File names (relative to the cohort folder) of subject ``seed``."""
    stem = f"sub-{int(seed):06d}"
    return {
        "image": f"{stem}_T1w.nii.gz",
        "labels": f"{stem}_dseg.nii.gz",
        "lesion_mask": f"{stem}_lesion.nii.gz",
        "lesion_free": f"{stem}_T1w-lesionfree.nii.gz",
    }


def _kinds(has_lesion: bool) -> tuple[str, ...]:
    """The files a subject has: image and labels, and the lesion mask and lesion-free image of a lesion subject."""
    return FILE_KINDS if has_lesion else FILE_KINDS[:2]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _row(seed: int, has_lesion: bool, lesion_ml: float, sha256s: dict[str, str]) -> dict[str, object]:
    files = subject_files(seed)
    return {
        "subject": f"sub-{seed:06d}",
        "seed": seed,
        "split": split_of(seed),
        "has_lesion": int(has_lesion),
        "image": files["image"],
        "labels": files["labels"],
        "lesion_mask": files["lesion_mask"] if has_lesion else "",
        "lesion_free": files["lesion_free"] if has_lesion else "",
        "lesion_volume_ml": f"{lesion_ml:.3f}",
        **{f"{kind}_sha256": sha256s.get(kind, "") for kind in FILE_KINDS},
    }


def read_manifest(out_dir: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of ``cohort.csv`` in a cohort folder (empty when there is none); another file of that name is
    refused (`check_manifest_is_ours`)."""
    check_manifest_is_ours(out_dir)
    path = Path(out_dir) / MANIFEST
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def check_manifest_is_ours(out_dir: str | os.PathLike) -> None:
    """Refuse a folder whose ``cohort.csv`` is another file: ``meddiff generate`` writes a manifest of generated
    volumes of that name (``tasks.batch.check_manifest_is_ours`` is the same check from its side), and a cohort
    written into its folder would replace it."""
    check_csv_is_ours(
        Path(out_dir) / MANIFEST, [MANIFEST_FIELDS, LEGACY_MANIFEST_FIELDS], ours="a cohort manifest",
        theirs="a manifest of generated volumes from `meddiff generate`",
        advice="write the cohort into another folder",
    )  # fmt: skip


def write_cohort(
    out_dir: str | os.PathLike,
    num: int,
    seed: int = 0,
    resolution_mm: float = 2.0,
    lesion_fraction: float = 0.3,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write subjects ``seed .. seed+num-1`` to ``out_dir`` with a ``cohort.csv`` manifest; returns its path.

    Per subject: ``sub-XXXXXX_T1w.nii.gz`` and ``_dseg.nii.gz``; lesion subjects also ``_lesion.nii.gz`` and
    ``_T1w-lesionfree.nii.gz``; the manifest records each file's sha256. Complete subjects already on disk are
    kept when intact (resume: each file matches its recorded sha256, or reads in full where none was recorded)
    and written again when not, so a folder can be filled in several calls (e.g. train and held-out seeds); the
    manifest keeps the rows of earlier calls. The generation parameters are kept in ``cohort.json``; other
    parameters need ``overwrite``. A ``cohort.csv`` that is not a cohort manifest is refused, never replaced.
    """
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    num = int(num)
    if num < 1:
        raise MeddiffError(f"number of subjects must be at least 1, got {num}")
    resolution = _check_resolution(resolution_mm)
    if not 0.0 <= float(lesion_fraction) <= 1.0:
        raise MeddiffError(f"lesion fraction must be between 0 and 1, got {lesion_fraction}")
    seeds = list(range(int(seed), int(seed) + num))
    for s in (seeds[0], seeds[-1]):
        if s < 0:
            raise MeddiffError(f"subject seed must be non-negative, got {s}")
        split_of(s)
    out = Path(out_dir)
    ensure_folder(out)
    check_manifest_is_ours(out)  # before anything is written into the folder
    _keep_parameters(out, resolution, float(lesion_fraction), overwrite)
    rows = {int(r["seed"]): r for r in ([] if overwrite else read_manifest(out)) if r.get("seed", "").isdigit()}
    bar = tqdm(seeds, desc="cohort", unit="subject", file=sys.stderr, disable=not progress)
    try:
        with logging_redirect_tqdm():
            for s in bar:
                has_lesion = subject_has_lesion(s, lesion_fraction)
                row = None if overwrite else _row_on_disk(out, s, has_lesion, rows.get(s))
                if row is not None:  # (with the sha256s of a subject found complete where none were recorded)
                    rows[s] = row
                    continue
                rows[s] = _write_subject(out, s, resolution, has_lesion)
                # keep the manifest current so an interrupted run still lists what is on disk
                _write_manifest(out, rows)
    finally:
        bar.close()
    return _write_manifest(out, rows)


def _keep_parameters(out: Path, resolution: float, lesion_fraction: float, overwrite: bool) -> None:
    """Write the generation parameters to ``cohort.json``; a folder made with others is refused unless ``overwrite``."""
    params = {
        "generator": "napari_meddiff.data.mni152",
        "generator_version": GENERATOR_VERSION,
        "template": "MNI152 2009 (nilearn)",
        "resolution_mm": resolution,
        "lesion_fraction": lesion_fraction,
        "intensity_scale": INTENSITY_SCALE,
    }
    params_path = out / PARAMS_FILE
    if params_path.exists() and not overwrite:
        try:
            old = json.loads(params_path.read_text())
        except (OSError, ValueError):
            old = None
        if old != params:
            raise MeddiffError(
                f"{out} holds a cohort made with other parameters ({params_path.name}); use another folder or overwrite"
            )
    write_text_atomic(params_path, json.dumps(params, indent=2) + "\n")


def _row_on_disk(out: Path, seed: int, has_lesion: bool, recorded: dict[str, str] | None) -> dict[str, object] | None:
    """The manifest row of subject ``seed`` when all its files are in ``out`` and intact (`_damage`); None when the
    subject must be written (again), said in the log where some of it was there."""
    files = subject_files(seed)
    kinds = _kinds(has_lesion)
    missing = [files[k] for k in kinds if not (out / files[k]).is_file()]
    problem = f"incomplete ({', '.join(missing)} missing)" if 0 < len(missing) < len(kinds) else None
    sha256s = {} if missing else {kind: _sha256(out / files[kind]) for kind in kinds}
    if not missing:
        problem = _damage(out, files, sha256s, recorded)
    if problem:
        log.warning("%s: %s; writing this subject again", out / f"sub-{seed:06d}", problem)
    if missing or problem:
        return None
    lesion_ml = 0.0
    if has_lesion:
        m = read_volume(out / files["lesion_mask"])
        lesion_ml = float(np.count_nonzero(m.array)) * float(np.prod(m.spacing)) / 1000.0
    return _row(seed, has_lesion, lesion_ml, sha256s)


def _damage(out: Path, files: dict[str, str], sha256s: dict[str, str], recorded: dict[str, str] | None) -> str | None:
    """What is wrong with a subject's files (None: nothing): each must match its sha256 in ``recorded`` (its row in
    ``cohort.csv``), or, where none was recorded (a cohort written before they were, or a run stopped before its
    manifest), read in full (`read_volume` checks the gzip CRC and length)."""
    known = {kind: (recorded or {}).get(f"{kind}_sha256") for kind in sha256s}
    if all(known.values()):
        changed = [files[kind] for kind, digest in sha256s.items() if digest != known[kind]]
        if changed:
            return f"{', '.join(changed)}: sha256 differs from the one recorded in {MANIFEST} (damaged or changed)"
        return None
    for kind in sha256s:
        try:
            read_volume(out / files[kind])
        except MeddiffError as exc:  # "cannot read PATH: why"
            return str(exc)
        except OSError as exc:
            return f"cannot read {files[kind]} ({exc.strerror or exc})"
    return None


def _write_subject(out: Path, seed: int, resolution: float, has_lesion: bool) -> dict[str, object]:
    """Synthesize subject ``seed`` into ``out`` and return its manifest row."""
    files = subject_files(seed)
    subject = make_subject(seed, resolution, lesion=has_lesion)
    # a partly written subject (interrupted run) is completed; same parameters give the same files
    write_volume(subject.image, out / files["image"], overwrite=True)
    write_volume(subject.labels, out / files["labels"], kind="labels", overwrite=True)
    if has_lesion:
        write_volume(subject.lesion_mask, out / files["lesion_mask"], kind="labels", overwrite=True)
        write_volume(subject.lesion_free, out / files["lesion_free"], overwrite=True)
    else:  # stale lesion files of this seed from an earlier run would contradict the manifest
        for k in ("lesion_mask", "lesion_free"):
            (out / files[k]).unlink(missing_ok=True)
    sha256s = {kind: _sha256(out / files[kind]) for kind in _kinds(has_lesion)}
    return _row(seed, has_lesion, subject.lesion_volume_ml, sha256s)


def _write_manifest(out: Path, rows: dict[int, dict]) -> Path:
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=MANIFEST_FIELDS, lineterminator="\n")
    writer.writeheader()
    for s in sorted(rows):
        writer.writerow({k: rows[s].get(k, "") for k in MANIFEST_FIELDS})
    path = out / MANIFEST
    write_text_atomic(path, buf.getvalue())
    return path
