"""The `meddiff` command end to end: real files written and read back, one-line errors for bad input."""

from __future__ import annotations

import errno
import json
import os

import nibabel as nib
import numpy as np
import pytest

from napari_meddiff.cli import main
from tests.helpers import run_cli


def test_generate_writes_nifti_and_sidecar(models_env, tmp_path, capsys):
    out = tmp_path / "gen"
    assert (
        main(
            [
                "generate",
                "--model",
                "tiny-ldm-3d",
                "--num",
                "2",
                "--seed",
                "5",
                "--sampler",
                "ddim",
                "--steps",
                "3",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    files = sorted(p.name for p in out.iterdir() if p.name != "cohort.csv")
    assert files == [
        "tiny-ldm-3d_seed5.json",
        "tiny-ldm-3d_seed5.nii.gz",
        "tiny-ldm-3d_seed6.json",
        "tiny-ldm-3d_seed6.nii.gz",
    ]
    img = nib.load(str(out / "tiny-ldm-3d_seed5.nii.gz"))
    assert img.header.get_zooms() == (4.0, 4.0, 4.0)
    assert np.all(np.diag(img.affine)[:3] > 0)  # RAS
    assert img.get_data_dtype() == np.float32
    meta = json.loads((out / "tiny-ldm-3d_seed5.json").read_text())
    assert meta["seed"] == 5 and meta["sampler"] == "ddim" and meta["steps"] == 3 and len(meta["model_sha256"]) == 64
    # same seed, same volume, bit for bit; existing files are not overwritten
    before = (out / "tiny-ldm-3d_seed5.nii.gz").read_bytes()
    assert (
        main(
            [
                "generate",
                "--model",
                "tiny-ldm-3d",
                "--seed",
                "5",
                "--sampler",
                "ddim",
                "--steps",
                "3",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "exists, skipping" in capsys.readouterr().err
    assert (out / "tiny-ldm-3d_seed5.nii.gz").read_bytes() == before
    again = tmp_path / "again"
    main(
        ["generate", "--model", "tiny-ldm-3d", "--seed", "5", "--sampler", "ddim", "--steps", "3", "--out", str(again)]
    )
    np.testing.assert_array_equal(nib.load(str(again / "tiny-ldm-3d_seed5.nii.gz")).get_fdata(), img.get_fdata())


def test_models_lists_name_kind_shape(models_env, capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "tiny-ldm-3d" in out and "ldm" in out and "16x16x16" in out and "4x4x4" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "--model", "nope", "--out", "{tmp}/o"], "unknown model 'nope'"),
        (["generate", "--model", "tiny-ddpm-2d", "--steps", "0", "--out", "{tmp}/o"], "--steps must be a positive"),
        (["generate", "--model", "tiny-ddpm-2d", "--steps", "-3", "--out", "{tmp}/o"], "--steps must be a positive"),
        (["generate", "--model", "tiny-ddpm-2d", "--out", "/proc/forbidden"], "output folder"),
        (["generate", "--model", "tiny-ddpm-2d", "--device", "tpu", "--out", "{tmp}/o"], "unknown device"),
    ],
)
def test_bad_input_one_line_error(models_env, tmp_path, args, message):
    env = {**os.environ, "MEDDIFF_MODELS": str(models_env)}
    proc = run_cli(*[a.format(tmp=tmp_path) for a in args], env=env)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_unknown_sampler_rejected(models_env, tmp_path):
    proc = run_cli("generate", "--sampler", "euler", "--out", str(tmp_path))
    assert proc.returncode == 2 and "invalid choice: 'euler'" in proc.stderr


# --- unforeseen errors are one line; main leaves the process as it found it ---------------------------------------


def test_cli_turns_unforeseen_os_errors_into_one_line(cli_env, tmp_path, monkeypatch, capsys):
    import napari_meddiff.tasks.batch as batch

    def boom(*a, **k):
        raise OSError(errno.EIO, "Input/output error", str(tmp_path / "o" / "x.json"))

    monkeypatch.setattr(batch, "write_json_atomic", boom)
    monkeypatch.setenv("MEDDIFF_MODELS", cli_env["MEDDIFF_MODELS"])
    assert main(["generate", "--model", "tiny-ldm-3d", "--steps", "1", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "meddiff: error:" in err and "Input/output error" in err and "Traceback" not in err


def test_cli_main_leaves_no_process_wide_state(cli_env, tmp_path, monkeypatch):
    import torch

    from napari_meddiff.choices import AUTOENCODER_PASS_ENV

    monkeypatch.setenv("MEDDIFF_MODELS", cli_env["MEDDIFF_MODELS"])
    monkeypatch.delenv(AUTOENCODER_PASS_ENV, raising=False)
    threads = torch.get_num_threads()
    assert (
        main(["generate", "--model", "tiny-ldm-3d", "--steps", "1", "--decode", "tiled", "--out", str(tmp_path / "o")])
        == 0
    )
    assert main(["generate", "--decode", "tiled", "--steps", "0", "--out", str(tmp_path / "p")]) == 2
    assert AUTOENCODER_PASS_ENV not in os.environ
    assert torch.get_num_threads() == threads
