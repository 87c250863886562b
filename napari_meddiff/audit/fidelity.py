"""Fidelity: can real and synthetic volumes be told apart?

- *Classifier two-sample test* (C2ST): a small CNN learns to tell real from synthetic on half of each set and is
  scored on the other half, both ways round. 3D volumes go through `c2st_slices` (a 2D CNN on axial slices,
  one decision per volume); `classifier_test` adds a Wilson confidence interval for the accuracy over all test
  decisions and a one-sided binomial p-value against chance (0.5: indistinguishable; 1.0: always told apart).
- *MMD*: the unbiased squared maximum mean discrepancy of image features (intensity and gradient histograms,
  coarse block means) with an RBF kernel of median bandwidth, and its permutation p-value.

The CNN test came from ``benchmarks/evaluate_models.py`` and the MMD from ``benchmarks/bench_quality.py``;
both benchmarks import them from here.
"""

from __future__ import annotations

import math

import numpy as np
import torch


class SmallCNN(torch.nn.Module):
    def __init__(self, dims: int) -> None:
        super().__init__()
        conv = torch.nn.Conv2d if dims == 2 else torch.nn.Conv3d
        layers, c = [], 1
        for out in (16, 32, 64):
            layers += [conv(c, out, 3, stride=2, padding=1), torch.nn.GroupNorm(8, out), torch.nn.SiLU()]
            c = out
        self.features = torch.nn.Sequential(*layers)
        self.head = torch.nn.Linear(c, 1)

    def forward(self, x):
        if x.ndim == 5:  # 3D: halve the resolution first (cost); blur and shape differences survive it
            x = torch.nn.functional.avg_pool3d(x, 2)
        f = self.features(x)
        return self.head(f.flatten(2).mean(-1)).squeeze(-1)


def train_classifier(
    dims: int, xtr: torch.Tensor, ytr: torch.Tensor, steps: int, bs: int, g: torch.Generator, seed: int
) -> SmallCNN:
    """A `SmallCNN` trained on ``xtr``/``ytr`` (batches drawn with replacement, random left-right flips); in eval
    mode."""
    torch.manual_seed(seed)
    net = SmallCNN(dims)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    for _ in range(steps):
        idx = torch.randint(0, len(xtr), (bs,), generator=g)
        x = xtr[idx].clone()
        flip = torch.rand(bs, generator=g) < 0.5
        x[flip] = x[flip].flip(2)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def c2st(real: torch.Tensor, fake: torch.Tensor, seed: int = 0, min_steps: int = 400, epochs: int = 15) -> dict:
    """Classifier two-sample test: held-out accuracy of a small CNN (2-fold, swapped); 0.5 is best.

    The CNN trains for at least ``min_steps`` steps (batches drawn with replacement, random flips) so that small
    samples (3D) still get a trained classifier; a classifier that ends up predicting one class for every test
    image is reported as ``degenerate`` (its 0.5 says nothing)."""
    g = torch.Generator().manual_seed(seed)
    n = min(len(real), len(fake))
    real = real[torch.randperm(len(real), generator=g)[:n]]
    fake = fake[torch.randperm(len(fake), generator=g)[:n]]
    half = n // 2
    accs, degenerate, train_accs = [], [], []
    bs = min(32, 2 * half)
    steps = max(min_steps, epochs * (2 * half) // bs)
    for fold in range(2):
        tr = slice(0, half) if fold == 0 else slice(half, 2 * half)
        te = slice(half, 2 * half) if fold == 0 else slice(0, half)
        xtr = torch.cat([real[tr], fake[tr]])
        ytr = torch.cat([torch.ones(half), torch.zeros(half)])
        xte = torch.cat([real[te], fake[te]])
        yte = torch.cat([torch.ones(half), torch.zeros(half)])
        net = train_classifier(real.ndim - 2, xtr, ytr, steps, bs, g, seed + fold)
        with torch.no_grad():
            pred = torch.cat([net(xte[i : i + 64]) for i in range(0, len(xte), 64)]) > 0
            ptr = torch.cat([net(xtr[i : i + 64]) for i in range(0, len(xtr), 64)]) > 0
        accs.append(float((pred.float() == yte).float().mean()))
        train_accs.append(float((ptr.float() == ytr).float().mean()))
        degenerate.append(bool(pred.all() or (~pred).all()))
    return {
        "accuracy": round(float(np.mean(accs)), 4),
        "folds": [round(a, 4) for a in accs],
        "train_accuracy": [round(a, 4) for a in train_accs],
        "degenerate": any(degenerate),
        "n_per_class": int(n),
        "test_per_fold": int(2 * half),
        "steps": steps,
        "batch_size": bs,
    }


def axial_slices(volumes: torch.Tensor, per_volume: int = 24) -> torch.Tensor:
    """``(N, 1, X, Y, Z)`` volumes -> ``(N, per_volume, 1, X, Y)``: axial slices evenly spaced over the middle
    60 % of the inferior-superior axis (the same positions in every volume)."""
    z = volumes.shape[-1]
    idx = torch.linspace(0.2 * (z - 1), 0.8 * (z - 1), per_volume).round().long()
    return volumes[..., idx].permute(0, 4, 1, 2, 3)


def c2st_slices(real: torch.Tensor, fake: torch.Tensor, seed: int = 0, steps: int = 600, per_volume: int = 24) -> dict:
    """The two-sample test for 3D volumes: a small 2D CNN trained on axial slices of the training fold's
    volumes (split by volume, never by slice), scoring each test volume by the mean logit of its slices; held-out
    accuracy per volume, 2-fold swapped. A 3D CNN trained on 20 volumes per class learnt nothing here
    (training accuracy 0.5 on 2 mm volumes whose blur a reader sees at a glance); 24 slices per volume give
    it 24x the images, and the decision is still one per volume."""
    g = torch.Generator().manual_seed(seed)
    n = min(len(real), len(fake))
    real = axial_slices(real[torch.randperm(len(real), generator=g)[:n]], per_volume)
    fake = axial_slices(fake[torch.randperm(len(fake), generator=g)[:n]], per_volume)
    half = n // 2
    bs = 32
    accs, slice_accs, train_accs, degenerate = [], [], [], []
    for fold in range(2):
        tr = slice(0, half) if fold == 0 else slice(half, 2 * half)
        te = slice(half, 2 * half) if fold == 0 else slice(0, half)
        xtr = torch.cat([real[tr], fake[tr]]).flatten(0, 1)
        ytr = torch.cat([torch.ones(half), torch.zeros(half)]).repeat_interleave(per_volume)
        xte = torch.cat([real[te], fake[te]])
        yte = torch.cat([torch.ones(half), torch.zeros(half)])
        net = train_classifier(2, xtr, ytr, steps, bs, g, seed + fold)
        with torch.no_grad():
            logits = torch.stack([net(v) for v in xte])  # (volumes, slices)
            ptr = torch.cat([net(xtr[i : i + 256]) for i in range(0, len(xtr), 256)]) > 0
        pred = logits.mean(1) > 0
        accs.append(float((pred.float() == yte).float().mean()))
        slice_accs.append(float(((logits > 0).float() == yte[:, None]).float().mean()))
        train_accs.append(float((ptr.float() == ytr).float().mean()))
        degenerate.append(bool(pred.all() or (~pred).all()))
    return {
        "accuracy": round(float(np.mean(accs)), 4),
        "folds": [round(a, 4) for a in accs],
        "train_accuracy": [round(a, 4) for a in train_accs],
        "degenerate": any(degenerate),
        "slice_accuracy": [round(a, 4) for a in slice_accs],
        "slices_per_volume": per_volume,
        "n_per_class": int(n),
        "test_per_fold": int(2 * half),
        "steps": steps,
        "batch_size": bs,
        "classifier": "2D CNN on axial slices, one decision per volume (mean slice logit)",
    }


def two_sample_test(real: torch.Tensor, fake: torch.Tensor, seed: int = 0) -> dict:
    """The project's two-sample test: `c2st` on 2D images, `c2st_slices` on 3D volumes (with the 3D CNN's
    result beside it, under ``volume_cnn``)."""
    if real.ndim == 4:
        return c2st(real, fake, seed=seed, min_steps=400)
    out = c2st_slices(real, fake, seed=seed)
    out["volume_cnn"] = c2st(real, fake, seed=seed, min_steps=200)
    return out


# --- the audit's summaries -------------------------------------------------------------------------------


def wilson_interval(correct: int, total: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``correct / total``."""
    from scipy.stats import norm

    if total <= 0:
        return 0.0, 1.0
    z = float(norm.ppf(0.5 + confidence / 2))
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def classifier_test(real: torch.Tensor, synthetic: torch.Tensor, seed: int = 0, steps: int = 600) -> dict:
    """`c2st_slices` on ``(N, 1, X, Y, Z)`` volumes, with the accuracy's 95 % Wilson interval over all test
    decisions (each volume is tested once) and the one-sided binomial p-value of doing better than chance."""
    from scipy.stats import binomtest

    if min(len(real), len(synthetic)) < 4:
        return {"computed": False, "reason": "needs at least 4 real and 4 synthetic volumes"}
    per_volume = min(24, real.shape[-1])
    out = c2st_slices(real, synthetic, seed=seed, steps=steps, per_volume=per_volume)
    total = 2 * out["test_per_fold"]
    correct = int(round(out["accuracy"] * total))
    low, high = wilson_interval(correct, total)
    p_value = float(binomtest(correct, total, 0.5, alternative="greater").pvalue)
    return {"computed": True, **out, "ci95": [round(low, 4), round(high, 4)], "decisions": total, "p_value": p_value}


def image_features(images: np.ndarray) -> np.ndarray:
    """One row per image of ``(N, X, Y, Z)`` images in [0, 1]: the intensity histogram of the voxels above
    0.1, the gradient-magnitude histogram there and block means on a 6x7x6 grid."""
    rows = []
    for image in np.clip(images, 0.0, 1.0):
        inside = image > 0.1
        n = max(int(inside.sum()), 1)
        hist = np.histogram(image[inside], bins=32, range=(0, 1))[0] / n
        grads = np.sqrt(sum(g**2 for g in np.gradient(image)))
        ghist = np.histogram(grads[inside], bins=16, range=(0, 0.5))[0] / n
        blocks = torch.nn.functional.adaptive_avg_pool3d(torch.from_numpy(image)[None, None].float(), (6, 7, 6))
        rows.append(np.concatenate([hist * 10, ghist * 10, blocks.flatten().numpy()]))
    return np.stack(rows)


def _rbf(pooled: np.ndarray, bandwidth: float) -> np.ndarray:
    squares = (pooled * pooled).sum(1)
    distances = np.maximum(squares[:, None] + squares[None, :] - 2 * pooled @ pooled.T, 0.0)
    return np.exp(-distances / (2 * bandwidth**2))


def _mmd2_of_kernel(kernel: np.ndarray, n: int) -> float:
    """Unbiased MMD^2 of the first ``n`` samples against the rest, from their pooled kernel matrix."""
    kxx, kyy, kxy = kernel[:n, :n], kernel[n:, n:], kernel[:n, n:]
    m = len(kernel) - n
    return float(
        (kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean()
    )


def mmd2(x: np.ndarray, y: np.ndarray, bandwidth: float) -> float:
    """Unbiased squared MMD with an RBF kernel."""
    return _mmd2_of_kernel(_rbf(np.concatenate([x, y]), bandwidth), len(x))


def mmd2_pvalue(x: np.ndarray, y: np.ndarray, bandwidth: float, permutations: int = 1000, seed: int = 0) -> float:
    """Permutation p-value of MMD^2(x, y): how often relabelling the pooled samples gives at least as large
    (the kernel matrix is computed once and permuted)."""
    kernel = _rbf(np.concatenate([x, y]), bandwidth)
    observed = _mmd2_of_kernel(kernel, len(x))
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(permutations):
        order = rng.permutation(len(kernel))
        hits += _mmd2_of_kernel(kernel[np.ix_(order, order)], len(x)) >= observed
    return float((hits + 1) / (permutations + 1))


def median_bandwidth(pooled: np.ndarray) -> float:
    """The median distance between distinct pooled samples (the usual RBF bandwidth)."""
    squares = (pooled * pooled).sum(1)
    distances = np.sqrt(np.maximum(squares[:, None] + squares[None, :] - 2 * pooled @ pooled.T, 0.0))
    positive = distances[distances > 1e-12]
    return float(np.median(positive)) if positive.size else 1.0


def mmd_test(real: np.ndarray, synthetic: np.ndarray, permutations: int = 1000, seed: int = 0) -> dict:
    """MMD^2 between the `image_features` of ``real`` and ``synthetic`` images, with its permutation p-value."""
    if min(len(real), len(synthetic)) < 2:
        return {"computed": False, "reason": "needs at least 2 real and 2 synthetic volumes"}
    fx, fy = image_features(real), image_features(synthetic)
    bandwidth = median_bandwidth(np.concatenate([fx, fy]))
    return {
        "computed": True,
        "mmd2": mmd2(fx, fy, bandwidth),
        "p_value": mmd2_pvalue(fx, fy, bandwidth, permutations, seed),
        "bandwidth": bandwidth,
        "permutations": permutations,
        "features": "intensity and gradient-magnitude histograms (brain), 6x7x6 block means",
    }
