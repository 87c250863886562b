"""Blind by the voxels too: every case shows the same field of view, and a subject is one case (issue #36).

Real scans are often cut short of the study grid (a field of view that stops below the cerebellum); a model's
grid can be smaller than a ``--grid`` reference. Before, the cases of the source that did not cover the grid kept
blank border planes the other source had not, and one feature, where the non-zero voxels end, told the sources
apart every time. Now every case is shown on the field of view all cases cover, blank outside it in all.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from napari_meddiff.review.study import Study, create_study, read_key

N_SUBJECTS = 8
SYN_SHAPE, SYN_VOXEL = (24, 28, 26), 3.0  # a model's grid: 3 mm, centred on the world origin
REAL_SHAPE, REAL_VOXEL = (44, 48, 42), 2.0
# real scans in an MNI-like frame: the head near the origin, the field of view reaching far above it but cut
# short below, at z = -28 - 1 = -29 mm (lowest voxel centre minus half a voxel). The model grid's three lowest
# planes (z = -37.5, -34.5, -31.5 mm) lie below it, z = -28.5 mm inside.
REAL_ORIGIN = (-43.0, -47.0, -28.0)
SYN_PLANES_BELOW_REAL = 3


def _head(rng: np.random.Generator, shape, affine, scale: float, offset: float) -> np.ndarray:
    """A smooth head-like ellipsoid around the world origin in a noisy background (no voxel exactly 0)."""
    from scipy import ndimage

    index = np.indices(shape).reshape(3, -1).astype(np.float64)
    world = (affine[:3, :3] @ index + affine[:3, 3:]).reshape(3, *shape)
    centre, radii = rng.normal(0, 1.5, 3), np.array([30.0, 36.0, 30.0]) * rng.uniform(0.9, 1.1)
    inside = (((world - centre[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0) < 1
    tissue = 60 + 25 * ndimage.gaussian_filter(rng.standard_normal(shape), 1.5) / 0.15
    noise = np.abs(rng.normal(0, rng.uniform(0.5, 3.0), shape)) + 0.01
    return ((inside * tissue + noise) * scale + offset).astype(np.float32)


def _real_affine() -> np.ndarray:
    return np.array(
        [
            [REAL_VOXEL, 0, 0, REAL_ORIGIN[0]],
            [0, REAL_VOXEL, 0, REAL_ORIGIN[1]],
            [0, 0, REAL_VOXEL, REAL_ORIGIN[2]],
            [0, 0, 0, 1],
        ]
    )


def _syn_affine() -> np.ndarray:
    from napari_meddiff.io.geometry import make_grid

    return make_grid((SYN_VOXEL,) * 3, SYN_SHAPE, (0.0, 0.0, 0.0)).affine


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A cohort-like --real folder (T1w, -lesionfree variant, dseg, lesion mask, cohort.csv) and a --synthetic
    folder of model outputs, ``N_SUBJECTS`` each."""
    from napari_meddiff.data.mni152 import subject_files

    root = tmp_path_factory.mktemp("blinding")
    real, syn = root / "real", root / "synthetic"
    real.mkdir()
    syn.mkdir()
    rng = np.random.default_rng(36)
    rows = []
    for seed in range(1, N_SUBJECTS + 1):
        files = subject_files(seed)
        t1 = _head(rng, REAL_SHAPE, _real_affine(), 1.0, 0.0)
        nib.save(nib.Nifti1Image(t1, _real_affine()), str(real / files["image"]))
        labels = (t1 > 40).astype(np.uint8) + (t1 > 80).astype(np.uint8)
        nib.save(nib.Nifti1Image(labels, _real_affine()), str(real / files["labels"]))
        has_lesion = seed % 3 != 0
        if has_lesion:
            lesion_free = t1 * np.float32(1.0) + rng.normal(0, 0.5, t1.shape).astype(np.float32)
            nib.save(nib.Nifti1Image(lesion_free, _real_affine()), str(real / files["lesion_free"]))
            nib.save(nib.Nifti1Image((labels == 2).astype(np.uint8), _real_affine()), str(real / files["lesion_mask"]))
        rows.append({"subject": f"sub-{seed:06d}", "image": files["image"], "has_lesion": int(has_lesion)})
        synthetic = _head(rng, SYN_SHAPE, _syn_affine(), 1 / 130, -0.002)
        nib.save(nib.Nifti1Image(synthetic, _syn_affine()), str(syn / f"tiny-ldm-3d_seed{seed}.nii.gz"))
    with open(real / "cohort.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return real, syn


def _bbox(array: np.ndarray) -> tuple[int, ...]:
    """Where the non-zero voxels begin and end along each axis (what a reader sees as the field of view)."""
    index = np.argwhere(array > 0)
    return (*index.min(0).tolist(), *index.max(0).tolist())


def _stump_correct(x: np.ndarray, y: np.ndarray) -> int:
    """Leave-one-out: how many cases a decision stump (the best single feature and cut) gets right."""
    correct = 0
    for i in range(len(y)):
        train = np.arange(len(y)) != i
        best = (-1, 0, 0.0, 1)
        for f in range(x.shape[1]):
            for cut in np.unique(x[train, f]):
                for sign in (1, -1):
                    right = int(np.sum((sign * (x[train, f] - cut) > 0) == (y[train] == 1)))
                    if right > best[0]:
                        best = (right, f, cut, sign)
        _, f, cut, sign = best
        correct += int(int(sign * (x[i, f] - cut) > 0) == y[i])
    return correct


def _chance_limit(n: int) -> int:
    """The most correct calls out of ``n`` a guesser makes with probability >= 1 % (one-sided binomial)."""
    tail = 0.0
    for k in range(n, -1, -1):
        tail += math.comb(n, k) / 2**n
        if tail >= 0.01:
            return k
    return n


def _input_extent(path: str) -> tuple[float, ...]:
    """World box (mm) of an input's voxels: where its field of view begins and ends."""
    img = nib.load(path)
    corners = np.array(
        [[a, b, c, 1.0] for a in (0, img.shape[0] - 1) for b in (0, img.shape[1] - 1) for c in (0, img.shape[2] - 1)]
    )
    world = (img.affine @ corners.T).T[:, :3]
    return (*world.min(0), *world.max(0))


def _check_one_field_of_view(study: Study, key_path: Path) -> tuple[np.ndarray, dict]:
    key = read_key(key_path, study)
    labels = np.array([key[c]["source"] == "synthetic" for c in study.ids], dtype=int)
    arrays = [np.asarray(nib.load(str(study.path(c))).dataobj) for c in study.cases]
    boxes = np.array([_bbox(a) for a in arrays])
    # control: on the inputs, where the field of view begins and ends tells the sources apart every time
    extents = np.array([_input_extent(key[c]["original"]) for c in study.ids])
    assert _stump_correct(extents, labels) == len(labels)
    # on the study files it tells nothing: the stump at chance, one non-zero bounding box for all
    correct, limit = _stump_correct(boxes, labels), _chance_limit(len(labels))
    assert correct <= limit, f"bounding box stump: {correct}/{len(labels)} right (chance: at most {limit})"
    assert len({tuple(b) for b in boxes}) == 1
    # the field of view in the key is that box, and every case is blank outside it
    fov = json.loads(key_path.read_text())["field_of_view"]
    lo, hi = fov["box"]
    assert tuple(boxes[0]) == (*lo, *hi)
    inside = np.zeros(arrays[0].shape, bool)
    inside[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1] = True
    assert fov["voxels"] == inside.sum() and 0 < fov["fraction_of_grid"] < 1
    assert all(not a[~inside].any() for a in arrays)
    return inside, key


def test_default_grid_every_case_shows_the_same_field_of_view(folders, tmp_path, capsys):
    """Real scans cut short below: before, only real cases had blank bottom planes; now all cases have them."""
    from napari_meddiff.cli import main

    real, syn = folders
    out, key_path = tmp_path / "study", tmp_path / "key.json"
    args = ["--real", real, "--synthetic", syn, "--out", out, "--key", key_path, "--seed", 5]
    assert main(["review", "create", *map(str, args)]) == 0
    study = Study.load(out)
    inside, key = _check_one_field_of_view(study, key_path)
    printed = capsys.readouterr().out  # the organiser is told how much is cut, and by which scan
    assert "field of view all cases cover: 88% of the grid" in printed and "sub-000001_T1w.nii.gz" in printed
    # only what a real scan does not cover is cut: the model grid's three lowest planes, nothing else
    assert inside.shape == SYN_SHAPE
    assert not inside[:, :, :SYN_PLANES_BELOW_REAL].any() and inside[:, :, SYN_PLANES_BELOW_REAL:].all()
    # a synthetic case (already on the grid) inside it: the one intensity rule, its window taken inside too
    for case in study.cases:
        if key[case.case_id]["source"] != "synthetic":
            continue
        x = np.asarray(nib.load(key[case.case_id]["original"]).dataobj, dtype=np.float32)[inside]
        lo, hi = np.percentile(x, 0.5), np.percentile(x[x > x.mean()], 99.5)
        expected = np.rint(np.clip((x - lo) / (hi - lo), 0, 1) * 255)
        levels = np.asarray(nib.load(str(study.path(case))).dataobj.get_unscaled())[inside]
        assert np.abs(levels - expected).max() <= 1 and np.mean(levels == expected) > 0.99


def test_real_grid_every_case_shows_the_same_field_of_view(folders, tmp_path):
    """``--grid REAL``: the model's smaller grid left the synthetic cases blank borders; now all cases share them."""
    real, syn = folders
    reference = real / "sub-000001_T1w.nii.gz"
    study = create_study(
        real, syn, tmp_path / "study", key=tmp_path / "key.json", seed=6, grid=reference, on_skip=lambda p, why: None
    )
    inside, _ = _check_one_field_of_view(study, tmp_path / "key.json")
    assert inside.shape == REAL_SHAPE


def test_a_cohort_folder_gives_one_case_per_subject(folders, tmp_path):
    real, syn = folders
    skipped: dict[str, str] = {}
    study = create_study(
        real,
        syn,
        tmp_path / "study",
        key=tmp_path / "key.json",
        seed=7,
        on_skip=lambda p, why: skipped.setdefault(p.name, why),
    )
    key = read_key(tmp_path / "key.json", study)
    originals = sorted(Path(v["original"]).name for v in key.values() if v["source"] == "real")
    assert originals == [f"sub-{s:06d}_T1w.nii.gz" for s in range(1, N_SUBJECTS + 1)]  # the scan, not its variant
    variants = sorted(n for n in skipped if "lesionfree" in n)
    assert variants == sorted(p.name for p in real.glob("*_T1w-lesionfree.nii.gz")) and variants
    assert all("one scan per subject" in skipped[n] for n in variants)
    assert "sub-000001_T1w.nii.gz" in skipped["sub-000001_T1w-lesionfree.nii.gz"]  # which scan was kept


def test_subjects_by_name():
    from napari_meddiff.review.inputs import subjects

    names = [
        "sub-01_ses-2_T1w.nii.gz",
        "sub-01_ses-1_T1w.nii.gz",
        "sub-02_T1w-lesionfree.nii.gz",
        "sub-02_T1w.nii.gz",
        "scan-defaced.nii",
        "scan.nii",
        "brain-ldm-3d_seed1.nii.gz",
        "brain-ldm-3d_seed10.nii.gz",
        "ldm-a.nii",
        "ldm-b.nii",
    ]
    groups = {s: [p.name for p in g] for s, g in subjects([Path(n) for n in names]).items()}
    assert groups == {
        "sub-01": ["sub-01_ses-1_T1w.nii.gz", "sub-01_ses-2_T1w.nii.gz"],
        "sub-02": ["sub-02_T1w.nii.gz", "sub-02_T1w-lesionfree.nii.gz"],
        "scan": ["scan.nii", "scan-defaced.nii"],
        "brain-ldm-3d_seed1": ["brain-ldm-3d_seed1.nii.gz"],
        "brain-ldm-3d_seed10": ["brain-ldm-3d_seed10.nii.gz"],
        "ldm-a": ["ldm-a.nii"],
        "ldm-b": ["ldm-b.nii"],
    }


def test_cases_with_no_common_field_of_view_are_refused():
    from napari_meddiff.errors import MeddiffError
    from napari_meddiff.review.blind import common_field_of_view

    a, b = np.zeros((4, 4, 4), bool), np.zeros((4, 4, 4), bool)
    a[:2], b[2:] = True, True
    with pytest.raises(MeddiffError, match="no field of view in common"):
        common_field_of_view([a, b])
