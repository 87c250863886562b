"""Inpainting (issue 5): outside the mask nothing changes, bit for bit, for every model kind and sampler; the
geometry is kept; seeds are reproducible; bad input gets a clear error; the CLI writes NIfTI that reads back."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_meddiff import Cancelled, MeddiffError, Volume, load_model, read_volume, write_volume
from napari_meddiff.choices import samplers_for
from napari_meddiff.diffusion.loop import repaint_schedule
from napari_meddiff.tasks.inpaint import InpaintPreview, inpaint, mask_on_image

SAMPLERS = samplers_for({})  # those of the tiny models' DDPM schedule


def scan(shape=(24, 22, 20), spacing=(3.0, 3.0, 3.5), dtype=np.float32, seed=0) -> Volume:
    """A noisy bright ellipsoid on a dark background, oblique-free but not centred on the origin."""
    rng = np.random.default_rng(seed)
    idx = np.indices(shape).astype(float)
    c = (np.array(shape) - 1) / 2
    r = ((idx - c[:, None, None, None]) / (np.array(shape)[:, None, None, None] * 0.4)) ** 2
    arr = 10 + 70 * (r.sum(0) < 1) + rng.normal(0, 3, shape)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-40.0, -30.0, -20.0]
    return Volume(arr.astype(dtype), affine, {"source_path": "/nowhere/scan.nii.gz"})


def cube_mask(shape, lo=(10, 9, 8), size=4, value=1) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    m[lo[0] : lo[0] + size, lo[1] : lo[1] + size, lo[2] : lo[2] + size] = value
    return m


def assert_kept(out: Volume, image: Volume, mask: np.ndarray) -> None:
    assert out.shape == image.shape and out.array.dtype == image.array.dtype
    np.testing.assert_array_equal(out.affine, image.affine)
    assert np.array_equal(out.array[mask == 0], image.array[mask == 0])
    assert not np.array_equal(out.array[mask != 0], image.array[mask != 0])
    assert np.isfinite(out.array).all()


# --- every kind, every sampler -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ddpm2d", "ddpm3d", "ldm3d"])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_outside_mask_is_exact_for_every_kind_and_sampler(tiny_models, kind, sampler):
    model = load_model(tiny_models[kind])
    image = scan()
    mask = cube_mask(image.shape)
    (out,) = inpaint(model, image, mask, sampler=sampler, steps=2, jump_n=1)
    assert_kept(out, image, mask)
    prov = out.metadata["provenance"]
    assert prov["task"] == "inpaint" and prov["sampler"] == sampler and prov["model"] == model.name
    assert prov["mask_voxels"] == int(mask.sum())
    assert "source_path" not in out.metadata and prov["source"] == "/nowhere/scan.nii.gz"
    if kind == "ddpm2d":
        assert prov["axis"] == "axial" and prov["slices"] == 4  # only the slices the mask touches


@pytest.mark.parametrize("kind", ["ddpm3d", "ddpm2d", "ldm3d"])
def test_repaint_jumps_keep_outside_and_count_evaluations(tiny_models, kind):
    model = load_model(tiny_models[kind])
    image = scan()
    mask = cube_mask(image.shape)
    infos = []
    (out,) = inpaint(
        model,
        image,
        mask,
        sampler="dpm++" if kind != "ddpm2d" else "ddpm",
        steps=2,
        jump_length=1,
        jump_n=2,
        on_step=infos.append,
    )
    assert_kept(out, image, mask)
    evals = len([m for m in repaint_schedule(2, 1, 2) if m[1] == m[0] + 1])
    assert out.metadata["provenance"]["network_evaluations_per_chain"] == evals == 4
    assert [i.index for i in infos] == list(range(1, infos[0].total + 1))


def test_repaint_schedule():
    assert repaint_schedule(4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert repaint_schedule(4, 2, 1) == repaint_schedule(4)
    moves = repaint_schedule(6, 2, 2)
    assert moves[:3] == [(0, 1), (1, 2), (2, 0)]
    assert moves[-3:] == [(6, 4), (4, 5), (5, 6)]
    assert sum(1 for a, b in moves if b == a + 1) == 6 + 3 * 2
    assert sum(1 for a, b in repaint_schedule(20, 5, 3) if b == a + 1) == 20 + 4 * 2 * 5
    assert repaint_schedule(3, 10, 4) == repaint_schedule(3)  # jumps longer than the chain: none
    for bad in ((0, 1, 1), (3, 0, 1), (3, 1, 0), (3, 1.5, 2)):
        with pytest.raises(MeddiffError):
            repaint_schedule(*bad)


# --- determinism, candidates, batches ------------------------------------------------------------


def test_seed_reproducible_candidates_distinct(tiny_models):
    model = load_model(tiny_models["ddpm3d"])
    image = scan()
    mask = cube_mask(image.shape)
    a = inpaint(model, image, mask, sampler="ddpm", steps=2, seed=5, candidates=2)
    b = inpaint(model, image, mask, sampler="ddpm", steps=2, seed=5, candidates=2)
    (c,) = inpaint(model, image, mask, sampler="ddpm", steps=2, seed=6)
    assert np.array_equal(a[0].array, b[0].array) and np.array_equal(a[1].array, b[1].array)
    assert not np.array_equal(a[0].array, a[1].array)
    np.testing.assert_allclose(a[1].array, c.array, atol=1e-3)  # candidate k == seed + k
    assert [v.metadata["provenance"]["candidate_seed"] for v in a] == [5, 6]


def test_release_unet_after_the_last_batch_gives_the_same_candidates(tiny_models):
    """What `meddiff inpaint` does: the UNet goes before the last batch's decoding; the candidates stay the same."""
    image, mask = scan(), cube_mask(scan().shape)
    kept = inpaint(load_model(tiny_models["ldm3d"]), image, mask, steps=2, seed=3, candidates=3, batch_size=2)
    model = load_model(tiny_models["ldm3d"])
    released = inpaint(model, image, mask, steps=2, seed=3, candidates=3, batch_size=2, release_unet=True)
    assert model.unet is None and model.autoencoder is not None
    for a, b in zip(kept, released):
        np.testing.assert_array_equal(a.array, b.array)
    with pytest.raises(MeddiffError, match="released"):
        inpaint(model, image, mask, steps=2)


def test_2d_slicewise_batch_invariance_and_axis(tiny_models):
    model = load_model(tiny_models["ddpm2d"])
    image = scan()
    mask = cube_mask(image.shape, size=3)
    (a,) = inpaint(model, image, mask, sampler="ddim", steps=2, batch_size=1)
    (b,) = inpaint(model, image, mask, sampler="ddim", steps=2, batch_size=8)
    np.testing.assert_allclose(a.array, b.array, atol=1e-3)
    (cor,) = inpaint(model, image, mask, sampler="ddim", steps=2, axis="coronal")
    assert_kept(cor, image, mask)
    assert cor.metadata["provenance"]["axis"] == "coronal" and cor.metadata["provenance"]["slices"] == 3


def test_2d_image_with_2d_model(tiny_models):
    model = load_model(tiny_models["ddpm2d"])
    vol = scan(shape=(24, 22, 1))
    image = Volume(vol.array[:, :, 0], vol.affine)
    mask = np.zeros(image.shape, np.uint8)
    mask[10:14, 9:13] = 1
    (out,) = inpaint(model, image, mask, sampler="ddim", steps=2)
    assert out.shape == image.shape
    assert np.array_equal(out.array[mask == 0], image.array[mask == 0])
    assert not np.array_equal(out.array[mask == 1], image.array[mask == 1])


def test_integer_image_keeps_dtype_and_label_selection(tiny_models):
    model = load_model(tiny_models["ldm3d"])
    image = scan(dtype=np.int16)
    mask = cube_mask(image.shape, value=2)
    mask[2:4, 2:4, 2:4] = 1  # another label, not filled
    (out,) = inpaint(model, image, mask, label=2, sampler="ddim", steps=2, feather_voxels=1)
    assert out.array.dtype == np.int16
    sel = mask == 2
    assert np.array_equal(out.array[~sel], image.array[~sel])
    assert not np.array_equal(out.array[sel], image.array[sel])


def test_feathering_only_inside_the_mask(tiny_models):
    model = load_model(tiny_models["ddpm3d"])
    image = scan()
    mask = cube_mask(image.shape, size=6, lo=(9, 8, 7))
    (hard,) = inpaint(model, image, mask, sampler="ddim", steps=2, feather_voxels=0)
    (soft,) = inpaint(model, image, mask, sampler="ddim", steps=2, feather_voxels=2)
    assert_kept(soft, image, mask)
    border = np.zeros_like(mask, bool)
    border[9:15, 8:14, 7:13] = True
    border[10:14, 9:13, 8:12] = False  # the outer shell of the cube
    core = np.zeros_like(mask, bool)
    core[11:13, 10:12, 9:11] = True  # 3 voxels from the outside: full weight
    # weight 1/3 on the shell: the soft fill lies a third of the way from the original to the hard fill
    np.testing.assert_allclose(
        soft.array[border], image.array[border] + (hard.array[border] - image.array[border]) / 3, rtol=1e-4, atol=1e-3
    )
    np.testing.assert_array_equal(soft.array[core], hard.array[core])


def test_large_fine_volume_touches_only_the_mask(tiny_models):
    """A 1 mm volume larger than the model's field of view, with a mask near one side: the grid moves to it."""
    model = load_model(tiny_models["ddpm3d"])
    image = scan(shape=(96, 90, 80), spacing=(1.0, 1.0, 1.0))
    mask = cube_mask(image.shape, lo=(80, 40, 30), size=6)
    (out,) = inpaint(model, image, mask, sampler="ddim", steps=2)
    assert_kept(out, image, mask)
    grid_affine = np.array(out.metadata["provenance"]["model_grid_affine"])
    grid_shape = np.array(out.metadata["provenance"]["model_grid_shape"])
    mask_world = image.affine @ np.array([82.5, 42.5, 32.5, 1.0])
    g = np.linalg.solve(grid_affine, mask_world)[:3]
    assert np.all(g >= 3) and np.all(g <= grid_shape - 4)  # the mask sits inside the grid with a margin


def test_mask_volume_on_another_grid_is_resampled(tiny_models):
    model = load_model(tiny_models["ldm3d"])
    image = scan(shape=(24, 22, 20))
    coarse_affine = image.affine.copy()
    coarse_affine[:3, :3] *= 2
    coarse_affine[:3, 3] += np.diag(image.affine)[:3] / 2  # same world extent, voxels twice as large
    coarse = np.zeros((12, 11, 10), np.uint8)
    coarse[5:7, 5:7, 4:6] = 3
    mask_vol = Volume(coarse, coarse_affine)
    on_image = mask_on_image(image, mask_vol)
    assert on_image.shape == image.shape and on_image.sum() == 8 * 8
    (out,) = inpaint(model, image, mask_vol, sampler="ddim", steps=2)
    assert np.array_equal(out.array[~on_image], image.array[~on_image])


# --- previews and cancelling ---------------------------------------------------------------------


def test_previews_and_cancel(tiny_models):
    model = load_model(tiny_models["ddpm2d"])
    image = scan()
    mask = cube_mask(image.shape, size=3)
    previews: list[InpaintPreview] = []
    inpaint(model, image, mask, sampler="ddim", steps=2, candidates=2, on_preview=previews.append, preview_every=1)
    assert {p.candidate for p in previews} == {0, 1}
    for p in previews:
        region_mask = mask[p.region]
        assert p.patch.shape == region_mask.shape
        assert np.array_equal(p.patch[region_mask == 0], image.array[p.region][region_mask == 0])
    calls = []
    with pytest.raises(Cancelled):
        inpaint(model, image, mask, steps=2, should_cancel=lambda: calls.append(1) or len(calls) > 1)


# --- bad input -----------------------------------------------------------------------------------


def shifted(affine: np.ndarray, mm: float) -> np.ndarray:
    out = affine.copy()
    out[:3, 3] += mm
    return out


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda im: np.zeros((5, 5, 5)), "differs from the image shape"),
        (lambda im: np.zeros(im.shape), "empty"),
        (lambda im: np.ones(im.shape), "whole image"),
        (lambda im: Volume(cube_mask(im.shape), shifted(im.affine, 500.0)), "does not overlap"),
    ],
)
def test_bad_masks(tiny_models, make, message):
    model = load_model(tiny_models["ddpm3d"])
    image = scan()
    with pytest.raises(MeddiffError, match=message):
        inpaint(model, image, make(image), steps=2)


def test_bad_labels_axes_models(tiny_models):
    model = load_model(tiny_models["ddpm2d"])
    image = scan()
    mask = cube_mask(image.shape, value=2)
    with pytest.raises(MeddiffError, match=r"label 5 .*labels present: 2"):
        inpaint(model, image, mask, label=5, steps=2)
    with pytest.raises(MeddiffError, match="background"):
        inpaint(model, image, mask, label=0, steps=2)
    with pytest.raises(MeddiffError, match="axis must be"):
        inpaint(model, image, mask, axis="oblique", steps=2)
    with pytest.raises(MeddiffError, match="single slice"):
        one_slice = np.pad(np.ones((2, 1, 2)), ((10, 12), (0, 0), (8, 10)))
        inpaint(model, scan(shape=(24, 1, 20)), one_slice, axis="axial", steps=2)
    with pytest.raises(MeddiffError, match="sampler"):
        inpaint(model, image, mask, sampler="euler", steps=2)
    with pytest.raises(MeddiffError, match="candidates"):
        inpaint(model, image, mask, candidates=0, steps=2)
    with pytest.raises(MeddiffError, match="segmentation"):
        inpaint(load_model(tiny_models["seg2d"]), image, mask, steps=2)
    model3d = load_model(tiny_models["ddpm3d"])
    with pytest.raises(MeddiffError, match="3D image"):
        inpaint(model3d, scan(shape=(24, 22, 1)), cube_mask((24, 22, 1), lo=(10, 9, 0), size=1), steps=2)
    big = np.zeros(image.shape, np.uint8)
    big[1:23, 1:21, 1:19] = 1  # 66 mm wide: more than the 64 mm field of view
    with pytest.raises(MeddiffError, match="field of view"):
        inpaint(model3d, image, big, steps=2)


# --- CLI -----------------------------------------------------------------------------------------


def test_cli_end_to_end(tiny_models, tmp_path, capsys):
    from napari_meddiff.cli import main

    image = scan()
    mask = cube_mask(image.shape, value=4)
    write_volume(image, tmp_path / "in.nii.gz")
    write_volume(Volume(mask, image.affine), tmp_path / "mask.nii.gz", kind="labels")
    out = tmp_path / "out" / "filled.nii.gz"
    args = [
        "inpaint",
        "--model",
        str(tiny_models["ldm3d"]),
        "--image",
        str(tmp_path / "in.nii.gz"),
        "--mask",
        str(tmp_path / "mask.nii.gz"),
        "--out",
        str(out),
        "--steps",
        "2",
        "--sampler",
        "ddim",
    ]
    assert main(args + ["--candidates", "2", "--seed", "3", "--label", "4"]) == 0
    for k in (1, 2):
        got = read_volume(tmp_path / "out" / f"filled_cand{k}.nii.gz")
        np.testing.assert_allclose(got.affine, image.affine, atol=1e-5)
        assert np.array_equal(got.array[mask == 0], image.array[mask == 0])
        assert not np.array_equal(got.array[mask != 0], image.array[mask != 0])
        side = json.loads((tmp_path / "out" / f"filled_cand{k}.json").read_text())
        assert side["candidate_seed"] == 2 + k and side["label"] == 4
    assert main(args) == 0 and out.exists()
    assert "filled.nii.gz" in capsys.readouterr().out
    assert main(args) == 2  # exists
    assert "exists" in capsys.readouterr().err
    assert main(args + ["--overwrite", "--axis", "diagonal"]) == 2
    assert "--axis" in capsys.readouterr().err
    empty = tmp_path / "empty.nii.gz"
    write_volume(Volume(np.zeros(image.shape, np.uint8), image.affine), empty, kind="labels")
    assert main(args[:5] + ["--mask", str(empty), "--out", str(tmp_path / "x.nii.gz")]) == 2
    assert "empty" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["ddpm2d", "ddpm3d"])
def test_model_grid_shares_the_lattice_of_a_scan_at_the_model_voxel_size(tiny_models, kind):
    """A scan at the model's voxel size is inpainted on its own voxel centres, not half a voxel off."""
    from napari_meddiff.io.intensity import intensity_window
    from napari_meddiff.tasks.inpaint import _plan

    model = load_model(tiny_models[kind])
    assert list(model.voxel_size) == [4.0] * model.spatial_dims
    image = scan(shape=(21, 19, 17), spacing=(4.0, 4.0, 4.0))  # odd sizes, origin off the model's lattice
    mask = cube_mask(image.shape, lo=(7, 6, 5), size=3).astype(bool)
    window = intensity_window(image.array, model.config.get("intensity"))
    plan = _plan(model, image, mask, window, "axial", 1)
    index = np.linalg.inv(image.affine) @ plan.grid.affine
    assert np.allclose(index[:3, 3], np.round(index[:3, 3]), atol=1e-6)
