"""Voxel-level noise of a label-map model's scan against the subject's real scan (what a classifier sees first).

    python benchmarks/noise_texture.py [--model brain-t1w-from-labels-3d] [--subject 100002] [--seed 0]
        [--sampler S --steps N]

For a held-out cohort subject (``--data``, written by ``meddiff cohort``), its tissue map goes through the model
and both scans are compared, each normalised to its brain's 99.5th percentile: the background's standard
deviation, the mean voxel-to-voxel step inside the brain, and that step within and across the 2-voxel cells of
a space-to-depth UNet (equal when the noise has no block pattern).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def steps_by_parity(x: np.ndarray, inside: np.ndarray, axis: int) -> tuple[float, float]:
    """Mean |x[i+1] - x[i]| along ``axis`` inside the brain, for even i (within a 2-voxel cell) and odd i."""
    step = np.abs(np.diff(x, axis=axis))
    both = np.take(inside, range(step.shape[axis]), axis=axis) & (np.diff(inside.astype(int), axis=axis) == 0)
    out = []
    for start in (0, 1):
        pick = [slice(None)] * 3
        pick[axis] = slice(start, None, 2)
        out.append(float(step[tuple(pick)][both[tuple(pick)]].mean()))
    return out[0], out[1]


def describe(name: str, x: np.ndarray, inside: np.ndarray) -> None:
    x = x / np.percentile(x[inside], 99.5)
    parity = [steps_by_parity(x, inside, a) for a in range(3)]
    mean_step = np.mean([(e + o) / 2 for e, o in parity])
    cells = ", ".join(f"axis {a}: {e:.4f} within / {o:.4f} across" for a, (e, o) in enumerate(parity))
    print(f"{name}: background sd {x[~inside].std():.4f}, brain step {mean_step:.4f} ({cells})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="brain-t1w-from-labels-3d")
    p.add_argument("--data", type=Path, default=Path("data/cohort-2mm-heldout"))
    p.add_argument("--subject", type=int, default=100002)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampler", default=None, help="default: the model's")
    p.add_argument("--steps", type=int, default=None, help="default: the model's")
    args = p.parse_args()

    from napari_meddiff.io.volume import read_volume
    from napari_meddiff.tasks.from_labels import generate_from_labels

    labels = read_volume(args.data / f"sub-{args.subject:06d}_dseg.nii.gz")
    real = read_volume(args.data / f"sub-{args.subject:06d}_T1w.nii.gz")
    (generated,) = generate_from_labels(args.model, labels, args.seed, sampler=args.sampler, steps=args.steps)
    inside = np.asarray(labels.array) > 0
    describe("generated", np.asarray(generated.array, np.float64), inside)
    describe("real", np.asarray(real.array, np.float64), inside)


if __name__ == "__main__":
    main()
