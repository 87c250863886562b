"""The GPU path (run where CUDA is present; skipped elsewhere, CI included): the shipped default model samples
on CUDA, reproducibly, in every precision, and computes what the CPU computes.

Noise is drawn on the CPU for every device (`generate`'s seeded generators), so a seed gives the same volume on
CUDA as on the CPU up to floating-point error; the chains agree from the same starting noise.
Run on a lent GPU with `benchmarks/run_cuda.sh`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_meddiff import generate, load_model
from napari_meddiff.autoencoder.passes import decode_latents
from napari_meddiff.diffusion.loop import denoise
from napari_meddiff.diffusion.seeds import initial_noise, seeded_generators
from napari_meddiff.runtime.precision import resolve_precision

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def ldm():
    return load_model("brain-ldm-3d", device="cuda")


@pytest.fixture
def no_tf32(monkeypatch):
    """Strict fp32 on CUDA (cuDNN convolutions default to TF32 tensor cores)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


def _chain(model, noise: torch.Tensor, steps: int = 10, precision: str = "fp32") -> torch.Tensor:
    """DPM-Solver++ (deterministic) from ``noise`` on the model's device, decoded to images."""
    gens = seeded_generators(range(noise.shape[0]), model.device)
    z = denoise(model, noise.to(model.device), steps=steps, generators=gens, precision=precision)
    return decode_latents(model, z, precision).float().cpu()


def test_auto_device_and_precision_pick_the_gpu(ldm):
    (vol,) = generate(ldm, [3], steps=5, device="auto", precision="auto")
    prov = vol.metadata["provenance"]
    assert prov["device"].startswith("cuda")
    assert prov["precision"] == resolve_precision("auto", torch.device("cuda"))


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_same_seed_same_volume_on_cuda(ldm, precision):
    a, b = (generate(ldm, [11], steps=10, device="cuda", precision=precision)[0].array for _ in range(2))
    np.testing.assert_array_equal(a, b)
    assert np.isfinite(a).all() and 0 <= a.min() and a.max() <= 1


def test_cuda_chain_computes_what_the_cpu_computes(ldm, no_tf32):
    noise = initial_noise(ldm.sample_shape, seeded_generators([5], torch.device("cpu")), torch.device("cpu"))
    on_cuda = _chain(ldm, noise)
    on_cpu = _chain(load_model("brain-ldm-3d"), noise)
    assert (on_cuda - on_cpu).abs().mean() < 1e-3


def test_a_seed_gives_the_cpu_volume_on_cuda(ldm, no_tf32):
    on_cuda = generate(ldm, [9], steps=10, device="cuda", precision="fp32")[0].array
    on_cpu = generate("brain-ldm-3d", [9], steps=10, device="cpu", precision="fp32")[0].array
    assert np.abs(on_cuda - on_cpu).mean() < 1e-3


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_stays_close_to_fp32_on_cuda(ldm, precision):
    noise = initial_noise(ldm.sample_shape, seeded_generators([6], torch.device("cpu")), torch.device("cpu"))
    full, low = _chain(ldm, noise), _chain(ldm, noise, precision=precision)
    assert torch.isfinite(low).all()
    assert (low - full).abs().mean() < 0.01  # bf16 on the CPU: 0.0011


def test_batch_of_two_equals_one_at_a_time_on_cuda(ldm):
    one = [generate(ldm, [s], steps=8, device="cuda")[0].array for s in (21, 22)]
    two = [v.array for v in generate(ldm, [21, 22], steps=8, device="cuda", batch_size=2)]
    for a, b in zip(one, two):
        np.testing.assert_allclose(a, b, atol=2e-3)


def test_tiled_decoding_on_cuda(ldm, no_tf32):
    gens = seeded_generators([7], ldm.device)
    z = denoise(ldm, initial_noise(ldm.sample_shape, gens, ldm.device), steps=10, generators=gens)
    whole = decode_latents(ldm, z, mode="whole")
    tiled = decode_latents(ldm, z, mode="tiled", tile=16)
    assert whole.device.type == "cuda" and whole.shape == tiled.shape == (1, 1, *ldm.image_shape)
    assert (whole - tiled).abs().max() < 1e-4  # exact tiling: whole-volume GroupNorm statistics
    on_cpu = decode_latents(load_model("brain-ldm-3d"), z.cpu(), mode="whole")
    assert (whole.cpu() - on_cpu).abs().mean() < 1e-4
