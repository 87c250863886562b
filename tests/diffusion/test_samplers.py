"""Sampler settings (`diffusion.samplers`): DDIM's eta outside [0, 1] is refused in the Python API; a zero
terminal-SNR schedule (Lin et al.) ends in pure noise and every sampler steps it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import napari_meddiff as md
from napari_meddiff.errors import MeddiffError


def test_eta_out_of_range_in_the_python_api(tiny_models):
    for eta in (-1.0, 2.0, float("nan")):
        with pytest.raises(MeddiffError, match="eta must be"):
            md.generate(str(tiny_models["ldm3d"]), [0], sampler="ddim", steps=2, eta=eta, device="cpu")
    image = md.Volume(np.random.default_rng(0).random((16, 16, 16), dtype=np.float32), np.diag([4, 4, 4, 1.0]))
    mask = image.with_array((np.indices(image.shape).sum(0) < 8).astype(np.uint8))
    with pytest.raises(MeddiffError, match="eta must be"):
        md.inpaint(str(tiny_models["ldm3d"]), image, mask, sampler="ddim", steps=2, eta=-0.1, device="cpu")


ZERO_SNR = {
    "num_train_timesteps": 1000,
    "schedule": "scaled_linear_beta",
    "beta_start": 0.0015,
    "beta_end": 0.0195,
    "prediction_type": "sample",
    "zero_terminal_snr": True,
}


def test_a_zero_terminal_snr_schedule_ends_in_pure_noise_and_keeps_its_start():
    """Lin et al.'s rescale: alphas_cumprod ends at 0 (the last timestep's input is pure noise), its first value
    and its monotone decrease are kept; without the flag the schedule is MONAI's."""
    from monai.networks.schedulers import DDPMScheduler

    from napari_meddiff.diffusion.samplers import noise_scheduler

    plain = {k: v for k, v in ZERO_SNR.items() if k != "zero_terminal_snr"}
    monai = DDPMScheduler(1000, schedule="scaled_linear_beta", beta_start=0.0015, beta_end=0.0195)
    np.testing.assert_array_equal(noise_scheduler(plain).alphas_cumprod, monai.alphas_cumprod)
    assert float(monai.alphas_cumprod[-1]) > 1e-4  # what the flag is for: signal left at t = T
    rescaled = noise_scheduler(ZERO_SNR).alphas_cumprod
    assert float(rescaled[-1]) == 0.0
    assert float(rescaled[0]) == pytest.approx(float(monai.alphas_cumprod[0]), rel=1e-6)
    assert bool((rescaled[1:] <= rescaled[:-1]).all())
    x0, noise = torch.ones(1, 1, 4, 4), torch.randn(1, 1, 4, 4)
    noised = noise_scheduler(ZERO_SNR).add_noise(x0, noise, torch.tensor([999]))
    torch.testing.assert_close(noised, noise)


@pytest.mark.parametrize("sampler", ["dpm++", "ddim", "ddpm"])
def test_every_sampler_steps_a_zero_terminal_snr_chain_to_a_finite_sample(sampler):
    from napari_meddiff.diffusion.samplers import make_sampler

    chain = make_sampler(sampler, ZERO_SNR, 5)
    x = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    target = torch.full_like(x, 0.5)
    for t in chain.timesteps:
        x, x0 = chain.step(target, t, x, torch.Generator().manual_seed(1))
        assert torch.isfinite(x).all() and torch.isfinite(x0).all()
    torch.testing.assert_close(x, target)  # a network that always says 0.5 gets 0.5


def test_zero_terminal_snr_with_an_epsilon_prediction_is_refused(tmp_path):
    import json

    from napari_meddiff.models import read_config
    from napari_meddiff.testing.tiny_models import make_tiny_model

    folder = make_tiny_model(tmp_path / "tiny", "ddpm", 2)
    config = json.loads((folder / "model.json").read_text())
    config["scheduler"].update(zero_terminal_snr=True, prediction_type="epsilon")
    (folder / "model.json").write_text(json.dumps(config))
    with pytest.raises(MeddiffError, match="zero_terminal_snr needs prediction_type"):
        read_config(folder)
