"""Autoencoder passes of latent diffusion models: whole, or tiled with bounded memory and exact results."""
