"""How much memory a request needs (networks, batches, decoding), checked before any work starts."""

from __future__ import annotations

from napari_meddiff.errors import MeddiffError
from napari_meddiff.runtime.memory import check_fits


def network_bytes_per_sample(model) -> float:
    """Working memory of one sample through the model's networks (inference, fp32), a deliberately high estimate.

    UNet: the full-resolution feature maps (first level's channels over the sample grid) times 16 tensors alive
    at once (block inputs, skips, GroupNorm/SiLU temporaries); decoding: `decode_bytes_per_sample`.
    """
    return unet_bytes_per_sample(model) + decode_bytes_per_sample(model)


def unet_bytes_per_sample(model) -> float:
    """One sample through the UNet: see `network_bytes_per_sample`."""
    import math

    unet_cfg = model.config.get("networks", {}).get("unet", {})
    channels = unet_cfg.get("channels") or [64]
    spatial = math.prod(int(s) for s in model.sample_shape[1:])
    return float(16 * 4 * int(channels[0]) * spatial)


def decode_bytes_per_sample(model) -> float:
    """Decoding one sample: 450 bytes per output voxel for a whole pass; an autoencoder that can be tiled
    (`napari_meddiff.autoencoder.tiling`) runs in bounded memory, so only its output image (and a copy) counts."""
    import math

    if model.autoencoder is None:
        return 0.0
    voxels = math.prod(int(s) for s in model.image_shape)
    from napari_meddiff.autoencoder.tiling import decoder_steps

    try:
        decoder_steps(model.autoencoder)
    except MeddiffError:  # attention blocks: whole pass only
        return 450.0 * voxels
    return 8.0 * voxels


def check_request_fits(
    model, *, batch: int, held_voxels: float = 0.0, what: str = "this request", guided: bool = False
) -> None:
    """Refuse a request whose batch (through the networks) plus ``held_voxels`` float32 results (kept until the
    end: candidates, ensemble members, returned volumes) would not fit in free memory. ``guided``:
    classifier-free guidance runs the conditional and unconditional branches as one batch of twice the size."""
    need = (
        batch * (network_bytes_per_sample(model) + (unet_bytes_per_sample(model) if guided else 0.0))
        + 4.0 * held_voxels
    )
    check_fits(need, what)
