"""Conditioning in the one denoising loop: concatenated channels, cross-attention context, class labels,
classifier-free guidance (`diffusion.conditioning`, `diffusion.loop`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_meddiff import MeddiffError
from napari_meddiff.diffusion.loop import denoise
from napari_meddiff.diffusion.seeds import initial_noise, seeded_generators
from napari_meddiff.models import load_model
from napari_meddiff.tasks.generate import generate
from tests.helpers import conditional_model


def _chain(model, seeds, values, scale=1.0):
    gens = seeded_generators(seeds)
    x = initial_noise(model.sample_shape, gens, torch.device("cpu"))
    cond = None if values is None else torch.tensor(values, dtype=torch.float32)
    return denoise(model, x, sampler="ddim", steps=4, generators=gens, condition_values=cond, guidance_scale=scale)


def test_guidance_zero_is_the_null_condition_and_one_the_conditional(cond_model):
    cond, null = [[0.9, 0.5]], [[-1.0, -1.0]]
    plain = _chain(cond_model, [3], cond)
    assert torch.allclose(_chain(cond_model, [3], cond, scale=1.0), plain)
    assert torch.allclose(_chain(cond_model, [3], cond, scale=0.0), _chain(cond_model, [3], null), atol=1e-5)
    guided = _chain(cond_model, [3], cond, scale=4.0)
    assert (guided - plain).abs().max() > 1e-3
    # guided batches keep each seed's chain: seed 3 in a batch of two equals seed 3 alone
    pair = _chain(cond_model, [3, 4], cond * 2, scale=4.0)
    assert torch.allclose(pair[:1], guided, atol=1e-5)


def test_defaults_used_when_no_conditions_given(cond_model):
    assert torch.equal(_chain(cond_model, [1], None), _chain(cond_model, [1], [[0.5, 0.0]]))


def test_generate_records_conditions_and_guidance(cond_model):
    (a,) = generate(cond_model, [2], conditions={"age": 0.1}, guidance_scale=2.0, device="cpu")
    (b,) = generate(cond_model, [2], conditions={"age": 0.9}, guidance_scale=2.0, device="cpu")
    prov = a.metadata["provenance"]
    assert prov["conditions"] == {"age": 0.1, "lesion_load": 0.0} and prov["guidance_scale"] == 2.0
    assert np.abs(a.array - b.array).max() > 1e-3
    vols = generate(cond_model, [5, 6], conditions=[{"age": 0.2}, {"age": 0.8}], batch_size=2, device="cpu")
    assert [v.metadata["provenance"]["conditions"]["age"] for v in vols] == [0.2, 0.8]
    with pytest.raises(MeddiffError, match="2 sets of conditions for 3 seeds"):
        generate(cond_model, [1, 2, 3], conditions=[{}, {}], device="cpu")


def test_class_label_conditioning(tmp_path):
    model = load_model(conditional_model(tmp_path / "tiny-class", concat=False, context=False, class_labels=True))
    (a,) = generate(model, [0], conditions={"grade": 0}, device="cpu")
    (b,) = generate(model, [0], conditions={"grade": 2}, device="cpu")
    assert np.abs(a.array - b.array).max() > 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("sampler, eta", [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0)])
def test_cpu_and_cuda_give_the_same_sample(cond_model, sampler, eta):
    kw = dict(sampler=sampler, steps=10, eta=eta, precision="fp32", conditions={"age": 0.3})
    (cpu,) = generate(cond_model, [9], device="cpu", **kw)
    (gpu,) = generate(cond_model, [9], device="cuda", **kw)
    cond_model.to("cpu")
    np.testing.assert_allclose(gpu.array, cpu.array, atol=2e-3)
