"""Reader study core (no Qt): blinded set-up, key kept apart, append-only results, summary checked by hand."""

from __future__ import annotations

import json
import math
import os
import re
import stat
import statistics
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from napari_meddiff.errors import MeddiffError
from napari_meddiff.io.volume import Volume
from napari_meddiff.review.inputs import label_reason
from napari_meddiff.review.results import Answer, ResultsLog, read_answers, results_path, sanitise_reader
from napari_meddiff.review.study import Study, create_study, display_array, read_key
from napari_meddiff.review.summary import cohen_kappa, format_summary, summarize, summary_paths, wilson_ci
from tests.helpers import assert_one_line_error, run_cli, write_nifti

REAL_SHAPE, SYN_SHAPE = (9, 8, 7), (10, 12, 8)
REAL_AFFINE = np.array([[-1.2, 0, 0, 30], [0, 1.2, 0, -20], [0, 0, 2.5, 10], [0, 0, 0, 1]])
SYN_AFFINE = np.array([[1.0, 0, 0, -5], [0, 1.0, 0, -6], [0, 0, 2.0, -7], [0, 0, 0, 1]])


def _nifti(path, array, affine, descrip, aux, intent):
    img = nib.Nifti1Image(array, affine)
    img.header["descrip"] = descrip.encode()
    img.header["aux_file"] = aux.encode()
    img.header.set_intent("estimate", name=intent)
    img.header.extensions.append(nib.nifti1.Nifti1Extension("comment", f"made by {aux}".encode()))
    nib.save(img, str(path))
    path.with_name(path.name.split(".")[0] + ".json").write_text(json.dumps({"source": aux}))


@pytest.fixture
def inputs(tmp_path):
    """6 int16 'real' scans and 6 float64 'synthetic' ones on other grids, with telling names, headers, sidecars."""
    rng = np.random.default_rng(0)
    real, syn = tmp_path / "real", tmp_path / "synthetic"
    real.mkdir()
    syn.mkdir()
    for i in range(6):
        _nifti(
            real / f"sub-{i:02d}_T1w.nii.gz",
            rng.integers(0, 900, REAL_SHAPE).astype(np.int16),
            REAL_AFFINE,
            "Siemens Prisma MPRAGE",
            "real-scanner",
            "anat",
        )
        _nifti(
            syn / f"ldm_seed{i}.nii",
            rng.random(SYN_SHAPE) * 3.0 - 1.0,
            SYN_AFFINE,
            "meddiff ldm seed",
            "synthetic-ldm",
            "gen",
        )
    return real, syn


def _study(inputs, tmp_path, name="study", **kw):
    return create_study(*inputs, tmp_path / name, key=tmp_path / "keys" / f"{name}.json", **kw)


def test_every_case_on_one_grid_stored_alike(inputs, tmp_path):
    study = _study(inputs, tmp_path, seed=3)
    key_path = tmp_path / "keys" / "study.json"
    ids = study.ids
    assert len(ids) == 12 and len(set(ids)) == 12
    assert all(re.fullmatch(r"case-[0-9a-f]{8}", cid) for cid in ids)
    files = sorted(p.relative_to(study.folder).as_posix() for p in study.folder.rglob("*") if p.is_file())
    assert files == sorted(["cases.json", *(f"cases/{cid}.nii.gz" for cid in ids)])  # no key, no sidecars

    images = [nib.load(str(study.path(c))) for c in study.cases]
    assert len({img.header.binaryblock for img in images}) == 1  # byte-identical headers across sources
    h = images[0].header
    scaling = (images[0].dataobj.slope, images[0].dataobj.inter)
    assert h.get_data_dtype() == np.uint8 and scaling == pytest.approx((1 / 255, 0.0))
    assert (h["cal_min"], h["cal_max"]) == (0.0, 1.0) and len(h.extensions) == 0
    assert h["descrip"].tobytes().strip(b"\0") == h["aux_file"].tobytes().strip(b"\0") == b""
    assert h["intent_name"].tobytes().strip(b"\0") == b""
    assert images[0].shape == SYN_SHAPE  # the synthetic scans' grid, for the real cases too
    np.testing.assert_allclose(images[0].affine, SYN_AFFINE, atol=1e-5)
    for c in study.cases:
        raw = study.path(c).read_bytes()
        assert raw[3] == 0 and raw[4:8] == b"\0\0\0\0"  # gzip: no file name, no time stamp
    assert len({os.stat(study.path(c)).st_mtime for c in study.cases}) == 1  # writing order not on disk

    key = read_key(key_path, study)
    assert sorted(v["source"] for v in key.values()) == ["real"] * 6 + ["synthetic"] * 6
    doc = json.loads((study.folder / "cases.json").read_text())
    assert {tuple(c["contrast_limits"]) for c in doc["cases"]} == {(0.0, 1.0)}  # one display window for all
    for word in ("real", "synthetic", "sub-", "seed", "original"):
        assert word not in (study.folder / "cases.json").read_text()
    (x0, y0, z0), (x1, y1, z1) = json.loads(key_path.read_text())["field_of_view"]["box"]
    inside = np.zeros(SYN_SHAPE, bool)  # the real scans do not cover the whole grid: every case shows what all cover
    inside[x0 : x1 + 1, y0 : y1 + 1, z0 : z1 + 1] = True
    for case in study.cases:
        vol = study.read(case)
        assert vol.metadata == {} and vol.array.min() == 0.0 and vol.array.max() == 1.0
        assert not vol.array[~inside].any()
        levels = np.rint(vol.array * 255)
        np.testing.assert_allclose(vol.array * 255, levels, atol=1e-3)  # 256 levels, the same scale for all
        if key[case.case_id]["source"] == "synthetic":  # already on the grid: no interpolation, the rule by hand
            x = np.asarray(nib.load(key[case.case_id]["original"]).dataobj, dtype=np.float32)[inside]
            levels = levels[inside]
            lo, hi = np.percentile(x, 0.5), np.percentile(x[x > x.mean()], 99.5)
            expected = np.rint(np.clip((x - lo) / (hi - lo), 0, 1) * 255)
            assert np.abs(levels - expected).max() <= 1 and np.mean(levels == expected) > 0.99


def test_common_grid_can_be_given_and_must_exist(inputs, tmp_path):
    real, _ = inputs
    ref_affine = np.diag([2.0, 2.0, 3.0, 1.0])
    nib.save(nib.Nifti1Image(np.zeros((6, 5, 4), np.float32), ref_affine), str(tmp_path / "grid.nii.gz"))
    study = _study(inputs, tmp_path, num=2, grid=tmp_path / "grid.nii.gz")
    for case in study.cases:
        vol = study.read(case)
        assert vol.shape == (6, 5, 4)
        np.testing.assert_allclose(vol.affine, ref_affine, atol=1e-6)
    other = tmp_path / "mixed"
    other.mkdir()
    for shape in ((8, 8, 8), (16, 16, 16)):
        nib.save(nib.Nifti1Image(np.random.default_rng(1).random(shape), np.eye(4)), str(other / f"s{shape[0]}.nii"))
    with pytest.raises(MeddiffError, match="2 different grids.*--grid"):
        create_study(real, other, tmp_path / "s2", key=tmp_path / "k2.json")
    assert not (tmp_path / "s2").exists() and not (tmp_path / "k2.json").exists()


def test_key_is_kept_outside_the_study_and_never_overwritten(inputs, tmp_path):
    with pytest.raises(MeddiffError, match="inside the study folder"):
        create_study(*inputs, tmp_path / "s", key=tmp_path / "s" / "key.json")
    with pytest.raises(MeddiffError, match="inside the study folder"):
        create_study(*inputs, tmp_path / "s", key=tmp_path / "s" / "cases" / "k.json")
    assert not (tmp_path / "s").exists()
    key = tmp_path / "key.json"
    key.write_text("my notes")
    with pytest.raises(MeddiffError, match="never overwritten"):
        create_study(*inputs, tmp_path / "s", key=key)
    assert key.read_text() == "my notes" and not (tmp_path / "s").exists()

    a = _study(inputs, tmp_path, "a", num=1)
    b = _study(inputs, tmp_path, "b", num=1)
    ResultsLog(a.folder, "ann").append(Answer(a.ids[0], "ann", "real", 3))
    with pytest.raises(MeddiffError, match="not the key of the study"):
        summarize(a.folder, tmp_path / "keys" / "b.json")
    with pytest.raises(MeddiffError, match="key not found"):
        summarize(a.folder, tmp_path / "keys" / "nothing.json")
    s = summarize(a.folder, tmp_path / "keys" / "a.json")
    assert s["readers"]["ann"]["n"] == 1 and b.study_id != a.study_id
    paths = summary_paths(tmp_path / "keys" / "a.json")
    assert [p.name for p in paths] == ["a-summary.json", "a-summary.csv", "a-realism_by_source.png"]
    assert all(p.exists() for p in paths)
    assert not any(p.name.startswith("summary") or p.suffix == ".png" for p in a.folder.iterdir())


def test_fresh_random_order_and_ids_per_study_unless_seeded(inputs, tmp_path):
    def originals(name):
        study = Study.load(tmp_path / name)
        key = read_key(tmp_path / "keys" / f"{name}.json", study)
        return study.ids, [key[c]["original"] for c in study.ids]

    for name in ("a", "b"):
        _study(inputs, tmp_path, name)  # no seed: each study draws its own
    (ids_a, order_a), (ids_b, order_b) = originals("a"), originals("b")
    assert not set(ids_a) & set(ids_b) and order_a != order_b
    seeds = [json.loads((tmp_path / "keys" / f"{n}.json").read_text())["seed"] for n in ("a", "b")]
    assert seeds[0] != seeds[1]
    for name in ("c", "d"):
        _study(inputs, tmp_path, name, num=2, seed=7)
    assert originals("c") == originals("d")  # an explicit seed reproduces the study
    assert sorted(v["source"] for v in read_key(tmp_path / "keys" / "c.json", Study.load(tmp_path / "c")).values()) == [
        "real",
        "real",
        "synthetic",
        "synthetic",
    ]


def test_label_maps_and_masks_are_not_scans(inputs, tmp_path):
    real, syn = inputs
    labels = np.random.default_rng(2).integers(0, 4, REAL_SHAPE).astype(np.uint8)
    nib.save(nib.Nifti1Image(labels, REAL_AFFINE), str(real / "sub-00_dseg.nii.gz"))
    nib.save(nib.Nifti1Image((labels > 1).astype(np.float32), REAL_AFFINE), str(real / "brain.nii.gz"))  # no hint
    skipped = []
    study = create_study(
        real, syn, tmp_path / "s", key=tmp_path / "k.json", on_skip=lambda p, why: skipped.append((p.name, why))
    )
    assert [name for name, _ in skipped] == ["brain.nii.gz", "sub-00_dseg.nii.gz"]
    assert "2 distinct value" in skipped[0][1] and "name" in skipped[1][1]
    assert len(study.cases) == 12
    assert label_reason(tmp_path / "sub-01_lesion.nii.gz") and label_reason(tmp_path / "x_mask.nii")
    assert label_reason(tmp_path / "labels.nii.gz")
    assert label_reason(tmp_path / "brain-t1w-from-labels-3d_seed0_dseg.nii")
    scan = np.linspace(0, 1, 100)  # a label-map model's generated scan: its model's name says "labels"
    assert label_reason(tmp_path / "brain-t1w-from-labels-3d_seed0.nii.gz", scan) is None
    assert label_reason(tmp_path / "sub-01_T1w-lesionfree.nii.gz", np.linspace(0, 1, 100)) is None
    assert label_reason(tmp_path / "ct.nii", np.arange(-1000, 1000, dtype=np.int16)) is None  # integer scan


def test_create_refuses_bad_requests(inputs, tmp_path):
    real, syn = inputs
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("x")
    with pytest.raises(MeddiffError, match="not empty"):
        create_study(real, syn, out, key=tmp_path / "k.json")
    assert sorted(os.listdir(out)) == ["notes.txt"]
    with pytest.raises(MeddiffError, match="only 6"):
        create_study(real, syn, tmp_path / "s", key=tmp_path / "k.json", num=7)
    with pytest.raises(MeddiffError, match="same folder"):
        create_study(real, real, tmp_path / "s", key=tmp_path / "k.json")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MeddiffError, match="no images"):
        create_study(real, empty, tmp_path / "s", key=tmp_path / "k.json")
    assert not (tmp_path / "s").exists() and not (tmp_path / "k.json").exists()
    (tmp_path / "empty-out").mkdir()
    assert len(create_study(real, syn, tmp_path / "empty-out", key=tmp_path / "k.json", num=1).cases) == 2


def test_old_unblinded_study_is_refused(tmp_path):
    (tmp_path / "cases.json").write_text(
        json.dumps(
            {
                "version": 1,
                "cases": [{"id": "case-000001", "file": "cases/case-000001.nii.gz", "contrast_limits": [3.0, 870.0]}],
            }
        )
    )
    with pytest.raises(MeddiffError, match="older meddiff.*not blinded"):
        Study.load(tmp_path)


def test_display_is_axial_radiological_whatever_the_stored_orientation():
    a = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    ras = Volume(a, np.diag([1.0, 2.0, 3.0, 1.0]))
    data, scale = display_array(ras)
    assert data.shape == (6, 5, 4) and scale == (3.0, 2.0, 1.0)
    z, r, c = 2, 1, 3
    assert data[z, r, c] == a[4 - 1 - c, 5 - 1 - r, z]  # anterior up, patient right on screen left
    las = Volume(a[::-1].copy(), np.diag([-1.0, 2.0, 3.0, 1.0]))  # same anatomy stored flipped
    np.testing.assert_array_equal(display_array(las)[0], data)


def test_results_append_fsync_latest_wins(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    log = ResultsLog(tmp_path, "Dr. Ann/Smith")
    assert log.path.name == "results-dr._ann_smith.jsonl"
    log.append(Answer("case-000001", log.reader, "real", 4, ("blur", "other"), "ok"))
    n_after_first = len(synced)
    assert n_after_first >= 1
    log.append(Answer("case-000002", log.reader, "synthetic", 2))
    log.append(Answer("case-000001", log.reader, "synthetic", 1, ("noise pattern",), "changed my mind"))
    assert len(synced) >= n_after_first + 2  # every answer fsynced
    lines = log.path.read_text().splitlines()
    assert len(lines) == 3
    rec = json.loads(lines[0])
    assert set(rec) == {"case_id", "reader", "real_or_synthetic", "realism", "artefacts", "comment", "timestamp"}
    assert rec["reader"] == "Dr. Ann/Smith" and rec["artefacts"] == ["blur", "other"] and rec["timestamp"]
    latest = log.load()
    assert latest["case-000001"].real_or_synthetic == "synthetic" and latest["case-000001"].comment == "changed my mind"
    other = ResultsLog(tmp_path, "Ben")
    other.append(Answer("case-000001", "Ben", "real", 5))
    assert other.path != log.path and len(log.load()) == 2 and len(other.load()) == 1
    with pytest.raises(MeddiffError):
        Answer("c", "r", "maybe", 3)
    with pytest.raises(MeddiffError):
        Answer("c", "r", "real", 6)
    with pytest.raises(MeddiffError):
        sanitise_reader(" /// ")


def test_truncated_last_line_is_tolerated_and_repaired(tmp_path):
    log = ResultsLog(tmp_path, "ann")
    for k in range(3):
        log.append(Answer(f"case-00000{k}", "ann", "real", 3))
    raw = log.path.read_bytes()
    log.path.write_bytes(raw[:-25])  # killed in the middle of writing the third record
    answers, damaged = read_answers(log.path)
    assert [a.case_id for a in answers] == ["case-000000", "case-000001"] and damaged == 1
    log.append(Answer("case-000002", "ann", "synthetic", 2))  # must not be glued onto the broken line
    latest = log.load()
    assert sorted(latest) == ["case-000000", "case-000001", "case-000002"]
    assert latest["case-000002"].real_or_synthetic == "synthetic" and log.damaged == 1


def test_summary_matches_hand_computation(inputs, tmp_path):
    study = _study(inputs, tmp_path, num=5, seed=1)
    key_path = tmp_path / "keys" / "study.json"
    key = read_key(key_path, study)
    real_ids = [c for c in study.ids if key[c]["source"] == "real"]
    syn_ids = [c for c in study.ids if key[c]["source"] == "synthetic"]
    cases = real_ids + syn_ids  # 5 real then 5 synthetic
    calls_a = "RRRRS" + "SSSRR"  # 4/5 real right, 3/5 synthetic right -> 7/10
    calls_b = "RRSSS" + "SSRRR"  # 2 + 2 -> 4/10
    realism_a = [5, 4, 4, 3, 5, 2, 3, 1, 4, 2]
    word = {"R": "real", "S": "synthetic"}
    ann, ben = ResultsLog(study.folder, "Ann"), ResultsLog(study.folder, "Ben")
    ann.append(Answer(cases[0], "Ann", "synthetic", 1))  # superseded below: latest wins
    for k, cid in enumerate(cases):
        ann.append(Answer(cid, "Ann", word[calls_a[k]], realism_a[k], ("blur",) if k in (5, 6, 1) else ()))
        ben.append(Answer(cid, "Ben", word[calls_b[k]], 3))

    s = summarize(study.folder, key_path)
    a = s["readers"]["ann"]
    assert (a["n"], a["correct"], a["accuracy"]) == (10, 7, 0.7)
    assert a["damaged_lines"] == [] and a["unknown_case_lines"] == []
    # Wilson by hand: p=0.7, n=10, z=1.96
    z = 1.959963984540054
    centre, half = (0.7 + z * z / 20) / (1 + z * z / 10), z * math.sqrt(0.021 + z * z / 400) / (1 + z * z / 10)
    assert a["ci95"] == pytest.approx([centre - half, centre + half])
    assert a["ci95"] == pytest.approx([0.3968, 0.8922], abs=1e-4)
    # exact two-sided binomial: 2 * P(X >= 7) = 2 * (120 + 45 + 10 + 1) / 1024
    assert a["p_value"] == pytest.approx(2 * sum(math.comb(10, k) for k in range(7, 11)) / 1024)
    assert a["sensitivity"] == pytest.approx(3 / 5) and a["specificity"] == pytest.approx(4 / 5)
    assert a["realism"]["real"] == pytest.approx({"mean": 4.2, "sd": statistics.stdev([5, 4, 4, 3, 5]), "n": 5})
    assert a["realism"]["synthetic"]["mean"] == pytest.approx(2.4)
    assert a["realism_counts"]["synthetic"] == [1, 2, 1, 1, 0]
    assert a["artefacts"]["real"]["blur"] == 1 and a["artefacts"]["synthetic"]["blur"] == 2
    b = s["readers"]["ben"]
    assert (b["correct"], b["sensitivity"], b["specificity"]) == (4, 0.4, 0.4)
    p = s["pooled"]
    assert (p["n"], p["correct"]) == (20, 11)
    assert p["p_value"] == pytest.approx(2 * sum(math.comb(20, k) for k in range(11, 21)) / 2**20)
    # kappa by hand: agree on 7/10 -> po = 0.7; Ann calls real 6/10, Ben 5/10 -> pe = .6*.5 + .4*.5 = .5
    (ag,) = s["agreement"]
    assert ag["readers"] == ["ann", "ben"] and ag["n"] == 10
    assert ag["agreement"] == pytest.approx(0.7) and ag["kappa"] == pytest.approx((0.7 - 0.5) / (1 - 0.5))

    json_path, csv_path, png_path = summary_paths(key_path)
    assert json.loads(json_path.read_text())["readers"]["ann"]["correct"] == 7
    csv_text = csv_path.read_text()
    assert "pair:ann|ben,cohen_kappa,0.4" in csv_text and "reader:ann,accuracy,0.7" in csv_text
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = format_summary(s)
    assert "70.0% (7/10)" in text and "kappa ann vs ben: 0.40" in text and "WARNING" not in text


def test_summary_reports_damaged_and_unknown_case_lines(inputs, tmp_path):
    study = _study(inputs, tmp_path, num=2, seed=5)
    log = ResultsLog(study.folder, "ann")
    log.append(Answer(study.ids[0], "ann", "real", 3))  # line 1
    with open(log.path, "ab") as f:
        f.write(b'{"case_id": "' + study.ids[1].encode() + b'", "reader": "ann", "real_or_s\n')  # line 2: damaged
        f.write(b"not json at all\n")  # line 3: damaged
    log.append(Answer("case-deadbeef", "ann", "synthetic", 2))  # line 4: a case of another study
    log.append(Answer(study.ids[1], "ann", "synthetic", 4))  # line 5
    s = summarize(study.folder, tmp_path / "keys" / "study.json")
    ann = s["readers"]["ann"]
    assert ann["n"] == 2 and ann["damaged_lines"] == [2, 3] and ann["unknown_case_lines"] == [4]
    text = format_summary(s)
    assert "WARNING results-ann.jsonl: skipped 2 damaged line(s) (lines 2, 3)" in text
    assert "1 answer(s) for cases not in this study (line 4)" in text
    assert "reader:ann,damaged_lines,2 3" in summary_paths(tmp_path / "keys" / "study.json")[1].read_text()


def test_kappa_and_wilson_edge_cases():
    assert cohen_kappa([], []) is None
    assert cohen_kappa(["real"] * 3, ["real"] * 3) is None  # no variation: undefined
    assert cohen_kappa(["real", "synthetic"], ["synthetic", "real"]) == pytest.approx(-1.0)
    assert wilson_ci(0, 0) is None
    lo, hi = wilson_ci(10, 10)
    assert hi == 1.0 and 0.69 < lo < 0.73


def test_summary_needs_answers(inputs, tmp_path):
    study = _study(inputs, tmp_path, num=1)
    with pytest.raises(MeddiffError, match="no answers"):
        summarize(study.folder, tmp_path / "keys" / "study.json")
    assert Study.load(study.folder).ids == study.ids


def test_cli_create_and_summary(inputs, tmp_path, capsys):
    from napari_meddiff.cli import main

    real, syn = inputs
    out, key = tmp_path / "study", tmp_path / "keys" / "study.json"
    base = ["review", "create", "--real", str(real), "--synthetic", str(syn), "--out", str(out)]
    with pytest.raises(SystemExit):
        main(base)  # --key is required
    assert "--key" in capsys.readouterr().err and not out.exists()
    assert main([*base, "--key", str(out / "key.json")]) == 2
    assert "meddiff: error:" in capsys.readouterr().err and not out.exists()
    assert main([*base, "--key", str(key), "--num", "3", "--seed", "2"]) == 0
    printed = capsys.readouterr().out
    assert f"--key {key}" in printed
    study = Study.load(out)
    assert len(study.cases) == 6 and not (out / "key.json").exists()
    assert main([*base, "--key", str(tmp_path / "k2.json")]) == 2
    assert "not empty" in capsys.readouterr().err
    log = ResultsLog(out, "ann")
    for cid in study.ids:
        log.append(Answer(cid, "ann", "real", 3))
    with pytest.raises(SystemExit):
        main(["review", "summary", str(out)])  # no key, no summary
    capsys.readouterr()
    assert main(["review", "summary", str(out), "--key", str(key)]) == 0
    printed = capsys.readouterr().out
    assert "50.0% (3/6)" in printed and "study-summary.csv" in printed
    assert results_path(out, "ann").exists() and summary_paths(key)[0].exists()


# --- the sceptical reviewer: can the files alone tell the sources apart? --------------------------------
#
# Each real scan gets a synthetic *stand-in*: the same anatomy written the way a model writes its output (another
# grid, another world frame, another intensity scale, int16, another header and name). On the inputs a simple
# classifier tells the sources apart; on the blinded study files it must be at chance. As the anatomy of a
# scan and its stand-in is the same, whatever the classifier finds in the study is a leak of the study itself.
# Cross-validation leaves out a scan together with its stand-in (one subject), so neither is used to guess
# the other.

SYN_VOXEL = 3.0
MODEL_CENTRE = (0.0, 0.0, 0.0)  # a model's output is centred on the world origin (``generate.to_volume``)


def _stand_in_synthetic(scans, folder, shape):
    """Each scan as a model would write it: on a 3 mm grid over the head, origin-centred, x 41.7 + 150, int16."""
    from napari_meddiff.io.geometry import make_grid, sample_on_grid, world_centre
    from napari_meddiff.io.volume import read_volume

    model_frame = make_grid((SYN_VOXEL,) * 3, shape, MODEL_CENTRE)
    for n, path in enumerate(scans):
        image = read_volume(path)
        over_head = make_grid((SYN_VOXEL,) * 3, shape, np.round(world_centre(image)))
        stored = np.rint(sample_on_grid(image, over_head) * 41.7 + 150).astype(np.int16)
        img = nib.Nifti1Image(stored, model_frame.affine)
        img.header["descrip"] = b"meddiff ldm sample"
        nib.save(img, str(folder / f"sample-{n:03d}.nii"))


def _phantoms(folder, n):
    """Small head-like float32 scans in an MNI-like frame: smooth tissue in an ellipsoid, noisy background."""
    from scipy import ndimage

    rng = np.random.default_rng(11)
    grid = np.indices((40, 48, 40)).astype(np.float32)
    affine = np.array([[2.0, 0, 0, -40], [0, 2.0, 0, -66], [0, 0, 2.0, -22], [0, 0, 0, 1]])
    for i in range(n):
        centre, radii = (
            np.array([19.5, 23.5, 19.5]) + rng.normal(0, 1.0, 3),
            np.array([15, 19, 14]) * rng.uniform(0.9, 1.1),
        )
        inside = (((grid - centre[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0) < 1
        tissue = 60 + 25 * ndimage.gaussian_filter(rng.standard_normal(inside.shape), 2) / 0.1
        noise = np.abs(rng.normal(0, rng.uniform(0.5, 3.0), inside.shape))
        nib.save(
            nib.Nifti1Image((inside * tissue + noise).astype(np.float32), affine),
            str(folder / f"sub-{i:02d}_T1w.nii.gz"),
        )


def _make(root, real, scans, shape):
    syn = root / "synthetic"
    syn.mkdir()
    _stand_in_synthetic(scans, syn, shape)
    skipped = []
    study = create_study(
        real, syn, root / "study", key=root / "key.json", seed=2026, on_skip=lambda p, why: skipped.append(p.name)
    )
    key = read_key(root / "key.json", study)
    subject = {**{p.name: k for k, p in enumerate(scans)}, **{f"sample-{k:03d}.nii": k for k in range(len(scans))}}
    groups = np.array([subject[Path(key[c]["original"]).name] for c in study.ids])
    return study, key, groups, skipped


@pytest.fixture
def phantom_study(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    _phantoms(real, 10)
    return _make(tmp_path, real, sorted(real.glob("*.nii.gz")), (24, 30, 24))


@pytest.fixture(scope="module")
def cohort_study(tmp_path_factory):
    """A held-out cohort folder (with its label maps and lesion masks) as --real, stand-ins as --synthetic."""
    from napari_meddiff.data.mni152 import HELDOUT_SEEDS, write_cohort

    root = tmp_path_factory.mktemp("sceptic")
    real = write_cohort(root / "cohort", 10, seed=HELDOUT_SEEDS[0], progress=False).parent
    return _make(root, real, sorted(real.glob("*_T1w.nii.gz")), (60, 72, 60))  # one scan per subject


def _features(path: Path) -> dict[str, float]:
    """What a reader's tools can see without looking at anatomy: file, header and intensity statistics."""
    img = nib.load(str(path))
    h = img.header
    x = np.asarray(img.dataobj, dtype=np.float64)
    raw = path.read_bytes()
    slope, inter = img.dataobj.slope, img.dataobj.inter
    geometry = {
        **{f"shape{i}": v for i, v in enumerate(img.shape)},
        **{f"voxel{i}": v for i, v in enumerate(h.get_zooms()[:3])},
        **{f"origin{i}": v for i, v in enumerate(img.affine[:3, 3])},
    }
    header = {
        "datatype": h["datatype"],
        "bitpix": h["bitpix"],
        "slope": slope or 1.0,
        "inter": inter or 0.0,
        "cal_min": h["cal_min"],
        "cal_max": h["cal_max"],
        "qform_code": h["qform_code"],
        "sform_code": h["sform_code"],
        "xyzt_units": h["xyzt_units"],
        "descrip": len(h["descrip"].tobytes().strip(b"\0")),
        "extensions": len(h.extensions),
    }
    stored = {"file_size": len(raw), "gzip_time": int.from_bytes(raw[4:8], "little"), "mtime": path.stat().st_mtime}
    stats = {
        "min": x.min(),
        "max": x.max(),
        "mean": x.mean(),
        "std": x.std(),
        "median": np.median(x),
        "distinct": np.unique(x).size,
        "at_min": np.mean(x == x.min()),
        "at_max": np.mean(x == x.max()),
    }
    return {k: float(v) for k, v in {**geometry, **header, **stored, **stats}.items()}


def _cv_correct(features: np.ndarray, labels: np.ndarray, groups: np.ndarray, classify) -> int:
    """Leave-one-subject-out: how many held-out files ``classify(train_x, train_y, x)`` gets right."""
    correct = 0
    for g in np.unique(groups):
        train = groups != g
        correct += sum(
            int(classify(features[train], labels[train], features[i]) == labels[i]) for i in np.flatnonzero(~train)
        )
    return correct


def _nearest_centroid(x, y, query):
    mean, sd = x.mean(0), x.std(0)
    keep = sd > 1e-12 * np.maximum(1.0, np.abs(mean))
    if not keep.any():
        return 0  # nothing varies: no information, a fixed guess
    z, q = (x[:, keep] - mean[keep]) / sd[keep], (query[keep] - mean[keep]) / sd[keep]
    return int(np.argmin([np.linalg.norm(z[y == c].mean(0) - q) for c in (0, 1)]))


def _best_threshold(x, y, query):
    """The single feature and cut that best separate the training files (a decision stump)."""
    best = (-1, 0, 0.0, 1)
    for f in range(x.shape[1]):
        for cut in np.unique(x[:, f]):
            for sign in (1, -1):
                right = int(np.sum((sign * (x[:, f] - cut) > 0) == (y == 1)))
                if right > best[0]:
                    best = (right, f, cut, sign)
    _, f, cut, sign = best
    return int(sign * (query[f] - cut) > 0)


def _chance_limit(n: int) -> int:
    """The most correct calls out of ``n`` a guesser makes with probability >= 1 % (one-sided binomial)."""
    tail = 0.0
    for k in range(n, -1, -1):
        tail += math.comb(n, k) / 2**n
        if tail >= 0.01:
            return k
    return n


def _assert_blind(study, key, groups):
    labels = np.array([key[c]["source"] == "synthetic" for c in study.ids], dtype=int)
    assert labels.sum() * 2 == len(labels) and len(labels) == 2 * len(set(groups))  # a stand-in per scan
    blinded = [_features(study.path(c)) for c in study.cases]
    x = np.array([list(f.values()) for f in blinded])
    x_inputs = np.array([list(_features(Path(key[c]["original"])).values()) for c in study.ids])
    n, limit = len(labels), _chance_limit(len(labels))
    for classify in (_nearest_centroid, _best_threshold):
        # control: on the inputs themselves the same classifier tells the sources apart, so the test can fail
        assert _cv_correct(x_inputs, labels, groups, classify) == n, classify.__name__
        assert _cv_correct(x, labels, groups, classify) <= limit, classify.__name__
    size = np.array([[f["file_size"]] for f in blinded])
    assert _cv_correct(size, labels, groups, _best_threshold) <= limit  # file size alone gives nothing away
    # real scans (another world frame, 6 voxels away) are placed where the model puts the anatomy: over
    # their stand-ins, give or take how far that subject's anatomy lies from the average
    where: dict[int, list] = {}
    for case in study.cases:
        where.setdefault(groups[study.ids.index(case.case_id)], []).append(
            np.argwhere(study.read(case).array > 0.25).mean(0)
        )
    apart = [np.abs(a - b).max() for a, b in where.values()]
    assert np.median(apart) < 1.5 and max(apart) < 3.0  # voxels (not moved: 6 or more)


def test_sceptical_reviewer_cannot_tell_sources_from_the_files(phantom_study):
    study, key, groups, skipped = phantom_study
    assert skipped == []
    _assert_blind(study, key, groups)


@pytest.mark.slow
def test_sceptical_reviewer_on_the_cohort(cohort_study):
    study, key, groups, skipped = cohort_study
    assert any(name.endswith("_dseg.nii.gz") for name in skipped)  # the cohort's label maps are not scans
    assert all(("_dseg" in n or "_lesion." in n or "-lesionfree" in n) for n in skipped)
    assert not any(s in v["original"] for v in key.values() for s in ("_dseg", "_lesion.", "-lesionfree"))
    _assert_blind(study, key, groups)


# --- create through the CLI: nothing left on failure; files follow the umask, the key stays private ---------------


def test_failed_review_create_leaves_no_key_folder(tmp_path):
    (tmp_path / "real").mkdir()
    synthetic = tmp_path / "synthetic"
    synthetic.mkdir()
    write_nifti(synthetic / "s.nii.gz", np.random.default_rng(0).random((8, 8, 8)))
    proc = run_cli(
        "review",
        "create",
        "--real",
        tmp_path / "real",
        "--synthetic",
        synthetic,
        "--out",
        tmp_path / "study",
        "--key",
        tmp_path / "keys" / "deep" / "key.json",
    )
    assert_one_line_error(proc, "no images")
    assert not (tmp_path / "keys").exists() and not (tmp_path / "study").exists()


def test_review_study_files_follow_the_umask_and_the_key_stays_private(tmp_path):
    for source in ("real", "synthetic"):
        (tmp_path / source).mkdir()
        for i in range(2):
            write_nifti(tmp_path / source / f"{source}{i}.nii.gz", np.random.default_rng(i).random((8, 8, 8)))
    proc = run_cli(
        "review",
        "create",
        "--real",
        tmp_path / "real",
        "--synthetic",
        tmp_path / "synthetic",
        "--out",
        tmp_path / "study",
        "--key",
        tmp_path / "key.json",
        umask=0o002,
    )
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE((tmp_path / "study" / "cases.json").stat().st_mode) == 0o664
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "study" / "cases").iterdir()} == {0o664}
    assert stat.S_IMODE((tmp_path / "key.json").stat().st_mode) == 0o600
