"""What a demanding user does wrong must never lose a file, print a traceback or write a NaN volume (issue 13).

Each case runs the real command or function on real files and checks the files on disk afterwards.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

import napari_meddiff as md
from napari_meddiff.cli import main
from napari_meddiff.errors import MeddiffError


def run_cli(*args, env=None, umask=None):
    pre = (lambda: os.umask(umask)) if umask is not None else None
    return subprocess.run(
        [sys.executable, "-m", "napari_meddiff.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        preexec_fn=pre,
    )


def assert_one_line_error(proc, message: str) -> None:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("meddiff: error:")]
    assert len(lines) == 1 and message in lines[0], proc.stderr


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def write_nifti(path: Path, array: np.ndarray, spacing=(2.0, 2.0, 2.0)) -> Path:
    nib.save(nib.Nifti1Image(array.astype(np.float32), np.diag([*spacing, 1.0])), str(path))
    return path


@pytest.fixture
def env(models_env):
    return {**os.environ, "MEDDIFF_MODELS": str(models_env)}


# --- training never replaces what it did not write ------------------------------------------------------------


def tiny_train_config(tmp_path: Path) -> Path:
    cfg = {
        "name": "t-ddpm",
        "kind": "ddpm",
        "spatial_dims": 2,
        "image_shape": [16, 16],
        "voxel_size": [10.0, 10.0],
        "data": {"dir": str(tmp_path / "no-data-needed")},
        "networks": {
            "unet": {
                "channels": [8, 16],
                "attention_levels": [False, False],
                "num_res_blocks": 1,
                "num_head_channels": 8,
                "norm_num_groups": 8,
            }
        },
        "training": {"steps": 2, "batch_size": 2},
    }
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_train_refuses_an_existing_out_folder_and_leaves_it_intact(tmp_path):
    config = tiny_train_config(tmp_path)
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "chapter1.tex").write_text("months of work")
    before = snapshot(out)
    for extra in ([], ["--overwrite"]):
        proc = run_cli("train", config, "--out", out, "--work-dir", tmp_path / "run", *extra)
        assert_one_line_error(proc, str(out))
        assert snapshot(out) == before


def test_train_out_that_is_a_file_is_a_user_error(tmp_path):
    config = tiny_train_config(tmp_path)
    out = tmp_path / "model"
    out.write_text("not a folder")
    proc = run_cli("train", config, "--out", out, "--work-dir", tmp_path / "run")
    assert_one_line_error(proc, "is not a folder")
    assert out.read_text() == "not a folder"


def test_resume_without_a_checkpoint_is_refused(tmp_path):
    config = tiny_train_config(tmp_path)
    proc = run_cli("train", config, "--out", tmp_path / "m", "--work-dir", tmp_path / "run", "--resume")
    assert_one_line_error(proc, "no checkpoint")
    assert not (tmp_path / "m").exists()


def test_model_folder_overwrite_replaces_only_a_model_folder(tmp_path, tiny_models):
    from napari_meddiff.models import load_model, save_model_folder

    model = load_model(tiny_models["ddpm2d"])
    config = {k: v for k, v in model.config.items() if k != "weights"}
    out = save_model_folder(tmp_path / "m", config, {"unet": model.unet}, card="# m\n")
    with pytest.raises(MeddiffError, match="exists; not overwriting"):
        save_model_folder(out, config, {"unet": model.unet}, card="# m\n")
    save_model_folder(out, config, {"unet": model.unet}, card="# second\n", overwrite=True)
    assert (out / "MODEL_CARD.md").read_text() == "# second\n"
    (out / "notes.txt").write_text("mine")
    with pytest.raises(MeddiffError, match="notes.txt"):
        save_model_folder(out, config, {"unet": model.unet}, card="# third\n", overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and (out / "MODEL_CARD.md").read_text() == "# second\n"


# --- no silent garbage -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eta", ["-0.5", "1.5", "nan", "inf"])
def test_eta_out_of_range_is_refused(env, tmp_path, eta):
    proc = run_cli(
        "generate",
        "--model",
        "tiny-ldm-3d",
        "--sampler",
        "ddim",
        "--steps",
        "2",
        "--eta",
        eta,
        "--out",
        tmp_path / "o",
        env=env,
    )
    assert_one_line_error(proc, "eta must be")
    assert not (tmp_path / "o").exists()


def test_eta_out_of_range_in_the_python_api(tiny_models):
    for eta in (-1.0, 2.0, float("nan")):
        with pytest.raises(MeddiffError, match="eta must be"):
            md.generate(str(tiny_models["ldm3d"]), [0], sampler="ddim", steps=2, eta=eta, device="cpu")
    image = md.Volume(np.random.default_rng(0).random((16, 16, 16), dtype=np.float32), np.diag([4, 4, 4, 1.0]))
    mask = image.with_array((np.indices(image.shape).sum(0) < 8).astype(np.uint8))
    with pytest.raises(MeddiffError, match="eta must be"):
        md.inpaint(str(tiny_models["ldm3d"]), image, mask, sampler="ddim", steps=2, eta=-0.1, device="cpu")


def test_no_nan_volume_is_ever_written(tmp_path):
    arr = np.ones((4, 4, 4), np.float32)
    arr[1, 2, 3] = np.nan
    with pytest.raises(MeddiffError, match="1 voxels are NaN or Inf"):
        md.write_volume(md.Volume(arr), tmp_path / "x.nii.gz")
    assert list(tmp_path.iterdir()) == []  # no partial file either
    md.write_volume(md.Volume(arr), tmp_path / "own.nii.gz", allow_nonfinite=True)  # the user's own data, on request
    assert np.isnan(md.read_volume(tmp_path / "own.nii.gz").array).sum() == 1


def test_segment_refuses_nan_voxels(env, tmp_path):
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
        env=env,
    )
    assert_one_line_error(proc, "2 NaN or infinite voxels")
    assert not (tmp_path / "seg").exists()  # no empty output folder left behind


@pytest.mark.parametrize("seed", ["-1", str(2**63), str(2**64 - 1), "1e3"])
def test_bad_seeds_are_one_line_errors(env, tmp_path, seed):
    for command in (["generate", "--model", "tiny-ldm-3d"], ["cohort", "--num", "1"]):
        proc = run_cli(*command, "--seed", seed, "--out", tmp_path / "o", env=env)
        assert_one_line_error(proc, "--seed")


def test_seed_range_must_stay_in_range(env, tmp_path):
    proc = run_cli(
        "generate", "--model", "tiny-ldm-3d", "--seed", str(2**63 - 1), "--num", "2", "--out", tmp_path / "o", env=env
    )
    assert_one_line_error(proc, "out of range")
    with pytest.raises(MeddiffError, match="out of range"):
        md.generate("tiny-ldm-3d", [-1], steps=1, device="cpu")


# --- one-line errors, not tracebacks -------------------------------------------------------------------------------


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


def test_cli_turns_unforeseen_os_errors_into_one_line(env, tmp_path, monkeypatch, capsys):
    import napari_meddiff.tasks.batch as batch

    def boom(*a, **k):
        raise OSError(errno.EIO, "Input/output error", str(tmp_path / "o" / "x.json"))

    monkeypatch.setattr(batch, "write_json_atomic", boom)
    monkeypatch.setenv("MEDDIFF_MODELS", env["MEDDIFF_MODELS"])
    assert main(["generate", "--model", "tiny-ldm-3d", "--steps", "1", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "meddiff: error:" in err and "Input/output error" in err and "Traceback" not in err


def test_output_path_that_is_a_folder(env, tmp_path):
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
        env=env,
    )
    assert_one_line_error(proc, "is a folder")
    assert folder.is_dir() and not any(folder.iterdir())


def test_requests_that_would_exhaust_memory_are_refused_up_front(tiny_models, tmp_path):
    with pytest.raises(MeddiffError, match=r"would need about [\d.]+ GiB"):
        md.generate(str(tiny_models["ldm3d"]), range(10**5), batch_size=10**5, steps=1, device="cpu")
    with pytest.raises(MeddiffError, match=r"10000000 volumes"):
        md.generate(str(tiny_models["ldm3d"]), range(10**7), steps=1, device="cpu")
    image = md.Volume(np.random.default_rng(0).random((16, 16, 16), dtype=np.float32), np.diag([4, 4, 4, 1.0]))
    with pytest.raises(MeddiffError, match="ensemble of 100000000 members"):
        md.segment(str(tiny_models["seg2d"]), image, ensemble=10**8, steps=1, device="cpu")
    mask = image.with_array((np.indices(image.shape).sum(0) < 8).astype(np.uint8))
    with pytest.raises(MeddiffError, match="candidates"):
        md.inpaint(str(tiny_models["ldm3d"]), image, mask, candidates=10**8, steps=1, device="cpu")


def test_guidance_counts_twice_the_unet_batch(tiny_models, monkeypatch):
    """Classifier-free guidance runs both branches as one batch: the up-front estimate counts them."""
    from napari_meddiff.runtime import memory
    from napari_meddiff.tasks import footprint

    model = md.load_model(tiny_models["ldm3d"])
    plain = 64 * footprint.network_bytes_per_sample(model)
    guided = plain + 64 * footprint.unet_bytes_per_sample(model)
    monkeypatch.setattr(memory, "available_ram_bytes", lambda: int((plain + guided) / 2 / 0.9))
    footprint.check_request_fits(model, batch=64)
    with pytest.raises(MeddiffError, match="would need"):
        footprint.check_request_fits(model, batch=64, guided=True)


# --- shared folders: every output follows the umask ------------------------------------------------------------------


def test_sidecars_and_manifest_follow_the_umask(env, tmp_path):
    out = tmp_path / "cohort"
    proc = run_cli(
        "generate", "--model", "tiny-ldm-3d", "--num", "2", "--steps", "1", "--out", out, env=env, umask=0o002
    )
    assert proc.returncode == 0, proc.stderr
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert set(modes.values()) == {0o664}, modes
    assert "cohort.csv" in modes and any(n.endswith(".json") for n in modes)


def test_failed_validation_leaves_no_empty_folder(env, tmp_path):
    proc = run_cli("generate", "--model", "no-such-model", "--out", tmp_path / "new" / "deeper", env=env)
    assert_one_line_error(proc, "unknown model")
    assert not (tmp_path / "new").exists()
    existing = tmp_path / "mine"
    existing.mkdir()
    run_cli("generate", "--model", "no-such-model", "--out", existing, env=env)
    assert existing.is_dir()  # a folder the user had is never removed


def test_sidecar_json_is_valid_after_generate(env, tmp_path):
    out = tmp_path / "g"
    assert (
        run_cli("generate", "--model", "tiny-ldm-3d", "--steps", "1", "--seed", "3", "--out", out, env=env).returncode
        == 0
    )
    meta = json.loads((out / "tiny-ldm-3d_seed3.json").read_text())
    assert meta["seed"] == 3


def test_constant_images_are_refused_not_labelled(tiny_models):
    zeros = md.Volume(np.zeros((16, 16, 16), np.float32), np.diag([4, 4, 4, 1.0]))
    with pytest.raises(MeddiffError, match="constant"):
        md.segment(str(tiny_models["seg2d"]), zeros, ensemble=1, steps=1, device="cpu")
    mask = zeros.with_array((np.indices(zeros.shape).sum(0) < 8).astype(np.uint8))
    with pytest.raises(MeddiffError, match="constant"):
        md.inpaint(str(tiny_models["ldm3d"]), zeros, mask, steps=1, device="cpu")


def test_absurd_voxel_size_is_refused_before_allocating(tiny_models):
    image = md.Volume(np.random.default_rng(0).random((8, 8, 8), dtype=np.float32), np.diag([1e6, 1e6, 1e6, 1.0]))
    with pytest.raises(MeddiffError, match="model grid over this image.*voxel size"):
        md.segment(str(tiny_models["seg2d"]), image, ensemble=1, steps=1, device="cpu")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"name": "../../escape"}, "plain folder name"),
        ({"spatial_dims": "two"}, "malformed training config"),
        ({"networks": ["unet"]}, "networks must be a mapping"),
        ({"training": {"steps": 2, "batch_size": -3}}, "training.batch_size must be positive"),
        ({"training": {"steps": 2, "lr": "fast"}}, "training.lr must be a number"),
        ({"training": {"steps": float("inf")}}, "training.steps must be a number"),
    ],
)
def test_malformed_training_configs_are_one_line_errors_and_leave_nothing(tmp_path, change, message):
    config = tiny_train_config(tmp_path)
    cfg = {**yaml.safe_load(config.read_text()), **change}
    config.write_text(yaml.safe_dump(cfg))
    proc = run_cli("train", config, "--out", tmp_path / "m", "--work-dir", tmp_path / "run")
    assert_one_line_error(proc, message)
    assert not (tmp_path / "m").exists() and not (tmp_path / "run").exists()
    assert not (tmp_path.parent / "escape").exists()


def test_failed_training_leaves_no_work_dir_with_only_the_config(tmp_path):
    config = tiny_train_config(tmp_path)  # its data folder holds no usable slice: found after the work dir was made
    (tmp_path / "no-data-needed").mkdir()
    write_nifti(tmp_path / "no-data-needed" / "sub-000000_T1w.nii.gz", np.zeros((8, 8, 8)))
    proc = run_cli("train", config, "--out", tmp_path / "m", "--work-dir", tmp_path / "run")
    assert_one_line_error(proc, "no training items")
    assert not (tmp_path / "run").exists()


def test_failed_review_create_leaves_no_key_folder(tmp_path):
    (tmp_path / "real").mkdir()
    synthetic = tmp_path / "synthetic"
    synthetic.mkdir()
    write_nifti(synthetic / "s.nii.gz", np.random.default_rng(0).random((8, 8, 8)))
    proc = run_cli(
        "review",
        "create",
        "--real",
        tmp_path / "real",
        "--synthetic",
        synthetic,
        "--out",
        tmp_path / "study",
        "--key",
        tmp_path / "keys" / "deep" / "key.json",
    )
    assert_one_line_error(proc, "no images")
    assert not (tmp_path / "keys").exists() and not (tmp_path / "study").exists()


def test_cli_main_leaves_no_process_wide_state(env, tmp_path, monkeypatch):
    import torch

    from napari_meddiff.choices import AUTOENCODER_PASS_ENV

    monkeypatch.setenv("MEDDIFF_MODELS", env["MEDDIFF_MODELS"])
    monkeypatch.delenv(AUTOENCODER_PASS_ENV, raising=False)
    threads = torch.get_num_threads()
    assert (
        main(["generate", "--model", "tiny-ldm-3d", "--steps", "1", "--decode", "tiled", "--out", str(tmp_path / "o")])
        == 0
    )
    assert main(["generate", "--decode", "tiled", "--steps", "0", "--out", str(tmp_path / "p")]) == 2
    assert AUTOENCODER_PASS_ENV not in os.environ
    assert torch.get_num_threads() == threads


def test_review_study_files_follow_the_umask_and_the_key_stays_private(tmp_path):
    for source in ("real", "synthetic"):
        (tmp_path / source).mkdir()
        for i in range(2):
            write_nifti(tmp_path / source / f"{source}{i}.nii.gz", np.random.default_rng(i).random((8, 8, 8)))
    proc = run_cli(
        "review",
        "create",
        "--real",
        tmp_path / "real",
        "--synthetic",
        tmp_path / "synthetic",
        "--out",
        tmp_path / "study",
        "--key",
        tmp_path / "key.json",
        umask=0o002,
    )
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE((tmp_path / "study" / "cases.json").stat().st_mode) == 0o664
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "study" / "cases").iterdir()} == {0o664}
    assert stat.S_IMODE((tmp_path / "key.json").stat().st_mode) == 0o600


def test_the_autoencoder_pass_that_ran_is_recorded(tiny_models):
    (whole,) = md.generate(str(tiny_models["ldm3d"]), [4], steps=2, device="cpu")
    assert whole.metadata["provenance"]["autoencoder_pass"] == "whole"  # tiny: a whole pass fits
    from napari_meddiff.choices import AUTOENCODER_PASS_ENV

    os.environ[AUTOENCODER_PASS_ENV] = "tiled"
    try:
        (tiled,) = md.generate(str(tiny_models["ldm3d"]), [4], steps=2, device="cpu")
    finally:
        del os.environ[AUTOENCODER_PASS_ENV]
    assert tiled.metadata["provenance"]["autoencoder_pass"] == "tiled"
    np.testing.assert_allclose(tiled.array, whole.array, atol=1e-4)  # the same image to floating-point error


def test_saved_model_folder_is_readable_by_the_group(tmp_path):
    import os

    from napari_meddiff.models import build_network, save_model_folder
    from napari_meddiff.testing.tiny_models import TINY_SCHEDULE, tiny_unet_config

    unet = tiny_unet_config(2, 1, 1)
    config = {
        "name": "shared",
        "kind": "ddpm",
        "spatial_dims": 2,
        "image_shape": [16, 16],
        "voxel_size": [2.0, 2.0],
        "scheduler": TINY_SCHEDULE,
        "networks": {"unet": unet},
        "defaults": {"sampler": "ddim", "steps": 2, "precision": "fp32"},
    }
    old = os.umask(0o002)
    try:
        folder = save_model_folder(tmp_path / "shared", config, {"unet": build_network("unet", unet)}, card="# x\n")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
    assert set(modes.values()) == {0o664}, modes  # safetensors itself writes 0600
    assert stat.S_IMODE(folder.stat().st_mode) == 0o775
