"""``maisi_ct_generative`` bundle folders in both layouts, tiny and with random weights (tests, examples).

The configs keep the Zoo bundle's structure and keys: ``$`` expressions (the weight paths, ``latent_shape``),
``@`` references, the image and the mask-generation networks side by side, MONAI's MAISI ``_target_``s, the
``scripts.sample.LDMSampler`` and (1.0.0) ``scripts.rectified_flow.RFlowScheduler`` targets, GPU settings
(flash attention, float16 norms, split convolutions). ``0.4`` is the DDPM layout (UNet inputs: spacing, top and
bottom body region); ``1.0`` the rectified flow (spacing and a modality class; its 1.0.0 config follows the
bundle's 1.0.0 metadata and scripts and MAISI's published rflow network config). Weights are saved as the Zoo's
files are: ``{"unet_state_dict", "scale_factor"}``, ``{"controlnet_state_dict"}``, the autoencoder's bare state
dict. The mask generator's weights, its candidate-mask database and the example data are listed in
``large_files.yml`` but not written. ``scripts/`` would leave a ``SCRIPT_RAN`` file if ever imported.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from napari_meddiff.models.model import build_network
from napari_meddiff.testing.bundle_fixtures import _SCRIPT, SCRIPT_MARKER
from napari_meddiff.testing.tiny_models import unzero_controlnet

SCALE_FACTOR = 0.8
#: a part of MAISI's label_dict.json (name -> value), enough for maps of a few organs in each body region
LABELS = {
    "liver": 1,
    "spleen": 3,
    "pancreas": 4,
    "right kidney": 5,
    "left kidney": 14,
    "brain": 22,
    "hepatic tumor": 26,
    "left lung upper lobe": 28,
    "right lung lower lobe": 32,
    "left femur": 93,
    "right femur": 94,
    "skull": 120,
}
REMAP = {"liver": [1, 1], "spleen": [2, 3], "bone lesion": [124, 128]}  # label_dict_124_to_132.json's shape

_MAISI = "monai.apps.generation.maisi.networks"
_TINY_LEVELS = {"num_channels": [8, 16], "attention_levels": [False, True], "num_head_channels": [0, 8]}
#: the published networks' widths (maisi_ct_generative's inference.json, NV-Generate-CTMR's config_network_rflow.json)
_FULL_LEVELS = {
    "num_channels": [64, 128, 256, 512],
    "attention_levels": [False, False, True, True],
    "num_head_channels": [0, 0, 32, 32],
}
_FULL_AUTOENCODER = {"num_channels": [64, 128, 256], "num_res_blocks": [2, 2, 2], "norm_num_groups": 32}


def _autoencoder(in_channels: Any, out_channels: Any, full_size: bool = False) -> dict[str, Any]:
    ae = {
        "_target_": f"{_MAISI}.autoencoderkl_maisi.AutoencoderKlMaisi",
        "spatial_dims": "@spatial_dims",
        "in_channels": in_channels,
        "out_channels": out_channels,
        "latent_channels": "@latent_channels",
        "num_channels": [8, 8, 8],
        "num_res_blocks": [1, 1, 1],
        "norm_num_groups": 4,
        "norm_eps": 1e-06,
        "attention_levels": [False, False, False],
        "with_encoder_nonlocal_attn": False,
        "with_decoder_nonlocal_attn": False,
        "use_checkpointing": False,
        "use_convtranspose": False,
        "norm_float16": True,
        "num_splits": 8,
        "dim_split": 1,
    }
    return {**ae, **(copy.deepcopy(_FULL_AUTOENCODER) if full_size else {})}


def _levels(full_size: bool) -> dict[str, Any]:
    if full_size:
        return {**copy.deepcopy(_FULL_LEVELS), "num_res_blocks": 2, "norm_num_groups": 32}
    return {**copy.deepcopy(_TINY_LEVELS), "num_res_blocks": 1, "norm_num_groups": 4}


def _unet(version: str, full_size: bool = False) -> dict[str, Any]:
    unet = {
        "_target_": f"{_MAISI}.diffusion_model_unet_maisi.DiffusionModelUNetMaisi",
        "spatial_dims": "@spatial_dims",
        "in_channels": "@latent_channels",
        "out_channels": "@latent_channels",
        **_levels(full_size),
        "use_flash_attention": True,
        "include_top_region_index_input": version == "0.4",
        "include_bottom_region_index_input": version == "0.4",
        "include_spacing_input": True,
    }
    if version == "1.0":
        unet.update(num_class_embeds=128, resblock_updown=True, include_fc=True)
    return unet


def _controlnet(version: str, full_size: bool = False) -> dict[str, Any]:
    net = {
        "_target_": f"{_MAISI}.controlnet_maisi.ControlNetMaisi",
        "spatial_dims": "@spatial_dims",
        "in_channels": "@latent_channels",
        **_levels(full_size),
        "use_flash_attention": True,
        "conditioning_embedding_in_channels": 8,
        "conditioning_embedding_num_channels": [8, 32, 64] if full_size else [8, 8, 8],
    }
    if version == "1.0":
        net.update(num_class_embeds=128, resblock_updown=True, include_fc=True)
    return net


def _scheduler(version: str) -> dict[str, Any]:
    if version == "1.0":
        return {
            "_target_": "scripts.rectified_flow.RFlowScheduler",
            "num_train_timesteps": 1000,
            "use_discrete_timesteps": False,
            "use_timestep_transform": True,
            "sample_method": "uniform",
        }
    return {
        "_target_": "monai.networks.schedulers.ddpm.DDPMScheduler",
        "num_train_timesteps": 1000,
        "beta_start": 0.0015,
        "beta_end": 0.0195,
        "schedule": "scaled_linear_beta",
        "clip_sample": False,
    }


WEIGHT_FILES = {
    "0.4": {
        "autoencoder": "autoencoder_epoch273.pt",
        "unet": "input_unet3d_data-all_steps1000size512ddpm_random_current_inputx_v1.pt",
        "controlnet": "controlnet-20datasets-e20wl100fold0bc_noi_dia_fsize_current.pt",
    },
    "1.0": {
        "autoencoder": "autoencoder_epoch273.pt",
        "unet": "diff_unet_3d_rflow.pt",
        "controlnet": "controlnet_3d_rflow.pt",
    },
}


def _paths(version: str) -> dict[str, Any]:
    files = WEIGHT_FILES[version]
    return {
        "bundle_root": ".",
        "model_dir": "$@bundle_root + '/models'",
        "output_dir": "$@bundle_root + '/output'",
        "create_output_dir": "$Path(@output_dir).mkdir(exist_ok=True)",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "trained_autoencoder_path": f"$@model_dir + '/{files['autoencoder']}'",
        "trained_diffusion_path": f"$@model_dir + '/{files['unet']}'",
        "trained_controlnet_path": f"$@model_dir + '/{files['controlnet']}'",
        "trained_mask_generation_autoencoder_path": "$@model_dir + '/mask_generation_autoencoder.pt'",
        "trained_mask_generation_diffusion_path": "$@model_dir + '/mask_generation_diffusion_unet.pt'",
        "all_mask_files_json": "$@bundle_root + '/configs/candidate_masks_flexible_size_and_spacing_3000.json'",
        "label_dict_json": "$@bundle_root + '/configs/label_dict.json'",
        "label_dict_remap_json": "$@bundle_root + '/configs/label_dict_124_to_132.json'",
    }


def maisi_inference(version: str = "0.4", side: int = 16, full_size: bool = False) -> dict[str, Any]:
    """``maisi_ct_generative/configs/inference.json`` of ``version`` (``0.4`` or ``1.0``): tiny networks, or with
    ``full_size`` the published ones (the mask generator stays tiny: nothing here runs it)."""
    config: dict[str, Any] = {"imports": ["$import torch", "$from pathlib import Path", "$import scripts"]}
    config.update(_paths(version))
    config.update(
        num_output_samples=1, body_region=["abdomen"], anatomy_list=["liver"], controllable_anatomy_size=[],
        num_inference_steps=1000 if version == "0.4" else 30, mask_generation_num_inference_steps=1000,
        random_seed=None, spatial_dims=3, image_channels=1, latent_channels=4, output_size_xy=side,
        output_size_z=side, output_size=["@output_size_xy", "@output_size_xy", "@output_size_z"],
        spacing_xy=1.5, spacing_z=2.0, spacing=["@spacing_xy", "@spacing_xy", "@spacing_z"],
        latent_shape=["@latent_channels", "$@output_size[0]//4", "$@output_size[1]//4", "$@output_size[2]//4"],
        mask_generation_latent_shape=[4, 64, 64, 64], autoencoder_sliding_window_infer_size=[96, 96, 96],
        autoencoder_sliding_window_infer_overlap=0.6667,
    )  # fmt: skip
    if version == "1.0":
        config["modality"] = 1
    config["autoencoder_def"] = _autoencoder("@image_channels", "@image_channels", full_size)
    config["diffusion_unet_def"] = _unet(version, full_size)
    config["controlnet_def"] = _controlnet(version, full_size)
    config["mask_generation_autoencoder_def"] = {**_autoencoder(8, 125), "use_checkpointing": True}
    config["mask_generation_diffusion_def"] = {
        "_target_": "monai.networks.nets.diffusion_model_unet.DiffusionModelUNet",
        "spatial_dims": "@spatial_dims",
        "in_channels": "@latent_channels",
        "out_channels": "@latent_channels",
        "channels": [8, 16],
        "attention_levels": [False, True],
        "num_head_channels": [0, 8],
        "num_res_blocks": 1,
        "norm_num_groups": 4,
        "with_conditioning": True,
        "cross_attention_dim": 10,
    }
    config.update(
        autoencoder="$@autoencoder_def.to(@device)",
        checkpoint_autoencoder="$torch.load(@trained_autoencoder_path, weights_only=True)",
        load_autoencoder="$@autoencoder.load_state_dict(@checkpoint_autoencoder)",
        diffusion_unet="$@diffusion_unet_def.to(@device)",
        checkpoint_diffusion_unet="$torch.load(@trained_diffusion_path, weights_only=False)",
        load_diffusion="$@diffusion_unet.load_state_dict(@checkpoint_diffusion_unet['unet_state_dict'])",
        controlnet="$@controlnet_def.to(@device)",
        checkpoint_controlnet="$torch.load(@trained_controlnet_path, weights_only=False)",
        load_controlnet="$@controlnet.load_state_dict(@checkpoint_controlnet['controlnet_state_dict'], strict=True)",
        scale_factor="$@checkpoint_diffusion_unet['scale_factor'].to(@device)",
    )
    config["noise_scheduler"] = _scheduler(version)
    config["mask_generation_noise_scheduler"] = _scheduler("0.4")
    config["ldm_sampler"] = {
        "_target_": "scripts.sample.LDMSampler",
        "_requires_": ["@create_output_dir", "@load_diffusion", "@load_autoencoder", "@load_controlnet"],
        "label_dict_json": "@label_dict_json",
        "autoencoder": "@autoencoder",
        "diffusion_unet": "@diffusion_unet",
        "controlnet": "@controlnet",
        "scale_factor": "@scale_factor",
        "noise_scheduler": "@noise_scheduler",
        "latent_shape": "@latent_shape",
        "output_size": "@output_size",
        "spacing": "@spacing",
        "num_inference_steps": "@num_inference_steps",
    }
    config["run"] = ["$@ldm_sampler.sample_multiple_images(@num_output_samples)"]
    config["evaluator"] = None
    return config


def maisi_metadata(version: str = "0.4") -> dict[str, Any]:
    """The part of ``configs/metadata.json`` meddiff reads (its inputs are the bundle's, not a volume's)."""
    return {
        "version": "1.0.0" if version == "1.0" else "0.4.5",
        "monai_version": "1.4.0",
        "name": "CT image latent diffusion generation",
        "task": "CT image synthesis",
        "description": "A generative model for creating 3D CT from Gaussian noise",
        "image_classes": "Flair brain MRI with 1.1x1.1x1.1 mm voxel size",  # as the bundle's (wrong) text says
    }


def _resolved(component: dict, config: dict) -> dict:
    kwargs = {k: v for k, v in component.items() if not k.startswith("_")}
    return {k: config[v[1:]] if isinstance(v, str) and v.startswith("@") else v for k, v in kwargs.items()}


def _random_network(role: str, component: dict, config: dict, full_size: bool = False) -> torch.nn.Module:
    cls = component["_target_"].rsplit(".", 1)[1]
    net = build_network(role, {**_resolved(component, config), "monai_class": cls})
    with torch.no_grad():  # MONAI zero-initialises output and ControlNet convolutions: perturb all
        for param in net.parameters():  # (at full size by less: 0.1 on 512 channels would overflow)
            param.add_(torch.randn_like(param) * (0.1 if not full_size else 0.1 / param[0].numel() ** 0.5))
        if role == "controlnet":
            unzero_controlnet(net)  # residuals as training leaves them: the map counts
        if role == "autoencoder":  # images around 0.5, as CT in MAISI's [0, 1], not clamped to 0 or 1
            last = net.decoder.blocks[-1].conv.conv
            last.weight.mul_(0.02)
            last.bias.fill_(0.5)
    return net


def _write_weights(folder: Path, files: dict[str, str], config: dict, full_size: bool = False) -> list[str]:
    nets = {
        role: _random_network(role, config[key], config, full_size)
        for role, key in (
            ("autoencoder", "autoencoder_def"),
            ("unet", "diffusion_unet_def"),
            ("controlnet", "controlnet_def"),
        )
    }
    torch.save(nets["autoencoder"].state_dict(), folder / "models" / files["autoencoder"])
    torch.save(
        {"unet_state_dict": nets["unet"].state_dict(), "scale_factor": torch.tensor(SCALE_FACTOR), "epoch": 7},
        folder / "models" / files["unet"],
    )
    torch.save(
        {"controlnet_state_dict": nets["controlnet"].state_dict(), "epoch": 3}, folder / "models" / files["controlnet"]
    )
    return [f"models/{name}" for name in files.values()]


def _large_files(folder: Path, written: list[str]) -> str:
    listed = written + [
        "models/mask_generation_autoencoder.pt",
        "models/mask_generation_diffusion_unet.pt",
        "configs/candidate_masks_flexible_size_and_spacing_3000.json",
        "datasets/all_masks_flexible_size_and_spacing_3000.zip",
        "configs/label_dict.json",
        "configs/label_dict_124_to_132.json",
    ]
    entries = []
    for rel in listed:
        path = folder / rel
        md5 = hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest() if path.is_file() else "0" * 32
        entries.append(f'- path: "{rel}"\n  url: "https://example.invalid/{Path(rel).name}"\n  hash_val: "{md5}"\n')
    return "large_files:\n" + "".join(e + '  hash_type: "md5"\n' for e in entries)


def write_maisi_bundle(
    folder: str | Path,
    version: str = "0.4",
    *,
    seed: int = 0,
    side: int = 16,
    extra_config: dict | None = None,
    full_size: bool = False,
) -> Path:
    """Write a ``maisi_ct_generative`` bundle folder of ``version`` (``0.4``: DDPM; ``1.0``: rectified flow) with
    random weights; ``extra_config``: keys added to its inference.json (e.g. expressions that must never run);
    ``full_size``: the published networks' widths (about 1 GB of weights), for benchmarks."""
    if version not in WEIGHT_FILES:
        raise ValueError(f"unknown MAISI bundle version {version!r} (0.4 or 1.0)")
    folder = Path(folder)
    for sub in ("configs", "models", "scripts", "docs"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for script in ("__init__.py", "sample.py", "rectified_flow.py" if version == "1.0" else "utils.py"):
        (folder / "scripts" / script).write_text(_SCRIPT)
    config = {**maisi_inference(version, side, full_size), **(extra_config or {})}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        written = _write_weights(folder, WEIGHT_FILES[version], config, full_size)
    (folder / "configs" / "inference.json").write_text(json.dumps(config, indent=4) + "\n")
    (folder / "configs" / "metadata.json").write_text(json.dumps(maisi_metadata(version), indent=4) + "\n")
    (folder / "configs" / "label_dict.json").write_text(json.dumps(LABELS, indent=4) + "\n")
    (folder / "configs" / "label_dict_124_to_132.json").write_text(json.dumps(REMAP, indent=4) + "\n")
    (folder / "large_files.yml").write_text(_large_files(folder, written))
    (folder / "docs" / "README.md").write_text(f"Random-weight stand-in for maisi_ct_generative {version}.\n")
    return folder


NV_WEIGHT_FILES = {
    "autoencoder": "autoencoder_v1.pt",
    "unet": "diff_unet_3d_rflow-ct.pt",
    "controlnet": "controlnet_3d_rflow-ct.pt",
}


def nv_generate_configs(side: int = 16) -> dict[str, dict[str, Any]]:
    """NV-Generate-CTMR's ``config_network_rflow.json``, ``config_infer.json`` and ``environment_rflow-ct.json``
    (tiny networks), by file name."""
    bundle = maisi_inference("1.0", side)
    network = {"spatial_dims": 3, "image_channels": 1, "latent_channels": 4, "include_body_region": False}
    for key in ("autoencoder_def", "diffusion_unet_def", "controlnet_def", "mask_generation_autoencoder_def"):
        network[key] = bundle[key]
    network["diffusion_unet_def"].update(
        include_top_region_index_input="@include_body_region", include_bottom_region_index_input="@include_body_region"
    )
    network["mask_generation_diffusion_def"] = {
        **bundle["diffusion_unet_def"],
        "_target_": "scripts.adagn_unet.DiffusionModelUNetMaisiAdaGN",  # the bundle's own class: never built
        "adagn_condition_dim": 19,
    }
    rflow = {"_target_": "monai.networks.schedulers.rectified_flow.RFlowScheduler", "num_train_timesteps": 1000}
    rflow.update(use_discrete_timesteps=False, use_timestep_transform=True, sample_method="uniform")
    network["noise_scheduler"] = {**rflow, "scale": 1.4}
    network["mask_generation_noise_scheduler"] = {**rflow, "scale": 1.0}
    infer = {
        "num_output_samples": 1, "body_region": ["chest"], "anatomy_list": ["lung tumor"],
        "num_inference_steps": 30, "output_size": [side, side, side], "spacing": [1.5, 1.5, 2.0],
        "controlnet": "$@controlnet_def", "diffusion_unet": "$@diffusion_unet_def", "autoencoder": "$@autoencoder_def",
        "modality": 1, "cfg_guidance_scale": 0.0,
    }  # fmt: skip
    environment = {
        "output_dir": "output",
        "trained_autoencoder_path": f"models/{NV_WEIGHT_FILES['autoencoder']}",
        "trained_diffusion_path": f"models/{NV_WEIGHT_FILES['unet']}",
        "trained_controlnet_path": f"models/{NV_WEIGHT_FILES['controlnet']}",
        "trained_mask_generation_diffusion_path": "models/mask_generation_diffusion_unet_v2.pt",
        "label_dict_json": "./configs/label_dict.json",
    }
    return {"config_network_rflow.json": network, "config_infer.json": infer, "environment_rflow-ct.json": environment}


def write_nv_generate_folder(folder: str | Path, *, seed: int = 0, side: int = 16) -> Path:
    """Write an NV-Generate-CTMR folder (MAISI-v2 ``rflow-ct``) with random weights in its checkpoint layout."""
    folder = Path(folder)
    for sub in ("configs", "models", "scripts"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for script in ("__init__.py", "adagn_unet.py", "inference.py"):
        (folder / "scripts" / script).write_text(_SCRIPT)
    configs = nv_generate_configs(side)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _write_weights(folder, NV_WEIGHT_FILES, configs["config_network_rflow.json"])
    for name, data in configs.items():
        (folder / "configs" / name).write_text(json.dumps(data, indent=4) + "\n")
    (folder / "configs" / "label_dict.json").write_text(json.dumps(LABELS, indent=4) + "\n")
    return folder


NV_MR_WEIGHT_FILES = {"autoencoder": "autoencoder_v2.pt", "unet": "diff_unet_3d_rflow-mr.pt"}


def nv_generate_mr_configs(side: int = 16, modality: int = 9, guidance: float = 15.0) -> dict[str, dict[str, Any]]:
    """NV-Generate-CTMR's ``rflow-mr`` files (``config_maisi_diff_model_rflow-mr.json``, its environment file)
    and the rflow network file they share with ``rflow-ct``, tiny, by file name."""
    network = nv_generate_configs(side)["config_network_rflow.json"]
    inference = {
        "diffusion_unet_train": {"batch_size": 1, "cache_rate": 0, "lr": 0.0001, "n_epochs": 1000},
        "diffusion_unet_inference": {
            "dim": [side, side, side], "spacing": [1.25, 1.0, 1.0], "top_region_index": [0, 1, 0, 0],
            "bottom_region_index": [0, 0, 1, 0], "random_seed": 0, "num_inference_steps": 30,
            "modality": modality, "cfg_guidance_scale": guidance,
        },
    }  # fmt: skip
    environment = {
        "data_base_dir": "./data", "embedding_base_dir": "./embeddings", "json_data_list": "./dataset.json",
        "model_dir": "./models", "model_filename": NV_MR_WEIGHT_FILES["unet"], "output_dir": "./output",
        "output_prefix": "unet_3d", "trained_autoencoder_path": f"models/{NV_MR_WEIGHT_FILES['autoencoder']}",
        "existing_ckpt_filepath": None,
    }  # fmt: skip
    return {
        "config_network_rflow.json": network,
        "config_maisi_diff_model_rflow-mr.json": inference,
        "environment_maisi_diff_model_rflow-mr.json": environment,
    }


def write_nv_generate_mr_folder(folder: str | Path, *, seed: int = 0, side: int = 16, **settings: Any) -> Path:
    """Write an NV-Generate-CTMR folder holding its ``rflow-mr`` model (MR from noise, no ControlNet) with random
    weights: the UNet's as ``{"unet_state_dict", "scale_factor"}``, the autoencoder's wrapped the same way (their
    loader takes it bare or so). ``settings``: ``modality``, ``guidance`` of its inference file."""
    folder = Path(folder)
    for sub in ("configs", "models", "scripts"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for script in ("__init__.py", "diff_model_infer.py"):
        (folder / "scripts" / script).write_text(_SCRIPT)
    configs = nv_generate_mr_configs(side, **settings)
    network = configs["config_network_rflow.json"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = _random_network("unet", network["diffusion_unet_def"], network)
        ae = _random_network("autoencoder", network["autoencoder_def"], network)
    models = folder / "models"
    torch.save(
        {"unet_state_dict": unet.state_dict(), "scale_factor": torch.tensor(SCALE_FACTOR)},
        models / NV_MR_WEIGHT_FILES["unet"],
    )
    torch.save({"unet_state_dict": ae.state_dict()}, models / NV_MR_WEIGHT_FILES["autoencoder"])
    for name, data in configs.items():
        (folder / "configs" / name).write_text(json.dumps(data, indent=4) + "\n")
    return folder


__all__ = [
    "LABELS",
    "SCALE_FACTOR",
    "SCRIPT_MARKER",
    "maisi_inference",
    "write_maisi_bundle",
    "write_nv_generate_folder",
    "write_nv_generate_mr_folder",
]
