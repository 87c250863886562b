"""NIfTI and SimpleITK round trips keep voxels and world geometry; bad files give clear errors; no NaN volume is
written."""

from __future__ import annotations

import gzip
import locale
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import napari_meddiff as md
from napari_meddiff import MeddiffError, Volume, read_volume, write_volume
from napari_meddiff.io.volume import resample, resample_like, to_canonical
from tests.helpers import assert_one_line_error, run_cli, write_nifti

LPS = np.array([[-1.2, 0, 0, 90.0], [0, -1.2, 0, 120.0], [0, 0, 2.5, -60.0], [0, 0, 0, 1]])


def oblique_affine() -> np.ndarray:
    theta = np.deg2rad(17)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    tilt = np.array([[1, 0, 0], [0, np.cos(0.2), -np.sin(0.2)], [0, np.sin(0.2), np.cos(0.2)]])
    aff = np.eye(4)
    aff[:3, :3] = tilt @ rot @ np.diag([1.0, 1.5, 2.0])
    aff[:3, 3] = [-30.5, 12.25, 7.0]
    return aff


def assert_same_world_image(path_a, path_b):
    a = nib.as_closest_canonical(nib.load(str(path_a)))
    b = nib.as_closest_canonical(nib.load(str(path_b)))
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-5)
    np.testing.assert_allclose(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj), rtol=1e-6, atol=1e-6)


def test_lps_int16_with_slope_roundtrip(tmp_path):
    raw = np.arange(6 * 7 * 5, dtype=np.int16).reshape(6, 7, 5)
    img = nib.Nifti1Image(raw, LPS)
    img.header.set_slope_inter(0.5, -10)
    img.set_qform(LPS, code=1)
    img.set_sform(LPS, code=2)
    src = tmp_path / "lps.nii.gz"
    nib.save(img, src)
    vol = read_volume(src)
    assert vol.array.dtype == np.float32
    np.testing.assert_allclose(vol.array, raw * 0.5 - 10)
    np.testing.assert_allclose(vol.affine, LPS)
    assert vol.spacing == pytest.approx((1.2, 1.2, 2.5))
    out = write_volume(vol, tmp_path / "out.nii.gz")
    assert_same_world_image(src, out)
    back = nib.load(str(out))
    assert int(back.header["sform_code"]) == 2 and int(back.header["qform_code"]) == 1


def test_big_endian_roundtrip(tmp_path):
    data = np.random.default_rng(0).normal(size=(5, 6, 7)).astype(">f4")
    hdr = nib.Nifti1Header(endianness=">")
    img = nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]), header=hdr)
    src = tmp_path / "be.nii"
    nib.save(img, src)
    assert nib.load(str(src)).header.endianness == ">"
    vol = read_volume(src)
    assert vol.array.dtype.isnative
    np.testing.assert_array_equal(vol.array, data.astype("<f4"))
    assert_same_world_image(src, write_volume(vol, tmp_path / "be_out.nii.gz"))


def test_oblique_and_nifti2_roundtrip(tmp_path):
    data = np.random.default_rng(1).normal(size=(8, 9, 10)).astype(np.float32)
    aff = oblique_affine()
    src = tmp_path / "oblique2.nii.gz"
    nib.save(nib.Nifti2Image(data, aff), src)
    vol = read_volume(src)
    assert vol.metadata["format"] == "nifti2"
    np.testing.assert_allclose(vol.affine, aff, atol=1e-6)
    out = write_volume(vol, tmp_path / "oblique_out.nii.gz")
    assert isinstance(nib.load(str(out)), nib.Nifti2Image)
    assert_same_world_image(src, out)


def test_4d_singleton_squeezed_and_frame_choice(tmp_path):
    data = np.random.default_rng(2).normal(size=(4, 5, 6, 3)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "four.nii.gz")
    nib.save(nib.Nifti1Image(data[..., :1], np.eye(4)), tmp_path / "single.nii.gz")
    assert read_volume(tmp_path / "single.nii.gz").shape == (4, 5, 6)
    with pytest.warns(UserWarning, match="4D with 3 volumes; using volume 0"):
        first = read_volume(tmp_path / "four.nii.gz")
    np.testing.assert_array_equal(first.array, data[..., 0])
    with pytest.warns(UserWarning):
        np.testing.assert_array_equal(read_volume(tmp_path / "four.nii.gz", frame=2).array, data[..., 2])
    with pytest.raises(MeddiffError, match="frame 5 does not exist"):
        read_volume(tmp_path / "four.nii.gz", frame=5)


def test_labels_written_as_integers(tmp_path):
    labels = np.zeros((5, 5, 5), np.float32)
    labels[1:3, 1:3, 1:3] = 3
    out = write_volume(Volume(labels, LPS), tmp_path / "labels.nii.gz", kind="labels")
    img = nib.load(str(out))
    assert np.issubdtype(img.get_data_dtype(), np.integer)
    back = read_volume(out)
    assert np.issubdtype(back.array.dtype, np.integer)
    np.testing.assert_array_equal(back.array, labels.astype(int))


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_simpleitk_formats_keep_world_geometry(tmp_path, suffix):
    import SimpleITK as sitk

    arr_zyx = np.random.default_rng(3).normal(size=(6, 7, 8)).astype(np.float32)
    image = sitk.GetImageFromArray(arr_zyx)
    image.SetSpacing((1.5, 2.0, 2.5))
    image.SetOrigin((10.0, -20.0, 30.0))
    sitk.WriteImage(image, str(tmp_path / f"img{suffix}"))
    vol = read_volume(tmp_path / f"img{suffix}")
    np.testing.assert_array_equal(vol.array, arr_zyx.transpose(2, 1, 0))
    # voxel (i, j, k) -> LPS origin + spacing * index -> RAS flips x and y
    ijk = np.array([3, 4, 5, 1.0])
    lps = np.array([10 + 1.5 * 3, -20 + 2.0 * 4, 30 + 2.5 * 5])
    np.testing.assert_allclose((vol.affine @ ijk)[:3], lps * [-1, -1, 1])


def test_dicom_series_folder(tmp_path):
    import SimpleITK as sitk

    arr = (np.random.default_rng(4).random((4, 6, 5)) * 1000).astype(np.int16)  # z, y, x
    folder = tmp_path / "dicom"
    folder.mkdir()
    # SimpleITK's DICOM writer (GDCM) sets LC_CTYPE to "C" and leaves it so: put it back, or later tests in this
    # process would decode a subprocess's UTF-8 output as ASCII
    ctype = locale.setlocale(locale.LC_CTYPE)
    try:
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        for z in range(arr.shape[0]):
            sl = sitk.GetImageFromArray(arr[z : z + 1])
            sl.SetSpacing((0.8, 0.8, 3.0))
            sl.SetOrigin((0.0, 0.0, 3.0 * z))
            for tag, value in {
                "0020|000d": "1.2.3",
                "0020|000e": "1.2.3.4",
                "0008|0060": "MR",
                "0020|0032": f"0\\0\\{3.0 * z}",
                "0020|0037": "1\\0\\0\\0\\1\\0",
                "0020|0013": str(z + 1),
                "0028|0030": "0.8\\0.8",
                "0018|0050": "3.0",
            }.items():
                sl.SetMetaData(tag, value)
            writer.SetFileName(str(folder / f"slice{z:03d}.dcm"))
            writer.Execute(sl)
    finally:
        locale.setlocale(locale.LC_CTYPE, ctype)
    vol = read_volume(folder)
    assert vol.shape == (5, 6, 4)
    np.testing.assert_array_equal(vol.array, arr.transpose(2, 1, 0))
    assert vol.spacing == pytest.approx((0.8, 0.8, 3.0), abs=1e-4)


def test_resample_and_back_keeps_world_position(tmp_path):
    data = np.zeros((30, 30, 20), np.float32)
    data[10:20, 12:18, 5:15] = 1.0
    vol = Volume(data, oblique_affine())
    coarse = resample(vol, (3.0, 3.0, 3.0))
    assert coarse.spacing == pytest.approx((3.0, 3.0, 3.0))
    back = resample_like(coarse, vol)
    assert back.shape == vol.shape
    np.testing.assert_allclose(back.affine, vol.affine)

    # centre of mass in world coordinates is kept
    def com(v):
        return v.affine[:3, :3] @ (np.argwhere(v.array > 0.5).mean(0)) + v.affine[:3, 3]

    np.testing.assert_allclose(com(back), com(vol), atol=1.0)


def test_canonical_reorientation_is_lossless():
    data = np.random.default_rng(5).normal(size=(4, 5, 6)).astype(np.float32)
    vol = Volume(data, LPS)
    can = to_canonical(vol)
    assert np.all(np.diag(can.affine)[:3] > 0)
    assert np.sort(can.array.ravel()).tolist() == np.sort(data.ravel()).tolist()


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(MeddiffError, match="file not found"):
        read_volume(tmp_path / "missing.nii.gz")
    (tmp_path / "text.nii.gz").write_text("this is not an image")
    with pytest.raises(MeddiffError, match="not gzip-compressed"):
        read_volume(tmp_path / "text.nii.gz")
    (tmp_path / "empty.nii").write_bytes(b"")
    with pytest.raises(MeddiffError, match="empty"):
        read_volume(tmp_path / "empty.nii")
    (tmp_path / "garbage.nii").write_bytes(b"\x00" * 400)
    with pytest.raises(MeddiffError, match="not a valid NIfTI"):
        read_volume(tmp_path / "garbage.nii")
    with open(tmp_path / "truncated.nii.gz", "wb") as f:
        f.write(gzip.compress(b"\x5c\x01" + b"\x00" * 100))
    with pytest.raises(MeddiffError):
        read_volume(tmp_path / "truncated.nii.gz")


def test_write_never_overwrites_and_leaves_no_partial_file(tmp_path):
    vol = Volume(np.ones((3, 3, 3), np.float32))
    path = write_volume(vol, tmp_path / "a.nii.gz")
    before = path.read_bytes()
    with pytest.raises(MeddiffError, match="exists"):
        write_volume(Volume(np.zeros((3, 3, 3), np.float32)), path)
    assert path.read_bytes() == before
    write_volume(Volume(np.zeros((3, 3, 3), np.float32)), path, overwrite=True)
    assert read_volume(path).array.max() == 0
    assert [p.name for p in tmp_path.iterdir()] == ["a.nii.gz"]


# --- no NaN volume written; unreadable and damaged files are one-line errors (issue 13) ---------------------------


def test_no_nan_volume_is_ever_written(tmp_path):
    arr = np.ones((4, 4, 4), np.float32)
    arr[1, 2, 3] = np.nan
    with pytest.raises(MeddiffError, match="1 voxels are NaN or Inf"):
        md.write_volume(md.Volume(arr), tmp_path / "x.nii.gz")
    assert list(tmp_path.iterdir()) == []  # no partial file either
    md.write_volume(md.Volume(arr), tmp_path / "own.nii.gz", allow_nonfinite=True)  # the user's own data, on request
    assert np.isnan(md.read_volume(tmp_path / "own.nii.gz").array).sum() == 1


def test_header_claiming_an_enormous_image(tmp_path):
    small = np.zeros((4, 4, 4), np.float32)
    header = nib.Nifti1Header()
    header.set_data_dtype(np.float32)
    header.set_data_shape((4000, 4000, 4000))
    header["vox_offset"] = 352
    raw = header.binaryblock + b"\0" * 4 + small.tobytes()
    (tmp_path / "big.nii").write_bytes(raw)
    with gzip.open(tmp_path / "big.nii.gz", "wb") as f:
        f.write(raw)
    with pytest.raises(MeddiffError, match="truncated or damaged"):
        md.read_volume(tmp_path / "big.nii")
    with pytest.raises(MeddiffError, match="free memory"):
        md.read_volume(tmp_path / "big.nii.gz")
    header.set_data_shape((40, 40, 40))  # fits in memory, but the file is short
    with gzip.open(tmp_path / "short.nii.gz", "wb") as f:
        f.write(header.binaryblock + b"\0" * 4 + small.tobytes())
    proc = run_cli("segment", "--image", tmp_path / "short.nii.gz", "--out", tmp_path / "seg")
    assert_one_line_error(proc, "not a valid NIfTI file")


def test_unreadable_input_is_a_user_error(tmp_path, monkeypatch):
    path = write_nifti(tmp_path / "scan.nii.gz", np.ones((4, 4, 4)))
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == path else real_access(p, mode, **k))
    with pytest.raises(MeddiffError, match="permission denied"):
        md.read_volume(path)
