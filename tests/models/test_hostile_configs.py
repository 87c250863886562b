"""Issue #36 item 8: hostile or broken model folders give one accurate line, and never take down a listing.

Deeply nested JSON (a RecursionError), a ``_target_`` that is not a string (blamed on the wrong file), a folder
that cannot be read inside the models folder (it aborted ``meddiff models``), and a checkpoint carrying a pickled
object (torch's refusal advises re-running with ``weights_only=False``, which for a hostile file is the attack)."""

from __future__ import annotations

import json
import pathlib
import shutil

import pytest
import torch

from napari_meddiff import MeddiffError
from napari_meddiff.cli import main
from napari_meddiff.models import broken_models, load_model, read_config
from napari_meddiff.testing.bundle_fixtures import write_bundle
from napari_meddiff.testing.tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    return {
        "folder": make_tiny_model(root / "tiny-ddpm-2d", "ddpm", 2),
        "bundle": write_bundle(root / "mednist_ddpm", "mednist"),
    }


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("depth", [100_000, 500])
def test_deeply_nested_model_json_is_one_line(sources, tmp_path, depth):
    model = shutil.copytree(sources["folder"], tmp_path / "deep")
    config = json.loads((model / "model.json").read_text())
    (model / "model.json").write_text(json.dumps(config).replace('"kind":', f'"x": {_nested(depth)}, "kind":', 1))
    with pytest.raises(MeddiffError, match=r"model.json: nested (too deeply|more than 100 levels deep)"):
        read_config(model)


def test_deeply_nested_bundle_metadata_is_one_line(sources, tmp_path):
    bundle = shutil.copytree(sources["bundle"], tmp_path / "b")
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    metadata["x"] = json.loads(_nested(500))
    (bundle / "configs" / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(MeddiffError, match=r"metadata.json: nested more than 100 levels deep"):
        read_config(bundle)


def _edit_inference(bundle, edit):
    import yaml

    path = bundle / "configs" / "inference.yaml"
    config = yaml.safe_load(path.read_text())
    edit(config)
    path.write_text(yaml.safe_dump(config))


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (lambda c: c.update(helper={"_target_": ["x"]}) or c["network_def"].update(channels="@helper"), "helper"),
        (lambda c: c["network_def"].update(_target_=["monai.networks.nets.DiffusionModelUNet"]), "network_def"),
        (lambda c: c["scheduler"].update(_target_=["monai.networks.schedulers.DDPMScheduler"]), "scheduler"),
    ],
)
def test_a_target_that_is_not_a_string_names_the_config(sources, tmp_path, edit, key):
    bundle = shutil.copytree(sources["bundle"], tmp_path / "b")
    _edit_inference(bundle, edit)
    with pytest.raises(MeddiffError, match=rf"configs/inference.yaml: {key}#_target_ must be a class name"):
        read_config(bundle)


def test_an_unreadable_or_broken_folder_does_not_abort_the_listing(sources, tmp_path, monkeypatch, capsys):
    root = tmp_path / "models"
    shutil.copytree(sources["folder"], root / "good")
    shutil.copytree(sources["folder"], root / "private")
    deep = shutil.copytree(sources["folder"], root / "deep")
    (deep / "model.json").write_text(_nested(100_000))
    is_file = pathlib.Path.is_file

    def unreadable(path):  # as stat() fails in a folder without search permission (root ignores chmod)
        if path.parent.name == "private" or path.parent.parent.name == "private":
            raise PermissionError(13, "Permission denied", str(path))
        return is_file(path)

    monkeypatch.setattr(pathlib.Path, "is_file", unreadable)
    monkeypatch.setenv("MEDDIFF_MODELS", str(root))
    assert main(["models"]) == 0
    out, err = capsys.readouterr()
    assert any(line.startswith("good ") for line in out.splitlines()), out
    assert "private: not listed, it cannot be read" in err and "Permission denied" in err, err
    assert "deep: not listed, it cannot be read" in err and "nested too deeply" in err, err
    assert {b.path.name for b in broken_models()} == {"private", "deep"}


@pytest.mark.parametrize("legacy", [False, True])
def test_a_pickled_object_is_refused_without_torchs_advice(sources, tmp_path, legacy):
    bundle = shutil.copytree(sources["bundle"], tmp_path / "b")
    state = torch.load(bundle / "models" / "model.pt", weights_only=True)
    payload = {"state_dict": state, "extra": pathlib.Path("/etc/passwd")}
    torch.save(payload, bundle / "models" / "model.pt", _use_new_zipfile_serialization=not legacy)
    (bundle / "large_files.yml").unlink()
    with pytest.raises(MeddiffError) as refused:
        load_model(bundle)
    message = str(refused.value)
    assert "holds something other than tensors" in message and "will not be loaded" in message, message
    assert "pathlib.PosixPath" in message, message
    for advice in ("weights_only", "add_safe_globals", "safe_globals", "trust", "Re-running"):
        assert advice not in message, message
