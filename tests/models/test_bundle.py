"""MONAI Model Zoo bundles as models: folders laid out as the Zoo ships them, random weights in MONAI
Generative's old key format, read as data (nothing evaluated, nothing imported), generated through the CLI and
the Python API, inpainted, listed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from napari_meddiff import MeddiffError
from napari_meddiff.cli import main
from napari_meddiff.models import describe_model, load_model, read_config
from napari_meddiff.tasks.generate import generate
from napari_meddiff.testing.bundle_fixtures import SCRIPT_MARKER, write_bundle

BRAIN_LDM = "brain_image_synthesis_latent_diffusion_model"


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundles")
    return {
        "brain_ldm": write_bundle(root / BRAIN_LDM, "brain_ldm"),
        "brats_3d": write_bundle(root / "brats_mri_generative_diffusion", "brats_3d"),
        "brats_2d": write_bundle(root / "brats_mri_axial_slices_generative_diffusion", "brats_2d"),
        "mednist": write_bundle(root / "mednist_ddpm", "mednist"),
    }


@pytest.fixture(scope="module")
def brain_ldm(bundles):
    return load_model(bundles["brain_ldm"])


def _params(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items()}


def test_brain_ldm_bundle_translated_from_its_files(bundles):
    config = read_config(bundles["brain_ldm"])
    assert config["format"] == "monai-bundle" and config["kind"] == "ldm"
    # the UNet and the autoencoder are found by class: its network_def points at the autoencoder
    assert config["networks"]["unet"]["in_channels"] == 7 and config["networks"]["autoencoder"]["latent_channels"] == 3
    assert config["latent"] == {"channels": 3, "shape": [8, 12, 8], "scale_factor": 1.0}
    assert config["image_shape"] == [16, 24, 16] and config["voxel_size"] == [1.0, 1.0, 1.0]
    assert config["scheduler"] == {
        "num_train_timesteps": 1000,
        "schedule": "scaled_linear_beta",
        "beta_start": 0.0015,
        "beta_end": 0.0205,
        "prediction_type": "epsilon",
        "clip_sample": False,
    }
    assert config["bundle_sampling"] == {"sampler": "ddim", "steps": 50}
    model = describe_model(bundles["brain_ldm"])
    assert [c.name for c in model.conditions] == ["gender", "age", "ventricular_volume", "brain_volume"]
    assert [c.default for c in model.conditions] == [0.0, 0.1, 0.2, 0.4]  # the bundle's literals
    assert model.conditioning.concat and model.conditioning.context and model.conditioning.null is None
    assert any("orientation" in note for note in model.geometry_notes)


def test_other_zoo_bundles_translated(bundles):
    brats3d, brats2d, mednist = (read_config(bundles[k]) for k in ("brats_3d", "brats_2d", "mednist"))
    assert brats3d["latent"]["shape"] == [8, 8, 4] and brats3d["image_shape"] == [32, 32, 16]  # latent x 4
    assert brats3d["voxel_size"] == [1.1, 1.1, 1.1] and "conditioning" not in brats3d
    assert brats2d["spatial_dims"] == 2 and brats2d["latent"]["channels"] == 1 and brats2d["voxel_size"] == [1.1, 1.1]
    assert mednist["kind"] == "ddpm" and mednist["image_shape"] == [16, 16]
    # MONAI's DDPMScheduler defaults, which the YAML leaves out
    assert mednist["scheduler"]["schedule"] == "linear_beta" and mednist["scheduler"]["clip_sample"] is True
    assert any("UNKNOWN" in n and "voxel size" in n for n in mednist["geometry"]["notes"])


def test_old_key_format_converted_by_monai(tmp_path):
    old = load_model(write_bundle(tmp_path / "old", "brain_ldm", seed=5, old_keys=True))
    new = load_model(write_bundle(tmp_path / "new", "brain_ldm", seed=5, old_keys=False))
    assert "attn1.to_out.0.weight" in "".join(torch.load(tmp_path / "old" / "models" / "model.pt", weights_only=True))
    for a, b in ((old.unet, new.unet), (old.autoencoder, new.autoencoder)):
        pa, pb = _params(a), _params(b)
        assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    # include_fc=False (the BraTS bundles): the old proj_attn weights are dropped, the rest converted
    brats_old = load_model(write_bundle(tmp_path / "b_old", "brats_3d", seed=2))
    brats_new = load_model(write_bundle(tmp_path / "b_new", "brats_3d", seed=2, old_keys=False))
    assert all(torch.equal(v, _params(brats_new.unet)[k]) for k, v in _params(brats_old.unet).items())


def test_nested_checkpoint_found(tmp_path):
    nested = load_model(write_bundle(tmp_path / "nested", "mednist", seed=1, nested="state_dict"))
    flat = load_model(write_bundle(tmp_path / "flat", "mednist", seed=1))
    assert all(torch.equal(v, _params(flat.unet)[k]) for k, v in _params(nested.unet).items())


def test_conditions_change_output_and_seed_repeats(brain_ldm):
    kw = dict(steps=3, sampler="ddim", device="cpu", precision="fp32")
    (a,) = generate(brain_ldm, [7], **kw)
    (b,) = generate(brain_ldm, [7], conditions={"age": 0.9, "gender": 1.0}, **kw)
    (c,) = generate(brain_ldm, [7], **kw)
    assert np.array_equal(a.array, c.array)
    assert np.abs(a.array - b.array).max() > 1e-3
    assert a.metadata["provenance"]["conditions"] == {
        "gender": 0.0,
        "age": 0.1,
        "ventricular_volume": 0.2,
        "brain_volume": 0.4,
    }
    with pytest.raises(MeddiffError, match="unknown condition 'sex'.*gender, age"):
        generate(brain_ldm, [0], conditions={"sex": 1.0}, **kw)
    with pytest.raises(MeddiffError, match=r"age=1.5 is outside its range \[0, 1\]"):
        generate(brain_ldm, [0], conditions={"age": 1.5}, **kw)
    with pytest.raises(MeddiffError, match="condition dropout"):
        generate(brain_ldm, [0], guidance_scale=3.0, **kw)


def test_cli_generate_bundle_writes_spaced_nifti_and_records_conditions(bundles, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(
        [
            "generate",
            "--model",
            str(bundles["brain_ldm"]),
            "--num",
            "3",
            "--steps",
            "2",
            "--sampler",
            "ddim",
            "--precision",
            "fp32",
            "--device",
            "cpu",
            "--condition",
            "age=0.2:0.8",
            "--condition",
            "gender=1",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    img = nib.load(out / f"{BRAIN_LDM}_seed1.nii.gz")
    assert img.shape == (16, 24, 16)
    assert np.allclose(np.abs(np.diag(img.affine)[:3]), [1.0, 1.0, 1.0])
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    sidecar = json.loads((out / f"{BRAIN_LDM}_seed1.json").read_text())
    assert sidecar["conditions"] == {"gender": 1.0, "age": 0.5, "ventricular_volume": 0.2, "brain_volume": 0.4}
    manifest = (out / "cohort.csv").read_text().splitlines()
    assert manifest[0].endswith(",conditions,label_map_sha256")
    assert [line.split(",")[-2].split()[1] for line in manifest[1:]] == ["age=0.2", "age=0.5", "age=0.8"]
    # resuming with other conditions is refused, not silently mixed
    assert (
        main(
            [
                "generate",
                "--model",
                str(bundles["brain_ldm"]),
                "--num",
                "3",
                "--steps",
                "2",
                "--sampler",
                "ddim",
                "--precision",
                "fp32",
                "--device",
                "cpu",
                "--condition",
                "age=0.3",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert "generated with other settings: conditions" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--condition", "agee=0.5"], "unknown condition 'agee'"),
        (["--condition", "age=2"], "outside its range"),
        (["--condition", "age=high"], "is not a number"),
        (["--guidance-scale", "4"], "condition dropout"),
    ],
)
def test_cli_condition_errors(bundles, tmp_path, capsys, args, message):
    rc = main(["generate", "--model", str(bundles["brain_ldm"]), "--out", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("meddiff: error:") and message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_bundle_expressions_and_scripts_never_run(tmp_path, monkeypatch):
    bundle = write_bundle(tmp_path / "evil", "brain_ldm")
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    target = tmp_path / "PWNED"
    config["write_a_file"] = f"$open({str(target)!r}, 'w').write('ran')"
    config["imports"].append("$import scripts.sampler")
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    monkeypatch.chdir(bundle)  # where `import scripts` would find the bundle's package
    model = load_model(bundle)
    generate(model, [0], steps=1, sampler="ddim", device="cpu", precision="fp32")
    assert not target.exists() and not (bundle / SCRIPT_MARKER).exists() and not (bundle / "output").exists()


def test_expression_where_a_value_is_needed_is_named(tmp_path):
    bundle = write_bundle(tmp_path / "expr", "brain_ldm")
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    config["diffusion_def"]["channels"] = "$[8, 16, 16]"
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    with pytest.raises(MeddiffError, match=r"diffusion_def#channels is a Python expression.*never evaluates"):
        read_config(bundle)


def test_pickled_object_in_weights_refused(tmp_path):
    bundle = write_bundle(tmp_path / "pickled", "mednist")
    state = torch.load(bundle / "models" / "model.pt", weights_only=True)
    torch.save({"state_dict": state, "extra": Path("/etc/passwd")}, bundle / "models" / "model.pt")
    (bundle / "large_files.yml").unlink()  # the md5 would refuse it first
    with pytest.raises(MeddiffError, match="pickled Python objects.*never unpickles"):
        load_model(bundle)


def test_md5_checked_and_missing_weights_explained(bundles, tmp_path):
    bundle = tmp_path / "copy"
    shutil.copytree(bundles["mednist"], bundle)
    with open(bundle / "models" / "model.pt", "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\x00" * 8)
    # md5 differs but torch still reads the same tensors: a fine-tuned bundle loads, with a warning (issue 36)
    with pytest.warns(UserWarning, match="differs from the published file"):
        load_model(bundle)
    (bundle / "models" / "model.pt").unlink()
    with pytest.raises(MeddiffError, match=r"missing weight file .*model.pt \(md5 [0-9a-f]{32}\): run `meddiff fetch"):
        load_model(bundle)


def test_sidecar_overrides_geometry(bundles, tmp_path):
    bundle = tmp_path / "mednist_ddpm"
    shutil.copytree(bundles["mednist"], bundle)
    (bundle / "meddiff.json").write_text(
        json.dumps({"voxel_size": [0.5, 0.5], "orientation": "RAS", "defaults": {"sampler": "ddim", "steps": 3}})
    )
    model = describe_model(bundle)
    assert model.voxel_size == (0.5, 0.5) and not model.geometry_notes
    assert model.sampling_defaults["steps"] == 3
    (bundle / "meddiff.json").write_text(json.dumps({"voxel": [1]}))
    with pytest.raises(MeddiffError, match=r"meddiff.json: unknown keys \['voxel'\]"):
        describe_model(bundle)


def test_pixel_and_2d_bundles_generate(bundles):
    for key, shape, spacing in (
        ("mednist", (16, 16, 1), 1.0),
        ("brats_2d", (32, 32, 1), 1.1),
        ("brats_3d", (32, 32, 16), 1.1),
    ):
        (vol,) = generate(str(bundles[key]), [0], steps=2, sampler="ddim", device="cpu", precision="fp32")
        assert vol.array.shape == shape and np.isclose(vol.affine[0, 0], spacing)
        assert np.isfinite(vol.array).all() and vol.array.std() > 0


def test_inpaint_with_bundle_ldm(brain_ldm):
    from napari_meddiff.io.volume import Volume
    from napari_meddiff.tasks.inpaint import inpaint

    rng = np.random.default_rng(0)
    image = Volume.from_spacing(rng.random((20, 26, 18)).astype(np.float32), (1.0, 1.0, 1.0))
    mask = np.zeros(image.array.shape, bool)
    mask[8:12, 10:15, 7:11] = True
    (out,) = inpaint(brain_ldm, image, mask, steps=2, sampler="ddim", device="cpu", precision="fp32")
    assert out.array.shape == image.array.shape
    assert np.array_equal(out.array[~mask], image.array[~mask])
    assert not np.allclose(out.array[mask], image.array[mask])
    (older,) = inpaint(
        brain_ldm, image, mask, steps=2, sampler="ddim", device="cpu", precision="fp32", conditions={"age": 0.9}
    )
    assert older.metadata["provenance"]["conditions"]["age"] == 0.9
    assert np.array_equal(older.array[~mask], image.array[~mask]) and not np.allclose(
        older.array[mask], out.array[mask]
    )


def test_cli_inpaint_bundle_with_condition(bundles, tmp_path, capsys):
    from napari_meddiff.io.volume import Volume, write_volume

    rng = np.random.default_rng(1)
    image = Volume.from_spacing(rng.random((20, 26, 18)).astype(np.float32) * 50, (1.0, 1.0, 1.0))
    mask = np.zeros(image.array.shape, np.uint8)
    mask[8:12, 10:15, 7:11] = 1
    write_volume(image, tmp_path / "t1.nii.gz")
    write_volume(Volume(mask, image.affine), tmp_path / "mask.nii.gz")
    base = [
        "inpaint",
        "--model",
        str(bundles["brain_ldm"]),
        "--image",
        str(tmp_path / "t1.nii.gz"),
        "--mask",
        str(tmp_path / "mask.nii.gz"),
        "--steps",
        "2",
        "--sampler",
        "ddim",
        "--precision",
        "fp32",
    ]
    assert main([*base, "--condition", "age=0.8", "--out", str(tmp_path / "out.nii.gz")]) == 0
    out = nib.load(tmp_path / "out.nii.gz")
    assert out.shape == (20, 26, 18) and np.allclose(out.affine, image.affine)
    assert json.loads((tmp_path / "out.json").read_text())["conditions"]["age"] == 0.8
    assert main([*base, "--condition", "age=0.1:0.9", "--out", str(tmp_path / "o2.nii.gz")]) == 2
    assert "a sweep (FROM:TO) is for cohorts" in capsys.readouterr().err


def test_models_lists_bundles_with_conditions_and_geometry_notes(bundles, monkeypatch, capsys):
    monkeypatch.setenv("MEDDIFF_MODELS", str(bundles["brain_ldm"].parent))
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith(BRAIN_LDM))
    assert "monai-bundle" in line and "gender[0,1] age[0,1] ventricular_volume[0,1] brain_volume[0,1]" in line
    assert "16x24x16" in line and "1x1x1" in line
    assert "NOTE: mednist_ddpm: geometry" in out and "voxel size (mm) is UNKNOWN" in out


def test_fetch_existing_bundle_checks_md5_and_offline_message(bundles, tmp_path, monkeypatch, capsys):
    root = tmp_path / "zoo"
    shutil.copytree(bundles["mednist"], root / "mednist_ddpm")
    assert main(["fetch", "mednist_ddpm", "--dir", str(root)]) == 0
    assert "md5 checked" in capsys.readouterr().err

    import monai.bundle

    def offline(**kwargs):
        raise ConnectionError("Failed to resolve 'github.com'")

    monkeypatch.setattr(monai.bundle, "download", offline)
    assert main(["fetch", BRAIN_LDM, "--dir", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "cannot download bundle" in err and "models/autoencoder.pt (md5 329e97b3085643ff235f11f049856242)" in err
    assert "models/model.pt (md5 21c3047556fb671caf0556f1cce6ef22)" in err and "Traceback" not in err
    assert not (tmp_path / "empty").exists()


@pytest.mark.parametrize(
    "sidecar",
    [
        {"conditioning": [1]},
        {"latent": 5},
        {"latent": {"shape": "abc"}},
        {"image_shape": "abc"},
        {"voxel_size": "abc"},
        {"defaults": [1]},
    ],
)
def test_malformed_meddiff_json_is_a_user_error_and_listing_goes_on(bundles, tmp_path, monkeypatch, capsys, sidecar):
    folder = tmp_path / "models" / "bad-bundle"
    shutil.copytree(bundles["brain_ldm"], folder)
    (folder / "meddiff.json").write_text(json.dumps(sidecar))
    with pytest.raises(MeddiffError, match="bad-bundle"):
        load_model(folder)
    monkeypatch.setenv("MEDDIFF_MODELS", str(tmp_path / "models"))
    assert main(["models"]) == 0
    assert "bad-bundle: not listed" in capsys.readouterr().err


def test_yaml_aliases_and_exploding_references_are_refused_fast(tmp_path):
    import time

    from napari_meddiff.models.bundle_config import BundleConfig, load_data_file

    lines = ["l0: &l0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, 9)]  # 10**9 values
    (tmp_path / "inference.yaml").write_text("\n".join(lines))
    with pytest.raises(MeddiffError, match="YAML aliases"):
        load_data_file(tmp_path / "inference.yaml")
    refs = {"network_def": {"_target_": "monai.networks.nets.DiffusionModelUNet", "channels": "@l0"}, "l40": 1}
    refs.update({f"l{i}": [f"@l{i + 1}"] * 2 for i in range(40)})  # 2**40 values through references
    start = time.perf_counter()
    with pytest.raises(MeddiffError, match="references expand"):
        BundleConfig(refs, tmp_path / "inference.json").components()
    assert time.perf_counter() - start < 10
