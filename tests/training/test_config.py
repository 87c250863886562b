"""Training configs checked before anything is written (`training.config`, issue 13): a malformed config is one
line and leaves no folder."""

from __future__ import annotations

import pytest
import yaml

from tests.helpers import assert_one_line_error, run_cli, tiny_train_config


@pytest.mark.parametrize(
    "change, message",
    [
        ({"name": "../../escape"}, "plain folder name"),
        ({"spatial_dims": "two"}, "malformed training config"),
        ({"networks": ["unet"]}, "networks must be a mapping"),
        ({"training": {"steps": 2, "batch_size": -3}}, "training.batch_size must be positive"),
        ({"training": {"steps": 2, "lr": "fast"}}, "training.lr must be a number"),
        ({"training": {"steps": float("inf")}}, "training.steps must be a number"),
    ],
)
def test_malformed_training_configs_are_one_line_errors_and_leave_nothing(tmp_path, change, message):
    config = tiny_train_config(tmp_path)
    cfg = {**yaml.safe_load(config.read_text()), **change}
    config.write_text(yaml.safe_dump(cfg))
    proc = run_cli("train", config, "--out", tmp_path / "m", "--work-dir", tmp_path / "run")
    assert_one_line_error(proc, message)
    assert not (tmp_path / "m").exists() and not (tmp_path / "run").exists()
    assert not (tmp_path.parent / "escape").exists()
