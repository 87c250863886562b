"""Issue #36 items 7 and 8: a model config that would be silently wrong (a NIfTI whose affine is inf) or fail deep
inside MONAI (a 10^12-step schedule, negative betas, an unknown schedule) is refused where it is read, in one
line naming the file and the key."""

from __future__ import annotations

import copy
import json

import pytest

from napari_meddiff import MeddiffError
from napari_meddiff.models.schema import MAX_TRAIN_TIMESTEPS, NOISE_SCHEDULES, validate_config
from napari_meddiff.testing.bundle_fixtures import write_bundle
from napari_meddiff.testing.tiny_models import make_tiny_model
from tests.helpers import assert_one_line_error, run_cli


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("bounds") / "tiny-ldm-2d", "ldm", 2)


@pytest.fixture(scope="module")
def base(tiny):
    return json.loads((tiny / "model.json").read_text())


def _check(base, **changes):
    config = copy.deepcopy(base)
    for dotted, value in changes.items():
        node = config
        *parents, last = dotted.split("__")
        for key in parents:
            node = node[key]
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return validate_config(config, "m/model.json")


@pytest.mark.parametrize("voxel", [[1e308, 1e308], [0.0, 1.0], [-1.0, 1.0], [1e-5, 1.0], [2000.0, 1.0]])
def test_implausible_voxel_sizes_are_refused(base, voxel):
    with pytest.raises(MeddiffError, match=r"m/model.json: voxel_size must be a list of 2 numbers in 0.001..1000"):
        _check(base, voxel_size=voxel)


def test_plausible_voxel_sizes_pass(base):
    _check(base, voxel_size=[0.001, 1000])


@pytest.mark.parametrize("key", ["image_shape", "latent__shape"])
@pytest.mark.parametrize("shape", [[10**9, 10**9], [4097, 16], [0, 16]])
def test_implausible_shapes_are_refused(base, key, shape):
    with pytest.raises(MeddiffError, match=r"shape must be a list of 2 positive integers, at most 4096 each"):
        _check(base, **{key: shape})


def test_too_many_voxels_are_refused(base):
    config = copy.deepcopy(base)
    config.update(spatial_dims=3, image_shape=[2048, 2048, 2048], voxel_size=[1, 1, 1])
    with pytest.raises(MeddiffError, match=r"image_shape 2048x2048x2048 is .* voxels, more than"):
        validate_config(config, "m/model.json")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"num_train_timesteps": 10**12}, r"scheduler.num_train_timesteps must be a positive integer, at most 100,000"),
        ({"num_train_timesteps": 1e12}, r"scheduler.num_train_timesteps must be a positive integer, at most 100,000"),
        ({"beta_start": -1}, r"scheduler.beta_start must be a number in \(0, 1\), not -1"),
        ({"beta_end": 1.5}, r"scheduler.beta_end must be a number in \(0, 1\)"),
        ({"beta_start": 0.5, "beta_end": 0.1}, r"scheduler.beta_start \(0.5\) must be below beta_end \(0.1\)"),
        ({"beta_start": 0.05, "beta_end": None}, r"must be below beta_end \(0.02, MONAI's default\)"),
        ({"schedule": "quadratic"}, r"schedule must be one of linear_beta, scaled_linear_beta, sigmoid_beta, cosine"),
        ({"schedule": "cosine"}, r"the cosine schedule takes no beta_start or beta_end"),
    ],
)
def test_broken_schedules_are_refused(base, changes, message):
    with pytest.raises(MeddiffError, match=message):
        _check(base, **{f"scheduler__{k}": v for k, v in changes.items()})


def test_good_schedules_pass(base):
    _check(base, scheduler__num_train_timesteps=MAX_TRAIN_TIMESTEPS)
    _check(base, scheduler__schedule="cosine", scheduler__beta_start=None, scheduler__beta_end=None)


def test_the_known_schedules_are_monais():
    from monai.networks.schedulers.scheduler import NoiseSchedules

    assert set(NOISE_SCHEDULES) == set(NoiseSchedules.names)


def test_a_bundle_schedule_of_a_trillion_steps_names_its_config(tmp_path):
    from napari_meddiff.models import read_config

    bundle = write_bundle(tmp_path / "mednist_ddpm", "mednist")
    config = bundle / "configs" / "inference.yaml"
    config.write_text(config.read_text().replace("num_train_timesteps: 1000", "num_train_timesteps: 1000000000000"))
    with pytest.raises(
        MeddiffError, match=r"inference.yaml: scheduler.num_train_timesteps must be a positive integer, at most"
    ):
        read_config(bundle)


def test_the_cli_refuses_an_infinite_affine_in_one_line(tiny, tmp_path):
    model = tmp_path / "huge-voxels"
    model.mkdir()
    for f in tiny.iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    config = json.loads((model / "model.json").read_text())
    config["voxel_size"] = [1e308, 1e308]
    (model / "model.json").write_text(json.dumps(config))
    proc = run_cli("generate", "--model", model, "--num", "1", "--steps", "1", "--out", tmp_path / "out")
    assert_one_line_error(proc, "model.json: voxel_size must be a list of 2 numbers in 0.001..1000 (mm)")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.nii*"))
