"""The Generate widget's condition rows: a slider and a value box per declared condition, its unit beside it."""

from __future__ import annotations

import os

import pytest

from tests.helpers import conditional_model


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
    widget.model_picker.add_folder(conditional_model(tmp_path / "tiny-cond-2d"))
    rows = widget.conditions.rows
    assert rows["age"].unit.text() == "≈ 55 years"  # the default 0.5 of 20-90 years
    rows["age"].slider.setValue(1000)
    assert rows["age"].unit.text() == "≈ 90 years"
    assert rows["lesion_load"].unit.text() == ""
    labels = [widget.conditions.form.labelForField(rows[n]).text() for n in ("age", "lesion_load")]
    assert labels == ["Age", "Lesion load"]
