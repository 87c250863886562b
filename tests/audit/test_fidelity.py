"""Fidelity: the two-sample tests' confidence interval and p-values, and the MMD moved from the benchmarks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_meddiff.audit import fidelity


def test_wilson_interval_known_values():
    low, high = fidelity.wilson_interval(8, 10)
    assert (low, high) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert fidelity.wilson_interval(0, 20)[0] == 0.0
    assert fidelity.wilson_interval(20, 20)[1] == 1.0


def _naive_mmd2(x, y, bandwidth):
    """benchmarks/bench_quality.py's MMD^2 before it moved: the reference for the faster one."""

    def k(a, b):
        return np.exp(-((a[:, None, :] - b[None, :, :]) ** 2).sum(-1) / (2 * bandwidth**2))

    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    n, m = len(x), len(y)
    return (kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean()


def test_mmd_matches_the_benchmark_formula_and_tells_shifted_samples_apart():
    rng = np.random.default_rng(0)
    x, y, shifted = rng.normal(size=(20, 5)), rng.normal(size=(20, 5)), rng.normal(0.8, 1.0, size=(20, 5))
    assert fidelity.mmd2(x, shifted, 2.0) == pytest.approx(_naive_mmd2(x, shifted, 2.0), abs=1e-12)
    assert fidelity.mmd2_pvalue(x, y, 2.0, permutations=200) > 0.05
    assert fidelity.mmd2_pvalue(x, shifted, 2.0, permutations=200) < 0.01


def _balls(n: int, sigma: float, seed: int) -> torch.Tensor:
    """``n`` volumes of random bright balls, smoothed by ``sigma`` voxels."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        v = np.zeros((20, 24, 24), np.float32)
        for _ in range(6):
            c = rng.integers(4, 16, size=3)
            v[c[0] - 2 : c[0] + 2, c[1] - 2 : c[1] + 2, c[2] - 2 : c[2] + 2] = rng.uniform(0.5, 1.0)
        out.append(ndimage.gaussian_filter(v, sigma))
    return torch.from_numpy(np.stack(out))[:, None]


def test_classifier_test_gives_an_interval_around_its_accuracy():
    torch.manual_seed(0)
    result = fidelity.classifier_test(_balls(12, 0.3, 0), _balls(12, 2.0, 1), steps=60)
    assert result["computed"] and result["decisions"] == 24
    low, high = result["ci95"]
    assert low <= result["accuracy"] <= high
    assert result["accuracy"] >= 0.75 and result["p_value"] < 0.05
    assert not fidelity.classifier_test(_balls(3, 0.3, 0), _balls(3, 0.3, 1))["computed"]


def test_the_audit_reports_the_two_sample_tests(audited):
    summary = audited["result"].summary
    two = summary["two_sample"]
    assert two["computed"] and 0.0 <= two["accuracy"] <= 1.0 and two["decisions"] == 8  # 4 per set, each tested once
    assert two["ci95"][0] <= two["accuracy"] <= two["ci95"][1]
    assert summary["mmd"]["computed"] and 0 < summary["mmd"]["p_value"] <= 1
    assert not summary["fid"]["computed"] and "MedicalNet" in summary["fid"]["reason"]
