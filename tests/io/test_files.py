"""Writing files safely (`io.files`, issue 13): a full disk leaves no partial file and keeps the old one, a folder
is no output file, every output follows the umask, and a command that fails leaves no empty folder behind."""

from __future__ import annotations

import errno
import stat
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import napari_meddiff as md
from napari_meddiff.errors import MeddiffError
from tests.helpers import assert_one_line_error, run_cli, write_nifti


def test_disk_full_leaves_no_partial_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    target = write_nifti(tmp_path / "out.nii.gz", np.zeros((4, 4, 4)))
    before = target.read_bytes()

    def full(img, filename):
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(nib, "save", full)
    with pytest.raises(MeddiffError, match="no space left"):
        md.write_volume(md.Volume(np.ones((4, 4, 4), np.float32)), target, overwrite=True)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nii.gz"]


def test_output_path_that_is_a_folder(cli_env, tmp_path):
    image = write_nifti(tmp_path / "scan.nii.gz", np.random.default_rng(0).random((16, 16, 16)), (4, 4, 4))
    mask = write_nifti(tmp_path / "mask.nii.gz", np.pad(np.ones((4, 4, 4)), 6), (4, 4, 4))
    folder = tmp_path / "out.nii.gz"
    folder.mkdir()
    proc = run_cli(
        "inpaint",
        "--model",
        "tiny-ldm-3d",
        "--image",
        image,
        "--mask",
        mask,
        "--out",
        folder,
        "--steps",
        "2",
        "--overwrite",
        env=cli_env,
    )
    assert_one_line_error(proc, "is a folder")
    assert folder.is_dir() and not any(folder.iterdir())


def test_sidecars_and_manifest_follow_the_umask(cli_env, tmp_path):
    out = tmp_path / "cohort"
    proc = run_cli(
        "generate", "--model", "tiny-ldm-3d", "--num", "2", "--steps", "1", "--out", out, env=cli_env, umask=0o002
    )
    assert proc.returncode == 0, proc.stderr
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert set(modes.values()) == {0o664}, modes
    assert "cohort.csv" in modes and any(n.endswith(".json") for n in modes)


def test_failed_validation_leaves_no_empty_folder(cli_env, tmp_path):
    proc = run_cli("generate", "--model", "no-such-model", "--out", tmp_path / "new" / "deeper", env=cli_env)
    assert_one_line_error(proc, "unknown model")
    assert not (tmp_path / "new").exists()
    existing = tmp_path / "mine"
    existing.mkdir()
    run_cli("generate", "--model", "no-such-model", "--out", existing, env=cli_env)
    assert existing.is_dir()  # a folder the user had is never removed


@pytest.mark.parametrize(
    ("name", "stem"),
    [
        ("sub-01_T1w.nii.gz", "sub-01_T1w"),
        ("scan.NII.GZ", "scan"),
        ("scan.nii", "scan"),
        ("ct.v2.nrrd", "ct.v2"),
        ("image.mha", "image"),
        ("notes.txt", "notes"),
    ],
)
def test_image_stem_strips_the_whole_image_suffix(name, stem):
    from napari_meddiff.io.files import image_stem

    assert image_stem(Path("/data") / name) == stem
