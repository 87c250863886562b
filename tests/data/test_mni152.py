"""The synthetic MNI152-derived cohort: determinism, anatomy, lesions, files and manifest (real template)."""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest
from scipy import ndimage

from napari_meddiff.data.mni152 import (
    HELDOUT_SEEDS,
    TRAIN_SEEDS,
    check_split,
    load_template,
    make_subject,
    split_of,
    subject_files,
    subject_has_lesion,
    write_cohort,
)
from napari_meddiff.errors import MeddiffError
from napari_meddiff.io.volume import read_volume

VOXEL_ML = 8 / 1000  # 2 mm isotropic


@pytest.fixture(scope="module")
def subject0():
    return make_subject(0, lesion=False)


@pytest.fixture(scope="module")
def lesion_subject():
    return make_subject(11, lesion=True)


def test_template_loads_offline_on_its_grid():
    tpl = load_template(2.0)
    assert tpl["t1"].shape == (99, 117, 95)
    np.testing.assert_allclose(np.diag(tpl["affine"]), [2, 2, 2, 1])
    assert 90 < tpl["t1"].max() <= 100  # 0..1 template times the fixed scale 100
    assert load_template(2.0) is tpl  # cached


def test_same_seed_identical_different_seeds_differ(subject0):
    again = make_subject(0, lesion=False)
    assert np.array_equal(subject0.image.array, again.image.array)
    assert np.array_equal(subject0.labels.array, again.labels.array)
    other = make_subject(1, lesion=False)
    assert not np.array_equal(subject0.image.array, other.image.array)
    assert not np.array_equal(subject0.labels.array, other.labels.array)


def test_geometry_dtypes_and_intensity_scale(subject0):
    tpl = load_template(2.0)
    for vol in (subject0.image, subject0.labels):
        np.testing.assert_array_equal(vol.affine, tpl["affine"])
        assert vol.shape == tpl["t1"].shape
    assert subject0.image.array.dtype == np.float32 and subject0.labels.array.dtype == np.uint8
    assert set(np.unique(subject0.labels.array)) == {0, 1, 2, 3}
    img = subject0.image.array
    assert img.min() >= 0 and 60 < img.max() < 160  # natural template scale, not [0, 1]
    assert subject0.lesion_mask is None and subject0.lesion_free is None and not subject0.has_lesion


def test_labels_inside_brain_and_match_image(subject0):
    img, lab = subject0.image.array, subject0.labels.array
    # labelled voxels are brain (non-background), unlabelled voxels far from the brain are background
    assert np.mean(img[lab > 0] > 10) > 0.99
    far = ~ndimage.binary_dilation(lab > 0, iterations=3)
    assert np.percentile(img[far], 99) < 10
    # T1 contrast: WM brighter than GM brighter than CSF
    means = [float(img[lab == c].mean()) for c in (1, 2, 3)]
    assert means[0] < means[1] < means[2]
    # plausible (MNI-sized) tissue volumes, mL
    csf, gm, wm = (np.count_nonzero(lab == c) * VOXEL_ML for c in (1, 2, 3))
    assert 50 < csf < 500 and 600 < gm < 1500 and 400 < wm < 1000
    assert 1400 < csf + gm + wm < 2300


def test_lesion_subject(lesion_subject):
    s = lesion_subject
    assert s.has_lesion and s.lesion_mask is not None and s.lesion_free is not None
    mask = s.lesion_mask.array.astype(bool)
    assert s.lesion_mask.array.dtype == np.uint8 and mask.any()
    assert 0.05 < s.lesion_volume_ml < 30
    assert np.mean(s.labels.array[mask] == 3) > 0.5  # mostly in white matter
    diff = np.abs(s.image.array - s.lesion_free.array)
    assert diff[mask].mean() > 5
    far = ~ndimage.binary_dilation(mask, iterations=6)
    assert np.array_equal(s.image.array[far], s.lesion_free.array[far])
    np.testing.assert_array_equal(s.lesion_free.affine, s.image.affine)
    # the lesion-free image is the same subject as without a forced lesion
    plain = make_subject(11, lesion=False)
    assert np.array_equal(plain.image.array, s.lesion_free.array)


def test_noise_free_subject_differs_by_rician_noise_only(subject0):
    """``noise=False``: the same anatomy, labels and geometry; the difference is zero-mean in the brain (Rician
    noise is nearly Gaussian there) and positive in the background (magnitudes of noise)."""
    clean = make_subject(0, lesion=False, noise=False)
    assert np.array_equal(clean.labels.array, subject0.labels.array)
    np.testing.assert_array_equal(clean.image.affine, subject0.image.affine)
    diff = subject0.image.array - clean.image.array
    brain, background = clean.image.array > 40, clean.image.array == 0
    assert 0 < diff[brain].std() <= 2.5 + 0.1 and abs(diff[brain].mean()) < 0.1 * diff[brain].std() + 0.01
    assert diff[background].mean() > 0 and (diff[background] >= 0).all()


def test_lesion_decided_by_seed():
    flags = [subject_has_lesion(s, 0.3) for s in range(400)]
    assert 0.2 < np.mean(flags) < 0.4
    assert flags == [subject_has_lesion(s, 0.3) for s in range(400)]
    assert not any(subject_has_lesion(s, 0.0) for s in range(50))
    assert all(subject_has_lesion(s, 1.0) for s in range(50))


def test_splits():
    assert split_of(0) == "train" and split_of(HELDOUT_SEEDS[0]) == "heldout"
    assert TRAIN_SEEDS.stop <= HELDOUT_SEEDS.start  # disjoint
    check_split([0, 5, 99_999], "train")
    check_split(HELDOUT_SEEDS, "heldout")
    with pytest.raises(MeddiffError, match="not in the train split"):
        check_split([3, 100_005], "train")
    with pytest.raises(MeddiffError, match="heldout"):
        check_split([3], "heldout")
    with pytest.raises(MeddiffError):
        split_of(HELDOUT_SEEDS.stop)
    with pytest.raises(MeddiffError):
        make_subject(0, resolution_mm=3.0)


def _mixed_window() -> int:
    """First seed s such that subjects s, s+1 are one with and one without a lesion (fraction 0.3)."""
    s = 0
    while subject_has_lesion(s, 0.3) == subject_has_lesion(s + 1, 0.3):
        s += 1
    return s


def test_write_cohort_files_manifest_resume_and_cli(tmp_path):
    from napari_meddiff.cli import main

    out = tmp_path / "cohort"
    start = _mixed_window()
    manifest = write_cohort(out, 2, seed=start, progress=False)
    tpl = load_template(2.0)
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["seed"]) for r in rows] == [start, start + 1]
    assert {r["has_lesion"] for r in rows} == {"0", "1"}
    for r in rows:
        s = int(r["seed"])
        assert r["subject"] == f"sub-{s:06d}" and r["split"] == "train"
        img = read_volume(out / r["image"])
        lab = read_volume(out / r["labels"])
        assert img.array.dtype == np.float32 and lab.array.dtype == np.uint8
        np.testing.assert_allclose(img.affine, tpl["affine"])
        np.testing.assert_allclose(lab.affine, tpl["affine"])
        assert set(np.unique(lab.array)) == {0, 1, 2, 3}
        if r["has_lesion"] == "1":
            assert r["lesion_mask"] == subject_files(s)["lesion_mask"]
            les = read_volume(out / r["lesion_mask"])
            free = read_volume(out / r["lesion_free"])
            assert les.array.dtype == np.uint8 and les.array.any()
            assert float(r["lesion_volume_ml"]) == pytest.approx(np.count_nonzero(les.array) * VOXEL_ML, abs=1e-3)
            assert free.array.dtype == np.float32
            fresh = make_subject(s, lesion=True)
            assert np.array_equal(img.array, fresh.image.array)  # written data = generated data
        else:
            assert r["lesion_mask"] == "" and float(r["lesion_volume_ml"]) == 0
            assert not (out / subject_files(s)["lesion_mask"]).exists()

    # resume: nothing regenerated, rows of earlier calls kept
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.nii.gz")}
    assert main(["cohort", "--num", "1", "--seed", str(start + 1), "--out", str(out), "--quiet"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.nii.gz")} == mtimes
    with open(manifest, newline="") as f:
        assert [int(r["seed"]) for r in csv.DictReader(f)] == [start, start + 1]
    assert not any(name.startswith(".") for name in os.listdir(out))  # no temporary files left

    # other parameters in the same folder are refused; bad arguments give one-line errors
    with pytest.raises(MeddiffError, match="other parameters"):
        write_cohort(out, 1, seed=start, lesion_fraction=0.9, progress=False)
    assert main(["cohort", "--num", "0", "--out", str(out)]) == 2
    assert main(["cohort", "--num", "1", "--seed", str(HELDOUT_SEEDS.stop), "--out", str(out)]) == 2


@pytest.mark.slow
def test_one_mm_subject():
    s = make_subject(3, resolution_mm=1.0, lesion=True)
    assert s.image.shape == (197, 233, 189)
    np.testing.assert_allclose(np.diag(s.image.affine), [1, 1, 1, 1])
    assert s.lesion_mask.array.any()


def test_hyperintense_lesion_saturates_without_headroom_and_keeps_contrast_with_it():
    """The default window (upper percentile -> 1, clipped) flattens a bright lesion to 1.0 like the brightest
    white matter; ``upper_value: 0.8`` keeps it brighter than white matter and below 1, and denormalise inverts it."""
    from napari_meddiff.io.intensity import denormalise, intensity_window, normalise

    s = make_subject(1007, lesion=True)  # seed 1007: a hyperintense lesion
    arr, lesion = s.image.array, s.lesion_mask.array > 0
    wm = (s.labels.array == 3) & ~ndimage.binary_dilation(lesion, iterations=3)
    assert arr[lesion].mean() > 1.1 * s.lesion_free.array[lesion].mean()
    clipped = normalise(arr, intensity_window(arr))
    assert np.median(clipped[lesion]) == 1.0
    window = intensity_window(arr, {"upper_value": 0.8})
    kept = normalise(arr, window)
    assert np.median(kept[wm]) < np.median(kept[lesion]) < 1.0 and (kept[lesion] < 1.0).mean() > 0.5
    inside = (arr >= window[0]) & (arr <= window[1])
    np.testing.assert_allclose(denormalise(kept, window)[inside], arr[inside], rtol=1e-4, atol=1e-3)
    with pytest.raises(MeddiffError, match="upper_value"):
        intensity_window(arr, {"upper_value": 1.5})
