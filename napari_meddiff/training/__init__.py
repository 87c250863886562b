"""Training: autoencoder (KL + adversarial), pixel DDPM, latent diffusion and image-conditioned
segmentation diffusion, all ending in a model folder that `napari_meddiff.models.load_model` loads.

Entry point: `napari_meddiff.training.pipeline.train` (``meddiff train CONFIG.yaml``).
"""
