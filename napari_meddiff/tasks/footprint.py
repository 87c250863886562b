"""How much memory a request needs (networks, batches, decoding), checked before any work starts."""

from __future__ import annotations

import math
from collections.abc import Sequence

from napari_meddiff.errors import MeddiffError
from napari_meddiff.runtime.memory import check_fits


def network_bytes_per_sample(model, image_shape: Sequence[int] | None = None) -> float:
    """Working memory of one sample through the model's networks (inference, fp32), a deliberately high estimate.

    UNet: the full-resolution feature maps (first level's channels over the sample grid) times 16 tensors alive
    at once (block inputs, skips, GroupNorm/SiLU temporaries), half as much again for a ControlNet (its encoder);
    decoding: `decode_bytes_per_sample`. ``image_shape``: the grid sampled when it is not the model's own (a
    label map's grid).
    """
    return unet_bytes_per_sample(model, image_shape) + decode_bytes_per_sample(model, image_shape)


def unet_bytes_per_sample(model, image_shape: Sequence[int] | None = None) -> float:
    """One sample through the UNet (and ControlNet): see `network_bytes_per_sample`."""
    unet_cfg = model.config.get("networks", {}).get("unet", {})
    channels = unet_cfg.get("channels") or unet_cfg.get("num_channels") or [64]  # MONAI / MAISI's name
    spatial = math.prod(int(s) for s in model.sample_shape[1:])
    if image_shape is not None:
        spatial *= math.prod(int(s) for s in image_shape) / math.prod(int(s) for s in model.image_shape)
    with_controlnet = 1.5 if model.config.get("networks", {}).get("controlnet") else 1.0
    return float(16 * 4 * int(channels[0]) * spatial * with_controlnet)


def decode_bytes_per_sample(model, image_shape: Sequence[int] | None = None) -> float:
    """Decoding one sample: 450 bytes per output voxel for a whole pass; an autoencoder that can be tiled
    (`napari_meddiff.autoencoder.tiling`) runs in bounded memory, so only its output image (and a copy) counts."""
    if model.autoencoder is None:
        return 0.0
    voxels = math.prod(int(s) for s in (image_shape or model.image_shape))
    from napari_meddiff.autoencoder.tiling import decoder_steps

    try:
        decoder_steps(model.autoencoder)
    except MeddiffError:  # attention blocks: whole pass only
        return 450.0 * voxels
    return 8.0 * voxels


def check_request_fits(
    model,
    *,
    batch: int,
    held_voxels: float = 0.0,
    what: str = "this request",
    guided: bool = False,
    image_shape: Sequence[int] | None = None,
) -> None:
    """Refuse a request whose batch (through the networks) plus ``held_voxels`` float32 results (kept until the
    end: candidates, ensemble members, returned volumes) would not fit in free memory. ``guided``:
    classifier-free guidance runs the conditional and unconditional branches as one batch of twice the size.
    ``image_shape``: the grid sampled, when not the model's own."""
    unet = unet_bytes_per_sample(model, image_shape)
    need = batch * (network_bytes_per_sample(model, image_shape) + (unet if guided else 0.0)) + 4.0 * held_voxels
    check_fits(need, what)
