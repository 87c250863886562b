"""Does a conditional model make what is asked? (issue 16: Pearson >= 0.8 for brain and CSF volume, and how
often a requested lesion appears)

    python benchmarks/evaluate_conditioning.py --model runs/ldm-4mm-cond/model --heldout data/cohort-2mm-heldout
        [--instrument segdiff|kmeans] [--lesion-detector runs/lesion-4mm]
        [--levels 0 0.25 0.5 0.75 1] [--per-level 8] [--guidance-scale 1] [--threads 2] [--out JSON]

For each condition the script generates ``--per-level`` samples at each requested level (the other conditions at
their defaults, the same seeds at every level), measures each sample and reports the Pearson correlation of the
requested value (ml, from the model's declared range) against the measured one, with the mean per level.

Instruments (each checked first on held-out real subjects preprocessed like training, as they are and encoded +
decoded by the model's autoencoder, against the volumes of their label files: a requested-vs-measured
correlation is only as good as its instrument):
- brain (grey + white matter) and CSF volume: ``segdiff`` (default), the shipped 2 mm segmentation model
  (``brain-tissue-segdiff-2d``, one member) on the sample; volumes are sums of its class probabilities, so partial
  voxels count partly; or ``kmeans``, a 3-class k-means of the brain intensities (fast; poor for CSF at 4 mm);
- lesion load: the detector of ``benchmarks/lesion_detector.py`` trained on the model's grid (``--lesion-detector``;
  skipped without one); a lesion *appears* when the detected load reaches the detector's threshold.
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
from common import machine, pearson  # noqa: E402
from evaluate_models import kmeans_1d  # noqa: E402

VOLUME_CONDITIONS = {"brain_volume": "brain_ml", "csf_volume": "csf_ml"}
SEGMENTATION_INSTRUMENT = "brain-tissue-segdiff-2d"


def tissue_volumes(image: np.ndarray, voxel_ml: float, threshold: float = 0.1) -> dict[str, float]:
    """CSF and brain (grey + white) volume in ml of a [0, 1] image, by a 3-class k-means of the voxels above
    ``threshold`` (starts spread over the intensity range; the darkest class is CSF)."""
    vals = image[image > threshold].astype(np.float64)
    if vals.size < 10:
        return {"csf_ml": 0.0, "brain_ml": 0.0}
    centres = kmeans_1d(vals, starts="range")
    cls = np.argmin(np.abs(vals[:, None] - centres[None]), axis=1)
    return {"csf_ml": float((cls == 0).sum()) * voxel_ml, "brain_ml": float((cls > 0).sum()) * voxel_ml}


class Instruments:
    """What measures a sample (a [0, 1] array on the model grid ``affine``): tissue volumes and lesion load."""

    def __init__(self, kind: str, affine: np.ndarray, lesion_detector: Path | None = None) -> None:
        self.kind, self.affine = kind, np.asarray(affine, float)
        self.voxel_ml = abs(float(np.linalg.det(self.affine[:3, :3]))) / 1000.0
        self.segmenter = None
        if kind == "segdiff":
            from napari_meddiff.models import load_model

            self.segmenter = load_model(SEGMENTATION_INSTRUMENT, device="cpu")
        self.detector = self.lesion_threshold = None
        if lesion_detector is not None:
            from lesion_detector import load_detector

            self.detector, meta = load_detector(lesion_detector)
            self.lesion_threshold = float(meta["threshold_ml"])

    def volumes(self, image: np.ndarray) -> dict[str, float]:
        if self.segmenter is None:
            return tissue_volumes(image, self.voxel_ml)
        from napari_meddiff.io.volume import Volume
        from napari_meddiff.tasks.segment import segment

        r = segment(self.segmenter, Volume(np.asarray(image, np.float32), self.affine), ensemble=1, device="cpu")
        p, names = np.asarray(r.probabilities.array), [n.lower() for n in r.class_names]
        soft = {n: float(p[..., k].sum()) * self.voxel_ml for k, n in enumerate(names)}
        return {"csf_ml": soft["csf"], "brain_ml": soft["gm"] + soft["wm"]}

    def lesion_ml(self, images: list[np.ndarray]) -> np.ndarray:
        from lesion_detector import lesion_load_ml

        x = torch.from_numpy(np.stack([np.asarray(i, np.float32) for i in images]))[:, None]
        return lesion_load_ml(self.detector, x, self.voxel_ml)


def instrument_check(grid: dict, heldout: list[Path], num: int, instruments: Instruments, model) -> dict:
    """The instruments on held-out real subjects (as they are, and through the model's autoencoder) against
    the volumes of their label files (ml at the files' own resolution, as training measures the conditions):
    the volumes on the first ``num`` subjects of the first folder, the lesion detector on every subject."""
    from lesion_detector import detection_summaries, lesion_contrast, load_subjects, through_autoencoder

    from napari_meddiff.training.conditions import measure_subject

    folders, limit = (heldout, None) if instruments.detector is not None else (heldout[:1], num)
    images, _, loads, paths = load_subjects(grid, folders, split="heldout", limit=limit)
    passes = {"real": images}
    if model.kind == "ldm":
        passes["through_autoencoder"] = through_autoencoder(model, images)
    first = [k for k, f in enumerate(paths) if f.parent == Path(heldout[0])][:num]
    truth = np.array([measure_subject(paths[k], ["brain_volume", "csf_volume"]) for k in first])
    out = {
        "subjects": len(first),
        "instrument": instruments.kind,
        "brain_ml_labels_mean": round(float(truth[:, 0].mean()), 1),
        "csf_ml_labels_mean": round(float(truth[:, 1].mean()), 1),
    }
    for name, ims in passes.items():
        est = [instruments.volumes(ims[k, 0].numpy()) for k in first]
        out[name] = {
            "brain_pearson": round(pearson(truth[:, 0], [e["brain_ml"] for e in est]), 4),
            "csf_pearson": round(pearson(truth[:, 1], [e["csf_ml"] for e in est]), 4),
            "brain_ml_mean": round(float(np.mean([e["brain_ml"] for e in est])), 1),
            "csf_ml_mean": round(float(np.mean([e["csf_ml"] for e in est])), 1),
        }
    if instruments.detector is not None:
        out["lesion"] = {
            "subjects": len(loads),
            "threshold_ml": instruments.lesion_threshold,
            **detection_summaries(
                instruments.detector,
                instruments.lesion_threshold,
                instruments.voxel_ml,
                passes,
                loads,
                lesion_contrast(paths),
            ),
        }
    return out


def measure(instruments: Instruments, name: str, images: list[np.ndarray]) -> list[float]:
    if name == "lesion_load":
        return instruments.lesion_ml(images).tolist()
    return [instruments.volumes(im)[VOLUME_CONDITIONS[name]] for im in images]


def sweep(
    model, name: str, levels: list[float], per_level: int, guidance: float, seed: int, instruments: Instruments
) -> dict:
    from napari_meddiff.tasks.generate import generate

    spec = next(c for c in model.conditions if c.name == name)
    if spec.in_units(spec.low) is None:
        raise SystemExit(
            f"{model.name}: condition {name} declares no ml range (unit_low/unit_high, written by "
            "meddiff train); requested volumes cannot be compared with measured ones"
        )
    seeds = list(range(seed, seed + per_level))
    requested, measured, rows, pictures = [], [], [], {}
    for level in levels:
        vols = generate(model, seeds, device="cpu", conditions={name: float(level)}, guidance_scale=guidance)
        pictures[level] = [np.squeeze(v.array) for v in vols[:3]]
        got = measure(instruments, name, [np.squeeze(v.array) for v in vols])
        asked = spec.in_units(level)
        requested += [asked] * len(got)
        measured += got
        row = {
            "level": level,
            "requested_ml": round(asked, 2),
            "measured_ml_mean": round(float(np.mean(got)), 2),
            "measured_ml_sd": round(float(np.std(got)), 2),
        }
        if name == "lesion_load":
            row["lesion_appears"] = round(float(np.mean(np.array(got) >= instruments.lesion_threshold)), 3)
        rows.append(row)
        print(
            f"{name}={level:g} (asked {asked:.1f} ml): measured {np.mean(got):.1f} ± {np.std(got):.1f} ml"
            + (f", lesion in {row['lesion_appears']:.0%}" if "lesion_appears" in row else ""),
            flush=True,
        )
    return {
        "pearson": round(pearson(requested, measured), 4),
        "levels": rows,
        "n": len(measured),
        "range_ml": [spec.unit_low, spec.unit_high],
        "seeds": seeds,
        "pictures": pictures,
    }


def save_pictures(path: Path, results: dict, name: str) -> None:
    """Three orthogonal middle slices of the first seeds at the lowest and highest level of each condition
    (the same seeds: only the condition differs), and their difference (mid-grey: unchanged, lighter: brighter
    at the highest level)."""
    from napari_meddiff.training.reporting import save_grid

    rows, labels = [], []
    for cond, r in results.items():
        pics = r.pop("pictures")
        low, high = min(pics), max(pics)
        rows += [pics[low], pics[high], [np.clip(0.5 + h - lo, 0, 1) for lo, h in zip(pics[low], pics[high])]]
        labels += [f"{cond}={low:g}", f"{cond}={high:g}", "difference"]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_grid(path, rows, f"{name}, same seeds per column; rows: " + ", ".join(labels))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument(
        "--heldout",
        type=Path,
        nargs="+",
        default=[ROOT / "data" / "cohort-2mm-heldout"],
        help="held-out cohort folders; the first checks the volume instruments, all the lesion detector",
    )
    p.add_argument("--instrument", choices=("segdiff", "kmeans"), default="segdiff")
    p.add_argument("--conditions", nargs="+", default=None, help="only these conditions (default: all measurable)")
    p.add_argument("--lesion-detector", type=Path, default=None, help="a benchmarks/lesion_detector.py folder")
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
    from lesion_detector import grid_config

    from napari_meddiff.models import find_model_dir, load_model
    from napari_meddiff.tasks.generate import to_volume

    model_dir = find_model_dir(args.model)
    model = load_model(model_dir)
    if model.spatial_dims != 3:
        raise SystemExit(
            f"{args.model} is a {model.spatial_dims}D model: its conditions are a subject's volumes, "
            "measured here on whole 3D samples"
        )
    names = [c.name for c in model.conditions]
    measurable = list(VOLUME_CONDITIONS) + (["lesion_load"] if args.lesion_detector else [])
    todo = [n for n in measurable if n in names and (args.conditions is None or n in args.conditions)]
    if not todo:
        raise SystemExit(f"{args.model}: none of its conditions ({names or 'none'}) can be measured here")
    t0 = time.time()
    affine = to_volume(model, np.zeros(model.image_shape, np.float32)).affine  # the grid the samples come on
    instruments = Instruments(args.instrument, affine, args.lesion_detector)
    res = {
        "model": str(args.model),
        "weights_sha256": model.weights_sha256,
        "machine": machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "guidance_scale": args.guidance_scale,
        "sampler": model.config["defaults"]["sampler"],
        "steps": model.config["defaults"]["steps"],
        "target_pearson": 0.8,
    }
    res["instrument"] = instrument_check(grid_config(model_dir), args.heldout, args.num_heldout, instruments, model)
    print(f"instruments on held-out subjects: {json.dumps(res['instrument'])}", flush=True)
    res["conditions"] = {
        n: sweep(model, n, args.levels, args.per_level, args.guidance_scale, args.seed, instruments) for n in todo
    }
    res["minutes"] = round((time.time() - t0) / 60, 2)
    png = (
        args.out.with_suffix(".png") if args.out else ROOT / "benchmarks" / "results" / f"conditioning_{model.name}.png"
    )
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
