"""What training shows a person: progress bars, sample grids, loss curves, PSNR."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch


def progress_bar(total: int, initial: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(
        total=total, initial=initial, desc=desc, unit="step", disable=not enabled, mininterval=5.0, dynamic_ncols=True
    )


def middle_slices(x: np.ndarray) -> np.ndarray:
    """(H, W) picture of an image: itself (2D) or its three orthogonal middle slices side by side (3D)."""
    if x.ndim == 2:
        return np.rot90(x)
    a, b, c = (s // 2 for s in x.shape)
    views = [np.rot90(x[a]), np.rot90(x[:, b]), np.rot90(x[:, :, c])]
    h = max(v.shape[0] for v in views)
    return np.concatenate([np.pad(v, ((0, h - v.shape[0]), (0, 1))) for v in views], axis=1)


def save_grid(
    path: Path,
    rows: Iterable[Iterable[np.ndarray]],
    title: str = "",
    cmap: str = "gray",
    vmin: float = 0.0,
    vmax: float = 1.0,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [[middle_slices(np.asarray(im, np.float32)) for im in r] for r in rows]
    nr, nc = len(rows), max(len(r) for r in rows)
    h, w = rows[0][0].shape
    fig, axes = plt.subplots(nr, nc, figsize=(nc * 2.0 * w / h, nr * 2.0), squeeze=False)
    for i, r in enumerate(rows):
        for j in range(nc):
            ax = axes[i][j]
            ax.axis("off")
            if j < len(r):
                ax.imshow(r[j], cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def save_loss_curve(path: Path, history: dict[str, list[tuple[int, float]]], title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, pts in history.items():
        if not pts:
            continue
        s = np.array([p[0] for p in pts])
        v = np.array([p[1] for p in pts])
        k = max(1, len(v) // 50)
        smooth = np.convolve(v, np.ones(k) / k, mode="valid") if len(v) > k else v
        ax.plot(s[: len(smooth)] + (k - 1), smooth, label=name)
    ax.set_xlabel("step")
    if any(history.values()):
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> float:
    mse = float(((a.float() - b.float()) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(data_range**2 / mse)
