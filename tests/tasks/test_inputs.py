"""Every task's first step (`tasks.inputs`): NaN, infinite or constant images are refused in one line, before
any output folder exists."""

from __future__ import annotations

import numpy as np
import pytest

import napari_meddiff as md
from napari_meddiff.errors import MeddiffError
from tests.helpers import assert_one_line_error, run_cli, write_nifti


def test_segment_refuses_nan_voxels(cli_env, tmp_path):
    arr = np.random.default_rng(0).random((20, 20, 20)).astype(np.float32)
    arr[5, 5, 5] = np.nan
    arr[6, 6, 6] = np.inf
    image = write_nifti(tmp_path / "scan.nii.gz", arr)
    proc = run_cli(
        "segment",
        "--model",
        "tiny-seg-2d",
        "--image",
        image,
        "--out",
        tmp_path / "seg",
        "--ensemble",
        "1",
        "--steps",
        "2",
        env=cli_env,
    )
    assert_one_line_error(proc, "2 NaN or infinite voxels")
    assert not (tmp_path / "seg").exists()  # no empty output folder left behind


def test_constant_images_are_refused_not_labelled(tiny_models):
    zeros = md.Volume(np.zeros((16, 16, 16), np.float32), np.diag([4, 4, 4, 1.0]))
    with pytest.raises(MeddiffError, match="constant"):
        md.segment(str(tiny_models["seg2d"]), zeros, ensemble=1, steps=1, device="cpu")
    mask = zeros.with_array((np.indices(zeros.shape).sum(0) < 8).astype(np.uint8))
    with pytest.raises(MeddiffError, match="constant"):
        md.inpaint(str(tiny_models["ldm3d"]), zeros, mask, steps=1, device="cpu")
