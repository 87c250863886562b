"""napari plugin: manifest, reader/writer geometry round trips, sample data (run under xvfb-run)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
    pytest.skip("napari tests need a display: run under xvfb-run -a", allow_module_level=True)
pytest.importorskip("napari")

import nibabel as nib  # noqa: E402

from napari_meddiff._napari import layers as layers_mod  # noqa: E402
from napari_meddiff._napari import sample_data  # noqa: E402
from napari_meddiff._napari.reader import get_reader  # noqa: E402

pytestmark = pytest.mark.napari
PLUGIN = "napari-meddiff"


def oblique_affine() -> np.ndarray:
    """2 mm voxels, rotated 20 degrees about z and 10 about x, LPS-like flips, off-centre origin."""
    a, b = np.deg2rad(20), np.deg2rad(10)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = np.diag([-1, -1, 1]) @ rz @ rx @ np.diag([2.0, 2.0, 2.0])
    affine[:3, 3] = [91.5, 120.25, -70.0]
    return affine


LPS_AFFINE = np.array([[-2.0, 0, 0, 90], [0, -2.0, 0, 126], [0, 0, 2.0, -72], [0, 0, 0, 1]])


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return path


def test_manifest_is_valid():
    import npe2

    manifest = npe2.PluginManifest.from_file(Path(layers_mod.__file__).parents[1] / "napari.yaml")
    assert manifest.name == PLUGIN
    contrib = manifest.contributions
    assert {w.display_name for w in contrib.widgets} >= {"Generate", "Review (reader study)"}
    assert {s.key for s in contrib.sample_data} == {"mni152_t1", "synthetic_brain"}
    assert {tuple(w.layer_types) for w in contrib.writers} == {("image",), ("labels",)}
    ours = [c for c in contrib.commands if c.python_name.startswith("napari_meddiff._napari")]
    for command in ours:  # our own entry points import
        assert command.exec is not None and callable(command.exec)  # npe2 resolves python_name lazily
        module, _, attr = command.python_name.partition(":")
        assert hasattr(__import__(module, fromlist=[attr]), attr), command.python_name
    assert get_reader("scan.tif") is None and get_reader(["a.nii.gz", "b.png"]) is None
    assert get_reader("scan.nii.gz") is not None and get_reader("x.mha") is not None


@pytest.mark.parametrize("affine", [oblique_affine(), LPS_AFFINE], ids=["oblique", "lps-flip"])
def test_reader_world_coordinates_and_writer_round_trip(make_napari_viewer, tmp_path, affine):
    rng = np.random.default_rng(0)
    data = rng.normal(100, 20, (20, 24, 18)).astype(np.float32)
    src = write_nifti(tmp_path / "scan.nii.gz", data, affine)
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(src), plugin=PLUGIN)
    assert layer.name == "scan" and layer.__class__.__name__ == "Image"
    np.testing.assert_array_equal(np.asarray(layer.data), data)
    nib_affine = nib.load(str(src)).affine
    for voxel in [(0, 0, 0), (19, 23, 17), (3, 11, 7), (10.5, 2.25, 4)]:
        expected = (nib_affine @ np.append(voxel, 1.0))[:3]
        np.testing.assert_allclose(layer.data_to_world(voxel), expected, atol=1e-6)
    if np.allclose(affine[:3, :3], np.diag(np.diag(affine[:3, :3]))):  # axis-aligned: crisp scale + translate
        np.testing.assert_allclose(layer.scale, np.diag(affine)[:3])
        np.testing.assert_allclose(layer.affine.affine_matrix, np.eye(4))
    assert layer.metadata[layers_mod.HEADER_KEY]["sform_code"] == 1

    out = tmp_path / "saved.nii.gz"
    written = viewer.layers.save(str(out), selected=True, plugin=PLUGIN)  # what File > Save does
    assert [Path(p) for p in written] == [out]
    back = nib.load(str(out))
    np.testing.assert_allclose(back.affine, nib_affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(back.dataobj), data)
    assert back.header.get_sform(coded=True)[1] == 1


def test_image_and_mask_overlay(make_napari_viewer, tmp_path):
    affine = oblique_affine()
    image = np.random.default_rng(1).random((16, 20, 12)).astype(np.float32)
    mask = np.zeros((16, 20, 12), np.uint8)
    mask[4:9, 6:14, 3:8] = 1
    mask[10, 10, 10] = 2
    img_path = write_nifti(tmp_path / "sub-01_T1w.nii.gz", image, affine)
    mask_path = write_nifti(tmp_path / "sub-01_mask.nii.gz", mask, affine)
    viewer = make_napari_viewer()
    (img_layer,) = viewer.open(str(img_path), plugin=PLUGIN)
    (mask_layer,) = viewer.open(str(mask_path), plugin=PLUGIN)
    assert img_layer.__class__.__name__ == "Image" and mask_layer.__class__.__name__ == "Labels"
    np.testing.assert_allclose(mask_layer._data_to_world.affine_matrix, img_layer._data_to_world.affine_matrix)
    world = mask_layer.data_to_world((10, 10, 10))
    np.testing.assert_allclose(img_layer.world_to_data(world), (10, 10, 10), atol=1e-6)

    out = tmp_path / "mask_saved.nii"
    viewer.layers.selection.active = mask_layer
    viewer.layers.save(str(out), selected=True, plugin=PLUGIN)
    back = nib.load(str(out))
    assert np.issubdtype(back.get_data_dtype(), np.integer)
    np.testing.assert_array_equal(np.asarray(back.dataobj), mask)
    np.testing.assert_allclose(back.affine, affine, atol=1e-5)

    viewer.layers.selection.active = img_layer  # File > Save without naming a plugin picks ours by extension
    (written,) = viewer.layers.save(str(tmp_path / "image_saved.nii.gz"), selected=True)
    np.testing.assert_allclose(nib.load(written).affine, affine, atol=1e-5)


def test_labels_detection(tmp_path):
    few = np.zeros((8, 8, 8), np.int16)
    few[2:5] = 3
    many = np.arange(8 * 8 * 8, dtype=np.int16).reshape(8, 8, 8)
    assert layers_mod.looks_like_labels(few, "scan")
    assert not layers_mod.looks_like_labels(many, "ct")
    assert layers_mod.looks_like_labels(many, "sub-01_dseg")
    assert not layers_mod.looks_like_labels(few.astype(np.float32), "mask")  # float files stay images
    ldt = get_reader("x.nii")(str(write_nifti(tmp_path / "ct.nii", many, np.eye(4))))
    assert ldt[0][2] == "image"


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_sitk_formats_in_ras_world(make_napari_viewer, tmp_path, suffix):
    import SimpleITK as sitk

    data = np.random.default_rng(2).random((10, 12, 14)).astype(np.float32)  # (i, j, k)
    image = sitk.GetImageFromArray(np.transpose(data, (2, 1, 0)))
    image.SetSpacing((2.0, 1.5, 3.0))
    image.SetOrigin((10.0, -20.0, 5.0))  # LPS
    path = tmp_path / f"scan{suffix}"
    sitk.WriteImage(image, str(path))
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(path), plugin=PLUGIN)
    lps = np.array(image.TransformContinuousIndexToPhysicalPoint((3.0, 4.0, 5.0)))
    np.testing.assert_allclose(layer.data_to_world((3, 4, 5)), lps * [-1, -1, 1], atol=1e-6)


def test_sample_mni152(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "mni152_t1")
    (layer,) = viewer.layers
    assert layer.data.shape == (99, 117, 95)
    np.testing.assert_allclose(layer.data_to_world((0, 0, 0)), (-98, -134, -72))
    np.testing.assert_allclose(layer.scale, (2, 2, 2))
    lo, hi = layer.contrast_limits
    assert 0 <= lo < hi <= 1.0


def test_sample_synthetic_brain(make_napari_viewer, tiny_models, monkeypatch):
    monkeypatch.setattr(sample_data, "SAMPLE_MODEL", str(tiny_models["ldm3d"]))
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "synthetic_brain")
    (layer,) = viewer.layers
    assert layer.name == "tiny-ldm-3d_seed0" and layer.data.shape == (16, 16, 16)
    assert layer.metadata["provenance"]["seed"] == 0 and tuple(layer.scale) == (4, 4, 4)
    assert float(layer.data.min()) >= 0 and float(layer.data.max()) <= 1


def test_sample_synthetic_brain_without_models(monkeypatch):
    from napari_meddiff.errors import MeddiffError

    monkeypatch.setattr(sample_data, "SAMPLE_MODEL", "no-such-model")
    monkeypatch.setattr(sample_data, "available_models", lambda: {})
    with pytest.raises(MeddiffError, match="no generative model is installed"):
        sample_data.synthetic_brain()
