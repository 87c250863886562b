"""Held-out reconstruction PSNR/SSIM of an autoencoder training checkpoint (the issue-16 target: >= 32 dB).

    python benchmarks/evaluate_ae.py --config models/brain-ldm-3d/train-2mm.yaml \
        --checkpoint runs/brain-ldm-3d-2mm/autoencoder.pt [--heldout data/cohort-2mm-heldout] [--num 16]
        [--weights ema|model|both] [--threads 1] [--json OUT.json] [--log CURVE.jsonl] [--latents]
        [--two-sample]

Reads the checkpoint with ``torch.load(weights_only=True)``, preprocesses held-out cohort subjects (seeds
100000.., written first if the folder lacks them) exactly as training does, reconstructs each whole volume
(encoder mean, no latent sampling, fp32 on oneDNN) and prints PSNR and SSIM (MONAI metrics, data range 1), mean ± SD.

``--latents`` also prints the posterior per latent channel: the SD of its mean over voxels and subjects, its mean
sigma, and the share of a posterior draw's variance that is the draw's noise (sigma^2 / (var(mean) + sigma^2));
and the PSNR of reconstructions decoded from one draw against those from the mean. A channel whose sigma is
near 1 and whose mean is near constant has collapsed to the prior: it carries no information, and a diffusion
UNet trained on draws (``training.latents: sample``) learns noise there; train on means instead.
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
from evaluate_models import ensure_heldout, load_split, two_sample_test  # noqa: E402

from napari_meddiff.models import build_network  # noqa: E402
from napari_meddiff.runtime.cpu_kernels import prefer_onednn  # noqa: E402
from napari_meddiff.training.checkpoints import load_checkpoint  # noqa: E402
from napari_meddiff.training.config import load_config  # noqa: E402


@torch.no_grad()
def reconstruct_mean(ae: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Decoded encoder means of ``images`` (N, 1, *S), one volume at a time, clamped to [0, 1]."""
    return torch.cat([ae.decode(ae.encode(x[None])[0]) for x in images]).clamp(0, 1)


@torch.no_grad()
def latent_stats(ae: torch.nn.Module, real: torch.Tensor, seed: int = 0) -> dict:
    """Per-channel posterior statistics of ``real`` (see the module docstring) and PSNR from a draw vs the mean."""
    from monai.metrics import PSNRMetric

    ae = prefer_onednn(ae.eval())
    gen = torch.Generator().manual_seed(seed)
    mus, sigmas, psnr_mean, psnr_draw = [], [], [], []
    for x in real:
        mu, sigma = ae.encode(x[None])
        draw = mu + sigma * torch.randn(mu.shape, generator=gen)
        for z, out in ((mu, psnr_mean), (draw, psnr_draw)):
            out.append(float(PSNRMetric(max_val=1.0)(ae.decode(z).clamp(0, 1), x[None]).mean()))
        mus.append(mu)
        sigmas.append(sigma)
    mu, sigma = torch.cat(mus), torch.cat(sigmas)
    var_mu = mu.transpose(0, 1).flatten(1).var(dim=1)
    var_noise = (sigma**2).transpose(0, 1).flatten(1).mean(dim=1)
    share = var_noise / (var_mu + var_noise)
    return {
        "channels": [
            {
                "mean_sd": round(float(var_mu[c].sqrt()), 4),
                "sigma_mean": round(float(sigma[:, c].mean()), 4),
                "noise_share": round(float(share[c]), 4),
            }
            for c in range(mu.shape[1])
        ],
        "noise_share_all": round(float(var_noise.sum() / (var_mu + var_noise).sum()), 4),
        "psnr_db_from_mean": round(sum(psnr_mean) / len(psnr_mean), 3),
        "psnr_db_from_draw": round(sum(psnr_draw) / len(psnr_draw), 3),
    }


def scores(ae: torch.nn.Module, real: torch.Tensor, two_sample: bool = False) -> dict:
    from monai.metrics import PSNRMetric, SSIMMetric

    rec = reconstruct_mean(prefer_onednn(ae.eval()), real)
    psnr = PSNRMetric(max_val=1.0)(rec, real).flatten()
    ssim = SSIMMetric(spatial_dims=3, data_range=1.0)(rec, real).flatten()
    out = {
        "psnr_db": {"mean": round(float(psnr.mean()), 3), "sd": round(float(psnr.std()), 3)},
        "ssim": {"mean": round(float(ssim.mean()), 4), "sd": round(float(ssim.std()), 4)},
    }
    if two_sample:  # the floor for any diffusion model on this autoencoder (evaluate_models.py's test)
        out["c2st_reconstructions"] = two_sample_test(real, rec)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=Path("models/brain-ldm-3d/train-2mm.yaml"))
    ap.add_argument("--checkpoint", type=Path, default=Path("runs/brain-ldm-3d-2mm/autoencoder.pt"))
    ap.add_argument("--heldout", type=Path, default=Path("data/cohort-2mm-heldout"))
    ap.add_argument("--num", type=int, default=16, help="held-out subjects (default 16)")
    ap.add_argument(
        "--weights",
        choices=("ema", "model", "both"),
        default="ema",
        help="the EMA (default; the raw weights before ema_start), the raw weights, or both",
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    ap.add_argument("--log", type=Path, default=None, help="append the result as one JSON line (a held-out curve)")
    ap.add_argument("--latents", action="store_true", help="also the posterior per latent channel (collapse check)")
    ap.add_argument(
        "--two-sample",
        action="store_true",
        help="also evaluate_models.py's two-sample test of the reconstructions against the real volumes "
        "(the best a diffusion model on this autoencoder could reach; use --num 40)",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    if not args.heldout.is_dir() or len(list(args.heldout.glob(cfg["data"]["images"]))) < args.num:
        ensure_heldout(args.heldout, args.num)
    real, _, _, seeds = load_split(cfg, args.heldout, args.num, with_labels=False)
    st = load_checkpoint(args.checkpoint)
    res = {
        "checkpoint": str(args.checkpoint),
        "step": int(st["step"]),
        "minutes": round(float(st["minutes"]), 1),
        "heldout_seeds": seeds,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    for which in ("ema", "model") if args.weights == "both" else (args.weights,):
        if st.get(which) is None:
            continue
        ae = build_network("autoencoder", cfg["networks"]["autoencoder"])
        ae.load_state_dict({k: v.float() for k, v in st[which].items()})
        res[which] = scores(ae, real, args.two_sample)
        print(
            f"step {res['step']} ({which}): held-out PSNR {res[which]['psnr_db']['mean']:.2f} ± "
            f"{res[which]['psnr_db']['sd']:.2f} dB, SSIM {res[which]['ssim']['mean']:.4f} "
            f"({len(real)} subjects, seeds {seeds[0]}-{seeds[-1]})",
            flush=True,
        )
        if args.two_sample:
            c = res[which]["c2st_reconstructions"]
            print(
                f"  two-sample test, reconstructions vs real: {c['accuracy']:.3f} (folds {c['folds']}; "
                f"3D CNN {c['volume_cnn']['accuracy']:.3f})",
                flush=True,
            )
        if args.latents:
            res[which]["latents"] = lat = latent_stats(ae, real)
            for c, ch in enumerate(lat["channels"]):
                print(
                    f"  latent channel {c}: mean SD {ch['mean_sd']:.3f}, sigma {ch['sigma_mean']:.3f}, "
                    f"noise share of a draw {ch['noise_share']:.3f}"
                )
            print(
                f"  all channels: noise share of a draw {lat['noise_share_all']:.3f}; PSNR decoded from the mean "
                f"{lat['psnr_db_from_mean']:.2f} dB, from one draw {lat['psnr_db_from_draw']:.2f} dB",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    if args.log:
        with open(args.log, "a") as f:
            f.write(json.dumps(res) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
