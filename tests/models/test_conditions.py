"""Conditions declared in model.json (`models.conditions`): names, defaults, units, ranges; a bad block is one
clear error."""

from __future__ import annotations

import json

import pytest

from napari_meddiff import MeddiffError
from napari_meddiff.models import load_model
from tests.helpers import conditional_model


def test_conditions_declared_in_model_json(cond_model):
    assert [c.name for c in cond_model.conditions] == ["age", "lesion_load"]
    assert cond_model.conditioning.concat and cond_model.conditioning.context
    assert cond_model.condition_values({"lesion_load": 0.3}) == {"age": 0.5, "lesion_load": 0.3}
    age, lesion = cond_model.conditions
    assert age.in_units(0.5) == pytest.approx(55.0) and age.unit == "years" and lesion.in_units(0.5) is None
    assert (age.label, lesion.label) == ("Age", "Lesion load")


def test_condition_units_need_both_ends(tmp_path):
    folder = conditional_model(tmp_path / "units")
    config = json.loads((folder / "model.json").read_text())
    del config["conditioning"]["conditions"][0]["unit_high"]
    (folder / "model.json").write_text(json.dumps(config))
    with pytest.raises(MeddiffError, match="unit_high"):
        load_model(folder)


def test_bad_conditioning_block_is_one_clear_error(tmp_path):
    folder = conditional_model(tmp_path / "bad")
    config = json.loads((folder / "model.json").read_text())
    config["conditioning"]["conditions"][0]["default"] = 7
    (folder / "model.json").write_text(json.dumps(config))
    with pytest.raises(MeddiffError, match=r"model.json: condition age: default 7 is outside \[0, 1\]"):
        load_model(folder)


def test_class_label_range_must_index_the_embedding(tmp_path):
    folder = conditional_model(tmp_path / "tiny-class", concat=False, context=False, class_labels=True)
    config = json.loads((folder / "model.json").read_text())
    config["conditioning"]["conditions"][0]["high"] = 5  # num_class_embeds is 3: labels 0..2
    (folder / "model.json").write_text(json.dumps(config))
    with pytest.raises(MeddiffError, match=r"class label grade must lie in 0\.\.2"):
        load_model(folder)
