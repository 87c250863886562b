"""Saving this package's model folders (`models.folder`): an existing folder is replaced only when asked and only
if it is a model folder; the files and the folder follow the umask."""

from __future__ import annotations

import stat

import pytest

from napari_meddiff.errors import MeddiffError


def test_model_folder_overwrite_replaces_only_a_model_folder(tmp_path, tiny_models):
    from napari_meddiff.models import load_model, save_model_folder

    model = load_model(tiny_models["ddpm2d"])
    config = {k: v for k, v in model.config.items() if k != "weights"}
    out = save_model_folder(tmp_path / "m", config, {"unet": model.unet}, card="# m\n")
    with pytest.raises(MeddiffError, match="exists; not overwriting"):
        save_model_folder(out, config, {"unet": model.unet}, card="# m\n")
    save_model_folder(out, config, {"unet": model.unet}, card="# second\n", overwrite=True)
    assert (out / "MODEL_CARD.md").read_text() == "# second\n"
    (out / "notes.txt").write_text("mine")
    with pytest.raises(MeddiffError, match="notes.txt"):
        save_model_folder(out, config, {"unet": model.unet}, card="# third\n", overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and (out / "MODEL_CARD.md").read_text() == "# second\n"


def test_saved_model_folder_is_readable_by_the_group(tmp_path):
    import os

    from napari_meddiff.models import build_network, save_model_folder
    from napari_meddiff.testing.tiny_models import TINY_SCHEDULE, tiny_unet_config

    unet = tiny_unet_config(2, 1, 1)
    config = {
        "name": "shared",
        "kind": "ddpm",
        "spatial_dims": 2,
        "image_shape": [16, 16],
        "voxel_size": [2.0, 2.0],
        "scheduler": TINY_SCHEDULE,
        "networks": {"unet": unet},
        "defaults": {"sampler": "ddim", "steps": 2, "precision": "fp32"},
    }
    old = os.umask(0o002)
    try:
        folder = save_model_folder(tmp_path / "shared", config, {"unet": build_network("unet", unet)}, card="# x\n")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
    assert set(modes.values()) == {0o664}, modes  # safetensors itself writes 0600
    assert stat.S_IMODE(folder.stat().st_mode) == 0o775
