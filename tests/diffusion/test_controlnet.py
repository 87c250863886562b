"""ControlNet residuals in the one loop, on real (tiny, random) MONAI networks: a ControlNet whose output
convolutions are zero, as MONAI initialises them, leaves the UNet's chain bit for bit; one with non-zero outputs
changes it; conditioning scale 0 is no ControlNet; classifier-free guidance gives both branches the control."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from napari_meddiff import MeddiffError, load_model
from napari_meddiff.choices import samplers_for
from napari_meddiff.diffusion.loop import denoise
from napari_meddiff.diffusion.seeds import initial_noise, seeded_generators
from napari_meddiff.models import DiffusionModel, build_network
from napari_meddiff.testing.tiny_models import tiny_controlnet_config, unzero_controlnet
from tests.helpers import conditional_model

CPU = torch.device("cpu")
SEEDS = (0, 1)


def with_controlnet(model: DiffusionModel, *, zero: bool, seed: int = 0) -> DiffusionModel:
    """``model`` carrying a ControlNet for its UNet that takes a 3-channel conditioning image."""
    torch.manual_seed(seed)
    net = build_network("controlnet", tiny_controlnet_config(model.config["networks"]["unet"], 3)).eval()
    return dataclasses.replace(model, controlnet=net if zero else unzero_controlnet(net))


def control_image(model: DiffusionModel, seed: int = 0) -> torch.Tensor:
    """A one-hot map of 3 random labels per sample, at image resolution."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (len(SEEDS), *model.image_shape), generator=g)
    return F.one_hot(labels, 3).movedim(-1, 1).float()


def sample(model: DiffusionModel, sampler: str = "ddim", steps: int = 3, **hooks) -> torch.Tensor:
    gens = seeded_generators(SEEDS, CPU)
    x = initial_noise(model.sample_shape, gens, CPU)
    return denoise(model, x, sampler=sampler, steps=steps, generators=gens, **hooks)


@pytest.fixture(scope="module")
def plain(tiny_models) -> DiffusionModel:
    """The tiny 2D DDPM, its UNet's zero-initialised output convolution given weights (so that it predicts)."""
    model = load_model(tiny_models["ddpm2d"])
    with torch.no_grad():
        for p in model.unet.out.parameters():
            p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(0))
    return model


@pytest.mark.parametrize("sampler", samplers_for({}))
def test_a_zero_controlnet_gives_the_plain_unets_chain_bit_for_bit(plain, sampler):
    zero = with_controlnet(plain, zero=True)
    expected = sample(plain, sampler)
    got = sample(zero, sampler, controlnet_cond=control_image(plain))
    assert torch.equal(got, expected)


def test_a_controlnet_with_outputs_changes_the_chain_and_scale_0_is_none(plain):
    trained = with_controlnet(plain, zero=False)
    cond = control_image(plain)
    expected = sample(plain)
    got = sample(trained, controlnet_cond=cond)
    assert (got - expected).abs().max() > 1e-3
    assert torch.equal(sample(trained, controlnet_cond=cond, controlnet_scale=0.0), expected)
    assert (sample(trained, controlnet_cond=cond, controlnet_scale=2.0) - got).abs().max() > 1e-3
    assert (sample(trained, controlnet_cond=control_image(plain, seed=1)) - got).abs().max() > 1e-3  # the image counts


@pytest.fixture(scope="module")
def guided_model(tmp_path_factory) -> DiffusionModel:
    """A conditional model (concatenated channels and cross-attention context, a null condition)."""
    return load_model(conditional_model(tmp_path_factory.mktemp("cfg") / "tiny-cond-2d"))


def test_guidance_with_a_controlnet(guided_model):
    """Both guidance branches get the ControlNet: a zero one changes nothing, and with one step of DDIM (affine in
    the UNet's output) the guided chain is uncond + s * (cond - uncond) of the two unguided ones."""
    values = torch.tensor([[0.2, 0.5], [0.9, -0.5]])
    null = torch.tensor(guided_model.conditioning.null).expand(2, 2)
    cond = control_image(guided_model)
    zero = with_controlnet(guided_model, zero=True)
    plain_guided = sample(guided_model, condition_values=values, guidance_scale=3.0)
    assert torch.equal(sample(zero, condition_values=values, guidance_scale=3.0, controlnet_cond=cond), plain_guided)
    trained = with_controlnet(guided_model, zero=False)
    one = {"steps": 1, "controlnet_cond": cond}
    guided = sample(trained, condition_values=values, guidance_scale=3.0, **one)
    c, u = sample(trained, condition_values=values, **one), sample(trained, condition_values=null, **one)
    torch.testing.assert_close(guided, u + 3.0 * (c - u), rtol=0, atol=1e-4)
    assert (guided - sample(guided_model, condition_values=values, guidance_scale=3.0, steps=1)).abs().max() > 1e-3


def test_controlnet_inputs_are_checked(plain):
    trained = with_controlnet(plain, zero=False)
    cond = control_image(plain)
    with pytest.raises(MeddiffError, match="has no ControlNet"):
        sample(plain, controlnet_cond=cond)
    with pytest.raises(MeddiffError, match="give it its conditioning image"):
        sample(trained)
    with pytest.raises(MeddiffError, match="conditioning scale must be a number"):
        sample(trained, controlnet_cond=cond, controlnet_scale=float("nan"))
    with pytest.raises(MeddiffError, match="for 2 samples"):
        sample(trained, controlnet_cond=cond[:1])
