"""Issue #36 item 5: a model folder is a boundary. Every file a model reads (weights, configs, large_files.yml,
meddiff.json) must resolve, symlinks followed, inside its folder; a name that leads out is a one-line error
naming the entry, found when the config is read (``meddiff models``) and again when the file is read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from napari_meddiff import MeddiffError
from napari_meddiff.models import load_model, read_config
from napari_meddiff.testing.bundle_fixtures import write_bundle
from napari_meddiff.testing.tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("boundary")
    folder = make_tiny_model(root / "tiny-ddpm-2d", "ddpm", 2)
    bundle = write_bundle(root / "mednist_ddpm", "mednist")
    outside = root / "outside"
    outside.mkdir()
    shutil.copyfile(folder / "unet.safetensors", outside / "x.safetensors")  # sha256 as model.json gives it
    shutil.copyfile(bundle / "models" / "model.pt", outside / "x.pt")  # md5 as large_files.yml gives it
    return {"folder": folder, "bundle": bundle, "outside": outside}


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, symlinks=True)
    return dest


def _set_weight_file(folder: Path, name: str) -> None:
    config = json.loads((folder / "model.json").read_text())
    config["weights"]["unet"]["file"] = name
    (folder / "model.json").write_text(json.dumps(config))


@pytest.mark.parametrize("kind", ["dotdot", "absolute"])
def test_model_json_weight_outside_the_folder_is_refused(sources, tmp_path, kind):
    model = _copy(sources["folder"], tmp_path / "m")
    name = "../../outside/x.safetensors" if kind == "dotdot" else str(sources["outside"] / "x.safetensors")
    (tmp_path / "outside").symlink_to(sources["outside"])  # so that ../.. from the copy leads to the file too
    _set_weight_file(model, name)
    pattern = rf"model.json: weights.unet.file '{name}' resolves to .*outside the model folder"
    with pytest.raises(MeddiffError, match=pattern):
        read_config(model)  # where the data enters: `meddiff models` reports it
    with pytest.raises(MeddiffError, match=pattern):
        load_model(model)


def test_weight_symlinked_out_of_the_folder_is_refused(sources, tmp_path):
    model = _copy(sources["folder"], tmp_path / "m")
    (model / "unet.safetensors").unlink()
    (model / "unet.safetensors").symlink_to(sources["outside"] / "x.safetensors")
    with pytest.raises(MeddiffError, match=r"weights.unet.file 'unet.safetensors' resolves to .*x.safetensors"):
        load_model(model)


def test_model_json_symlinked_out_of_the_folder_is_refused(sources, tmp_path):
    model = _copy(sources["folder"], tmp_path / "m")
    shutil.copyfile(model / "model.json", sources["outside"] / "model.json")
    (model / "model.json").unlink()
    (model / "model.json").symlink_to(sources["outside"] / "model.json")
    with pytest.raises(MeddiffError, match=r"model.json resolves to .*outside the model folder"):
        read_config(model)


def test_links_inside_the_folder_and_a_linked_folder_still_load(sources, tmp_path):
    model = _copy(sources["folder"], tmp_path / "m")
    (model / "unet.safetensors").rename(model / "real.safetensors")
    (model / "unet.safetensors").symlink_to("real.safetensors")  # a link that stays inside
    (tmp_path / "link").symlink_to(model)  # the folder itself reached through a link
    assert load_model(tmp_path / "link").unet is not None


def test_large_files_entry_outside_the_bundle_is_refused(sources, tmp_path):
    bundle = _copy(sources["bundle"], tmp_path / "b")
    md5 = next(line for line in (bundle / "large_files.yml").read_text().splitlines() if "hash_val" in line)
    (bundle / "models" / "model.pt").unlink()
    outside = sources["outside"] / "x.pt"
    (bundle / "large_files.yml").write_text(f'large_files:\n  - path: "{outside}"\n{md5}\n    hash_type: md5\n')
    with pytest.raises(MeddiffError, match=rf"large_files.yml: path '{outside}' resolves to .*outside"):
        read_config(bundle)


def test_meddiff_json_weight_outside_the_bundle_is_refused(sources, tmp_path):
    bundle = _copy(sources["bundle"], tmp_path / "b")
    (tmp_path / "outside").symlink_to(sources["outside"])
    (bundle / "meddiff.json").write_text(json.dumps({"weights": {"unet": "../outside/x.pt"}}))
    with pytest.raises(MeddiffError, match=r"meddiff.json: weights.unet '../outside/x.pt' resolves to .*outside"):
        read_config(bundle)


@pytest.mark.parametrize("rel", ["models/model.pt", "configs/metadata.json", "large_files.yml"])
def test_bundle_file_symlinked_out_of_the_bundle_is_refused(sources, tmp_path, rel):
    bundle = _copy(sources["bundle"], tmp_path / "b")
    target = sources["outside"] / f"linked-{Path(rel).name}"
    shutil.copyfile(bundle / rel, target)
    (bundle / rel).unlink()
    (bundle / rel).symlink_to(target)
    with pytest.raises(MeddiffError, match=r"resolves to .*outside the model folder"):
        load_model(bundle)
