"""Generating a scan from a label map: the map's grid kept (oblique, anisotropic), seeds reproducible, a map the
model cannot read refused in one line, and the command line writing each scan on the map's grid with the map's
digest in its sidecar."""

from __future__ import annotations

import json
import os
import re

import nibabel as nib
import numpy as np
import pytest

from napari_meddiff.errors import MeddiffError
from napari_meddiff.io.volume import Volume, read_volume
from tests.helpers import assert_one_line_error, run_cli

LABELS = {0: "background", 1: "CSF", 2: "GM", 3: "WM", 4: "lesion"}


@pytest.fixture(scope="module")
def label_model(tmp_path_factory):
    from napari_meddiff.models import load_model
    from napari_meddiff.testing.tiny_models import make_tiny_model

    root = tmp_path_factory.mktemp("label-models")
    return load_model(make_tiny_model(root / "tiny-from-labels-3d", "ddpm", 3, label_map=LABELS), device="cpu")


def tissue_map(shape=(21, 26, 13), affine=None) -> Volume:
    """Nested ellipsoids: WM inside GM inside CSF, a lesion in the WM; an oblique, anisotropic grid by default."""
    if affine is None:
        c, s = np.cos(0.3), np.sin(0.3)
        affine = np.array([[3.0 * c, -2.5 * s, 0, -30], [3.0 * s, 2.5 * c, 0, -40], [0, 0, 5.0, -20], [0, 0, 0, 1]])
    idx = np.indices(shape).astype(float)
    r = np.sqrt(sum(((i - (n - 1) / 2) / (n / 2)) ** 2 for i, n in zip(idx, shape)))
    labels = np.select([r < 0.35, r < 0.6, r < 0.8], [3, 2, 1], 0).astype(np.int16)
    labels[tuple(n // 2 for n in shape)] = 4
    return Volume(labels, affine)


def test_a_scan_comes_back_on_the_label_maps_grid(label_model):
    from napari_meddiff.tasks.generate import generate

    labels = tissue_map()
    vol, other = generate(label_model, [3, 4], labels=labels, steps=2, device="cpu", batch_size=2)
    assert vol.shape == labels.shape and np.array_equal(vol.affine, labels.affine)
    assert np.isfinite(vol.array).all() and vol.array.min() >= 0 and vol.array.max() <= 1
    assert not np.array_equal(vol.array, other.array)  # another seed, another scan
    (again,) = generate(label_model, [3], labels=labels, steps=2, device="cpu", batch_size=1)
    np.testing.assert_allclose(again.array, vol.array, atol=1e-5)  # the same seed, the same scan
    prov = vol.metadata["provenance"]
    assert prov["seed"] == 3 and prov["label_map"]["voxels"]["lesion"] == 1 and len(prov["label_map_sha256"]) == 64


def test_the_map_conditions_the_scan(label_model):
    """Another map gives another scan from the same seed: the labels reach the network."""
    from napari_meddiff.tasks.from_labels import generate_from_labels

    labels = tissue_map()
    changed = Volume(np.where(labels.array == 3, 2, labels.array).astype(np.int16), labels.affine)
    (a,) = generate_from_labels(label_model, labels, [0], steps=2, device="cpu")
    (b,) = generate_from_labels(label_model, changed, [0], steps=2, device="cpu")
    assert np.abs(a.array - b.array)[labels.array == 3].mean() > 1e-4


@pytest.mark.parametrize(
    "array,message",
    [
        (np.full((8, 8, 8), 7, np.int16), "label(s) [7]"),
        (np.full((8, 8, 8), 1.5, np.float32), "non-integer"),
        (np.zeros((8, 8, 8), np.int16), "all background"),
    ],
)
def test_a_map_the_model_cannot_read_is_refused(label_model, array, message):
    from napari_meddiff.tasks.from_labels import generate_from_labels

    with pytest.raises(MeddiffError, match=re.escape(message)):
        generate_from_labels(label_model, Volume(array, np.diag([2.0, 2, 2, 1])), [0], steps=1, device="cpu")


def test_maps_and_models_must_match(label_model, tiny_models):
    from napari_meddiff.tasks.generate import generate

    with pytest.raises(MeddiffError, match="generates a scan from a label map: give one"):
        generate(label_model, [0], steps=1, device="cpu")
    with pytest.raises(MeddiffError, match="does not generate from a label map"):
        generate(tiny_models["ddpm3d"], [0], steps=1, device="cpu", labels=tissue_map())


def test_cli_generates_on_the_maps_grid_and_keeps_a_scan_made_from_another_map(tmp_path, label_model):
    labels = tissue_map()
    path = tmp_path / "map.nii.gz"
    nib.save(nib.Nifti1Image(labels.array, labels.affine), path)
    out = tmp_path / "out"
    args = ["generate", "--model", str(label_model.path), "--labels", str(path), "--num", "2", "--steps", "2"]
    first = run_cli(*args, "--out", out)
    assert first.returncode == 0, first.stderr
    written = read_volume(out / "tiny-from-labels-3d_seed1.nii.gz")
    assert written.shape == labels.shape and np.allclose(written.affine, labels.affine, atol=1e-5)
    sidecar = json.loads((out / "tiny-from-labels-3d_seed1.json").read_text())
    assert len(sidecar["label_map_sha256"]) == 64 and sidecar["label_map"]["file"] == str(path)
    manifest = (out / "cohort.csv").read_text().splitlines()
    assert manifest[0].endswith(",label_map_sha256") and manifest[2].endswith(sidecar["label_map_sha256"])
    before = (out / "tiny-from-labels-3d_seed1.nii.gz").read_bytes()
    other = tmp_path / "other.nii.gz"
    nib.save(nib.Nifti1Image(np.where(labels.array == 4, 3, labels.array).astype(np.int16), labels.affine), other)
    result = run_cli(*args[:4], other, *args[5:], "--out", out)
    assert_one_line_error(result, "label_map_sha256")
    assert (out / "tiny-from-labels-3d_seed1.nii.gz").read_bytes() == before
    missing = run_cli("generate", "--model", label_model.path, "--out", tmp_path / "o2")
    assert_one_line_error(missing, "give one (--labels MAP.nii.gz")


@pytest.fixture(scope="module")
def controlnet_label_model(tmp_path_factory):
    from napari_meddiff.models import load_model
    from napari_meddiff.testing.tiny_models import make_tiny_model

    root = tmp_path_factory.mktemp("controlnet-label-models")
    folder = make_tiny_model(root / "tiny-controlnet-from-labels-3d", "ddpm", 3, label_map=LABELS, controlnet=True)
    return load_model(folder, device="cpu")


def test_a_controlnet_model_takes_the_map_through_its_controlnet(controlnet_label_model):
    """The one-hot map is the ControlNet's conditioning image (the UNet takes the image alone): the scan comes
    back on the map's grid, a seed gives the same scan, another map another scan, and only through the ControlNet."""
    import copy
    import dataclasses

    import torch

    from napari_meddiff.tasks.from_labels import generate_from_labels

    model = controlnet_label_model
    assert model.controlnet is not None and model.config["networks"]["unet"]["in_channels"] == 1
    labels = tissue_map()
    changed = Volume(np.where(labels.array == 3, 2, labels.array).astype(np.int16), labels.affine)
    a, other = generate_from_labels(model, labels, [0, 1], steps=2, device="cpu", batch_size=2)
    assert a.shape == labels.shape and np.array_equal(a.affine, labels.affine)
    assert np.isfinite(a.array).all() and not np.array_equal(a.array, other.array)
    (again,) = generate_from_labels(model, labels, [0], steps=2, device="cpu")
    np.testing.assert_allclose(again.array, a.array, atol=1e-5)
    (b,) = generate_from_labels(model, changed, [0], steps=2, device="cpu")
    assert np.abs(a.array - b.array)[labels.array == 3].mean() > 1e-4
    silent = dataclasses.replace(model, controlnet=copy.deepcopy(model.controlnet))
    with torch.no_grad():
        for p in silent.controlnet.controlnet_mid_block.parameters():
            p.zero_()
        for p in silent.controlnet.controlnet_down_blocks.parameters():
            p.zero_()
    (a0,) = generate_from_labels(silent, labels, [0], steps=2, device="cpu")
    (b0,) = generate_from_labels(silent, changed, [0], steps=2, device="cpu")
    np.testing.assert_array_equal(a0.array, b0.array)  # a ControlNet without outputs: the map does not count


def test_models_lists_a_label_map_models_labels(label_model):
    listing = run_cli("models", env={**os.environ, "MEDDIFF_MODELS": str(label_model.path.parent)})
    row = next(line for line in listing.stdout.splitlines() if line.startswith("tiny-from-labels-3d"))
    assert "labels{0:background,1:CSF,2:GM,3:WM,4:lesion}" in row


# --- inpainting under an edited map ("regenerate what I changed") ----------------------------------------------


def scan_of(labels: Volume) -> Volume:
    """A scan whose intensities follow the map (CSF dark, WM bright), with noise; int16 as scanners write."""
    rng = np.random.default_rng(0)
    values = np.array([0, 300, 600, 900, 200])[labels.array] + rng.normal(0, 20, labels.shape)
    return Volume(np.clip(values, 0, None).astype(np.int16), labels.affine)


def edited(labels: Volume) -> Volume:
    """The map with a lesion (4) painted into a block of grey and white matter."""
    array = labels.array.copy()
    array[6:10, 10:14, 5:8] = np.where(array[6:10, 10:14, 5:8] > 1, 4, array[6:10, 10:14, 5:8])
    return Volume(array, labels.affine)


def test_changed_labels_mask_is_the_edit_grown_by_its_margin():
    import napari_meddiff as md

    labels = tissue_map()
    after = edited(labels)
    exact = md.changed_labels_mask(labels, after, margin_voxels=0)
    np.testing.assert_array_equal(exact, labels.array != after.array)
    grown = md.changed_labels_mask(labels, after, margin_voxels=1)
    assert grown[exact].all() and grown.sum() > exact.sum() and not grown[0, 0, 0]
    with pytest.raises(MeddiffError, match="nothing was changed"):
        md.changed_labels_mask(labels, labels)
    moved = Volume(after.array, after.affine @ np.diag([1.0, 1, 2, 1]))
    with pytest.raises(MeddiffError, match="not on the original's grid"):
        md.changed_labels_mask(labels, moved)


@pytest.mark.parametrize("which", ["label_model", "controlnet_label_model"])
def test_inpainting_under_an_edited_map_fills_only_what_changed(request, which):
    """Only the changed voxels (plus margin) are regenerated, everything else comes back bit for bit; the new
    map reaches the network (the same seed under the old map fills differently) and the provenance names it."""
    from napari_meddiff.tasks.from_labels import changed_labels_mask, label_map_sha256
    from napari_meddiff.tasks.inpaint import inpaint

    model = request.getfixturevalue(which)
    labels = tissue_map()
    after, scan = edited(labels), scan_of(labels)
    region = changed_labels_mask(labels, after, margin_voxels=1)
    (filled,) = inpaint(model, scan, region, labels=after, steps=2, seed=3, device="cpu")
    assert filled.array.dtype == scan.array.dtype and np.array_equal(filled.affine, scan.affine)
    np.testing.assert_array_equal(filled.array[~region], scan.array[~region])
    assert not np.array_equal(filled.array[region], scan.array[region])
    (under_old,) = inpaint(model, scan, region, labels=labels, steps=2, seed=3, device="cpu")
    assert np.abs(filled.array[region].astype(float) - under_old.array[region]).mean() > 0
    prov = filled.metadata["provenance"]
    assert prov["label_map_sha256"] == label_map_sha256(after.array.astype(np.int64), after.affine)
    assert prov["mask_voxels"] == int(region.sum())


def test_inpainting_needs_a_map_for_a_label_model_and_refuses_one_otherwise(label_model, tiny_models):
    from napari_meddiff.tasks.inpaint import inpaint

    labels = tissue_map()
    scan, region = scan_of(labels), labels.array == 4
    with pytest.raises(MeddiffError, match="generates a scan from a label map: give one"):
        inpaint(label_model, scan, region, steps=1, device="cpu")
    with pytest.raises(MeddiffError, match="does not generate from a label map"):
        inpaint(tiny_models["ddpm3d"], scan, region, labels=labels, steps=1, device="cpu")
    far = Volume(labels.array, labels.affine @ np.array([[1, 0, 0, 500], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]))
    with pytest.raises(MeddiffError, match="does not overlap"):
        inpaint(label_model, scan, region, labels=far, steps=1, device="cpu")


def test_cli_regenerates_what_the_edit_changed(tmp_path, label_model):
    labels = tissue_map()
    after, scan = edited(labels), scan_of(labels)
    paths = {}
    for name, vol in (("map", labels), ("edited", after), ("scan", scan)):
        paths[name] = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(vol.array, vol.affine), paths[name])
    out = tmp_path / "regenerated.nii.gz"
    common = ["inpaint", "--model", label_model.path, "--image", paths["scan"], "--steps", "2", "--out", out]
    result = run_cli(*common, "--labels", paths["edited"], "--changed-from", paths["map"])
    assert result.returncode == 0, result.stderr
    written = read_volume(out)
    region = written.array != scan.array
    assert region[labels.array != after.array].any()
    from scipy import ndimage

    grown = ndimage.binary_dilation(labels.array != after.array, np.ones((3, 3, 3), bool))
    assert not region[~grown].any()  # nothing beyond the edit and its one-voxel margin
    sidecar = json.loads(out.with_name("regenerated.json").read_text())
    assert sidecar["changed_from"] == str(paths["map"]) and len(sidecar["label_map_sha256"]) == 64
    neither = run_cli(*common, "--labels", paths["edited"], "--overwrite")
    assert_one_line_error(neither, "say what to fill")
    alone = run_cli(*common, "--changed-from", paths["map"], "--overwrite")
    assert_one_line_error(alone, "--changed-from needs --labels")


def test_cli_generates_for_each_map_in_a_folder(tmp_path, label_model):
    """--labels DIR: --num volumes for each map, in OUT/<map name>/ on that map's grid, each folder with its
    cohort.csv naming its map's digest; an empty folder is one line."""
    maps = tmp_path / "maps"
    maps.mkdir()
    first = tissue_map()
    second = tissue_map(shape=(18, 20, 16), affine=np.diag([2.5, 2.5, 3.0, 1.0]))
    nib.save(nib.Nifti1Image(first.array, first.affine), maps / "sub-a_dseg.nii.gz")
    nib.save(nib.Nifti1Image(second.array, second.affine), maps / "sub-b_dseg.nii")
    (maps / "notes.txt").write_text("not a map")
    out = tmp_path / "out"
    args = ["generate", "--model", label_model.path, "--labels", maps, "--num", "2", "--steps", "2", "--out", out]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["sub-a_dseg", "sub-b_dseg"]
    digests = set()
    for name, labels in (("sub-a_dseg", first), ("sub-b_dseg", second)):
        for seed in (0, 1):
            vol = read_volume(out / name / f"tiny-from-labels-3d_seed{seed}.nii.gz")
            assert vol.shape == labels.shape and np.allclose(vol.affine, labels.affine, atol=1e-5)
        rows = (out / name / "cohort.csv").read_text().splitlines()
        assert len(rows) == 3
        digests.add(rows[1].rsplit(",", 1)[1])
    assert len(digests) == 2
    again = run_cli(*args)  # a re-run finds every volume written and valid
    assert again.returncode == 0, again.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(run_cli(*args[:4], empty, *args[5:-1], tmp_path / "o3"), "holds no label maps")
