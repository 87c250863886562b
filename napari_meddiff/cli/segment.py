"""``meddiff segment``: diffusion segmentation with ensemble uncertainty, written in the input's geometry.

Writes ``labels.nii.gz`` (integer), ``probabilities.nii.gz`` (4D, one volume per class), ``uncertainty.nii.gz``
(0..1), ``volumes.csv`` (mL per class) and ``segment.json`` (provenance) into ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

from napari_meddiff.choices import COMBINE_METHODS
from napari_meddiff.cli.options import add_model_option, add_sampling_options, load_model_for, seed_value
from napari_meddiff.errors import MeddiffError
from napari_meddiff.io.files import (
    check_output_file,
    ensure_folder,
    new_files_removed_on_failure,
    removed_if_left_empty,
    write_text_atomic,
)

OUTPUTS = ("labels.nii.gz", "probabilities.nii.gz", "uncertainty.nii.gz", "volumes.csv", "segment.json")
DEFAULT_SEG_MODEL = "brain-tissue-segdiff-2d"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "segment",
        help="segment a scan with a diffusion model (ensemble + uncertainty)",
        description="Segment a scan with a diffusion segmentation model. An ensemble of N samples gives the labels, "
        "per-class probabilities (the members' mean class probabilities, or the fraction of members voting each "
        "class: --combine), an uncertainty map (normalised entropy of those probabilities, 0..1) and class "
        "volumes in mL, all in the input's geometry.",
    )
    add_model_option(p, DEFAULT_SEG_MODEL)
    p.add_argument("--image", required=True, type=Path, help="input scan (NIfTI, or anything SimpleITK reads)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--ensemble", type=int, default=5, help="ensemble size N (default 5)")
    p.add_argument("--seed", type=seed_value, default=0, help="random seed (default 0)")
    p.add_argument(
        "--axis",
        choices=("axial", "coronal", "sagittal"),
        default=None,
        help="2D models: world axis to slice along (default: the model's, axial)",
    )
    p.add_argument(
        "--window",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        default=None,
        help="intensities mapped to 0 and 1 (default: the model's intensity normalisation)",
    )
    add_sampling_options(p, eta=False)
    p.add_argument(
        "--combine",
        choices=COMBINE_METHODS,
        default=None,
        help="how ensemble members are combined: label votes, or the mean of their class probabilities "
        "(default: the model's)",
    )
    p.add_argument("--batch-size", type=int, default=None, help="samples per network evaluation (default: automatic)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.set_defaults(func=run)


def volumes_csv(volumes_ml: dict[str, float]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["label", "name", "volume_ml"])
    for i, (name, ml) in enumerate(volumes_ml.items()):
        w.writerow([i, name, f"{ml:.3f}"])
    return buf.getvalue()


def run(args: argparse.Namespace) -> int:
    from napari_meddiff.io.volume import read_volume

    if args.ensemble < 1:
        raise MeddiffError(f"--ensemble must be at least 1, got {args.ensemble}")
    if args.steps is not None and args.steps < 1:
        raise MeddiffError(f"--steps must be a positive integer, got {args.steps}")
    if args.batch_size is not None and args.batch_size < 1:
        raise MeddiffError(f"--batch-size must be at least 1, got {args.batch_size}")
    from napari_meddiff.runtime.devices import resolve_device

    device = resolve_device(args.device)
    if args.out.exists() and not args.out.is_dir():
        raise MeddiffError(f"{args.out} exists and is not a folder; --out takes a folder")
    for name in OUTPUTS:  # up front, not after minutes of sampling
        check_output_file(args.out / name, args.overwrite)
    image = read_volume(args.image)

    model = load_model_for(args.model, device, args.precision, "segment")
    from napari_meddiff.tasks.segment import check_segmentation_model

    check_segmentation_model(model)  # a generative model is refused before any progress bar is drawn
    with removed_if_left_empty(args.out):
        ensure_folder(args.out)
        return _segment(args, image, model, device)


def _segment(args: argparse.Namespace, image, model, device) -> int:
    from tqdm import tqdm

    from napari_meddiff.io.volume import write_volume
    from napari_meddiff.tasks.segment import segment

    bar = tqdm(
        total=1000,
        desc=f"{model.name} x{args.ensemble}",
        unit="‰",
        file=sys.stderr,
        dynamic_ncols=True,
        bar_format="{l_bar}{bar}| {elapsed}<{remaining}",
    )

    def progress(p) -> None:
        bar.n = int(round(p.fraction * 1000))
        bar.set_postfix_str(f"members {p.members[0] + 1}-{p.members[-1] + 1}/{args.ensemble}", refresh=False)
        bar.refresh()

    try:
        result = segment(
            model,
            image,
            ensemble=args.ensemble,
            sampler=args.sampler,
            steps=args.steps,
            seed=args.seed,
            axis=args.axis,
            device=str(device),
            precision=args.precision,
            batch_size=args.batch_size,
            window=tuple(args.window) if args.window else None,
            combine=args.combine,
            on_step=progress,
        )
    finally:
        bar.close()
    out = args.out
    ow = args.overwrite
    with new_files_removed_on_failure(out / name for name in OUTPUTS):  # all five, or none of this run's
        write_volume(result.labels, out / "labels.nii.gz", kind="labels", overwrite=ow)
        write_volume(result.probabilities, out / "probabilities.nii.gz", kind="image", overwrite=ow)
        write_volume(result.uncertainty, out / "uncertainty.nii.gz", kind="image", overwrite=ow)
        write_text_atomic(out / "volumes.csv", volumes_csv(result.volumes_ml))
        sidecar = {"image": str(args.image), **result.provenance}
        write_text_atomic(out / "segment.json", json.dumps(sidecar, indent=2) + "\n")
    for name, ml in result.volumes_ml.items():
        print(f"{name}: {ml:.1f} mL")
    print(out / "labels.nii.gz")
    return 0
