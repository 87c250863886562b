"""Shared fixtures: small randomly initialised model folders (real MONAI networks that really sample)."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def digest_cache(tmp_path_factory):
    """Weight digests are remembered in a folder of this run, not the user's ~/.cache (subprocesses inherit it)."""
    from napari_meddiff.models.digests import CACHE_ENV

    saved = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("cache"))
    yield os.environ[CACHE_ENV]
    if saved is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = saved


@pytest.fixture(autouse=True)
def torch_threads_restored():
    """Each test starts with the thread count the run started with: a training test left torch at one thread for
    every later test, which hid what the thread-count tests check."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """A folder holding tiny ldm-3d, ddpm-3d, ddpm-2d and segmentation-2d model folders."""
    from napari_meddiff.testing.tiny_models import make_tiny_model

    root = tmp_path_factory.mktemp("models")
    paths = {
        "ldm3d": make_tiny_model(root / "tiny-ldm-3d", "ldm", 3),
        "ddpm3d": make_tiny_model(root / "tiny-ddpm-3d", "ddpm", 3),
        "ddpm2d": make_tiny_model(root / "tiny-ddpm-2d", "ddpm", 2),
        "seg2d": make_tiny_model(root / "tiny-seg-2d", "segmentation", 2),
    }
    return paths


@pytest.fixture
def models_env(tiny_models, monkeypatch):
    """MEDDIFF_MODELS pointing at the tiny models, so they load by name."""
    root = next(iter(tiny_models.values())).parent
    monkeypatch.setenv("MEDDIFF_MODELS", str(root))
    return root


@pytest.fixture
def cli_env(models_env):
    """The environment for a `meddiff` subprocess (`helpers.run_cli`) that finds the tiny models by name."""
    return {**os.environ, "MEDDIFF_MODELS": str(models_env)}


@pytest.fixture(scope="module")
def cond_model(tmp_path_factory):
    """`helpers.conditional_model`, loaded: context and concatenated conditions, age and lesion load."""
    from napari_meddiff.models import load_model
    from tests.helpers import conditional_model

    return load_model(conditional_model(tmp_path_factory.mktemp("cond") / "tiny-cond-2d"))
