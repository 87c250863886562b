"""NVIDIA's NV-Generate-CTMR (MAISI-v2) folders: CT from a label map (``rflow-ct``, ``ddpm-ct``) and MR from
noise (``rflow-mr``, ``rflow-mr-brain``).

Not a Zoo bundle. CT: the networks and schedulers are in ``configs/config_network_{rflow,ddpm}.json``, the weight
files in ``configs/environment_{rflow,ddpm}-ct.json`` (plain paths), the inference settings (``output_size``,
``spacing``, ``num_inference_steps``, ``modality``) in ``configs/config_infer.json``. MR: the rflow network file,
``configs/environment_maisi_diff_model_<v>.json`` (``model_dir`` + ``model_filename``, the autoencoder's path)
and ``configs/config_maisi_diff_model_<v>.json`` (``diffusion_unet_inference``: ``dim``, ``spacing``,
``modality``, ``cfg_guidance_scale``), as their ``scripts/diff_model_infer.py`` reads them. The three files are
read as data into one config and translated as a MAISI bundle is (`maisi_bundle`): the image networks by class
(the mask generator's ``scripts.adagn_unet`` UNet is neither built nor imported), labels from
``configs/label_dict.json`` (CT). The variant is meddiff.json's ``"variant"``, else the first in `VARIANTS`
whose diffusion weights are present.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from napari_meddiff.errors import MeddiffError
from napari_meddiff.models.boundary import inside_folder
from napari_meddiff.models.bundle import BundleFormat, read_large_files, read_sidecar, weight_path
from napari_meddiff.models.bundle_config import BundleConfig, bundle_file, load_data_file

VARIANTS = ("rflow", "ddpm", "rflow-mr", "rflow-mr-brain")  # CT first (from a label map), then MR (from noise)
MR_VARIANTS = ("rflow-mr", "rflow-mr-brain")
NAMES = {"rflow": "rflow-ct", "ddpm": "ddpm-ct"}  # NVIDIA's names of the CT variants
INFER_CONFIG = "configs/config_infer.json"
MR_INFERENCE_KEYS = {  # diffusion_unet_inference (configs/config_maisi_diff_model_<v>.json) -> the CT names
    "dim": "output_size",
    "spacing": "spacing",
    "num_inference_steps": "num_inference_steps",
    "modality": "modality",
    "cfg_guidance_scale": "cfg_guidance_scale",
}


def _variant_files(folder: Path, variant: str) -> tuple[str, str, str]:
    """(network, inference, environment) configs of ``variant``."""
    if variant in MR_VARIANTS:
        return (
            "configs/config_network_rflow.json",
            f"configs/config_maisi_diff_model_{variant}.json",
            f"configs/environment_maisi_diff_model_{variant}.json",
        )
    return f"configs/config_network_{variant}.json", INFER_CONFIG, f"configs/environment_{variant}-ct.json"


def _diffusion_weights(env: Any) -> str | None:
    """The diffusion checkpoint an environment file names: CT's ``trained_diffusion_path``, MR's ``model_dir`` +
    ``model_filename``."""
    if not isinstance(env, dict):
        return None
    if isinstance(env.get("trained_diffusion_path"), str):
        return str(env["trained_diffusion_path"]).removeprefix("./")
    if isinstance(env.get("model_dir"), str) and isinstance(env.get("model_filename"), str):
        return f"{str(env['model_dir']).removeprefix('./').rstrip('/')}/{env['model_filename']}"
    return None


def find_variant(folder: Path) -> str | None:
    """The variant to read: meddiff.json's ``variant``, else the first with its files and its diffusion weights,
    else the first with its files."""
    chosen = read_sidecar(folder).get("variant")
    if chosen is not None:
        names = {NAMES.get(v, v): v for v in VARIANTS}  # NVIDIA's names (rflow-ct), and rflow / ddpm for CT
        if chosen not in names and chosen not in VARIANTS:
            raise MeddiffError(f"{folder}: meddiff.json variant {chosen!r} is not one of {', '.join(names)}")
        return names.get(chosen, chosen)
    present = [v for v in VARIANTS if all((folder / rel).is_file() for rel in _variant_files(folder, v))]
    for variant in present:
        weights = _diffusion_weights(load_data_file(bundle_file(folder, _variant_files(folder, variant)[2])))
        if weights is not None and (folder / weights).is_file():
            return variant
    return present[0] if present else None


def read_nv_config(folder: Path, variant: str) -> BundleConfig:
    """The network, inference and environment configs of ``variant`` as one config, read as data (an MR
    variant's ``diffusion_unet_inference`` under the CT configs' names, its weights as ``trained_*_path``)."""
    network, inference, environment = _variant_files(folder, variant)
    data: dict[str, Any] = {}
    for rel in (network, inference, environment):
        if (folder / rel).is_file():
            part = load_data_file(bundle_file(folder, rel))
            if not isinstance(part, dict):
                raise MeddiffError(f"{folder / rel}: must hold a JSON object")
            data.update(part)
    if variant in MR_VARIANTS:
        settings = data.get("diffusion_unet_inference")
        if not isinstance(settings, dict):
            raise MeddiffError(f"{folder / inference}: no diffusion_unet_inference object")
        data.update({ours: settings[theirs] for theirs, ours in MR_INFERENCE_KEYS.items() if theirs in settings})
        data["trained_diffusion_path"] = _diffusion_weights(data)
        data.pop("controlnet_def", None)  # the network file serves the CT model too: the MR UNet takes no map
    return BundleConfig(data, folder / network)


class NVGenerateFormat(BundleFormat):
    """An NV-Generate-CTMR folder (MAISI-v2 CT): read as a MAISI bundle, loaded as one."""

    name = "nv-generate-ctmr"

    def detect(self, folder: Path) -> bool:
        return any(all((folder / rel).is_file() for rel in _variant_files(folder, v)) for v in VARIANTS)

    def translate(self, folder: Path) -> dict[str, Any]:
        from napari_meddiff.models import maisi_bundle

        variant = find_variant(folder)
        if variant is None:
            raise MeddiffError(
                f"{folder}: no configs/config_network_<rflow|ddpm>.json with its environment file (CT), nor "
                "configs/config_maisi_diff_model_rflow-mr[-brain].json with its environment file (MR)"
            )
        cfg = read_nv_config(folder, variant)
        components = cfg.components()
        if not maisi_bundle.is_maisi(components):
            raise MeddiffError(f"{cfg.path}: no DiffusionModelUNetMaisi found (the diffusion network)")
        sidecar = read_sidecar(folder)
        metadata = {"name": f"NV-Generate-CTMR {NAMES.get(variant, variant)}"}
        sources = {"metadata": metadata, "sidecar": sidecar, "md5": read_large_files(folder, {})}
        config = maisi_bundle.translate_maisi(folder, cfg, components, sources)
        config["format"] = self.name
        for role, entry in config["weights"].items():
            weight_path(folder, role, entry["file"])
        return config

    def config_file(self, folder: Path) -> Path:
        variant = find_variant(folder) or VARIANTS[0]
        return inside_folder(folder, _variant_files(folder, variant)[0], str(folder))


FORMAT = NVGenerateFormat()
