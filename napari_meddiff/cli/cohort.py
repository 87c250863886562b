"""``meddiff cohort``: write a synthetic brain cohort derived from the MNI152 template (`data.mni152`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from napari_meddiff.cli.options import seed_value
from napari_meddiff.errors import MeddiffError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cohort",
        help="write a synthetic MNI152-derived brain cohort",
        description=(
            "Write synthetic T1 brains (MNI152 template, randomly deformed, with random bias field, contrast and "
            "noise), tissue labels (1 CSF, 2 GM, 3 WM) and, for some subjects, a lesion, plus cohort.csv. "
            "Seeds 0..99999 are training subjects, 100000..100099 are held out for evaluation. "
            "Subjects already written are kept when their files match the sha256s cohort.csv records for them, "
            "and written again when damaged. A cohort.csv that is not a cohort's (a manifest of `meddiff "
            "generate`) is never replaced."
        ),
    )
    p.add_argument("--num", type=int, required=True, help="number of subjects (seeds S..S+N-1)")
    p.add_argument("--seed", type=seed_value, default=0, help="first subject seed (default 0)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--resolution", type=float, default=2.0, choices=(1.0, 2.0), help="voxel size in mm (default 2)")
    p.add_argument(
        "--lesion-fraction", type=float, default=0.3, help="fraction of subjects with a lesion (default 0.3)"
    )
    p.add_argument("--overwrite", action="store_true", help="regenerate and replace existing files")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from napari_meddiff.data.mni152 import write_cohort

    if args.num < 1:
        raise MeddiffError("--num must be at least 1")
    if not 0.0 <= args.lesion_fraction <= 1.0:
        raise MeddiffError(f"--lesion-fraction must be between 0 and 1, got {args.lesion_fraction}")
    manifest = write_cohort(
        args.out,
        args.num,
        seed=args.seed,
        resolution_mm=args.resolution,
        lesion_fraction=args.lesion_fraction,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    print(manifest)
    return 0
