"""Networks a model config can name that MONAI builds from parts: its diffusion UNet (and the ControlNet that
feeds it) on a coarser grid."""

from __future__ import annotations

import torch
from monai.networks.nets import ControlNet, DiffusionModelUNet
from monai.networks.utils import pixelshuffle, pixelunshuffle


class SpaceToDepthUNet(DiffusionModelUNet):
    """MONAI's `DiffusionModelUNet` run on a grid ``space_to_depth`` (r) times coarser: each r^d block of voxels
    becomes r^d channels on the way in (MONAI's ``pixelunshuffle``) and the output is shuffled back
    (``pixelshuffle``), as in Shi et al. 2016 and Hoogeboom et al.'s "simple diffusion". Nothing is lost (the
    rearrangement is exact) and a 3D network sees 1/r^3 of the voxels with r^3 times the channels: wide
    convolutions the CPU runs near its peak instead of narrow ones it does not. ``in_channels`` and
    ``out_channels`` are the image's; input sides must be divisible by r * 2^(levels - 1)."""

    def __init__(self, *, space_to_depth: int, spatial_dims: int, in_channels: int, out_channels: int, **kwargs):
        r = int(space_to_depth)
        if r < 1:
            raise ValueError(f"space_to_depth must be a positive integer, not {space_to_depth!r}")
        blocks = r**spatial_dims
        super().__init__(
            spatial_dims=spatial_dims, in_channels=in_channels * blocks, out_channels=out_channels * blocks, **kwargs
        )
        self.space_to_depth = r
        self.dims = spatial_dims

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        r = self.space_to_depth
        if any(s % r for s in x.shape[2:]):
            raise ValueError(f"input sides {tuple(x.shape[2:])} are not divisible by space_to_depth {r}")
        out = super().forward(pixelunshuffle(x, self.dims, r), timesteps, *args, **kwargs)
        return pixelshuffle(out, self.dims, r)


class SpaceToDepthControlNet(ControlNet):
    """MONAI's `ControlNet` for a `SpaceToDepthUNet`: it takes the same image-grid input, rearranged the same
    way (``in_channels`` is the image's), so that its residuals lie on the UNet's coarse grid. Its conditioning
    image stays at image resolution: ``conditioning_embedding_num_channels`` of log2(r) + 1 levels bring it down
    by r."""

    def __init__(self, *, space_to_depth: int, spatial_dims: int, in_channels: int, **kwargs):
        r = int(space_to_depth)
        if r < 1:
            raise ValueError(f"space_to_depth must be a positive integer, not {space_to_depth!r}")
        super().__init__(spatial_dims=spatial_dims, in_channels=in_channels * r**spatial_dims, **kwargs)
        self.space_to_depth = r
        self.dims = spatial_dims

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, *args, **kwargs
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        r = self.space_to_depth
        if any(s % r for s in x.shape[2:]):
            raise ValueError(f"input sides {tuple(x.shape[2:])} are not divisible by space_to_depth {r}")
        return super().forward(pixelunshuffle(x, self.dims, r), timesteps, *args, **kwargs)
