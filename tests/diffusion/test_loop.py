"""The one denoising loop: every sampler samples real (tiny, random) MONAI models, deterministically."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_meddiff import Cancelled, MeddiffError, generate, load_model
from napari_meddiff.choices import samplers_for
from napari_meddiff.diffusion.loop import denoise
from napari_meddiff.diffusion.samplers import make_sampler
from napari_meddiff.diffusion.seeds import initial_noise, seeded_generators

SAMPLERS = samplers_for({})  # those of the tiny models' DDPM schedule (rflow: test_rflow.py)


@pytest.mark.parametrize("kind", ["ldm3d", "ddpm3d", "ddpm2d"])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_samples_every_kind(tiny_models, kind, sampler):
    model = load_model(tiny_models[kind])
    vols = generate(model, [3], sampler=sampler, steps=4)
    (vol,) = vols
    expected = model.image_shape if model.spatial_dims == 3 else (*model.image_shape, 1)
    assert vol.shape == expected
    assert np.isfinite(vol.array).all() and vol.array.min() >= 0 and vol.array.max() <= 1
    assert vol.spacing[: model.spatial_dims] == pytest.approx(model.voxel_size)
    assert vol.metadata["provenance"]["seed"] == 3
    assert vol.array.std() > 0


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_same_seed_same_volume_and_batch_invariance(tiny_models, sampler):
    model = load_model(tiny_models["ddpm3d"])
    a = generate(model, [7, 8], sampler=sampler, steps=3, batch_size=2)
    b = generate(model, [8], sampler=sampler, steps=3)
    c = generate(model, [7], sampler=sampler, steps=3)
    np.testing.assert_allclose(a[1].array, b[0].array, atol=1e-5)
    np.testing.assert_array_equal(a[0].array, generate(model, [7, 8], sampler=sampler, steps=3, batch_size=2)[0].array)
    np.testing.assert_array_equal(c[0].array, generate(model, [7], sampler=sampler, steps=3)[0].array)
    assert not np.array_equal(a[0].array, a[1].array)


def test_ddpm_full_chain_uses_monai_ddpm(tiny_models):
    model = load_model(tiny_models["ddpm2d"])
    sampler = make_sampler("ddpm", model.config["scheduler"], 1000)
    assert type(sampler.scheduler).__name__ == "DDPMScheduler"
    assert len(sampler.timesteps) == 1000
    strided = make_sampler("ddpm", model.config["scheduler"], 10)
    assert strided.timesteps.tolist() == list(range(900, -1, -100))


def test_dpm_solver_matches_ddim_on_first_order_and_converges():
    """On a toy Gaussian 'model' whose exact denoiser is known, DPM-Solver++ at 20 steps lands where 200 DDIM
    steps do."""
    schedule = {"num_train_timesteps": 1000, "schedule": "scaled_linear_beta", "beta_start": 0.0015, "beta_end": 0.0195}
    mu = 0.3

    def run(name, steps):
        smp = make_sampler(name, schedule, steps)
        ac = smp.scheduler.alphas_cumprod
        x = torch.randn((1, 1, 8, 8), generator=torch.Generator().manual_seed(0))
        for t in smp.timesteps:
            a = ac[int(t)]
            eps = (x - a.sqrt() * mu) / (1 - a).sqrt()  # exact noise when x0 = mu
            x, _ = smp.step(eps, int(t), x)
        return x

    ref = run("ddim", 200)
    assert torch.allclose(run("dpm++", 20), ref, atol=2e-3)
    assert torch.allclose(ref, torch.full_like(ref, mu), atol=2e-2)


def test_cancel_stops_within_one_step(tiny_models):
    model = load_model(tiny_models["ddpm2d"])
    calls = []

    def should_cancel():
        calls.append(1)
        return len(calls) > 2

    gens = seeded_generators([0], model.device)
    x = initial_noise(model.sample_shape, gens, model.device)
    with pytest.raises(Cancelled):
        denoise(model, x, sampler="ddim", steps=10, generators=gens, should_cancel=should_cancel)
    assert len(calls) == 3


def test_progress_callback_and_bf16(tiny_models):
    model = load_model(tiny_models["ldm3d"])
    seen = []
    previews = []
    generate(
        model,
        [0],
        sampler="dpm++",
        steps=4,
        on_step=lambda i: seen.append((i.index, i.total)),
        on_preview=previews.append,
        preview_every=2,
    )
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert len(previews) == 1 and previews[0].images.shape == (1, *model.image_shape)
    bf16 = generate(model, [0], sampler="ddim", steps=3, precision="bf16")[0]
    fp32 = generate(model, [0], sampler="ddim", steps=3, precision="fp32")[0]
    assert np.abs(bf16.array - fp32.array).mean() < 0.05


def test_bad_sampler_and_steps(tiny_models):
    model = load_model(tiny_models["ddpm2d"])
    with pytest.raises(MeddiffError, match="unknown sampler"):
        generate(model, [0], sampler="euler", steps=3)
    with pytest.raises(MeddiffError, match="positive"):
        generate(model, [0], sampler="ddim", steps=0)
    with pytest.raises(MeddiffError, match="segmentation"):
        generate(load_model(tiny_models["seg2d"]), [0])


def test_release_unet_after_the_last_batch_gives_the_same_volumes(tiny_models):
    """What `meddiff generate` does: the UNet goes before the last batch's decoding, the volumes stay the same."""
    kept = generate(load_model(tiny_models["ldm3d"]), [3, 4, 5], steps=3, batch_size=2)
    model = load_model(tiny_models["ldm3d"])
    released = generate(model, [3, 4, 5], steps=3, batch_size=2, release_unet=True)
    assert model.unet is None and model.autoencoder is not None
    for a, b in zip(kept, released):
        np.testing.assert_array_equal(a.array, b.array)
    with pytest.raises(MeddiffError, match="released"):
        generate(model, [3], steps=3)


def test_released_unet_is_freed_without_a_garbage_collection(tiny_models, monkeypatch):
    """The kernel choices' `forward` overrides are reference cycles; releasing the UNet drops them, so its memory
    goes back at once rather than at a full collection (0.19 s of every `meddiff generate`)."""
    import gc
    import weakref

    model = load_model(tiny_models["ldm3d"])
    overridden = [m for m in model.unet.modules() if "forward" in m.__dict__]
    assert overridden, "the loaded UNet has no kernel choices: this test checks nothing"
    collections = []
    monkeypatch.setattr(gc, "collect", lambda *a: collections.append(a) or 0)
    unet = weakref.ref(model.unet)
    gc.disable()
    try:
        model.release_unet()
        assert unet() is None and model.unet is None
    finally:
        gc.enable()
    assert collections == []
