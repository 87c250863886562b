"""``meddiff train CONFIG.yaml``: train a model from a YAML config and write its model folder."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from napari_meddiff.choices import DEVICES
from napari_meddiff.errors import MeddiffError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model from a YAML config",
        description="Train a DDPM, latent diffusion or segmentation diffusion model from a YAML config "
        "(see examples/train/) and write a model folder that `meddiff generate --model DIR` loads. "
        "Data parallel: torchrun --nproc_per_node N -m napari_meddiff.cli train CONFIG.yaml",
    )
    p.add_argument("config", type=Path, help="training config (YAML)")
    p.add_argument("--out", type=Path, default=None, help="model folder to write (default models/<name>)")
    p.add_argument(
        "--work-dir", type=Path, default=None, help="checkpoints, previews, loss curves (default runs/<name>)"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier model folder at --out (never a folder holding other files)",
    )
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in the work dir")
    p.add_argument(
        "--fresh", action="store_true", help="discard the checkpoints of an earlier run in the work dir and start again"
    )
    p.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="wall-clock budget of the whole run, then export (with training.init_from it counts the "
        "run it starts from, like the config's max_minutes)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="override the number of steps (each stage; with training.init_from, the total including "
        "the steps of the run it starts from)",
    )
    p.add_argument(
        "--autoencoder-only",
        action="store_true",
        help="an LDM: train the autoencoder stage only and stop (no model folder); --max-minutes is then "
        "all the autoencoder's, a total including the minutes its checkpoint has already spent; --resume "
        "later goes on from it",
    )
    p.add_argument("--device", default="auto", help=f"one of {', '.join(DEVICES)} (default auto)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from napari_meddiff.training.config import check_number
    from napari_meddiff.training.pipeline import RUN_OPTIONS, train

    if not args.config.is_file():
        raise MeddiffError(f"training config not found: {args.config}")
    for option, value in (("max_minutes", args.max_minutes), ("steps", args.steps), ("num_threads", args.threads)):
        flag = "--threads" if option == "num_threads" else "--" + option.replace("_", "-")
        check_number(flag, value, RUN_OPTIONS[option])  # finite: --max-minutes nan would turn the limit off
    from napari_meddiff.training.stopping import TrainingStopped

    try:
        path = train(
            args.config,
            out=args.out,
            work_dir=args.work_dir,
            resume=args.resume,
            max_minutes=args.max_minutes,
            device=args.device,
            num_threads=args.threads,
            steps=args.steps,
            progress=not args.no_progress,
            overwrite=args.overwrite,
            fresh=args.fresh,
            autoencoder_only=args.autoencoder_only,
        )
    except TrainingStopped as stop:
        if int(os.environ.get("RANK", "0")) == 0:  # torchrun: one line, not one per process
            print(f"meddiff train: {stop}", file=sys.stderr)
        return 128 + stop.signum  # as a shell reports a process ended by that signal
    if path is not None:
        from napari_meddiff.models import read_config

        use = "segment --image SCAN.nii.gz" if read_config(path)["kind"] == "segmentation" else "generate"
        print(f"model written to {path}; try: meddiff {use} --model {path} --out OUT")
    return 0
