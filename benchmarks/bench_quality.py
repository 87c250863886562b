"""Quality kept at speed: how far each sampler/step count lands from 1000-step DDPM samples of the same model.

    python benchmarks/bench_quality.py [--model brain-ldm-3d] [--num 8] [--reference-steps 1000]

Two independent reference sets (seeds A and B) come from MONAI's DDPM at the full chain. Every setting
(sampler x steps x precision) samples the seeds of set B; its distance to reference set A is compared with the
distance between the two reference sets (the noise floor of this many samples). Distance: unbiased MMD^2 with an
RBF kernel on image features (intensity histogram, gradient-magnitude histogram, coarse block means, and for
latent models the model's own encoder latents pooled). Also the mean absolute voxel difference to the reference
sample of the same seed (B), a paired measure that needs no large sample. A setting counts as not measurably
worse when a permutation test of its MMD^2 against reference A gives p >= 0.05 and its MMD^2 is at most the
noise floor; the fastest such setting is printed (the rule for the model's default). Writes
results/quality_<model>.json and results/quality_<model>.png (distance against seconds per volume).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, machine, precisions_for, save, table  # noqa: E402

from napari_meddiff import generate, load_model  # noqa: E402
from napari_meddiff.audit.fidelity import mmd2, mmd2_pvalue  # noqa: E402  (moved into the package)
from napari_meddiff.autoencoder.passes import encode_images  # noqa: E402

ALPHA = 0.05  # a setting is "measurably worse" when its permutation p-value against reference A is below this


def features(model, images: np.ndarray) -> np.ndarray:
    """One feature row per image (images in [0, 1], shape (N, *spatial))."""
    rows = []
    for img in images:
        img = np.clip(img, 0, 1)
        hist = np.histogram(img, bins=32, range=(0, 1))[0] / img.size
        grads = np.sqrt(sum(g**2 for g in np.gradient(img)))
        ghist = np.histogram(grads, bins=16, range=(0, 0.5))[0] / img.size
        t = torch.from_numpy(img)[None, None].float()
        pool = torch.nn.functional.adaptive_avg_pool3d if img.ndim == 3 else torch.nn.functional.adaptive_avg_pool2d
        blocks = pool(t, 4).flatten().numpy()
        parts = [hist * 10, ghist * 10, blocks]
        if model.kind == "ldm":
            z = encode_images(model, t.to(model.device))
            parts.append(pool(z, 2).flatten().cpu().numpy())
        rows.append(np.concatenate(parts))
    return np.stack(rows)


def sample(model, seeds, sampler, steps, precision, batch):
    t0 = time.perf_counter()
    vols = generate(
        model, seeds, sampler=sampler, steps=steps, precision=precision, batch_size=batch, device=str(model.device)
    )
    seconds = (time.perf_counter() - t0) / len(seeds)
    return np.stack([np.squeeze(v.array) for v in vols]), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="brain-ldm-3d")
    parser.add_argument("--num", type=int, default=8, help="samples per set")
    parser.add_argument("--reference-steps", type=int, default=1000)
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50])
    parser.add_argument("--samplers", nargs="+", default=["ddpm", "ddim", "dpm++"])
    parser.add_argument("--precisions", nargs="+", help="default: fp32, and bf16 (fp16) where native")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    model = load_model(args.model, device=args.device)
    args.precisions = args.precisions or precisions_for(model.device)
    seeds_a = list(range(10_000, 10_000 + args.num))
    seeds_b = list(range(20_000, 20_000 + args.num))
    print(f"# {model.name}: references = DDPM {args.reference_steps} steps fp32, {args.num} samples per set")
    ref_a, ref_secs = sample(model, seeds_a, "ddpm", args.reference_steps, "fp32", args.batch)
    ref_b, _ = sample(model, seeds_b, "ddpm", args.reference_steps, "fp32", args.batch)
    fa, fb = features(model, ref_a), features(model, ref_b)
    pooled = np.concatenate([fa, fb])
    dists = np.sqrt(((pooled[:, None] - pooled[None]) ** 2).sum(-1))
    bandwidth = float(np.median(dists[dists > 0]))
    floor = mmd2(fa, fb, bandwidth)
    rows = [
        {
            "sampler": "ddpm",
            "steps": args.reference_steps,
            "precision": "fp32",
            "seconds": ref_secs,
            "mmd2_to_ref": floor,
            "p_value": mmd2_pvalue(fa, fb, bandwidth),
            "paired_mae": 0.0,
        }
    ]
    for sampler in args.samplers:
        for steps in args.steps:
            for precision in args.precisions:
                imgs, secs = sample(model, seeds_b, sampler, steps, precision, args.batch)
                fx = features(model, imgs)
                rows.append(
                    {
                        "sampler": sampler,
                        "steps": steps,
                        "precision": precision,
                        "seconds": secs,
                        "mmd2_to_ref": mmd2(fa, fx, bandwidth),
                        "p_value": mmd2_pvalue(fa, fx, bandwidth),
                        "paired_mae": float(np.abs(imgs - ref_b).mean()),
                    }
                )
    print(table(rows, ["sampler", "steps", "precision", "seconds", "mmd2_to_ref", "p_value", "paired_mae"]))
    print(f"noise floor (reference A vs reference B): MMD^2 = {floor:.4g}")
    kept = [r for r in rows[1:] if r["p_value"] >= ALPHA and r["mmd2_to_ref"] <= floor]
    choice = min(kept, key=lambda r: r["seconds"]) if kept else None
    if choice:
        print(
            f"fastest setting not measurably worse (p >= {ALPHA} and MMD^2 <= noise floor): "
            f"{choice['sampler']} {choice['steps']} steps {choice['precision']}, {choice['seconds']:.3g} s/volume"
        )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for sampler, marker in zip(["ddpm", "ddim", "dpm++"], "osd"):
        for precision, fill in (("fp32", "full"), ("bf16", "none"), ("fp16", "left")):
            sel = [r for r in rows[1:] if r["sampler"] == sampler and r["precision"] == precision]
            if sel:
                ax.plot(
                    [r["seconds"] for r in sel],
                    [r["mmd2_to_ref"] for r in sel],
                    marker=marker,
                    fillstyle=fill,
                    label=f"{sampler} {precision}",
                )
                for r in sel:
                    ax.annotate(str(r["steps"]), (r["seconds"], r["mmd2_to_ref"]), fontsize=7)
    ax.axhline(floor, color="grey", ls="--", label="noise floor (ref vs ref)")
    if choice:
        ax.scatter(
            [choice["seconds"]],
            [choice["mmd2_to_ref"]],
            s=160,
            facecolors="none",
            edgecolors="red",
            label="fastest not measurably worse",
        )
    ax.scatter([ref_secs], [floor], color="k", marker="*", s=80, label=f"DDPM {args.reference_steps}")
    ax.set_xscale("log")
    ax.set_xlabel("seconds per volume (log)")
    ax.set_ylabel("MMD$^2$ to 1000-step DDPM samples")
    where = machine()["cuda"] if model.device.type == "cuda" else machine()["cpu"]
    ax.set_title(f"{model.name}: quality against time ({where}, {args.num} samples per set)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    name = f"quality_{model.name}" + ("_cuda" if model.device.type == "cuda" else "")
    png = RESULTS / f"{name}.png"
    RESULTS.mkdir(exist_ok=True)
    fig.savefig(png, dpi=120)
    path = save(
        name,
        {
            "model": model.name,
            "device": str(model.device),
            "machine": machine(),
            "num": args.num,
            "noise_floor_mmd2": floor,
            "bandwidth": bandwidth,
            "alpha": ALPHA,
            "fastest_not_worse": choice,
            "rows": rows,
        },
    )
    print(f"written {path} and {png}")


if __name__ == "__main__":
    main()
