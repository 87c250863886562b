"""``meddiff generate --model <maisi_ct_generative bundle> --labels MAP``: a CT scan per seed on the map's own
grid (oblique, anisotropic), for both bundle layouts, reproducible, with what was derived recorded."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from napari_meddiff.cli import main
from napari_meddiff.testing.maisi_bundles import write_maisi_bundle


@pytest.fixture(scope="module")
def label_file(tmp_path_factory):
    """Liver (1) with a hepatic tumour (26) and a spleen (3), 1.2 x 1.4 x 3 mm voxels, rotated about S."""
    c, s = np.cos(0.4), np.sin(0.4)
    affine = np.array([[1.2 * c, -1.4 * s, 0, -12], [1.2 * s, 1.4 * c, 0, 6], [0, 0, 3.0, 20], [0, 0, 0, 1]])
    values = np.zeros((22, 18, 8), np.int16)
    values[4:16, 4:14, 2:6] = 1
    values[8:12, 7:11, 3:5] = 26
    values[17:20, 3:7, 2:5] = 3
    path = tmp_path_factory.mktemp("maps") / "organs.nii.gz"
    nib.save(nib.Nifti1Image(values, affine), path)
    return path


@pytest.mark.parametrize("version,sampler", [("0.4", "dpm++"), ("1.0", "rflow")])
def test_generate_from_a_label_map_with_a_maisi_bundle(tmp_path, label_file, version, sampler):
    bundle = write_maisi_bundle(tmp_path / "maisi_ct_generative", version)
    outputs = []
    for run in ("a", "b"):
        args = ["generate", "--model", str(bundle), "--labels", str(label_file), "--out", str(tmp_path / run)]
        assert main([*args, "--steps", "2", "--precision", "fp32"]) == 0
        outputs.append(nib.load(tmp_path / run / "maisi_ct_generative_seed0.nii.gz"))
    source = nib.load(label_file)
    assert outputs[0].shape == source.shape and np.allclose(outputs[0].affine, source.affine, atol=1e-5)
    scan = outputs[0].get_fdata()
    assert np.array_equal(scan, outputs[1].get_fdata())  # the same seed: the same scan
    assert -1000.0 <= scan.min() and scan.max() <= 1000.0 and scan[source.get_fdata() > 0].std() > 0  # HU
    sidecar = json.loads((tmp_path / "a" / "maisi_ct_generative_seed0.json").read_text())
    assert sidecar["sampler"] == sampler and sidecar["steps"] == 2 and sidecar["autoencoder_pass"] == "whole"
    assert sidecar["label_map"]["voxels"]["hepatic tumor"] == 32
    assert sidecar["label_map"]["body_label_derived"] > 0  # body (200) was not in the map


def test_models_lists_a_long_label_vocabulary_under_the_table(tmp_path, monkeypatch, capsys):
    """MAISI's label dictionary (over a hundred names) does not stretch the table row: the row names the first
    few and the count, the full list follows under the table, wrapped."""
    write_maisi_bundle(tmp_path / "maisi_ct_generative", "1.0")
    monkeypatch.setenv("MEDDIFF_MODELS", str(tmp_path))
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("maisi_ct_generative"))
    count = int(row.split("... ")[1].split(" labels")[0])
    assert count > 8 and "listed below" in row and len(row) < 400
    listed = out.split(f"maisi_ct_generative: {count} labels:")[1]
    assert max(len(line) for line in listed.splitlines()) <= 112 and "200 body" in listed


def test_fetch_leaves_out_the_files_no_task_reads(tmp_path, monkeypatch, capsys):
    """``meddiff fetch maisi_ct_generative`` downloads the weights a label map needs, checks their md5s, and not
    the mask generator, candidate-mask database or datasets (GBs) unless --all-files; it says what it left out."""
    import shutil

    import monai.apps
    import monai.bundle

    published = write_maisi_bundle(tmp_path / "published" / "maisi_ct_generative", "1.0")
    weights = [p.relative_to(published).as_posix() for p in (published / "models").glob("*.pt")]
    requested = []

    def download(name, bundle_dir, **kwargs):  # the bundle's zip: everything but its large files
        shutil.copytree(published, f"{bundle_dir}/{name}", ignore=shutil.ignore_patterns("*.pt"))

    def download_url(url, filepath, **kwargs):
        rel = filepath.relative_to(filepath.parents[1]).as_posix()
        requested.append(rel)
        if rel not in weights:
            raise ConnectionError("not on this test's server")
        shutil.copy(published / rel, filepath)

    monkeypatch.setattr(monai.bundle, "download", download)
    monkeypatch.setattr(monai.apps, "download_url", download_url)
    assert main(["fetch", "maisi_ct_generative", "--dir", str(tmp_path / "zoo")]) == 0
    err = capsys.readouterr().err
    assert sorted(requested) == sorted(weights) and "md5 checked" in err
    assert "not downloaded" in err and "datasets/all_masks_flexible_size_and_spacing_3000.zip" in err
    requested.clear()
    assert main(["fetch", "maisi_ct_generative", "--dir", str(tmp_path / "zoo2"), "--all-files"]) == 2
    assert any(rel.startswith("models/mask_generation_") for rel in requested)


def test_generate_mr_from_noise_with_an_nv_generate_mr_folder(tmp_path, capsys):
    """NV-Generate-CTMR's rflow-mr: no map; its modality and guidance scale from its files, recorded."""
    from napari_meddiff.testing.maisi_bundles import write_nv_generate_mr_folder

    folder = write_nv_generate_mr_folder(tmp_path / "NV-Generate-CTMR", modality=9, guidance=15.0)
    args = ["generate", "--model", str(folder), "--steps", "2", "--precision", "fp32"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b"), "--guidance-scale", "1"]) == 0
    sidecar = json.loads((tmp_path / "a" / "NV-Generate-CTMR_seed0.json").read_text())
    assert sidecar["guidance_scale"] == 15.0 and sidecar["conditions"] == {"modality": 9.0}
    scan, unguided = (nib.load(tmp_path / run / "NV-Generate-CTMR_seed0.nii.gz") for run in ("a", "b"))
    assert scan.shape == (16, 16, 16) and np.allclose(scan.header.get_zooms(), (1.25, 1.0, 1.0))
    assert 0 <= scan.get_fdata().min() and not np.array_equal(scan.get_fdata(), unguided.get_fdata())
    capsys.readouterr()
    a_map = str(tmp_path / "a" / "NV-Generate-CTMR_seed0.nii.gz")
    assert main([*args, "--out", str(tmp_path / "c"), "--labels", a_map]) != 0
    assert "does not generate from a label map" in capsys.readouterr().err and not (tmp_path / "c").exists()
