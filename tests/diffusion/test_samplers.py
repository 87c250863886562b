"""Sampler settings (`diffusion.samplers`): DDIM's eta outside [0, 1] is refused in the Python API."""

from __future__ import annotations

import numpy as np
import pytest

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
