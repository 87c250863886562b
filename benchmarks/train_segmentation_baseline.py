"""Issue 16's segmentation targets, measured on whole held-out volumes through the real task.

    # 1. the baseline: a plain MONAI UNet on the diffusion model's own training slices, snapshots every
    #    CPU minute (can run beside the diffusion training: the budget is process CPU time, not wall time)
    python benchmarks/evaluate_segmentation.py baseline --config models/brain-tissue-segdiff-2d/train-2mm.yaml \
        --out runs/segdiff-2mm/baseline --cpu-minutes 60
    # 2. the evaluation: `napari_meddiff.segment.segment` (5-member ensemble, the model's default sampler and
    #    steps) on each held-out volume, against the baseline snapshot with the diffusion model's CPU minutes
    python benchmarks/evaluate_segmentation.py evaluate --model runs/segdiff-2mm/model \
        --baseline runs/segdiff-2mm/baseline --heldout data/cohort-2mm-heldout --threads 2

Measured per held-out subject, on the subject's own grid (the cohort's 2 mm volume, every slice):
- Dice per tissue (CSF, GM, WM) of the ensemble labels and of the baseline's labels against the cohort labels;
- how well the uncertainty map flags the ensemble's errors: ROC AUC of uncertainty as a score for "label is
  wrong", over the voxels of the head region (image foreground or either label map non-background, dilated by
  2 voxels: the empty air around the head, trivially right and certain, is left out so it cannot inflate the AUC);
- wall seconds of the whole `segment` call (resampling, ensemble, combining) at ``--threads`` threads.

Writes ``benchmarks/results/segmentation_2mm.json`` (``--result``).
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

TISSUES = ("CSF", "GM", "WM")
BASELINE_NETWORK = dict(spatial_dims=2, in_channels=1, out_channels=4, channels=(16, 32, 64, 128),
                        strides=(2, 2, 2), num_res_units=1)


def machine() -> str:
    cpu = "CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}"


def baseline_unet():
    from monai.networks.nets import UNet

    return UNet(**BASELINE_NETWORK)


# --- baseline training -----------------------------------------------------------------------------------------


def train_baseline(args) -> int:
    """DiceCE, Adam 1e-3, batch 8, random flips, on exactly the diffusion config's training slices."""
    from monai.losses import DiceCELoss

    from napari_meddiff.files import write_atomic
    from napari_meddiff.training.config import load_config
    from napari_meddiff.training.data import random_batch, split_dataset

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    train, _ = split_dataset(cfg, progress=False)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    net = baseline_unet()
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    c0, t0, steps, next_snap = time.process_time(), time.time(), 0, 0.0
    log = []
    while True:
        cpu = (time.process_time() - c0) / 60
        if cpu >= next_snap:
            name = f"unet_cpu{next_snap:06.2f}.pt"
            state = {k: v.clone() for k, v in net.state_dict().items()}
            write_atomic(args.out / name, lambda p, s=state: torch.save(s, p))
            log.append({"file": name, "cpu_minutes": round(cpu, 3), "wall_minutes": round((time.time() - t0) / 60, 3),
                        "steps": steps})
            (args.out / "snapshots.json").write_text(json.dumps({
                "network": f"monai.networks.nets.UNet({BASELINE_NETWORK})", "loss": "DiceCE", "batch_size": 8,
                "lr": 1e-3, "train_slices": int(train.images.shape[0]), "train_seeds": train.seeds,
                "threads": args.threads, "snapshots": log}, indent=1))
            next_snap += args.every
            if cpu >= args.cpu_minutes:
                break
        x, y = random_batch(train.images, train.labels, 8, g, True)
        loss = loss_fn(net(x), y[:, None])
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    print(f"baseline: {steps} steps in {log[-1]['cpu_minutes']:.1f} CPU-min", flush=True)
    return 0


def baseline_snapshot(folder: Path, cpu_minutes: float) -> tuple[torch.nn.Module, dict]:
    """The first snapshot with at least ``cpu_minutes`` of training (never less time than the diffusion model)."""
    meta = json.loads((folder / "snapshots.json").read_text())
    later = [s for s in meta["snapshots"] if s["cpu_minutes"] >= cpu_minutes]
    if not later:
        raise SystemExit(f"no baseline snapshot with {cpu_minutes:.1f} CPU minutes yet in {folder}")
    snap = later[0]
    net = baseline_unet()
    net.load_state_dict(torch.load(folder / snap["file"], weights_only=True))
    info = {k: meta[k] for k in ("network", "loss", "batch_size", "lr", "train_slices")}
    return net.eval(), {**info, **snap}


# --- metrics ------------------------------------------------------------------------------------------------


def dice(pred: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    out = {}
    for c, name in enumerate(TISSUES, start=1):
        p, r = pred == c, ref == c
        denom = int(p.sum() + r.sum())
        out[name] = float(2 * np.logical_and(p, r).sum() / denom) if denom else float("nan")
    return out


def roc_auc(score: np.ndarray, positive: np.ndarray) -> float:
    """Mann-Whitney ROC AUC (ties count a half) of ``score`` for the boolean ``positive``."""
    from scipy.stats import rankdata

    pos = int(positive.sum())
    neg = positive.size - pos
    if pos == 0 or neg == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[positive].sum() - pos * (pos + 1) / 2) / (pos * neg))


def head_region(image: np.ndarray, pred: np.ndarray, ref: np.ndarray, margin: int = 2) -> np.ndarray:
    from scipy.ndimage import binary_dilation

    lo, hi = np.percentile(image, [0.5, 99.5])
    fg = (image - lo) / max(hi - lo, 1e-6) > 0.1
    return binary_dilation(fg | (pred > 0) | (ref > 0), iterations=margin)


def baseline_labels(net: torch.nn.Module, image_path: Path, cfg: dict) -> np.ndarray:
    """The baseline's labels for every axial slice of one subject, on the subject's own (RAS) grid."""
    from napari_meddiff.training.data import preprocess_subject

    data = {**cfg["data"], "min_brain_fraction": 0.0}
    slices, _ = preprocess_subject(image_path, None, 2, cfg["image_shape"], cfg["voxel_size"], cfg["intensity"], data)
    with torch.no_grad():
        lab = torch.cat([net(torch.from_numpy(slices[i : i + 32]).float()[:, None]).argmax(1)
                         for i in range(0, len(slices), 32)]).numpy()
    return np.moveaxis(lab, 0, int(cfg["data"]["slice_axis"]))


def summarise(values: list[float]) -> dict[str, float]:
    a = np.array(values, float)
    return {"mean": round(float(np.nanmean(a)), 4), "sd": round(float(np.nanstd(a)), 4),
            "min": round(float(np.nanmin(a)), 4)}


def evaluate(args) -> int:
    from napari_meddiff.cohort import check_split
    from napari_meddiff.segment import segment
    from napari_meddiff.training.config import validate
    from napari_meddiff.training.data import cohort_seeds
    from napari_meddiff.volume import read_volume, to_canonical
    from napari_meddiff.zoo import load_model

    torch.set_num_threads(args.threads)
    model = load_model(args.model, device="cpu")
    import yaml

    cfg = validate(yaml.safe_load((Path(args.model) / "train.yaml").read_text()))  # the model's preprocessing
    files = sorted(args.heldout.glob("*_T1w.nii.gz"))[: args.num]
    seeds = cohort_seeds(args.heldout, files)
    check_split(seeds, "heldout")
    diffusion_cpu = float(model.config["training"]["diffusion"]["cpu_minutes"])
    net, binfo = baseline_snapshot(args.baseline, diffusion_cpu)
    per = {"diffusion": {t: [] for t in TISSUES}, "baseline": {t: [] for t in TISSUES}}
    aucs, seconds, err_rates = [], [], []
    for f in files:
        vol = read_volume(f)
        ref = np.rint(np.asarray(read_volume(f.with_name(f.name.replace("_T1w", "_dseg"))).array)).astype(np.int64)
        t0 = time.perf_counter()
        res = segment(model, vol, ensemble=args.ensemble, seed=args.seed, device="cpu")
        seconds.append(time.perf_counter() - t0)
        pred = np.asarray(res.labels.array).astype(np.int64)
        unc = np.asarray(res.uncertainty.array, np.float32)
        for t, v in dice(pred, ref).items():
            per["diffusion"][t].append(v)
        region = head_region(np.asarray(vol.array, np.float32), pred, ref)
        wrong = pred != ref
        aucs.append(roc_auc(unc[region], wrong[region]))
        err_rates.append(float(wrong[region].mean()))
        canon = to_canonical(vol)
        if not np.allclose(canon.affine, vol.affine):
            raise SystemExit(f"{f.name} is not RAS: the baseline comparison assumes the cohort's RAS grid")
        for t, v in dice(baseline_labels(net, f, cfg), ref).items():
            per["baseline"][t].append(v)
        print(f"{f.name}: {seconds[-1]:.1f} s; Dice diffusion "
              + " ".join(f"{t} {per['diffusion'][t][-1]:.3f}" for t in TISSUES)
              + "; baseline " + " ".join(f"{t} {per['baseline'][t][-1]:.3f}" for t in TISSUES)
              + f"; uncertainty AUC {aucs[-1]:.3f}", flush=True)
    result = {
        "model": str(args.model), "weights_sha256": model.weights_sha256, "machine": machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "heldout_seeds": seeds, "ensemble": args.ensemble, "seed": args.seed,
        "sampler": model.config["defaults"]["sampler"], "steps": int(model.config["defaults"]["steps"]),
        "grid": "each subject's own 2 mm RAS grid, every slice",
        "dice": {k: {t: summarise(v) for t, v in d.items()} for k, d in per.items()},
        "uncertainty_auc": summarise(aucs),
        "uncertainty_auc_what": "ROC AUC of the uncertainty map as a score for 'ensemble label is wrong', head region",
        "error_rate_in_head_region": summarise(err_rates),
        "seconds_per_volume": summarise(seconds),
        "diffusion_training_cpu_minutes": diffusion_cpu,
        "baseline": binfo,
        "targets": {"dice": 0.85, "dice_csf": 0.80, "uncertainty_auc": 0.85, "seconds_per_volume": 60.0},
    }
    args.result.parent.mkdir(parents=True, exist_ok=True)
    args.result.write_text(json.dumps(result, indent=1) + "\n")
    d, b = result["dice"]["diffusion"], result["dice"]["baseline"]
    print("diffusion " + ", ".join(f"{t} {d[t]['mean']:.3f}" for t in TISSUES)
          + " | baseline " + ", ".join(f"{t} {b[t]['mean']:.3f}" for t in TISSUES)
          + f" | AUC {result['uncertainty_auc']['mean']:.3f} | {result['seconds_per_volume']['mean']:.1f} s/volume"
          + f" | baseline snapshot {binfo['cpu_minutes']:.1f} CPU-min vs diffusion {diffusion_cpu:.1f}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("baseline", help="train the plain MONAI UNet baseline, snapshots every CPU minute")
    b.add_argument("--config", type=Path, required=True)
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--cpu-minutes", type=float, default=60.0)
    b.add_argument("--every", type=float, default=1.0, help="CPU minutes between snapshots")
    b.add_argument("--threads", type=int, default=1)
    b.add_argument("--seed", type=int, default=0)
    e = sub.add_parser("evaluate", help="ensemble segmentation of held-out volumes against the baseline")
    e.add_argument("--model", type=Path, required=True)
    e.add_argument("--baseline", type=Path, required=True)
    e.add_argument("--heldout", type=Path, default=ROOT / "data" / "cohort-2mm-heldout")
    e.add_argument("--num", type=int, default=16)
    e.add_argument("--ensemble", type=int, default=5)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--threads", type=int, default=2)
    e.add_argument("--result", type=Path, default=ROOT / "benchmarks" / "results" / "segmentation_2mm.json")
    args = p.parse_args(argv)
    return train_baseline(args) if args.cmd == "baseline" else evaluate(args)


if __name__ == "__main__":
    sys.exit(main())
