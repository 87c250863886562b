"""``meddiff inpaint``: fill a masked region of a scan (lesion filling, tissue insertion, artefact repair).

Voxels outside the mask are written back unchanged. One candidate goes to ``--out``; with ``--candidates K``
candidate k goes to ``<out>_cand<k>.nii.gz``. Each file gets a JSON sidecar with its provenance.

A label-map model (the default with ``--labels``) fills under the scan's tissue map as edited; with
``--changed-from ORIGINAL_MAP`` instead of ``--mask`` it regenerates only where the edit changed the map.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from napari_meddiff.cli.conditions import add_fixed_condition_option, fixed_conditions
from napari_meddiff.cli.options import add_sampling_options, counted, load_model_for, seed_value
from napari_meddiff.errors import MeddiffError
from napari_meddiff.io.files import check_output_file, image_stem
from napari_meddiff.models import DEFAULT_INPAINT_MODEL, DEFAULT_LABEL_MODEL, describe_model
from napari_meddiff.tasks import batch
from napari_meddiff.tasks.from_labels import require_label_map

AXES = ("axial", "coronal", "sagittal")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inpaint",
        help="fill a masked region (lesion filling, artefact repair)",
        description="Fill the region of --mask in --image with a diffusion model; everything outside the mask "
        "is kept exactly. Any image size or voxel size: only the region around the mask is resampled to the "
        "model. 2D models run slice by slice along --axis, on the slices the mask touches.",
    )
    p.add_argument(
        "--model",
        default=None,
        help=f"model name or folder (default {DEFAULT_INPAINT_MODEL}; with --labels, {DEFAULT_LABEL_MODEL})",
    )
    p.add_argument("--image", required=True, type=Path, help="input scan (NIfTI, or what SimpleITK reads)")
    p.add_argument("--mask", type=Path, help="mask / label image on the same scan (non-zero = fill)")
    p.add_argument(
        "--labels",
        type=Path,
        default=None,
        help="a label-map model: the scan's tissue map as edited (the fill follows it)",
    )
    p.add_argument(
        "--changed-from",
        type=Path,
        default=None,
        help="with --labels, instead of --mask: the map before the edit; only what changed is regenerated",
    )
    p.add_argument(
        "--margin", type=int, default=1, help="with --changed-from: grow the changed region by N voxels (default 1)"
    )
    p.add_argument("--out", required=True, type=Path, help="output .nii or .nii.gz")
    p.add_argument(
        "--label", type=float, default=None, help="fill only this label value of the mask (default: all non-zero)"
    )
    p.add_argument("--candidates", type=int, default=1, help="number of candidates (seeds S..S+K-1)")
    p.add_argument("--seed", type=seed_value, default=0, help="seed of the first candidate")
    p.add_argument("--jump-length", type=int, default=None, help="RePaint jump length in steps (default: the model's)")
    p.add_argument(
        "--jump-n", type=int, default=None, help="RePaint resamplings per jump; 1 = none (default: the model's)"
    )
    p.add_argument("--feather", type=int, default=None, help="feather the fill's border over N voxels inside the mask")
    p.add_argument(
        "--axis", default="axial", help="2D models: slice axis, one of axial/coronal/sagittal or 0/1/2 (default axial)"
    )
    add_sampling_options(p)
    p.add_argument("--batch-size", type=int, default=8, help="chains per network evaluation (slices for 2D models)")
    p.add_argument("--overwrite", action="store_true", help="replace existing files")
    add_fixed_condition_option(p)
    p.set_defaults(func=run)


def _check_region_options(args: argparse.Namespace) -> None:
    """One way to say what to fill (--mask, or --changed-from with --labels), and the model that fits --labels;
    checked before any file is read."""
    if args.changed_from is not None and args.labels is None:
        raise MeddiffError("--changed-from needs --labels: the edited map to compare it with")
    if args.model is None:
        args.model = DEFAULT_LABEL_MODEL if args.labels is not None else DEFAULT_INPAINT_MODEL
    require_label_map(describe_model(args.model), args.labels)
    if (args.mask is None) == (args.changed_from is None):
        raise MeddiffError("say what to fill: --mask MASK, or --changed-from ORIGINAL_MAP (with --labels)")
    for option, path in (("--labels", args.labels), ("--changed-from", args.changed_from), ("--mask", args.mask)):
        if path is not None and not path.is_file():
            raise MeddiffError(f"{option}: {path} is not a file")


def _changed_region(args: argparse.Namespace, labels):
    """--changed-from: where the edited map (--labels) differs from the original, grown by --margin voxels."""
    from napari_meddiff.io.volume import Volume, read_volume
    from napari_meddiff.tasks.from_labels import changed_labels_mask

    original = read_volume(args.changed_from)
    return Volume(changed_labels_mask(original, labels, args.margin).astype(np.uint8), labels.affine)


def _stem(path: Path) -> str:
    if not path.name.lower().endswith((".nii.gz", ".nii")):
        raise MeddiffError(f"output must end in .nii or .nii.gz: {path}")
    return image_stem(path)


def output_paths(out: Path, candidates: int) -> list[tuple[Path, Path]]:
    """(image, sidecar) per candidate: ``out`` itself for one, ``<stem>_cand<k><suffix>`` for several."""
    stem = _stem(out)
    suffix = out.name[len(stem) :]
    if candidates == 1:
        return [(out, out.with_name(f"{stem}.json"))]
    return [
        (out.with_name(f"{stem}_cand{k}{suffix}"), out.with_name(f"{stem}_cand{k}.json"))
        for k in range(1, candidates + 1)
    ]


def _axis(value: str):
    v = value.strip().lower()
    if v in ("0", "1", "2"):
        return int(v)
    if v in AXES or v in ("x", "y", "z"):
        return v
    raise MeddiffError(f"--axis must be one of axial/coronal/sagittal or 0/1/2, not {value!r}")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from napari_meddiff.io.volume import read_volume, write_volume
    from napari_meddiff.tasks.inpaint import inpaint

    if args.candidates < 1:
        raise MeddiffError("--candidates must be at least 1")
    if args.steps is not None and args.steps < 1:
        raise MeddiffError(f"--steps must be a positive integer, got {args.steps}")
    if args.batch_size < 1:
        raise MeddiffError("--batch-size must be at least 1")
    axis = _axis(args.axis)
    _stem(args.out)  # the output's suffix, before reading anything
    _check_region_options(args)
    label = None
    if args.label is not None:
        label = int(args.label) if float(args.label).is_integer() else args.label
    conditions = fixed_conditions(args.condition)
    from napari_meddiff.runtime.devices import resolve_device
    from napari_meddiff.runtime.memory import check_fits

    device = resolve_device(args.device)
    image = read_volume(args.image)
    # the candidates' images alone (the task adds its networks' share): refused before any file name is made
    check_fits(4.0 * (args.candidates + 1) * image.array.size, f"{counted(args.candidates, 'candidate')} of this image")
    paths = output_paths(args.out, args.candidates)
    for image_path, sidecar in paths:  # up front, not after minutes of sampling
        check_output_file(image_path, args.overwrite)
        check_output_file(sidecar, args.overwrite)
    labels = read_volume(args.labels) if args.labels is not None else None
    mask = read_volume(args.mask) if args.mask is not None else _changed_region(args, labels)

    model = load_model_for(args.model, device, args.precision, "inpaint")

    bar = None

    def on_step(info) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=info.total, desc=f"inpaint {model.name}", unit="step", file=sys.stderr, dynamic_ncols=True)
        bar.update(info.index - bar.n)

    try:
        volumes = inpaint(
            model,
            image,
            mask,
            label=label,
            labels=labels,
            sampler=args.sampler,
            steps=args.steps,
            seed=args.seed,
            candidates=args.candidates,
            axis=axis,
            jump_length=args.jump_length,
            jump_n=args.jump_n,
            feather_voxels=args.feather,
            eta=args.eta,
            batch_size=args.batch_size,
            device=str(device),
            precision=args.precision,
            on_step=on_step,
            conditions=conditions,
            release_unet=True,  # this process samples no more after its last batch: decode without the UNet
        )
    finally:
        if bar is not None:
            bar.close()
    for vol, (image_path, sidecar) in zip(volumes, paths):
        prov = dict(vol.metadata["provenance"])
        prov.pop("model_grid_affine", None)
        write_volume(vol, image_path, overwrite=args.overwrite, description=vol.metadata.get("descrip"))
        where = {"image": str(args.image), "mask": None if args.mask is None else str(args.mask)}
        if args.labels is not None:
            where.update(labels=str(args.labels), changed_from=args.changed_from and str(args.changed_from))
        batch.write_json_atomic(sidecar, {"file": image_path.name, **where, **prov})
        print(image_path)
    return 0
