"""How much memory a training step needs, estimated from the config before any data is loaded, so that a batch
or image size that cannot fit is refused at once with its figures (`check_steps_fit`), not after the data.

Rough by design: a step keeps its activations for the backward pass, about ``UNET_TENSORS_PER_BLOCK`` (UNet) or
``AE_TENSORS_PER_BLOCK`` (autoencoder) tensors of a level's channels and grid per residual block, the attention
matrices of the attention levels, the batch itself, and the weights with their gradients, Adam moments and EMA.
Against the peak resident memory of float32 forward and backward passes of MONAI's DiffusionModelUNet and
AutoencoderKL on CPU (2D and 3D, batches 1 to 32) the estimate was within a factor of about two either way, so
it refuses what cannot fit, not what merely might not."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

from napari_meddiff.runtime.memory import check_fits

FLOAT_BYTES = 4
UNET_TENSORS_PER_BLOCK = 16  # per residual block and level, 2D; 3D kept about twice as many
AE_TENSORS_PER_BLOCK = 10
ATTENTION_COPIES = 3  # scores, their softmax, and its gradient
BYTES_PER_PARAMETER = 5 * FLOAT_BYTES  # weight, gradient, two Adam moments, EMA copy
# MONAI's defaults where a config leaves them out
UNET_DEFAULTS = {"num_res_blocks": 2, "num_head_channels": 8}
AE_DEFAULTS = {"num_res_blocks": 2}


def _per_level(value: Any, levels: int) -> list[int]:
    """A setting given once or per level, as one integer per level."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * levels
    return [int(v) for v in values] + [int(values[-1])] * (levels - len(values))


def unet_step_bytes(net: dict[str, Any], shape: Sequence[int], batch: int) -> float:
    """Activation memory of one training step of the diffusion UNet ``net`` on ``batch`` items of grid ``shape``
    (a space-to-depth UNet's levels run on a grid that many times coarser)."""
    nd, voxels = len(shape), math.prod(int(s) for s in shape)
    inner = voxels / int(net.get("space_to_depth") or 1) ** nd
    channels = [int(c) for c in net["channels"]]
    blocks = [2 * n + 1 for n in _per_level(net.get("num_res_blocks", UNET_DEFAULTS["num_res_blocks"]), len(channels))]
    heads_of = _per_level(net.get("num_head_channels", UNET_DEFAULTS["num_head_channels"]), len(channels))
    attention = list(net.get("attention_levels") or []) + [False] * len(channels)
    flash = bool(net.get("use_flash_attention", False))
    per_item = 0.0
    for level, c in enumerate(channels):
        grid = inner / 2 ** (nd * level)
        per_item += UNET_TENSORS_PER_BLOCK * (2 if nd == 3 else 1) * blocks[level] * c * grid
        if attention[level] and not flash:
            per_item += ATTENTION_COPIES * blocks[level] * max(1, c // heads_of[level]) * grid * grid
    per_item += 4 * (int(net.get("in_channels", 1)) + int(net.get("out_channels", 1))) * voxels
    return FLOAT_BYTES * batch * per_item


def autoencoder_step_bytes(
    net: dict[str, Any], shape: Sequence[int], batch: int, *, disc_channels: int = 0, disc_layers: int = 0
) -> float:
    """Activation memory of one training step of the AutoencoderKL ``net`` (and its patch discriminator, where
    ``disc_channels``) on ``batch`` volumes of grid ``shape``."""
    nd, voxels = len(shape), math.prod(int(s) for s in shape)
    channels = [int(c) for c in net["channels"]]
    blocks = [2 * n + 1 for n in _per_level(net.get("num_res_blocks", AE_DEFAULTS["num_res_blocks"]), len(channels))]
    attention = list(net.get("attention_levels") or []) + [False] * len(channels)
    per_item = 0.0
    for level, c in enumerate(channels):
        grid = voxels / 2 ** (nd * level)
        per_item += AE_TENSORS_PER_BLOCK * blocks[level] * c * grid
        if attention[level]:
            per_item += 2 * ATTENTION_COPIES * blocks[level] * grid * grid
    lowest = voxels / 2 ** (nd * (len(channels) - 1))
    for side in ("with_encoder_nonlocal_attn", "with_decoder_nonlocal_attn"):
        if net.get(side, True):
            per_item += ATTENTION_COPIES * lowest * lowest
    for layer in range(disc_layers if disc_channels else 0):  # three passes: fake (twice) and real
        per_item += 3 * 6 * disc_channels * 2**layer * voxels / 2 ** (nd * (layer + 1))
    per_item += 6 * voxels
    return FLOAT_BYTES * batch * per_item


def parameter_bytes(name: str, net: dict[str, Any]) -> float:
    """The weights of network ``name`` with their gradients, Adam moments and EMA; built on the meta device (no
    memory), which also checks the network config before any data is loaded."""
    import torch

    from napari_meddiff.models import build_network

    with torch.device("meta"):
        count = sum(p.numel() for p in build_network(name, net, "training config").parameters())
    return float(BYTES_PER_PARAMETER * count)


def largest_grid(tc: dict[str, Any], whole: Sequence[int]) -> list[int]:
    """The largest grid a stage trains on: its crops (``patch_size``) throughout, else whole items."""
    patch = tc.get("patch_size")
    if patch and tc.get("patch_steps") is None:
        return [min(int(p), int(n)) for p, n in zip(patch, whole)]
    return [int(n) for n in whole]


def training_steps(cfg: dict[str, Any], autoencoder_only: bool = False) -> list[tuple[str, str, float]]:
    """(description, config section, bytes) of each stage's training step: the autoencoder's (an ldm that trains
    it) and the diffusion UNet's (on the autoencoder's latent grid for an ldm)."""
    nets, tc = cfg["networks"], cfg["training"]
    grid = [int(s) for s in cfg["image_shape"]]
    steps = []
    if cfg["kind"] == "ldm":
        ae, atc = nets["autoencoder"], cfg["autoencoder_training"]
        if not atc.get("from_model"):
            crop, batch = largest_grid(atc, grid), int(atc["batch_size"])
            adv = float(atc.get("adv_weight") or 0) > 0
            disc = {"disc_channels": int(atc["disc_channels"]), "disc_layers": int(atc["disc_layers"])} if adv else {}
            need = autoencoder_step_bytes(ae, crop, batch, **disc) + parameter_bytes("autoencoder", ae)
            steps.append((_described("autoencoder", "autoencoder_training", batch, crop), "autoencoder_training", need))
        if autoencoder_only:
            return steps
        down = 2 ** (len(ae["channels"]) - 1)
        grid = [s // down for s in grid]
    crop, batch = largest_grid(tc, grid), int(tc["batch_size"])
    need = unet_step_bytes(nets["unet"], crop, batch) + parameter_bytes("unet", nets["unet"])
    steps.append((_described("diffusion UNet", "training", batch, crop), "training", need))
    return steps


def _described(network: str, section: str, batch: int, grid: Sequence[int]) -> str:
    return f"a training step of the {network} ({section}.batch_size {batch} of {'x'.join(map(str, grid))} items)"


def free_device_bytes(device: Any) -> int | None:
    """Free memory of a CUDA device; None for the CPU (then `check_fits` reads the free RAM)."""
    if getattr(device, "type", "cpu") != "cuda":
        return None
    import torch

    try:
        return int(torch.cuda.mem_get_info(device)[0])
    except (RuntimeError, AssertionError):  # not initialised here: do not refuse on a guess
        return None


def check_steps_fit(cfg: dict[str, Any], device: Any, autoencoder_only: bool = False) -> None:
    """Refuse, before any data is loaded, a config whose training step would not fit in the device's free
    memory (on a CPU, times the processes torchrun starts on this machine)."""
    free = free_device_bytes(device)
    processes = 1 if free is not None else max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    for what, section, need in training_steps(cfg, autoencoder_only):
        if processes > 1:
            what += f" in each of {processes} processes"
        check_fits(
            need * processes,
            what,
            available=free,
            advice=f"lower {section}.batch_size, or train on crops ({section}.patch_size)",
        )
