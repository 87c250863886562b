"""`tasks.generate`: the provenance records the autoencoder pass that ran (whole or tiled), and both give the
same image."""

from __future__ import annotations

import os

import numpy as np

import napari_meddiff as md


def test_the_autoencoder_pass_that_ran_is_recorded(tiny_models):
    (whole,) = md.generate(str(tiny_models["ldm3d"]), [4], steps=2, device="cpu")
    assert whole.metadata["provenance"]["autoencoder_pass"] == "whole"  # tiny: a whole pass fits
    from napari_meddiff.choices import AUTOENCODER_PASS_ENV

    os.environ[AUTOENCODER_PASS_ENV] = "tiled"
    try:
        (tiled,) = md.generate(str(tiny_models["ldm3d"]), [4], steps=2, device="cpu")
    finally:
        del os.environ[AUTOENCODER_PASS_ENV]
    assert tiled.metadata["provenance"]["autoencoder_pass"] == "tiled"
    np.testing.assert_allclose(tiled.array, whole.array, atol=1e-4)  # the same image to floating-point error
