"""Where a label-map model's denoiser fails: clean-image error by noise level, on whole volumes and on crops.

    python benchmarks/denoising_error.py --model models/brain-t1w-from-labels-3d [--checkpoint runs/x/diffusion.pt]

For held-out cohort subjects (``--data``, a folder ``meddiff cohort`` wrote with held-out seeds), each scan is
noised to timestep t (fixed noise per subject and t), the UNet predicts, and the clean-image estimate is compared
with the scan: mean absolute error in the background and in the brain, and the v/epsilon loss, for each t. The
same on the central 64^3 crop says whether whole-volume inference differs from crop training (GroupNorm
statistics). ``--checkpoint``: a training run's EMA weights instead of the folder's. A sampler cannot do better
than the denoiser at the noise levels it visits: a large error at small t leaves noise in every sample.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, save, table  # noqa: E402

TIMESTEPS = (10, 50, 150, 300, 500, 800, 990)


def load_subjects(cfg: dict, folder: Path, num: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised scans (N, 1, *S) and their maps (N, *S) on the model's grid, as training prepares them."""
    from napari_meddiff.training.data import load_dataset

    data = dict(cfg["data"], dir=str(folder), val_subjects=0)
    ds = load_dataset({**cfg, "data": data}, subjects=slice(0, num), progress=False)
    return ds.images, ds.labels


def errors_at(unet, scheduler, x0, labels, num_classes: int, t: int, seed: int) -> dict[str, float]:
    from napari_meddiff.training.diffusion import diffusion_target, onehot_pm1

    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    tt = torch.full((x0.shape[0],), t, dtype=torch.long)
    xt = scheduler.add_noise(x0, noise, tt)
    with torch.inference_mode():
        pred = unet(torch.cat([xt, onehot_pm1(labels, num_classes)], 1), timesteps=tt)
    ac = scheduler.alphas_cumprod[t]
    a, s = ac.sqrt(), (1 - ac).sqrt()
    if scheduler.prediction_type == "v_prediction":
        x0_hat = a * xt - s * pred
    elif scheduler.prediction_type == "epsilon":
        x0_hat = (xt - s * pred) / a
    else:
        x0_hat = pred
    err = (x0_hat - x0).abs()[:, 0]
    background = labels == 0
    return {
        "t": t,
        "loss": float(((pred - diffusion_target(scheduler, x0, noise, tt)) ** 2).mean()),
        "x0_error_background": float(err[background].mean()),
        "x0_error_brain": float(err[~background].mean()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=Path("models/brain-t1w-from-labels-3d"))
    p.add_argument("--checkpoint", type=Path, default=None, help="a run's diffusion.pt: its EMA weights")
    p.add_argument("--data", type=Path, default=Path("data/cohort-2mm-heldout"))
    p.add_argument("--num", type=int, default=2, help="subjects")
    p.add_argument("--json", default=None, help="results file name under benchmarks/results/")
    args = p.parse_args()

    from napari_meddiff.diffusion.samplers import noise_scheduler
    from napari_meddiff.models import load_model
    from napari_meddiff.training.checkpoints import load_checkpoint
    from napari_meddiff.training.config import load_config

    model = load_model(args.model, device="cpu")
    if args.checkpoint is not None:
        model.unet.load_state_dict(load_checkpoint(args.checkpoint)["ema"])
    cfg = load_config(args.model / "train.yaml")
    x0, labels = load_subjects(cfg, args.data, args.num)
    scheduler = noise_scheduler(model.config["scheduler"])
    k = len(model.label_map)
    centre = tuple(slice((n - 64) // 2, (n - 64) // 2 + 64) for n in x0.shape[2:])
    rows = []
    for t in TIMESTEPS:
        whole = errors_at(model.unet, scheduler, x0, labels, k, t, seed=t)
        crop = errors_at(
            model.unet, scheduler, x0[(..., *centre)].contiguous(), labels[(..., *centre)].contiguous(), k, t, t
        )
        rows.append({**whole, **{f"crop_{key}": v for key, v in crop.items() if key != "t"}})
    cols = ["t", "loss", "x0_error_background", "x0_error_brain", "crop_loss", "crop_x0_error_brain"]
    print(table([{c: round(r[c], 4) if isinstance(r[c], float) else r[c] for c in cols} for r in rows], cols))
    real = [float((x0[:, 0][labels == 0]).std())]
    print(f"(the real scans' own background standard deviation: {real[0]:.4f})")
    if args.json:
        weights = str(args.checkpoint or args.model)
        path = save(args.json, {"machine": machine(), "weights": weights, "subjects": args.num, "rows": rows})
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
