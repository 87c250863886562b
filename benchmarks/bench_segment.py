"""Diffusion segmentation on held-out cohort subjects: Dice per tissue for ensembles of 1, 3, 5, 10 members,
whether the uncertainty map finds the errors (AUC), class-volume errors, and seconds per volume.

    python benchmarks/bench_segment.py [--model brain-tissue-segdiff-2d] [--subjects 5] [--ensembles 1 3 5 10]
    python benchmarks/bench_segment.py --tiny          # smoke run on a random tiny model
    # choosing settings: the training split's validation subjects (never trained on, not the held-out set)
    python benchmarks/bench_segment.py --seeds 116 117 118 119 --steps 2 --tag val-steps2 --baseline none

Subjects are `cohort.make_subject(seed, 2 mm)` for the first ``--subjects`` seeds of ``HELDOUT_SEEDS`` (never
trained on), segmented in their own 2 mm geometry and compared with the cohort labels (0 background, 1 CSF,
2 GM, 3 WM). Members 0..k-1 of the largest ensemble *are* the ensemble of k (per-member seeding), so the largest
ensemble runs once per subject and the smaller ones are read off it; their time per volume is
``prepare + k/K x (time of the K members) + combine/resample`` (all measured).

Both ways `segment` can combine members are measured from the same members: ``votes`` (each member's
argmax) and ``probabilities`` (the mean of the members' class probabilities, ``combine="probabilities"``).

Uncertainty AUC: the uncertainty map (normalised entropy of the combined probabilities) as a score for "this
voxel is wrong", over the voxels where the reference or the prediction is not background (rank statistic, ties
averaged; 0.5 = no better than chance; undefined for a single member's votes, whose uncertainty is 0).

Baseline: a plain MONAI UNet segmenting the same slices, when its folder exists (``--baseline``; default: the
model's ``training/baseline-unet-2d``, else the first of BASELINE_NAMES on the model search path). Its folder
holds ``model.json`` with ``networks.unet`` (``monai.networks.nets.UNet`` keyword arguments), the same
``image_shape``/``voxel_size``/``intensity``, and a safetensors weight file whose sha256 is in ``weights.unet``.

Writes benchmarks/results/segment_<model>.json and prints a table. Run with nothing else heavy on the machine:
the times are wall seconds with ``--threads`` torch threads.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
from common import machine, peak_rss_mb, save, table  # noqa: E402

from napari_meddiff.data.mni152 import HELDOUT_SEEDS, LABELS, make_subject, split_of  # noqa: E402
from napari_meddiff.errors import MeddiffError  # noqa: E402
from napari_meddiff.models import find_model_dir, load_model, model_search_path, sha256_file  # noqa: E402
from napari_meddiff.tasks.segment import (  # noqa: E402
    DEFAULT_COMBINE,
    auto_batch_size,
    class_names,
    combine_probabilities,
    combine_votes,
    label_volumes_ml,
    plan_segmentation,
    run_members,
    to_input_grid,
)
from napari_meddiff.tasks.settings import task_defaults  # noqa: E402

DEFAULT_MODEL = "brain-tissue-segdiff-2d"
BASELINE_NAMES = ("brain-tissue-unet-2d", "brain-tissue-unet-baseline-2d", "brain-tissue-monai-unet-2d")


def split_of_seeds(seeds) -> set[str]:
    return {split_of(s) for s in seeds}


def dice(pred: np.ndarray, ref: np.ndarray, c: int) -> float:
    p, r = pred == c, ref == c
    denom = int(p.sum()) + int(r.sum())
    return float(2 * np.count_nonzero(p & r) / denom) if denom else float("nan")


def surface_zone(ref: np.ndarray, voxels: int = 2) -> np.ndarray:
    """Voxels within ``voxels`` of the reference background: the brain's surface, where CSF is a thin rim."""
    from scipy import ndimage

    return ndimage.binary_dilation(ref == 0, iterations=voxels)


def auc(score: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``score`` for ``positive`` (Mann-Whitney U with average ranks for ties)."""
    from scipy.stats import rankdata

    score, positive = np.asarray(score, np.float64).ravel(), np.asarray(positive, bool).ravel()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


# --- the MONAI UNet baseline ------------------------------------------------------------------------


def find_baseline(name: str | None, model_dir: Path | None = None) -> Path | None:
    """``name`` ('none': no baseline), else the model's own ``training/baseline-unet-2d``, else the first of
    BASELINE_NAMES on the model search path."""
    if name == "none":
        return None
    if name:
        return find_model_dir(name)
    if model_dir is not None and (model_dir / "training" / "baseline-unet-2d" / "model.json").is_file():
        return model_dir / "training" / "baseline-unet-2d"
    for root in model_search_path():
        for candidate in BASELINE_NAMES:
            if (root / candidate / "model.json").is_file():
                return root / candidate
    return None


class Baseline:
    """A plain MONAI UNet (image -> class logits) applied to the same model-grid slices as the diffusion model."""

    def __init__(self, folder: Path, device: torch.device) -> None:
        from monai.networks.nets import UNet
        from safetensors.torch import load_file

        self.config = json.loads((folder / "model.json").read_text())
        self.name = str(self.config.get("name", folder.name))
        entry = self.config["weights"]["unet"]
        path = folder / entry["file"]
        if sha256_file(path) != entry["sha256"]:
            raise MeddiffError(f"{path}: sha256 does not match model.json")
        self.net = UNet(**self.config["networks"]["unet"])
        self.net.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
        self.net.eval().requires_grad_(False).to(device)
        self.device = device

    @torch.inference_mode()
    def labels(self, tiles: np.ndarray, batch: int = 64) -> np.ndarray:
        out = []
        for i in range(0, len(tiles), batch):
            x = torch.from_numpy(tiles[i : i + batch])
            x = x.unsqueeze(1) if x.ndim == len(self.config["image_shape"]) + 1 else x
            want = int(self.config["networks"]["unet"].get("in_channels", 1))
            if x.shape[1] != want:  # the diffusion model's context slices, the slice itself in the middle
                if want > x.shape[1] or (x.shape[1] - want) % 2:
                    raise MeddiffError(f"{self.name} takes {want} image channels; the tiles have {x.shape[1]}")
                c = (x.shape[1] - want) // 2
                x = x[:, c : c + want]
            x = x.to(self.device)
            out.append(self.net(x).argmax(1).to(torch.uint8).cpu().numpy())
        return np.concatenate(out)[None]  # one "member"


# --- evaluation -------------------------------------------------------------------------------------


def evaluate(plan, members, n_classes, sub, names, combine: str = "votes") -> tuple[dict, float]:
    """``members``: labels ``(M, items, *tile)``, or class probabilities ``(M, items, C, *tile)``, combined by
    ``combine`` (``votes``: each member's argmax; ``probabilities``: their mean), as `segment` does."""
    t0 = time.perf_counter()
    if members.ndim == len(plan.tile_shape) + 3:  # probabilities
        if combine == "probabilities":
            probs, unc = combine_probabilities(plan, members)
        else:
            probs, unc = combine_votes(plan, members.argmax(2).astype(np.uint8), n_classes)
    else:
        probs, unc = combine_votes(plan, members, n_classes)
    labels, _, u = to_input_grid(plan, probs, unc, sub.image)
    post = time.perf_counter() - t0
    ref = np.asarray(sub.labels.array)
    row = {f"dice_{LABELS.get(c, names[c])}": dice(labels, ref, c) for c in range(1, n_classes)}
    row["dice_mean"] = float(np.nanmean([row[f"dice_{LABELS.get(c, names[c])}"] for c in range(1, n_classes)]))
    if n_classes > 1:  # where class 1 (CSF) is missed: at the brain's surface, or deeper (ventricles, sulci)
        rim = surface_zone(ref)
        for zone, where in (("rim", rim), ("deep", ~rim)):
            row[f"csf_dice_{zone}"] = dice(np.where(where, labels, 0), np.where(where, ref, 0), 1)
    region = (ref > 0) | (labels > 0)
    wrong = labels != ref
    row["error_rate"] = float(wrong[region].mean())
    row["uncertainty_auc"] = (
        auc(u[region], wrong[region]) if members.shape[0] > 1 or combine == "probabilities" else float("nan")
    )
    row["uncertainty_mean_wrong"] = float(u[region & wrong].mean()) if (region & wrong).any() else float("nan")
    row["uncertainty_mean_right"] = float(u[region & ~wrong].mean()) if (region & ~wrong).any() else float("nan")
    pred_ml = label_volumes_ml(labels, sub.image.affine, names)
    ref_ml = label_volumes_ml(ref, sub.image.affine, names)
    for c in range(1, n_classes):
        key = LABELS.get(c, names[c])
        row[f"volume_error_pct_{key}"] = 100.0 * (pred_ml[names[c]] - ref_ml[names[c]]) / max(ref_ml[names[c]], 1e-9)
    return row, post


TARGETS = {"dice": 0.85, "dice_csf": 0.80, "uncertainty_auc": 0.85, "seconds_per_volume": 60.0}
TISSUE_KEYS = (("CSF", "csf"), ("GM", "grey_matter"), ("WM", "white_matter"))


def render_card(result: dict, json_path: str, ensemble: int = 5) -> str:
    """The "Measured" section of the model card from a result of this script (never typed by hand)."""
    rows = {r["method"]: r for r in result["summary"]}
    m = result["machine"]
    lines = [
        f"Measured by `benchmarks/bench_segment.py` on {result['date']} ({m['cpu']}, {result['threads']} torch "
        f"thread(s), torch {m['torch']}); {len(result['subjects'])} held-out cohort subjects (seeds "
        f"{min(result['subjects'])}-{max(result['subjects'])}, never used in training), whole 2 mm volumes "
        f"through `segment` ({result['sampler']}, {result['steps']} steps); Dice on each subject's own grid. "
        f"Source: `{json_path}`.",
        "",
    ]
    miss = []
    base = next((r for name, r in rows.items() if "MONAI UNet" in name), None)
    for combine in ("probabilities", "votes"):
        r = rows.get(f"diffusion x{ensemble} {combine}")
        if r is None:
            continue
        dice = ", ".join(f"{t} {r[f'dice_{k}']:.3f} ± {r[f'dice_{k}_sd']:.3f}" for t, k in TISSUE_KEYS)
        zones = (
            f" (CSF within 2 voxels of the background {r['csf_dice_rim']:.3f}, deeper {r['csf_dice_deep']:.3f})"
            if "csf_dice_rim" in r
            else ""
        )
        lines.append(
            f"- Ensemble of {ensemble}, members combined by {combine}: Dice {dice}{zones}; uncertainty AUC "
            f"{r['uncertainty_auc']:.3f} (errors {100 * r['error_rate']:.1f} % of the head voxels); "
            f"{r['seconds_per_volume']:.1f} s per volume."
        )
    for name, r in rows.items():
        if name.startswith("diffusion x1 "):
            lines.append(
                f"- One member ({name.split()[-1]}): Dice "
                + ", ".join(f"{t} {r[f'dice_{k}']:.3f}" for t, k in TISSUE_KEYS)
                + f"; {r['seconds_per_volume']:.1f} s per volume."
            )
    if base is not None:
        b = result.get("baseline_training", {})
        lines.append(
            f"- Baseline, a plain MONAI UNet ({b.get('network', 'see the JSON')}, {b.get('loss', '')}, "
            f"{b.get('steps', '?')} steps in {b.get('cpu_minutes', '?')} CPU-min against the diffusion model's "
            f"{b.get('matched_cpu_minutes', '?')}): Dice "
            + ", ".join(f"{t} {base[f'dice_{k}']:.3f} ± {base[f'dice_{k}_sd']:.3f}" for t, k in TISSUE_KEYS)
            + (
                f" (CSF rim {base['csf_dice_rim']:.3f}, deeper {base['csf_dice_deep']:.3f})"
                if "csf_dice_rim" in base
                else ""
            )
            + "."
        )
    default = rows.get(f"diffusion x{ensemble} {result.get('default_combine', 'votes')}")
    if default is not None:
        for t, k in TISSUE_KEYS:
            target = TARGETS["dice_csf"] if t == "CSF" else TARGETS["dice"]
            if default[f"dice_{k}"] < target:
                miss.append(f"Dice {t} {default[f'dice_{k}']:.3f} < {target}")
            if base is not None and default[f"dice_{k}"] < base[f"dice_{k}"]:
                miss.append(f"Dice {t} below the baseline's {base[f'dice_{k}']:.3f}")
        if default["uncertainty_auc"] < TARGETS["uncertainty_auc"]:
            miss.append(f"uncertainty AUC {default['uncertainty_auc']:.3f} < {TARGETS['uncertainty_auc']}")
        if default["seconds_per_volume"] > TARGETS["seconds_per_volume"]:
            miss.append(f"{default['seconds_per_volume']:.0f} s per volume > {TARGETS['seconds_per_volume']:.0f} s")
    lines += [
        "",
        f"Targets (issue 16: Dice ≥ 0.85, CSF ≥ 0.80, ≥ the baseline on every tissue, uncertainty AUC ≥ 0.85, "
        f"≤ 60 s for a {ensemble}-member ensemble of a 2 mm volume on 2 cores), for the model's default "
        f"combine ({result.get('default_combine', 'votes')}): "
        + ("NOT met: " + "; ".join(miss) + "." if miss else "all met."),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--tiny", action="store_true", help="use a random tiny model (checks the script, not quality)")
    parser.add_argument("--baseline", default=None, help="MONAI UNet baseline folder/name ('none' to skip)")
    parser.add_argument("--subjects", type=int, default=5, help="held-out subjects (first N held-out seeds)")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="cohort seeds instead of the held-out ones: e.g. the training split's validation subjects "
        "(116 117 118 119 for the 2 mm model) to choose settings without using the held-out set",
    )
    parser.add_argument("--tag", default=None, help="suffix of the results file (keeps a selection run apart)")
    parser.add_argument("--ensembles", type=int, nargs="+", default=[1, 3, 5, 10])
    parser.add_argument("--sampler", default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--precision", default="fp32", help="fp32, or bf16 autocast (about 2x faster on a bf16 CPU)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the target is a 2-core CPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--mni",
        action="store_true",
        help="also segment the real MNI152 template (1 mm, noise-free) against labels derived from "
        "its own GM/WM/brain maps, with the model's intensity window and with low = minimum",
    )
    parser.add_argument("--mni-ensemble", type=int, default=5)
    parser.add_argument(
        "--card", action="store_true", help="write the model card's Measured section from this run (model folders only)"
    )
    args = parser.parse_args()
    seeds = list(args.seeds) if args.seeds else list(HELDOUT_SEEDS)[: args.subjects]
    if args.card and args.seeds and split_of_seeds(seeds) != {"heldout"}:
        parser.error("--card measures held-out subjects only; drop --seeds")

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.tiny:
        from napari_meddiff.testing.tiny_models import make_tiny_model

        folder = make_tiny_model(Path(tempfile.mkdtemp()) / "tiny-seg-2d", "segmentation", 2, image_shape=(64, 64))
        model = load_model(folder, device=device)
        model.config["voxel_size"] = [3.0, 3.0]
        args.subjects = min(args.subjects, 1)
        args.steps = args.steps or 2
    else:
        model = load_model(args.model, device=device)
    settings = task_defaults(model, "segment")
    sampler = args.sampler or settings["sampler"]
    steps = args.steps or int(settings["steps"])
    default_combine = settings.get("combine") or DEFAULT_COMBINE  # as `segment` chooses
    batch = args.batch_size or auto_batch_size(model, device)
    names = class_names(model)
    n_classes = len(names)
    kmax = max(args.ensembles)
    baseline_dir = None if args.tiny else find_baseline(args.baseline, Path(model.path))
    baseline = Baseline(baseline_dir, device) if baseline_dir is not None else None
    info = machine()
    info["load_average_start"] = list(os.getloadavg())
    print(
        f"# {model.name}: {sampler} {steps} steps {args.precision}, ensembles {args.ensembles}, "
        f"subjects {seeds} ({'/'.join(sorted(split_of_seeds(seeds)))}), {args.threads} threads on {info['cpu']}; "
        f"baseline: {baseline.name if baseline else 'none found'}"
    )

    per_subject = []
    for seed in seeds:
        t0 = time.perf_counter()
        sub = make_subject(seed, resolution_mm=2.0)
        t_subject = time.perf_counter() - t0
        t0 = time.perf_counter()
        plan = plan_segmentation(model, sub.image)
        tiles = plan.item_images()
        t_plan = time.perf_counter() - t0
        t0 = time.perf_counter()
        members = run_members(
            model,
            tiles,
            list(range(kmax)),
            seed=args.seed,
            sampler=sampler,
            steps=steps,
            batch_size=batch,
            precision=args.precision,
            probabilities=True,
        )
        t_members = time.perf_counter() - t0
        entry = {
            "seed": seed,
            "has_lesion": sub.has_lesion,
            "slices": plan.num_items,
            "grid": list(plan.grid.shape),
            "make_subject_s": t_subject,
            "prepare_s": t_plan,
            f"members_{kmax}_s": t_members,
            "results": {},
        }
        for k in sorted(args.ensembles):
            for combine in ("votes", "probabilities"):
                row, post = evaluate(plan, members[:k], n_classes, sub, names, combine)
                row["seconds_per_volume"] = t_plan + t_members * k / kmax + post
                entry["results"][f"diffusion x{k} {combine}"] = row
        if baseline is not None:
            t0 = time.perf_counter()
            base_members = baseline.labels(tiles)
            t_base = time.perf_counter() - t0
            row, post = evaluate(plan, base_members, n_classes, sub, names)
            row["seconds_per_volume"] = t_plan + t_base + post
            entry["results"][f"{baseline.name} (MONAI UNet)"] = row
        per_subject.append(entry)
        brief = ", ".join(f"{m}: Dice {r['dice_mean']:.3f}" for m, r in entry["results"].items())
        print(
            f"subject {seed} ({'lesion' if sub.has_lesion else 'no lesion'}, {plan.num_items} slices, "
            f"{kmax} members in {t_members:.1f} s): {brief}",
            flush=True,
        )

    mni_rows = []
    if args.mni:
        from types import SimpleNamespace

        from napari_meddiff.data.mni152 import _derive_labels, load_template
        from napari_meddiff.io.intensity import intensity_window
        from napari_meddiff.io.volume import Volume

        tpl = load_template(1.0)
        case = SimpleNamespace(
            image=Volume(np.array(tpl["t1"]), tpl["affine"]),
            labels=Volume(_derive_labels(tpl["gm"], tpl["wm"], tpl["mask"]), tpl["affine"]),
        )
        k = min(kmax, args.mni_ensemble)
        spec = intensity_window(case.image.array, model.config.get("intensity"))
        for what, window in (("model window", None), ("low = image minimum", (float(case.image.array.min()), spec[1]))):
            t0 = time.perf_counter()
            plan = plan_segmentation(model, case.image, window=window)
            members = run_members(
                model,
                plan.item_images(),
                list(range(k)),
                seed=args.seed,
                sampler=sampler,
                steps=steps,
                batch_size=batch,
                precision=args.precision,
                probabilities=True,
            )
            row, _ = evaluate(plan, members, n_classes, case, names, default_combine)
            row["seconds_per_volume"] = time.perf_counter() - t0
            row["method"] = f"MNI152 x{k} ({what}: {plan.window[0]:.3g}..{plan.window[1]:.3g})"
            mni_rows.append(row)
            print(f"{row['method']}: Dice {row['dice_mean']:.3f}", flush=True)

    methods = list(per_subject[0]["results"])
    keys = list(per_subject[0]["results"][methods[0]])
    summary = []
    for m in methods:
        row = {"method": m}
        for key in keys:
            vals = np.array([s["results"][m][key] for s in per_subject], dtype=float)
            row[key] = float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")
            if key.startswith("dice_") or key == "uncertainty_auc":
                row[key + "_sd"] = float(np.nanstd(vals)) if np.isfinite(vals).any() else float("nan")
        summary.append(row)
    cols = ["method"] + [k for k in keys if k.startswith("dice_")]
    cols += ["csf_dice_rim", "csf_dice_deep", "uncertainty_auc", "error_rate", "seconds_per_volume"]
    print(table(summary, cols))
    vol_cols = (
        ["method"]
        + [k for k in keys if k.startswith("volume_error_pct_")]
        + ["uncertainty_mean_wrong", "uncertainty_mean_right"]
    )
    print(table(summary, vol_cols))
    if mni_rows:
        print(table(mni_rows, cols))
        print(table(mni_rows, vol_cols))
    result = {
        "model": model.name,
        "weights_sha256": model.weights_sha256,
        "tiny": bool(args.tiny),
        "sampler": sampler,
        "steps": steps,
        "precision": args.precision,
        "batch_size": batch,
        "seed": args.seed,
        "threads": args.threads,
        "subjects": [s["seed"] for s in per_subject],
        "resolution_mm": 2.0,
        "ensembles": args.ensembles,
        "baseline": baseline.name if baseline else None,
        "baseline_training": baseline.config.get("training", {}) if baseline else None,
        "default_combine": default_combine,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": info,
        "summary": summary,
        "mni152": mni_rows,
        "per_subject": per_subject,
        "peak_rss_mb": peak_rss_mb(),
        "load_average_end": list(os.getloadavg()),
        "notes": "AUC over voxels where reference or prediction is not background; seconds_per_volume for k < K "
        "members = prepare + k/K x measured K-member time + combine/resample.",
    }
    suffix = ("" if args.precision == "fp32" else f"_{args.precision}") + (f"_{args.tag}" if args.tag else "")
    path = save(("segment_tiny" if args.tiny else f"segment_{model.name}") + suffix, result)
    print(f"peak RSS {result['peak_rss_mb']:.0f} MB; written {path}")
    if args.card and not args.tiny:
        rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        from napari_meddiff.training.export import write_measured_section

        write_measured_section(model.path, render_card(result, str(rel), ensemble=5 if 5 in args.ensembles else kmax))
        print(f"updated {Path(model.path) / 'MODEL_CARD.md'}")


if __name__ == "__main__":
    main()
