"""The highest reconstruction PSNR an autoencoder can reach on cohort subjects: the noise ceiling (issue 16).

Each cohort subject is a noise-free image plus Rician noise (``napari_meddiff.data.mni152``: std drawn per subject,
U(0, 2.5) on the ~0..100 scale). An autoencoder with fewer latent numbers than voxels cannot encode white noise,
so the best it can do is predict each voxel's expected value given the noise-free image; its error is then the
noise variance itself. This script rebuilds held-out subjects (the same seeds as ``evaluate_ae.py``) with and
without noise, puts both on a model's 2 mm grid (the cohort's own resolution: resampling would average the
noise) with the noisy image's intensity window (as training and ``evaluate_ae.py`` do), and prints per subject:

- ``noise_sd``: the subject's noise std in [0, 1] units (from the brain, where Rician noise is nearly Gaussian);
- ``psnr_clean_db``: PSNR of the noise-free image against the noisy one (a perfect denoiser);
- ``ceiling_db``: PSNR of the Rician expected value against the noisy one, i.e. -10 log10(mean noise variance),
  the ceiling for a mean-squared-error reconstruction (the Rician variance in closed form).

    python benchmarks/psnr_ceiling.py --config models/brain-ldm-3d/train-2mm.yaml --num 16 \
        --json benchmarks/results/psnr_ceiling_2mm.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import machine  # noqa: E402

HELDOUT_SEED = 100000  # the first seed of data/cohort-2mm-heldout, as in evaluate_ae.py
COHORT_MM = 2.0


def noise_free_and_noisy(seed: int, resolution: float = 2.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(noise-free image, noisy image, affine) of cohort subject ``seed``; the noisy one is ``make_subject``'s."""
    from napari_meddiff.data import mni152 as cohort

    noisy = cohort.make_subject(seed, resolution_mm=resolution)
    clean = cohort.make_subject(seed, resolution_mm=resolution, noise=False)
    return clean.image.array, noisy.image.array, noisy.image.affine


def subject_noise_sd(clean: np.ndarray, noisy: np.ndarray) -> float:
    """The subject's noise std in scanner units, from the brain (where Rician noise is nearly Gaussian)."""
    brain = clean > 0.5 * np.percentile(clean[clean > 0], 50)
    return max(float((noisy - clean)[brain].std()), 1e-9)


def on_grid(arrays: list[np.ndarray], affine: np.ndarray, cfg: dict) -> tuple[list[np.ndarray], float, float]:
    """``arrays`` (one grid; the last is the noisy image) cut to the model grid around the noisy image's centre,
    in scanner units, and the noisy image's intensity window (lo, hi), as ``preprocess_subject`` prepares it."""
    from napari_meddiff.io.intensity import intensity_window, normalise
    from napari_meddiff.io.volume import Volume, resample, to_canonical
    from napari_meddiff.training.data import _fit, foreground_centre

    out = [
        np.asarray(
            resample(to_canonical(Volume(a.astype(np.float32), affine)), tuple(cfg["voxel_size"])).array, np.float64
        )
        for a in arrays
    ]
    window = intensity_window(out[-1].astype(np.float32), cfg["intensity"])
    fg = normalise(out[-1], window) > float(cfg["data"].get("foreground_threshold", 0.1))
    centre = foreground_centre(fg) + 0.5
    return [_fit(a, cfg["image_shape"], centre) for a in out], *window


def rician_variance(signal: np.ndarray, sd: float) -> np.ndarray:
    """Variance of Rician magnitudes of noise-free ``signal`` with Gaussian std ``sd``: 2 sd^2 + A^2 - mean^2,
    mean = sd sqrt(pi/2) L_1/2(-A^2 / (2 sd^2)) (Laguerre through exponentially scaled Bessel functions, so that
    large A / sd does not overflow)."""
    from scipy.special import i0e, i1e

    a = np.asarray(signal, np.float64)
    h = (a / sd) ** 2 / 4.0
    laguerre = (1.0 + 2.0 * h) * i0e(h) + 2.0 * h * i1e(h)
    mean = sd * np.sqrt(np.pi / 2.0) * laguerre
    return np.maximum(2.0 * sd**2 + a**2 - mean**2, 0.0)


def subject_ceiling(seed: int, cfg: dict) -> dict:
    if any(float(v) != COHORT_MM for v in cfg["voxel_size"]):  # resampling would average the noise
        raise SystemExit(f"psnr_ceiling works on grids at the cohort's {COHORT_MM} mm, got {cfg['voxel_size']}")
    clean, noisy, affine = noise_free_and_noisy(seed, COHORT_MM)
    sd = subject_noise_sd(clean, noisy)  # scanner units
    var = rician_variance(clean, sd)  # per voxel, of the noisy value given the noise-free one
    (clean_g, var_g, noisy_g), lo, hi = on_grid([clean, var, noisy], affine, cfg)
    width = hi - lo
    real = np.clip((noisy_g - lo) / width, 0, 1)  # what evaluate_ae.py compares against
    psnr = lambda mse: float(10 * np.log10(1.0 / mse))  # noqa: E731
    return {
        "seed": seed,
        "noise_sd": round(sd / width, 5),
        "psnr_clean_db": round(psnr(float(((np.clip((clean_g - lo) / width, 0, 1) - real) ** 2).mean())), 2),
        "ceiling_db": round(psnr(float(var_g.mean()) / width**2), 2),
    }


def main(argv: list[str] | None = None) -> int:
    from napari_meddiff.training.config import load_config

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=ROOT / "models/brain-ldm-3d/train-2mm.yaml")
    ap.add_argument("--num", type=int, default=16)
    ap.add_argument("--first-seed", type=int, default=HELDOUT_SEED)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    cfg = load_config(args.config)
    cfg = {k: cfg[k] for k in ("voxel_size", "image_shape", "intensity", "data")}
    rows = []
    for seed in range(args.first_seed, args.first_seed + args.num):
        rows.append(subject_ceiling(seed, cfg))
        print(rows[-1], flush=True)
    summary = {
        k: {
            "mean": round(float(np.mean([r[k] for r in rows])), 3),
            "min": round(float(np.min([r[k] for r in rows])), 3),
            "max": round(float(np.max([r[k] for r in rows])), 3),
        }
        for k in ("noise_sd", "psnr_clean_db", "ceiling_db")
    }
    print(
        f"{len(rows)} subjects on the grid of {args.config}: ceiling {summary['ceiling_db']['mean']:.2f} dB mean "
        f"({summary['ceiling_db']['min']:.2f}-{summary['ceiling_db']['max']:.2f}); a perfect denoiser "
        f"{summary['psnr_clean_db']['mean']:.2f} dB"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"machine": machine(), "config": str(args.config), "subjects": rows, "summary": summary}, indent=2
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
