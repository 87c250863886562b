"""The plain MONAI UNet baseline of issue 16's segmentation target, trained for the same CPU time as the
diffusion model, as a model folder that `bench_segment.py --baseline` evaluates beside it.

    # train on exactly the diffusion config's training slices, a snapshot every CPU minute (it can run beside
    # the diffusion training: the budget is this process's CPU time, not wall time)
    python benchmarks/train_segmentation_baseline.py train --config models/brain-tissue-segdiff-2d/train-2d.yaml \
        --out runs/segdiff-2mm/baseline --cpu-minutes 60
    # later: continue to more CPU minutes (from last.pt, weights and optimiser, where the run wrote one)
    python benchmarks/train_segmentation_baseline.py train --config models/brain-tissue-segdiff-2d/train-2d.yaml \
        --out runs/segdiff-2mm/baseline --cpu-minutes 100 --resume
    # the 2.5D baseline of train.yaml (stage 2), from the 2D baseline's snapshot at stage 1's CPU minutes
    python benchmarks/train_segmentation_baseline.py train --config models/brain-tissue-segdiff-2d/train.yaml \
        --out runs/segdiff-2mm-ctx/baseline --cpu-minutes 130 --init-from runs/segdiff-2mm/baseline/unet_cpu045.00.pt
    # the first snapshot with at least the diffusion model's training CPU minutes, as a baseline model folder
    python benchmarks/train_segmentation_baseline.py export --snapshots runs/segdiff-2mm-ctx/baseline \
        --match runs/segdiff-2mm-ctx/model --out runs/segdiff-2mm-ctx/brain-tissue-unet-2d
    python benchmarks/bench_segment.py --model runs/segdiff-2mm-ctx/model \
        --baseline runs/segdiff-2mm-ctx/brain-tissue-unet-2d --subjects 16 --ensembles 1 3 5

The shipped model's baseline, exported as above, is committed as
``models/brain-tissue-segdiff-2d/training/baseline-unet-2d`` (``bench_segment.py`` finds it there by default).

Recipe (unchanged from the first baseline of `evaluate_models.py`): DiceCE, Adam 1e-3, batch 8, random
left-right flips, ``monai.networks.nets.UNet(channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=1)``,
with as many input channels as the diffusion model sees image channels (``segmentation.context_slices``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BASELINE_NETWORK = dict(
    spatial_dims=2, in_channels=1, out_channels=4, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=1
)


def network_config(cfg: dict) -> dict:
    """The baseline UNet for a diffusion config: one input channel per image channel it sees (context slices)."""
    context = int((cfg.get("segmentation") or {}).get("context_slices") or 0)
    return {**BASELINE_NETWORK, "in_channels": 1 + 2 * context}


def baseline_unet(config: dict | None = None):
    from monai.networks.nets import UNet

    return UNet(**(config or BASELINE_NETWORK))


# --- baseline training -----------------------------------------------------------------------------------------


def train_baseline(args) -> int:
    """DiceCE, Adam 1e-3, batch 8, random flips, on exactly the diffusion config's training slices."""
    from monai.losses import DiceCELoss

    from napari_meddiff.io.files import write_atomic, write_text_atomic
    from napari_meddiff.training.config import load_config
    from napari_meddiff.training.data import random_batch, split_dataset

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    train, _ = split_dataset(cfg, progress=False)
    args.out.mkdir(parents=True, exist_ok=True)
    net_cfg = network_config(cfg)
    torch.manual_seed(args.seed)  # the initial weights
    net = baseline_unet(net_cfg)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    meta = {
        "network": f"monai.networks.nets.UNet({net_cfg})",
        "network_config": net_cfg,
        "loss": "DiceCE",
        "batch_size": 8,
        "lr": 1e-3,
        "train_slices": int(train.images.shape[0]),
        "train_seeds": train.seeds,
        "config": str(args.config),
        "threads": args.threads,
        "snapshots": [],
    }
    spent_cpu, spent_wall, steps, next_snap, warmup = 0.0, 0.0, 0, 0.0, 0
    state_path = args.out / "last.pt"
    if args.init_from is not None and not args.resume:  # another run's snapshot, widened to more image channels
        from napari_meddiff.training.checkpoints import load_widened

        entries = [
            s
            for s in json.loads((args.init_from.parent / "snapshots.json").read_text())["snapshots"]
            if s["file"] == args.init_from.name
        ]
        if not entries:
            raise SystemExit(f"{args.init_from} is not listed in {args.init_from.parent / 'snapshots.json'}")
        entry = entries[0]
        spent_cpu, spent_wall, steps = entry["cpu_minutes"], entry["wall_minutes"], entry["steps"]
        next_snap = float(entry["file"][len("unet_cpu") : -len(".pt")]) + args.every
        context = (net_cfg["in_channels"] - 1) // 2
        widened = load_widened(net, torch.load(args.init_from, weights_only=True), lambda i: i + context)
        warmup = 100
        meta["init_from"] = {
            "snapshot": str(args.init_from),
            **entry,
            "widened": widened,
            "optimiser": "fresh, 100-step warmup",
        }
        print(f"baseline: from {args.init_from} ({spent_cpu:.1f} CPU-min, step {steps}); widened {widened}", flush=True)
    if args.resume:
        meta = json.loads((args.out / "snapshots.json").read_text())
        if meta.get("network_config", BASELINE_NETWORK) != net_cfg:
            raise SystemExit(
                f"{args.out} holds a baseline of another network ({meta.get('network_config')}); "
                f"this config's is {net_cfg}"
            )
        last = meta["snapshots"][-1]
        spent_cpu, spent_wall, steps = last["cpu_minutes"], last["wall_minutes"], last["steps"]
        next_snap = float(last["file"][len("unet_cpu") : -len(".pt")]) + args.every
        state = torch.load(state_path, weights_only=True) if state_path.is_file() else None
        if state is not None and state.get("snapshot") == last:  # weights + optimiser of that snapshot: exact
            net.load_state_dict(state["net"])
            opt.load_state_dict(state["opt"])
        else:  # only the weights were kept: a fresh Adam, its learning rate warmed up over 100 steps
            net.load_state_dict(torch.load(args.out / last["file"], weights_only=True))
            warmup = 100
            meta.setdefault("resumes", []).append({"at_cpu_minutes": spent_cpu, "optimiser": "fresh, 100-step warmup"})
        print(f"baseline: resumed at {spent_cpu:.1f} CPU-min, step {steps}", flush=True)
    torch.manual_seed(args.seed + steps)
    g = torch.Generator().manual_seed(args.seed + steps)
    c0, t0, first = time.process_time(), time.time(), steps
    log = meta["snapshots"]
    while True:
        cpu = spent_cpu + (time.process_time() - c0) / 60
        if cpu >= next_snap and (steps > first or not log):
            name = f"unet_cpu{next_snap:06.2f}.pt"
            state = {k: v.clone() for k, v in net.state_dict().items()}
            entry = {
                "file": name,
                "cpu_minutes": round(cpu, 3),
                "wall_minutes": round(spent_wall + (time.time() - t0) / 60, 3),
                "steps": steps,
            }
            write_atomic(args.out / name, lambda p, s=state: torch.save(s, p))
            log.append(entry)
            write_text_atomic(args.out / "snapshots.json", json.dumps(meta, indent=1))
            # the optimiser with the snapshot it belongs to: a resume uses it only when they match
            write_atomic(
                state_path,
                lambda p, s=state, e=entry: torch.save({"net": s, "opt": opt.state_dict(), "snapshot": e}, p),
            )
            next_snap += args.every
            if cpu >= args.cpu_minutes:
                break
        x, y = random_batch(train.images, train.labels, 8, g, True)
        loss = loss_fn(net(x), y[:, None])
        for group in opt.param_groups:  # 1e-3, after the warmup of a fresh optimiser
            group["lr"] = 1e-3 * min(1.0, (steps - first + 1) / warmup) if warmup else 1e-3
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    print(f"baseline: {steps} steps in {log[-1]['cpu_minutes']:.1f} CPU-min", flush=True)
    return 0


def baseline_snapshot(folder: Path, meta: dict, cpu_minutes: float) -> tuple[torch.nn.Module, dict]:
    """The first snapshot (of ``meta``, the folder's snapshots.json) with at least ``cpu_minutes`` of training
    (never less time than the diffusion model). ``meta["network_config"]``: the UNet's keyword arguments (older
    folders: BASELINE_NETWORK)."""
    later = [s for s in meta["snapshots"] if s["cpu_minutes"] >= cpu_minutes]
    if not later:
        raise SystemExit(f"no baseline snapshot with {cpu_minutes:.1f} CPU minutes yet in {folder}")
    snap = later[0]
    net = baseline_unet(meta.get("network_config"))
    net.load_state_dict(torch.load(folder / snap["file"], weights_only=True))
    info = {k: meta[k] for k in ("network", "loss", "batch_size", "lr", "train_slices")}
    if meta.get("init_from"):
        info["init_from"] = meta["init_from"]
    return net.eval(), {**info, **snap}


def export(args) -> int:
    """Write the snapshot as a model folder in `bench_segment.Baseline`'s format (model.json + safetensors)."""
    from safetensors.torch import save_file

    from napari_meddiff.io.files import write_atomic, write_text_atomic
    from napari_meddiff.models import sha256_file
    from napari_meddiff.training.config import load_config

    meta = json.loads((args.snapshots / "snapshots.json").read_text())
    minutes = args.cpu_minutes
    if args.match is not None:
        minutes = float(json.loads((args.match / "model.json").read_text())["training"]["diffusion"]["cpu_minutes"])
    net, info = baseline_snapshot(args.snapshots, meta, minutes)
    cfg = load_config(meta.get("config") or args.config)
    net_cfg = meta.get("network_config") or BASELINE_NETWORK
    args.out.mkdir(parents=True, exist_ok=True)
    weights = args.out / "unet.safetensors"
    write_atomic(weights, lambda p: save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(p)))
    model = {
        "name": args.out.name,
        "kind": "baseline",
        "spatial_dims": 2,
        "image_shape": cfg["image_shape"],
        "voxel_size": cfg["voxel_size"],
        "intensity": cfg["intensity"],
        "networks": {"unet": {**net_cfg, "channels": list(net_cfg["channels"]), "strides": list(net_cfg["strides"])}},
        "weights": {"unet": {"file": weights.name, "sha256": sha256_file(weights)}},
        "training": {**info, "matched_cpu_minutes": minutes, "train_seeds": meta.get("train_seeds")},
    }
    write_text_atomic(args.out / "model.json", json.dumps(model, indent=1) + "\n")
    print(
        f"{args.out}: snapshot {info['file']} ({info['cpu_minutes']:.1f} CPU-min, {info['steps']} steps) "
        f"for {minutes:.1f} CPU-min of diffusion training",
        flush=True,
    )
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("train", help="train the plain MONAI UNet baseline, snapshots every CPU minute")
    b.add_argument("--config", type=Path, required=True)
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--cpu-minutes", type=float, default=60.0)
    b.add_argument("--every", type=float, default=1.0, help="CPU minutes between snapshots")
    b.add_argument("--threads", type=int, default=1)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--resume", action="store_true", help="continue from the last snapshot in --out")
    b.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="start from a snapshot of another run (its CPU minutes count; input channels added at zero)",
    )
    x = sub.add_parser("export", help="a snapshot as a baseline model folder for bench_segment.py")
    x.add_argument("--snapshots", type=Path, required=True)
    x.add_argument("--out", type=Path, required=True)
    x.add_argument("--match", type=Path, default=None, help="a diffusion model folder: match its training CPU minutes")
    x.add_argument("--cpu-minutes", type=float, default=None)
    x.add_argument("--config", type=Path, default=None, help="the training config (if snapshots.json lacks it)")
    args = p.parse_args(argv)
    if args.cmd == "export" and (args.match is None) == (args.cpu_minutes is None):
        p.error("export: give exactly one of --match and --cpu-minutes")
    return train_baseline(args) if args.cmd == "train" else export(args)


if __name__ == "__main__":
    sys.exit(main())
