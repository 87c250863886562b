"""Held-out reconstruction PSNR/SSIM of an autoencoder training checkpoint (the issue-16 target: >= 32 dB).

    python benchmarks/evaluate_ae.py --config models/brain-ldm-3d/train-2mm.yaml \
        --checkpoint runs/brain-ldm-3d-2mm/autoencoder.pt [--heldout data/cohort-2mm-heldout] [--num 16]
        [--weights ema|model|both] [--threads 1] [--json OUT.json] [--log CURVE.jsonl]

Reads the checkpoint with ``torch.load(weights_only=True)``, preprocesses held-out cohort subjects (seeds
100000.., written first if the folder lacks them) exactly as training does, reconstructs each whole volume
(encoder mean, no latent sampling, fp32 on oneDNN) and prints PSNR and SSIM (MONAI metrics, data range 1), mean ± SD.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).parent))
from evaluate_models import ensure_heldout, load_split  # noqa: E402

from napari_meddiff.cpu_kernels import prefer_onednn  # noqa: E402
from napari_meddiff.training.common import load_checkpoint  # noqa: E402
from napari_meddiff.training.config import load_config  # noqa: E402
from napari_meddiff.zoo import build_network  # noqa: E402


@torch.no_grad()
def reconstruct_mean(ae: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Decoded encoder means of ``images`` (N, 1, *S), one volume at a time, clamped to [0, 1]."""
    return torch.cat([ae.decode(ae.encode(x[None])[0]) for x in images]).clamp(0, 1)


def scores(ae: torch.nn.Module, real: torch.Tensor) -> dict:
    from monai.metrics import PSNRMetric, SSIMMetric

    rec = reconstruct_mean(prefer_onednn(ae.eval()), real)
    psnr = PSNRMetric(max_val=1.0)(rec, real).flatten()
    ssim = SSIMMetric(spatial_dims=3, data_range=1.0)(rec, real).flatten()
    return {"psnr_db": {"mean": round(float(psnr.mean()), 3), "sd": round(float(psnr.std()), 3)},
            "ssim": {"mean": round(float(ssim.mean()), 4), "sd": round(float(ssim.std()), 4)}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=Path("models/brain-ldm-3d/train-2mm.yaml"))
    ap.add_argument("--checkpoint", type=Path, default=Path("runs/brain-ldm-3d-2mm/autoencoder.pt"))
    ap.add_argument("--heldout", type=Path, default=Path("data/cohort-2mm-heldout"))
    ap.add_argument("--num", type=int, default=16, help="held-out subjects (default 16)")
    ap.add_argument("--weights", choices=("ema", "model", "both"), default="ema",
                    help="the EMA (default; the raw weights before ema_start), the raw weights, or both")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    ap.add_argument("--log", type=Path, default=None, help="append the result as one JSON line (a held-out curve)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    if not args.heldout.is_dir() or len(list(args.heldout.glob(cfg["data"]["images"]))) < args.num:
        ensure_heldout(args.heldout, args.num)
    real, _, _, seeds = load_split(cfg, args.heldout, args.num, with_labels=False)
    st = load_checkpoint(args.checkpoint)
    res = {"checkpoint": str(args.checkpoint), "step": int(st["step"]), "minutes": round(float(st["minutes"]), 1),
           "heldout_seeds": seeds, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    for which in (("ema", "model") if args.weights == "both" else (args.weights,)):
        if st.get(which) is None:
            continue
        ae = build_network("autoencoder", cfg["networks"]["autoencoder"])
        ae.load_state_dict({k: v.float() for k, v in st[which].items()})
        res[which] = scores(ae, real)
        print(f"step {res['step']} ({which}): held-out PSNR {res[which]['psnr_db']['mean']:.2f} ± "
              f"{res[which]['psnr_db']['sd']:.2f} dB, SSIM {res[which]['ssim']['mean']:.4f} "
              f"({len(real)} subjects, seeds {seeds[0]}-{seeds[-1]})", flush=True)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    if args.log:
        with open(args.log, "a") as f:
            f.write(json.dumps(res) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
