"""Training never replaces what it did not write (`training.pipeline`, issue 13): an existing or non-folder --out
is refused and left intact, --resume needs a checkpoint, a failed run leaves no work dir holding only its
config."""

from __future__ import annotations

import numpy as np

from tests.helpers import assert_one_line_error, run_cli, snapshot, tiny_train_config, write_nifti


def test_train_refuses_an_existing_out_folder_and_leaves_it_intact(tmp_path):
    config = tiny_train_config(tmp_path)
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "chapter1.tex").write_text("months of work")
    before = snapshot(out)
    for extra in ([], ["--overwrite"]):
        proc = run_cli("train", config, "--out", out, "--work-dir", tmp_path / "run", *extra)
        assert_one_line_error(proc, str(out))
        assert snapshot(out) == before


def test_train_out_that_is_a_file_is_a_user_error(tmp_path):
    config = tiny_train_config(tmp_path)
    out = tmp_path / "model"
    out.write_text("not a folder")
    proc = run_cli("train", config, "--out", out, "--work-dir", tmp_path / "run")
    assert_one_line_error(proc, "is not a folder")
    assert out.read_text() == "not a folder"


def test_resume_without_a_checkpoint_is_refused(tmp_path):
    config = tiny_train_config(tmp_path)
    proc = run_cli("train", config, "--out", tmp_path / "m", "--work-dir", tmp_path / "run", "--resume")
    assert_one_line_error(proc, "no checkpoint")
    assert not (tmp_path / "m").exists()


def test_failed_training_leaves_no_work_dir_with_only_the_config(tmp_path):
    config = tiny_train_config(tmp_path)  # its data folder holds no usable slice: found after the work dir was made
    (tmp_path / "no-data-needed").mkdir()
    write_nifti(tmp_path / "no-data-needed" / "sub-000000_T1w.nii.gz", np.zeros((8, 8, 8)))
    proc = run_cli("train", config, "--out", tmp_path / "m", "--work-dir", tmp_path / "run")
    assert_one_line_error(proc, "no training items")
    assert not (tmp_path / "run").exists()
