"""Tiny models and MONAI bundle fixtures for tests and examples (random weights in real layouts)."""
