"""``meddiff audit``: memorization, diversity and fidelity of a folder of synthetic volumes, in one report.

Writes ``audit.json`` and ``report.html`` into ``--out``; the work is `napari_meddiff.audit.audit`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from napari_meddiff.errors import MeddiffError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "audit",
        help="is a synthetic set memorized, diverse, realistic? a report (audit.json, report.html)",
        description="Compare a folder of synthetic volumes with the training volumes (and held-out real scans): "
        "each synthetic volume's nearest training volume and whether it is a copy (closer than real subjects "
        "come to the training set, robust to a mirror, shift, regridding, rescale, noise or crop), the mean "
        "pairwise MS-SSIM of each set (diversity) and, with --real, a classifier two-sample test and MMD "
        "(fidelity). Volumes of any grid are compared on one world grid.",
    )
    p.add_argument("--synthetic", required=True, type=Path, help="folder of synthetic volumes")
    p.add_argument("--training", required=True, type=Path, help="folder of the generator's training volumes")
    p.add_argument(
        "--real",
        type=Path,
        default=None,
        help="folder of held-out real scans: they set the memorization threshold (else leave-one-out within "
        "the training set) and are what fidelity is measured against",
    )
    p.add_argument("--out", required=True, type=Path, help="report folder (audit.json, report.html)")
    p.add_argument("--spacing", type=float, default=4.0, help="voxel size of the audit grid in mm (default 4)")
    p.add_argument("--pairs", type=int, default=200, help="pairs per set for MS-SSIM (default 200)")
    p.add_argument("--permutations", type=int, default=1000, help="permutations of the MMD test (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the pair draws and the classifier (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report")
    p.set_defaults(func=run)


def _check(args: argparse.Namespace) -> None:
    for name in ("synthetic", "training", "real"):
        folder = getattr(args, name)
        if folder is not None and not folder.is_dir():
            raise MeddiffError(f"--{name}: not a folder: {folder}")
    if not 0.5 <= args.spacing <= 16:
        raise MeddiffError(f"--spacing must be between 0.5 and 16 mm, got {args.spacing:g}")
    if args.pairs < 1 or args.permutations < 1:
        raise MeddiffError("--pairs and --permutations must be at least 1")


class _Bars:
    """One tqdm bar per stage of the audit, on stderr."""

    def __init__(self) -> None:
        self.stage, self.bar = None, None

    def __call__(self, stage: str, done: int, total: int) -> None:
        from tqdm import tqdm

        if stage != self.stage:
            self.close()
            self.stage = stage
            self.bar = tqdm(total=total, desc=stage, file=sys.stderr, dynamic_ncols=True, leave=False)
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def run(args: argparse.Namespace) -> int:
    from napari_meddiff.audit import audit

    _check(args)
    bars = _Bars()
    try:
        result = audit(
            args.synthetic,
            args.training,
            args.real,
            args.out,
            spacing_mm=args.spacing,
            max_pairs=args.pairs,
            permutations=args.permutations,
            seed=args.seed,
            overwrite=args.overwrite,
            on_progress=bars,
            on_skip=lambda path, why: print(f"meddiff: skipping {path}: {why}", file=sys.stderr),
        )
    finally:
        bars.close()
    from napari_meddiff.audit.report import summary_lines

    print(summary_lines(result.summary))
    print(f"wrote {args.out / 'audit.json'} and {args.out / 'report.html'}")
    return 0
