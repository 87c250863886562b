"""A lesion detector for measuring lesion-conditioned generators (issue 16: "how often a requested lesion appears").

    # train on a generator's own grid (its training config: shape, voxel size, intensity), from cohort folders
    # (subjects without a _lesion file count as lesion-free); with --autoencoder-of, every training subject is
    # also seen through that LDM's autoencoder, so the detector works on decoded images like the samples
    python benchmarks/lesion_detector.py train --grid-of runs/ldm-4mm-cond/model \
        --data data/cohort-2mm-train data/cohort-2mm-lesions \
        --out runs/lesion-4mm --minutes 15
    # check it on held-out subjects, as they are and through the autoencoder
    python benchmarks/lesion_detector.py check --detector runs/lesion-4mm \
        --heldout data/cohort-2mm-heldout data/cohort-2mm-heldout-lesions --autoencoder-of runs/ldm-4mm-cond/model

The detector is a plain MONAI UNet (3D, 2 classes, DiceCE over the batch: Dice of the lesion class, CE with lesion
voxels weighted x20; half of each batch lesion subjects,
random left-right flips) trained to segment the cohort's lesion masks. A volume's lesion load is the volume of
its voxels with lesion probability above 0.5 (ml); a lesion is *detected* when the
load reaches the detector's threshold, fixed after training on the training subjects alone (the
``--threshold-quantile`` quantile of the loads it finds in lesion-free training subjects, default 0.95, so that
one odd subject cannot set it; at least 0.1 ml). The learning rate decays to zero over ``--minutes`` (cosine);
``--resume`` starts from another detector's weights. `check` reports detection sensitivity (all lesions and
lesions of at least 1 ml, hypo- and hyperintense lesions), specificity and the Pearson correlation of measured
against true load (ml at the cohort's 2 mm) on held-out subjects; `check` writes ``check.json`` next to the
detector.
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

NETWORK = dict(spatial_dims=3, in_channels=1, out_channels=2, channels=(16, 32, 64), strides=(2, 2), num_res_units=1)
MIN_THRESHOLD_ML = 0.1
LESION_CE_WEIGHT = 20.0


def grid_config(model_dir: Path) -> dict:
    """The grid a generator was trained on: what the detector sees (its training config's preprocessing)."""
    from evaluate_models import model_train_config

    cfg = model_train_config(model_dir)
    if cfg["spatial_dims"] != 3:
        raise SystemExit(f"{model_dir}: the lesion detector is 3D; this model is {cfg['spatial_dims']}D")
    return {k: cfg[k] for k in ("spatial_dims", "image_shape", "voxel_size", "intensity", "data")}


def load_subjects(grid: dict, folders: list[Path], split: str | None = None, limit: int | None = None):
    """(images (N,1,*S) in [0, 1], lesion masks (N,1,*S), true load in ml at the files' own resolution, image
    paths) of the first ``limit`` subjects of each folder (default: all), folder after folder."""
    from napari_meddiff.data.mni152 import check_split
    from napari_meddiff.training.conditions import measure_subject
    from napari_meddiff.training.data import cohort_seeds, preprocess_subject

    images, masks, loads, paths = [], [], [], []
    for folder in folders:
        files = sorted(Path(folder).glob(grid["data"]["images"]))[:limit]
        if split:
            check_split(cohort_seeds(Path(folder), files), split)
        for f in files:
            lesion = f.with_name(f.name.replace("_T1w", "_lesion"))
            im, lb = preprocess_subject(
                f,
                lesion if lesion.is_file() else None,
                3,
                grid["image_shape"],
                grid["voxel_size"],
                grid["intensity"],
                grid["data"],
            )
            images.append(im)
            masks.append(lb if lb is not None else np.zeros_like(im, dtype=np.int64))
            loads.append(measure_subject(f, ["lesion_load"])[0])
            paths.append(f)
    as_tensor = lambda a, dt: torch.from_numpy(np.stack(a)).to(dt)  # noqa: E731
    return as_tensor(images, torch.float32), (as_tensor(masks, torch.int64) > 0).long(), np.array(loads), paths


def lesion_contrast(paths: list[Path]) -> np.ndarray:
    """Per cohort image: its mean inside the lesion mask over the lesion-free image's there (< 1: a hypointense
    lesion, > 1: hyperintense), NaN where the subject has no lesion (or no lesion-free file)."""
    from napari_meddiff.io.volume import read_volume

    out = []
    for f in paths:
        mask_file, free_file = (f.with_name(f.name.replace("_T1w", s)) for s in ("_lesion", "_T1w-lesionfree"))
        if not (mask_file.is_file() and free_file.is_file()):
            out.append(np.nan)
            continue
        inside = read_volume(mask_file).array > 0
        out.append(
            float(read_volume(f).array[inside].mean() / read_volume(free_file).array[inside].mean())
            if inside.any()
            else np.nan
        )
    return np.array(out)


def through_autoencoder(model, images: torch.Tensor) -> torch.Tensor:
    """Each image encoded and decoded by an LDM's autoencoder (posterior mean), clipped to [0, 1]; ``model``: a
    loaded model or its folder."""
    from evaluate_ae import reconstruct_mean

    from napari_meddiff.models import DiffusionModel, load_model

    if not isinstance(model, DiffusionModel):
        model = load_model(model, device="cpu")
    return reconstruct_mean(model.autoencoder.eval(), images)


def build_network(config: dict | None = None) -> torch.nn.Module:
    from monai.networks.nets import UNet

    return UNet(**(config or NETWORK))


def lesion_load_ml(net: torch.nn.Module, images: torch.Tensor, voxel_ml: float, batch: int = 4) -> np.ndarray:
    """Voxels with lesion probability > 0.5 x voxel volume, per image (N,1,*S) -> (N,) ml (a sum of soft
    probabilities would add the small probabilities of the whole brain)."""
    net.eval()
    loads = []
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            p = torch.softmax(net(images[i : i + batch]), dim=1)[:, 1]
            loads += ((p > 0.5).flatten(1).sum(1) * voxel_ml).tolist()
    return np.array(loads)


def train(args) -> int:
    from monai.losses import DiceCELoss
    from safetensors.torch import save_file

    from napari_meddiff.io.files import current_umask

    torch.manual_seed(0)
    grid = grid_config(Path(args.grid_of))
    images, masks, loads, paths = load_subjects(grid, args.data, split="train")
    print(f"{len(images)} training subjects, {int((loads > 0).sum())} with a lesion", flush=True)
    if args.autoencoder_of:
        t = time.time()
        images = torch.cat([images, through_autoencoder(Path(args.autoencoder_of), images)])
        masks, loads = torch.cat([masks, masks]), np.concatenate([loads, loads])
        print(f"+ the same through the autoencoder of {args.autoencoder_of} ({time.time() - t:.0f} s)", flush=True)
    net, steps_before, minutes_before = build_network(), 0, 0.0
    if args.resume:
        net, before = load_detector(Path(args.resume))
        steps_before, minutes_before = before["steps"], float(before["minutes"])
        print(f"resuming from {args.resume} ({steps_before} steps)", flush=True)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    # lesions are ~0.03 % of the voxels: Dice of the lesion class only, and lesion voxels weighted in the CE
    loss_fn = DiceCELoss(
        to_onehot_y=True,
        softmax=True,
        batch=True,
        include_background=False,
        weight=torch.tensor([1.0, LESION_CE_WEIGHT]),
    )
    gen = torch.Generator().manual_seed(0)
    with_lesion, without = np.flatnonzero(loads > 0), np.flatnonzero(loads == 0)
    t0, step, losses = time.time(), 0, []
    while (elapsed := time.time() - t0) < args.minutes * 60:
        for group in opt.param_groups:  # cosine decay over the time budget
            group["lr"] = args.lr * 0.5 * (1.0 + np.cos(np.pi * elapsed / (args.minutes * 60)))
        half = args.batch_size // 2
        pick = np.concatenate(
            [
                with_lesion[torch.randint(len(with_lesion), (half,), generator=gen).numpy()],
                without[torch.randint(len(without), (args.batch_size - half,), generator=gen).numpy()],
            ]
        )
        x, y = images[pick], masks[pick]
        flip = torch.rand(len(pick), generator=gen) < 0.5  # left-right (axis 0 of the RAS grid)
        x[flip], y[flip] = x[flip].flip(2), y[flip].flip(2)
        net.train()
        loss = loss_fn(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        step += 1
        if step % 100 == 0:
            print(f"step {step}, loss {np.mean(losses[-100:]):.4f}, {(time.time() - t0) / 60:.1f} min", flush=True)
    voxel_ml = float(np.prod(grid["voxel_size"])) / 1000.0
    measured = lesion_load_ml(net, images, voxel_ml)
    threshold = max(MIN_THRESHOLD_ML, float(np.quantile(measured[loads == 0], args.threshold_quantile)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out / "detector.safetensors"))
    (out / "detector.safetensors").chmod(0o666 & ~current_umask())  # safetensors writes 0600
    meta = {
        "network": NETWORK,
        "lr": args.lr,
        "grid": grid,
        "threshold_ml": round(threshold, 4),
        "threshold_quantile": args.threshold_quantile,
        "steps": steps_before + step,
        "resumed_from": str(args.resume) if args.resume else None,
        "minutes": round(minutes_before + (time.time() - t0) / 60, 2),  # all runs, as "steps"
        "final_loss": round(float(np.mean(losses[-100:])), 4),
        "training_subjects": len(paths),
        "training_with_lesion": int((loads[: len(paths)] > 0).sum()),
        "training_folders": [str(d) for d in args.data],
        "autoencoder_of": args.autoencoder_of,
        "machine": machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    (out / "detector.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(
        f"wrote {out}: {steps_before + step} steps, threshold {threshold:.3f} ml (the {args.threshold_quantile} "
        "quantile of the loads in lesion-free training subjects)"
    )
    return 0


def load_detector(folder: Path) -> tuple[torch.nn.Module, dict]:
    from safetensors.torch import load_file

    meta = json.loads((Path(folder) / "detector.json").read_text())
    net = build_network(meta["network"])
    net.load_state_dict(load_file(str(Path(folder) / "detector.safetensors")))
    return net.eval(), meta


def detection_summary(
    measured: np.ndarray, truth: np.ndarray, threshold: float, contrast: np.ndarray | None = None
) -> dict:
    """Sensitivity (all lesions, lesions >= 1 ml and, given ``lesion_contrast``, hypo- and hyperintense ones),
    specificity, and how well the measured load follows the true one."""

    has, large, found = truth > 0, truth >= 1.0, measured >= threshold
    rate = lambda sel: round(float(found[sel].mean()), 3) if sel.any() else None  # noqa: E731
    kinds = {}
    if contrast is not None:
        kinds = {f"sensitivity_{k}": rate(has & sel) for k, sel in (("hypo", contrast < 1), ("hyper", contrast > 1))}
        kinds.update(with_lesion_hyper=int((has & (contrast > 1)).sum()))
    return {
        "subjects": int(len(truth)),
        "with_lesion": int(has.sum()),
        "with_lesion_ge_1ml": int(large.sum()),
        "sensitivity": rate(has),
        "sensitivity_ge_1ml": rate(large),
        **kinds,
        "specificity": round(float((~found[~has]).mean()), 3) if (~has).any() else None,
        "pearson_load": round(pearson(truth, measured), 4),
        "mean_abs_error_ml": round(float(np.abs(measured - truth).mean()), 3),
    }


def detection_summaries(
    net: torch.nn.Module,
    threshold: float,
    voxel_ml: float,
    passes: dict[str, torch.Tensor],
    truth: np.ndarray,
    contrast: np.ndarray | None = None,
) -> dict:
    """`detection_summary` of each named set of the same subjects' images (e.g. real, through an autoencoder)."""
    return {
        name: detection_summary(lesion_load_ml(net, images, voxel_ml), truth, threshold, contrast)
        for name, images in passes.items()
    }


def check(args) -> int:
    net, meta = load_detector(Path(args.detector))
    images, _, truth, paths = load_subjects(meta["grid"], args.heldout, split="heldout")
    voxel_ml = float(np.prod(meta["grid"]["voxel_size"])) / 1000.0
    passes = {"real": images}
    if args.autoencoder_of:
        passes["through_autoencoder"] = through_autoencoder(Path(args.autoencoder_of), images)
    res = {
        "machine": machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "heldout": [str(d) for d in args.heldout],
        "threshold_ml": meta["threshold_ml"],
        **detection_summaries(net, meta["threshold_ml"], voxel_ml, passes, truth, lesion_contrast(paths)),
    }
    for k in passes:
        print(f"{k}: {res[k]}")
    (Path(args.detector) / "check.json").write_text(json.dumps(res, indent=2) + "\n")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train")
    t.add_argument("--grid-of", required=True, help="a 3D generator's model folder: the grid to work on")
    t.add_argument("--data", type=Path, nargs="+", required=True, help="cohort folders of training subjects")
    t.add_argument("--autoencoder-of", default=None, help="an LDM folder: also train on its reconstructions")
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--minutes", type=float, default=15.0)
    t.add_argument("--batch-size", type=int, default=4)
    t.add_argument("--lr", type=float, default=1e-3, help="initial learning rate (cosine decay to 0)")
    t.add_argument(
        "--threshold-quantile",
        type=float,
        default=0.95,
        help="detection threshold: this quantile of the loads found in lesion-free training subjects",
    )
    t.add_argument("--resume", type=Path, default=None, help="a detector folder to start from (its weights)")
    c = sub.add_parser("check")
    c.add_argument("--detector", type=Path, required=True)
    c.add_argument("--heldout", type=Path, nargs="+", required=True)
    c.add_argument("--autoencoder-of", default=None)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    return train(args) if args.command == "train" else check(args)


if __name__ == "__main__":
    sys.exit(main())
