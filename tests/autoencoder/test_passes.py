"""Whole or tiled (`autoencoder.passes`): the whole pass while it fits in memory, the tiled one (equal to
floating-point error) when memory is short."""

from __future__ import annotations

import numpy as np
import torch

from napari_meddiff import load_model
from napari_meddiff.autoencoder.passes import autoencoder_pass, decode_latents


def test_tiled_decoding_only_when_memory_is_short(tiny_models, monkeypatch):
    model = load_model(tiny_models["ldm3d"])
    z = torch.randn((1, *model.sample_shape), generator=torch.Generator().manual_seed(1))
    assert autoencoder_pass(model, z) == "whole"  # a tiny latent fits
    whole = decode_latents(model, z)
    np.testing.assert_array_equal(whole.numpy(), decode_latents(model, z, mode="whole").numpy())
    monkeypatch.setattr("napari_meddiff.autoencoder.passes.free_memory_bytes", lambda device: 10**6)
    assert autoencoder_pass(model, z) == "tiled"
    tiled = decode_latents(model, z)  # auto: tiled, part of it in files (the budget is 0.5 MB)
    assert tiled.shape == whole.shape
    torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-4)
