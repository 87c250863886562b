"""Diversity: a set of near-identical volumes scores a higher mean pairwise MS-SSIM (less diverse) than a set of
different subjects; the MS-SSIM scales fit the grid; large sets are scored on a sample of pairs."""

from __future__ import annotations

import numpy as np

from napari_meddiff.audit.diversity import mean_pairwise_ms_ssim, ms_ssim_settings, pairs


def test_near_identical_volumes_are_less_diverse_than_different_subjects(audited):
    volumes = audited["result"].volumes
    different = [p.image for p in volumes["training"]]
    rng = np.random.default_rng(0)
    one = different[0]
    collapsed = [np.clip(one + rng.normal(0, 0.03, one.shape).astype(np.float32), 0, None) for _ in different]
    d_different = mean_pairwise_ms_ssim(different)
    d_collapsed = mean_pairwise_ms_ssim(collapsed)
    assert d_collapsed["ms_ssim"] > d_different["ms_ssim"] + 3 * d_different["sd"]
    assert 0.3 < d_different["ms_ssim"] < 0.98
    assert d_different["pairs"] == len(different) * (len(different) - 1) // 2


def test_the_audit_reports_both_sets(audited):
    diversity = audited["result"].summary["diversity"]
    assert diversity["details"]["synthetic"]["volumes"] == len(audited["copies"]) + len(audited["new"])
    assert diversity["details"]["real"]["volumes"] == 4
    assert 0 < diversity["real_ms_ssim"] < 1 and 0 < diversity["synthetic_ms_ssim"] < 1
    assert diversity["training_ms_ssim"] is None


def test_scales_fit_the_grid_and_pairs_are_sampled():
    assert len(ms_ssim_settings((48, 56, 48))["weights"]) == 3  # the 4 mm audit grid
    assert len(ms_ssim_settings((96, 112, 96))["weights"]) == 4
    assert abs(sum(ms_ssim_settings((48, 56, 48))["weights"]) - 1) < 1e-9
    assert len(pairs(5)) == 10
    drawn = pairs(100, max_pairs=50, seed=1)
    assert len(drawn) == len(set(drawn)) == 50 and drawn == pairs(100, max_pairs=50, seed=1)
    assert mean_pairwise_ms_ssim([np.zeros((48, 56, 48), np.float32)])["ms_ssim"] is None
