"""The 2 mm autoencoder's training curve as one PNG: training L1 (smoothed) and PSNR (validation, every
``val_every`` steps, and held-out, one point per ``evaluate_ae.py --log`` line) against the step, with the
issue's target and the cohort's noise ceiling (``results/psnr_ceiling_2mm.json``) drawn in.

    python benchmarks/plot_ae_curve.py [--curve models/brain-ldm-3d/training/autoencoder-2mm-curve.json]
        [--heldout models/brain-ldm-3d/training/heldout-2mm.jsonl] [--config models/brain-ldm-3d/train-2mm.yaml]
        [--out models/brain-ldm-3d/training/autoencoder-2mm-curve.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
TRAINING = HERE.parent / "models" / "brain-ldm-3d" / "training"
TARGET_DB = 32.0


def heldout_points(path: Path) -> list[tuple[int, float, float]]:
    """(step, mean PSNR, sd) of each logged held-out evaluation, the EMA weights' (the last line per step)."""
    points: dict[int, tuple[float, float]] = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        rec = json.loads(line)
        if "ema" in rec:
            points[int(rec["step"])] = (rec["ema"]["psnr_db"]["mean"], rec["ema"]["psnr_db"]["sd"])
    return [(s, m, sd) for s, (m, sd) in sorted(points.items())]


def plot(curve: dict, heldout: list[tuple[int, float, float]], ceiling_db: float | None, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_l1, ax_db) = plt.subplots(1, 2, figsize=(10, 3.8))
    steps, l1 = np.array(curve["l1"], dtype=float).T
    k = max(1, len(l1) // 40)
    smooth = np.convolve(l1, np.ones(k) / k, mode="valid")
    ax_l1.plot(steps, l1, color="0.8", lw=0.8, label="as logged")
    ax_l1.plot(steps[k - 1 :], smooth, color="C0", label=f"mean of {k}")
    ax_l1.set_yscale("log")
    ax_l1.set(xlabel="step", ylabel="training L1", title="training L1 (crops, then whole volumes)")
    if curve["val_psnr_db"]:
        vs, vdb = np.array(curve["val_psnr_db"], dtype=float).T
        ax_db.plot(vs, vdb, "o-", color="C1", label="validation (training-seed subjects)")
    if heldout:
        hs, hdb, hsd = np.array(heldout, dtype=float).T
        ax_db.errorbar(hs, hdb, yerr=hsd, fmt="s-", color="C2", capsize=3, label="held-out subjects, mean ± sd")
    ax_db.axhline(TARGET_DB, color="k", ls="--", lw=1, label=f"target {TARGET_DB:g} dB")
    if ceiling_db is not None:
        ax_db.axhline(ceiling_db, color="C3", ls=":", lw=1, label=f"noise ceiling {ceiling_db:.1f} dB")
    patch_steps = curve.get("patch_steps")
    for ax in (ax_l1, ax_db):
        if patch_steps:
            ax.axvline(patch_steps, color="0.5", lw=0.8)
        ax.legend(fontsize=7, loc="lower right")
    ax_db.set(xlabel="step", ylabel="PSNR (dB, EMA weights, whole volumes)", title="reconstruction PSNR")
    fig.suptitle(
        f"brain-ldm-3d 2 mm autoencoder: step {curve['step']}, {curve['minutes']:.0f} training minutes", fontsize=10
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--curve", type=Path, default=TRAINING / "autoencoder-2mm-curve.json")
    ap.add_argument("--heldout", type=Path, default=TRAINING / "heldout-2mm.jsonl")
    ap.add_argument("--ceiling", type=Path, default=HERE / "results" / "psnr_ceiling_2mm.json")
    ap.add_argument(
        "--config",
        type=Path,
        default=HERE.parent / "models" / "brain-ldm-3d" / "train-2mm.yaml",
        help="the training config (its autoencoder_training.patch_steps: where the crop phase ends)",
    )
    ap.add_argument("--out", type=Path, default=TRAINING / "autoencoder-2mm-curve.png")
    args = ap.parse_args(argv)
    import yaml

    patch_steps = yaml.safe_load(args.config.read_text())["autoencoder_training"].get("patch_steps")
    curve = {**json.loads(args.curve.read_text()), "patch_steps": patch_steps}
    if not curve.get("l1"):
        raise SystemExit(f"{args.curve}: no training loss logged yet")
    ceiling = json.loads(args.ceiling.read_text()) if args.ceiling.is_file() else None
    ceiling_db = ceiling["summary"]["ceiling_db"]["mean"] if ceiling else None
    heldout = heldout_points(args.heldout)
    plot(curve, heldout, ceiling_db, args.out)
    last = f"held-out {heldout[-1][1]:.2f} dB at step {heldout[-1][0]}" if heldout else "no held-out point"
    print(f"{args.out}: step {curve['step']}, {last}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
