"""The rectified-flow sampler (`rflow`, MONAI's RFlowScheduler with its timestep transform) in the one loop, on a
tiny random model: MONAI's own sampling loop reproduced, the same seed giving the same volume, progress,
previews and cancel, and a sampler that does not fit the model's schedule refused in one line."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from monai.networks.schedulers import RFlowScheduler

from napari_meddiff import Cancelled, MeddiffError, generate, load_model
from napari_meddiff.diffusion.loop import denoise
from napari_meddiff.diffusion.samplers import RFLOW_KEYS
from napari_meddiff.diffusion.seeds import initial_noise, seeded_generators
from napari_meddiff.tasks.settings import task_defaults
from napari_meddiff.testing.tiny_models import make_tiny_model
from tests.helpers import assert_one_line_error, run_cli

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def rflow_path(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("rflow") / "tiny-rflow-2d", "ddpm", 2, rflow=True)


@pytest.fixture(scope="module")
def rflow_model(rflow_path):
    return load_model(rflow_path)


def monai_rflow_chain(model, x: torch.Tensor, steps: int) -> torch.Tensor:
    """MONAI's rectified-flow sampling as its ControlNetDiffusionInferer / MAISI run it."""
    schedule = model.config["scheduler"]
    scheduler = RFlowScheduler(**{k: schedule[k] for k in RFLOW_KEYS if k in schedule})
    scheduler.set_timesteps(steps, input_img_size_numel=int(np.prod(x.shape[2:])))
    nexts = torch.cat((scheduler.timesteps[1:], torch.tensor([0], dtype=scheduler.timesteps.dtype)))
    with torch.no_grad():
        for t, next_t in zip(scheduler.timesteps, nexts):
            out = model.unet(x, timesteps=torch.Tensor((t,)))
            x, _ = scheduler.step(out, t, x, next_t)
    return x


def test_the_loop_runs_monais_rectified_flow(rflow_model):
    """Continuous, transformed timesteps (not rounded to integers) and Euler steps onto the clean estimate."""
    gens = seeded_generators([5], CPU)
    x = initial_noise(rflow_model.sample_shape, gens, CPU)
    timesteps = []
    got = denoise(
        rflow_model, x, sampler="rflow", steps=4, generators=gens, on_step=lambda i: timesteps.append(i.timestep)
    )
    expected = monai_rflow_chain(rflow_model, x.clone(), 4)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert (got - x).abs().mean() > 1e-2  # the velocity moved it
    assert timesteps[0] == 1000 and all(isinstance(t, float) for t in timesteps)
    assert any(t != round(t) for t in timesteps)
    uniform = [1000 - 250 * i for i in range(4)]
    assert all(t > u for t, u in zip(timesteps[1:], uniform[1:]))  # the transform: more steps where it is noisy


def test_same_seed_same_volume_progress_and_previews(rflow_model):
    steps, previews = [], []
    a, b = generate(
        rflow_model, [3, 4], steps=4, batch_size=2, on_step=steps.append, on_preview=previews.append, preview_every=1
    )
    assert [s.index for s in steps] == [1, 2, 3, 4] and {s.total for s in steps} == {4}
    assert len(previews) == 3  # every step but the last
    assert a.metadata["provenance"]["sampler"] == "rflow"  # the model's default
    (again,) = generate(rflow_model, [3], steps=4, batch_size=1)
    np.testing.assert_allclose(again.array, a.array, atol=1e-5)
    (same,) = generate(rflow_model, [3, 4], steps=4, batch_size=2)[:1]
    np.testing.assert_array_equal(same.array, a.array)
    assert not np.array_equal(a.array, b.array)


def test_cancel_stops_the_chain(rflow_model):
    calls, done = [], []

    def cancel() -> bool:
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(Cancelled):
        generate(rflow_model, [0], sampler="rflow", steps=5, on_step=done.append, should_cancel=cancel)
    assert len(done) == 2


def test_samplers_fit_the_schedule(rflow_model, tiny_models):
    for sampler in ("ddpm", "ddim", "dpm++"):
        with pytest.raises(MeddiffError, match="was trained with rectified flow: use rflow"):
            generate(rflow_model, [0], sampler=sampler, steps=2)
    with pytest.raises(MeddiffError, match="was trained with a DDPM noise schedule: use ddpm or ddim or dpm\\+\\+"):
        generate(str(tiny_models["ddpm2d"]), [0], sampler="rflow", steps=2)
    gens = seeded_generators([0], CPU)
    with pytest.raises(MeddiffError, match="RePaint"):
        denoise(rflow_model, initial_noise(rflow_model.sample_shape, gens, CPU), sampler="rflow", steps=4,
                generators=gens, jump_length=2, jump_n=2)  # fmt: skip


def test_an_rflow_model_samples_with_rflow_by_default(rflow_model):
    undeclared = copy.copy(rflow_model)
    undeclared.config = {**rflow_model.config, "defaults": {}}
    assert task_defaults(undeclared, "generate")["sampler"] == "rflow"
    undeclared.config = {**undeclared.config, "scheduler": {"num_train_timesteps": 1000}}
    assert task_defaults(undeclared, "generate")["sampler"] == "dpm++"


def test_the_command_line_takes_rflow_for_an_rflow_model_only(rflow_path, tmp_path):
    proc = run_cli("generate", "--model", rflow_path, "--sampler", "rflow", "--steps", "2", "--out", tmp_path / "a")
    assert proc.returncode == 0, proc.stderr
    assert len(list((tmp_path / "a").glob("*.nii.gz"))) == 1
    proc = run_cli("generate", "--model", rflow_path, "--sampler", "ddim", "--steps", "2", "--out", tmp_path / "b")
    assert_one_line_error(proc, "sampler ddim is for models trained with a DDPM noise schedule")
