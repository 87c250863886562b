"""Diffusion segmentation with ensemble uncertainty (issue 6): geometry, probabilities, uncertainty,
determinism, batching, volumes and the CLI, on tiny random-weight models (2D slice-by-slice and 3D)."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest

import napari_meddiff as md
from napari_meddiff.errors import MeddiffError
from napari_meddiff.io.volume import Volume, read_volume, volume_from_sitk
from napari_meddiff.models import load_model
from napari_meddiff.tasks.segment import combine_votes, normalised_entropy, plan_segmentation, run_members, segment
from napari_meddiff.testing.tiny_models import make_tiny_model

FAST = {"sampler": "ddim", "steps": 2}


@pytest.fixture(scope="module")
def seg_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("segmodels")
    return {
        "2d": load_model(make_tiny_model(root / "tiny-seg-2d", "segmentation", 2, image_shape=(16, 16))),
        "3d": load_model(make_tiny_model(root / "tiny-seg-3d", "segmentation", 3, image_shape=(8, 8, 8))),
        "root": root,
    }


def blob_image(shape=(14, 12, 9), seed=0) -> np.ndarray:
    """A bright ellipsoid with structure inside, on a dark noisy background."""
    rng = np.random.default_rng(seed)
    idx = np.indices(shape).astype(np.float32)
    c = (np.array(shape, np.float32) - 1) / 2
    r = (((idx - c[:, None, None, None]) / (c[:, None, None, None] * 0.8 + 1e-3)) ** 2).sum(0)
    img = np.where(r < 1, 60 + 30 * (r < 0.4), 0).astype(np.float32)
    return img + rng.random(shape).astype(np.float32) * 3


def oblique_lps_volume() -> Volume:
    """An oblique scan read the way SimpleITK gives it (LPS world, rotated direction cosines)."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.transpose(blob_image(), (2, 1, 0)))
    img.SetSpacing((3.0, 3.5, 4.5))
    theta = np.deg2rad(20)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    img.SetDirection(tuple((rot @ np.diag([1, -1, 1])).ravel()))
    img.SetOrigin((12.0, -7.0, 30.0))
    return volume_from_sitk(img)


def check_result(res, image: Volume, n_classes: int = 4):
    for vol in (res.labels, res.probabilities, res.uncertainty):
        np.testing.assert_array_equal(vol.affine, image.affine)
        assert vol.shape[:3] == image.shape[:3]
    assert res.probabilities.shape == (*image.shape, n_classes)
    assert np.issubdtype(res.labels.array.dtype, np.integer)
    p = res.probabilities.array
    assert p.dtype == np.float32 and p.min() >= 0 and p.max() <= 1
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(res.labels.array, p.argmax(-1))
    u = res.uncertainty.array
    assert u.dtype == np.float32 and u.min() >= 0 and u.max() <= 1


@pytest.mark.parametrize("dims", ["2d", "3d"])
def test_oblique_lps_input_comes_back_in_its_own_geometry(seg_models, dims):
    image = oblique_lps_volume()
    assert not np.allclose(image.affine[:3, :3], np.diag(np.diag(image.affine[:3, :3])))  # really oblique
    res = segment(seg_models[dims], image, ensemble=3, seed=1, **FAST)
    check_result(res, image)
    assert res.uncertainty.array.max() > 0  # random members disagree somewhere
    assert res.provenance["ensemble"] == 3 and res.provenance["model"] == f"tiny-seg-{dims}"


def test_grid_covers_content_and_tiles_large_regions(seg_models):
    model = seg_models["2d"]  # 16 x 16 slices at 4 mm: 64 mm field of view
    big = Volume(blob_image((40, 30, 6)), np.diag([3.0, 3.0, 4.0, 1.0]))  # ~120 x 90 mm content
    plan = plan_segmentation(model, big, region="full")
    assert plan.grid.shape[0] > 16 and plan.grid.shape[1] > 16
    per_slice = plan.num_items // plan.grid.shape[2]
    assert per_slice > 1  # several in-plane tiles per slice
    covered = np.zeros(plan.grid.shape, bool)
    for s in plan.starts:
        covered[plan._index(s)] = True
    assert covered.all()
    # the grid covers every input voxel centre
    ijk = np.array([[i, j, k, 1] for i in (0, 39) for j in (0, 29) for k in (0, 5)], float)
    vox = (np.linalg.inv(plan.grid.affine) @ (big.affine @ ijk.T)).T[:, :3]
    assert (vox >= -1e-6).all() and (vox <= np.array(plan.grid.shape) - 1 + 1e-6).all()
    res = segment(model, big, ensemble=2, region="full", **FAST)
    check_result(res, big)
    # content that fits in one tile (57 mm <= 15 x 4 mm) is not tiled just to make room for a margin
    snug = Volume(np.full((20, 20, 3), 50.0, np.float32), np.diag([3.0, 3.0, 4.0, 1.0]))
    plan = plan_segmentation(model, snug)
    assert plan.grid.shape[:2] == (16, 16) and plan.num_items == plan.grid.shape[2]


def test_uncertainty_zero_exactly_where_members_agree(seg_models):
    model = seg_models["2d"]
    # input on the model's own 4 mm grid (RAS), so model grid and input grid coincide
    image = Volume(blob_image((12, 10, 5)), np.diag([4.0, 4.0, 4.0, 1.0]))
    plan = plan_segmentation(model, image, region="full")
    members = run_members(model, plan.item_images(), [0, 1, 2], **FAST, batch_size=64)
    probs, unc = combine_votes(plan, members, 4)
    agree = (members == members[:1]).all(0)  # (items, *tile)
    for i, s in enumerate(plan.starts):
        u = unc[plan._index(s)]
        assert (u[agree[i]] == 0).all() and (u[~agree[i]] > 0).all()
    res = segment(model, image, ensemble=3, region="full", **FAST)
    p, u = res.probabilities.array, res.uncertainty.array
    assert (p.max(-1) > 1 - 1e-6).any() and (p.max(-1) < 1 - 1e-6).any()
    np.testing.assert_array_equal(u < 1e-6, p.max(-1) > 1 - 1e-6)
    # a single member has nothing to disagree with
    assert segment(model, image, ensemble=1, region="full", **FAST).uncertainty.array.max() == 0


def test_entropy_normalisation():
    p = np.array([[1, 0.5, 0.25, 1 / 3], [0, 0.5, 0.25, 1 / 3], [0, 0, 0.25, 1 / 3], [0, 0, 0.25, 0]])
    np.testing.assert_allclose(normalised_entropy(p), [0, 0.5, 1, np.log(3) / np.log(4)], atol=1e-6)


def test_same_seed_same_result_other_seed_differs(seg_models):
    image = Volume(blob_image(), np.diag([3.0, 3.0, 3.0, 1.0]))
    a = segment(seg_models["2d"], image, ensemble=2, seed=7, **FAST)
    b = segment(seg_models["2d"], image, ensemble=2, seed=7, **FAST)
    c = segment(seg_models["2d"], image, ensemble=2, seed=8, **FAST)
    np.testing.assert_array_equal(a.labels.array, b.labels.array)
    np.testing.assert_array_equal(a.probabilities.array, b.probabilities.array)
    np.testing.assert_array_equal(a.uncertainty.array, b.uncertainty.array)
    assert not np.array_equal(a.probabilities.array, c.probabilities.array)
    # the model's own window, given explicitly, changes nothing
    d = segment(seg_models["2d"], image, ensemble=2, seed=7, window=a.provenance["intensity_window"], **FAST)
    np.testing.assert_array_equal(a.probabilities.array, d.probabilities.array)


@pytest.mark.parametrize("dims", ["2d", "3d"])
def test_ensemble_as_a_batch_equals_members_one_at_a_time(seg_models, dims):
    model = seg_models[dims]
    image = Volume(blob_image((8, 8, 4)), np.diag([3.0, 3.0, 3.0, 1.0]))
    plan = plan_segmentation(model, image)
    tiles = plan.item_images()
    together = run_members(model, tiles, [0, 1, 2, 3], seed=3, batch_size=4 * len(tiles), **FAST)
    alone = np.concatenate([run_members(model, tiles, [m], seed=3, batch_size=1, **FAST) for m in range(4)])
    np.testing.assert_array_equal(together, alone)
    # and through the public API: any batch size gives the same segmentation
    r1 = segment(model, image, ensemble=3, seed=3, batch_size=1, **FAST)
    r2 = segment(model, image, ensemble=3, seed=3, batch_size=1000, **FAST)
    np.testing.assert_array_equal(r1.labels.array, r2.labels.array)
    np.testing.assert_array_equal(r1.probabilities.array, r2.probabilities.array)


def test_volumes_ml_match_label_counts(seg_models):
    image = oblique_lps_volume()
    res = segment(seg_models["2d"], image, ensemble=2, **FAST)
    voxel_ml = 3.0 * 3.5 * 4.5 / 1000
    assert list(res.volumes_ml) == ["background", "CSF", "GM", "WM"]
    for c, name in enumerate(res.volumes_ml):
        assert res.volumes_ml[name] == pytest.approx(np.count_nonzero(res.labels.array == c) * voxel_ml, rel=1e-9)
    assert sum(res.volumes_ml.values()) == pytest.approx(image.array.size * voxel_ml)


def test_2d_input_and_progress_and_cancel(seg_models):
    from napari_meddiff.errors import Cancelled

    image = Volume(blob_image((20, 18, 1))[..., 0], np.diag([2.0, 2.0, 2.0, 1.0]))
    seen = []
    res = segment(seg_models["2d"], image, ensemble=3, batch_size=1, on_step=seen.append, **FAST)
    assert res.labels.shape == (20, 18) and res.probabilities.shape == (20, 18, 4)
    assert seen[-1].fraction == pytest.approx(1.0) and seen[-1].member_fraction == pytest.approx((1.0, 1.0, 1.0))
    assert [s.members for s in seen[:2]] == [(0,), (0,)]  # member-major order: member 1 first
    assert all(b.fraction >= a.fraction for a, b in zip(seen, seen[1:]))
    with pytest.raises(Cancelled):
        segment(seg_models["2d"], image, ensemble=3, should_cancel=lambda: True, **FAST)


def test_rejects_bad_models_and_arguments(seg_models, tmp_path):
    image = Volume(blob_image(), np.eye(4))
    gen_model = load_model(make_tiny_model(tmp_path / "ddpm", "ddpm", 2))
    with pytest.raises(MeddiffError, match="not a segmentation model"):
        segment(gen_model, image)
    with pytest.raises(MeddiffError, match="ensemble"):
        segment(seg_models["2d"], image, ensemble=0)
    with pytest.raises(MeddiffError, match="axis"):
        segment(seg_models["2d"], image, axis="oblique", **FAST)
    with pytest.raises(MeddiffError, match="window"):
        segment(seg_models["2d"], image, window=(5.0, 1.0), **FAST)


@pytest.mark.parametrize("dims", ["2d", "3d"])
def test_grid_shares_the_lattice_of_an_input_at_the_model_voxel_size(seg_models, dims):
    """A scan at the model's voxel size is not resampled: the model sees its voxel values, not a half-voxel blur."""
    from napari_meddiff.io.intensity import normalise

    model = seg_models[dims]  # 4 mm voxels
    arr = blob_image((13, 11, 9), seed=3)  # odd sizes: the content's centre sits between voxel centres
    for affine in (np.diag([4.0, 4.0, 4.0, 1.0]), np.diag([-4.0, 4.0, 4.0, 1.0])):
        affine[:3, 3] = (10.3, -5.1, 2.0)
        image = Volume(arr, affine)
        plan = plan_segmentation(model, image)
        index = np.linalg.inv(image.affine) @ plan.grid.affine
        assert np.allclose(index[:3, 3], np.round(index[:3, 3]), atol=1e-6)
        ijk = np.argwhere(np.ones(plan.grid.shape, bool))
        src = np.round(ijk @ index[:3, :3].T + index[:3, 3]).astype(int)
        inside = ((src >= 0) & (src < np.array(arr.shape))).all(1)
        norm = normalise(arr, plan.window)
        got = plan.image[tuple(ijk[inside].T)]
        assert np.allclose(got, norm[tuple(src[inside].T)], atol=1e-5)


def test_context_slices_come_from_the_scan_beyond_the_grid_and_zeros_beyond_the_scan(seg_models):
    from napari_meddiff.io.intensity import normalise

    model = load_model(
        make_tiny_model(seg_models["root"] / "tiny-seg-ctx", "segmentation", 2, image_shape=(16, 16), context_slices=2)
    )
    arr = np.full((14, 12, 20), 5.0, np.float32)  # a faint background in every slice (below the content threshold)
    arr[3:11, 3:9, 8:14] = 80.0  # the content: slices 8..13
    image = Volume(arr, np.diag([4.0, 4.0, 4.0, 1.0]))
    plan = plan_segmentation(model, image, window=(0.0, 80.0))  # the background at 0.0625 < CONTENT_THRESHOLD
    tiles = plan.item_images()
    assert tiles.shape == (plan.num_items, 5, 16, 16)
    ks = [s[2] for s in plan.starts]
    first = ks.index(0)
    index = np.linalg.inv(image.affine) @ plan.grid.affine
    z0 = int(round(index[2, 3]))  # the scan's slice under grid slice 0
    assert 2 <= z0 <= 8  # the content box plus a margin, not the whole scan
    faint = float(normalise(np.array([5.0], np.float32), plan.window)[0])
    for c in range(5):  # channels: grid slices -2..2 around slice 0, read from the scan where it exists
        centre = tiles[first, c][tiles[first, c] > 0]
        assert centre.size and np.allclose(centre.min(), faint, atol=1e-5)
    edge = Volume(arr[:, :, 8:], np.diag([4.0, 4.0, 4.0, 1.0]))  # the content starts at the scan's first slice
    plan = plan_segmentation(model, edge, window=(0.0, 80.0))
    tiles = plan.item_images()
    index = np.linalg.inv(edge.affine) @ plan.grid.affine
    first = [s[2] for s in plan.starts].index(0)
    below_scan = 2 - int(round(index[2, 3]))  # context channels that fall below the scan's first slice
    assert below_scan >= 1
    assert not tiles[first, :below_scan].any() and tiles[first, below_scan].any()


def test_snap_grid_leaves_other_lattices_alone():
    from napari_meddiff.io.geometry import make_grid, snap_grid

    grid = make_grid((2.0, 2.0, 2.0), (8, 8, 8), (0.5, 0.3, 0.0))
    other_spacing = Volume(np.zeros((5, 5, 5), np.float32), np.diag([3.0, 3.0, 3.0, 1.0]))
    assert np.allclose(snap_grid(grid, other_spacing).affine, grid.affine)
    theta = np.deg2rad(10)
    oblique = np.diag([1.0, 1.0, 2.0, 1.0])
    oblique[:2, :2] = 2.0 * np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    snapped = snap_grid(grid, Volume(np.zeros((5, 5, 5), np.float32), oblique)).affine
    assert np.allclose(snapped[:2, 3], grid.affine[:2, 3])  # x and y: rotated in the scan, left alone
    assert np.isclose(snapped[2, 3] / 2.0, np.round(snapped[2, 3] / 2.0))  # z: shared, snapped
    assert not np.isclose(grid.affine[2, 3] / 2.0, np.round(grid.affine[2, 3] / 2.0))
    same = Volume(np.zeros((5, 5, 5), np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    moved = snap_grid(grid, same).affine
    assert np.allclose(moved[:3, :3], grid.affine[:3, :3])
    assert np.abs(moved[:3, 3] - grid.affine[:3, 3]).max() <= 1.0 + 1e-9  # at most half a voxel
    assert np.allclose(moved[:3, 3] / 2.0, np.round(moved[:3, 3] / 2.0))


def test_cohort_subject_brain_inside_model_grid(seg_models):
    """The content region found from intensities alone covers the whole labelled brain of a cohort subject."""
    from napari_meddiff.data.mni152 import HELDOUT_SEEDS, make_subject

    sub = make_subject(HELDOUT_SEEDS[0], resolution_mm=2.0, lesion=False)
    model = seg_models["2d"]
    plan = plan_segmentation(model, sub.image)
    brain = np.argwhere(sub.labels.array > 0)
    world = sub.image.affine @ np.c_[brain, np.ones(len(brain))].T
    vox = (np.linalg.inv(plan.grid.affine) @ world)[:3].T
    assert (vox >= -0.5).all() and (vox <= np.array(plan.grid.shape) - 0.5).all()
    res = segment(model, sub.image, ensemble=1, steps=1, sampler="ddim")
    check_result(res, sub.image)


def test_cli_end_to_end(seg_models, tmp_path, monkeypatch, capsys):
    from napari_meddiff.cli import main
    from napari_meddiff.io.volume import write_volume

    monkeypatch.setenv("MEDDIFF_MODELS", str(seg_models["root"]))
    image = oblique_lps_volume()
    src = write_volume(image, tmp_path / "scan.nii.gz")
    out = tmp_path / "seg"
    args = [
        "segment",
        "--model",
        "tiny-seg-2d",
        "--image",
        str(src),
        "--out",
        str(out),
        "--ensemble",
        "3",
        "--sampler",
        "ddim",
        "--steps",
        "2",
        "--seed",
        "4",
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["labels.nii.gz", "probabilities.nii.gz", "uncertainty.nii.gz", "volumes.csv", "segment.json"]
    )
    src_img = nib.load(str(src))
    lab = nib.load(str(out / "labels.nii.gz"))
    prob = nib.load(str(out / "probabilities.nii.gz"))
    unc = nib.load(str(out / "uncertainty.nii.gz"))
    for img in (lab, prob, unc):
        np.testing.assert_allclose(img.affine, src_img.affine, atol=1e-5)
        assert img.shape[:3] == src_img.shape
    assert np.issubdtype(lab.get_data_dtype(), np.integer)
    assert prob.shape == (*src_img.shape, 4)
    p = prob.get_fdata()
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-5)
    labels = np.asanyarray(lab.dataobj)
    np.testing.assert_array_equal(labels, p.argmax(-1))
    u = unc.get_fdata()
    assert 0 <= u.min() and u.max() <= 1
    with open(out / "volumes.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == ["background", "CSF", "GM", "WM"]
    voxel_ml = abs(np.linalg.det(src_img.affine[:3, :3])) / 1000
    for r in rows:
        assert float(r["volume_ml"]) == pytest.approx(np.count_nonzero(labels == int(r["label"])) * voxel_ml, abs=1e-3)
    meta = json.loads((out / "segment.json").read_text())
    assert meta["ensemble"] == 3 and meta["seed"] == 4 and meta["steps"] == 3 - 1
    # the same through the Python API, read back through read_volume
    assert read_volume(out / "labels.nii.gz").array.dtype == np.uint8
    # no overwriting without --overwrite; one-line error
    assert main(args) == 2
    assert "exists" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    np.testing.assert_array_equal(np.asanyarray(nib.load(str(out / "labels.nii.gz")).dataobj), labels)


def test_cli_errors(seg_models, tmp_path, monkeypatch, capsys):
    from napari_meddiff.cli import main

    monkeypatch.setenv("MEDDIFF_MODELS", str(seg_models["root"]))
    assert (
        main(
            [
                "segment",
                "--model",
                "tiny-seg-2d",
                "--image",
                str(tmp_path / "missing.nii.gz"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "not found" in capsys.readouterr().err
    assert main(["segment", "--model", "tiny-seg-2d", "--image", "x.nii.gz", "--out", "o", "--ensemble", "0"]) == 2
    assert "--ensemble" in capsys.readouterr().err


@pytest.mark.parametrize("dims", ["2d", "3d"])
def test_probabilities_combine_is_the_mean_of_member_probabilities(seg_models, dims):
    import torch

    from napari_meddiff.tasks.segment import combine_probabilities, member_probabilities

    z = torch.tensor([[[-1.0, 3.0]], [[1.0, -1.0]], [[0.0, -1.0]], [[-1.0, -1.0]]]).reshape(1, 4, 1, 2)
    p = member_probabilities(z).astype(np.float32)
    np.testing.assert_allclose(p[0, :, 0, 0], [0.0, 2 / 3, 1 / 3, 0.0], atol=1e-3)  # clipped, normalised
    np.testing.assert_allclose(p[0, :, 0, 1], [1.0, 0.0, 0.0, 0.0], atol=1e-3)

    model = seg_models[dims]
    image = Volume(blob_image((12, 10, 6)), np.diag([4.0, 4.0, 4.0, 1.0]))
    plan = plan_segmentation(model, image, region="full")
    members = run_members(model, plan.item_images(), [0, 1, 2], **FAST, batch_size=64, probabilities=True)
    assert members.dtype == np.float16 and members.shape[:3] == (3, plan.num_items, 4)
    np.testing.assert_allclose(members.astype(np.float32).sum(2), 1.0, atol=5e-3)
    probs, unc = combine_probabilities(plan, members)
    one = combine_probabilities(plan, members[:1])[0]
    assert not np.allclose(probs, one)  # members differ, and the mean is not any one of them
    res = segment(model, image, ensemble=3, region="full", combine="probabilities", **FAST)
    check_result(res, image)
    assert res.provenance["combine"] == "probabilities" and "mean" in res.provenance["probabilities"]
    again = segment(model, image, ensemble=3, region="full", combine="probabilities", batch_size=1, **FAST)
    np.testing.assert_array_equal(res.probabilities.array, again.probabilities.array)
    # a single member has an uncertainty of its own (its probabilities), unlike a single vote
    assert segment(model, image, ensemble=1, region="full", combine="probabilities", **FAST).uncertainty.array.max() > 0
    with pytest.raises(MeddiffError, match="combine"):
        segment(model, image, combine="mean", **FAST)


# --- an absurd request is refused before allocating (issue 13) ----------------------------------------------------


def test_absurd_voxel_size_is_refused_before_allocating(tiny_models):
    array = np.random.default_rng(0).random((8, 8, 8), dtype=np.float32)
    with pytest.raises(MeddiffError, match="voxel sizes"):  # beyond 10 m a voxel is a damaged header (issue 36)
        md.Volume(array, np.diag([1e6, 1e6, 1e6, 1.0]))
    image = md.Volume(array, np.diag([5e3, 5e3, 5e3, 1.0]))  # plausible for a Volume, absurd for a model grid
    with pytest.raises(MeddiffError, match="model grid over this image.*voxel size"):
        md.segment(str(tiny_models["seg2d"]), image, ensemble=1, steps=1, device="cpu")
