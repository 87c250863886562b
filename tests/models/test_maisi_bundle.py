"""MONAI Zoo's ``maisi_ct_generative`` in both layouts (0.4.x DDPM, 1.0.0 rectified flow) as models: Zoo-shaped
folders with random weights, read as data, their UNet's extra inputs (spacing, body regions, modality) given in
the one denoising loop, scans generated from label maps on the maps' grids."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from napari_meddiff.errors import MeddiffError
from napari_meddiff.io.volume import Volume
from napari_meddiff.models import load_model, read_config
from napari_meddiff.tasks.from_labels import binary_condition, generate_from_labels
from napari_meddiff.testing.maisi_bundles import (
    SCALE_FACTOR,
    SCRIPT_MARKER,
    write_maisi_bundle,
    write_nv_generate_mr_folder,
)

VERSIONS = ("0.4", "1.0")
LIVER, SPLEEN, TUMOR, BRAIN, BODY = 1, 3, 26, 22, 200


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("maisi")
    return {v: write_maisi_bundle(root / f"maisi_ct_generative_{v}", v, seed=int(v[0])) for v in VERSIONS}


@pytest.fixture(scope="module")
def models(bundles):
    return {v: load_model(path) for v, path in bundles.items()}


def organ_map(tumor: bool = True, body: bool = False) -> Volume:
    """A liver with a tumour and a spleen, on an oblique grid of 1.2 x 1.4 x 3 mm voxels."""
    c, s = np.cos(0.4), np.sin(0.4)
    affine = np.array([[1.2 * c, -1.4 * s, 0, -12], [1.2 * s, 1.4 * c, 0, 6], [0, 0, 3.0, 20], [0, 0, 0, 1]])
    values = np.zeros((22, 18, 8), np.int16)
    if body:
        values[1:21, 1:17, 1:7] = BODY
    values[4:16, 4:14, 2:6] = LIVER
    if tumor:
        values[8:12, 7:11, 3:5] = TUMOR
    values[17:20, 3:7, 2:5] = SPLEEN
    return Volume(values, affine)


def _generate(model, labels: Volume, seed: int = 0) -> Volume:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return generate_from_labels(model, labels, [seed], steps=2, precision="fp32")[0]


@pytest.mark.parametrize("version", VERSIONS)
def test_both_layouts_translate_from_their_files(bundles, version):
    config = read_config(bundles[version])
    nets = config["networks"]
    assert [nets[r]["monai_class"] for r in ("unet", "autoencoder", "controlnet")] == [
        "DiffusionModelUNetMaisi",
        "AutoencoderKlMaisi",
        "ControlNetMaisi",
    ]
    assert nets["autoencoder"]["out_channels"] == 1  # the image autoencoder, not the mask generator's (125)
    assert config["latent"]["channels"] == 4 and config["latent"]["shape"] == [4, 4, 4]
    assert config["voxel_size"] == [1.5, 1.5, 2.0] and config["image_shape"] == [16, 16, 16]
    labels = config["label_map"]["labels"]
    assert labels["1"] == "liver" and labels["26"] == "hepatic tumor" and labels["128"] == "bone lesion"  # remap
    assert labels[str(BODY)] == "body" and any("label 200 'body'" in n for n in config["geometry"]["notes"])
    inputs = config["network_inputs"]
    if version == "0.4":
        assert config["scheduler"]["beta_end"] == 0.0195 and "type" not in config["scheduler"]
        assert config["bundle_sampling"] == {"sampler": "ddpm", "steps": 1000}
        assert inputs["body_regions"]["default"] == [2, 2] and "class_label" not in inputs  # "abdomen"
    else:
        assert config["scheduler"]["type"] == "rflow" and config["scheduler"]["use_timestep_transform"] is True
        assert config["defaults"]["sampler"] == "rflow" and config["defaults"]["steps"] == 30
        assert inputs["class_label"] == 1 and "body_regions" not in inputs
    assert inputs["spacing"] is True and inputs["scale"] == 100.0


@pytest.mark.parametrize("version", VERSIONS)
def test_both_layouts_load_with_their_checkpoints(bundles, models, version):
    model = models[version]
    assert type(model.unet).__name__ == "DiffusionModelUNetMaisi" and model.label_encoding == "binary"
    assert model.scale_factor == pytest.approx(SCALE_FACTOR)  # the diffusion checkpoint's, not 1.0
    assert model.config["networks"]["unet"]["use_flash_attention"] is True  # the bundle's, adapted on the CPU:
    modules = [m for net in (model.unet, model.controlnet, model.autoencoder) for m in net.modules()]
    assert not any(getattr(m, k, False) for m in modules for k in ("use_flash_attention", "norm_float16"))
    assert {getattr(m, "num_splits", 1) for m in modules} == {1}
    files = {k: v["file"] for k, v in model.config["weights"].items()}
    ckpt = torch.load(bundles[version] / files["controlnet"], weights_only=True)["controlnet_state_dict"]
    assert all(torch.equal(v, ckpt[k]) for k, v in model.controlnet.state_dict().items())
    assert not (bundles[version] / "models" / "mask_generation_autoencoder.pt").exists()  # not needed
    assert not (bundles[version] / SCRIPT_MARKER).exists() and not (bundles[version] / "output").exists()


def _captured_inputs(model, labels: Volume) -> dict[str, dict]:
    """The keyword inputs the UNet and the ControlNet receive at their first evaluation."""
    seen: dict[str, dict] = {}

    def hook(name):
        def record(module, args, kwargs):
            seen.setdefault(name, {k: v.clone() for k, v in kwargs.items() if torch.is_tensor(v)})

        return record

    handles = [
        net.register_forward_pre_hook(hook(n), with_kwargs=True)
        for n, net in (("unet", model.unet), ("controlnet", model.controlnet))
    ]
    try:
        _generate(model, labels)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def test_ddpm_unet_gets_the_grid_spacing_and_the_maps_body_regions(models):
    labels = organ_map()
    labels.array[1:3, 1:3, 1:3] = BRAIN  # head (region 0) to abdomen (region 2)
    seen = _captured_inputs(models["0.4"], labels)
    unet = seen["unet"]
    assert torch.allclose(unet["spacing_tensor"], torch.tensor([[120.0, 140.0, 300.0]]), atol=1e-3)  # the map's mm
    assert unet["top_region_index_tensor"].tolist() == [[100.0, 0.0, 0.0, 0.0]]
    assert unet["bottom_region_index_tensor"].tolist() == [[0.0, 0.0, 100.0, 0.0]]
    assert "mid_block_additional_residual" in unet and "class_labels" not in seen["controlnet"]
    assert seen["controlnet"]["controlnet_cond"].shape[1] == 8  # the label values' bits


def test_rflow_unet_and_controlnet_get_the_modality(models):
    seen = _captured_inputs(models["1.0"], organ_map())
    assert seen["unet"]["class_labels"].tolist() == [1] and seen["controlnet"]["class_labels"].tolist() == [1]
    assert "top_region_index_tensor" not in seen["unet"] and "spacing_tensor" in seen["unet"]
    assert seen["unet"]["timesteps"].dtype == torch.float32  # continuous time


def test_labels_go_to_the_controlnet_as_their_bits():
    bits = binary_condition(torch.tensor([[0, 1, 26, 200]]))
    assert bits[0, :, 2].tolist() == [0, 1, 0, 1, 1, 0, 0, 0]  # 26 = 0b11010, lowest bit first
    assert bits[0, :, 3].tolist() == [0, 0, 0, 1, 0, 0, 1, 1] and bits[0, :, 0].sum() == 0


@pytest.mark.parametrize("version", VERSIONS)
def test_same_seed_same_scan_and_an_organ_changes_its_region(models, version):
    model = models[version]
    first, again = _generate(model, organ_map()), _generate(model, organ_map())
    assert first.array.shape == (22, 18, 8) and np.allclose(first.affine, organ_map().affine)
    assert np.array_equal(first.array, again.array)
    without = _generate(model, organ_map(tumor=False))
    tumor = organ_map().array == TUMOR
    change = np.abs(first.array - without.array)
    assert change[tumor].max() > 1e-3
    assert change[tumor].mean() > change[organ_map().array == SPLEEN].mean()  # most where the organ changed
    assert not np.array_equal(first.array, _generate(model, organ_map(), seed=1).array)


def test_a_map_without_body_label_gets_it_derived_and_recorded(models):
    with pytest.warns(UserWarning, match="no body label 200"):
        (scan,) = generate_from_labels(models["1.0"], organ_map(), [0], steps=2, precision="fp32")
    assert scan.metadata["provenance"]["label_map"]["body_label_derived"] > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a map with a body label is taken as it is
        (scan,) = generate_from_labels(models["1.0"], organ_map(body=True), [0], steps=2, precision="fp32")
    assert "body_label_derived" not in scan.metadata["provenance"]["label_map"]


def test_expressions_in_the_config_never_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hostile = {
        "write_file": "$open('EXPRESSION_RAN', 'w').write('a bundle expression was evaluated')",
        "fail": "$1 / 0",
        "imports": ["$import os", "$os.makedirs('IMPORTED')"],
    }
    folder = write_maisi_bundle(tmp_path / "maisi_ct_generative", "1.0", extra_config=hostile)
    _generate(load_model(folder), organ_map())
    written = {p.name for p in tmp_path.rglob("*")}
    assert not written & {"EXPRESSION_RAN", "IMPORTED", SCRIPT_MARKER, "output"}
    config = json.loads((folder / "configs" / "inference.json").read_text())
    config["diffusion_unet_def"]["num_channels"] = "$open('EXPRESSION_RAN', 'w') or [8, 16]"
    (folder / "configs" / "inference.json").write_text(json.dumps(config))
    with pytest.raises(MeddiffError, match=r"diffusion_unet_def#num_channels is a Python expression"):
        load_model(folder)
    assert not (tmp_path / "EXPRESSION_RAN").exists()


def test_missing_label_names_and_scale_factor_are_one_line_errors(tmp_path):
    folder = write_maisi_bundle(tmp_path / "maisi_ct_generative", "0.4")
    (folder / "configs" / "label_dict.json").unlink()
    with pytest.raises(MeddiffError, match=r"label_dict\.json is missing: a MAISI bundle's label names"):
        read_config(folder)
    folder = write_maisi_bundle(tmp_path / "second", "0.4")
    unet_file = folder / read_config(folder)["weights"]["unet"]["file"]
    checkpoint = torch.load(unet_file, weights_only=True)
    torch.save({"unet_state_dict": checkpoint["unet_state_dict"]}, unet_file)
    with pytest.raises(MeddiffError, match="holds no scale_factor"):
        load_model(folder)


def test_an_nv_generate_ctmr_folder_is_read_as_maisi(tmp_path):
    from napari_meddiff.testing.maisi_bundles import write_nv_generate_folder

    folder = write_nv_generate_folder(tmp_path / "NV-Generate-CTMR")
    config = read_config(folder)
    assert config["format"] == "nv-generate-ctmr" and config["scheduler"]["type"] == "rflow"
    assert config["weights"]["unet"]["file"] == "models/diff_unet_3d_rflow-ct.pt"  # environment_rflow-ct.json
    assert config["network_inputs"]["class_label"] == 1 and "body_regions" not in config["network_inputs"]
    model = load_model(folder)
    assert model.scale_factor == pytest.approx(SCALE_FACTOR)
    scan = _generate(model, organ_map())
    assert scan.array.shape == (22, 18, 8) and np.allclose(scan.affine, organ_map().affine)
    assert not (folder / SCRIPT_MARKER).exists()  # its scripts.adagn_unet UNet is neither built nor imported


def test_an_nv_generate_mr_model_generates_from_noise_with_its_modality_and_guidance(tmp_path):
    """NV-Generate-CTMR's rflow-mr (issue 38): the rflow network file without its ControlNet, the weights its
    environment file names (model_dir + model_filename; the autoencoder's wrapped as their loader allows), the
    modality a class label whose class 0 is classifier-free guidance's unconditional one, at their scale."""
    from napari_meddiff.tasks.generate import generate
    from napari_meddiff.testing.maisi_bundles import write_nv_generate_mr_folder

    folder = write_nv_generate_mr_folder(tmp_path / "NV-Generate-CTMR", side=16, modality=9, guidance=15.0)
    config = read_config(folder)
    assert config["format"] == "nv-generate-ctmr" and config["bundle"]["name"] == "NV-Generate-CTMR rflow-mr"
    assert set(config["networks"]) == {"unet", "autoencoder"} and "label_map" not in config
    assert config["weights"]["unet"]["file"] == "models/diff_unet_3d_rflow-mr.pt"
    assert config["image_shape"] == [16, 16, 16] and config["voxel_size"] == [1.25, 1.0, 1.0]
    model = load_model(folder)
    assert [c.name for c in model.conditions] == ["modality"] and model.conditions[0].default == 9
    assert model.guidance_default == 15.0 and model.sampling_defaults["sampler"] == "rflow"
    scan = generate(model, [0], steps=2)[0]
    assert scan.shape == (16, 16, 16) and scan.spacing == pytest.approx((1.25, 1.0, 1.0))
    assert 0.0 <= scan.array.min() and scan.array.max() <= 1000.0 and scan.array.std() > 0  # MR: 0..1000
    record = scan.metadata["provenance"]
    assert record["guidance_scale"] == 15.0 and record["conditions"] == {"modality": 9.0}
    np.testing.assert_array_equal(scan.array, generate(model, [0], steps=2)[0].array)  # the same seed
    assert not np.array_equal(scan.array, generate(model, [0], steps=2, guidance_scale=1.0)[0].array)
    assert not np.array_equal(scan.array, generate(model, [0], steps=2, conditions={"modality": 10})[0].array)
    from napari_meddiff.tasks.inpaint import inpaint

    hole = np.zeros(scan.shape, bool)
    hole[4:10, 4:10, 4:10] = True
    (filled,) = inpaint(model, scan, hole, steps=2)  # its UNet gets its spacing there too
    np.testing.assert_array_equal(filled.array[~hole], scan.array[~hole])
    assert not (folder / SCRIPT_MARKER).exists()


def test_an_nv_generate_mr_scan_is_clipped_below_0_only_as_theirs(tmp_path):
    """Their diff_model_infer.py clips MR at 0 only: a decoder output above 1 is brighter than 1000, not 1000."""
    from napari_meddiff.tasks.generate import generate

    folder = write_nv_generate_mr_folder(tmp_path / "NV-Generate-CTMR", side=16, modality=9, guidance=1.0)
    model = load_model(folder)
    assert model.output_clip == (0.0, None) and model.output_range == (0.0, 1000.0)
    final = [m for m in model.autoencoder.decoder.modules() if isinstance(m, torch.nn.Conv3d)][-1]
    with torch.no_grad():
        final.bias += 1.5  # most voxels decode above 1
    scan = generate(model, [0], steps=2)[0]
    assert scan.array.min() >= 0.0 and scan.array.max() > 1500.0


def test_meddiff_json_defaults_win_over_an_nv_generate_mr_models_files(tmp_path):
    import json

    from napari_meddiff.testing.maisi_bundles import write_nv_generate_mr_folder

    folder = write_nv_generate_mr_folder(tmp_path / "NV-Generate-CTMR", guidance=15.0)
    (folder / "meddiff.json").write_text(json.dumps({"defaults": {"guidance_scale": 3.0}, "variant": "rflow-mr"}))
    assert read_config(folder)["defaults"]["guidance_scale"] == 3.0


def test_an_nv_generate_folder_with_ct_and_mr_weights_opens_the_variant_asked_for(tmp_path):
    import json

    from napari_meddiff.testing.maisi_bundles import write_nv_generate_folder, write_nv_generate_mr_folder

    folder = write_nv_generate_mr_folder(tmp_path / "NV-Generate-CTMR")
    write_nv_generate_folder(folder)  # the CT model beside it: CT comes first
    assert "label_map" in read_config(folder) and read_config(folder)["bundle"]["name"] == "NV-Generate-CTMR rflow-ct"
    (folder / "meddiff.json").write_text(json.dumps({"variant": "rflow-mr"}))
    assert "label_map" not in read_config(folder)
    (folder / "meddiff.json").write_text(json.dumps({"variant": "rflow-ct"}))  # NVIDIA's name
    assert "label_map" in read_config(folder)
    (folder / "meddiff.json").write_text(json.dumps({"variant": "rflow-xr"}))
    with pytest.raises(MeddiffError, match="variant 'rflow-xr' is not one of rflow-ct, ddpm-ct, rflow-mr"):
        read_config(folder)


def test_a_map_finer_or_coarser_than_maisi_was_trained_on_is_generated_within_its_range(models):
    fine = organ_map()
    fine.affine = np.diag([0.3, 0.3, 7.0, 1.0])  # MAISI takes 0.5..3 mm in plane, 0.5..5 mm along S
    seen = _captured_inputs(models["1.0"], fine)
    assert torch.allclose(seen["unet"]["spacing_tensor"], torch.tensor([[50.0, 50.0, 500.0]]))
    scan = _generate(models["1.0"], fine)
    assert scan.array.shape == fine.array.shape and np.allclose(scan.affine, fine.affine)


@pytest.mark.parametrize("version", VERSIONS)
def test_a_painted_tumour_is_regenerated_under_the_new_map_and_nothing_else(models, version):
    """Regenerating what a map edit changed, with a MAISI bundle: the map goes in as MAISI takes it (binary
    coded, with the spacing and body regions as extra inputs); the changed region is filled, the rest comes back
    bit for bit."""
    from napari_meddiff.tasks.from_labels import changed_labels_mask
    from napari_meddiff.tasks.inpaint import inpaint

    before, after = organ_map(tumor=False, body=True), organ_map(tumor=True, body=True)
    rng = np.random.default_rng(0)
    ct = np.where(before.array > 0, 40.0, -1000.0) + rng.normal(0, 10, before.shape)
    scan = Volume(ct.astype(np.int16), before.affine)
    region = changed_labels_mask(before, after, margin_voxels=1)
    (filled,) = inpaint(models[version], scan, region, labels=after, steps=2, precision="fp32", device="cpu")
    np.testing.assert_array_equal(filled.array[~region], scan.array[~region])
    assert not np.array_equal(filled.array[region], scan.array[region])
    assert len(filled.metadata["provenance"]["label_map_sha256"]) == 64


def test_a_maisi_scan_comes_in_hounsfield_units_with_air_outside_the_body(models):
    """MAISI's [0, 1] output is CT's -1000..1000 HU, and its pipeline writes air (-1000 HU) where the map is
    background: generate does the same, so a scan can be read as CT."""
    (scan,) = generate_from_labels(models["1.0"], organ_map(body=True), [0], steps=2, precision="fp32")
    inside = organ_map(body=True).array > 0
    assert scan.array.min() >= -1000 and scan.array.max() <= 1000
    far_outside = np.zeros_like(inside)
    far_outside[0, :, :] = far_outside[-1, :, :] = True  # map border: background, away from the body
    np.testing.assert_array_equal(scan.array[far_outside], -1000.0)
    assert (scan.array[inside] > -1000).mean() > 0.5  # not all air where the body is
