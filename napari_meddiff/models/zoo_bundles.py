"""What the MONAI Model Zoo generative bundles do not say in their configs, documented per bundle.

Each value here was read from the bundle's own files in Project-MONAI/model-zoo (``configs/inference.json``,
``metadata.json``, ``large_files.yml``, ``scripts/``, the training configs): the latent shape their inference
``noise`` expression draws, the spacing their training transforms resample to, the weight files and their md5.
A user overrides any of it in ``<bundle>/meddiff.json`` (see `napari_meddiff.models.bundle`). A bundle not listed
here still loads: what cannot be derived is then reported as unknown by ``meddiff models``.
"""

from __future__ import annotations

from typing import Any

ZOO_BUNDLES: dict[str, dict[str, Any]] = {
    "brain_image_synthesis_latent_diffusion_model": {
        # Pinaya et al. 2022, UK Biobank T1w; the noise expression draws (1, 3, 20, 28, 20)
        "latent_shape": [3, 20, 28, 20],
        "voxel_size": [1.0, 1.0, 1.0],  # metadata.json: "T1w head MRI with 1x1x1 mm voxel size"
        "orientation": "RAS",  # not recorded: its SaveImage writes an identity affine
        "weights": {"autoencoder": "models/autoencoder.pt", "unet": "models/model.pt"},
        "large_files": {
            "models/autoencoder.pt": "329e97b3085643ff235f11f049856242",
            "models/model.pt": "21c3047556fb671caf0556f1cce6ef22",
        },
        # inference.json's literals gender 0.0, age 0.1, ventricular_vol 0.2, brain_vol 0.4
        "condition_defaults": {"gender": 0.0, "age": 0.1, "ventricular_volume": 0.2, "brain_volume": 0.4},
    },
    "brats_mri_generative_diffusion": {
        "latent_shape": [8, 36, 44, 28],
        "voxel_size": [1.1, 1.1, 1.1],  # train_autoencoder.json: Orientationd RAS, Spacingd 1.1 mm
        "orientation": "RAS",
        "weights": {"autoencoder": "models/model_autoencoder.pt", "unet": "models/model.pt"},
        "large_files": {
            "models/model_autoencoder.pt": "9e6df4cc9a2decf49ab3332606b32c55",
            "models/model.pt": "35258b1112f701f3d485676d33141a55",
        },
    },
    "brats_mri_axial_slices_generative_diffusion": {
        "latent_shape": [1, 64, 64],
        "voxel_size": [1.1, 1.1],  # axial slices of the same 1.1 mm RAS BraTS volumes
        "orientation": "RAS",
        "weights": {"autoencoder": "models/model_autoencoder.pt", "unet": "models/model.pt"},
        "large_files": {
            "models/model_autoencoder.pt": "847a61ad13a68ebfca9c0a8fa6d0d6bd",
            "models/model.pt": "93a19ea3eaafd9781b4140286b121f37",
        },
    },
    "mednist_ddpm": {
        # MedNIST hand X-rays, 64x64; MedNIST has no physical spacing (voxel size left unknown)
        "image_shape": [64, 64],
        "weights": {"unet": "models/model.pt"},
        "large_files": {"models/model.pt": "02fd8c8e8ed5f7cda5deeed72b69f4f1"},
    },
}


def bundle_defaults(name: str) -> dict[str, Any]:
    return ZOO_BUNDLES.get(name, {})
