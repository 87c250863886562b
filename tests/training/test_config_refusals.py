"""What a training run cannot do is refused before it starts (issue 36): numbers must be finite and in range
(``--max-minutes nan`` turned the time limit off), a validation split the data cannot give is refused rather
than silently dropped, and a training step that cannot fit in memory is refused with its estimate before any
data is loaded."""

from __future__ import annotations

import logging

import pytest
import torch
import yaml

from napari_meddiff.errors import MeddiffError
from napari_meddiff.training.config import validate
from napari_meddiff.training.pipeline import train
from tests.helpers import assert_one_line_error, run_cli, tiny_train_config


def _config(tmp_path, **changes) -> dict:
    cfg = yaml.safe_load(tiny_train_config(tmp_path).read_text())
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def _fake_subjects(folder, count: int) -> None:
    """Files named like cohort subjects that are not NIfTI: reading one fails, so a check that passes is a check
    made before any data was loaded."""
    folder.mkdir()
    for i in range(count):
        (folder / f"sub-{i:06d}_T1w.nii.gz").write_bytes(b"not an image")


@pytest.mark.parametrize(
    "options, message",
    [
        (["--max-minutes", "nan"], "--max-minutes must be a number, got nan"),
        (["--max-minutes", "inf"], "--max-minutes must be a number, got inf"),
        (["--steps", "0"], "--steps must be positive"),
        (["--threads", "-2"], "--threads must be positive"),
    ],
)
def test_cli_numbers_must_be_finite_and_positive(tmp_path, options, message):
    proc = run_cli(
        "train", tiny_train_config(tmp_path), "--out", tmp_path / "m", "--work-dir", tmp_path / "r", *options
    )
    assert_one_line_error(proc, message)
    assert not (tmp_path / "m").exists() and not (tmp_path / "r").exists()


def test_train_refuses_a_time_limit_that_is_not_a_number(tmp_path):
    for minutes in (float("nan"), float("inf"), 0.0):
        with pytest.raises(MeddiffError, match="max_minutes must be"):
            train(tiny_train_config(tmp_path), out=tmp_path / "m", work_dir=tmp_path / "r", max_minutes=minutes)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"training": {"max_minutes": float("nan")}}, "training.max_minutes must be a number"),
        ({"training": {"ema_decay": float("nan")}}, "training.ema_decay must be a number"),
        ({"training": {"ema_decay": 1.0}}, "training.ema_decay must be in [0, 1)"),
        ({"training": {"log_every": 0}}, "training.log_every must be positive"),
        ({"training": {"batch_size": 2.5}}, "training.batch_size must be an integer"),
        ({"training": {"seed": -1}}, "training.seed must be in [0, 4294967295]"),
        ({"training": {"num_threads": 0}}, "training.num_threads must be positive"),
        ({"data": {"val_subjects": -1}}, "data.val_subjects must be >= 0"),
        ({"data": {"max_subjects": 0}}, "data.max_subjects must be positive"),
        ({"data": {"min_brain_fraction": float("nan")}}, "data.min_brain_fraction must be a number"),
        ({"data": {"slice_thickness": float("inf")}}, "data.slice_thickness must be a number"),
        ({"data": {"flip": "no"}}, "data.flip must be true or false"),
        ({"voxel_size": [float("nan"), 10.0]}, "voxel_size must be a number"),
        ({"image_shape": [16.5, 16]}, "image_shape must be an integer"),
        ({"image_shape": [0, 16]}, "image_shape must be positive"),
        ({"scheduler": {"beta_end": float("nan")}}, "scheduler.beta_end must be a number"),
        ({"defaults": {"steps": 0}}, "defaults.steps must be positive"),
    ],
)
def test_config_numbers_must_be_finite_and_in_range(tmp_path, changes, message):
    with pytest.raises(MeddiffError) as err:
        validate(_config(tmp_path, **changes))
    assert message in str(err.value)


def test_a_zero_sized_network_is_refused(tmp_path):
    cfg = _config(tmp_path)
    cfg["networks"]["unet"]["channels"] = [0, 16]
    with pytest.raises(MeddiffError, match="networks.unet.channels must be positive"):
        validate(cfg)


def test_more_validation_subjects_than_the_data_give_is_refused_before_loading(tmp_path):
    _fake_subjects(tmp_path / "no-data-needed", 3)
    config = tmp_path / "val.yaml"
    config.write_text(yaml.safe_dump(_config(tmp_path, data={"val_subjects": 5})))
    proc = run_cli("train", config, "--out", tmp_path / "m", "--work-dir", tmp_path / "r", "--no-progress")
    assert_one_line_error(proc, "data.val_subjects is 5 but")
    assert "gives 3 subject(s)" in proc.stderr and "at least one must be left to train on" in proc.stderr
    assert not (tmp_path / "m").exists() and not (tmp_path / "r").exists()


def test_the_default_validation_split_says_when_the_data_are_too_few(tmp_path, caplog):
    from napari_meddiff.training.pipeline import plan_training

    _fake_subjects(tmp_path / "no-data-needed", 2)
    cfg = validate(_config(tmp_path))
    with caplog.at_level(logging.WARNING):
        plan_training(cfg, torch.device("cpu"), _MainProcess())
    assert "no validation subjects: data.val_subjects is not set and 2 subject(s)" in caplog.text
    cfg = validate(_config(tmp_path, data={"val_subjects": 2}))  # asked for explicitly: refused
    with pytest.raises(MeddiffError, match="data.val_subjects is 2 but"):
        plan_training(cfg, torch.device("cpu"), _MainProcess())


class _MainProcess:
    main = True


def test_a_batch_that_cannot_fit_is_refused_with_the_estimate_before_loading(tmp_path):
    _fake_subjects(tmp_path / "no-data-needed", 3)
    config = tmp_path / "huge.yaml"
    config.write_text(yaml.safe_dump(_config(tmp_path, training={"batch_size": 100_000_000})))
    proc = run_cli("train", config, "--out", tmp_path / "m", "--work-dir", tmp_path / "r", "--no-progress")
    assert_one_line_error(proc, "training.batch_size 100000000 of 16x16 items) would need about")
    assert "lower training.batch_size" in proc.stderr
    assert not (tmp_path / "m").exists() and not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"image_shape": [40_000, 40_000]}, "training.batch_size 2 of 40000x40000 items"),
        (  # crops of the whole image for the first steps only: whole images come after
            {"image_shape": [40_000, 40_000], "training": {"patch_size": [16, 16], "patch_steps": 10}},
            "training.batch_size 2 of 40000x40000 items",
        ),
    ],
)
def test_an_image_size_that_cannot_fit_is_refused(tmp_path, changes, message):
    from napari_meddiff.training.footprint import check_steps_fit

    cfg = validate(_config(tmp_path, **changes))
    with pytest.raises(MeddiffError, match="would need about") as err:
        check_steps_fit(cfg, torch.device("cpu"))
    assert message in str(err.value)
    cfg["training"]["patch_steps"] = None  # crops throughout: a step is small
    cfg["training"]["patch_size"] = [16, 16]
    check_steps_fit(cfg, torch.device("cpu"))


def test_an_autoencoder_batch_that_cannot_fit_names_its_section(tmp_path):
    from napari_meddiff.training.footprint import check_steps_fit

    cfg = _config(tmp_path, kind="ldm", spatial_dims=3, image_shape=[16, 16, 16], voxel_size=[10.0, 10.0, 10.0])
    cfg["networks"]["autoencoder"] = {
        "channels": [8, 8],
        "latent_channels": 2,
        "num_res_blocks": [1, 1],
        "attention_levels": [False, False],
        "norm_num_groups": 8,
        "with_encoder_nonlocal_attn": False,
        "with_decoder_nonlocal_attn": False,
    }
    cfg["autoencoder_training"] = {"batch_size": 10**9}
    with pytest.raises(MeddiffError, match=r"autoencoder \(autoencoder_training.batch_size 1000000000 of 16x16x16"):
        check_steps_fit(validate(cfg), torch.device("cpu"))
