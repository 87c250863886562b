"""Files that are damaged or hold what no scan holds are refused in one line, never read as data (issue 36)."""

from __future__ import annotations

import gzip
import struct

import nibabel as nib
import numpy as np
import pytest

from napari_meddiff.errors import MeddiffError
from napari_meddiff.io.volume import Volume, read_volume


def _image() -> np.ndarray:
    return np.random.default_rng(0).random((8, 9, 10)).astype(np.float32)


def _saved(tmp_path, name: str, array=None, affine=None):
    path = tmp_path / name
    nib.save(nib.Nifti1Image(_image() if array is None else array, np.eye(4) if affine is None else affine), path)
    return path


@pytest.mark.parametrize("where", ["crc", "middle"])
def test_a_gzip_whose_crc_fails_is_refused_not_read(tmp_path, where):
    """nibabel reads only the bytes it needs, so a flipped byte went into the model as voxels of 1e28."""
    good = _saved(tmp_path, "good.nii.gz")
    raw = bytearray(good.read_bytes())
    raw[-8 if where == "crc" else len(raw) // 2] ^= 0x55
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(bytes(raw))
    np.testing.assert_array_equal(read_volume(good).array, _image())
    with pytest.raises(MeddiffError, match="damaged gzip data"):
        read_volume(bad)


def test_complex_voxels_are_refused(tmp_path):
    with pytest.raises(MeddiffError, match="complex-valued voxels"):
        read_volume(_saved(tmp_path, "c.nii", _image().astype(np.complex64)))


def _patched(tmp_path, offset: int, fmt: str, value) -> object:
    raw = bytearray(gzip.decompress(_saved(tmp_path, "src.nii.gz").read_bytes()))
    raw[offset : offset + struct.calcsize(fmt)] = struct.pack(fmt, value)
    path = tmp_path / "patched.nii"
    path.write_bytes(bytes(raw))
    return path


@pytest.mark.parametrize(
    "offset,fmt,value,message",
    [
        (116, "<f", float("inf"), "intercept"),  # scl_inter
        (70, "<h", 1234, "not recognized"),  # datatype code
        (40, "<h", 9, "not a valid NIfTI"),  # dim[0]
    ],
)
def test_damaged_header_fields_say_what_is_wrong(tmp_path, offset, fmt, value, message):
    with pytest.raises(MeddiffError, match=message):
        read_volume(_patched(tmp_path, offset, fmt, value))


@pytest.mark.parametrize(
    "affine,message",
    [
        (np.diag([1e30, 1.0, 1.0, 1.0]), "voxel sizes"),
        (np.diag([0.0, 1.0, 1.0, 1.0]), "voxel sizes"),
        (np.array([[1.0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]), "voxel sizes|parallel"),
        (np.diag([np.nan, 1.0, 1.0, 1.0]), "NaN or infinite"),
    ],
)
def test_unusable_affines_are_refused_where_a_volume_is_made(affine, message):
    """A NaN affine was reported as 'the mask does not overlap', a voxel of 1e30 mm as 'the mask is empty'."""
    with pytest.raises(MeddiffError, match=message):
        Volume(_image(), affine)


def test_an_implausible_voxel_size_in_a_file_is_refused(tmp_path):
    with pytest.raises(MeddiffError, match="voxel sizes 1e\\+30"):
        read_volume(_saved(tmp_path, "huge.nii", affine=np.diag([1e30, 1.0, 1.0, 1.0])))
