"""Loading weights: networks built without random initialisation hold exactly the file's tensors; weights that
do not fit the network are refused."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from napari_meddiff import MeddiffError
from napari_meddiff.models import load_model
from napari_meddiff.testing.bundle_fixtures import write_bundle


def test_loaded_networks_hold_exactly_the_files_tensors(tmp_path, tiny_models):
    bundle = write_bundle(tmp_path / "b", "brain_ldm", seed=3, old_keys=False)
    model = load_model(bundle)
    for net, name in ((model.unet, "model.pt"), (model.autoencoder, "autoencoder.pt")):
        saved = torch.load(bundle / "models" / name, weights_only=True)
        state = net.state_dict()
        assert state.keys() == saved.keys()
        assert all(torch.equal(state[k], saved[k]) for k in saved)
        assert not any(t.is_meta for t in state.values())
    folder = tiny_models["ldm3d"]
    model = load_model(folder)
    config = json.loads((folder / "model.json").read_text())
    saved = load_file(str(folder / config["weights"]["unet"]["file"]))
    state = model.unet.state_dict()
    assert all(torch.equal(state[k], saved[k].float()) for k in saved) and state.keys() == saved.keys()


def test_weights_missing_a_parameter_are_refused(tmp_path):
    bundle = write_bundle(tmp_path / "b", "mednist", seed=1, old_keys=False)
    (bundle / "large_files.yml").unlink()
    state = torch.load(bundle / "models" / "model.pt", weights_only=True)
    state.pop(next(k for k in state if k.endswith("conv_in.conv.weight")))
    torch.save(state, bundle / "models" / "model.pt")
    with pytest.raises(MeddiffError, match="does not fit"):
        load_model(bundle)
