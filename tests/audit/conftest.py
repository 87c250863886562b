"""A small real cohort for the audit: training subjects, held-out real subjects, and a synthetic folder of
copies of training subjects (each under one transformation) and new subjects, audited once per session."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from napari_meddiff.io.volume import read_volume, write_volume
from napari_meddiff.testing.copies import TRANSFORMATIONS, transformed

TRAINING_SEEDS = range(0, 5)
REAL_SEEDS = range(100_000, 100_004)
NEW_SEEDS = range(200, 203)  # training-split subjects the training folder does not hold: "new" brains


def _t1w(folder: Path) -> list[Path]:
    return sorted(folder.glob("sub-*_T1w.nii.gz"))


@pytest.fixture(scope="session")
def audit_cohort(tmp_path_factory) -> dict:
    """Folders ``training``, ``real``, ``synthetic`` and what the synthetic folder holds: ``copies``
    (file name -> (transformation, source training file)) and ``new`` (file names)."""
    from napari_meddiff.data.mni152 import write_cohort

    root = tmp_path_factory.mktemp("audit-cohort")
    for name, seeds in (("training", TRAINING_SEEDS), ("real", REAL_SEEDS), ("new", NEW_SEEDS)):
        write_cohort(root / name, len(seeds), seed=seeds[0], resolution_mm=2.0, lesion_fraction=0.0, progress=False)
    synthetic = root / "synthetic"
    synthetic.mkdir()
    rng = np.random.default_rng(0)
    training = _t1w(root / "training")
    copies = {}
    for i, kind in enumerate(TRANSFORMATIONS):
        source = training[i % len(training)]
        name = f"copy-{kind}-of-{source.name.split('_')[0]}.nii.gz"
        write_volume(transformed(read_volume(source), kind, rng), synthetic / name)
        copies[name] = (kind, source.name)
    new = []
    for path in _t1w(root / "new"):
        shutil.copy(path, synthetic / path.name)
        new.append(path.name)
    return {"root": root, "training": root / "training", "real": root / "real", "synthetic": synthetic,
            "copies": copies, "new": new}  # fmt: skip


@pytest.fixture(scope="session")
def audited(audit_cohort, tmp_path_factory):
    """`napari_meddiff.audit` of the cohort's synthetic folder, with the held-out real subjects, report written."""
    import napari_meddiff as md

    out = tmp_path_factory.mktemp("audit-report") / "report"
    result = md.audit(
        audit_cohort["synthetic"],
        audit_cohort["training"],
        audit_cohort["real"],
        out,
        classifier_steps=40,
        permutations=99,
        max_pairs=30,
    )
    return {"result": result, "out": out, **audit_cohort}
