"""Where a 2 mm autoencoder's reconstruction error comes from, on a few held-out subjects: PSNR of the whole-
volume pass, of a 64^3 centre crop passed alone against the same region of the whole pass (GroupNorm sees other
statistics in a crop), the mean intensity bias in the brain, PSNR after a least-squares intensity fit, and
what Gaussian blurs of the real image score (how sharp a reconstruction must be for a given PSNR).

    python benchmarks/ae_error_breakdown.py --checkpoint runs/brain-ldm-3d-2mm/autoencoder.pt [--num 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from evaluate_models import load_split  # noqa: E402

from napari_meddiff.models import build_network  # noqa: E402
from napari_meddiff.runtime.cpu_kernels import prefer_onednn  # noqa: E402
from napari_meddiff.training.checkpoints import load_checkpoint
from napari_meddiff.training.config import load_config  # noqa: E402
from napari_meddiff.training.reporting import psnr  # noqa: E402


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of a (1, 1, D, H, W) volume, sigma in voxels, edges replicated."""
    r = int(3 * sigma) + 1
    t = torch.arange(-r, r + 1).float()
    k = torch.exp(-(t**2) / (2 * sigma * sigma))
    k /= k.sum()
    for d in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + d] = len(k)
        pad = [0] * 6
        pad[2 * (2 - d)] = pad[2 * (2 - d) + 1] = r
        x = F.conv3d(F.pad(x, pad, mode="replicate"), k.view(shape))
    return x


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=Path("models/brain-ldm-3d/train-2mm.yaml"))
    ap.add_argument("--checkpoint", type=Path, default=Path("runs/brain-ldm-3d-2mm/autoencoder.pt"))
    ap.add_argument("--heldout", type=Path, default=Path("data/cohort-2mm-heldout"))
    ap.add_argument("--num", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    real, _, _, seeds = load_split(cfg, args.heldout, args.num, with_labels=False)
    st = load_checkpoint(args.checkpoint)
    ae = build_network("autoencoder", cfg["networks"]["autoencoder"])
    ae.load_state_dict({k: v.float() for k, v in st["ema"].items()})
    ae = prefer_onednn(ae.eval())
    print(f"step {st['step']} (EMA weights), {len(real)} held-out subjects")
    region = (..., slice(16, 80), slice(24, 88), slice(16, 80))  # a 64^3 centre crop of 96x112x96
    with torch.no_grad():
        for seed, x in zip(seeds, real):
            x = x[None]
            rec = ae.decode(ae.encode(x)[0]).clamp(0, 1)
            crop = x[region]
            rec_crop = ae.decode(ae.encode(crop)[0]).clamp(0, 1)
            fg = x > 0.05
            a = torch.stack([rec[fg], torch.ones_like(rec[fg])], 1)
            gain, offset = torch.linalg.lstsq(a, x[fg][:, None]).solution.flatten().tolist()
            fit = rec.clone()
            fit[fg] = rec[fg] * gain + offset
            print(
                f"seed {seed}: whole {psnr(rec, x):.2f} dB; centre crop alone {psnr(rec_crop, crop):.2f}, the same "
                f"region of the whole pass {psnr(rec[region], crop):.2f}; "
                f"brain bias {float((rec - x)[fg].mean()):+.4f};"
                f" intensity fit ({gain:.3f}x{offset:+.3f}) {psnr(fit, x):.2f}; real blurred, sigma 0.5 / 0.75 / 1 "
                f"voxel: {psnr(blur(x, 0.5), x):.2f} / {psnr(blur(x, 0.75), x):.2f} / {psnr(blur(x, 1.0), x):.2f}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
