"""Memory checked before any work (`tasks.footprint`): requests that would exhaust the machine are refused up
front, with the figures; guidance counts the UNet batch twice."""

from __future__ import annotations

import numpy as np
import pytest

import napari_meddiff as md
from napari_meddiff.errors import MeddiffError


def test_requests_that_would_exhaust_memory_are_refused_up_front(tiny_models, tmp_path):
    with pytest.raises(MeddiffError, match=r"would need about [\d.]+ GiB"):
        md.generate(str(tiny_models["ldm3d"]), range(10**5), batch_size=10**5, steps=1, device="cpu")
    with pytest.raises(MeddiffError, match=r"10000000 volumes"):
        md.generate(str(tiny_models["ldm3d"]), range(10**7), steps=1, device="cpu")
    image = md.Volume(np.random.default_rng(0).random((16, 16, 16), dtype=np.float32), np.diag([4, 4, 4, 1.0]))
    with pytest.raises(MeddiffError, match="ensemble of 100000000 members"):
        md.segment(str(tiny_models["seg2d"]), image, ensemble=10**8, steps=1, device="cpu")
    mask = image.with_array((np.indices(image.shape).sum(0) < 8).astype(np.uint8))
    with pytest.raises(MeddiffError, match="candidates"):
        md.inpaint(str(tiny_models["ldm3d"]), image, mask, candidates=10**8, steps=1, device="cpu")


def test_guidance_counts_twice_the_unet_batch(tiny_models, monkeypatch):
    """Classifier-free guidance runs both branches as one batch: the up-front estimate counts them."""
    from napari_meddiff.runtime import memory
    from napari_meddiff.tasks import footprint

    model = md.load_model(tiny_models["ldm3d"])
    plain = 64 * footprint.network_bytes_per_sample(model)
    guided = plain + 64 * footprint.unet_bytes_per_sample(model)
    monkeypatch.setattr(memory, "available_ram_bytes", lambda: int((plain + guided) / 2 / 0.9))
    footprint.check_request_fits(model, batch=64)
    with pytest.raises(MeddiffError, match="would need"):
        footprint.check_request_fits(model, batch=64, guided=True)


def test_a_label_map_is_checked_on_the_grid_it_is_sampled_on(tmp_path, monkeypatch):
    """Generating from a label map counts its own grid (larger than the model's when the map needs it) and a
    ControlNet, and refuses before sampling what would not fit."""
    from napari_meddiff.runtime import memory
    from napari_meddiff.tasks import footprint
    from napari_meddiff.tasks.from_labels import generate_from_labels
    from napari_meddiff.testing.tiny_models import make_tiny_model
    from tests.tasks.test_from_labels import LABELS, tissue_map

    plain = md.load_model(make_tiny_model(tmp_path / "plain", "ddpm", 3, label_map=LABELS), device="cpu")
    control = md.load_model(make_tiny_model(tmp_path / "cn", "ddpm", 3, label_map=LABELS, controlnet=True))
    double = [2 * s for s in plain.image_shape]
    assert footprint.unet_bytes_per_sample(plain, double) == 8 * footprint.unet_bytes_per_sample(plain)
    assert footprint.unet_bytes_per_sample(control) > footprint.unet_bytes_per_sample(plain)
    monkeypatch.setattr(memory, "available_ram_bytes", lambda: 200_000)
    with pytest.raises(MeddiffError, match=r"scan\(s\) from a 21x26x13 label map .* would need"):
        generate_from_labels(plain, tissue_map(), [0], steps=1, device="cpu")
