"""`meddiff segment` writes its five outputs as a set (issue 36)."""

from __future__ import annotations

import errno

import numpy as np

from napari_meddiff.cli import main
from tests.helpers import write_nifti


def test_a_full_disk_midway_leaves_no_half_result(tiny_models, tmp_path, monkeypatch, capsys):
    """The disk fills while the third file is written: the two written before go too, so the rerun (after
    freeing space) is not refused for 'labels.nii.gz exists'."""
    import napari_meddiff.io.volume as volume_io

    image = write_nifti(tmp_path / "scan.nii.gz", np.random.default_rng(0).random((24, 28, 6)) * 100)
    out = tmp_path / "seg"
    args = ["segment", "--model", str(tiny_models["seg2d"]), "--image", str(image), "--out", str(out),
            "--ensemble", "1", "--steps", "1", "--device", "cpu"]  # fmt: skip
    real_write = volume_io.write_volume

    def full_disk(vol, path, **kwargs):
        if str(path).endswith("uncertainty.nii.gz"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_write(vol, path, **kwargs)

    monkeypatch.setattr(volume_io, "write_volume", full_disk)
    assert main(args) == 2
    assert "No space left" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())
    monkeypatch.setattr(volume_io, "write_volume", real_write)
    assert main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["labels.nii.gz", "probabilities.nii.gz", "uncertainty.nii.gz", "volumes.csv", "segment.json"]
    )
