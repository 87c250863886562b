"""A resumed ``meddiff cohort`` checks the subjects it finds (issue 36): each file against the sha256 that
cohort.csv records for it (a cohort written before they were recorded: read in full, the gzip CRC checked), and a
damaged subject is written again, said in the log; a cohort.csv that is not a cohort's is never replaced."""

from __future__ import annotations

import csv
import hashlib
import logging

import pytest

from napari_meddiff.data.mni152 import (
    LEGACY_MANIFEST_FIELDS,
    MANIFEST,
    subject_files,
    subject_has_lesion,
    write_cohort,
)
from tests.helpers import assert_one_line_error, run_cli, snapshot

LESION_SEED = 5  # a lesion subject: all four files


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A one-subject cohort as written, and the bytes of its files."""
    assert subject_has_lesion(LESION_SEED)
    out = tmp_path_factory.mktemp("cohort")
    write_cohort(out, 1, seed=LESION_SEED, progress=False)
    return out, snapshot(out)


def _copy(written, tmp_path):
    out, files = written
    copy = tmp_path / "cohort"
    copy.mkdir()
    for name, data in files.items():
        (copy / name).write_bytes(data)
    return copy, files


def _rows(out):
    with open(out / MANIFEST, newline="") as f:
        return list(csv.DictReader(f))


def test_the_manifest_records_each_files_sha256(written):
    out, files = written
    (row,) = _rows(out)
    for kind, name in subject_files(LESION_SEED).items():
        assert row[f"{kind}_sha256"] == hashlib.sha256(files[name]).hexdigest()


def test_a_damaged_subject_is_written_again_on_resume(written, tmp_path, caplog):
    out, files = _copy(written, tmp_path)
    names = subject_files(LESION_SEED)
    labels = out / names["labels"]
    labels.write_bytes(files[names["labels"]][:-100])  # truncated
    mask = bytearray(files[names["lesion_mask"]])
    mask[4] ^= 1  # the gzip header's time stamp: the data and their CRC still read, only the sha256 tells
    (out / names["lesion_mask"]).write_bytes(bytes(mask))
    with caplog.at_level(logging.WARNING):
        write_cohort(out, 1, seed=LESION_SEED, progress=False)
    assert names["labels"] in caplog.text and names["lesion_mask"] in caplog.text
    assert "sha256 differs from the one recorded in cohort.csv" in caplog.text
    assert "writing this subject again" in caplog.text
    assert snapshot(out) == files  # the same subject, byte for byte, and its manifest


def test_a_cohort_from_before_the_sha256s_is_read_in_full_and_completed(written, tmp_path, caplog):
    out, files = _copy(written, tmp_path)
    names = subject_files(LESION_SEED)
    (row,) = _rows(out)
    with open(out / MANIFEST, "w", newline="") as f:  # the manifest an older version wrote
        writer = csv.DictWriter(f, fieldnames=LEGACY_MANIFEST_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerow({k: row[k] for k in LEGACY_MANIFEST_FIELDS})
    image = bytearray(files[names["image"]])
    image[len(image) // 2] ^= 1  # a flipped bit in the compressed data: gzip's checks fail
    (out / names["image"]).write_bytes(bytes(image))
    with caplog.at_level(logging.WARNING):
        write_cohort(out, 1, seed=LESION_SEED, progress=False)
    assert f"cannot read {out / names['image']}" in caplog.text and "writing this subject again" in caplog.text
    assert snapshot(out) == files  # written again, and the manifest has its sha256s again


def test_an_intact_cohort_from_before_the_sha256s_is_kept_and_recorded(written, tmp_path, caplog):
    out, files = _copy(written, tmp_path)
    (row,) = _rows(out)
    with open(out / MANIFEST, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LEGACY_MANIFEST_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerow({k: row[k] for k in LEGACY_MANIFEST_FIELDS})
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.nii.gz")}
    with caplog.at_level(logging.WARNING):
        write_cohort(out, 1, seed=LESION_SEED, progress=False)
    assert "again" not in caplog.text
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.nii.gz")} == mtimes  # nothing written again
    assert snapshot(out) == files


@pytest.mark.parametrize("extra", [[], ["--overwrite"]])
def test_a_generated_volumes_manifest_is_never_replaced(tmp_path, extra):
    """`meddiff generate` writes a cohort.csv of its own (the mirror of `tasks.batch.check_manifest_is_ours`)."""
    folder = tmp_path / "generated"
    folder.mkdir()
    (folder / MANIFEST).write_text("file,seed,model,sha256,seconds,conditions\nm_seed0.nii.gz,0,m,ab12,1.5,\n")
    before = snapshot(folder)
    proc = run_cli("cohort", "--num", "1", "--seed", "0", "--out", folder, "--quiet", *extra)
    assert_one_line_error(proc, "is not a cohort manifest (its columns: file, seed, model, sha256")
    assert snapshot(folder) == before  # not even cohort.json
