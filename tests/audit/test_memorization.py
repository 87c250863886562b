"""Memorization on real cohort subjects: copies of training subjects under each transformation are flagged with
their source named, new subjects are not, and the threshold comes from the data (held-out or leave-one-out)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_meddiff.audit import memorization
from napari_meddiff.errors import MeddiffError
from napari_meddiff.testing.copies import TRANSFORMATIONS


def _rows(audited) -> dict[str, dict]:
    return {Path(r["file"]).name: r for r in audited["result"].summary["synthetic"]}


def test_every_hidden_copy_is_flagged_with_its_source(audited):
    rows = _rows(audited)
    threshold = audited["result"].summary["thresholds"]["memorization"]
    assert {kind for kind, _ in audited["copies"].values()} == set(TRANSFORMATIONS)
    for name, (kind, source) in audited["copies"].items():
        row = rows[name]
        assert row["memorized"], f"{kind} copy not flagged: {row['similarity']:.4f} <= {threshold['similarity']:.4f}"
        assert Path(row["nearest_training"]).name == source, kind
        assert row["mirrored"] == (kind == "mirror"), kind


def test_new_subjects_are_not_flagged(audited):
    rows = _rows(audited)
    threshold = audited["result"].summary["thresholds"]["memorization"]
    for name in audited["new"]:
        assert not rows[name]["memorized"], f"{name}: {rows[name]['similarity']:.4f} > {threshold['similarity']:.4f}"


def test_the_threshold_separates_copies_from_new_subjects_with_room_to_spare(audited):
    """In Fisher z, every copy is further above the threshold than the threshold is above the closest real
    subject: the margin is not a knife edge."""
    rows = _rows(audited)
    threshold = audited["result"].summary["thresholds"]["memorization"]
    assert threshold["source"] == "real" and threshold["subjects"] == 4
    copies = memorization.fisher_z([rows[n]["similarity"] for n in audited["copies"]])
    new = memorization.fisher_z([rows[n]["similarity"] for n in audited["new"]])
    z_threshold, z_real = (
        memorization.fisher_z(threshold["similarity"]),
        memorization.fisher_z(threshold["real_nn_max"]),
    )
    assert copies.min() - z_threshold > z_threshold - z_real > 0
    assert new.max() < z_threshold
    assert threshold["real_nn_max"] < threshold["similarity"] < 0.99


def test_leave_one_out_threshold_from_the_training_set_alone(audited):
    """Without held-out scans, each training subject against the others sets the threshold; it separates too."""
    volumes = audited["result"].volumes
    found, pairwise = memorization.nearest(volumes["training"], volumes["training"], leave_one_out=True)
    assert all(n.index != i for i, n in enumerate(found))
    assert len(pairwise) == len(found) * (len(found) - 1)
    threshold = memorization.threshold([n.similarity for n in found], "leave-one-out", pairwise)
    assert threshold["pairs_sd_fisher_z"] > threshold["real_nn_sd_fisher_z"]  # five neighbours agree by chance
    rows = _rows(audited)
    assert all(rows[n]["similarity"] > threshold["similarity"] for n in audited["copies"])
    assert all(rows[n]["similarity"] < threshold["similarity"] for n in audited["new"])


def test_the_threshold_rule_and_too_few_subjects():
    values = [0.90, 0.92, 0.94]
    z = np.arctanh(values)
    expected = np.tanh(z.max() + memorization.MARGIN_SD * z.std(ddof=1))
    assert memorization.threshold(values, "real")["similarity"] == pytest.approx(expected)
    spread = np.array([0.5, 0.7, 0.9, 0.95])  # pairs more spread than the neighbours: their spread counts
    wider = np.tanh(z.max() + memorization.MARGIN_SD * np.arctanh(spread).std(ddof=1))
    assert memorization.threshold(values, "real", spread)["similarity"] == pytest.approx(wider)
    with pytest.raises(MeddiffError, match="at least 3 real subjects"):
        memorization.threshold([0.9, 0.95], "real")
