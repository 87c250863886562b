"""What a user reads in the terminal (issue 37): counts in the right number, no progress bar before a refusal,
the offline `fetch` reason whole on one line."""

from __future__ import annotations

import numpy as np

from napari_meddiff.cli import main
from napari_meddiff.cli.fetch import download_failure
from napari_meddiff.cli.options import counted
from tests.helpers import write_nifti

URLLIB3_OFFLINE = (
    "HTTPSConnectionPool(host='github.com', port=443): Max retries exceeded with url: /Project-MONAI/model-zoo/"
    "releases/download/hosting_storage_v1/brain_image_synthesis_latent_diffusion_model_v1.0.0.zip (Caused by "
    'NameResolutionError("<urllib3.connection.HTTPSConnection object at 0x7f3a2c1b5d50>: Failed to resolve '
    "'github.com' ([Errno -2] Name or service not known)\"))"
)


def test_counts_take_the_right_number():
    assert counted(1, "subject") == "1 subject"
    assert counted(0, "subject") == "0 subjects"
    assert counted(3, "case") == "3 cases"


def test_one_subject_is_not_subjects(tiny_models, tmp_path, capsys):
    out = tmp_path / "gen"
    args = ["generate", "--model", str(tiny_models["ldm3d"]), "--num", "1", "--sampler", "ddim", "--steps", "2",
            "--device", "cpu", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    err = capsys.readouterr().err
    assert ": 1 subject" in err and "1 subjects" not in err
    assert main(["generate", "--merge-manifest", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.rstrip().endswith(": 1 subject"), err


def test_segment_with_a_generative_model_draws_no_bar_before_its_error(tiny_models, tmp_path, capsys):
    image = write_nifti(tmp_path / "scan.nii.gz", np.random.default_rng(0).random((16, 16, 8)) * 100)
    args = ["segment", "--model", str(tiny_models["ldm3d"]), "--image", str(image), "--out", str(tmp_path / "seg"),
            "--ensemble", "2", "--device", "cpu"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "not a segmentation model" in err
    assert "‰" not in err and "x2" not in err and "\r" not in err, err
    assert len(err.strip().splitlines()) == 1


def test_offline_fetch_reason_is_whole_and_on_one_line():
    import requests

    reason = download_failure(requests.exceptions.ConnectionError(URLLIB3_OFFLINE))
    assert reason == (
        "NameResolutionError: cannot reach github.com: Failed to resolve 'github.com' ([Errno -2] Name or service "
        "not known)"
    )
    assert download_failure(ConnectionError("line one\n  line two")) == "ConnectionError: line one line two"
    long = download_failure(OSError("word " * 100 + "(an open parenthesis " + "x " * 100 + ")"))
    assert len(long) < 260 and long.endswith(" …") and "(" not in long


def test_offline_fetch_error_ends_with_the_hint_not_a_cut_cause(tmp_path, monkeypatch, capsys):
    import monai.bundle
    import requests

    def offline(**kwargs):
        raise requests.exceptions.ConnectionError(URLLIB3_OFFLINE)

    monkeypatch.setattr(monai.bundle, "download", offline)
    assert main(["fetch", "brain_image_synthesis_latent_diffusion_model", "--dir", str(tmp_path / "zoo")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "Failed to resolve 'github.com' ([Errno -2] Name or service not known))" in err
    assert "Caused by" not in err and "object at 0x" not in err
