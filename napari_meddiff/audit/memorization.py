"""Memorization: each synthetic volume's nearest training volume, and whether it is closer than real
subjects ever come.

*Similarity* of two volumes on the audit grid (`grid.py`: aligned, normalised, smoothed by one 4 mm voxel):
the normalised cross-correlation of their smoothed images over the voxels both count as foreground, the
larger of the volume as it is and mirrored left-right. It is computed for every pair at once from six matrix
products (masked sums), then refined for the `TOP_K` best candidates of each volume by moving one against the
other (a hill climb over whole voxels up to `REFINE_VOXELS`, then a fraction of a voxel). Invariant to an
intensity rescale, to the grid and voxel size, and (through the alignment) to shifts and crops; the smoothing
averages noise away.

*Threshold*, from the data: the similarities of real subjects to their nearest training subject (held-out
``real`` scans, else each training subject to the others: leave-one-out), Fisher z-transformed (``atanh``,
which makes the spread of correlations comparable near 1). A synthetic volume is flagged when its z is above
their maximum by more than `MARGIN_SD` spreads. The spread is the standard deviation of those z, or of the z
of all real-to-training pairs where that is larger: a handful of nearest neighbours can agree by chance (five
cohort subjects left one out gave a tenth of the spread of four held-out ones), the many pairs cannot.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from napari_meddiff.audit.grid import Prepared, Reference, align, ncc, shifted
from napari_meddiff.errors import MeddiffError

TOP_K = 3
REFINE_VOXELS = 2
MARGIN_SD = 4.0
BLOCK = 32
MIN_REFERENCE_SUBJECTS = 3

Progress = Callable[[int, int], None]


@dataclasses.dataclass
class Nearest:
    """A volume's nearest reference volume (its index), their similarity and whether the match is mirrored."""

    index: int
    similarity: float
    mirrored: bool


class _Stacked:
    """Reference volumes as rows of matrices over the voxels any of their masks covers."""

    def __init__(self, refs: list[Prepared]) -> None:
        union = np.logical_or.reduce([r.mask.ravel() for r in refs])
        self.voxels = np.flatnonzero(union)
        self.mask = np.stack([r.mask.ravel()[self.voxels] for r in refs]).astype(np.float32)
        self.values = np.stack([r.smooth.ravel()[self.voxels] for r in refs]).astype(np.float32) * self.mask
        self.squares = self.values * self.values

    def rows(self, items: list[Prepared], mirrored: bool) -> tuple[np.ndarray, np.ndarray]:
        flip = (lambda a: a[::-1]) if mirrored else (lambda a: a)
        mask = np.stack([flip(p.mask).ravel()[self.voxels] for p in items]).astype(np.float32)
        return np.stack([flip(p.smooth).ravel()[self.voxels] for p in items]).astype(np.float32) * mask, mask

    def correlations(self, items: list[Prepared], mirrored: bool) -> np.ndarray:
        """Masked NCC of every item against every reference, (items, references)."""
        a, ma = self.rows(items, mirrored)
        n = np.maximum(ma @ self.mask.T, 1.0)
        sa, sb = a @ self.mask.T, ma @ self.values.T
        cov = a @ self.values.T - sa * sb / n
        va = (a * a) @ self.mask.T - sa * sa / n
        vb = ma @ self.squares.T - sb * sb / n
        return (cov / np.sqrt(np.maximum(va * vb, 1e-12))).astype(np.float64)


def similarity_matrix(
    items: list[Prepared], refs: list[Prepared], on_progress: Progress | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Coarse similarity (no refinement) of every item to every reference, and whether mirrored is better."""
    stacked = _Stacked(refs)
    sims = np.empty((len(items), len(refs)))
    mirrored = np.zeros((len(items), len(refs)), dtype=bool)
    for start in range(0, len(items), BLOCK):
        block = items[start : start + BLOCK]
        plain, flipped = stacked.correlations(block, False), stacked.correlations(block, True)
        sims[start : start + len(block)] = np.maximum(plain, flipped)
        mirrored[start : start + len(block)] = flipped > plain
        if on_progress is not None:
            on_progress(start + len(block), len(items))
    return sims, mirrored


def refined_similarity(item: Prepared, ref: Prepared, mirrored: bool) -> float:
    """The similarity of ``item`` to ``ref`` after moving ``item`` (whole voxels, then a fraction) to best
    match it; never below the unmoved similarity."""
    flip = (lambda a: a[::-1]) if mirrored else (lambda a: a)
    smooth, mask = flip(item.smooth), flip(item.mask)
    pad = REFINE_VOXELS
    padded = np.pad(smooth, pad), np.pad(mask, pad)
    offset = align(*padded, Reference(ref.smooth, ref.mask), pad, steps=(1,))
    moved, moved_mask = shifted(*padded, offset)
    window = tuple(slice(pad, pad + n) for n in smooth.shape)
    unmoved = ncc(smooth, ref.smooth, mask & ref.mask)
    return max(unmoved, ncc(moved[window], ref.smooth, moved_mask[window] & ref.mask))


def nearest(
    items: list[Prepared],
    refs: list[Prepared],
    *,
    leave_one_out: bool = False,
    on_progress: Progress | None = None,
) -> tuple[list[Nearest], np.ndarray]:
    """Each item's nearest reference (the best refined similarity among its `TOP_K` coarse candidates), and
    the coarse similarities of all pairs (flattened; without an item's own pair under ``leave_one_out``, where
    items are the references and an item is never its own neighbour)."""
    sims, mirrored = similarity_matrix(items, refs)
    pairwise = sims[~np.eye(len(items), len(refs), dtype=bool)] if leave_one_out else sims.ravel()
    if leave_one_out:
        np.fill_diagonal(sims, -np.inf)
    out = []
    for i, item in enumerate(items):
        candidates = np.argsort(-sims[i])[: min(TOP_K, len(refs) - leave_one_out)]
        scored = [(refined_similarity(item, refs[j], bool(mirrored[i, j])), int(j)) for j in candidates]
        value, j = max(scored)
        out.append(Nearest(j, float(value), bool(mirrored[i, j])))
        if on_progress is not None:
            on_progress(i + 1, len(items))
    return out, pairwise


def fisher_z(similarity: np.ndarray | float) -> np.ndarray:
    return np.arctanh(np.clip(np.asarray(similarity, dtype=np.float64), -1 + 1e-9, 1 - 1e-9))


def threshold(reference_nn: list[float], source: str, pairwise: np.ndarray | None = None) -> dict:
    """The memorization threshold from the nearest-training similarities of real subjects and (optionally)
    the similarities of all real-to-training pairs (see the module's docstring), with the figures it came from."""
    values = np.asarray(reference_nn, dtype=np.float64)
    if len(values) < MIN_REFERENCE_SUBJECTS:
        raise MeddiffError(
            f"the memorization threshold needs at least {MIN_REFERENCE_SUBJECTS} real subjects ({source}), "
            f"got {len(values)}"
        )
    z = fisher_z(values)
    sd_nn = float(z.std(ddof=1))
    sd_pairs = float(fisher_z(pairwise).std(ddof=1)) if pairwise is not None and len(pairwise) > 1 else 0.0
    spread = max(sd_nn, sd_pairs)
    return {
        "similarity": float(np.tanh(z.max() + MARGIN_SD * spread)),
        "source": source,
        "subjects": len(values),
        "real_nn_max": float(values.max()),
        "real_nn_mean": float(values.mean()),
        "real_nn_sd_fisher_z": sd_nn,
        "pairs_sd_fisher_z": sd_pairs,
        "margin_sd": MARGIN_SD,
        "rule": f"tanh(max(atanh(s_nn)) + {MARGIN_SD:g} * max(sd(atanh(s_nn)), sd(atanh(s_pairs))))",
    }
