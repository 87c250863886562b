"""The space-to-depth UNet: MONAI's diffusion UNet on a grid twice coarser, the image's resolution kept exactly."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import DiffusionModelUNet
from monai.networks.utils import pixelshuffle, pixelunshuffle

from napari_meddiff.models import build_network
from napari_meddiff.training.footprint import unet_step_bytes

CONFIG = {
    "spatial_dims": 3,
    "in_channels": 3,
    "out_channels": 1,
    "channels": [8, 16],
    "attention_levels": [False, False],
    "num_res_blocks": 1,
    "num_head_channels": 8,
    "norm_num_groups": 8,
}


def test_it_is_monais_unet_between_an_exact_unshuffle_and_shuffle():
    torch.manual_seed(0)
    net = build_network("unet", {**CONFIG, "space_to_depth": 2}).eval()
    plain = DiffusionModelUNet(**{**CONFIG, "in_channels": 24, "out_channels": 8}).eval()
    with torch.no_grad():  # MONAI zeroes the last convolution: give it weights
        for p in net.out.parameters():
            p.normal_(0.0, 0.1)
    plain.load_state_dict(net.state_dict())  # the same parameters under the same names
    x, t = torch.randn(2, 3, 8, 12, 16), torch.tensor([5, 700])
    with torch.no_grad():
        out = net(x, t)
        ref = pixelshuffle(plain(pixelunshuffle(x, 3, 2), t), 3, 2)
    assert out.shape == (2, 1, 8, 12, 16) and out.abs().max() > 0
    torch.testing.assert_close(out, ref)


def test_an_odd_side_is_refused_and_memory_is_estimated_on_the_coarse_grid():
    net = build_network("unet", {**CONFIG, "space_to_depth": 2})
    with pytest.raises(ValueError, match="not divisible by space_to_depth 2"):
        net(torch.randn(1, 3, 8, 9, 8), torch.tensor([1]))
    full = unet_step_bytes(CONFIG, [64, 64, 64], 1)
    coarse = unet_step_bytes({**CONFIG, "space_to_depth": 2}, [64, 64, 64], 1)
    assert coarse < full / 4
