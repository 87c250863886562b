"""Conditioning in the one denoising loop: concatenated channels, cross-attention context, class labels,
classifier-free guidance; conditions declared in model.json; noise drawn on the CPU for every device."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from napari_meddiff import MeddiffError
from napari_meddiff.diffusion.loop import denoise
from napari_meddiff.diffusion.seeds import initial_noise, seeded_generators
from napari_meddiff.models import build_network, load_model, save_model_folder
from napari_meddiff.tasks.generate import generate
from napari_meddiff.testing.tiny_models import TINY_SCHEDULE, tiny_unet_config

CONDITIONS = [
    {
        "name": "age",
        "low": 0.0,
        "high": 1.0,
        "default": 0.5,
        "description": "age, scaled",
        "unit": "years",
        "unit_low": 20.0,
        "unit_high": 90.0,
    },
    {"name": "lesion_load", "low": -1.0, "high": 1.0, "default": 0.0},
]


def _conditional_model(folder, *, concat=True, context=True, class_labels=False, null=(-1.0, -1.0)):
    """A tiny pixel DDPM of this package's format whose model.json declares two conditions."""
    torch.manual_seed(0)
    unet = tiny_unet_config(2, 1 + (2 if concat else 0), 1)
    if context:
        unet.update(with_conditioning=True, cross_attention_dim=2, attention_levels=[False, True])
    if class_labels:
        unet["num_class_embeds"] = 3
    conditions = CONDITIONS[:1] if class_labels else CONDITIONS
    if class_labels:
        conditions = [{"name": "grade", "low": 0, "high": 2, "default": 1}]
        null = None
    config = {
        "name": folder.name,
        "kind": "ddpm",
        "spatial_dims": 2,
        "image_shape": [16, 16],
        "voxel_size": [2.0, 2.0],
        "scheduler": TINY_SCHEDULE,
        "networks": {"unet": unet},
        "defaults": {"sampler": "ddim", "steps": 3, "precision": "fp32"},
        "conditioning": {
            "concat": concat,
            "context": context,
            "class_labels": class_labels,
            "null": list(null) if null else None,
            "conditions": conditions,
        },
    }
    net = build_network("unet", unet)
    with torch.no_grad():
        for p in net.parameters():  # MONAI zero-initialises the output convolution
            p.add_(torch.randn_like(p) * 0.05)
    return save_model_folder(folder, config, {"unet": net}, card="# conditional test model\n", overwrite=True)


@pytest.fixture(scope="module")
def cond_model(tmp_path_factory):
    return load_model(_conditional_model(tmp_path_factory.mktemp("cond") / "tiny-cond-2d"))


def test_conditions_declared_in_model_json(cond_model):
    assert [c.name for c in cond_model.conditions] == ["age", "lesion_load"]
    assert cond_model.conditioning.concat and cond_model.conditioning.context
    assert cond_model.condition_values({"lesion_load": 0.3}) == {"age": 0.5, "lesion_load": 0.3}
    age, lesion = cond_model.conditions
    assert age.in_units(0.5) == pytest.approx(55.0) and age.unit == "years" and lesion.in_units(0.5) is None
    assert (age.label, lesion.label) == ("Age", "Lesion load")


def test_condition_units_need_both_ends(tmp_path):
    folder = _conditional_model(tmp_path / "units")
    config = json.loads((folder / "model.json").read_text())
    del config["conditioning"]["conditions"][0]["unit_high"]
    (folder / "model.json").write_text(json.dumps(config))
    with pytest.raises(MeddiffError, match="unit_high"):
        load_model(folder)


def _chain(model, seeds, values, scale=1.0):
    gens = seeded_generators(seeds)
    x = initial_noise(model.sample_shape, gens, torch.device("cpu"))
    cond = None if values is None else torch.tensor(values, dtype=torch.float32)
    return denoise(model, x, sampler="ddim", steps=4, generators=gens, condition_values=cond, guidance_scale=scale)


def test_guidance_zero_is_the_null_condition_and_one_the_conditional(cond_model):
    cond, null = [[0.9, 0.5]], [[-1.0, -1.0]]
    plain = _chain(cond_model, [3], cond)
    assert torch.allclose(_chain(cond_model, [3], cond, scale=1.0), plain)
    assert torch.allclose(_chain(cond_model, [3], cond, scale=0.0), _chain(cond_model, [3], null), atol=1e-5)
    guided = _chain(cond_model, [3], cond, scale=4.0)
    assert (guided - plain).abs().max() > 1e-3
    # guided batches keep each seed's chain: seed 3 in a batch of two equals seed 3 alone
    pair = _chain(cond_model, [3, 4], cond * 2, scale=4.0)
    assert torch.allclose(pair[:1], guided, atol=1e-5)


def test_defaults_used_when_no_conditions_given(cond_model):
    assert torch.equal(_chain(cond_model, [1], None), _chain(cond_model, [1], [[0.5, 0.0]]))


def test_generate_records_conditions_and_guidance(cond_model):
    (a,) = generate(cond_model, [2], conditions={"age": 0.1}, guidance_scale=2.0, device="cpu")
    (b,) = generate(cond_model, [2], conditions={"age": 0.9}, guidance_scale=2.0, device="cpu")
    prov = a.metadata["provenance"]
    assert prov["conditions"] == {"age": 0.1, "lesion_load": 0.0} and prov["guidance_scale"] == 2.0
    assert np.abs(a.array - b.array).max() > 1e-3
    vols = generate(cond_model, [5, 6], conditions=[{"age": 0.2}, {"age": 0.8}], batch_size=2, device="cpu")
    assert [v.metadata["provenance"]["conditions"]["age"] for v in vols] == [0.2, 0.8]
    with pytest.raises(MeddiffError, match="2 sets of conditions for 3 seeds"):
        generate(cond_model, [1, 2, 3], conditions=[{}, {}], device="cpu")


def test_class_label_conditioning(tmp_path):
    model = load_model(_conditional_model(tmp_path / "tiny-class", concat=False, context=False, class_labels=True))
    (a,) = generate(model, [0], conditions={"grade": 0}, device="cpu")
    (b,) = generate(model, [0], conditions={"grade": 2}, device="cpu")
    assert np.abs(a.array - b.array).max() > 1e-3


def test_bad_conditioning_block_is_one_clear_error(tmp_path):
    folder = _conditional_model(tmp_path / "bad")
    config = json.loads((folder / "model.json").read_text())
    config["conditioning"]["conditions"][0]["default"] = 7
    (folder / "model.json").write_text(json.dumps(config))
    with pytest.raises(MeddiffError, match=r"model.json: condition age: default 7 is outside \[0, 1\]"):
        load_model(folder)


def test_noise_comes_from_cpu_generators():
    gens = seeded_generators([11, 12], torch.device("cpu"))
    assert all(g.device.type == "cpu" for g in gens)
    noise = initial_noise((2, 4, 4), gens, torch.device("cpu"))
    again = torch.stack([torch.randn((2, 4, 4), generator=torch.Generator().manual_seed(s)) for s in (11, 12)])
    assert torch.equal(noise, again)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("sampler, eta", [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0)])
def test_cpu_and_cuda_give_the_same_sample(cond_model, sampler, eta):
    kw = dict(sampler=sampler, steps=10, eta=eta, precision="fp32", conditions={"age": 0.3})
    (cpu,) = generate(cond_model, [9], device="cpu", **kw)
    (gpu,) = generate(cond_model, [9], device="cuda", **kw)
    cond_model.to("cpu")
    np.testing.assert_allclose(gpu.array, cpu.array, atol=2e-3)


@pytest.mark.napari
@pytest.mark.skipif(not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")), reason="run under xvfb-run")
def test_generate_widget_condition_sliders(make_napari_viewer, qtbot, tmp_path):
    from napari_meddiff.testing.bundle_fixtures import write_bundle

    bundle = write_bundle(tmp_path / "brain_image_synthesis_latent_diffusion_model", "brain_ldm")
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-meddiff", "Generate")
    widget.model_picker.add_folder(bundle)
    rows = widget.conditions.rows
    assert list(rows) == ["gender", "age", "ventricular_volume", "brain_volume"] and widget.conditions.isVisibleTo(
        widget
    )
    assert rows["age"].value() == pytest.approx(0.1) and widget.conditions.guidance is None  # no null condition
    rows["age"].slider.setValue(700)  # the slider drives the value box
    assert rows["age"].box.value() == pytest.approx(0.7)
    rows["gender"].box.setValue(1.0)
    assert rows["gender"].slider.value() == 1000
    widget.sampling.sampler.setCurrentText("ddim")
    widget.sampling.steps.setValue(2)
    widget.generate_button.click()
    qtbot.waitUntil(lambda: not widget.runner.running, timeout=120_000)
    layer = viewer.layers[-1]
    assert layer.metadata["provenance"]["conditions"] == {
        "gender": 1.0,
        "age": 0.7,
        "ventricular_volume": 0.2,
        "brain_volume": 0.4,
    }
    assert layer.data.shape == (16, 24, 16)
    widget.model_picker.add_folder(write_bundle(tmp_path / "mednist_ddpm", "mednist"))
    assert not widget.conditions.rows and not widget.conditions.isVisibleTo(widget)


@pytest.mark.napari
@pytest.mark.skipif(not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")), reason="run under xvfb-run")
def test_condition_rows_show_the_declared_unit(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-meddiff", "Generate")
    widget.model_picker.add_folder(_conditional_model(tmp_path / "tiny-cond-2d"))
    rows = widget.conditions.rows
    assert rows["age"].unit.text() == "≈ 55 years"  # the default 0.5 of 20-90 years
    rows["age"].slider.setValue(1000)
    assert rows["age"].unit.text() == "≈ 90 years"
    assert rows["lesion_load"].unit.text() == ""
    labels = [widget.conditions.form.labelForField(rows[n]).text() for n in ("age", "lesion_load")]
    assert labels == ["Age", "Lesion load"]


def test_class_label_range_must_index_the_embedding(tmp_path):
    folder = _conditional_model(tmp_path / "tiny-class", concat=False, context=False, class_labels=True)
    config = json.loads((folder / "model.json").read_text())
    config["conditioning"]["conditions"][0]["high"] = 5  # num_class_embeds is 3: labels 0..2
    (folder / "model.json").write_text(json.dumps(config))
    with pytest.raises(MeddiffError, match=r"class label grade must lie in 0\.\.2"):
        load_model(folder)
