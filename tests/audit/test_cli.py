"""``meddiff audit``: a report from the command line, one-line errors, no report overwritten without asking."""

from __future__ import annotations

import shutil

from napari_meddiff.cli import main


def test_meddiff_audit_writes_a_report_and_keeps_it(audit_cohort, tmp_path, capsys):
    synthetic, training = tmp_path / "synthetic", tmp_path / "training"
    synthetic.mkdir()
    training.mkdir()
    copy, (_, source) = next((name, c) for name, c in audit_cohort["copies"].items() if c[0] == "shift")
    for name in (copy, audit_cohort["new"][0]):
        shutil.copy(audit_cohort["synthetic"] / name, synthetic / name)
    others = sorted(p.name for p in audit_cohort["training"].glob("sub-*_T1w.nii.gz") if p.name != source)
    for name in [source, *others[:2]]:  # three subjects: the fewest a leave-one-out threshold takes
        shutil.copy(audit_cohort["training"] / name, training / name)
    out = tmp_path / "report"
    args = ["audit", "--synthetic", str(synthetic), "--training", str(training), "--out", str(out)]
    assert main([*args, "--pairs", "5"]) == 0
    printed = capsys.readouterr()
    assert "memorization: 1 of 2 synthetic volumes flagged" in printed.out
    assert "leave-one-out" in printed.out and copy in printed.out
    assert "reading synthetic" in printed.err  # progress bars on stderr
    assert (out / "audit.json").is_file() and (out / "report.html").is_file()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"meddiff: error: {out / 'audit.json'} exists; not overwriting (use --overwrite / overwrite=True)"]


def test_meddiff_audit_refuses_bad_inputs_in_one_line(audit_cohort, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = str(tmp_path / "out")
    assert main(["audit", "--synthetic", str(tmp_path / "missing"), "--training", str(empty), "--out", out]) == 2
    assert "--synthetic: not a folder" in capsys.readouterr().err
    assert main(["audit", "--synthetic", str(empty), "--training", str(empty), "--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("meddiff: error: no scans in")
    assert not (tmp_path / "out").exists()
    assert main(["audit", "--synthetic", str(empty), "--training", str(empty), "--out", out, "--spacing", "0"]) == 2
    assert "--spacing must be" in capsys.readouterr().err
    two = tmp_path / "two"
    two.mkdir()
    for path in sorted(audit_cohort["training"].glob("sub-*_T1w.nii.gz"))[:2]:
        shutil.copy(path, two / path.name)
    assert main(["audit", "--synthetic", str(two), "--training", str(two), "--out", out]) == 2
    assert "needs at least 3 training subjects" in capsys.readouterr().err  # before reading any volume
