"""Does a conditional model make what is asked? (issue 16: Pearson >= 0.8 for brain and CSF volume)

    python benchmarks/evaluate_conditioning.py --model runs/ldm-4mm-cond/model --heldout data/cohort-2mm-heldout
        [--levels 0 0.25 0.5 0.75 1] [--per-level 8] [--guidance-scale 1] [--threads 2] [--out JSON]

For each volume condition (``brain_volume``, ``csf_volume``) the script generates ``--per-level`` samples at each
requested level (the other conditions at their defaults, the same seeds at every level), segments every sample
into CSF / grey / white matter by a 3-class k-means of its brain intensities, and reports the Pearson correlation
of the requested volume (ml, from the model's declared range) against the measured one, with the mean measured
volume per level. The instrument is checked first on held-out real subjects (preprocessed like training):
k-means volumes against the cohort's label volumes on the same grid (its Pearson is printed; a requested-vs-
measured correlation is only as good as it). Lesion load is not measured yet (no lesion detector).
Writes ``benchmarks/results/conditioning_<model>.json`` (or ``--out``) and prints a summary.
"""

from __future__ import annotations

import argparse
import datetime
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
from evaluate_models import kmeans_1d, load_split, model_train_config  # noqa: E402

VOLUME_CONDITIONS = {"brain_volume": "brain_ml", "csf_volume": "csf_ml"}


def tissue_volumes(image: np.ndarray, voxel_ml: float, threshold: float = 0.1) -> dict[str, float]:
    """CSF and brain (grey + white) volume in ml of a [0, 1] image, by a 3-class k-means of the voxels above
    ``threshold`` (starts spread over the intensity range; the darkest class is CSF)."""
    vals = image[image > threshold].astype(np.float64)
    if vals.size < 10:
        return {"csf_ml": 0.0, "brain_ml": 0.0}
    centres = kmeans_1d(vals, starts="range")
    cls = np.argmin(np.abs(vals[:, None] - centres[None]), axis=1)
    return {"csf_ml": float((cls == 0).sum()) * voxel_ml, "brain_ml": float((cls > 0).sum()) * voxel_ml}


def pearson(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def instrument_check(cfg: dict, heldout: Path, num: int, voxel_ml: float) -> dict:
    """k-means volumes of held-out real subjects against their label volumes on the model grid."""
    images, labels, _, seeds = load_split(cfg, heldout, num)
    est = [tissue_volumes(im[0].numpy(), voxel_ml) for im in images]
    truth_brain = [float(np.isin(lb.numpy(), (2, 3)).sum()) * voxel_ml for lb in labels]
    truth_csf = [float((lb.numpy() == 1).sum()) * voxel_ml for lb in labels]
    return {"subjects": len(seeds),
            "brain_pearson": round(pearson(truth_brain, [e["brain_ml"] for e in est]), 4),
            "csf_pearson": round(pearson(truth_csf, [e["csf_ml"] for e in est]), 4),
            "brain_ml_labels_mean": round(float(np.mean(truth_brain)), 1),
            "brain_ml_kmeans_mean": round(float(np.mean([e["brain_ml"] for e in est])), 1),
            "csf_ml_labels_mean": round(float(np.mean(truth_csf)), 1),
            "csf_ml_kmeans_mean": round(float(np.mean([e["csf_ml"] for e in est])), 1)}


def sweep(model, name: str, levels: list[float], per_level: int, guidance: float, seed: int) -> dict:
    from napari_meddiff.generate import generate

    spec = next(c for c in model.config["conditioning"]["conditions"] if c["name"] == name)
    if "unit_low" not in spec or "unit_high" not in spec:
        raise SystemExit(f"{model.name}: condition {name} declares no ml range (unit_low/unit_high, written by "
                         "meddiff train); requested volumes cannot be compared with measured ones")
    lo, hi = float(spec["unit_low"]), float(spec["unit_high"])
    voxel_ml = float(np.prod(model.config["voxel_size"])) / 1000.0
    seeds = list(range(seed, seed + per_level))
    requested, measured, rows, pictures = [], [], [], {}
    for level in levels:
        vols = generate(model, seeds, device="cpu", conditions={name: float(level)}, guidance_scale=guidance)
        pictures[level] = [np.squeeze(v.array) for v in vols[:3]]
        got = [tissue_volumes(np.squeeze(v.array), voxel_ml)[VOLUME_CONDITIONS[name]] for v in vols]
        requested += [lo + float(level) * (hi - lo)] * len(got)
        measured += got
        rows.append({"level": level, "requested_ml": round(lo + level * (hi - lo), 1),
                     "measured_ml_mean": round(float(np.mean(got)), 1), "measured_ml_sd": round(float(np.std(got)), 1)})
        print(f"{name}={level:g} (asked {lo + level * (hi - lo):.0f} ml): measured {np.mean(got):.1f} ± "
              f"{np.std(got):.1f} ml", flush=True)
    return {"pearson": round(pearson(requested, measured), 4), "levels": rows, "n": len(measured),
            "range_ml": [lo, hi], "seeds": seeds, "pictures": pictures}


def save_pictures(path: Path, results: dict, name: str) -> None:
    """Three orthogonal middle slices of the first seeds at the lowest and highest level of each condition
    (the same seeds: only the condition differs)."""
    from napari_meddiff.training.common import save_grid

    rows, labels = [], []
    for cond, r in results.items():
        pics = r.pop("pictures")
        for level in (min(pics), max(pics)):
            rows.append(pics[level])
            labels.append(f"{cond}={level:g}")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_grid(path, rows, f"{name}, same seeds per column; rows: " + ", ".join(labels))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--heldout", type=Path, default=ROOT / "data" / "cohort-2mm-heldout")
    p.add_argument("--num-heldout", type=int, default=20)
    p.add_argument("--levels", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--per-level", type=int, default=8)
    p.add_argument("--guidance-scale", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from napari_meddiff.zoo import find_model_dir, load_model

    model_dir = find_model_dir(args.model)
    model = load_model(model_dir)
    names = [c.name for c in model.conditions]
    todo = [n for n in VOLUME_CONDITIONS if n in names]
    if not todo:
        raise SystemExit(f"{args.model} has no volume conditions (its conditions: {names or 'none'})")
    t0 = time.time()
    voxel_ml = float(np.prod(model.config["voxel_size"])) / 1000.0
    res = {"model": str(args.model), "weights_sha256": model.weights_sha256, "machine": machine(),
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "guidance_scale": args.guidance_scale, "sampler": model.config["defaults"]["sampler"],
           "steps": model.config["defaults"]["steps"], "target_pearson": 0.8}
    res["instrument"] = instrument_check(model_train_config(model_dir), args.heldout, args.num_heldout, voxel_ml)
    print(f"instrument (k-means vs labels, {res['instrument']['subjects']} held-out subjects): Pearson brain "
          f"{res['instrument']['brain_pearson']}, CSF {res['instrument']['csf_pearson']}", flush=True)
    res["conditions"] = {n: sweep(model, n, args.levels, args.per_level, args.guidance_scale, args.seed) for n in todo}
    res["minutes"] = round((time.time() - t0) / 60, 2)
    png = (args.out.with_suffix(".png") if args.out else
           ROOT / "benchmarks" / "results" / f"conditioning_{model.name}.png")
    save_pictures(png, res["conditions"], model.name)
    res["samples_png"] = str(png.relative_to(ROOT)) if png.is_relative_to(ROOT) else str(png)
    for n, r in res["conditions"].items():
        print(f"{n}: Pearson requested vs measured {r['pearson']} over {r['n']} samples (target >= 0.8)")
    out = args.out or ROOT / "benchmarks" / "results" / f"conditioning_{model.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
