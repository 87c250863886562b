"""Bundle folders laid out as the MONAI Model Zoo ships them, with random weights (tests, benchmarks, examples).

The configs keep the Zoo's structure and keys (``$`` expressions, ``@`` references, ``_requires_``, the
``scripts.sampler.Sampler`` target, a ``scripts/`` folder) with the networks shrunk to tiny widths unless
``full_size``; weights are saved with ``torch.save`` in MONAI Generative's old key names, as the Zoo's files are.
The ``scripts/sampler.py`` written here would leave a ``SCRIPT_RAN`` file in the bundle if it were ever run.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch

from napari_meddiff.models.model import build_network

SCRIPT_MARKER = "SCRIPT_RAN"
_SCRIPT = f"""from pathlib import Path
Path(__file__).resolve().parent.parent.joinpath({SCRIPT_MARKER!r}).write_text("a bundle script was executed")


class Sampler:
    def sampling_fn(self, *args):
        raise RuntimeError("bundle scripts must never run")
"""

_BRAIN_LDM_AE = {
    "_target_": "monai.networks.nets.AutoencoderKL",
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 1,
    "latent_channels": 3,
    "channels": [64, 128, 128, 128],
    "num_res_blocks": 2,
    "norm_num_groups": 32,
    "norm_eps": 1e-06,
    "attention_levels": [False, False, False, False],
    "with_encoder_nonlocal_attn": False,
    "with_decoder_nonlocal_attn": False,
}
_BRAIN_LDM_UNET = {
    "_target_": "monai.networks.nets.DiffusionModelUNet",
    "spatial_dims": 3,
    "in_channels": 7,
    "out_channels": 3,
    "channels": [256, 512, 768],
    "num_res_blocks": 2,
    "attention_levels": [False, True, True],
    "norm_num_groups": 32,
    "norm_eps": 1e-06,
    "resblock_updown": True,
    "num_head_channels": [0, 512, 768],
    "with_conditioning": True,
    "transformer_num_layers": 1,
    "cross_attention_dim": 4,
    "upcast_attention": True,
    "use_flash_attention": False,
}


def brain_ldm_inference(full_size: bool = False) -> dict[str, Any]:
    """``brain_image_synthesis_latent_diffusion_model/configs/inference.json`` (tiny widths unless full size)."""
    ae, unet = copy.deepcopy(_BRAIN_LDM_AE), copy.deepcopy(_BRAIN_LDM_UNET)
    if not full_size:
        ae.update(channels=[8, 8], num_res_blocks=1, norm_num_groups=4, attention_levels=[False, False])
        unet.update(channels=[8, 16, 16], num_res_blocks=1, norm_num_groups=4, num_head_channels=[0, 16, 16])
    noise = "(1, 3, 20, 28, 20)" if full_size else "(1, 3, 8, 12, 8)"
    return {
        "imports": ["$import torch", "$from datetime import datetime", "$from pathlib import Path"],
        "bundle_root": ".",
        "dataset_dir": "",
        "dataset": "",
        "evaluator": "",
        "inferer": "",
        "load_old": 1,
        "model_dir": "$@bundle_root + '/models'",
        "output_dir": "$@bundle_root + '/output'",
        "create_output_dir": "$Path(@output_dir).mkdir(exist_ok=True)",
        "gender": 0.0,
        "age": 0.1,
        "ventricular_vol": 0.2,
        "brain_vol": 0.4,
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "conditioning": "$torch.tensor([[@gender, @age, @ventricular_vol, @brain_vol]]).to(@device).unsqueeze(1)",
        "out_file": "$datetime.now().strftime('sample_%H%M%S_%d%m%Y') + '_' + str(@gender)",
        "autoencoder_def": ae,
        "network_def": "@autoencoder_def",
        "load_autoencoder_path": "$@model_dir + '/autoencoder.pt'",
        "load_autoencoder_func": (
            "$@autoencoder_def.load_old_state_dict if bool(@load_old) else @autoencoder_def.load_state_dict"
        ),
        "load_autoencoder": "$@load_autoencoder_func(torch.load(@load_autoencoder_path))",
        "autoencoder": "$@autoencoder_def.to(@device)",
        "diffusion_def": unet,
        "load_diffusion_path": "$@model_dir + '/model.pt'",
        "load_diffusion_func": (
            "$@diffusion_def.load_old_state_dict if bool(@load_old) else @diffusion_def.load_state_dict"
        ),
        "load_diffusion": "$@load_diffusion_func(torch.load(@load_diffusion_path))",
        "diffusion": "$@diffusion_def.to(@device)",
        "scheduler": {
            "_target_": "monai.networks.schedulers.DDIMScheduler",
            "_requires_": ["@load_diffusion", "@load_autoencoder"],
            "beta_start": 0.0015,
            "beta_end": 0.0205,
            "num_train_timesteps": 1000,
            "schedule": "scaled_linear_beta",
            "clip_sample": False,
        },
        "noise": f"$torch.randn({noise}).to(@device)",
        "set_timesteps": "$@scheduler.set_timesteps(num_inference_steps=50)",
        "sampler": {"_target_": "scripts.sampler.Sampler", "_requires_": "@set_timesteps"},
        "sample": "$@sampler.sampling_fn(@noise, @autoencoder, @diffusion, @scheduler, @conditioning)",
        "saver": {
            "_target_": "SaveImage",
            "_requires_": "@create_output_dir",
            "output_dir": "@output_dir",
            "output_postfix": "@out_file",
        },
        "run": "$@saver(@sample[0][0])",
    }


def brain_ldm_metadata(full_size: bool = False) -> dict[str, Any]:
    shape = [160, 224, 160] if full_size else [16, 24, 16]
    cond = {
        "type": "tabular",
        "num_channels": 1,
        "dtype": "float32",
        "value_range": [0, 1],
        "format": "nii",
        "spatial_shape": shape,
        "is_patch_data": False,
        "channel_def": {"0": "Gender", "1": "Age", "2": "Ventricular volume", "3": "Brain volume"},
    }
    pred = {
        "type": "image",
        "format": "image",
        "num_channels": 1,
        "spatial_shape": shape,
        "dtype": "float32",
        "value_range": [0, 1],
        "modality": "MR",
        "is_patch_data": False,
        "channel_def": {"0": "T1w"},
    }
    return {
        "version": "1.0.0",
        "monai_version": "1.4.0",
        "task": "Brain image synthesis",
        "description": "A generative model for creating high-resolution 3D brain MRI based on UK Biobank",
        "image_classes": "T1w head MRI with 1x1x1 mm voxel size",
        "network_data_format": {"inputs": {"image": cond}, "outputs": {"pred": pred}},
    }


def brats_ldm_inference(spatial_dims: int = 3) -> dict[str, Any]:
    """``brats_mri_generative_diffusion`` (3D) / ``brats_mri_axial_slices_generative_diffusion`` (2D), tiny."""
    latent = [8, 8, 8, 4] if spatial_dims == 3 else [1, 8, 8]
    return {
        "imports": ["$import torch", "$from datetime import datetime", "$from pathlib import Path"],
        "bundle_root": ".",
        "model_dir": "$@bundle_root + '/models'",
        "output_dir": "$@bundle_root + '/output'",
        "create_output_dir": "$Path(@output_dir).mkdir(exist_ok=True)",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "output_postfix": "$datetime.now().strftime('sample_%Y%m%d_%H%M%S')",
        "spatial_dims": spatial_dims,
        "image_channels": 1,
        "latent_channels": latent[0],
        "latent_shape": ["@latent_channels", *latent[1:]],
        "autoencoder_def": {
            "_target_": "monai.networks.nets.autoencoderkl.AutoencoderKL",
            "spatial_dims": "@spatial_dims",
            "in_channels": "@image_channels",
            "out_channels": "@image_channels",
            "latent_channels": "@latent_channels",
            "channels": [8, 8, 8],
            "num_res_blocks": 1,
            "norm_num_groups": 4,
            "norm_eps": 1e-06,
            "attention_levels": [False, False, False],
            "with_encoder_nonlocal_attn": spatial_dims == 2,
            "with_decoder_nonlocal_attn": spatial_dims == 2,
            "include_fc": False,
        },
        "network_def": {
            "_target_": "monai.networks.nets.diffusion_model_unet.DiffusionModelUNet",
            "spatial_dims": "@spatial_dims",
            "in_channels": "@latent_channels",
            "out_channels": "@latent_channels",
            "channels": [8, 16, 16],
            "attention_levels": [False, True, True],
            "num_head_channels": [0, 8, 8],
            "num_res_blocks": 1,
            "norm_num_groups": 4,
            "include_fc": False,
            "use_combined_linear": False,
        },
        "load_autoencoder_path": "$@bundle_root + '/models/model_autoencoder.pt'",
        "load_autoencoder": "$@autoencoder_def.load_old_state_dict(torch.load(@load_autoencoder_path))",
        "autoencoder": "$@autoencoder_def.to(@device)",
        "load_diffusion_path": "$@model_dir + '/model.pt'",
        "load_diffusion": "$@network_def.load_old_state_dict(torch.load(@load_diffusion_path))",
        "diffusion": "$@network_def.to(@device)",
        "noise_scheduler": {
            "_target_": "monai.networks.schedulers.ddim.DDIMScheduler",
            "_requires_": ["@load_diffusion", "@load_autoencoder"],
            "num_train_timesteps": 1000,
            "beta_start": 0.0015,
            "beta_end": 0.0195,
            "schedule": "scaled_linear_beta",
            "clip_sample": False,
        },
        "noise": "$torch.randn([1]+@latent_shape).to(@device)",
        "set_timesteps": "$@noise_scheduler.set_timesteps(num_inference_steps=50)",
        "inferer": {"_target_": "scripts.ldm_sampler.LDMSampler", "_requires_": "@set_timesteps"},
        "saver": {
            "_target_": "SaveImage",
            "_requires_": "@create_output_dir",
            "output_dir": "@output_dir",
            "output_postfix": "@output_postfix",
        },
        "run": ["$@inferer.run(@noise, @autoencoder, @diffusion, @noise_scheduler, @saver)"],
    }


def brats_ldm_metadata(spatial_dims: int = 3) -> dict[str, Any]:
    latent = [8, 8, 4] if spatial_dims == 3 else [8, 8]
    channels = 8 if spatial_dims == 3 else 1
    return {
        "version": "1.1.5",
        "name": "BraTS MRI Latent Diffusion Generation",
        "image_classes": "Flair brain MRI with 1.1x1.1x1.1 mm voxel size",
        "network_data_format": {
            "inputs": {
                "latent": {
                    "type": "noise",
                    "format": "image",
                    "num_channels": channels,
                    "spatial_shape": latent,
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": True,
                },
                "condition": {
                    "type": "timesteps",
                    "format": "timesteps",
                    "num_channels": 1,
                    "spatial_shape": [],
                    "dtype": "long",
                    "value_range": [0, 1000],
                    "is_patch_data": False,
                },
            },
            "outputs": {
                "pred": {
                    "type": "feature",
                    "format": "image",
                    "num_channels": channels,
                    "spatial_shape": latent,
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": True,
                    "channel_def": {"0": "image"},
                }
            },
        },
    }


MEDNIST_INFERENCE_YAML = """# This defines an inference script for generating a random image to a Pytorch file
imports:
- $import os
- $import datetime
- $import torch
- $import scripts
- $import monai

network_def:
  _target_: monai.networks.nets.DiffusionModelUNet
  spatial_dims: 2
  in_channels: 1
  out_channels: 1
  channels: [8, 16, 16]
  attention_levels: [false, true, true]
  num_res_blocks: 1
  num_head_channels: 16
  norm_num_groups: 4

network: $@network_def.to(@device)
bundle_root: .
ckpt_path: $@bundle_root + '/models/model.pt'
use_amp: true
image_dim: 16
image_size: [1, '@image_dim', '@image_dim']
num_train_timesteps: 1000

scheduler:
  _target_: monai.networks.schedulers.DDPMScheduler
  num_train_timesteps: '@num_train_timesteps'

inferer:
  _target_: monai.inferers.DiffusionInferer
  scheduler: '@scheduler'

noise: $torch.rand(1,1,@image_dim,@image_dim)
sample: '$lambda x: @inferer.sample(input_noise=x, diffusion_model=@network, scheduler=@scheduler)'
load_state: '$@network.load_state_dict(torch.load(@ckpt_path, weights_only = True))'
testing:
- '@load_state'
- '$torch.save(@sample(@noise.to(@device)), @out_file)'
"""


def old_state_dict(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A MONAI network's state dict under MONAI Generative's key names (the inverse of ``load_old_state_dict``)."""
    state = {k: v.clone() for k, v in net.state_dict().items()}
    old: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = re.sub(r"\.attn\.(to_q|to_k|to_v)\.", r".\1.", key)
        name = re.sub(r"\.attn\.out_proj\.", ".proj_attn.", name)
        if "transformer_blocks" in name:
            name = re.sub(r"\.out_proj\.", ".to_out.0.", name)
        old[name.replace("postconv", "conv")] = value
    for key, value in state.items():  # include_fc=False: the old networks had proj_attn all the same
        match = re.match(r"(.*)\.attn\.to_q\.weight$", key)
        if match and f"{match.group(1)}.attn.out_proj.weight" not in state:
            old[f"{match.group(1)}.proj_attn.weight"] = torch.randn(value.shape[0], value.shape[0])
            old[f"{match.group(1)}.proj_attn.bias"] = torch.zeros(value.shape[0])
    return old


def network_kwargs(component: dict) -> dict:
    """A bundle config's network component as keyword arguments (its ``_target_``-style keys dropped)."""
    return {k: v for k, v in component.items() if not k.startswith("_")}


def _resolve_literals(kwargs: dict, config: dict) -> dict:
    return {k: config[v[1:]] if isinstance(v, str) and v.startswith("@") else v for k, v in kwargs.items()}


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


def write_bundle(
    folder: str | Path,
    template: str = "brain_ldm",
    *,
    full_size: bool = False,
    seed: int = 0,
    old_keys: bool = True,
    nested: str | None = None,
) -> Path:
    """Write a bundle folder of ``template`` (``brain_ldm``, ``brats_3d``, ``brats_2d``, ``mednist``).

    ``nested``: save each checkpoint as ``{nested: state_dict}`` (as training scripts often do)."""
    folder = Path(folder)
    (folder / "configs").mkdir(parents=True, exist_ok=True)
    (folder / "models").mkdir(exist_ok=True)
    (folder / "scripts").mkdir(exist_ok=True)
    (folder / "scripts" / "__init__.py").write_text(_SCRIPT)
    (folder / "scripts" / "sampler.py").write_text(_SCRIPT)
    with torch.random.fork_rng(devices=[]):  # the caller's global RNG is left as it was
        torch.manual_seed(seed)
        return _write_bundle_files(folder, template, full_size=full_size, old_keys=old_keys, nested=nested)


def _write_bundle_files(folder: Path, template: str, *, full_size: bool, old_keys: bool, nested: str | None) -> Path:
    if template == "brain_ldm":
        inference, metadata = brain_ldm_inference(full_size), brain_ldm_metadata(full_size)
        nets = {
            "models/autoencoder.pt": ("autoencoder", inference["autoencoder_def"]),
            "models/model.pt": ("unet", inference["diffusion_def"]),
        }
    elif template in ("brats_3d", "brats_2d"):
        dims = 3 if template == "brats_3d" else 2
        inference, metadata = brats_ldm_inference(dims), brats_ldm_metadata(dims)
        nets = {
            "models/model_autoencoder.pt": ("autoencoder", inference["autoencoder_def"]),
            "models/model.pt": ("unet", inference["network_def"]),
        }
    elif template == "mednist":
        import yaml

        inference = yaml.safe_load(MEDNIST_INFERENCE_YAML)
        metadata = {
            "version": "1.0.1",
            "task": "MedNIST Hand Generation",
            "image_classes": "Single channel magnitude data.",
            "network_data_format": {
                "outputs": {
                    "pred": {"type": "image", "num_channels": 1, "spatial_shape": [1, 16, 16], "value_range": []}
                }
            },
        }
        nets = {"models/model.pt": ("unet", inference["network_def"])}
    else:
        raise ValueError(f"unknown bundle template {template!r}")
    if template == "mednist":
        (folder / "configs" / "inference.yaml").write_text(MEDNIST_INFERENCE_YAML)
    else:
        (folder / "configs" / "inference.json").write_text(json.dumps(inference, indent=4) + "\n")
    (folder / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=4) + "\n")
    large = []
    for rel, (role, component) in nets.items():
        net = build_network(role, _resolve_literals(network_kwargs(component), inference))
        with torch.no_grad():  # MONAI zero-initialises output convolutions: perturb all, so inputs matter
            for param in net.parameters():
                param.add_(torch.randn_like(param) * 0.05)
        state = old_state_dict(net) if old_keys else net.state_dict()
        torch.save({nested: state} if nested else state, folder / rel)
        large.append(
            f'  - path: "{rel}"\n    url: "https://example.invalid/{Path(rel).name}"\n'
            f'    hash_val: "{_md5(folder / rel)}"\n    hash_type: "md5"\n'
        )
    (folder / "large_files.yml").write_text("large_files:\n" + "".join(large))
    (folder / "docs").mkdir(exist_ok=True)
    (folder / "docs" / "README.md").write_text(f"Random-weight stand-in for the MONAI Zoo {template} bundle.\n")
    return folder
