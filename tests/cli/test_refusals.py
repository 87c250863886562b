"""Requests the CLI refuses before any work, leaving every file as it was (issue 36)."""

from __future__ import annotations

import time

import numpy as np

from napari_meddiff.data.mni152 import write_cohort
from tests.helpers import assert_one_line_error, run_cli, snapshot, write_nifti


def test_a_training_cohorts_manifest_is_never_replaced(cli_env, tmp_path):
    """`meddiff cohort` writes cohort.csv too (subjects, split, labels): generate's manifest must not replace it,
    neither by --merge-manifest nor by generating into the folder."""
    cohort = tmp_path / "cohort"
    write_cohort(cohort, num=1, seed=3)
    before = snapshot(cohort)
    proc = run_cli("generate", "--merge-manifest", cohort, env=cli_env)
    assert_one_line_error(proc, "is not a manifest of generated volumes")
    proc = run_cli("generate", "--model", "tiny-ldm-3d", "--num", "1", "--steps", "1", "--out", cohort, env=cli_env)
    assert_one_line_error(proc, "is not a manifest of generated volumes")
    assert snapshot(cohort) == before


def test_merging_a_folder_without_generated_volumes_writes_nothing(cli_env, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    proc = run_cli("generate", "--merge-manifest", tmp_path, env=cli_env)
    assert_one_line_error(proc, "holds no generated volumes")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_billion_candidates_are_refused_at_once(cli_env, tmp_path):
    """The output paths of every candidate were built (and checked) before the memory estimate: minutes."""
    image = write_nifti(tmp_path / "scan.nii.gz", np.ones((16, 16, 16)))
    t0 = time.perf_counter()
    proc = run_cli(
        "inpaint", "--model", "tiny-ldm-3d", "--image", image, "--mask", image, "--out", tmp_path / "x.nii.gz",
        "--candidates", "1000000000", env=cli_env,
    )  # fmt: skip
    assert_one_line_error(proc, "would need about")
    assert time.perf_counter() - t0 < 30 and not (tmp_path / "x.nii.gz").exists()
