"""Loading weights: networks built without random initialisation hold exactly the file's tensors, and weight
digests are remembered only while a file is unchanged."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file

from napari_meddiff import MeddiffError
from napari_meddiff.models import digests, load_model
from napari_meddiff.testing.bundle_fixtures import write_bundle


def _age(path, seconds: float = 60.0) -> None:
    """Give a file an old modification time (as a downloaded bundle's weights have)."""
    old = time.time() - seconds
    os.utime(path, (old, old))


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


def test_digests_remembered_until_the_file_changes(tmp_path, monkeypatch):
    monkeypatch.setenv(digests.CACHE_ENV, str(tmp_path / "cache"))
    calls = []
    real = digests.hash_file
    monkeypatch.setattr(digests, "hash_file", lambda p: calls.append(p) or real(p))
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"a" * 1000)
    _age(weights)
    first = digests.weight_digests(weights)
    assert first == real(weights) and len(calls) == 1
    assert digests.weight_digests(weights) == first and len(calls) == 1  # remembered
    stat = weights.stat()
    weights.write_bytes(b"b" * 1000)  # same size, and the old times put back: the change time still differs
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert digests.weight_digests(weights) == real(weights) != first and len(calls) == 2


def test_fresh_files_are_not_remembered_and_cache_can_be_off(tmp_path, monkeypatch):
    monkeypatch.setenv(digests.CACHE_ENV, str(tmp_path / "cache"))
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"x" * 10)
    digests.weight_digests(weights)  # written just now: a same-tick rewrite could keep its times
    assert not (tmp_path / "cache" / digests.CACHE_FILE).exists()
    monkeypatch.setenv(digests.CACHE_ENV, "none")
    _age(weights)
    assert digests.weight_digests(weights) == digests.hash_file(weights)
    assert digests.cache_dir() is None and not (tmp_path / "cache").exists()
    monkeypatch.setenv(digests.CACHE_ENV, str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / digests.CACHE_FILE).write_text("{not json")  # a broken cache is ignored and replaced
    assert digests.weight_digests(weights) == digests.hash_file(weights)
    assert str(weights.resolve()) in json.loads((tmp_path / "cache" / digests.CACHE_FILE).read_text())


def test_corrupted_bundle_refused_after_a_remembered_load(tmp_path, monkeypatch):
    monkeypatch.setenv(digests.CACHE_ENV, str(tmp_path / "cache"))
    bundle = tmp_path / "mednist_ddpm"
    write_bundle(bundle, "mednist", seed=1)
    weights = bundle / "models" / "model.pt"
    _age(weights)
    load_model(bundle)  # md5 checked and remembered
    stat = weights.stat()
    with open(weights, "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\x00" * 8)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(MeddiffError, match="md5 .* in large_files.yml; refusing"):
        load_model(bundle)
    shutil.rmtree(tmp_path / "cache")
