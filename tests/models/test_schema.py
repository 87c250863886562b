"""Malformed model.json contents give one `meddiff: error: <folder>/model.json: ...` line in every command,
and one broken folder in $MEDDIFF_MODELS does not hide the others from `meddiff models` (issue 13)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from napari_meddiff.cli import main
from napari_meddiff.io.volume import Volume, write_volume


def _broken_copy(src, dst, edit):
    shutil.copytree(src, dst)
    config = json.loads((dst / "model.json").read_text())
    edit(config)
    (dst / "model.json").write_text(json.dumps(config))
    return dst


BREAKAGES = {
    "image_shape_string": (
        lambda c: c.update(image_shape="64x64"),
        "image_shape must be a list of 2 positive integers",
    ),
    "networks_list": (lambda c: c.update(networks=[c["networks"]["unet"]]), "networks must be an object, not list"),
    "weights_without_file": (lambda c: c["weights"]["unet"].pop("file"), "weights.unet lacks 'file'"),
    "steps_string": (
        lambda c: c["scheduler"].update(num_train_timesteps="1000"),
        "scheduler.num_train_timesteps must be a positive integer",
    ),
    "intensity_misspelt_key": (
        lambda c: c.update(intensity={"uper_value": 0.8}),
        "intensity: unknown key(s) uper_value",
    ),
    "output_clip_reversed": (
        lambda c: c.update(intensity={"output_clip": [1, 0]}),
        "intensity.output_clip must be [low, high] in the model's [0, 1] output",
    ),
    "bad_network_kwargs": (lambda c: c["networks"]["unet"].update(channels="wide"), "bad unet network config"),
    "spatial_dims_string": (
        lambda c: (
            c.clear()
            or c.update(
                kind="ddpm", spatial_dims="2", image_shape=[1], voxel_size=[1], networks={}, scheduler={}, weights={}
            )
        ),
        "spatial_dims must be 2 or 3",
    ),
}


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    image = Volume.from_spacing(rng.random((24, 24, 3)).astype(np.float32) * 100, (3.0, 3.0, 3.0))
    mask = np.zeros(image.array.shape, np.uint8)
    mask[8:14, 8:14, 1] = 1
    write_volume(image, root / "image.nii.gz")
    write_volume(Volume(mask, image.affine), root / "mask.nii.gz")
    return root


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_malformed_model_json_is_one_line_in_every_command(tiny_models, tmp_path, image_files, capsys, breakage):
    edit, message = BREAKAGES[breakage]
    src = tiny_models["seg2d"] if breakage == "bad_network_kwargs" else tiny_models["ddpm2d"]
    broken = _broken_copy(src, tmp_path / "broken", edit)
    img, mask = str(image_files / "image.nii.gz"), str(image_files / "mask.nii.gz")
    commands = [
        ["generate", "--model", str(broken), "--out", str(tmp_path / "gen")],
        ["inpaint", "--model", str(broken), "--image", img, "--mask", mask, "--out", str(tmp_path / "inp.nii.gz")],
        ["segment", "--model", str(broken), "--image", img, "--out", str(tmp_path / "seg")],
    ]
    for argv in commands:
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc == 2, argv
        assert err.startswith(f"meddiff: error: {broken}/model.json") and message in err, (argv, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "gen").exists() and not (tmp_path / "inp.nii.gz").exists()


def test_models_lists_the_good_ones_and_names_the_broken_folder(tiny_models, tmp_path, monkeypatch, capsys):
    root = tmp_path / "models"
    for key in ("ddpm2d", "ldm3d"):
        shutil.copytree(tiny_models[key], root / tiny_models[key].name)
    _broken_copy(tiny_models["ddpm2d"], root / "aaa-broken", lambda c: c.update(image_shape="64x64"))
    (root / "zzz-unreadable").mkdir()
    (root / "zzz-unreadable" / "model.json").write_text("{not json")
    monkeypatch.setenv("MEDDIFF_MODELS", str(root))
    assert main(["models"]) == 0
    captured = capsys.readouterr()
    names = [line.split()[0] for line in captured.out.splitlines()[1:] if line and not line.startswith((" ", "NOTE"))]
    assert {"tiny-ddpm-2d", "tiny-ldm-3d"} <= set(names) and "aaa-broken" not in names
    assert f"{root / 'aaa-broken'}: not listed" in captured.err and "image_shape must be a list" in captured.err
    assert f"{root / 'zzz-unreadable'}: not listed" in captured.err and "cannot read" in captured.err
    assert "Traceback" not in captured.err
