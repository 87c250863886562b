"""What the slice two-sample test can see: known changes of real held-out subjects against the real ones (issue 16).

The autoencoder's own reconstructions of held-out subjects score 1.000 on `evaluate_models.two_sample_test`
(the floor for every diffusion model on it). Reconstructions differ from the real volumes in two ways: they are
blurred, and they carry none of the subject's Rician noise (a deterministic decoder cannot produce white noise).
This script scores each on its own, on the same subjects (the cohort rebuilds each one with and without noise):

- ``new noise draw``: the noise-free image with a fresh Rician draw of the subject's own noise level (the test's
  sanity check: it should be near 0.5);
- ``noise removed``: the noise-free image (a perfect denoiser; the best a deterministic decoder can do);
- ``blurred s=0.5`` / ``s=1.0``: the real volume through a Gaussian of that std in voxels;
- ``noise removed, blurred s=0.5``;
- ``blurred s=..., new noise draw``: the noise-free image through a Gaussian, then a fresh Rician draw of the
  subject's noise level: what a decoder with that much blur would score if the subject's noise were added
  after decoding.

    python benchmarks/two_sample_controls.py --num 40 --json benchmarks/results/two_sample_controls_2mm.json
    python benchmarks/two_sample_controls.py --figure models/brain-ldm-3d/training/two-sample-controls.png \
        --json benchmarks/results/two_sample_controls_2mm.json   # one subject's controls, with those accuracies
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import machine  # noqa: E402
from evaluate_models import c2st_slices  # noqa: E402
from psnr_ceiling import COHORT_MM, HELDOUT_SEED, noise_free_and_noisy, on_grid, subject_noise_sd  # noqa: E402


def subject_variants(seed: int, cfg: dict) -> dict[str, np.ndarray]:
    """Real (noisy) volume and its controls for cohort subject ``seed``, on the model grid in [0, 1]."""
    from scipy.ndimage import gaussian_filter

    clean, noisy, affine = noise_free_and_noisy(seed, COHORT_MM)
    sd = subject_noise_sd(clean, noisy)
    rng = np.random.default_rng(seed + 7_000_000)
    rician = lambda a: np.sqrt((a + rng.normal(0, sd, a.shape)) ** 2 + rng.normal(0, sd, a.shape) ** 2)  # noqa: E731
    blurs = (0.5, 1.0, 1.5)
    arrays = [clean, rician(clean)] + [rician(gaussian_filter(clean, b)) for b in blurs] + [noisy]
    grids, lo, hi = on_grid(arrays, affine, cfg)
    unit = lambda a: np.clip((a - lo) / (hi - lo), 0, 1).astype(np.float32)  # noqa: E731
    real, clean_u = unit(grids[-1]), unit(grids[0])
    out = {
        "real": real,
        "new noise draw": unit(grids[1]),
        "noise removed": clean_u,
        "blurred s=0.5": gaussian_filter(real, 0.5),
        "blurred s=1.0": gaussian_filter(real, 1.0),
        "noise removed, blurred s=0.5": gaussian_filter(clean_u, 0.5),
    }
    for b, g in zip(blurs, grids[2:-1]):
        out[f"blurred s={b}, new noise draw"] = unit(g)
    return out


FIGURE_CONTROLS = ["new noise draw", "noise removed", "blurred s=0.5, new noise draw", "blurred s=1.0, new noise draw"]


def figure(path: Path, variants: dict[str, np.ndarray], seed: int, accuracies: dict[str, float]) -> None:
    """An axial slice of subject ``seed`` and its controls (top) and a 4x zoom (bottom), all on [0, 1]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["real", *FIGURE_CONTROLS]
    fig, ax = plt.subplots(2, len(keys), figsize=(4 * len(keys), 9))
    z = variants["real"].shape[2] // 2 + 6
    for i, k in enumerate(keys):
        sl = np.rot90(variants[k][:, :, z])
        ax[0, i].imshow(sl, cmap="gray", vmin=0, vmax=1)
        ax[1, i].imshow(sl[20:70, 25:75], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        note = f"held-out subject {seed}" if k == "real" else f"two-sample {accuracies.get(k, float('nan')):.3f}"
        ax[0, i].set_title(f"{k}\n{note}", fontsize=11)
    for a in ax.flat:
        a.axis("off")
    fig.suptitle("What the slice two-sample test sees (axial, 2 mm; bottom: 4x zoom, same scale)", fontsize=13)
    fig.tight_layout()
    fig.savefig(path, dpi=60)


def main(argv: list[str] | None = None) -> int:
    from napari_meddiff.training.config import load_config

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=ROOT / "models/brain-ldm-3d/training/train-2mm-conditional.yaml")
    ap.add_argument("--num", type=int, default=40)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument(
        "--figure",
        type=Path,
        default=None,
        help="only draw one subject's controls, titled with the accuracies in --json",
    )
    ap.add_argument("--figure-seed", type=int, default=HELDOUT_SEED + 4)
    args = ap.parse_args(argv)
    cfg = load_config(args.config)
    cfg = {k: cfg[k] for k in ("voxel_size", "image_shape", "intensity", "data")}
    if args.figure:
        rows = json.loads(args.json.read_text())["rows"] if args.json and args.json.exists() else []
        figure(
            args.figure,
            subject_variants(args.figure_seed, cfg),
            args.figure_seed,
            {r["control"]: r["accuracy"] for r in rows},
        )
        print(f"written {args.figure}")
        return 0
    t0 = time.perf_counter()
    subjects = [subject_variants(s, cfg) for s in range(HELDOUT_SEED, HELDOUT_SEED + args.num)]
    stack = {k: torch.from_numpy(np.stack([s[k] for s in subjects]))[:, None] for k in subjects[0]}
    print(f"{args.num} held-out subjects rebuilt in {time.perf_counter() - t0:.0f} s", flush=True)
    rows = []
    for name, fake in stack.items():
        if name == "real":
            continue
        t = time.perf_counter()
        res = c2st_slices(stack["real"], fake)
        mse = float(((fake - stack["real"]) ** 2).mean())
        rows.append(
            {
                "control": name,
                "accuracy": res["accuracy"],
                "folds": res["folds"],
                "train_accuracy": res["train_accuracy"],
                "psnr_db": round(10 * np.log10(1 / mse), 2),
                "seconds": round(time.perf_counter() - t, 1),
            }
        )
        print(
            f"{name:32s} two-sample accuracy {res['accuracy']:.3f} (folds {res['folds']}), "
            f"PSNR vs real {rows[-1]['psnr_db']:.2f} dB",
            flush=True,
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": machine(),
                    "config": str(args.config),
                    "n_per_class": args.num,
                    "first_seed": HELDOUT_SEED,
                    "rows": rows,
                },
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
