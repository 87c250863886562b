"""Our model folder with a ControlNet (``networks.controlnet`` and its sha256-checked safetensors) and with a
rectified-flow scheduler block: saved, loaded, and every inconsistency refused in one line naming the file."""

from __future__ import annotations

import copy
import json
import re
import shutil

import pytest
import torch

from napari_meddiff.errors import MeddiffError
from napari_meddiff.models import load_model
from napari_meddiff.models.networks import SpaceToDepthControlNet
from napari_meddiff.models.schema import validate_config
from napari_meddiff.testing.tiny_models import make_tiny_model

LABELS = {0: "background", 1: "CSF", 2: "GM", 3: "WM"}


@pytest.fixture(scope="module")
def controlnet_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("controlnet")
    return make_tiny_model(root / "tiny-cn-3d", "ddpm", 3, label_map=LABELS, controlnet=True)


def test_the_controlnet_is_saved_checked_and_loaded(controlnet_folder, tmp_path):
    from safetensors.torch import load_file

    config = json.loads((controlnet_folder / "model.json").read_text())
    entry = config["weights"]["controlnet"]
    assert entry["file"] == "controlnet.safetensors" and len(entry["sha256"]) == 64
    model = load_model(controlnet_folder)
    assert isinstance(model.controlnet, SpaceToDepthControlNet)
    saved = load_file(str(controlnet_folder / "controlnet.safetensors"))
    assert all(torch.equal(v, saved[k]) for k, v in model.controlnet.state_dict().items())
    broken = shutil.copytree(controlnet_folder, tmp_path / "broken")
    data = bytearray((broken / "controlnet.safetensors").read_bytes())
    data[-1] ^= 1
    (broken / "controlnet.safetensors").write_bytes(bytes(data))
    with pytest.raises(MeddiffError, match="controlnet.safetensors is corrupt or was changed"):
        load_model(broken)


def _edited(config: dict, edit) -> dict:
    config = copy.deepcopy(config)
    edit(config)
    return config


CONTROLNET_BREAKAGES = {
    "no weights entry": (lambda c: c["weights"].pop("controlnet"), "no weights entry for 'controlnet'"),
    "other levels": (
        lambda c: c["networks"]["controlnet"].update(channels=[8, 16, 16]),
        "controlnet's channels and num_res_blocks must be the UNet's",
    ),
    "other input": (lambda c: c["networks"]["controlnet"].update(in_channels=2), "controlnet.in_channels (2)"),
    "other grid": (
        lambda c: c["networks"]["controlnet"].update(conditioning_embedding_num_channels=[8]),
        "conditioning_embedding_num_channels must have log2(2) + 1 entries",
    ),
}


@pytest.mark.parametrize("name", CONTROLNET_BREAKAGES)
def test_a_controlnet_that_does_not_fit_is_refused(controlnet_folder, name):
    edit, message = CONTROLNET_BREAKAGES[name]
    config = json.loads((controlnet_folder / "model.json").read_text())
    validate_config(config, "m/model.json")
    with pytest.raises(MeddiffError, match=r"^m/model\.json\b.*" + re.escape(message)):
        validate_config(_edited(config, edit), "m/model.json")


RFLOW = {"type": "rflow", "num_train_timesteps": 1000, "use_timestep_transform": True, "base_img_size_numel": 512}
SCHEDULE_BREAKAGES = [
    ({**RFLOW, "beta_start": 0.001, "beta_end": 0.02}, "beta_end, beta_start do not apply to a rectified flow"),
    ({**RFLOW, "prediction_type": "epsilon"}, "prediction_type does not apply to a rectified flow"),
    ({"num_train_timesteps": 1000, "use_timestep_transform": True}, "use_timestep_transform does not apply to a DDPM"),
    ({**RFLOW, "sample_method": "gaussian"}, "scheduler.sample_method must be uniform or logit-normal"),
    ({**RFLOW, "base_img_size_numel": 0}, "scheduler.base_img_size_numel must be a positive integer"),
    ({**RFLOW, "type": "flow"}, "scheduler.type must be ddpm or rflow"),
]


@pytest.mark.parametrize("schedule,message", SCHEDULE_BREAKAGES)
def test_scheduler_blocks_are_checked(controlnet_folder, schedule, message):
    config = json.loads((controlnet_folder / "model.json").read_text())
    validate_config(_edited(config, lambda c: c.update(scheduler=RFLOW)), "m/model.json")
    with pytest.raises(MeddiffError, match=re.escape(message)):
        validate_config(_edited(config, lambda c: c.update(scheduler=schedule)), "m/model.json")
