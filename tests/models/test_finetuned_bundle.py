"""Issue #36 item 6: a fine-tuned Zoo bundle loads. Its md5 no longer matches large_files.yml (MONAI checks md5s when
it downloads, not when it loads): loading warns, and what it generates records it; a damaged file is refused
because the loader cannot read it; ``meddiff fetch`` stays strict and never downloads over such a file."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch

from napari_meddiff import MeddiffError
from napari_meddiff.cli import main
from napari_meddiff.models import load_model
from napari_meddiff.tasks.settings import provenance
from napari_meddiff.testing.bundle_fixtures import write_bundle
from tests.helpers import assert_one_line_error, run_cli

WARNING = "differs from the published file: fine-tuned or damaged?"


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    return write_bundle(tmp_path_factory.mktemp("zoo") / "mednist_ddpm", "mednist")


def _fine_tuned(published, folder):
    bundle = shutil.copytree(published, folder)
    state = torch.load(bundle / "models" / "model.pt", weights_only=True)
    torch.save({k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}, bundle / "models" / "model.pt")
    return bundle


def test_a_fine_tuned_bundle_loads_with_a_warning_that_is_recorded(published, tmp_path):
    bundle = _fine_tuned(published, tmp_path / "mednist_ddpm")
    with pytest.warns(UserWarning, match=r"models/model.pt differs from the published file: fine-tuned or damaged"):
        model = load_model(bundle)
    assert model.weights_differ_from_published == ["models/model.pt"]
    record = provenance(model, torch.device("cpu"), seed=0)
    assert record["weights_differ_from_published"] == ["models/model.pt"]


def test_the_published_file_loads_without_a_warning_or_a_record(published):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = load_model(published)
    assert model.weights_differ_from_published == []
    assert "weights_differ_from_published" not in provenance(model, torch.device("cpu"), seed=0)


def test_a_damaged_file_is_refused_by_the_loader(published, tmp_path):
    bundle = shutil.copytree(published, tmp_path / "mednist_ddpm")
    weights = bundle / "models" / "model.pt"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # cut short: no longer a checkpoint
    with pytest.raises(MeddiffError, match=r"cannot read .*model.pt as PyTorch weights.*md5 [0-9a-f]{32} != "):
        load_model(bundle)


def test_the_cli_warns_once_and_the_sidecar_records_it(published, tmp_path):
    bundle = _fine_tuned(published, tmp_path / "mednist_ddpm")
    out = tmp_path / "out"
    proc = run_cli("generate", "--model", bundle, "--num", "1", "--steps", "2", "--out", out)
    assert proc.returncode == 0, proc.stderr
    warned = [line for line in proc.stderr.splitlines() if WARNING in line]
    assert len(warned) == 1 and warned[0].startswith("meddiff: warning: "), proc.stderr
    sidecar = json.loads(next(out.glob("*_seed0.json")).read_text())
    assert sidecar["weights_differ_from_published"] == ["models/model.pt"]


def test_the_cli_refuses_a_damaged_file_in_one_line(published, tmp_path):
    bundle = shutil.copytree(published, tmp_path / "mednist_ddpm")
    weights = bundle / "models" / "model.pt"
    weights.write_bytes(weights.read_bytes()[:1000])
    proc = run_cli("generate", "--model", bundle, "--num", "1", "--steps", "2", "--out", tmp_path / "out")
    assert_one_line_error(proc, "as PyTorch weights")
    assert WARNING not in proc.stderr


def test_fetch_stays_strict_and_does_not_download_over_a_fine_tuned_file(published, tmp_path, monkeypatch, capsys):
    import monai.bundle

    calls = []
    monkeypatch.setattr(monai.bundle, "download", lambda **kwargs: calls.append(kwargs))
    bundle = _fine_tuned(published, tmp_path / "zoo" / "mednist_ddpm")
    before = (bundle / "models" / "model.pt").read_bytes()
    assert main(["fetch", "mednist_ddpm", "--dir", str(tmp_path / "zoo")]) == 2
    err = capsys.readouterr().err
    assert "models/model.pt: md5" in err and "not downloading over it" in err and "checked" not in err, err
    assert not calls and (bundle / "models" / "model.pt").read_bytes() == before
