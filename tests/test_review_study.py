"""Reader study core (no Qt): blinded set-up, append-only results, summary numbers checked by hand."""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import warnings

import nibabel as nib
import numpy as np
import pytest

from napari_meddiff.errors import MeddiffError
from napari_meddiff.review.results import Answer, ResultsLog, read_answers, results_path, sanitise_reader
from napari_meddiff.review.study import Study, create_study, display_array, display_window, read_key
from napari_meddiff.review.summary import cohen_kappa, format_summary, summarize, wilson_ci
from napari_meddiff.volume import Volume

SHAPE = (9, 8, 7)
AFFINE = np.array([[-1.2, 0, 0, 30], [0, 1.2, 0, -20], [0, 0, 2.5, 10], [0, 0, 0, 1]])


def _nifti(path, array, descrip, aux, intent):
    img = nib.Nifti1Image(array, AFFINE)
    img.header["descrip"] = descrip.encode()
    img.header["aux_file"] = aux.encode()
    img.header.set_intent("estimate", name=intent)
    img.header.extensions.append(nib.nifti1.Nifti1Extension("comment", f"made by {aux}".encode()))
    nib.save(img, str(path))
    path.with_name(path.name.split(".")[0] + ".json").write_text(json.dumps({"source": aux}))


@pytest.fixture
def inputs(tmp_path):
    """6 int16 'real' scans and 6 float64 'synthetic' ones with telling names, headers and sidecars."""
    rng = np.random.default_rng(0)
    real, syn = tmp_path / "real", tmp_path / "synthetic"
    real.mkdir()
    syn.mkdir()
    for i in range(6):
        _nifti(real / f"sub-{i:02d}_T1w.nii.gz", rng.integers(0, 900, SHAPE).astype(np.int16),
               "Siemens Prisma MPRAGE", "real-scanner", "anat")
        _nifti(syn / f"ldm_seed{i}.nii", rng.random(SHAPE) * 900, "meddiff ldm seed", "synthetic-ldm", "gen")
    return real, syn


def test_create_study_blinds_every_case(inputs, tmp_path):
    real, syn = inputs
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same grid for both sources: no warning
        study = create_study(real, syn, tmp_path / "study", seed=3)
    ids = study.ids
    assert len(ids) == 12 and len(set(ids)) == 12
    assert all(re.fullmatch(r"case-[0-9a-f]{6}", cid) for cid in ids)
    files = sorted(p.relative_to(study.folder).as_posix() for p in study.folder.rglob("*") if p.is_file())
    assert files == sorted(["cases.json", "key.json", *(f"cases/{cid}.nii.gz" for cid in ids)])  # no sidecars

    headers = [nib.load(str(study.path(c))).header for c in study.cases]
    for h in headers:
        assert h["descrip"].tobytes().strip(b"\0") == b""
        assert h["aux_file"].tobytes().strip(b"\0") == b""
        assert h["intent_name"].tobytes().strip(b"\0") == b""
        assert h.get_data_dtype() == np.float32
        assert len(h.extensions) == 0
    assert len({h.binaryblock for h in headers}) == 1  # same grid -> byte-identical headers, whatever the source

    key = read_key(study.folder)
    assert set(key) == set(ids)
    assert sorted(v["source"] for v in key.values()) == ["real"] * 6 + ["synthetic"] * 6
    cases_text = (study.folder / "cases.json").read_text()
    for word in ("real", "synthetic", "sub-", "seed", "original"):
        assert word not in cases_text
    assert "must NOT open" in json.loads((study.folder / "key.json").read_text())["note"]
    for case in study.cases:  # voxels and geometry unchanged; display window by one rule
        original = nib.load(key[case.case_id]["original"])
        vol = study.read(case)
        np.testing.assert_allclose(vol.array, np.asarray(original.dataobj, dtype=np.float32))
        np.testing.assert_allclose(vol.affine, AFFINE, atol=1e-5)
        assert vol.metadata == {}
        assert case.contrast_limits == pytest.approx(display_window(vol.array))


def test_same_seed_same_study_and_num_per_source(inputs, tmp_path):
    real, syn = inputs
    a = create_study(real, syn, tmp_path / "a", num=2, seed=7)
    b = create_study(real, syn, tmp_path / "b", num=2, seed=7)
    c = create_study(real, syn, tmp_path / "c", num=2, seed=8)
    assert a.cases == [type(x)(x.case_id, x.file, x.contrast_limits) for x in b.cases]
    assert read_key(a.folder) == read_key(b.folder)
    assert a.ids != c.ids
    assert sorted(v["source"] for v in read_key(a.folder).values()) == ["real", "real", "synthetic", "synthetic"]


def test_create_refuses_bad_requests(inputs, tmp_path):
    real, syn = inputs
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("x")
    with pytest.raises(MeddiffError, match="not empty"):
        create_study(real, syn, out)
    assert sorted(os.listdir(out)) == ["notes.txt"]
    with pytest.raises(MeddiffError, match="only 6"):
        create_study(real, syn, tmp_path / "s", num=7)
    with pytest.raises(MeddiffError, match="same folder"):
        create_study(real, real, tmp_path / "s")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MeddiffError, match="no images"):
        create_study(real, empty, tmp_path / "s")
    assert not (tmp_path / "s").exists()
    (tmp_path / "empty-out").mkdir()
    assert len(create_study(real, syn, tmp_path / "empty-out", num=1).cases) == 2  # an empty folder is fine


def test_warns_when_sources_are_on_different_grids(inputs, tmp_path):
    real, _ = inputs
    other = tmp_path / "other"
    other.mkdir()
    nib.save(nib.Nifti1Image(np.ones((16, 16, 16), np.float32), np.eye(4)), str(other / "x.nii.gz"))
    with pytest.warns(UserWarning, match="different grids"):
        create_study(real, other, tmp_path / "s", num=1)


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
    real, syn = inputs
    study = create_study(real, syn, tmp_path / "study", num=5, seed=1)
    key = read_key(study.folder)
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

    s = summarize(study.folder)
    a = s["readers"]["ann"]
    assert (a["n"], a["correct"], a["accuracy"]) == (10, 7, 0.7)
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

    on_disk = json.loads((study.folder / "summary.json").read_text())
    assert on_disk["readers"]["ann"]["correct"] == 7
    csv_text = (study.folder / "summary.csv").read_text()
    assert "pair:ann|ben,cohen_kappa,0.4" in csv_text and "reader:ann,accuracy,0.7" in csv_text
    assert (study.folder / "realism_by_source.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = format_summary(s)
    assert "70.0% (7/10)" in text and "kappa ann vs ben: 0.40" in text


def test_kappa_and_wilson_edge_cases():
    assert cohen_kappa([], []) is None
    assert cohen_kappa(["real"] * 3, ["real"] * 3) is None  # no variation: undefined
    assert cohen_kappa(["real", "synthetic"], ["synthetic", "real"]) == pytest.approx(-1.0)
    assert wilson_ci(0, 0) is None
    lo, hi = wilson_ci(10, 10)
    assert hi == 1.0 and 0.69 < lo < 0.73


def test_summary_needs_answers(inputs, tmp_path):
    study = create_study(*inputs, tmp_path / "study", num=1)
    with pytest.raises(MeddiffError, match="no answers"):
        summarize(study.folder)
    assert Study.load(study.folder).ids == study.ids


def test_cli_create_and_summary(inputs, tmp_path, capsys):
    from napari_meddiff.cli import main

    real, syn = inputs
    out = tmp_path / "study"
    assert main(["review", "create", "--real", str(real), "--synthetic", str(syn), "--out", str(out),
                 "--num", "3", "--seed", "2"]) == 0
    study = Study.load(out)
    assert len(study.cases) == 6
    assert main(["review", "create", "--real", str(real), "--synthetic", str(syn), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    log = ResultsLog(out, "ann")
    for cid in study.ids:
        log.append(Answer(cid, "ann", "real", 3))
    assert main(["review", "summary", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "50.0% (3/6)" in printed and "summary.csv" in printed
    assert results_path(out, "ann").exists() and (out / "summary.json").exists()
