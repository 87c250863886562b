"""Issue #36 item 5, ``meddiff fetch``: the bundle name must be a plain name and ``--dir`` a folder before anything
is downloaded, and a bundle whose large_files.yml names a file outside it is not reported as checked."""

from __future__ import annotations

import shutil

import pytest

from napari_meddiff.cli import main
from napari_meddiff.testing.bundle_fixtures import write_bundle


@pytest.fixture
def no_download(monkeypatch):
    """Fail the test if monai.bundle.download is ever reached."""
    import monai.bundle

    calls = []
    monkeypatch.setattr(monai.bundle, "download", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(monai.bundle, "download_large_files", lambda **kwargs: calls.append(kwargs))
    return calls


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("meddiff: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("name", ["../../etc", "/etc", "", "a/b", ".hidden", "..", "a\\b", "x" * 300])
def test_a_bundle_name_must_be_a_plain_name(tmp_path, capsys, no_download, name):
    assert main(["fetch", name, "--dir", str(tmp_path / "zoo")]) == 2
    line = _one_error_line(capsys)
    assert "bundle name" in line and "letters, digits" in line, line
    assert len(line) < 400, line  # a long name is cut
    assert not no_download and not (tmp_path / "zoo").exists()


@pytest.mark.parametrize("version", ["../../x", "/abs", "1.0/../.."])
def test_a_bundle_version_must_be_plain(tmp_path, capsys, no_download, version):
    assert main(["fetch", "mednist_ddpm", "--dir", str(tmp_path), "--version", version]) == 2
    assert "--version" in _one_error_line(capsys) and not no_download


def test_dir_must_name_a_folder(tmp_path, capsys, no_download):
    assert main(["fetch", "mednist_ddpm", "--dir", ""]) == 2
    assert "--dir" in _one_error_line(capsys)
    (tmp_path / "file").write_text("x")
    assert main(["fetch", "mednist_ddpm", "--dir", str(tmp_path / "file")]) == 2
    assert "is not a folder" in _one_error_line(capsys) and not no_download


def test_fetch_does_not_vouch_for_a_file_outside_the_bundle(tmp_path, capsys, no_download):
    bundle = write_bundle(tmp_path / "zoo" / "custom_bundle", "mednist")
    outside = tmp_path / "secret.pt"
    shutil.copyfile(bundle / "models" / "model.pt", outside)
    lines = (bundle / "large_files.yml").read_text().replace('"models/model.pt"', f'"{outside}"')
    (bundle / "large_files.yml").write_text(lines)
    assert main(["fetch", "custom_bundle", "--dir", str(tmp_path / "zoo")]) == 2
    line = _one_error_line(capsys)
    assert "large_files.yml: path" in line and "outside the model folder" in line, line
    assert "checked" not in line and not no_download
