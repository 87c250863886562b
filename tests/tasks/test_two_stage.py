"""Two-stage generation: a map generator draws a tissue map, a label-map model makes the scan on it."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from napari_meddiff.errors import MeddiffError
from napari_meddiff.io.volume import read_volume
from napari_meddiff.models import load_model, sha256_file
from napari_meddiff.tasks.generate import generate
from napari_meddiff.testing.tiny_models import make_tiny_model
from tests.helpers import run_cli

LABELS = {0: "background", 1: "CSF", 2: "GM", 3: "WM", 4: "lesion"}
SCAN_MODEL = "tiny-t1w-from-maps-3d"


@pytest.fixture(scope="module")
def two_stage_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("two-stage")
    make_tiny_model(root / "tiny-maps-3d", "ddpm", 3, label_output=LABELS)
    make_tiny_model(root / SCAN_MODEL, "ddpm", 3, label_map=LABELS, map_generator="tiny-maps-3d")
    return root


def test_a_map_generator_samples_label_maps_on_its_grid(two_stage_root):
    model = load_model(two_stage_root / "tiny-maps-3d")
    assert model.label_output == LABELS and model.sample_shape == (5, 16, 16, 16)
    first, second = generate(model, [0, 1], device="cpu")
    assert first.array.dtype == np.uint8 and set(np.unique(first.array)) <= set(LABELS)
    assert len(np.unique(first.array)) > 1
    assert first.spacing == (4.0, 4.0, 4.0)
    (again,) = generate(model, [0], device="cpu")
    assert np.array_equal(again.array, first.array) and not np.array_equal(first.array, second.array)


def test_without_a_map_the_generator_draws_it_and_the_scan_is_made_on_it(two_stage_root, monkeypatch):
    monkeypatch.setenv("MEDDIFF_MODELS", str(two_stage_root))
    model = load_model(SCAN_MODEL)
    (scan,) = generate(model, [3], device="cpu")
    tissue_map = scan.metadata["tissue_map"]
    (drawn,) = generate("tiny-maps-3d", [3], device="cpu")
    assert np.array_equal(tissue_map.array, drawn.array)  # stage 1: the generator's own sample for the seed
    (from_map,) = generate(model, [3], device="cpu", labels=tissue_map)
    assert np.array_equal(scan.array, from_map.array)  # stage 2: the label-map model on that map, same seed
    assert scan.shape == tissue_map.shape and np.allclose(scan.affine, tissue_map.affine)
    record = scan.metadata["provenance"]
    assert record["tissue_map"]["model"] == "tiny-maps-3d" and record["tissue_map"]["seed"] == 3
    assert "label_map_sha256" not in record  # each subject's map is its own: not a cohort setting


def test_a_generator_drawing_other_labels_is_refused(tmp_path, monkeypatch):
    make_tiny_model(tmp_path / "three-labels", "ddpm", 3, label_output={0: "background", 1: "CSF", 2: "GM"})
    make_tiny_model(tmp_path / "scans", "ddpm", 3, label_map=LABELS, map_generator="three-labels")
    monkeypatch.setenv("MEDDIFF_MODELS", str(tmp_path))
    with pytest.raises(MeddiffError, match="its generator three-labels draws"):
        generate("scans", [0], device="cpu")


def test_the_cli_writes_each_scan_with_its_tissue_map_beside_and_resumes(two_stage_root, tmp_path):
    env = {**os.environ, "MEDDIFF_MODELS": str(two_stage_root)}
    out = tmp_path / "cohort"
    proc = run_cli("generate", "--model", SCAN_MODEL, "--num", "2", "--out", str(out), env=env)
    assert proc.returncode == 0, proc.stderr
    assert "warning" not in proc.stderr and "2 subjects" in proc.stderr
    for seed in (0, 1):
        scan = read_volume(out / f"{SCAN_MODEL}_seed{seed}.nii.gz")
        dseg = read_volume(out / f"{SCAN_MODEL}_seed{seed}_dseg.nii.gz")
        assert np.allclose(scan.affine, dseg.affine) and scan.shape == dseg.shape
        assert set(np.unique(dseg.array)) <= set(LABELS) and len(np.unique(dseg.array)) > 1
        sidecar = json.loads((out / f"{SCAN_MODEL}_seed{seed}.json").read_text())
        assert sidecar["tissue_map_sha256"] == sha256_file(out / f"{SCAN_MODEL}_seed{seed}_dseg.nii.gz")
    kept = (out / f"{SCAN_MODEL}_seed0_dseg.nii.gz").read_bytes()
    (out / f"{SCAN_MODEL}_seed1_dseg.nii.gz").unlink()
    proc = run_cli("generate", "--model", SCAN_MODEL, "--num", "2", "--out", str(out), env=env)
    assert proc.returncode == 0, proc.stderr
    assert "tissue map is missing; regenerating" in proc.stderr and "seed0.nii.gz exists, skipping" in proc.stderr
    assert (out / f"{SCAN_MODEL}_seed1_dseg.nii.gz").is_file()
    assert (out / f"{SCAN_MODEL}_seed0_dseg.nii.gz").read_bytes() == kept


def test_models_lists_what_a_generator_draws_and_who_draws_a_models_maps(two_stage_root):
    listing = run_cli("models", env={**os.environ, "MEDDIFF_MODELS": str(two_stage_root)})
    row = next(line for line in listing.stdout.splitlines() if line.startswith("tiny-maps-3d"))
    assert "draws{0:background,1:CSF,2:GM,3:WM,4:lesion}" in row
    assert f"NOTE: {SCAN_MODEL}: without --labels, tiny-maps-3d draws each map (two stages)" in listing.stdout


def test_inpainting_with_a_label_map_model_still_needs_the_scans_map(two_stage_root, monkeypatch):
    """A drawn map would not be the scan's anatomy: inpainting refuses to run without the scan's own map."""
    from napari_meddiff.io.volume import Volume
    from napari_meddiff.tasks.inpaint import inpaint

    monkeypatch.setenv("MEDDIFF_MODELS", str(two_stage_root))
    scan = Volume(np.random.default_rng(0).random((16, 16, 16), dtype=np.float32), np.diag([4.0, 4.0, 4.0, 1.0]))
    mask = np.zeros((16, 16, 16), bool)
    mask[4:8, 4:8, 4:8] = True
    with pytest.raises(MeddiffError, match="generates a scan from a label map: give one"):
        inpaint(SCAN_MODEL, scan, mask, device="cpu")


def test_a_map_generators_cohort_is_written_as_label_maps(two_stage_root, tmp_path):
    import nibabel as nib

    env = {**os.environ, "MEDDIFF_MODELS": str(two_stage_root)}
    proc = run_cli("generate", "--model", "tiny-maps-3d", "--num", "1", "--out", str(tmp_path), env=env)
    assert proc.returncode == 0, proc.stderr
    img = nib.load(tmp_path / "tiny-maps-3d_seed0.nii.gz")
    assert img.get_data_dtype() == np.uint8 and set(np.unique(np.asarray(img.dataobj))) <= set(LABELS)
    (drawn,) = generate(load_model(two_stage_root / "tiny-maps-3d"), [0], device="cpu")
    np.testing.assert_array_equal(np.asarray(img.dataobj), drawn.array)
