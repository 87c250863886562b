"""Model folders: found by name or path, verified by sha256, never unpickled."""

from __future__ import annotations

import json
import shutil

import pytest

from napari_meddiff import MeddiffError, load_model
from napari_meddiff.models import available_models


def test_load_by_name_via_env(models_env):
    names = available_models()
    assert "tiny-ldm-3d" in names and "tiny-seg-2d" in names
    model = load_model("tiny-ldm-3d")
    assert model.kind == "ldm" and model.spatial_dims == 3 and model.autoencoder is not None


def test_corrupt_weights_refused(tiny_models, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_models["ddpm2d"], broken)
    with open(broken / "unet.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(MeddiffError, match="corrupt or was changed"):
        load_model(broken)


def test_unknown_model_and_bad_config(tiny_models, tmp_path):
    with pytest.raises(MeddiffError, match="unknown model 'no-such-model'"):
        load_model("no-such-model")
    bad = tmp_path / "bad"
    shutil.copytree(tiny_models["ddpm2d"], bad)
    cfg = json.loads((bad / "model.json").read_text())
    cfg["kind"] = "gan"
    (bad / "model.json").write_text(json.dumps(cfg))
    with pytest.raises(MeddiffError, match="model kind"):
        load_model(bad)


def test_shipped_models_load():
    shipped = {n: p for n, p in available_models().items() if "models" in str(p.parent)}
    for path in shipped.values():
        model = load_model(path)
        assert model.num_parameters() > 0
        assert (path / "MODEL_CARD.md").is_file()
