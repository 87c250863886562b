"""NVIDIA's NV-Generate-CTMR (MAISI-v2) folders, CT from a label map: the ``rflow-ct`` and ``ddpm-ct`` variants.

Not a Zoo bundle: the networks and schedulers are in ``configs/config_network_{rflow,ddpm}.json``, the weight
files in ``configs/environment_{rflow,ddpm}-ct.json`` (plain paths), the inference settings (``output_size``,
``spacing``, ``num_inference_steps``, ``modality``) in ``configs/config_infer.json``. The three are read as data
into one config and translated as a MAISI bundle is (`maisi_bundle`): the image networks by class (the mask
generator's ``scripts.adagn_unet`` UNet is neither built nor imported), labels from ``configs/label_dict.json``.
The variant is the first whose diffusion weights are present (``rflow-ct`` first). MAISI-v2's MR models
(``rflow-mr``: no ControlNet, generated without a map) are not read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from napari_meddiff.errors import MeddiffError
from napari_meddiff.models.boundary import inside_folder
from napari_meddiff.models.bundle import BundleFormat, read_large_files, read_sidecar, weight_path
from napari_meddiff.models.bundle_config import BundleConfig, bundle_file, load_data_file

VARIANTS = ("rflow", "ddpm")  # configs/config_network_<v>.json with configs/environment_<v>-ct.json
INFER_CONFIG = "configs/config_infer.json"


def _variant_files(folder: Path, variant: str) -> tuple[str, str]:
    return f"configs/config_network_{variant}.json", f"configs/environment_{variant}-ct.json"


def find_variant(folder: Path) -> str | None:
    """The CT variant to read: the first with both files and its diffusion weights, else the first with files."""
    present = [v for v in VARIANTS if all((folder / rel).is_file() for rel in _variant_files(folder, v))]
    for variant in present:
        env = load_data_file(bundle_file(folder, _variant_files(folder, variant)[1]))
        weights = env.get("trained_diffusion_path") if isinstance(env, dict) else None
        if isinstance(weights, str) and (folder / weights).is_file():
            return variant
    return present[0] if present else None


def read_nv_config(folder: Path, variant: str) -> BundleConfig:
    """The network, inference and environment configs of ``variant`` as one config, read as data."""
    network, environment = _variant_files(folder, variant)
    data: dict[str, Any] = {}
    for rel in (network, INFER_CONFIG, environment):
        if (folder / rel).is_file():
            part = load_data_file(bundle_file(folder, rel))
            if not isinstance(part, dict):
                raise MeddiffError(f"{folder / rel}: must hold a JSON object")
            data.update(part)
    return BundleConfig(data, folder / network)


class NVGenerateFormat(BundleFormat):
    """An NV-Generate-CTMR folder (MAISI-v2 CT): read as a MAISI bundle, loaded as one."""

    name = "nv-generate-ctmr"

    def detect(self, folder: Path) -> bool:
        return (folder / INFER_CONFIG).is_file() and find_variant(folder) is not None

    def translate(self, folder: Path) -> dict[str, Any]:
        from napari_meddiff.models import maisi_bundle

        variant = find_variant(folder)
        if variant is None:
            raise MeddiffError(f"{folder}: no configs/config_network_<rflow|ddpm>.json with its environment file")
        cfg = read_nv_config(folder, variant)
        components = cfg.components()
        if not maisi_bundle.is_maisi(components):
            raise MeddiffError(f"{cfg.path}: no DiffusionModelUNetMaisi found (the diffusion network)")
        sidecar = read_sidecar(folder)
        metadata = {"name": f"NV-Generate-CTMR {variant}-ct"}
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
