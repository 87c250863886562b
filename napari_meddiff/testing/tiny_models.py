"""Small randomly initialised model folders, for tests and examples (they sample noise-like images)."""

from __future__ import annotations

from pathlib import Path

import torch

from napari_meddiff.models import build_network, save_model_folder

TINY_SCHEDULE = {
    "num_train_timesteps": 1000,
    "schedule": "scaled_linear_beta",
    "beta_start": 0.0015,
    "beta_end": 0.0195,
    "prediction_type": "epsilon",
    "clip_sample": False,
}


def tiny_unet_config(spatial_dims: int, in_channels: int, out_channels: int) -> dict:
    return {
        "spatial_dims": spatial_dims,
        "in_channels": in_channels,
        "out_channels": out_channels,
        "channels": [8, 16],
        "attention_levels": [False, False],
        "num_res_blocks": 1,
        "num_head_channels": 8,
        "norm_num_groups": 8,
    }


TINY_RFLOW_SCHEDULE = {  # MONAI's RFlowScheduler as MAISI's rectified-flow configs set it: continuous time
    "type": "rflow",
    "num_train_timesteps": 1000,
    "use_discrete_timesteps": False,
    "sample_method": "uniform",
    "use_timestep_transform": True,
    "base_img_size_numel": 8 * 8 * 8,
    "spatial_dim": 3,
}


def tiny_controlnet_config(unet: dict, cond_channels: int) -> dict:
    """A MONAI ControlNet that feeds ``unet`` (its levels, input and conditioning), taking a conditioning image
    of ``cond_channels`` at image resolution (its embedding brings it down by the UNet's space-to-depth factor)."""
    levels = int(unet.get("space_to_depth") or 1).bit_length()
    return {
        **{k: v for k, v in unet.items() if k != "out_channels"},
        "conditioning_embedding_in_channels": cond_channels,
        "conditioning_embedding_num_channels": [8] * levels,
    }


def tiny_autoencoder_config(spatial_dims: int, latent_channels: int = 2) -> dict:
    return {
        "spatial_dims": spatial_dims,
        "in_channels": 1,
        "out_channels": 1,
        "channels": [8, 16],
        "latent_channels": latent_channels,
        "num_res_blocks": [1, 1],
        "attention_levels": [False, False],
        "norm_num_groups": 8,
        "with_encoder_nonlocal_attn": False,
        "with_decoder_nonlocal_attn": False,
    }


def unzero_controlnet(net: torch.nn.Module, std: float = 0.5) -> torch.nn.Module:
    """Random weights for the convolutions MONAI's ControlNet zero-initialises (its conditioning embedding's
    output, its down and mid residual blocks): a ControlNet as training leaves it, whose residuals count."""
    with torch.no_grad():
        for part in (net.controlnet_cond_embedding.conv_out, net.controlnet_down_blocks, net.controlnet_mid_block):
            for p in part.parameters():
                p.normal_(0.0, std)
    return net


def make_tiny_model(
    out_dir: str | Path,
    kind: str = "ldm",
    spatial_dims: int = 3,
    image_shape: tuple[int, ...] | None = None,
    num_classes: int = 4,
    seed: int = 0,
    context_slices: int = 0,
    label_map: dict[int, str] | None = None,
    voxel_size: float = 4.0,
    controlnet: bool = False,
    rflow: bool = False,
    label_output: dict[int, str] | None = None,
    map_generator: str | None = None,
) -> Path:
    """Write a random-weight model folder of ``kind`` (``ddpm``, ``ldm`` or ``segmentation``; a 2D segmentation
    model can take ``context_slices`` neighbouring slices on each side; a ddpm given ``label_map`` generates
    from a label map with those labels, through a space-to-depth UNet as the shipped one, and with
    ``controlnet`` takes the map through a MONAI ControlNet instead of beside the image). ``rflow``: a
    rectified-flow model (`TINY_RFLOW_SCHEDULE`, sampled with ``rflow``). A ddpm given ``label_output``
    generates label maps with those labels (a map generator); ``map_generator`` names the one that draws a
    label-map model's maps when none is given (two-stage)."""
    if controlnet and not label_map:
        raise ValueError("a tiny ControlNet takes a label map: give label_map")
    torch.manual_seed(seed)
    image_shape = tuple(image_shape or ((16, 16, 16) if spatial_dims == 3 else (32, 32)))
    config: dict = {
        "name": Path(out_dir).name,
        "kind": kind,
        "spatial_dims": spatial_dims,
        "image_shape": list(image_shape),
        "voxel_size": [float(voxel_size)] * spatial_dims,
        "intensity": {"method": "percentile", "lower": 0.5, "upper": 99.5, "foreground_only": True},
        "scheduler": {**TINY_RFLOW_SCHEDULE, "spatial_dim": spatial_dims} if rflow else TINY_SCHEDULE,
        "defaults": {"sampler": "rflow" if rflow else "ddim", "steps": 5, "precision": "fp32"},
        "training": {"note": "random initialisation, not trained: for tests only"},
    }
    networks: dict[str, torch.nn.Module] = {}
    if kind == "ldm":
        ae = tiny_autoencoder_config(spatial_dims)
        latent_shape = [s // 2 for s in image_shape]
        config["latent"] = {"channels": ae["latent_channels"], "shape": latent_shape, "scale_factor": 1.0}
        unet = tiny_unet_config(spatial_dims, ae["latent_channels"], ae["latent_channels"])
        config["networks"] = {"unet": unet, "autoencoder": ae}
    elif kind == "segmentation":
        unet = tiny_unet_config(spatial_dims, num_classes + 1 + 2 * context_slices, num_classes)
        config["networks"] = {"unet": unet}
        config["segmentation"] = {
            "num_classes": num_classes,
            "class_names": ["background", "CSF", "GM", "WM"][:num_classes],
        }
        if context_slices:
            config["segmentation"]["context_slices"] = context_slices
    elif label_map:
        unet = {**tiny_unet_config(spatial_dims, 1 + (0 if controlnet else len(label_map)), 1), "space_to_depth": 2}
        config["networks"] = {"unet": unet}
        if controlnet:
            config["networks"]["controlnet"] = tiny_controlnet_config(unet, len(label_map))
        config["label_map"] = {"labels": {str(k): v for k, v in sorted(label_map.items())}}
        if map_generator:
            config["label_map"]["generator"] = map_generator
    elif label_output:
        unet = {**tiny_unet_config(spatial_dims, len(label_output), len(label_output)), "space_to_depth": 2}
        config["networks"] = {"unet": unet}
        config["label_output"] = {"labels": {str(k): v for k, v in sorted(label_output.items())}}
    else:
        unet = tiny_unet_config(spatial_dims, 1, 1)
        config["networks"] = {"unet": unet}
    config["weights"] = {}
    for name, net_config in config["networks"].items():
        networks[name] = build_network(name, net_config)
    if label_map or label_output or rflow:  # MONAI zeroes the last convolution: weights, so the map / velocity count
        with torch.no_grad():
            for p in networks["unet"].out.parameters():
                p.normal_(0.0, 0.05)
    if controlnet:  # and the ControlNet's zero-initialised output convolutions, so that its residuals count
        unzero_controlnet(networks["controlnet"])
    card = f"# {config['name']}\n\nRandomly initialised {kind} model for tests. Not trained; samples are noise.\n"
    return save_model_folder(out_dir, config, networks, card=card, overwrite=True)
