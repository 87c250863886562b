"""Autoencoder passes of latent models: decode latents / encode images, whole or tiled, chosen by memory."""

from __future__ import annotations

import torch

from napari_meddiff.choices import AUTOENCODER_PASS_ENV, AUTOENCODER_PASSES, PRECISION_CHOICES, PRECISIONS  # noqa: F401
from napari_meddiff.errors import MeddiffError
from napari_meddiff.models import DiffusionModel
from napari_meddiff.runtime.devices import free_memory_bytes
from napari_meddiff.runtime.precision import autocast_context

WHOLE_PASS_SHARE = 0.5  # a whole pass runs when its estimate is within this share of the free memory


def autoencoder_pass(
    model: DiffusionModel, x: torch.Tensor, requested: str | None = None, *, encode: bool = False
) -> str:
    """``"whole"`` or ``"tiled"``: how to run the autoencoder over ``x`` (latents, or images when ``encode``).

    ``requested`` None: ``$MEDDIFF_AUTOENCODER_PASS``, else ``auto``. ``auto`` tiles when a whole pass is estimated
    (`tiling.whole_pass_bytes`) at more than `WHOLE_PASS_SHARE` of the memory free on the device (``MemAvailable``
    on CPU, free CUDA memory on a GPU)."""
    import os

    requested = requested or os.environ.get(AUTOENCODER_PASS_ENV) or "auto"
    if requested not in AUTOENCODER_PASSES:
        raise MeddiffError(f"the autoencoder pass must be one of {', '.join(AUTOENCODER_PASSES)}, not {requested!r}")
    if requested != "auto":
        return requested
    from napari_meddiff.autoencoder import tiling

    ae = model.autoencoder
    try:
        steps = tiling.encoder_steps(ae)[0] if encode else tiling.decoder_steps(ae)[0]
    except MeddiffError:  # not tileable (attention): the whole pass is the only one
        return "whole"
    need = tiling.whole_pass_bytes(steps, x.shape[0], x.shape[2:])
    return "whole" if need <= WHOLE_PASS_SHARE * free_memory_bytes(x.device) else "tiled"


def decode_latents(
    model: DiffusionModel, z: torch.Tensor, precision: str = "fp32", mode: str | None = None, tile: int | None = None
) -> torch.Tensor:
    """Scaled latents -> image through the model's autoencoder (identity for pixel models).

    ``mode``: ``whole`` (MONAI's one pass), ``tiled`` (`napari_meddiff.autoencoder.tiling`: the same result to
    floating-point error, memory set by the tiles; ``tile`` voxels per side) or ``auto`` (tiled only when a whole
    pass would not fit in memory); None: the process default (`autoencoder_pass`)."""
    if model.kind != "ldm":
        return z
    mode = autoencoder_pass(model, z, mode)
    z = z / model.scale_factor
    with torch.inference_mode(), autocast_context(z.device, precision):
        if mode == "whole":
            img = model.autoencoder.decode_stage_2_outputs(z)
        else:
            from napari_meddiff.autoencoder.tiling import tiled_decode

            img = tiled_decode(
                model.autoencoder, z, tile=tile, ram_bytes=WHOLE_PASS_SHARE * free_memory_bytes(z.device)
            )
    return img.float()


def encode_images(
    model: DiffusionModel,
    images: torch.Tensor,
    precision: str = "fp32",
    *,
    sample: bool = False,
    generator: torch.Generator | None = None,
    mode: str | None = None,
    tile: int | None = None,
) -> torch.Tensor:
    """Images (normalised) -> scaled latents (identity for pixel models): the posterior mean, or with ``sample``
    a posterior sample (as MONAI's ``encode_stage_2_inputs``) drawn with ``generator`` (required: the same seed
    gives the same latents). ``mode`` / ``tile`` as in `decode_latents`."""
    if sample and generator is None:
        raise MeddiffError("encode_images(sample=True) needs a generator (seeded draws, never the global RNG)")
    if model.kind != "ldm":
        return images
    mode = autoencoder_pass(model, images, mode, encode=True)
    ae = model.autoencoder
    with torch.inference_mode(), autocast_context(images.device, precision):
        if mode == "whole":
            z_mu, z_sigma = ae.encode(images)
        else:
            from napari_meddiff.autoencoder.tiling import tiled_encode

            budget = WHOLE_PASS_SHARE * free_memory_bytes(images.device)
            z_mu, z_sigma = tiled_encode(ae, images, tile=tile, ram_bytes=budget)
        if sample:
            eps = torch.randn(z_mu.shape, generator=generator, device=generator.device, dtype=torch.float32)
            z = z_mu + z_sigma * eps.to(z_mu.device, z_mu.dtype)
        else:
            z = z_mu
    return z.float() * model.scale_factor
